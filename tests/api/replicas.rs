//! Several replicas on one PostgreSQL database: a change on one reaches the others through
//! LISTEN/NOTIFY, and a broken notification connection never leaves a revoked key valid.

use std::time::Duration;

use key_authority::change_feed::LISTENER_APPLICATION_NAME;
use key_authority::pb;
use sqlx::Connection;

use crate::common::{TestApp, TestDb, code, key_of, test_config};

/// A replica whose state cache would trust a stale entry for an hour: whatever it learns in these
/// tests, it learns from notifications, not from the TTL.
async fn replica(db: &TestDb) -> TestApp {
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
    assert_eq!(terminated.len(), 2, "both replicas had a listener");
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
