//! UpdateKey: field masks, etags, the no-escalation rules, disabling and enabling a key, what
//! a change does to VerifyKey, ListKeys, RotateKey and KeyService credentials (on this replica
//! and on another), and the one audit event each update leaves.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use key_authority::pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{
    KeysClient, TestApp, TestDb, code, jwt_user, key_of, keys_as, on_both_databases, reason,
    test_config, with_dashboard_jwts,
};
use crate::replicas::replica;

const WORKSPACE: &str = "acme";
const DAY: i64 = 24 * 60 * 60;

/// A server that accepts the admin token and the dashboard JWTs of `jwt_user`.
async fn spawn(db: &TestDb) -> TestApp {
    TestApp::spawn_with(with_dashboard_jwts(test_config(db))).await
}

/// A timestamp `seconds` from now, in whole seconds (so it round-trips exactly).
fn from_now(seconds: i64) -> prost_types::Timestamp {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    prost_types::Timestamp {
        seconds: now.as_secs() as i64 + seconds,
        nanos: 0,
    }
}

/// The key UpdateKey should change: only its id and workspace, for the test to fill in.
fn target(key_id: &str) -> pb::Key {
    pb::Key {
        key_id: key_id.to_owned(),
        workspace_id: WORKSPACE.to_owned(),
        ..Default::default()
    }
}

/// UpdateKey with `key` and the mask `paths` (`None`: no mask at all).
async fn update(
    client: &mut KeysClient,
    key: pb::Key,
    paths: Option<&[&str]>,
) -> Result<pb::Key, tonic::Status> {
    client
        .update_key(pb::UpdateKeyRequest {
            key: Some(key),
            update_mask: paths.map(|paths| prost_types::FieldMask {
                paths: paths.iter().map(|path| (*path).to_owned()).collect(),
            }),
            request_id: String::new(),
        })
        .await
        .map(|response| response.into_inner().key.expect("UpdateKey returns a key"))
}

/// Disables (`false`) or enables (`true`) a key as the admin.
async fn set_enabled(app: &mut TestApp, key_id: &str, enabled: bool) -> pb::Key {
    update(
        &mut app.keys,
        pb::Key {
            enabled,
            ..target(key_id)
        },
        Some(&["enabled"]),
    )
    .await
    .expect("the admin may disable and enable keys")
}

/// The field a refusal names (`ErrorInfo.metadata["field"]`).
fn field(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .and_then(|info| info.metadata.get("field").cloned())
        .unwrap_or_default()
}

#[track_caller]
fn assert_refused(status: &tonic::Status, code: Code, expected_reason: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(status), expected_reason, "{status:?}");
}

