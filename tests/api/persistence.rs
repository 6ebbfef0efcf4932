//! What survives a restart, what is counted, and what never reaches the disk.

use key_authority::pb;

use crate::common::{TestApp, TestDb, audit_events, code, key_of, on_both_databases, test_config};

async fn keys_survive_a_restart(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let issued = app.issue("acme", "durable").await;
    let revoked = app.issue("acme", "gone").await;
    app.revoke("acme", &key_of(&revoked).key_id).await.unwrap();
    app.stop().await;

    let mut restarted = TestApp::spawn(&db).await;
    assert_eq!(
        code(&restarted.verify_key(&issued.secret, &[]).await),
        pb::VerifyCode::Valid
    );
    assert_eq!(
        code(&restarted.verify_key(&revoked.secret, &[]).await),
        pb::VerifyCode::Revoked
    );
    // Page tokens stay valid across restarts: their MAC key lives in the database.
    let first = restarted
        .keys
        .list_keys(pb::ListKeysRequest {
            workspace_id: "acme".into(),
            page_size: 1,
            include_inactive: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    restarted.stop().await;
    let mut again = TestApp::spawn(&db).await;
    let second = again
        .keys
        .list_keys(pb::ListKeysRequest {
            workspace_id: "acme".into(),
            page_size: 1,
            page_token: first.next_page_token,
            include_inactive: true,
        })
        .await
        .expect("a token from before the restart still works")
        .into_inner();
    assert_eq!(second.keys.len(), 1);
    assert_ne!(second.keys[0].key_id, first.keys[0].key_id);
    again.stop().await;
}

async fn usage_is_exact_after_graceful_shutdown(db: TestDb) {
    let mut config = test_config(&db);
    // Long enough that only the shutdown flush can write the counts.
    config.usage.flush_interval = std::time::Duration::from_secs(3600);
    let mut app = TestApp::spawn_with(config).await;
    let busy = app.issue("acme", "busy").await;
    let idle = app.issue("acme", "idle").await;
    let mut valid = 0;
    for round in 0..25 {
        let scopes: &[&str] = if round % 5 == 0 { &["nope"] } else { &[] };
        // Unscoped keys pass every scope check, so every one of these is VALID.
        if app.verify_key(&busy.secret, scopes).await.valid {
            valid += 1;
        }
    }
    assert_eq!(valid, 25);
    let scoped = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "scoped".into(),
            scopes: vec!["read".into()],
            ..Default::default()
        })
        .await;
    for _ in 0..3 {
        assert!(app.verify_key(&scoped.secret, &["read"]).await.valid);
        assert!(!app.verify_key(&scoped.secret, &["write"]).await.valid);
    }
    app.stop().await;

    let mut restarted = TestApp::spawn(&db).await;
    let busy_key = restarted.get("acme", &key_of(&busy).key_id).await.unwrap();
    assert_eq!(busy_key.total_requests, 25);
    assert!(busy_key.last_used_time.is_some());
    let scoped_key = restarted
        .get("acme", &key_of(&scoped).key_id)
        .await
        .unwrap();
    assert_eq!(scoped_key.total_requests, 3, "refusals are not usage");
    let idle_key = restarted.get("acme", &key_of(&idle).key_id).await.unwrap();
    assert_eq!(idle_key.total_requests, 0);
    assert_eq!(idle_key.last_used_time, None);
    restarted.stop().await;
}

async fn no_plaintext_key_reaches_the_database_files(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let mut secrets = Vec::new();
    for i in 0..5 {
        let issued = app.issue("acme", &format!("k{i}")).await;
        assert!(app.verify_key(&issued.secret, &[]).await.valid);
        secrets.push((issued.secret.clone(), key_of(&issued).prefix.clone()));
    }
    let to_rotate = key_of(&app.issue("acme", "r").await).key_id.clone();
    let rotated = app.rotate("acme", &to_rotate, None).await.unwrap();
    secrets.push((rotated.secret.clone(), rotated.key.unwrap().prefix));
    app.stop().await;

    let files = db.data_files().await;
    assert!(!files.is_empty());
    let mut scanned = 0usize;
    for file in files {
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        scanned += bytes.len();
        for (secret, prefix) in &secrets {
            // The secret part alone (after the public prefix) must appear nowhere.
            let secret_part = &secret.as_bytes()[prefix.len()..];
            assert!(
                memchr::memmem::find(&bytes, secret_part).is_none(),
                "a plaintext secret was found in {file:?}"
            );
        }
    }
    assert!(scanned > 0, "some data was scanned");
}

/// Every mutation writes one audit row in the same transaction, naming the actor; a rotation is
/// one row on the rotated key, and a no-op revocation still records the attempt.
async fn every_mutation_leaves_an_audit_row(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let issued = app.issue("acme", "audited").await;
    let key_id = key_of(&issued).key_id.clone();
    let rotated = app.rotate("acme", &key_id, None).await.unwrap();
    let successor = rotated.key.unwrap().key_id;
    app.revoke("acme", &successor).await.unwrap();
    app.revoke("acme", &successor).await.unwrap(); // a no-op: an UNCHANGED row
    app.stop().await;

    let rows = audit_events(&db).await;
    let admin = "admin".to_owned();
    assert_eq!(
        rows,
        vec![
            (key_id.clone(), "issue".to_owned(), admin.clone()),
            (key_id, "rotate".to_owned(), admin.clone()),
            (successor.clone(), "revoke".to_owned(), admin.clone()),
            (successor, "revoke".to_owned(), admin),
        ]
    );
}

on_both_databases!(
    keys_survive_a_restart,
    usage_is_exact_after_graceful_shutdown,
    no_plaintext_key_reaches_the_database_files,
    every_mutation_leaves_an_audit_row,
);
