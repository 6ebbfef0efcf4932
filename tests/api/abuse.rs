//! Abuse controls and limited keys: lockouts, usage limits, trial keys.

use std::time::Duration;

use key_authority::pb;
use key_authority::verify::{ClientIp, LockoutConfig, VerifyRequest};
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{
    ADMIN_TOKEN, TestApp, TestDb, code, key_of, keys_as, on_both_databases, reason, test_config,
};
use crate::verify::forge_numbered;

async fn verify_from(app: &mut TestApp, key: &str, ip: &str) -> pb::VerifyKeyResponse {
    app.verify
        .verify_key(pb::VerifyKeyRequest {
            key: key.into(),
            client_ip: ip.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

fn retry_after(response: &pb::VerifyKeyResponse) -> Duration {
    Duration::try_from(response.retry_after.expect("a retry_after")).unwrap()
}

async fn wrong_secrets_lock_a_key_but_not_its_proven_secret(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let owned = app.issue("acme", "owned").await;
    assert!(
        app.verify_key(&owned.secret, &[]).await.valid,
        "the owner's secret is proven"
    );
    let never_verified = app.issue("acme", "fresh").await;
    let prefix = key_of(&owned).prefix.clone();
    let verifier = app.server.verifier.clone();
    let argon2 = || verifier.hash_pool().verifications();

    let before = argon2();
    for n in 1..=10 {
        let verdict = app.verify_key(&forge_numbered(&prefix, n), &[]).await;
        assert_eq!(code(&verdict), pb::VerifyCode::NotFound, "guess {n}");
    }
    assert_eq!(argon2() - before, 10, "each distinct guess cost one argon2");

    let locked = app.verify_key(&forge_numbered(&prefix, 11), &[]).await;
    assert!(!locked.valid);
    assert_eq!(code(&locked), pb::VerifyCode::Locked);
    let wait = retry_after(&locked);
    assert!(
        wait > Duration::from_secs(14 * 60) && wait <= Duration::from_secs(15 * 60),
        "{wait:?}"
    );
    for n in 12..40 {
        assert_eq!(
            code(&app.verify_key(&forge_numbered(&prefix, n), &[]).await),
            pb::VerifyCode::Locked
        );
    }
    assert_eq!(argon2() - before, 10, "no argon2 while locked");

    // The owner's proven secret keeps working; other keys are not affected.
    assert_eq!(
        code(&app.verify_key(&owned.secret, &[]).await),
        pb::VerifyCode::Valid
    );
    assert_eq!(
        code(&app.verify_key(&never_verified.secret, &[]).await),
        pb::VerifyCode::Valid
    );
    app.stop().await;
}

async fn an_unproven_right_secret_waits_out_the_lockout(db: TestDb) {
    let mut config = test_config(&db);
    config.verify.lockout = LockoutConfig {
        duration: Duration::from_millis(700),
        ..LockoutConfig::default()
    };
    let mut app = TestApp::spawn_with(config).await;
    let target = app.issue("acme", "target").await;
    let prefix = key_of(&target).prefix.clone();
    for n in 1..=10 {
        app.verify_key(&forge_numbered(&prefix, n), &[]).await;
    }
    // Never verified before: during the lockout it cannot be told from a guess without argon2.
    let locked = app.verify_key(&target.secret, &[]).await;
    assert_eq!(code(&locked), pb::VerifyCode::Locked);
    // The event awaited is the clock passing the lockout's end.
    tokio::time::sleep(retry_after(&locked) + Duration::from_millis(20)).await;
    assert_eq!(
        code(&app.verify_key(&target.secret, &[]).await),
        pb::VerifyCode::Valid
    );
    app.stop().await;
}

async fn failures_from_one_ip_lock_that_ip(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let proven = app.issue("acme", "proven").await;
    assert!(
        verify_from(&mut app, &proven.secret, "198.51.100.7")
            .await
            .valid
    );
    let unproven = app.issue("acme", "unproven").await;
    let stranger = {
        let other = TestDb::sqlite().await;
        let mut elsewhere = TestApp::spawn(&other).await;
        let secret = elsewhere.issue("acme", "x").await.secret;
        elsewhere.stop().await;
        secret
    };
    for n in 0..20 {
        let garbage = if n % 2 == 0 {
            "garbage".to_owned()
        } else {
            stranger.clone()
        };
        let verdict = verify_from(&mut app, &garbage, "198.51.100.7").await;
        assert_ne!(
            code(&verdict),
            pb::VerifyCode::Locked,
            "failure {n} is not locked yet"
        );
    }
    let locked = verify_from(&mut app, &unproven.secret, "198.51.100.7").await;
    assert_eq!(code(&locked), pb::VerifyCode::Locked);
    assert!(retry_after(&locked) > Duration::from_secs(14 * 60));
    // Other addresses are not affected, nor is a secret already proven.
    assert!(
        verify_from(&mut app, &unproven.secret, "198.51.100.8")
            .await
            .valid
    );
    assert!(
        verify_from(&mut app, &proven.secret, "198.51.100.7")
            .await
            .valid
    );
    // IPv6 addresses count by /64.
    for n in 0..20 {
        verify_from(&mut app, "garbage", &format!("2001:db8:7:7::{n:x}")).await;
    }
    let locked = verify_from(&mut app, "garbage", "2001:db8:7:7:abcd::1").await;
    assert_eq!(code(&locked), pb::VerifyCode::Locked);

    let status = app
        .verify
        .verify_key(pb::VerifyKeyRequest {
            key: "x".into(),
            client_ip: "not-an-ip".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("client_ip"));
    app.stop().await;
}

async fn lockout_memory_stays_bounded_under_100k_attacking_ips(db: TestDb) {
    let mut config = test_config(&db);
    config.verify.lockout.capacity = 1_000;
    let app = TestApp::spawn_with(config).await;
    let verifier = app.server.verifier.clone();
    for n in 0..100_000u32 {
        let verdict = verifier
            .verify(VerifyRequest {
                client_ip: Some(ClientIp::V4(0x0A00_0000 + n)),
                ..VerifyRequest::key("ka_live_garbage")
            })
            .await
            .unwrap();
        assert!(matches!(verdict, key_authority::verify::Verdict::Malformed));
    }
    let tracked = verifier.lockouts().tracked();
    assert!(
        tracked <= 2 * 2 * 1_000,
        "{tracked} entries for a capacity of 1000 per table"
    );
    app.stop().await;
}

async fn usage_limited_keys_count_exactly(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let metered = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "metered".into(),
            usage_limit: 5,
            ..Default::default()
        })
        .await;
    assert_eq!(key_of(&metered).usage_limit, 5);
    assert_eq!(key_of(&metered).usage_remaining, 5);
    let with_cost = |cost: Option<i64>| pb::VerifyKeyRequest {
        key: metered.secret.clone(),
        cost,
        ..Default::default()
    };
    let check = app
        .verify
        .verify_key(with_cost(Some(0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&check), pb::VerifyCode::Valid);
    assert_eq!(
        check.key.unwrap().usage_remaining,
        5,
        "cost 0 checks without consuming"
    );
    let two = app
        .verify
        .verify_key(with_cost(Some(2)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(two.key.unwrap().usage_remaining, 3);
    for remaining in [2, 1, 0] {
        let one = app
            .verify
            .verify_key(with_cost(None))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(code(&one), pb::VerifyCode::Valid);
        assert_eq!(one.key.unwrap().usage_remaining, remaining);
    }
    let exhausted = app
        .verify
        .verify_key(with_cost(None))
        .await
        .unwrap()
        .into_inner();
    assert!(!exhausted.valid);
    assert_eq!(code(&exhausted), pb::VerifyCode::UsageExhausted);
    let check = app
        .verify
        .verify_key(with_cost(Some(0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&check), pb::VerifyCode::UsageExhausted);
    let fetched = app.get("acme", &key_of(&metered).key_id).await.unwrap();
    assert_eq!((fetched.usage_limit, fetched.usage_remaining), (5, 0));

    let status = app
        .verify
        .verify_key(with_cost(Some(-1)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = app
        .keys
        .issue_key(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "bad".into(),
            usage_limit: -3,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(status.message().contains("usage_limit"));
    // Unlimited keys ignore cost and keep the in-memory path.
    let unlimited = app.issue("acme", "unlimited").await;
    assert_eq!(key_of(&unlimited).usage_limit, 0);
    assert!(app.verify_key(&unlimited.secret, &[]).await.valid);
    app.stop().await;
}

/// 50 concurrent verifies of one key limited to 20, spread over `replicas`: exactly 20 VALID.
async fn concurrent_verifies_never_exceed_the_limit(replicas: &mut [TestApp]) {
    let limited = replicas[0]
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "contended".into(),
            usage_limit: 20,
            ..Default::default()
        })
        .await;
    let calls: Vec<_> = (0..50)
        .map(|n| {
            let mut client = replicas[n % replicas.len()].verify.clone();
            let key = limited.secret.clone();
            tokio::spawn(async move {
                client
                    .verify_key(pb::VerifyKeyRequest {
                        key,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
            })
        })
        .collect();
    let mut valid = 0;
    for call in calls {
        let verdict = call.await.unwrap();
        match code(&verdict) {
            pb::VerifyCode::Valid => valid += 1,
            pb::VerifyCode::UsageExhausted => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(valid, 20);
}

async fn concurrent_limited_verifies_on_one_server(db: TestDb) {
    let mut apps = [TestApp::spawn(&db).await];
    concurrent_verifies_never_exceed_the_limit(&mut apps).await;
    let [app] = apps;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_limited_verifies_on_two_replicas() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let mut apps = [TestApp::spawn(&db).await, TestApp::spawn(&db).await];
    concurrent_verifies_never_exceed_the_limit(&mut apps).await;
    let [a, b] = apps;
    a.stop().await;
    b.stop().await;
}

async fn trial_keys_are_short_limited_and_powerless(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let mut anonymous = keys_as(&app.channel, None);
    let trial = anonymous
        .issue_trial_key(pb::IssueTrialKeyRequest::default())
        .await
        .expect("no credentials needed")
        .into_inner();
    let key = trial.key.clone().unwrap();
    assert!(trial.secret.starts_with("ka_trial_"));
    assert_eq!(key.environment, pb::Environment::Trial as i32);
    assert_eq!(key.role, pb::Role::Trial as i32);
    assert_eq!(key.workspace_id, "trial");
    assert_eq!((key.usage_limit, key.usage_remaining), (10, 10));
    let lifetime = key.expire_time.unwrap().seconds - key.create_time.unwrap().seconds;
    assert!((1799..=1801).contains(&lifetime), "{lifetime}");

    for remaining in (0..10).rev() {
        let verdict = app.verify_key(&trial.secret, &[]).await;
        assert_eq!(code(&verdict), pb::VerifyCode::Valid);
        assert_eq!(verdict.key.unwrap().usage_remaining, remaining);
    }
    assert_eq!(
        code(&app.verify_key(&trial.secret, &[]).await),
        pb::VerifyCode::UsageExhausted
    );

    let status = keys_as(&app.channel, Some(&trial.secret))
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "INSUFFICIENT_ROLE");

    // IssueKey does not make trial keys.
    let status = app
        .keys
        .issue_key(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "sneaky".into(),
            environment: pb::Environment::Trial as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    app.stop().await;
}

async fn trial_keys_are_rate_limited_per_ip(db: TestDb) {
    let app = TestApp::spawn(&db).await;
    let mut anonymous = keys_as(&app.channel, None);
    for n in 0..5 {
        anonymous
            .issue_trial_key(pb::IssueTrialKeyRequest {
                // Ignored: an untrusted caller cannot choose the IP it is counted under.
                client_ip: format!("192.0.2.{n}"),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let status = anonymous
        .issue_trial_key(pb::IssueTrialKeyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "IP_RATE_LIMITED");
    let delay = status
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    assert!(
        delay >= Duration::from_secs(1) && delay <= Duration::from_secs(60),
        "{delay:?}"
    );

    // A trusted front end speaks for its users' addresses.
    let mut front_end = keys_as(&app.channel, Some(ADMIN_TOKEN));
    for n in 0..6 {
        front_end
            .issue_trial_key(pb::IssueTrialKeyRequest {
                client_ip: format!("203.0.113.{n}"),
                ..Default::default()
            })
            .await
            .expect("distinct users behind the front end");
    }
    app.stop().await;
}

async fn trial_keys_revoke_by_prefix_and_nothing_else(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let mut anonymous = keys_as(&app.channel, None);
    let trial = anonymous
        .issue_trial_key(pb::IssueTrialKeyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(app.verify_key(&trial.secret, &[]).await.valid);
    let prefix = trial.key.as_ref().unwrap().prefix.clone();
    let revoked = anonymous
        .revoke_trial_key(pb::RevokeTrialKeyRequest {
            prefix,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(revoked.state, pb::KeyState::Revoked as i32);
    assert_eq!(
        code(&app.verify_key(&trial.secret, &[]).await),
        pb::VerifyCode::Revoked
    );

    // The whole key works as well as its prefix.
    let second = anonymous
        .issue_trial_key(pb::IssueTrialKeyRequest::default())
        .await
        .unwrap()
        .into_inner();
    anonymous
        .revoke_trial_key(pb::RevokeTrialKeyRequest {
            prefix: second.secret.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    let regular = app.issue("acme", "regular").await;
    let status = anonymous
        .revoke_trial_key(pb::RevokeTrialKeyRequest {
            prefix: key_of(&regular).prefix.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::NotFound | Code::InvalidArgument),
        "{status:?}"
    );
    let forged_env = key_of(&regular).prefix.replace("_live_", "_trial_");
    let status = anonymous
        .revoke_trial_key(pb::RevokeTrialKeyRequest {
            prefix: forged_env,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::NotFound,
        "a live key cannot be revoked as a trial key"
    );
    assert!(app.verify_key(&regular.secret, &[]).await.valid);
    let status = anonymous
        .revoke_trial_key(pb::RevokeTrialKeyRequest {
            prefix: "ka_trial_abc".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    app.stop().await;
}

async fn rotation_carries_over_what_is_left(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let metered = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "metered".into(),
            usage_limit: 5,
            ..Default::default()
        })
        .await;
    for _ in 0..3 {
        assert!(app.verify_key(&metered.secret, &[]).await.valid);
    }
    let rotated = app
        .rotate(
            "acme",
            &key_of(&metered).key_id,
            Some(prost_types::Duration::default()),
        )
        .await
        .unwrap();
    let successor = rotated.key.unwrap();
    assert_eq!((successor.usage_limit, successor.usage_remaining), (5, 2));
    for _ in 0..2 {
        assert!(app.verify_key(&rotated.secret, &[]).await.valid);
    }
    assert_eq!(
        code(&app.verify_key(&rotated.secret, &[]).await),
        pb::VerifyCode::UsageExhausted
    );
    app.stop().await;
}

on_both_databases!(
    wrong_secrets_lock_a_key_but_not_its_proven_secret,
    an_unproven_right_secret_waits_out_the_lockout,
    failures_from_one_ip_lock_that_ip,
    lockout_memory_stays_bounded_under_100k_attacking_ips,
    usage_limited_keys_count_exactly,
    concurrent_limited_verifies_on_one_server,
    trial_keys_are_short_limited_and_powerless,
    trial_keys_are_rate_limited_per_ip,
    trial_keys_revoke_by_prefix_and_nothing_else,
    rotation_carries_over_what_is_left,
);
