//! Lockouts under concurrency: an unrecognised secret takes one of its key's (and its client
//! IP's) attempts before argon2 starts, so a burst of guesses cannot outrun the lockout, on
//! VerifyKey and on KeyService's API-key authentication alike.

use key_authority::pb;
use tonic::Code;

use crate::common::{
    TestApp, TestDb, code, key_of, keys_as, on_both_databases, reason, test_config,
};
use crate::verify::forge_numbered;

/// `--lockout-key-failures` by default.
const KEY_FAILURES: u64 = 10;
/// `--lockout-ip-failures` by default.
const IP_FAILURES: u64 = 20;

/// VerifyKey for every key at once; the verdict codes in the same order.
async fn verify_all(app: &TestApp, keys: Vec<String>) -> Vec<pb::VerifyCode> {
    let calls: Vec<_> = keys
        .into_iter()
        .map(|key| {
            let mut client = app.verify.clone();
            tokio::spawn(async move {
                client
                    .verify_key(pb::VerifyKeyRequest {
                        key,
                        ..Default::default()
                    })
                    .await
                    .expect("VerifyKey answers")
                    .into_inner()
            })
        })
        .collect();
    let mut codes = Vec::with_capacity(calls.len());
    for call in calls {
        codes.push(code(&call.await.unwrap()));
    }
    codes
}

fn count(codes: &[pb::VerifyCode], wanted: pb::VerifyCode) -> u64 {
    codes.iter().filter(|code| **code == wanted).count() as u64
}

/// ListKeys authenticated by `key`.
async fn list_as(app: &TestApp, key: &str) -> Result<(), tonic::Status> {
    keys_as(&app.channel, Some(key))
        .list_keys(pb::ListKeysRequest::default())
        .await
        .map(drop)
}

async fn a_burst_of_wrong_secrets_reaches_argon2_at_most_the_threshold(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let owned = app.issue("acme", "owned").await;
    assert!(
        app.verify_key(&owned.secret, &[]).await.valid,
        "the owner's secret is proven"
    );
    let prefix = key_of(&owned).prefix.clone();
    let verifier = app.server.verifier.clone();
    let before = verifier.hash_pool().verifications();

    let guesses = (1..=500).map(|n| forge_numbered(&prefix, n)).collect();
    let codes = verify_all(&app, guesses).await;

    let argon2 = verifier.hash_pool().verifications() - before;
    let not_found = count(&codes, pb::VerifyCode::NotFound);
    let locked = count(&codes, pb::VerifyCode::Locked);
    assert_eq!(
        not_found + locked,
        500,
        "only NOT_FOUND or LOCKED: {codes:?}"
    );
    assert!(
        argon2 <= KEY_FAILURES,
        "{argon2} argon2 runs for 500 guesses"
    );
    assert_eq!(
        not_found, argon2,
        "every guess that was hashed, and only those"
    );
    assert_eq!(
        code(&app.verify_key(&forge_numbered(&prefix, 501), &[]).await),
        pb::VerifyCode::Locked
    );
    assert_eq!(
        code(&app.verify_key(&owned.secret, &[]).await),
        pb::VerifyCode::Valid,
        "a proven secret passes the lockout"
    );
    assert_eq!(verifier.hash_pool().verifications() - before, argon2);
    app.stop().await;
}