#[track_caller]
fn assert_invalid(status: &tonic::Status, expected_field: &str) {
    assert_refused(status, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(field(status), expected_field, "{status:?}");
}

/// The key's audit events, newest first, through ListAuditEvents.
async fn events(app: &mut TestApp, key_id: &str) -> Vec<pb::AuditEvent> {
    app.keys
        .list_audit_events(pb::ListAuditEventsRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key_id.into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("ListAuditEvents answers")
        .into_inner()
        .audit_events
}

/// One expected change of an event: field, old and new value as JSON.
type FieldChange<'a> = (&'a str, String, String);

/// The changes of an event as field → (old, new) JSON.
fn changes(event: &pb::AuditEvent) -> HashMap<String, (String, String)> {
    event
        .changes
        .iter()
        .map(|change| {
            (
                change.field.clone(),
                (change.old_value.clone(), change.new_value.clone()),
            )
        })
        .collect()
}

/// The ids ListKeys returns and its total_size.
async fn listed(app: &mut TestApp, include_inactive: bool) -> (Vec<String>, i64) {
    let page = app
        .keys
        .list_keys(pb::ListKeysRequest {
            workspace_id: WORKSPACE.into(),
            page_size: 1000,
            include_inactive,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (
        page.keys.into_iter().map(|key| key.key_id).collect(),
        page.total_size,
    )
}

/// A key with a value in every setting UpdateKey changes.
async fn issue_full(app: &mut TestApp, name: &str) -> pb::IssueKeyResponse {
    app.issue_with(pb::IssueKeyRequest {
        workspace_id: WORKSPACE.into(),
        name: name.into(),
        description: "first description".into(),
        scopes: vec!["read".into(), "write".into()],
        role: pb::Role::Developer as i32,
        metadata: [("team".to_owned(), "a".to_owned())].into(),
        expiration: Some(pb::issue_key_request::Expiration::ExpireTime(from_now(
            30 * DAY,
        ))),
        ..Default::default()
    })
    .await
}

async fn issue_with_role(
    app: &mut TestApp,
    name: &str,
    role: pb::Role,
    scopes: &[&str],
    expire_in: Option<i64>,
) -> pb::IssueKeyResponse {
    app.issue_with(pb::IssueKeyRequest {
        workspace_id: WORKSPACE.into(),
        name: name.into(),
        role: role as i32,
        scopes: scopes.iter().map(|scope| (*scope).to_owned()).collect(),
        expiration: expire_in
            .map(|seconds| pb::issue_key_request::Expiration::ExpireTime(from_now(seconds))),
        ..Default::default()
    })
    .await
}

/// Each mask path changes exactly its field, even when the request's key differs in every
/// other field too, and gives the key a new etag and update_time.
async fn each_mask_path_changes_exactly_its_field(db: TestDb) {
    let mut app = spawn(&db).await;
    let issued = issue_full(&mut app, "original").await;
    let key_id = key_of(&issued).key_id.clone();
    // Every updatable field differs from the key's.
    let decoy = pb::Key {
        name: "renamed".into(),
        description: "second description".into(),
        scopes: vec!["read".into()],
        role: pb::Role::Viewer as i32,
        metadata: [("team".to_owned(), "b".to_owned())].into(),
        expire_time: Some(from_now(10 * DAY)),
        enabled: false,
        ..target(&key_id)
    };
    let mut current = app.get(WORKSPACE, &key_id).await.unwrap();
    assert_eq!(
        current.update_time, current.create_time,
        "never updated yet"
    );
    let paths = [
        "name",
        "description",
        "scopes",
        "role",
        "metadata",
        "expire_time",
        "enabled",
    ];
    for path in paths {
        let mut expected = current.clone();
        match path {
            "name" => expected.name = decoy.name.clone(),
            "description" => expected.description = decoy.description.clone(),
            "scopes" => expected.scopes = decoy.scopes.clone(),
            "role" => expected.role = decoy.role,
            "metadata" => expected.metadata = decoy.metadata.clone(),
            "expire_time" => expected.expire_time = decoy.expire_time,
            _ => {
                expected.enabled = false;
                expected.state = pb::KeyState::Disabled as i32;
            }
        }
        let updated = update(&mut app.keys, decoy.clone(), Some(&[path]))
            .await
            .unwrap_or_else(|status| panic!("{path}: {status:?}"));
        assert_ne!(updated.etag, current.etag, "{path}: a new etag");
        let (before, after) = (current.update_time.unwrap(), updated.update_time.unwrap());
        assert!(
            (after.seconds, after.nanos) > (before.seconds, before.nanos),
            "{path}: update_time moves"
        );
        expected.etag = updated.etag.clone();
        expected.update_time = updated.update_time;
        assert_eq!(updated, expected, "{path} changes only {path}");
        assert_eq!(
            app.get(WORKSPACE, &key_id).await.unwrap(),
            updated,
            "{path}"
        );
        current = updated;
    }
    app.stop().await;
}

/// Without a mask, every field the key sets to a non-default value (AIP-134); `*` replaces
/// every updatable field, defaults included.
async fn implied_mask_and_star(db: TestDb) {
    let mut app = spawn(&db).await;
    let issued = issue_full(&mut app, "original").await;
    let key_id = key_of(&issued).key_id.clone();
    let before = key_of(&issued).clone();

    let implied = pb::Key {
        name: "implied".into(),
        metadata: [("owner".to_owned(), "ops".to_owned())].into(),
        ..target(&key_id)
    };
    let after = update(&mut app.keys, implied, None).await.unwrap();
    assert_eq!(after.name, "implied");
    assert_eq!(
        after.metadata,
        [("owner".to_owned(), "ops".to_owned())].into()
    );
    // Fields left at their defaults are not in the implied mask: nothing is cleared, and
    // `enabled: false` does not disable.
    assert_eq!(after.description, before.description);
    assert_eq!(after.scopes, before.scopes);
    assert_eq!(after.role, before.role);
    assert_eq!(after.expire_time, before.expire_time);
    assert!(after.enabled);
    // An empty mask is no mask.
    let empty_mask = update(
        &mut app.keys,
        pb::Key {
            description: "via an empty mask".into(),
            ..target(&key_id)
        },
        Some(&[]),
    )
    .await
    .unwrap();
    assert_eq!(empty_mask.description, "via an empty mask");
    assert_eq!(empty_mask.name, "implied");

    let star = pb::Key {
        name: "star".into(),
        role: pb::Role::Viewer as i32,
        enabled: true,
        ..target(&key_id)
    };
    let after = update(&mut app.keys, star, Some(&["*"])).await.unwrap();
    assert_eq!(after.name, "star");
    assert_eq!(after.role, pb::Role::Viewer as i32);
    assert_eq!(
        after.description, "",
        "* clears what the request leaves empty"
    );
    assert!(after.scopes.is_empty());
    assert!(after.metadata.is_empty());
    assert_eq!(
        after.expire_time, None,
        "* with no expire_time removes the expiry"
    );
    assert!(after.enabled);

    // `*` with `enabled` left false disables the key, as full replacement says.
    let disabled = update(
        &mut app.keys,
        pb::Key {
            name: "star".into(),
            role: pb::Role::Viewer as i32,
            ..target(&key_id)
        },
        Some(&["*"]),
    )
    .await
    .unwrap();
    assert_eq!(disabled.state, pb::KeyState::Disabled as i32);
    // And `enabled: true` without a mask enables it again.
    let enabled = update(
        &mut app.keys,
        pb::Key {
            enabled: true,
            ..target(&key_id)
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(enabled.state, pb::KeyState::Active as i32);
    app.stop().await;
}

/// A mask UpdateKey cannot apply is INVALID_ARGUMENT naming the field, and changes nothing.
async fn bad_masks_are_invalid_arguments(db: TestDb) {
    let mut app = spawn(&db).await;
    let issued = issue_full(&mut app, "original").await;
    let key_id = key_of(&issued).key_id.clone();
    let renamed = pb::Key {
        name: "renamed".into(),
        ..target(&key_id)
    };
    let cases: [(pb::Key, Option<&[&str]>, &str); 10] = [
        (renamed.clone(), Some(&["usage_limit"]), "update_mask"),
        (renamed.clone(), Some(&["key.name"]), "update_mask"),
        (renamed.clone(), Some(&["name", "nonsense"]), "update_mask"),
        (renamed.clone(), Some(&["*", "name"]), "update_mask"),
        (renamed.clone(), Some(&[""]), "update_mask"),
        // Nothing set and no mask: nothing to update.
        (target(&key_id), None, "update_mask"),
        (target(&key_id), Some(&["role"]), "key.role"),
        (target(&key_id), Some(&["name"]), "key.name"),
        (
            pb::Key {
                scopes: vec!["has space".into()],
                ..target(&key_id)
            },
            None,
            "key.scopes",
        ),
        (
            pb::Key {
                role: 99,
                ..target(&key_id)
            },
            Some(&["role"]),
            "key.role",
        ),
    ];
    for (key, mask, expected_field) in cases {
        let status = update(&mut app.keys, key.clone(), mask)
            .await
            .expect_err("refused");
        assert_invalid(&status, expected_field);
    }
    let status = app
        .keys
        .update_key(pb::UpdateKeyRequest::default())
        .await
        .unwrap_err();
    assert_invalid(&status, "key");
    let status = update(&mut app.keys, pb::Key::default(), Some(&["name"]))
        .await
        .unwrap_err();
    assert_invalid(&status, "key.key_id");

    let unchanged = app.get(WORKSPACE, &key_id).await.unwrap();
    assert_eq!(&unchanged, key_of(&issued), "nothing changed");
    assert_eq!(
        events(&mut app, &key_id).await.len(),
        1,
        "only the issue event"
    );
    app.stop().await;
}

/// The current etag updates; a stale one is ABORTED (ETAG_MISMATCH); garbage is
/// INVALID_ARGUMENT.
async fn etags_make_updates_optimistic(db: TestDb) {
    let mut app = spawn(&db).await;
    let issued = app.issue(WORKSPACE, "original").await;
    let key_id = key_of(&issued).key_id.clone();
    let read = app.get(WORKSPACE, &key_id).await.unwrap();
    // Usage is not a change of settings: verifying the key leaves its etag as it was.
    for _ in 0..3 {
        assert!(app.verify_key(&issued.secret, &[]).await.valid);
    }
    app.server.verifier.usage().flush().await.unwrap();
    let used = app.get(WORKSPACE, &key_id).await.unwrap();
    assert_eq!((used.total_requests, &used.etag), (3, &read.etag));
    let first = update(
        &mut app.keys,
        pb::Key {
            name: "first".into(),
            etag: read.etag.clone(),
            ..target(&key_id)
        },
        Some(&["name"]),
    )
    .await
    .expect("the current etag updates");
    assert_ne!(first.etag, read.etag);

    // A second writer still holding the first read is refused.
    let status = update(
        &mut app.keys,
        pb::Key {
            name: "second".into(),
            etag: read.etag.clone(),
            ..target(&key_id)
        },
        Some(&["name"]),
    )
    .await
    .unwrap_err();
    assert_refused(&status, Code::Aborted, "ETAG_MISMATCH");

    for garbage in [
        "abc",
        "1.5",
        "0x10",
        " 1",
        "-1",
        "+1",
        "01",
        "0",
        "99999999999999999999",
    ] {
        let status = update(
            &mut app.keys,
            pb::Key {
                name: "third".into(),
                etag: garbage.into(),
                ..target(&key_id)
            },
            Some(&["name"]),
        )
        .await
        .unwrap_err();
        assert_invalid(&status, "key.etag");
    }
    assert_eq!(app.get(WORKSPACE, &key_id).await.unwrap().name, "first");

    // A revoked key is final, whatever the etag: the current one, or one read before the
    // revocation (revoking is a new version) gets the final answer, not a retry.
    app.revoke(WORKSPACE, &key_id).await.unwrap();
    let revoked = app.get(WORKSPACE, &key_id).await.unwrap();
    assert_ne!(revoked.etag, first.etag, "revoking is a new version");
    for etag in [revoked.etag, first.etag] {
        let status = update(
            &mut app.keys,
            pb::Key {
                name: "after revoke".into(),
                etag,
                ..target(&key_id)
            },
            Some(&["name"]),
        )
        .await
        .unwrap_err();
        assert_refused(&status, Code::FailedPrecondition, "KEY_REVOKED");
    }
    // issue, the one update, revoke: the refusals left nothing.
    assert_eq!(events(&mut app, &key_id).await.len(), 3);
    app.stop().await;
}

/// Nobody gives a role above their own, touches a key above their own, or widens itself; API
/// keys never push an expiry later; viewers update nothing. Each refusal changes nothing and
/// leaves no event.
async fn escalation_is_refused(db: TestDb) {
    let mut app = spawn(&db).await;
    let developer_key = issue_with_role(
        &mut app,
        "developer",
        pb::Role::Developer,
        &[],
        Some(30 * DAY),
    )
    .await;
    let developer_id = key_of(&developer_key).key_id.clone();
    let admin_key = issue_with_role(&mut app, "admin", pb::Role::AccountAdmin, &[], None).await;
    let admin_id = key_of(&admin_key).key_id.clone();
    let caller = issue_with_role(
        &mut app,
        "caller",
        pb::Role::Developer,
        &["read"],
        Some(30 * DAY),
    )
    .await;
    let caller_id = key_of(&caller).key_id.clone();
    let viewer_key = issue_with_role(&mut app, "viewer", pb::Role::Viewer, &[], None).await;
    let viewer_id = key_of(&viewer_key).key_id.clone();

    let developer_user = keys_as(&app.channel, Some(&jwt_user(WORKSPACE, "developer")));
    let viewer_user = keys_as(&app.channel, Some(&jwt_user(WORKSPACE, "viewer")));
    let as_caller = keys_as(&app.channel, Some(&caller.secret));
    let as_viewer_key = keys_as(&app.channel, Some(&viewer_key.secret));

    let role = |key_id: &str, role: pb::Role| pb::Key {
        role: role as i32,
        ..target(key_id)
    };
    let scopes = |key_id: &str, scopes: &[&str]| pb::Key {
        scopes: scopes.iter().map(|scope| (*scope).to_owned()).collect(),
        ..target(key_id)
    };
    let expiry = |key_id: &str, at: Option<prost_types::Timestamp>| pb::Key {
        expire_time: at,
        ..target(key_id)
    };
    let refusals: Vec<(&str, &KeysClient, pb::Key, &[&str])> = vec![
        (
            "a developer user grants account_admin",
            &developer_user,
            role(&developer_id, pb::Role::AccountAdmin),
            &["role"],
        ),
        (
            "a developer user renames an account_admin key",
            &developer_user,
            pb::Key {
                name: "mine now".into(),
                ..target(&admin_id)
            },
            &["name"],
        ),
        (
            "a developer user disables an account_admin key",
            &developer_user,
            target(&admin_id),
            &["enabled"],
        ),
        (
            "a viewer user renames a key",
            &viewer_user,
            pb::Key {
                name: "viewed".into(),
                ..target(&developer_id)
            },
            &["name"],
        ),
        (
            "a viewer user disables a key",
            &viewer_user,
            target(&viewer_id),
            &["enabled"],
        ),
        (
            "an API key widens its own scopes",
            &as_caller,
            scopes(&caller_id, &["read", "write"]),
            &["scopes"],
        ),
        (
            "an API key widens its own scopes to full access",
            &as_caller,
            scopes(&caller_id, &[]),
            &["scopes"],
        ),
        (
            "an API key raises its own role",
            &as_caller,
            role(&caller_id, pb::Role::AccountAdmin),
            &["role"],
        ),
        (
            "a viewer API key raises its own role",
            &as_viewer_key,
            role(&viewer_id, pb::Role::Developer),
            &["role"],
        ),
        (
            "an API key extends its own expiry",
            &as_caller,
            expiry(&caller_id, Some(from_now(60 * DAY))),
            &["expire_time"],
        ),
        (
            "an API key removes its own expiry",
            &as_caller,
            expiry(&caller_id, None),
            &["expire_time"],
        ),
        (
            "an API key extends another key's expiry",
            &as_caller,
            expiry(&developer_id, Some(from_now(60 * DAY))),
            &["expire_time"],
        ),
        (
            "an API key grants account_admin to another key",
            &as_caller,
            role(&developer_id, pb::Role::AccountAdmin),
            &["role"],
        ),
        (
            "an API key disables an account_admin key",
            &as_caller,
            target(&admin_id),
            &["enabled"],
        ),
        (
            "a viewer API key renames another key",
            &as_viewer_key,
            pb::Key {
                name: "viewed".into(),
                ..target(&developer_id)
            },
            &["name"],
        ),
    ];
    let ids = [&developer_id, &admin_id, &caller_id, &viewer_id];
    let mut before = Vec::new();
    for id in ids {
        before.push(app.get(WORKSPACE, id).await.unwrap());
    }
    for (what, client, key, mask) in refusals {
        let status = update(&mut client.clone(), key, Some(mask))
            .await
            .expect_err(what);
        assert_refused(&status, Code::PermissionDenied, "INSUFFICIENT_ROLE");
    }
    // Usage counters move on their own (the caller's key verifies itself on each call).
    let settings = |mut key: pb::Key| {
        key.total_requests = 0;
        key.last_used_time = None;
        key
    };
    for (id, before) in ids.into_iter().zip(before) {
        assert_eq!(
            settings(app.get(WORKSPACE, id).await.unwrap()),
            settings(before),
            "{id} unchanged"
        );
        assert_eq!(
            events(&mut app, id).await.len(),
            1,
            "{id}: only its issue event"
        );
    }
    // The caller still authenticates: none of that disabled or changed it.
    assert_eq!(
        code(&app.verify_key(&caller.secret, &["read"]).await),
        pb::VerifyCode::Valid
    );
    app.stop().await;
}

/// An API key may narrow itself: fewer scopes, a lower role, an earlier expiry; and a developer
/// may change what its role allows.
async fn an_api_key_may_narrow_itself(db: TestDb) {
    let mut app = spawn(&db).await;
    let caller = issue_with_role(
        &mut app,
        "caller",
        pb::Role::Developer,
        &["read", "write"],
        Some(30 * DAY),
    )
    .await;
    let caller_id = key_of(&caller).key_id.clone();
    let mut as_caller = keys_as(&app.channel, Some(&caller.secret));

    let narrowed = update(
        &mut as_caller,
        pb::Key {
            scopes: vec!["read".into()],
            ..target(&caller_id)
        },
        Some(&["scopes"]),
    )
    .await
    .expect("fewer scopes");
    assert_eq!(narrowed.scopes, ["read"]);
    let earlier = from_now(20 * DAY);
    let narrowed = update(
        &mut as_caller,
        pb::Key {
            expire_time: Some(earlier),
            ..target(&caller_id)
        },
        Some(&["expire_time"]),
    )
    .await
    .expect("an earlier expiry");
    assert_eq!(narrowed.expire_time, Some(earlier));
    // Sending back the expiry it has is no extension.
    update(
        &mut as_caller,
        pb::Key {
            name: "still caller".into(),
            expire_time: Some(earlier),
            ..target(&caller_id)
        },
        Some(&["name", "expire_time"]),
    )
    .await
    .expect("the same expiry");
    let narrowed = update(
        &mut as_caller,
        pb::Key {
            role: pb::Role::Viewer as i32,
            ..target(&caller_id)
        },
        Some(&["role"]),
    )
    .await
    .expect("a lower role");
    assert_eq!(narrowed.role, pb::Role::Viewer as i32);
    // Now a viewer, it may still narrow itself, and rename itself.
    let renamed = update(
        &mut as_caller,
        pb::Key {
            name: "narrow caller".into(),
            scopes: vec![],
            ..target(&caller_id)
        },
        Some(&["name"]),
    )
    .await
    .expect("a viewer key may rename itself");
    assert_eq!(renamed.name, "narrow caller");
    assert_eq!(renamed.scopes, ["read"], "scopes were not in the mask");

    // A developer user may do what its role allows, including making a key live longer.
    let other = issue_with_role(&mut app, "other", pb::Role::Viewer, &[], Some(DAY)).await;
    let other_id = key_of(&other).key_id.clone();
    let mut developer_user = keys_as(&app.channel, Some(&jwt_user(WORKSPACE, "developer")));
    let later = from_now(40 * DAY);
    let updated = update(
        &mut developer_user,
        pb::Key {
            role: pb::Role::Developer as i32,
            expire_time: Some(later),
            ..target(&other_id)
        },
        Some(&["role", "expire_time"]),
    )
    .await
    .expect("a developer user gives the developer role and a later expiry");
    assert_eq!(
        (updated.role, updated.expire_time),
        (pb::Role::Developer as i32, Some(later))
    );

    let latest = &events(&mut app, &caller_id).await[0];
    let actor = latest.actor.as_ref().unwrap();
    assert_eq!(
        (actor.kind(), actor.id.as_str()),
        (pb::ActorKind::ApiKey, caller_id.as_str()),
        "the key is the actor of its own update"
    );
    app.stop().await;
}

/// Expiry rules: the future, within the server's maximum lifetime; an admin may remove it; a
/// rotated key cannot live longer.
async fn expiry_rules(db: TestDb) {
    let mut app = spawn(&db).await;
    let issued = issue_full(&mut app, "expiring").await;
    let key_id = key_of(&issued).key_id.clone();
    for at in [from_now(-60), from_now(0), from_now(11 * 366 * DAY)] {
        let status = update(
            &mut app.keys,
            pb::Key {
                expire_time: Some(at),
                ..target(&key_id)
            },
            Some(&["expire_time"]),
        )
        .await
        .unwrap_err();
        assert_invalid(&status, "key.expire_time");
    }
    let status = update(
        &mut app.keys,
        pb::Key {
            expire_time: Some(prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            }),
            ..target(&key_id)
        },
        Some(&["expire_time"]),
    )
    .await
    .unwrap_err();
    assert_invalid(&status, "key.expire_time");

    let removed = update(&mut app.keys, target(&key_id), Some(&["expire_time"]))
        .await
        .expect("an admin removes the expiry");
    assert_eq!(removed.expire_time, None);
    assert_eq!(app.get(WORKSPACE, &key_id).await.unwrap().expire_time, None);

    // A rotated key ends with its grace period.
    let rotated = app
        .rotate(
            WORKSPACE,
            &key_id,
            Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        )
        .await
        .unwrap();
    assert!(rotated.previous_key.unwrap().expire_time.is_some());
    for at in [Some(from_now(2 * 3600)), None] {
        let status = update(
            &mut app.keys,
            pb::Key {
                expire_time: at,
                ..target(&key_id)
            },
            Some(&["expire_time"]),
        )
        .await
        .unwrap_err();
        assert_invalid(&status, "key.expire_time");
    }
    // It may still end earlier.
    update(
        &mut app.keys,
        pb::Key {
            expire_time: Some(from_now(1800)),
            ..target(&key_id)
        },
        Some(&["expire_time"]),
    )
    .await
    .expect("a rotated key may end earlier");
    app.stop().await;
}

/// Revoked and expired keys are final: UpdateKey changes neither.
async fn final_keys_cannot_be_updated(db: TestDb) {
    let mut app = spawn(&db).await;
    let revoked = app.issue(WORKSPACE, "revoked").await;
    let revoked_id = key_of(&revoked).key_id.clone();
    app.revoke(WORKSPACE, &revoked_id).await.unwrap();
    for (key, mask) in [
        (
            pb::Key {
                name: "renamed".into(),
                ..target(&revoked_id)
            },
            ["name"],
        ),
        (
            pb::Key {
                enabled: true,
                ..target(&revoked_id)
            },
            ["enabled"],
        ),
    ] {
        let status = update(&mut app.keys, key, Some(&mask)).await.unwrap_err();
        assert_refused(&status, Code::FailedPrecondition, "KEY_REVOKED");
    }

    let expired = app.issue(WORKSPACE, "expired").await;
    let expired_id = key_of(&expired).key_id.clone();
    app.rotate(
        WORKSPACE,
        &expired_id,
        Some(prost_types::Duration::default()),
    )
    .await
    .unwrap();
    let status = update(
        &mut app.keys,
        pb::Key {
            name: "renamed".into(),
            ..target(&expired_id)
        },
        Some(&["name"]),
    )
    .await
    .unwrap_err();
    assert_refused(&status, Code::FailedPrecondition, "KEY_EXPIRED");
    assert_eq!(
        events(&mut app, &revoked_id).await.len(),
        2,
        "issue, revoke"
    );
    assert_eq!(
        events(&mut app, &expired_id).await.len(),
        2,
        "issue, rotate"
    );

    let status = update(
        &mut app.keys,
        pb::Key {
            name: "ghost".into(),
            ..target("AAAAAAAAAAAA")
        },
        Some(&["name"]),
    )
    .await
    .unwrap_err();
    assert_refused(&status, Code::NotFound, "KEY_NOT_FOUND");
    app.stop().await;
}

/// UpdateKey is sealed to the caller's workspace like every other RPC.
async fn updates_stay_in_their_workspace(db: TestDb) {
    let mut app = spawn(&db).await;
    let issued = app.issue(WORKSPACE, "sealed").await;
    let key_id = key_of(&issued).key_id.clone();
    let renamed = |workspace_id: &str| pb::Key {
        name: "taken over".into(),
        workspace_id: workspace_id.into(),
        ..target(&key_id)
    };
    let mut user_elsewhere = keys_as(&app.channel, Some(&jwt_user("other", "account_admin")));
    // An account_admin API key of another workspace (issued there by the admin).
    let foreign = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "other".into(),
            name: "foreign".into(),
            role: pb::Role::AccountAdmin as i32,
            ..Default::default()
        })
        .await;
    let mut key_elsewhere = keys_as(&app.channel, Some(&foreign.secret));
    // The admin naming the wrong workspace finds nothing there.
    let status = update(&mut app.keys, renamed("other"), Some(&["name"]))
        .await
        .unwrap_err();
    assert_refused(&status, Code::NotFound, "KEY_NOT_FOUND");
    for client in [&mut user_elsewhere, &mut key_elsewhere] {
        let status = update(client, renamed(""), Some(&["name"]))
            .await
            .unwrap_err();
        assert_refused(&status, Code::NotFound, "KEY_NOT_FOUND");
        let status = update(client, renamed(WORKSPACE), Some(&["name"]))
            .await
            .unwrap_err();
        assert_refused(&status, Code::PermissionDenied, "WORKSPACE_MISMATCH");
    }
    let status = update(&mut app.keys, renamed(""), Some(&["name"]))
        .await
        .unwrap_err();
    assert_invalid(&status, "workspace_id");
    assert_eq!(app.get(WORKSPACE, &key_id).await.unwrap().name, "sealed");
    assert_eq!(events(&mut app, &key_id).await.len(), 1);
    app.stop().await;
}

/// A disabled key verifies as DISABLED at once, shows DISABLED, leaves ListKeys unless
/// include_inactive, cannot be rotated and cannot call KeyService; enabled, it is back.
async fn disable_and_enable(db: TestDb) {
    let mut app = spawn(&db).await;
    let issued = issue_with_role(&mut app, "switch", pb::Role::Developer, &[], None).await;
    let key_id = key_of(&issued).key_id.clone();
    let bystander = app.issue(WORKSPACE, "bystander").await;
    let bystander_id = key_of(&bystander).key_id.clone();
    let mut as_key = keys_as(&app.channel, Some(&issued.secret));
    // Warm every cache: VerifyKey and the key as a KeyService credential.
    assert_eq!(
        code(&app.verify_key(&issued.secret, &[]).await),
        pb::VerifyCode::Valid
    );
    as_key
        .list_keys(pb::ListKeysRequest::default())
        .await
        .expect("an enabled key calls KeyService");

    // Any change reaches this replica's VerifyKey answers before UpdateKey returns.
    let renamed = update(
        &mut app.keys,
        pb::Key {
            name: "switch (renamed)".into(),
            ..target(&key_id)
        },
        Some(&["name"]),
    )
    .await
    .unwrap();
    let shown = app.verify_key(&issued.secret, &[]).await.key.unwrap();
    assert_eq!((shown.name, shown.etag), (renamed.name, renamed.etag));

    let disabled = set_enabled(&mut app, &key_id, false).await;
    assert_eq!(disabled.state, pb::KeyState::Disabled as i32);
    assert!(!disabled.enabled);
    // Read your writes: this replica's very next VerifyKey sees it.
    let answer = app.verify_key(&issued.secret, &[]).await;
    assert_eq!(code(&answer), pb::VerifyCode::Disabled);
    assert!(!answer.valid);
    let shown = answer.key.expect("a disabled verdict shows the key");
    assert_eq!(shown.state, pb::KeyState::Disabled as i32);
    let got = app.get(WORKSPACE, &key_id).await.unwrap();
    assert_eq!(
        (got.state, got.enabled),
        (pb::KeyState::Disabled as i32, false)
    );

    assert_eq!(
        listed(&mut app, false).await,
        (vec![bystander_id.clone()], 1)
    );
    let (all, total) = listed(&mut app, true).await;
    assert_eq!(total, 2);
    assert!(all.contains(&key_id) && all.contains(&bystander_id));

    let status = app.rotate(WORKSPACE, &key_id, None).await.unwrap_err();
    assert_refused(&status, Code::FailedPrecondition, "KEY_DISABLED");
    let status = as_key
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap_err();
    assert_refused(&status, Code::Unauthenticated, "INVALID_CREDENTIALS");
    // Disabling a disabled key changes nothing.
    let again = set_enabled(&mut app, &key_id, false).await;
    assert_eq!(again.etag, disabled.etag);

    let enabled = set_enabled(&mut app, &key_id, true).await;
    assert_eq!(
        (enabled.state, enabled.enabled),
        (pb::KeyState::Active as i32, true)
    );
    assert_eq!(
        code(&app.verify_key(&issued.secret, &[]).await),
        pb::VerifyCode::Valid
    );
    assert_eq!(listed(&mut app, false).await.1, 2);
    as_key
        .list_keys(pb::ListKeysRequest::default())
        .await
        .expect("enabled again, the key calls KeyService again");
    app.rotate(WORKSPACE, &key_id, None)
        .await
        .expect("an enabled key rotates");
    app.stop().await;
}

/// Revoking a disabled key works, and revocation stays final: the key cannot be enabled again.
async fn a_disabled_key_can_be_revoked_for_good(db: TestDb) {
    let mut app = spawn(&db).await;
    let issued = app.issue(WORKSPACE, "doomed").await;
    let key_id = key_of(&issued).key_id.clone();
    set_enabled(&mut app, &key_id, false).await;
    let revoked = app.revoke(WORKSPACE, &key_id).await.unwrap();
    assert_eq!(revoked.state, pb::KeyState::Revoked as i32);
    assert_eq!(
        code(&app.verify_key(&issued.secret, &[]).await),
        pb::VerifyCode::Revoked
    );
    let status = update(
        &mut app.keys,
        pb::Key {
            enabled: true,
            ..target(&key_id)
        },
        Some(&["enabled"]),
    )
    .await
    .unwrap_err();
    assert_refused(&status, Code::FailedPrecondition, "KEY_REVOKED");
    let got = app.get(WORKSPACE, &key_id).await.unwrap();
    assert_eq!(got.state, pb::KeyState::Revoked as i32);
    assert_eq!(
        code(&app.verify_key(&issued.secret, &[]).await),
        pb::VerifyCode::Revoked
    );
    app.stop().await;
}

/// Each update leaves exactly one event: UPDATE, DISABLE or ENABLE, with the fields it changed
/// (old → new), UNCHANGED when it changed nothing; a refused update leaves none.
async fn each_update_leaves_one_event(db: TestDb) {
    let mut app = spawn(&db).await;
    let issued = issue_full(&mut app, "audited").await;
    let key_id = key_of(&issued).key_id.clone();
    let before = events(&mut app, &key_id).await;
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].action(), pb::AuditAction::Issue);

    let str_json = |text: &str| serde_json::Value::from(text).to_string();
    // (the update, its mask, the event's action, its changes as field, old and new JSON)
    type Step<'a> = (
        pb::Key,
        &'a [&'a str],
        pb::AuditAction,
        Vec<FieldChange<'a>>,
    );
    let steps: [Step; 5] = [
        (
            pb::Key {
                name: "renamed".into(),
                ..target(&key_id)
            },
            &["name"],
            pb::AuditAction::Update,
            vec![("name", str_json("audited"), str_json("renamed"))],
        ),
        (
            pb::Key {
                scopes: vec!["read".into()],
                role: pb::Role::Viewer as i32,
                ..target(&key_id)
            },
            &["scopes", "role"],
            pb::AuditAction::Update,
            vec![
                ("scopes", r#"["read","write"]"#.into(), r#"["read"]"#.into()),
                ("role", str_json("developer"), str_json("viewer")),
            ],
        ),
        (
            pb::Key {
                description: "disabled for the audit".into(),
                ..target(&key_id)
            },
            &["description", "enabled"],
            pb::AuditAction::Disable,
            vec![
                (
                    "description",
                    str_json("first description"),
                    str_json("disabled for the audit"),
                ),
                ("enabled", "true".into(), "false".into()),
            ],
        ),
        (
            pb::Key {
                enabled: true,
                ..target(&key_id)
            },
            &["enabled"],
            pb::AuditAction::Enable,
            vec![("enabled", "false".into(), "true".into())],
        ),
        (
            pb::Key {
                metadata: [("team".to_owned(), "a".to_owned())].into(),
                ..target(&key_id)
            },
            &["metadata"],
            pb::AuditAction::Update,
            vec![],
        ),
    ];
    let mut count = 1;
    for (key, mask, action, expected_changes) in steps {
        update(&mut app.keys, key, Some(mask)).await.unwrap();
        count += 1;
        let all = events(&mut app, &key_id).await;
        assert_eq!(
            all.len(),
            count,
            "exactly one event per update ({action:?})"
        );
        let event = &all[0];
        assert_eq!(event.action(), action);
        assert_eq!(event.key_id, key_id);
        assert_eq!(event.actor.as_ref().unwrap().kind(), pb::ActorKind::Admin);
        let expected: HashMap<_, _> = expected_changes
            .into_iter()
            .map(|(field, old, new)| (field.to_owned(), (old, new)))
            .collect();
        assert_eq!(changes(event), expected, "{action:?}");
        let outcome = if expected.is_empty() {
            pb::AuditOutcome::Unchanged
        } else {
            pb::AuditOutcome::Applied
        };
        assert_eq!(event.outcome(), outcome, "{action:?}");
    }
    // The expiry's change reads as RFC 3339 times.
    update(&mut app.keys, target(&key_id), Some(&["expire_time"]))
        .await
        .unwrap();
    count += 1;
    let latest = &events(&mut app, &key_id).await[0];
    let (old, new) = &changes(latest)["expire_time"];
    assert!(old.starts_with('"') && old.ends_with("Z\""), "{old}");
    assert_eq!(new, "null");

    // Refusals of every kind leave nothing.
    let read = app.get(WORKSPACE, &key_id).await.unwrap();
    update(
        &mut app.keys,
        pb::Key {
            name: "fresh".into(),
            etag: read.etag.clone(),
            ..target(&key_id)
        },
        Some(&["name"]),
    )
    .await
    .unwrap();
    count += 1;
    let stale = update(
        &mut app.keys,
        pb::Key {
            name: "stale".into(),
            etag: read.etag,
            ..target(&key_id)
        },
        Some(&["name"]),
    )
    .await
    .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    let invalid = update(&mut app.keys, target(&key_id), Some(&["name"]))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    let mut viewer = keys_as(&app.channel, Some(&jwt_user(WORKSPACE, "viewer")));
    let denied = update(
        &mut viewer,
        pb::Key {
            name: "viewer".into(),
            ..target(&key_id)
        },
        Some(&["name"]),
    )
    .await
    .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(events(&mut app, &key_id).await.len(), count);
    app.stop().await;
}

