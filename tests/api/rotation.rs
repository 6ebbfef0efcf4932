//! RotateKey: successor, grace period, preconditions and concurrency.

use key_authority::pb;
use tonic::Code;

use crate::common::{TestApp, TestDb, code, key_of, on_both_databases, reason};

fn seconds(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

async fn rotation_copies_the_key_and_keeps_the_old_one_for_the_grace_period(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let original = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "deployer".into(),
            description: "ships code".into(),
            scopes: vec!["deploy".into()],
            environment: pb::Environment::Test as i32,
            role: pb::Role::Viewer as i32,
            metadata: [("owner".to_owned(), "ops".to_owned())].into(),
            ..Default::default()
        })
        .await;
    let old = key_of(&original).clone();

    let rotated = app.rotate("acme", &old.key_id, seconds(600)).await.unwrap();
    let new = rotated.key.clone().unwrap();
    let previous = rotated.previous_key.clone().unwrap();

    assert_ne!(new.key_id, old.key_id);
    assert!(rotated.secret.starts_with(&new.prefix));
    assert!(rotated.secret.starts_with("ka_test_"));
    assert_eq!(
        (
            &new.name,
            &new.description,
            &new.scopes,
            new.role,
            new.environment,
            &new.metadata
        ),
        (
            &old.name,
            &old.description,
            &old.scopes,
            old.role,
            old.environment,
            &old.metadata
        )
    );
    assert_eq!(new.rotated_from_key_id, old.key_id);
    assert_eq!(previous.rotated_to_key_id, new.key_id);
    assert_eq!(previous.state, pb::KeyState::Active as i32);
    let grace_end = previous.expire_time.unwrap().seconds;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        grace_end <= now + 600 && grace_end >= now + 590,
        "grace end {grace_end}, now {now}"
    );

    // Both keys work during the grace period.
    assert_eq!(
        code(&app.verify_key(&original.secret, &[]).await),
        pb::VerifyCode::Valid
    );
    assert_eq!(
        code(&app.verify_key(&rotated.secret, &[]).await),
        pb::VerifyCode::Valid
    );
    app.stop().await;
}

async fn default_grace_is_a_day(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let original = app.issue("acme", "k").await;
    let rotated = app
        .rotate("acme", &key_of(&original).key_id, None)
        .await
        .unwrap();
    let previous = rotated.previous_key.unwrap();
    let created = rotated.key.unwrap().create_time.unwrap().seconds;
    let grace = previous.expire_time.unwrap().seconds - created;
    assert!((86_399..=86_401).contains(&grace), "grace {grace}");
    app.stop().await;
}

async fn rotation_never_extends_an_earlier_expiry(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let original = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "short".into(),
            expiration: Some(pb::issue_key_request::Expiration::Ttl(
                prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                },
            )),
            ..Default::default()
        })
        .await;
    let old_expiry = key_of(&original).expire_time.unwrap();
    let rotated = app
        .rotate("acme", &key_of(&original).key_id, seconds(3600))
        .await
        .unwrap();
    assert_eq!(
        rotated.previous_key.unwrap().expire_time.unwrap(),
        old_expiry
    );
    // The successor lives as long as the original was meant to: 60 s.
    let new = rotated.key.unwrap();
    let lifetime = new.expire_time.unwrap().seconds - new.create_time.unwrap().seconds;
    assert!((59..=61).contains(&lifetime), "lifetime {lifetime}");
    app.stop().await;
}

async fn revoked_expired_or_rotated_keys_cannot_rotate(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let revoked = app.issue("acme", "revoked").await;
    app.revoke("acme", &key_of(&revoked).key_id).await.unwrap();
    let status = app
        .rotate("acme", &key_of(&revoked).key_id, None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "KEY_REVOKED");

    let expired = app.issue("acme", "expired").await;
    app.rotate("acme", &key_of(&expired).key_id, seconds(0))
        .await
        .unwrap();
    let status = app
        .rotate("acme", &key_of(&expired).key_id, None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "KEY_EXPIRED");

    let rotated = app.issue("acme", "rotated").await;
    app.rotate("acme", &key_of(&rotated).key_id, seconds(600))
        .await
        .unwrap();
    let status = app
        .rotate("acme", &key_of(&rotated).key_id, None)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "KEY_ALREADY_ROTATED");

    let status = app
        .rotate("acme", &key_of(&rotated).key_id, seconds(-1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("grace_period"));
    app.stop().await;
}

async fn concurrent_rotations_make_one_successor(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut issuer = app.keys.clone();
    let original = issuer
        .issue_key(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "contended".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key_id = key_of(&original).key_id.clone();

    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let mut client = app.keys.clone();
            let key_id = key_id.clone();
            tokio::spawn(async move {
                client
                    .rotate_key(pb::RotateKeyRequest {
                        workspace_id: "acme".into(),
                        key_id,
                        grace_period: None,
                        ..Default::default()
                    })
                    .await
            })
        })
        .collect();
    let mut successes = Vec::new();
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(response) => successes.push(response.into_inner()),
            Err(status) => assert!(
                matches!(status.code(), Code::Aborted | Code::FailedPrecondition),
                "unexpected {status:?}"
            ),
        }
    }
    assert_eq!(successes.len(), 1, "exactly one rotation wins");
    let listed = app
        .keys
        .clone()
        .list_keys(pb::ListKeysRequest {
            workspace_id: "acme".into(),
            include_inactive: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.total_size, 2, "the original and one successor");
    let successor = successes[0].key.as_ref().unwrap();
    assert!(listed.keys.iter().any(|k| k.key_id == successor.key_id));
    app.stop().await;
}

on_both_databases!(
    rotation_copies_the_key_and_keeps_the_old_one_for_the_grace_period,
    default_grace_is_a_day,
    rotation_never_extends_an_earlier_expiry,
    revoked_expired_or_rotated_keys_cannot_rotate,
    concurrent_rotations_make_one_successor,
);