async fn a_burst_spread_over_many_keys_reaches_argon2_at_most_the_ip_threshold(db: TestDb) {
    // No argon2 budget in the way: up to 20 checks may be in flight at once, and this test is
    // about the IP lockout's bound alone (the budget has tests of its own).
    let mut config = test_config(&db);
    config.argon2_unproven = key_authority::key::UnprovenBudget {
        per_second: 0,
        queue_depth: 1000,
    };
    let mut app = TestApp::spawn_with(config).await;
    let mut prefixes = Vec::new();
    for n in 0..30 {
        let issued = app.issue("acme", &format!("k{n}")).await;
        prefixes.push(key_of(&issued).prefix.clone());
    }
    let verifier = app.server.verifier.clone();
    let before = verifier.hash_pool().verifications();

    // Nine guesses per key stay under every key's threshold: only the IP's 20 can stop them.
    let calls: Vec<_> = (1..=9)
        .flat_map(|n| prefixes.iter().map(move |prefix| forge_numbered(prefix, n)))
        .map(|key| {
            let mut client = app.verify.clone();
            tokio::spawn(async move {
                let verdict = client
                    .verify_key(pb::VerifyKeyRequest {
                        key,
                        client_ip: "198.51.100.9".into(),
                        ..Default::default()
                    })
                    .await
                    .expect("VerifyKey answers");
                code(verdict.get_ref())
            })
        })
        .collect();
    let mut codes = Vec::new();
    for call in calls {
        codes.push(call.await.unwrap());
    }
    let argon2 = verifier.hash_pool().verifications() - before;
    let not_found = count(&codes, pb::VerifyCode::NotFound);
    assert_eq!(
        not_found + count(&codes, pb::VerifyCode::Locked),
        270,
        "{codes:?}"
    );
    assert!(
        argon2 <= IP_FAILURES,
        "{argon2} argon2 runs for 270 guesses"
    );
    assert_eq!(not_found, argon2);
    app.stop().await;
}

async fn a_right_secret_among_concurrent_guesses_is_not_a_failure(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let target = app.issue("acme", "target").await;
    let prefix = key_of(&target).prefix.clone();
    let verifier = app.server.verifier.clone();
    let before = verifier.hash_pool().verifications();

    // Nine guesses and the (never verified) right secret: exactly the ten attempts of a window.
    let mut first: Vec<String> = (1..=9).map(|n| forge_numbered(&prefix, n)).collect();
    first.insert(4, target.secret.clone());
    let codes = verify_all(&app, first).await;
    assert_eq!(codes[4], pb::VerifyCode::Valid, "{codes:?}");
    assert_eq!(count(&codes, pb::VerifyCode::NotFound), 9, "{codes:?}");
    assert_eq!(verifier.hash_pool().verifications() - before, 10);

    // The right secret gave its attempt back: of 490 more guesses exactly one is hashed, the
    // tenth failure, which locks the key.
    let codes = verify_all(
        &app,
        (10..500).map(|n| forge_numbered(&prefix, n)).collect(),
    )
    .await;
    assert_eq!(count(&codes, pb::VerifyCode::NotFound), 1, "{codes:?}");
    assert_eq!(count(&codes, pb::VerifyCode::Locked), 489, "{codes:?}");
    assert_eq!(verifier.hash_pool().verifications() - before, 11);
    assert_eq!(
        code(&app.verify_key(&target.secret, &[]).await),
        pb::VerifyCode::Valid,
        "proven during the burst, so it passes the lockout"
    );
    app.stop().await;
}

async fn a_burst_of_wrong_api_keys_on_key_service_reaches_argon2_at_most_the_threshold(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let caller = app.issue("acme", "automation").await;
    list_as(&app, &caller.secret)
        .await
        .expect("the right key authenticates, and is proven");
    let prefix = key_of(&caller).prefix.clone();
    let verifier = app.server.verifier.clone();
    let before = verifier.hash_pool().verifications();

    let calls: Vec<_> = (1..=500)
        .map(|n| {
            let mut client = keys_as(&app.channel, Some(&forge_numbered(&prefix, n)));
            tokio::spawn(async move {
                client
                    .list_keys(pb::ListKeysRequest::default())
                    .await
                    .expect_err("a wrong API key is refused")
            })
        })
        .collect();
    let mut locked = 0;
    for call in calls {
        let status = call.await.unwrap();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert_eq!(reason(&status), "INVALID_CREDENTIALS");
        if status.message().contains("locked") {
            locked += 1;
        } else {
            assert!(status.message().contains("unknown API key"), "{status:?}");
        }
    }
    let argon2 = verifier.hash_pool().verifications() - before;
    assert!(
        argon2 <= KEY_FAILURES,
        "{argon2} argon2 runs for 500 guesses"
    );
    assert_eq!(
        500 - locked,
        argon2,
        "every guess that was hashed, and only those"
    );
    let status = list_as(&app, &forge_numbered(&prefix, 501))
        .await
        .unwrap_err();
    assert!(status.message().contains("locked"), "{status:?}");
    // The same lockout as VerifyKey's: a guess there is refused unhashed too.
    assert_eq!(
        code(&app.verify_key(&forge_numbered(&prefix, 502), &[]).await),
        pb::VerifyCode::Locked
    );
    list_as(&app, &caller.secret)
        .await
        .expect("a proven key passes the lockout");
    assert_eq!(verifier.hash_pool().verifications() - before, argon2);
    app.stop().await;
}

