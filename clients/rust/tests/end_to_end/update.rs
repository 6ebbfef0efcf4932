//! Request ids (idempotent retries), UpdateKey with its mask and etag, disabling and enabling a
//! key, and the audit trail those changes leave.

use key_authority_client::{KeyAuthorityClient, pb};
use tonic::Code;

use crate::harness::KeyAuthority;

const WORKSPACE: &str = "acme";

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|path| path.to_string()).collect(),
    })
}

/// An UpdateKey of `key_id` in WORKSPACE: `key` holds the new values, `paths` the mask.
fn update(key_id: &str, key: pb::Key, paths: &[&str]) -> pb::UpdateKeyRequest {
    pb::UpdateKeyRequest {
        key: Some(pb::Key {
            workspace_id: WORKSPACE.into(),
            key_id: key_id.into(),
            ..key
        }),
        update_mask: mask(paths),
        ..Default::default()
    }
}

async fn get(admin: &KeyAuthorityClient, key_id: &str) -> pb::Key {
    admin
        .get_key(pb::GetKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key_id.into(),
        })
        .await
        .expect("GetKey")
        .key
        .expect("a key")
}

async fn verify(admin: &KeyAuthorityClient, secret: &str) -> pb::VerifyKeyResponse {
    admin
        .verify_key(pb::VerifyKeyRequest {
            key: secret.into(),
            ..Default::default()
        })
        .await
        .expect("VerifyKey")
}

/// The audit events of one key, newest first (one page).
async fn trail(admin: &KeyAuthorityClient, key_id: &str) -> Vec<pb::AuditEvent> {
    let page = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key_id.into(),
            ..Default::default()
        })
        .await
        .expect("ListAuditEvents");
    assert_eq!(page.next_page_token, "");
    page.audit_events
}

fn actions(events: &[pb::AuditEvent]) -> Vec<pb::AuditAction> {
    events.iter().map(pb::AuditEvent::action).collect()
}

