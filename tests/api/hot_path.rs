//! The VerifyKey caches: single-flight, negative caching, read-your-writes.

use key_authority::pb;

use crate::common::{TestApp, TestDb, code, key_of, on_both_databases};
use crate::verify::forge_with_same_prefix;

async fn concurrent_cold_verifies_share_one_argon2_and_one_read(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let issued = app.issue("acme", "hot").await;
    let verifier = app.server.verifier.clone();
    let argon2_before = verifier.hash_pool().verifications();
    let loads_before = verifier.invalidator().loads();

    let calls: Vec<_> = (0..32)
        .map(|_| {
            let mut client = app.verify.clone();
            let key = issued.secret.clone();
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
    for call in calls {
        assert_eq!(code(&call.await.unwrap()), pb::VerifyCode::Valid);
    }
    assert_eq!(
        verifier.hash_pool().verifications() - argon2_before,
        1,
        "one argon2 verify"
    );
    assert_eq!(
        verifier.invalidator().loads() - loads_before,
        1,
        "one database read"
    );

    // Warm from now on: neither argon2 nor the database.
    for _ in 0..10 {
        assert!(app.verify_key(&issued.secret, &[]).await.valid);
    }
    assert_eq!(verifier.hash_pool().verifications() - argon2_before, 1);
    assert_eq!(verifier.invalidator().loads() - loads_before, 1);
    app.stop().await;
}

async fn a_repeated_wrong_secret_costs_one_argon2(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let issued = app.issue("acme", "target").await;
    // The owner's secret is proven first, so the lockout the wrong guesses cause spares it.
    assert!(app.verify_key(&issued.secret, &[]).await.valid);
    let wrong = forge_with_same_prefix(&key_of(&issued).prefix);
    let before = app.server.verifier.hash_pool().verifications();
    for _ in 0..9 {
        assert_eq!(
            code(&app.verify_key(&wrong, &[]).await),
            pb::VerifyCode::NotFound
        );
    }
    assert_eq!(app.server.verifier.hash_pool().verifications() - before, 1);
    // The right secret is not affected by the cached wrong one.
    assert_eq!(
        code(&app.verify_key(&issued.secret, &[]).await),
        pb::VerifyCode::Valid
    );
    app.stop().await;
}

async fn rotation_is_seen_by_the_next_verify(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let issued = app.issue("acme", "rotating").await;
    assert!(app.verify_key(&issued.secret, &[]).await.valid);
    app.rotate(
        "acme",
        &key_of(&issued).key_id,
        Some(prost_types::Duration::default()),
    )
    .await
    .unwrap();
    // The warm cache held the old state; the rotation dropped it.
    assert_eq!(
        code(&app.verify_key(&issued.secret, &[]).await),
        pb::VerifyCode::Expired
    );
    app.stop().await;
}

on_both_databases!(
    concurrent_cold_verifies_share_one_argon2_and_one_read,
    a_repeated_wrong_secret_costs_one_argon2,
    rotation_is_seen_by_the_next_verify,
);