async fn key_service_api_key_failures_count_under_the_peer_address(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let unproven = app.issue("acme", "unproven").await;
    // 20 (`--lockout-ip-failures`) API keys of no key from this connection's address.
    for n in 0..20 {
        let unknown = forge_numbered(&format!("ka_live_UNKNOWN{n:05}"), 1);
        let status = list_as(&app, &unknown).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(status.message().contains("unknown API key"), "{status:?}");
    }
    let status = list_as(&app, &unproven.secret).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "INVALID_CREDENTIALS");
    assert!(status.message().contains("locked"), "{status:?}");
    // One counter per address, whichever service counted the failures.
    let from = |ip: &str| pb::VerifyKeyRequest {
        key: unproven.secret.clone(),
        client_ip: ip.to_owned(),
        ..Default::default()
    };
    let here = app.verify.verify_key(from("127.0.0.1")).await.unwrap();
    assert_eq!(code(here.get_ref()), pb::VerifyCode::Locked);
    let elsewhere = app.verify.verify_key(from("192.0.2.44")).await.unwrap();
    assert_eq!(code(elsewhere.get_ref()), pb::VerifyCode::Valid);
    list_as(&app, &unproven.secret)
        .await
        .expect("proven since, so it passes the address's lockout");
    app.stop().await;
}

async fn key_service_refuses_api_keys_when_verify_tokens_are_required(db: TestDb) {
    let mut config = test_config(&db);
    config.auth.verify_tokens = vec!["svc-token".to_owned()];
    let mut app = TestApp::spawn_with(config).await;
    let issued = app.issue("acme", "automation").await;
    let prefix = key_of(&issued).prefix.clone();
    let verifier = app.server.verifier.clone();
    let before = verifier.hash_pool().verifications();

    for key in [issued.secret.clone(), forge_numbered(&prefix, 1)] {
        let status = list_as(&app, &key).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(reason(&status), "INVALID_CREDENTIALS");
        assert!(status.message().contains("verify tokens"), "{status:?}");
    }
    assert_eq!(
        verifier.hash_pool().verifications(),
        before,
        "neither key was looked at"
    );
    // Admins still manage keys, and the front end with its token still verifies them.
    app.get("acme", &key_of(&issued).key_id)
        .await
        .expect("an admin still manages keys");
    let mut front_end =
        key_authority::pb::verify_service_client::VerifyServiceClient::with_interceptor(
            app.channel.clone(),
            crate::common::Bearer::new(Some("svc-token")),
        );
    let verdict = front_end
        .verify_key(pb::VerifyKeyRequest {
            key: issued.secret.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&verdict), pb::VerifyCode::Valid);
    app.stop().await;
}

on_both_databases!(
    a_burst_of_wrong_secrets_reaches_argon2_at_most_the_threshold,
    a_burst_spread_over_many_keys_reaches_argon2_at_most_the_ip_threshold,
    a_right_secret_among_concurrent_guesses_is_not_a_failure,
    a_burst_of_wrong_api_keys_on_key_service_reaches_argon2_at_most_the_threshold,
    key_service_api_key_failures_count_under_the_peer_address,
    key_service_refuses_api_keys_when_verify_tokens_are_required,
);