#[tokio::test]
async fn request_ids_make_mutations_safe_to_retry() {
    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;

    let issue = pb::IssueKeyRequest {
        workspace_id: WORKSPACE.into(),
        name: "idempotent".into(),
        scopes: vec!["a:read".into()],
        request_id: "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f".into(),
        ..Default::default()
    };
    let first = admin.issue_key(issue.clone()).await.unwrap();
    let again = admin.issue_key(issue.clone()).await.unwrap();
    let key_id = first.key.as_ref().unwrap().key_id.clone();
    assert_eq!(again.key.unwrap().key_id, key_id);
    assert_eq!(again.secret, first.secret);

    let error = admin
        .issue_key(pb::IssueKeyRequest {
            name: "another name".into(),
            ..issue.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
    assert_eq!(error.reason(), Some("IDEMPOTENCY_KEY_REUSED"));
    assert_eq!(error.error_info().unwrap().domain, "keyauthority.v1");
    assert!(error.is_idempotency_key_reused());
    assert!(!error.is_retryable());
    let listed = admin
        .list_keys(pb::ListKeysRequest {
            workspace_id: WORKSPACE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.total_size, 1);

    let rotate = pb::RotateKeyRequest {
        workspace_id: WORKSPACE.into(),
        key_id: key_id.clone(),
        grace_period: Some(prost_types::Duration::default()),
        request_id: "0d9c8b7a-6f5e-4d3c-8b2a-190817263544".into(),
        ..Default::default()
    };
    let rotated = admin.rotate_key(rotate.clone()).await.unwrap();
    let rotated_again = admin.rotate_key(rotate).await.unwrap();
    let successor_id = rotated.key.as_ref().unwrap().key_id.clone();
    assert_eq!(rotated_again.key.unwrap().key_id, successor_id);
    assert_eq!(rotated_again.secret, rotated.secret);

    let revoke = pb::RevokeKeyRequest {
        workspace_id: WORKSPACE.into(),
        key_id: successor_id.clone(),
        request_id: "5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d".into(),
        ..Default::default()
    };
    let revoked = admin.revoke_key(revoke.clone()).await.unwrap();
    assert_eq!(admin.revoke_key(revoke).await.unwrap(), revoked);

    // The retries changed nothing: one event per change, with the request id it came with.
    let events = trail(&admin, &key_id).await;
    assert_eq!(
        actions(&events),
        [pb::AuditAction::Rotate, pb::AuditAction::Issue]
    );
    assert_eq!(events[1].request_id, issue.request_id);

    let trial = pb::IssueTrialKeyRequest {
        request_id: "8e7d6c5b-4a39-4281-9f0e-1d2c3b4a5968".into(),
        ..Default::default()
    };
    let first_trial = admin.issue_trial_key(trial.clone()).await.unwrap();
    let trial_again = admin.issue_trial_key(trial).await.unwrap();
    assert_eq!(trial_again.secret, first_trial.secret);

    authority.stop().await;
}

#[tokio::test]
async fn update_key_with_a_mask_and_an_etag() {
    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;
    let issued = admin
        .issue_key(pb::IssueKeyRequest {
            workspace_id: WORKSPACE.into(),
            name: "before".into(),
            description: "kept".into(),
            scopes: vec!["a:read".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let original = issued.key.unwrap();
    assert!(original.enabled);
    assert!(!original.etag.is_empty());

    let updated = admin
        .update_key(update(
            &original.key_id,
            pb::Key {
                name: "after".into(),
                scopes: vec!["a:read".into(), "b:write".into()],
                // Outside the mask: ignored.
                description: "not applied".into(),
                etag: original.etag.clone(),
                ..Default::default()
            },
            &["name", "scopes"],
        ))
        .await
        .unwrap()
        .key
        .unwrap();
    assert_eq!(updated.key_id, original.key_id);
    assert_eq!(updated.name, "after");
    assert_eq!(updated.scopes, ["a:read", "b:write"]);
    assert_eq!(updated.description, "kept");
    assert_eq!(updated.state(), pb::KeyState::Active);
    assert_ne!(updated.etag, original.etag);
    assert!(updated.update_time.unwrap().seconds >= original.create_time.unwrap().seconds);
    let fetched = get(&admin, &original.key_id).await;
    assert_eq!(fetched.name, "after");
    assert_eq!(fetched.etag, updated.etag);

    // The etag read before that update is stale now: a conflict, not a retry.
    let error = admin
        .update_key(update(
            &original.key_id,
            pb::Key {
                name: "lost".into(),
                etag: original.etag.clone(),
                ..Default::default()
            },
            &["name"],
        ))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Aborted, "{error}");
    assert_eq!(error.reason(), Some("ETAG_MISMATCH"));
    assert_eq!(error.error_info().unwrap().domain, "keyauthority.v1");
    assert!(error.is_etag_mismatch());
    assert!(!error.is_retryable());
    assert_eq!(get(&admin, &original.key_id).await.name, "after");

    // A path that is no updatable field.
    let error = admin
        .update_key(update(&original.key_id, pb::Key::default(), &["prefix"]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error}");

    authority.stop().await;
}

#[tokio::test]
async fn disable_enable_and_the_audit_trail() {
    let authority = KeyAuthority::start().await;
    let admin = authority.admin().await;
    let issued = admin
        .issue_key(pb::IssueKeyRequest {
            workspace_id: WORKSPACE.into(),
            name: "switch".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let key_id = issued.key.unwrap().key_id;
    let rename = pb::Key {
        name: "switched".into(),
        ..Default::default()
    };
    admin
        .update_key(update(&key_id, rename, &["name"]))
        .await
        .unwrap();

    let disable = pb::UpdateKeyRequest {
        request_id: "2b3c4d5e-6f70-4182-93a4-b5c6d7e8f901".into(),
        ..update(&key_id, pb::Key::default(), &["enabled"])
    };
    let disabled = admin
        .update_key(disable.clone())
        .await
        .unwrap()
        .key
        .unwrap();
    assert!(!disabled.enabled);
    assert_eq!(disabled.state(), pb::KeyState::Disabled);
    let verdict = verify(&admin, &issued.secret).await;
    assert!(!verdict.valid);
    assert_eq!(verdict.code(), pb::VerifyCode::Disabled);
    assert_eq!(verdict.code().as_str_name(), "VERIFY_CODE_DISABLED");
    assert_eq!(verdict.key.unwrap().key_id, key_id);
    let fetched = get(&admin, &key_id).await;
    assert_eq!(fetched.state(), pb::KeyState::Disabled);
    assert!(!fetched.enabled);
    let active = admin
        .list_keys(pb::ListKeysRequest {
            workspace_id: WORKSPACE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(active.keys.is_empty(), "{active:?}");

    let enable = pb::Key {
        enabled: true,
        ..Default::default()
    };
    let enabled = admin
        .update_key(update(&key_id, enable, &["enabled"]))
        .await
        .unwrap()
        .key
        .unwrap();
    assert!(enabled.enabled);
    assert_eq!(enabled.state(), pb::KeyState::Active);
    assert_eq!(
        verify(&admin, &issued.secret).await.code(),
        pb::VerifyCode::Valid
    );

    // Newest first, one event per change, by the admin token.
    let events = trail(&admin, &key_id).await;
    assert_eq!(
        actions(&events),
        [
            pb::AuditAction::Enable,
            pb::AuditAction::Disable,
            pb::AuditAction::Update,
            pb::AuditAction::Issue,
        ]
    );
    for event in &events {
        assert_eq!(event.key_id, key_id);
        assert_eq!(event.workspace_id, WORKSPACE);
        let actor = event.actor.as_ref().expect("an actor");
        assert_eq!(actor.kind(), pb::ActorKind::Admin);
        assert_eq!(
            (actor.id.as_str(), actor.display.as_str()),
            ("admin", "admin")
        );
        assert_eq!(event.outcome(), pb::AuditOutcome::Applied);
    }
    assert_eq!(events[1].request_id, disable.request_id);
    let change = |event: &pb::AuditEvent, field: &str| {
        let change = event
            .changes
            .iter()
            .find(|change| change.field == field)
            .unwrap_or_else(|| panic!("no {field} in {:?}", event.changes));
        (change.old_value.clone(), change.new_value.clone())
    };
    assert_eq!(
        change(&events[1], "enabled"),
        ("true".into(), "false".into())
    );
    assert_eq!(
        change(&events[0], "enabled"),
        ("false".into(), "true".into())
    );
    assert_eq!(
        change(&events[2], "name"),
        ("\"switch\"".into(), "\"switched\"".into())
    );

    let only_disable = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            workspace_id: WORKSPACE.into(),
            key_id: key_id.clone(),
            action: pb::AuditAction::Disable.into(),
            actor_kind: pb::ActorKind::Admin.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        only_disable
            .audit_events
            .iter()
            .map(|event| event.event_id.as_str())
            .collect::<Vec<_>>(),
        [events[1].event_id.as_str()]
    );

    // One event per page, following next_page_token.
    let mut paged = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_audit_events(pb::ListAuditEventsRequest {
                workspace_id: WORKSPACE.into(),
                key_id: key_id.clone(),
                page_size: 1,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(page.audit_events.len(), 1, "{page:?}");
        paged.push(page.audit_events[0].event_id.clone());
        page_token = page.next_page_token;
        if page_token.is_empty() {
            break;
        }
    }
    assert_eq!(
        paged,
        events
            .iter()
            .map(|event| event.event_id.clone())
            .collect::<Vec<_>>()
    );

    authority.stop().await;
}
