//! The audit trail: one event per mutation (none for a failed one) with who, what, which key,
//! the fields changed, the outcome and where the call came from; ListAuditEvents' filters,
//! paging and tenancy; lockouts written behind; retention.

use std::time::{Duration, Instant};

use key_authority::pb;
use prost_types::{FieldMask, Timestamp};
use tonic::Code;

use crate::common::{
    KeysClient, TestApp, TestDb, jwt_user, key_of, keys_as, on_both_databases, reason, test_config,
    with_dashboard_jwts,
};
use crate::verify::forge_numbered;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const REQUEST_ID: &str = "123E4567-E89B-12D3-A456-426614174000";

/// Every event of `workspace_id` matching `filter`, newest first, across all pages.
async fn events(
    client: &mut KeysClient,
    workspace_id: &str,
    filter: pb::ListAuditEventsRequest,
) -> Vec<pb::AuditEvent> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_audit_events(pb::ListAuditEventsRequest {
                workspace_id: workspace_id.to_owned(),
                page_token: page_token.clone(),
                ..filter.clone()
            })
            .await
            .expect("ListAuditEvents answers")
            .into_inner();
        all.extend(page.audit_events);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

async fn all_events(app: &mut TestApp, workspace_id: &str) -> Vec<pb::AuditEvent> {
    events(&mut app.keys, workspace_id, Default::default()).await
}

fn action(event: &pb::AuditEvent) -> pb::AuditAction {
    pb::AuditAction::try_from(event.action).expect("a known action")
}

fn actions(events: &[pb::AuditEvent]) -> Vec<pb::AuditAction> {
    events.iter().map(action).collect()
}

/// The change of `field` in `event`, as (old, new) JSON texts.
fn change<'a>(event: &'a pb::AuditEvent, field: &str) -> Option<(&'a str, &'a str)> {
    event
        .changes
        .iter()
        .find(|change| change.field == field)
        .map(|change| (change.old_value.as_str(), change.new_value.as_str()))
}

fn admin_actor() -> pb::AuditActor {
    pb::AuditActor {
        kind: pb::ActorKind::Admin as i32,
        id: "admin".into(),
        display: "admin".into(),
    }
}

fn update(key_id: &str, key: pb::Key, paths: &[&str]) -> pb::UpdateKeyRequest {
    pb::UpdateKeyRequest {
        key: Some(pb::Key {
            key_id: key_id.to_owned(),
            workspace_id: "acme".into(),
            ..key
        }),
        update_mask: Some(FieldMask {
            paths: paths.iter().map(|path| (*path).to_owned()).collect(),
        }),
        ..Default::default()
    }
}

