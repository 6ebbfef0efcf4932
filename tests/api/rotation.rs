//! RotateKey: successor, grace period, preconditions and concurrency.

use key_authority::pb;
use tonic::Code;

use crate::common::{
    TestApp, TestDb, audit_events, code, key_of, keys_as, on_both_databases, reason, test_config,
};

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
    // The successor ends exactly when the original was meant to end.
    assert_eq!(rotated.key.unwrap().expire_time.unwrap(), old_expiry);
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

fn rotate_request(key_id: &str, grace: Option<prost_types::Duration>) -> pb::RotateKeyRequest {
    pb::RotateKeyRequest {
        workspace_id: "acme".into(),
        key_id: key_id.to_owned(),
        grace_period: grace,
        ..Default::default()
    }
}

fn ttl(seconds: i64) -> Option<pb::rotate_key_request::Expiration> {
    Some(pb::rotate_key_request::Expiration::Ttl(
        prost_types::Duration { seconds, nanos: 0 },
    ))
}

fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A key rotating itself renews its secret and nothing else: no grace beyond 24 hours, no new
/// lifetime, however often it rotates.
async fn a_key_rotating_itself_never_extends_anything(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let original = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "self-rotating".into(),
            role: pb::Role::Developer as i32,
            expiration: Some(pb::issue_key_request::Expiration::Ttl(
                prost_types::Duration {
                    seconds: 30 * 86_400,
                    nanos: 0,
                },
            )),
            ..Default::default()
        })
        .await;
    let original_expiry = key_of(&original).expire_time.unwrap();
    let mut caller = keys_as(&app.channel, Some(&original.secret));

    // A ten-year grace would keep the old key alive past its owner's intent.
    let status = caller
        .rotate_key(rotate_request(
            &key_of(&original).key_id,
            seconds(10 * 365 * 86_400),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("grace_period") && status.message().contains("1day"),
        "{status:?}"
    );
    // 24 hours and a second is still too long for a key.
    let status = caller
        .rotate_key(rotate_request(&key_of(&original).key_id, seconds(86_401)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // A key may not give its successor a lifetime of its own choosing.
    let status = caller
        .rotate_key(pb::RotateKeyRequest {
            expiration: ttl(365 * 86_400),
            ..rotate_request(&key_of(&original).key_id, seconds(60))
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "INSUFFICIENT_ROLE");

    // Rotate five times, each successor rotating itself: every key ends when the first would
    // have, and no old key outlives the 24-hour cap.
    let mut current = original.secret.clone();
    let mut current_id = key_of(&original).key_id.clone();
    for _ in 0..5 {
        let rotated = keys_as(&app.channel, Some(&current))
            .rotate_key(rotate_request(&current_id, seconds(86_400)))
            .await
            .unwrap()
            .into_inner();
        let successor = rotated.key.unwrap();
        assert_eq!(successor.expire_time.unwrap(), original_expiry);
        let old_end = rotated.previous_key.unwrap().expire_time.unwrap().seconds;
        assert!(
            old_end <= now_seconds() + 86_400,
            "old key ends at {old_end}"
        );
        current = rotated.secret;
        current_id = successor.key_id;
    }
    // An unset grace from a key is the default day, within its cap.
    let rotated = keys_as(&app.channel, Some(&current))
        .rotate_key(rotate_request(&current_id, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.key.unwrap().expire_time.unwrap(), original_expiry);
    app.stop().await;
}

/// A key that is about to expire stays about to expire through its self-rotations, and then
/// it and every successor are EXPIRED.
async fn self_rotations_expire_with_the_original(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let original = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "short-lived".into(),
            role: pb::Role::Developer as i32,
            // Long enough for three rotations on a loaded machine.
            expiration: Some(pb::issue_key_request::Expiration::Ttl(
                prost_types::Duration {
                    seconds: 5,
                    nanos: 0,
                },
            )),
            ..Default::default()
        })
        .await;
    let expiry = key_of(&original).expire_time.unwrap();
    let mut secrets = vec![original.secret.clone()];
    let mut current_id = key_of(&original).key_id.clone();
    for _ in 0..3 {
        let rotated = keys_as(&app.channel, Some(secrets.last().unwrap()))
            .rotate_key(rotate_request(&current_id, seconds(3600)))
            .await
            .unwrap()
            .into_inner();
        let successor = rotated.key.unwrap();
        assert_eq!(successor.expire_time.unwrap(), expiry);
        current_id = successor.key_id;
        secrets.push(rotated.secret);
    }
    // Wait for the original expiry itself: it is the event under test.
    let expiry_at = std::time::UNIX_EPOCH
        + std::time::Duration::new(expiry.seconds as u64, expiry.nanos as u32)
        + std::time::Duration::from_millis(50);
    if let Ok(wait) = expiry_at.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    for secret in &secrets {
        assert_eq!(
            code(&app.verify_key(secret, &[]).await),
            pb::VerifyCode::Expired
        );
    }
    app.stop().await;
}

/// Callers that may issue keys may give a successor a new expiry, within the server's limits;
/// every grace period is capped by --max-rotation-grace.
async fn issuers_may_set_a_new_expiry_within_the_limits(db: TestDb) {
    let mut config = test_config(&db);
    config.limits.max_rotation_grace = std::time::Duration::from_secs(3600);
    let mut app = TestApp::spawn_with(config).await;
    let issued = app.issue("acme", "renewed").await;
    let key_id = key_of(&issued).key_id.clone();

    let status = app
        .rotate("acme", &key_id, seconds(3601))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("grace_period") && status.message().contains("1h"),
        "{status:?}"
    );
    // An unset grace is the default day, capped by the server's hour.
    let rotated = app
        .keys
        .rotate_key(pb::RotateKeyRequest {
            expiration: ttl(86_400),
            ..rotate_request(&key_id, None)
        })
        .await
        .unwrap()
        .into_inner();
    let previous_end = rotated.previous_key.unwrap().expire_time.unwrap().seconds;
    assert!((now_seconds() + 3590..=now_seconds() + 3600).contains(&previous_end));
    let successor = rotated.key.unwrap();
    let successor_end = successor.expire_time.unwrap().seconds;
    assert!((now_seconds() + 86_390..=now_seconds() + 86_400).contains(&successor_end));

    // A developer API key rotating another key may not set its expiry either.
    let developer = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "automation".into(),
            role: pb::Role::Developer as i32,
            ..Default::default()
        })
        .await;
    let status = keys_as(&app.channel, Some(&developer.secret))
        .rotate_key(pb::RotateKeyRequest {
            expiration: ttl(60),
            ..rotate_request(&successor.key_id, seconds(60))
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // A new expiry obeys IssueKey's rules: in the future, within --max-key-lifetime.
    let status = app
        .keys
        .rotate_key(pb::RotateKeyRequest {
            expiration: ttl(20 * 365 * 86_400),
            ..rotate_request(&successor.key_id, seconds(60))
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("ttl"), "{status:?}");
    app.stop().await;
}

/// A leaked key that the thief rotated: revoking the original alone leaves the thief's
/// successor working; `revoke_successors` revokes the whole chain, each key with its audit row.
async fn revoke_successors_reaches_what_a_thief_rotated(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let leaked = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "leaked".into(),
            role: pb::Role::Developer as i32,
            ..Default::default()
        })
        .await;
    let leaked_id = key_of(&leaked).key_id.clone();
    // The thief rotates the key, then rotates the successor again.
    let first = keys_as(&app.channel, Some(&leaked.secret))
        .rotate_key(rotate_request(&leaked_id, seconds(0)))
        .await
        .unwrap()
        .into_inner();
    let first_id = first.key.clone().unwrap().key_id;
    let second = keys_as(&app.channel, Some(&first.secret))
        .rotate_key(rotate_request(&first_id, seconds(0)))
        .await
        .unwrap()
        .into_inner();
    let second_id = second.key.clone().unwrap().key_id;
    assert!(app.verify_key(&second.secret, &[]).await.valid);

    // Revoking the original alone does not reach the thief's key.
    let alone = app
        .keys
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: "acme".into(),
            key_id: leaked_id.clone(),
            revoke_successors: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(alone.successors.is_empty());
    assert!(app.verify_key(&second.secret, &[]).await.valid);

    let chain = app
        .keys
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: "acme".into(),
            key_id: leaked_id.clone(),
            revoke_successors: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let successors: Vec<(String, i32, String)> = chain
        .successors
        .iter()
        .map(|key| (key.key_id.clone(), key.state, key.revoked_by.clone()))
        .collect();
    let revoked = pb::KeyState::Revoked as i32;
    assert_eq!(
        successors,
        vec![
            (first_id.clone(), revoked, "admin".to_owned()),
            (second_id.clone(), revoked, "admin".to_owned()),
        ]
    );
    for secret in [&first.secret, &second.secret] {
        assert_eq!(
            code(&app.verify_key(secret, &[]).await),
            pb::VerifyCode::Revoked
        );
    }
    app.stop().await;

    // One revoke row per key the calls changed: the original's from the first call, the
    // successors' from the chain revocation; and the second call's own row for the original,
    // which it found revoked already (UNCHANGED).
    let revokes: Vec<String> = audit_events(&db)
        .await
        .into_iter()
        .filter(|(_, action, _)| action == "revoke")
        .map(|(key_id, _, _)| key_id)
        .collect();
    assert_eq!(
        revokes,
        vec![leaked_id.clone(), leaked_id, first_id, second_id]
    );
}

