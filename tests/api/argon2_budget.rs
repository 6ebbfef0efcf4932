//! The argon2 budget for secrets nobody has proven yet: beyond it a VerifyKey is refused at once
//! with RESOURCE_EXHAUSTED and a RetryInfo, never a verdict, and never counted as a failure.

use key_authority::key::{HashParams, UnprovenBudget};
use key_authority::pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{TestApp, TestDb, code, on_both_databases, reason, test_config};

const CLIENT_IP: &str = "198.51.100.7";

async fn unproven_secrets_beyond_the_budget_are_refused_at_once(db: TestDb) {
    let mut config = test_config(&db);
    config.argon2_threads = 1;
    config.argon2_unproven = UnprovenBudget {
        per_second: 0,
        queue_depth: 2,
    };
    // Slow enough that the cold verifications overlap.
    config.hash_params = HashParams {
        memory_kib: 8 * 1024,
        iterations: 2,
        parallelism: 1,
    };
    let mut app = TestApp::spawn_with(config).await;
    let mut secrets = Vec::new();
    // More than the IP lockout's 20: were refusals counted as failures, the IP would lock.
    for n in 0..24 {
        secrets.push(app.issue("acme", &format!("cold {n}")).await.secret);
    }

    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    for secret in &secrets {
        let mut verify = app.verify.clone();
        let done_tx = done_tx.clone();
        let request = pb::VerifyKeyRequest {
            key: secret.clone(),
            client_ip: CLIENT_IP.into(),
            ..Default::default()
        };
        tokio::spawn(async move {
            let answer = verify.verify_key(request).await;
            done_tx
                .send(answer.map(|answer| answer.into_inner()))
                .unwrap();
        });
    }
    drop(done_tx);
    // Answers in completion order.
    let mut valid = 0;
    let mut refused = 0;
    let mut last_was_valid = false;
    while let Some(answer) = done.recv().await {
        last_was_valid = match answer {
            Ok(answer) => {
                assert_eq!(code(&answer), pb::VerifyCode::Valid);
                valid += 1;
                true
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(reason(&status), "VERIFY_BUSY");
                assert!(status.get_details_retry_info().is_some());
                refused += 1;
                false
            }
        };
    }
    assert!(
        valid >= 1 && refused >= 1,
        "valid {valid}, refused {refused}"
    );
    assert!(
        last_was_valid,
        "refusals come back at once, before the admitted verifications finish"
    );
    let stats = app.server.verifier.hash_pool().stats();
    assert_eq!(stats.unproven_refused, refused as u64);

    // The service did not decide for the refused ones: retried later from the same address,
    // each is VALID (no failure was counted, so no lockout either).
    for secret in &secrets {
        let answer = app
            .verify
            .verify_key(pb::VerifyKeyRequest {
                key: secret.clone(),
                client_ip: CLIENT_IP.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(code(&answer), pb::VerifyCode::Valid);
    }
    app.stop().await;
}

on_both_databases!(unproven_secrets_beyond_the_budget_are_refused_at_once);
