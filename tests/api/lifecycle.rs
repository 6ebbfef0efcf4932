//! IssueKey, GetKey and RevokeKey end to end.

use key_authority::pb;
use tonic::Code;

use crate::common::{TestApp, TestDb, code, key_of, on_both_databases, reason};

/// The regular expression README.md publishes for secret scanners.
fn looks_like_a_key(text: &str) -> bool {
    let Some((brand, rest)) = text.split_once('_') else {
        return false;
    };
    let Some((environment, body)) = rest.split_once('_') else {
        return false;
    };
    !brand.is_empty()
        && brand.len() <= 16
        && brand
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && ["live", "test", "dev"].contains(&environment)
        && body.len() == 50
        && body.bytes().all(|b| b.is_ascii_alphanumeric())
}

async fn issue_returns_the_secret_once_and_public_metadata(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let issued = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "billing worker".into(),
            description: "charges cards".into(),
            scopes: vec!["payments:write".into(), "payments:read".into()],
            metadata: [("team".to_owned(), "payments".to_owned())].into(),
            ..Default::default()
        })
        .await;
    let key = key_of(&issued);

    assert!(
        looks_like_a_key(&issued.secret),
        "{} is not a key",
        key.prefix
    );
    assert!(issued.secret.starts_with(&key.prefix));
    assert_eq!(key.prefix, format!("ka_live_{}", key.key_id));
    assert_eq!(key.key_id.len(), 12);
    assert_eq!(key.workspace_id, "acme");
    assert_eq!(key.name, "billing worker");
    assert_eq!(key.description, "charges cards");
    assert_eq!(key.scopes, ["payments:read", "payments:write"]);
    assert_eq!(key.role, pb::Role::Developer as i32);
    assert_eq!(key.environment, pb::Environment::Live as i32);
    assert_eq!(key.state, pb::KeyState::Active as i32);
    assert_eq!(
        key.metadata.get("team").map(String::as_str),
        Some("payments")
    );
    assert!(key.create_time.is_some());
    assert_eq!(key.expire_time, None);
    assert_eq!(key.revoke_time, None);
    assert_eq!(key.total_requests, 0);

    let fetched = app.get("acme", &key.key_id).await.unwrap();
    assert_eq!(&fetched, key);
    app.stop().await;
}

async fn environments_roles_and_ttl_are_kept(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let issued = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "ci".into(),
            environment: pb::Environment::Test as i32,
            role: pb::Role::AccountAdmin as i32,
            expiration: Some(pb::issue_key_request::Expiration::Ttl(
                prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                },
            )),
            ..Default::default()
        })
        .await;
    let key = key_of(&issued);
    assert!(issued.secret.starts_with("ka_test_"));
    assert_eq!(key.environment, pb::Environment::Test as i32);
    assert_eq!(key.role, pb::Role::AccountAdmin as i32);
    let created = key.create_time.unwrap().seconds;
    let expires = key.expire_time.unwrap().seconds;
    assert!(
        (3599..=3601).contains(&(expires - created)),
        "ttl kept: {}",
        expires - created
    );

    let dev = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "laptop".into(),
            environment: pb::Environment::Dev as i32,
            role: pb::Role::Viewer as i32,
            ..Default::default()
        })
        .await;
    assert!(dev.secret.starts_with("ka_dev_"));
    assert_eq!(key_of(&dev).role, pb::Role::Viewer as i32);
    assert_eq!(
        code(&app.verify_key(&dev.secret, &[]).await),
        pb::VerifyCode::Valid
    );
    app.stop().await;
}

async fn get_unknown_or_foreign_key_is_not_found(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let issued = app.issue("acme", "one").await;
    let key_id = key_of(&issued).key_id.clone();

    for (workspace, id) in [
        ("acme", "AAAAAAAAAAAA"),
        ("acme", "nonsense"),
        ("other", key_id.as_str()),
    ] {
        let status = app.get(workspace, id).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{workspace}/{id}");
        assert_eq!(reason(&status), "KEY_NOT_FOUND");
    }
    app.stop().await;
}

async fn revoke_is_immediate_and_idempotent(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let issued = app.issue("acme", "to revoke").await;
    let key_id = key_of(&issued).key_id.clone();
    assert_eq!(
        code(&app.verify_key(&issued.secret, &[]).await),
        pb::VerifyCode::Valid
    );

    let revoked = app.revoke("acme", &key_id).await.unwrap();
    assert_eq!(revoked.state, pb::KeyState::Revoked as i32);
    assert!(revoked.revoke_time.is_some());

    // Read your writes: the very next verify on this replica refuses the key.
    let verdict = app.verify_key(&issued.secret, &[]).await;
    assert!(!verdict.valid);
    assert_eq!(code(&verdict), pb::VerifyCode::Revoked);
    assert_eq!(verdict.key.unwrap().key_id, key_id);

    let again = app.revoke("acme", &key_id).await.unwrap();
    assert_eq!(
        again.revoke_time, revoked.revoke_time,
        "a second revoke changes nothing"
    );

    let missing = app.revoke("acme", "AAAAAAAAAAAA").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let foreign = app.revoke("other", &key_id).await.unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound);
    app.stop().await;
}

async fn workspaces_are_isolated(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let mine = app.issue("alpha", "mine").await;
    let theirs = app.issue("beta", "theirs").await;
    let my_id = key_of(&mine).key_id.clone();

    let listed = app
        .keys
        .list_keys(pb::ListKeysRequest {
            workspace_id: "beta".into(),
            include_inactive: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.total_size, 1);
    assert_eq!(listed.keys[0].key_id, key_of(&theirs).key_id);

    assert_eq!(
        app.get("beta", &my_id).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        app.revoke("beta", &my_id).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        app.rotate("beta", &my_id, None).await.unwrap_err().code(),
        Code::NotFound
    );
    // None of that touched the key.
    let untouched = app.get("alpha", &my_id).await.unwrap();
    assert_eq!(untouched.state, pb::KeyState::Active as i32);
    assert_eq!(untouched.rotated_to_key_id, "");
    app.stop().await;
}

on_both_databases!(
    issue_returns_the_secret_once_and_public_metadata,
    environments_roles_and_ttl_are_kept,
    get_unknown_or_foreign_key_is_not_found,
    revoke_is_immediate_and_idempotent,
    workspaces_are_isolated,
);