/// The holder of an old key in its grace period may revoke that key, never the successor its
/// owner now uses: revoke_successors needs the right to revoke other keys.
async fn an_old_key_cannot_revoke_its_successor(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let old = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "viewer".into(),
            role: pb::Role::Viewer as i32,
            ..Default::default()
        })
        .await;
    let old_id = key_of(&old).key_id.clone();
    let rotated = app.rotate("acme", &old_id, seconds(3600)).await.unwrap();
    let mut holder = keys_as(&app.channel, Some(&old.secret));
    let status = holder
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: String::new(),
            key_id: old_id.clone(),
            revoke_successors: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "INSUFFICIENT_ROLE");
    assert!(app.verify_key(&rotated.secret, &[]).await.valid);
    assert!(
        app.verify_key(&old.secret, &[]).await.valid,
        "nothing changed"
    );
    // Revoking itself alone stays allowed.
    let revoked = holder
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: String::new(),
            key_id: old_id,
            revoke_successors: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.key.unwrap().state, pb::KeyState::Revoked as i32);
    assert!(app.verify_key(&rotated.secret, &[]).await.valid);
    app.stop().await;
}

/// A usage-limited key and its successors share one budget: rotating cannot mint uses, even
/// while the old key keeps working through its grace period.
async fn a_rotation_chain_shares_one_usage_budget(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let metered = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "metered".into(),
            usage_limit: 3,
            ..Default::default()
        })
        .await;
    assert!(app.verify_key(&metered.secret, &[]).await.valid);
    let rotated = app
        .rotate("acme", &key_of(&metered).key_id, seconds(3600))
        .await
        .unwrap();
    let successor = rotated.key.clone().unwrap();
    assert_eq!((successor.usage_limit, successor.usage_remaining), (3, 2));
    // The old key (in its grace period) and the new one draw on the same two uses.
    assert!(app.verify_key(&metered.secret, &[]).await.valid);
    assert!(app.verify_key(&rotated.secret, &[]).await.valid);
    for secret in [&metered.secret, &rotated.secret] {
        assert_eq!(
            code(&app.verify_key(secret, &[]).await),
            pb::VerifyCode::UsageExhausted
        );
    }
    let read = app.get("acme", &successor.key_id).await.unwrap();
    assert_eq!((read.usage_limit, read.usage_remaining), (3, 0));
    app.stop().await;
}

on_both_databases!(
    a_key_rotating_itself_never_extends_anything,
    self_rotations_expire_with_the_original,
    issuers_may_set_a_new_expiry_within_the_limits,
    revoke_successors_reaches_what_a_thief_rotated,
    an_old_key_cannot_revoke_its_successor,
    a_rotation_chain_shares_one_usage_budget,
    rotation_copies_the_key_and_keeps_the_old_one_for_the_grace_period,
    default_grace_is_a_day,
    rotation_never_extends_an_earlier_expiry,
    revoked_expired_or_rotated_keys_cannot_rotate,
    concurrent_rotations_make_one_successor,
);