/// Concurrent updates holding the same etag: exactly one applies, the others are ABORTED
/// (ETAG_MISMATCH), and only the one leaves an event. Without etags every one applies, in turn.
async fn concurrent_updates_with_one_etag_apply_once(db: TestDb) {
    const WRITERS: usize = 8;
    let mut app = spawn(&db).await;
    let issued = app.issue(WORKSPACE, "contended").await;
    let key_id = key_of(&issued).key_id.clone();
    let etag = key_of(&issued).etag.clone();
    let keys = app.keys.clone();
    let race = |with_etag: bool| {
        let tasks: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let mut client = keys.clone();
                let key = pb::Key {
                    name: format!("writer {writer}"),
                    etag: if with_etag {
                        etag.clone()
                    } else {
                        String::new()
                    },
                    ..target(&key_id)
                };
                tokio::spawn(async move { update(&mut client, key, Some(&["name"])).await })
            })
            .collect();
        async move {
            let mut results = Vec::new();
            for task in tasks {
                results.push(task.await.unwrap());
            }
            results
        }
    };
    let results = race(true).await;
    let winners: Vec<_> = results
        .iter()
        .filter_map(|result| result.as_ref().ok())
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for status in results.iter().filter_map(|result| result.as_ref().err()) {
        assert_refused(status, Code::Aborted, "ETAG_MISMATCH");
    }
    let now = app.get(WORKSPACE, &key_id).await.unwrap();
    assert_eq!(now.name, winners[0].name);
    assert_eq!(
        events(&mut app, &key_id).await.len(),
        2,
        "issue and the one update"
    );

    let results = race(false).await;
    let applied = results.iter().filter(|result| result.is_ok()).count();
    for status in results.iter().filter_map(|result| result.as_ref().err()) {
        // Only if the key changed under one writer at every one of its attempts.
        assert_refused(status, Code::Aborted, "CONCURRENT_MODIFICATION");
    }
    assert!(applied >= 1, "{results:?}");
    assert_eq!(events(&mut app, &key_id).await.len(), 2 + applied);
    app.stop().await;
}

