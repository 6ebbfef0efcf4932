//! Trial keys are the operator's to switch off, pause and clean up: `--trial-keys`, a limit of 0,
//! a per-IP limit on RevokeTrialKey, and the background sweep of expired trial keys.

use std::time::{Duration, Instant};

use key_authority::pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{
    ADMIN_TOKEN, TestApp, TestDb, keys_as, on_both_databases, reason, test_config,
};

/// A well-formed trial prefix that names no key.
const UNKNOWN_TRIAL_PREFIX: &str = "ka_trial_000000000000";

async fn switched_off_trial_keys_are_unimplemented(db: TestDb) {
    let mut config = test_config(&db);
    config.trial.enabled = false;
    let app = TestApp::spawn_with(config).await;
    let mut anonymous = keys_as(&app.channel, None);

    let status = anonymous
        .issue_trial_key(pb::IssueTrialKeyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(reason(&status), "TRIAL_KEYS_DISABLED");
    let status = anonymous
        .revoke_trial_key(pb::RevokeTrialKeyRequest {
            prefix: UNKNOWN_TRIAL_PREFIX.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    assert_eq!(reason(&status), "TRIAL_KEYS_DISABLED");
    app.stop().await;
}

async fn a_zero_trial_limit_issues_none(db: TestDb) {
    let mut config = test_config(&db);
    config.auth.trial_limit_per_minute = 0;
    let app = TestApp::spawn_with(config).await;
    let status = keys_as(&app.channel, None)
        .issue_trial_key(pb::IssueTrialKeyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "TRIAL_KEYS_PAUSED");
    // Waiting does not help, so no RetryInfo invites a retry.
    assert!(status.get_details_retry_info().is_none());
    app.stop().await;
}

async fn revoke_trial_key_is_rate_limited_per_client_ip(db: TestDb) {
    let mut config = test_config(&db);
    config.auth.trial_revoke_limit_per_minute = 2;
    let app = TestApp::spawn_with(config).await;
    let revoke = |client: &mut crate::common::KeysClient, client_ip: &str| {
        let mut client = client.clone();
        let request = pb::RevokeTrialKeyRequest {
            prefix: UNKNOWN_TRIAL_PREFIX.into(),
            client_ip: client_ip.into(),
        };
        async move { client.revoke_trial_key(request).await.unwrap_err() }
    };
    let mut anonymous = keys_as(&app.channel, None);
    for _ in 0..2 {
        assert_eq!(revoke(&mut anonymous, "").await.code(), Code::NotFound);
    }
    // An untrusted caller cannot pick the address it is counted under.
    let status = revoke(&mut anonymous, "192.0.2.7").await;
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "IP_RATE_LIMITED");
    assert!(status.get_details_retry_info().is_some());
    // A trusted front end counts each end user's address on its own.
    let mut front_end = keys_as(&app.channel, Some(ADMIN_TOKEN));
    assert_eq!(
        revoke(&mut front_end, "192.0.2.7").await.code(),
        Code::NotFound
    );
    app.stop().await;
}

async fn expired_trial_keys_are_swept_in_batches(db: TestDb) {
    let mut config = test_config(&db);
    config.trial.ttl = Duration::from_millis(300);
    config.trial.retention = Duration::ZERO;
    config.trial.sweep_interval = Duration::from_millis(50);
    config.trial.sweep_batch = 2;
    config.auth.trial_limit_per_minute = 100;
    let mut app = TestApp::spawn_with(config).await;
    // An expired key of another environment is never swept; it expires before the trial keys,
    // so the sweeps that delete them run after it expired.
    let ordinary = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "trial".into(),
            name: "not a trial key".into(),
            expiration: Some(pb::issue_key_request::Expiration::Ttl(
                prost_types::Duration {
                    seconds: 0,
                    nanos: 300_000_000,
                },
            )),
            ..Default::default()
        })
        .await
        .key
        .unwrap();

    let mut anonymous = keys_as(&app.channel, None);
    let mut trial_ids = Vec::new();
    for _ in 0..5 {
        let trial = anonymous
            .issue_trial_key(pb::IssueTrialKeyRequest::default())
            .await
            .unwrap()
            .into_inner();
        trial_ids.push(trial.key.unwrap().key_id);
    }
    // Await the sweep: every trial key disappears, five keys in batches of two.
    let deadline = Instant::now() + Duration::from_secs(20);
    for key_id in &trial_ids {
        loop {
            match app.get("trial", key_id).await {
                Err(status) if status.code() == Code::NotFound => break,
                Ok(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => panic!("trial key {key_id} still there: {other:?}"),
            }
        }
    }
    let kept = app.get("trial", &ordinary.key_id).await.unwrap();
    assert_eq!(kept.state, pb::KeyState::Expired as i32);
    app.stop().await;
}

on_both_databases!(
    switched_off_trial_keys_are_unimplemented,
    a_zero_trial_limit_issues_none,
    revoke_trial_key_is_rate_limited_per_client_ip,
    expired_trial_keys_are_swept_in_batches,
);