async fn every_mutation_leaves_exactly_one_event(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;

    // IssueKey, with a trace and a request id: both are recorded, the request id canonical.
    let mut request = tonic::Request::new(pb::IssueKeyRequest {
        workspace_id: "acme".into(),
        name: "ci".into(),
        scopes: vec!["deploy".into()],
        request_id: REQUEST_ID.into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let issued = app.keys.issue_key(request).await.unwrap().into_inner();
    let key_id = key_of(&issued).key_id.clone();
    let trail = all_events(&mut app, "acme").await;
    assert_eq!(trail.len(), 1);
    let issue = &trail[0];
    assert_eq!(action(issue), pb::AuditAction::Issue);
    assert_eq!(issue.key_id, key_id);
    assert_eq!(issue.workspace_id, "acme");
    assert_eq!(issue.actor, Some(admin_actor()));
    assert_eq!(issue.outcome, pb::AuditOutcome::Applied as i32);
    assert_eq!(issue.client_ip, "127.0.0.1");
    assert_eq!(issue.trace_id, TRACE_ID);
    assert_eq!(issue.request_id, REQUEST_ID.to_lowercase());
    assert_eq!(change(issue, "name"), Some(("null", "\"ci\"")));
    assert_eq!(change(issue, "scopes"), Some(("null", "[\"deploy\"]")));
    assert_eq!(change(issue, "role"), Some(("null", "\"developer\"")));
    assert!(issue.event_time.is_some());
    assert!(!issue.event_id.is_empty());

    // RotateKey: one event, on the rotated key, naming the successor.
    let rotated = app.rotate("acme", &key_id, None).await.unwrap();
    let successor = rotated.key.unwrap().key_id;
    // UpdateKey, then disable and enable through it.
    let renamed = app
        .keys
        .update_key(update(
            &successor,
            pb::Key {
                name: "ci v2".into(),
                ..Default::default()
            },
            &["name"],
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    for enabled in [false, true] {
        app.keys
            .update_key(update(
                &successor,
                pb::Key {
                    enabled,
                    ..Default::default()
                },
                &["enabled"],
            ))
            .await
            .unwrap();
    }
    // RevokeKey.
    app.revoke("acme", &successor).await.unwrap();

    let trail = all_events(&mut app, "acme").await;
    assert_eq!(
        actions(&trail),
        [
            pb::AuditAction::Revoke,
            pb::AuditAction::Enable,
            pb::AuditAction::Disable,
            pb::AuditAction::Update,
            pb::AuditAction::Rotate,
            pb::AuditAction::Issue,
        ],
        "newest first, one each"
    );
    let [revoke, enable, disable, rename, rotate, _] = &trail[..] else {
        unreachable!()
    };
    assert_eq!(rotate.key_id, key_id);
    assert_eq!(
        change(rotate, "rotated_to_key_id"),
        Some(("null", format!("\"{successor}\"").as_str()))
    );
    assert_eq!(change(rename, "name"), Some(("\"ci\"", "\"ci v2\"")));
    assert_eq!(rename.changes.len(), 1, "only what changed");
    assert_eq!(change(disable, "enabled"), Some(("true", "false")));
    assert_eq!(change(enable, "enabled"), Some(("false", "true")));
    assert_eq!(change(revoke, "revoked_by"), Some(("null", "\"admin\"")));
    for event in [revoke, enable, disable, rename] {
        assert_eq!(event.key_id, successor);
        assert_eq!(event.request_id, "", "no request id was sent");
    }

    // Failed mutations leave nothing: a stale etag (the original key's, read before its
    // rotation), a revoked key, bad input, a missing right.
    let stale = app
        .keys
        .update_key(update(
            &key_id,
            pb::Key {
                name: "late".into(),
                etag: key_of(&issued).etag.clone(),
                ..Default::default()
            },
            &["name"],
        ))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    for revoked in [
        app.rotate("acme", &successor, None).await.unwrap_err(),
        app.keys
            .update_key(update(
                &successor,
                pb::Key {
                    name: "late".into(),
                    etag: renamed.etag,
                    ..Default::default()
                },
                &["name"],
            ))
            .await
            .unwrap_err(),
    ] {
        assert_eq!(revoked.code(), Code::FailedPrecondition);
        assert_eq!(reason(&revoked), "KEY_REVOKED");
    }
    let invalid = app
        .keys
        .issue_key(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    let viewer = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "viewer".into(),
            role: pb::Role::Viewer as i32,
            ..Default::default()
        })
        .await;
    let refused = keys_as(&app.channel, Some(&viewer.secret))
        .revoke_key(pb::RevokeKeyRequest {
            key_id: key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let trail = all_events(&mut app, "acme").await;
    assert_eq!(trail.len(), 7, "only the viewer key's issue was added");
    assert_eq!(action(&trail[0]), pb::AuditAction::Issue);

    // Trial keys: anonymous callers, known by their address.
    let mut anonymous = keys_as(&app.channel, None);
    let trial = anonymous
        .issue_trial_key(pb::IssueTrialKeyRequest::default())
        .await
        .unwrap()
        .into_inner();
    anonymous
        .revoke_trial_key(pb::RevokeTrialKeyRequest {
            prefix: key_of_trial(&trial).prefix.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let trail = all_events(&mut app, "trial").await;
    assert_eq!(
        actions(&trail),
        [pb::AuditAction::RevokeTrial, pb::AuditAction::IssueTrial]
    );
    for event in &trail {
        assert_eq!(event.key_id, key_of_trial(&trial).key_id);
        assert_eq!(
            event.actor,
            Some(pb::AuditActor {
                kind: pb::ActorKind::Anonymous as i32,
                id: "127.0.0.1".into(),
                display: "anonymous (127.0.0.1)".into(),
            })
        );
        assert_eq!(event.client_ip, "127.0.0.1");
    }
    app.stop().await;
}

fn one_microsecond_after(time: Timestamp) -> Timestamp {
    let nanos = time.nanos + 1_000;
    Timestamp {
        seconds: time.seconds + i64::from(nanos / 1_000_000_000),
        nanos: nanos % 1_000_000_000,
    }
}

fn key_of_trial(issued: &pb::IssueTrialKeyResponse) -> &pb::Key {
    issued.key.as_ref().expect("a key")
}

/// An API key acting on another key is named as the actor, as products that show "API Key:
/// CI/CD Pipeline" do, and can be filtered on.
async fn an_api_key_is_named_as_the_actor(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let pipeline = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "CI/CD Pipeline".into(),
            role: pb::Role::Developer as i32,
            ..Default::default()
        })
        .await;
    let pipeline_key = key_of(&pipeline).clone();
    let target = app.issue("acme", "target").await;
    let target_id = key_of(&target).key_id.clone();
    keys_as(&app.channel, Some(&pipeline.secret))
        .revoke_key(pb::RevokeKeyRequest {
            key_id: target_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    let by_pipeline = events(
        &mut app.keys,
        "acme",
        pb::ListAuditEventsRequest {
            actor_kind: pb::ActorKind::ApiKey as i32,
            actor_id: pipeline_key.key_id.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_pipeline.len(), 1);
    let event = &by_pipeline[0];
    assert_eq!(action(event), pb::AuditAction::Revoke);
    assert_eq!(event.key_id, target_id);
    assert_eq!(
        event.actor,
        Some(pb::AuditActor {
            kind: pb::ActorKind::ApiKey as i32,
            id: pipeline_key.key_id.clone(),
            display: format!("API Key: CI/CD Pipeline ({})", pipeline_key.prefix),
        })
    );
    // The key's own record keeps the established form.
    assert_eq!(
        change(event, "revoked_by"),
        Some((
            "null",
            format!("\"key:{} (CI/CD Pipeline)\"", pipeline_key.prefix).as_str()
        ))
    );
    app.stop().await;
}

async fn filters_and_pages_are_exact(db: TestDb) {
    let mut app = TestApp::spawn_with(with_dashboard_jwts(test_config(&db))).await;
    let first = app.issue("acme", "first").await;
    let first_id = key_of(&first).key_id.clone();
    let mut user = keys_as(&app.channel, Some(&jwt_user("acme", "developer")));
    let by_user = user
        .issue_key(pb::IssueKeyRequest {
            name: "by user".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let by_user_id = key_of(&by_user).key_id.clone();
    app.rotate("acme", &first_id, None).await.unwrap();
    app.revoke("acme", &by_user_id).await.unwrap();
    let everything = all_events(&mut app, "acme").await;
    assert_eq!(
        actions(&everything),
        [
            pb::AuditAction::Revoke,
            pb::AuditAction::Rotate,
            pb::AuditAction::Issue,
            pb::AuditAction::Issue,
        ]
    );
    let ids: Vec<i64> = everything
        .iter()
        .map(|event| event.event_id.parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|pair| pair[0] > pair[1]), "newest first");

    // By key: both of its events, nothing of the other key.
    let of_first = events(
        &mut app.keys,
        "acme",
        pb::ListAuditEventsRequest {
            key_id: first_id.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        actions(&of_first),
        [pb::AuditAction::Rotate, pb::AuditAction::Issue]
    );
    // By actor: the user's issue only.
    let of_user = events(
        &mut app.keys,
        "acme",
        pb::ListAuditEventsRequest {
            actor_kind: pb::ActorKind::User as i32,
            actor_id: "user-1".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(of_user.len(), 1);
    assert_eq!(of_user[0].key_id, by_user_id);
    assert_eq!(
        of_user[0].actor.as_ref().unwrap().display,
        "user:user-1",
        "a dashboard user by subject"
    );
    // By action.
    let issues = events(
        &mut app.keys,
        "acme",
        pb::ListAuditEventsRequest {
            action: pb::AuditAction::Issue as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(issues.len(), 2);
    // By time: [start, end) around the rotation's event selects exactly it.
    let rotation_time = everything[1].event_time.unwrap();
    let at_rotation = events(
        &mut app.keys,
        "acme",
        pb::ListAuditEventsRequest {
            start_time: Some(rotation_time),
            end_time: Some(one_microsecond_after(rotation_time)),
            ..Default::default()
        },
    )
    .await;
    assert!(
        at_rotation
            .iter()
            .any(|event| action(event) == pb::AuditAction::Rotate)
    );
    assert!(
        at_rotation
            .iter()
            .all(|event| event.event_time == Some(rotation_time))
    );

    // Pages of one: the same events in the same order, each once.
    let mut paged = Vec::new();
    let mut token = String::new();
    let mut last_token = String::new();
    loop {
        let page = app
            .keys
            .list_audit_events(pb::ListAuditEventsRequest {
                workspace_id: "acme".into(),
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.audit_events.len() <= 1);
        paged.extend(page.audit_events);
        if page.next_page_token.is_empty() {
            break;
        }
        last_token = page.next_page_token.clone();
        token = page.next_page_token;
    }
    assert_eq!(paged, everything);

    // A token is bound to its listing: another filter, an altered token, garbage are refused.
    let refusals = [
        pb::ListAuditEventsRequest {
            key_id: first_id.clone(),
            page_token: last_token.clone(),
            ..Default::default()
        },
        pb::ListAuditEventsRequest {
            page_token: format!("{}A", last_token),
            ..Default::default()
        },
        pb::ListAuditEventsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        },
    ];
    for request in refusals {
        let status = refusal(&mut app.keys, request).await;
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(reason(&status), "INVALID_PAGE_TOKEN");
    }
    // Bad filters say which field is wrong.
    let bad_filters = [
        pb::ListAuditEventsRequest {
            key_id: "not a key id".into(),
            ..Default::default()
        },
        pb::ListAuditEventsRequest {
            start_time: Some(rotation_time),
            end_time: Some(rotation_time),
            ..Default::default()
        },
        pb::ListAuditEventsRequest {
            page_size: -1,
            ..Default::default()
        },
        pb::ListAuditEventsRequest {
            action: 99,
            ..Default::default()
        },
    ];
    for request in bad_filters {
        let status = refusal(&mut app.keys, request).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(reason(&status), "INVALID_ARGUMENT");
    }
    app.stop().await;
}

/// The refusal of a ListAuditEvents of acme's trail.
async fn refusal(client: &mut KeysClient, request: pb::ListAuditEventsRequest) -> tonic::Status {
    client
        .list_audit_events(pb::ListAuditEventsRequest {
            workspace_id: "acme".into(),
            ..request
        })
        .await
        .expect_err("refused")
}

/// Viewers and up read their own workspace's trail, and only it.
async fn each_workspace_reads_only_its_own_trail(db: TestDb) {
    let mut app = TestApp::spawn_with(with_dashboard_jwts(test_config(&db))).await;
    let acme_key = app.issue("acme", "acme key").await;
    let beta_key = app.issue("beta", "beta key").await;
    let beta_id = key_of(&beta_key).key_id.clone();

    let mut viewer = keys_as(&app.channel, Some(&jwt_user("acme", "viewer")));
    let own = events(&mut viewer, "", Default::default()).await;
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].key_id, key_of(&acme_key).key_id);
    // Another workspace's key id finds nothing here.
    let foreign = events(
        &mut viewer,
        "",
        pb::ListAuditEventsRequest {
            key_id: beta_id,
            ..Default::default()
        },
    )
    .await;
    assert!(foreign.is_empty());
    let status = viewer
        .list_audit_events(pb::ListAuditEventsRequest {
            workspace_id: "beta".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "WORKSPACE_MISMATCH");

    // An API key of the workspace reads it too (viewer and up); no credentials, nothing.
    let viewer_key = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "viewer key".into(),
            role: pb::Role::Viewer as i32,
            ..Default::default()
        })
        .await;
    let seen = events(
        &mut keys_as(&app.channel, Some(&viewer_key.secret)),
        "",
        Default::default(),
    )
    .await;
    assert_eq!(seen.len(), 2);
    let status = keys_as(&app.channel, None)
        .list_audit_events(pb::ListAuditEventsRequest {
            workspace_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // An admin names the workspace.
    let status = app
        .keys
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    app.stop().await;
}

/// Waits (bounded) for the events `matching` of a workspace to number `count`: events written
/// behind have no signal of their own to await.
async fn await_events(
    app: &mut TestApp,
    workspace_id: &str,
    filter: pb::ListAuditEventsRequest,
    count: usize,
) -> Vec<pb::AuditEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = events(&mut app.keys, workspace_id, filter.clone()).await;
        if found.len() == count || Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_lockout_leaves_one_event_written_behind(db: TestDb) {
    let mut config = test_config(&db);
    config.verify.lockout.key_failures = 3;
    let mut app = TestApp::spawn_with(config).await;
    let victim = app.issue("acme", "victim").await;
    let victim_key = key_of(&victim).clone();
    for n in 1..=3 {
        let verdict = app
            .verify
            .verify_key(pb::VerifyKeyRequest {
                key: forge_numbered(&victim_key.prefix, n),
                client_ip: "198.51.100.9".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(verdict.code, pb::VerifyCode::NotFound as i32, "guess {n}");
    }
    // Locked now; more guesses extend nothing and engage nothing new.
    for n in 4..=8 {
        let verdict = app
            .verify
            .verify_key(pb::VerifyKeyRequest {
                key: forge_numbered(&victim_key.prefix, n),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(verdict.code, pb::VerifyCode::Locked as i32);
    }
    let lockouts = pb::ListAuditEventsRequest {
        action: pb::AuditAction::Lockout as i32,
        ..Default::default()
    };
    let found = await_events(&mut app, "acme", lockouts.clone(), 1).await;
    assert_eq!(found.len(), 1, "one lockout, one event");
    let event = &found[0];
    assert_eq!(event.key_id, victim_key.key_id);
    assert_eq!(
        event.actor,
        Some(pb::AuditActor {
            kind: pb::ActorKind::System as i32,
            id: "lockout".into(),
            display: "system: lockout".into(),
        })
    );
    assert_eq!(
        event.client_ip, "198.51.100.9",
        "the failure that engaged it"
    );
    // Garbage that names no key locks an id, but there is no key to file an event under.
    for n in 1..=3 {
        app.verify_key(&forge_numbered("ka_live_000000000000", n), &[])
            .await;
    }
    app.issue("acme", "a later event to wait past").await;
    assert_eq!(events(&mut app.keys, "acme", lockouts).await.len(), 1);
    app.stop().await;
}

async fn events_past_the_retention_are_pruned(db: TestDb) {
    let mut config = test_config(&db);
    config.audit.retention = Duration::from_millis(1);
    config.audit.prune_interval = Duration::from_millis(20);
    let mut app = TestApp::spawn_with(config).await;
    let issued = app.issue("acme", "short-lived trail").await;
    let remaining = await_events(&mut app, "acme", Default::default(), 0).await;
    assert!(remaining.is_empty(), "the issue event was pruned");
    // The key itself is untouched.
    assert!(app.get("acme", &key_of(&issued).key_id).await.is_ok());
    app.stop().await;
}

on_both_databases!(
    every_mutation_leaves_exactly_one_event,
    an_api_key_is_named_as_the_actor,
    filters_and_pages_are_exact,
    each_workspace_reads_only_its_own_trail,
    a_lockout_leaves_one_event_written_behind,
    events_past_the_retention_are_pruned,
);
