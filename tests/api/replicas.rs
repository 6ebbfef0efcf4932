//! Several replicas on one PostgreSQL database: a change on one reaches the others through
//! LISTEN/NOTIFY, and a broken notification connection never leaves a revoked key valid.

use std::time::Duration;

use key_authority::pb;
use key_authority::store::LISTENER_APPLICATION_NAME;
use sqlx::Connection;

use crate::common::{TestApp, TestDb, code, key_of, test_config};

/// A replica whose state cache would trust a stale entry for an hour: whatever it learns in these
/// tests, it learns from notifications, not from the TTL.
pub(crate) async fn replica(db: &TestDb) -> TestApp {
    let mut config = test_config(db);
    config.verify.state_ttl = Duration::from_secs(3600);
    // spawn_with returns once the change feed listens.
    let app = TestApp::spawn_with(config).await;
    assert!(
        app.server.change_feed.is_some(),
        "postgres has a change feed"
    );
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_on_one_replica_reaches_the_other() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let mut a = replica(&db).await;
    let mut b = replica(&db).await;
    let issued = a.issue("acme", "shared").await;
    let key_id = key_of(&issued).key_id.clone();
    assert!(
        b.verify_key(&issued.secret, &[]).await.valid,
        "b warms its cache"
    );

    let mut applied = b.server.change_feed.as_ref().unwrap().applied.subscribe();
    a.revoke("acme", &key_id).await.unwrap();
    // Await b applying the notification for this key.
    loop {
        if applied.recv().await.unwrap() == key_id {
            break;
        }
    }
    assert_eq!(
        code(&b.verify_key(&issued.secret, &[]).await),
        pb::VerifyCode::Revoked
    );

    // Rotation travels the same way.
    let other = a.issue("acme", "rotated elsewhere").await;
    let other_id = key_of(&other).key_id.clone();
    assert!(b.verify_key(&other.secret, &[]).await.valid);
    a.rotate("acme", &other_id, Some(prost_types::Duration::default()))
        .await
        .unwrap();
    loop {
        if applied.recv().await.unwrap() == other_id {
            break;
        }
    }
    assert_eq!(
        code(&b.verify_key(&other.secret, &[]).await),
        pb::VerifyCode::Expired
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_listener_does_not_leave_a_revoked_key_valid() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let mut a = replica(&db).await;
    let mut b = replica(&db).await;
    let issued = a.issue("acme", "victim").await;
    assert!(
        b.verify_key(&issued.secret, &[]).await.valid,
        "b caches the key as valid"
    );

    let mut listening = b.server.change_feed.clone().unwrap().listening;
    let connections_before = *listening.borrow_and_update();
    // Kill every listener connection of this database (a's and b's), as a network cut would.
    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let terminated: Vec<(bool,)> = sqlx::query_as(
        "select pg_terminate_backend(pid) from pg_stat_activity \
         where application_name = $1 and datname = current_database()",
    )
    .bind(LISTENER_APPLICATION_NAME)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    // Two per replica: the state cache's feed and the event watchers' doorbell.
    assert_eq!(terminated.len(), 4, "both replicas had their listeners");
    // Revoke while b is (most likely) not listening: its notification is lost to b.
    a.revoke("acme", &key_of(&issued).key_id).await.unwrap();

    listening
        .wait_for(|count| *count > connections_before)
        .await
        .unwrap();
    assert_eq!(
        code(&b.verify_key(&issued.secret, &[]).await),
        pb::VerifyCode::Revoked,
        "after reconnecting, b dropped its cache and re-read the key"
    );
    a.stop().await;
    b.stop().await;
}

/// A 2-use key rotated again and again (each old key kept alive by a grace period) while both
/// replicas verify every secret of the chain concurrently: never more than 2 VALID verdicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_chain_never_exceeds_its_usage_limit_across_replicas() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let mut a = replica(&db).await;
    let b = replica(&db).await;
    let issued = a
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "two uses".into(),
            usage_limit: 2,
            ..Default::default()
        })
        .await;
    let rotate = |keys: &crate::common::KeysClient, key_id: String| {
        let mut keys = keys.clone();
        async move {
            keys.rotate_key(pb::RotateKeyRequest {
                workspace_id: "acme".into(),
                key_id,
                grace_period: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    // Three rotations before anyone verifies: four live keys, none of them used yet.
    let mut key_id = key_of(&issued).key_id.clone();
    let mut chain = vec![issued.secret.clone()];
    for round in 0..3 {
        let rotator = if round % 2 == 0 { &a.keys } else { &b.keys };
        let rotated = rotate(rotator, key_id).await;
        key_id = rotated.key.unwrap().key_id;
        chain.push(rotated.secret);
    }
    let (secrets_tx, secrets) = tokio::sync::watch::channel(chain);

    // Verifiers on both replicas try every secret of the chain known so far, in a loop.
    let verifiers: Vec<_> = [&a, &b, &a, &b]
        .into_iter()
        .map(|replica| {
            let mut verify = replica.verify.clone();
            let mut secrets = secrets.clone();
            tokio::spawn(async move {
                let mut valid = 0;
                loop {
                    let closed = secrets.has_changed().is_err();
                    let known = secrets.borrow_and_update().clone();
                    for secret in &known {
                        let answer = verify
                            .verify_key(pb::VerifyKeyRequest {
                                key: secret.clone(),
                                ..Default::default()
                            })
                            .await
                            .unwrap()
                            .into_inner();
                        valid += usize::from(answer.valid);
                    }
                    if closed {
                        return valid; // the rotations are over and every secret was tried
                    }
                }
            })
        })
        .collect();

    // Three more rotations while the verifiers run.
    for round in 0..3 {
        let rotator = if round % 2 == 0 { &b.keys } else { &a.keys };
        let rotated = rotate(rotator, key_id).await;
        key_id = rotated.key.unwrap().key_id;
        secrets_tx.send_modify(|secrets| secrets.push(rotated.secret));
    }
    drop(secrets_tx);
    let mut total = 0;
    for verifier in verifiers {
        total += verifier.await.unwrap();
    }
    assert_eq!(
        total, 2,
        "exactly the usage limit, across the chain and both replicas"
    );
    let last = a.get("acme", &key_id).await.unwrap();
    assert_eq!((last.usage_limit, last.usage_remaining), (2, 0));
    a.stop().await;
    b.stop().await;
}

/// RevokeKey with revoke_successors notifies every replica of every key of the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_chain_reaches_the_other_replica() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let mut a = replica(&db).await;
    let mut b = replica(&db).await;
    let issued = a.issue("acme", "chain").await;
    let original_id = key_of(&issued).key_id.clone();
    let rotated = a
        .rotate("acme", &original_id, Some(prost_types::Duration::default()))
        .await
        .unwrap();
    let successor_id = rotated.key.clone().unwrap().key_id;
    assert!(
        b.verify_key(&rotated.secret, &[]).await.valid,
        "b caches the successor as valid"
    );

    let mut applied = b.server.change_feed.as_ref().unwrap().applied.subscribe();
    a.keys
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: "acme".into(),
            key_id: original_id,
            revoke_successors: true,
            ..Default::default()
        })
        .await
        .unwrap();
    loop {
        if applied.recv().await.unwrap() == successor_id {
            break;
        }
    }
    assert_eq!(
        code(&b.verify_key(&rotated.secret, &[]).await),
        pb::VerifyCode::Revoked
    );
    a.stop().await;
    b.stop().await;
}