on_both_databases!(
    each_mask_path_changes_exactly_its_field,
    concurrent_updates_with_one_etag_apply_once,
    implied_mask_and_star,
    bad_masks_are_invalid_arguments,
    etags_make_updates_optimistic,
    escalation_is_refused,
    an_api_key_may_narrow_itself,
    updates_stay_in_their_workspace,
    expiry_rules,
    final_keys_cannot_be_updated,
    disable_and_enable,
    a_disabled_key_can_be_revoked_for_good,
    each_update_leaves_one_event,
);

/// How long a change may take to reach another replica's verify cache in these tests: far
/// above the measured propagation (under a millisecond), far below the state TTL (an hour on
/// these replicas), so only the notification can deliver it.
const PROPAGATION_BOUND: Duration = Duration::from_secs(5);

/// Waits until replica `b` has applied a change notification for `key_id`.
async fn applied(notifications: &mut tokio::sync::broadcast::Receiver<String>, key_id: &str) {
    tokio::time::timeout(PROPAGATION_BOUND, async {
        while notifications.recv().await.unwrap() != key_id {}
    })
    .await
    .unwrap_or_else(|_| panic!("no notification for {key_id} within {PROPAGATION_BOUND:?}"));
}

/// Disabling on replica A reaches replica B, which has the key warm in its cache, through the
/// change feed; enabling does too, and so does any other change to what VerifyKey shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_and_enable_reach_the_other_replica() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let mut a = replica(&db).await;
    let mut b = replica(&db).await;
    let issued = a.issue(WORKSPACE, "shared").await;
    let key_id = key_of(&issued).key_id.clone();
    assert!(
        b.verify_key(&issued.secret, &[]).await.valid,
        "b warms its cache"
    );
    let mut notifications = b.server.change_feed.as_ref().unwrap().applied.subscribe();

    let mut as_key_on_b = keys_as(&b.channel, Some(&issued.secret));
    as_key_on_b
        .get_key(pb::GetKeyRequest {
            key_id: key_id.clone(),
            ..Default::default()
        })
        .await
        .expect("the key calls KeyService on b");

    set_enabled(&mut a, &key_id, false).await;
    applied(&mut notifications, &key_id).await;
    assert_eq!(
        code(&b.verify_key(&issued.secret, &[]).await),
        pb::VerifyCode::Disabled
    );
    let status = as_key_on_b
        .get_key(pb::GetKeyRequest {
            key_id: key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_refused(&status, Code::Unauthenticated, "INVALID_CREDENTIALS");

    set_enabled(&mut a, &key_id, true).await;
    applied(&mut notifications, &key_id).await;
    let answer = b.verify_key(&issued.secret, &[]).await;
    assert_eq!(code(&answer), pb::VerifyCode::Valid);
    assert_eq!(answer.key.unwrap().name, "shared");

    // A rename and a narrowing reach b's answers the same way.
    update(
        &mut a.keys,
        pb::Key {
            name: "renamed".into(),
            scopes: vec!["read".into()],
            ..target(&key_id)
        },
        Some(&["name", "scopes"]),
    )
    .await
    .unwrap();
    applied(&mut notifications, &key_id).await;
    let answer = b.verify_key(&issued.secret, &["read"]).await;
    assert_eq!(answer.key.unwrap().name, "renamed");
    assert_eq!(
        code(&b.verify_key(&issued.secret, &["write"]).await),
        pb::VerifyCode::InsufficientScope
    );
    a.stop().await;
    b.stop().await;
}
