//! Every VerifyKey verdict code.

use key_authority::pb;

use crate::common::{TestApp, TestDb, code, key_of, on_both_databases};

async fn valid_key_is_valid_with_metadata(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let issued = app.issue("acme", "svc").await;
    let verdict = app.verify_key(&issued.secret, &[]).await;
    assert!(verdict.valid);
    assert_eq!(code(&verdict), pb::VerifyCode::Valid);
    let key = verdict.key.expect("metadata of the identified key");
    assert_eq!(key.key_id, key_of(&issued).key_id);
    assert_eq!(key.workspace_id, "acme");
    app.stop().await;
}

async fn malformed_keys_are_refused_without_lookup(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let issued = app.issue("acme", "svc").await;
    let mut typo = issued.secret.clone().into_bytes();
    let last = typo.len() - 10;
    typo[last] = if typo[last] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    let too_long = "a".repeat(257);
    let cases = [
        "",
        "not a key",
        too_long.as_str(),
        "ka_live_!!!!",
        "ka_prod_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        typo.as_str(),
    ];
    let verifications_before = app.server.verifier.hash_pool().verifications();
    for text in cases {
        let verdict = app.verify_key(text, &[]).await;
        assert!(!verdict.valid);
        assert_eq!(code(&verdict), pb::VerifyCode::Malformed, "{text:?}");
        assert_eq!(verdict.key, None);
    }
    assert_eq!(
        app.server.verifier.hash_pool().verifications(),
        verifications_before,
        "a malformed key never reaches argon2"
    );
    app.stop().await;
}

async fn unknown_key_and_wrong_secret_are_not_found(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let issued = app.issue("acme", "svc").await;
    let other_app_key = {
        // A well-formed key with a valid checksum that this database never issued.
        let stranger = TestDb::sqlite().await;
        let mut other = TestApp::spawn(&stranger).await;
        let secret = other.issue("acme", "elsewhere").await.secret;
        other.stop().await;
        secret
    };
    let verdict = app.verify_key(&other_app_key, &[]).await;
    assert_eq!(code(&verdict), pb::VerifyCode::NotFound);
    assert_eq!(verdict.key, None);

    // Same key id, different secret: recompute a valid checksum over a changed secret.
    let prefix = &key_of(&issued).prefix;
    let forged = forge_with_same_prefix(prefix);
    let verdict = app.verify_key(&forged, &[]).await;
    assert!(!verdict.valid);
    assert_eq!(code(&verdict), pb::VerifyCode::NotFound);
    assert_eq!(
        verdict.key, None,
        "a wrong secret learns nothing about the key"
    );
    app.stop().await;
}

/// A well-formed key for `prefix` with a made-up secret and a correct checksum.
pub fn forge_with_same_prefix(prefix: &str) -> String {
    forge_numbered(prefix, 0)
}

/// The `n`th distinct made-up secret for `prefix`, with a correct checksum.
pub fn forge_numbered(prefix: &str, n: u64) -> String {
    const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let body = format!("{prefix}{:Z>32}", n);
    let mut value = crc32fast_hash(body.as_bytes());
    let mut check = [b'0'; 6];
    for slot in check.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    format!("{body}{}", String::from_utf8(check.to_vec()).unwrap())
}

fn crc32fast_hash(data: &[u8]) -> u32 {
    // CRC-32 (IEEE), bit by bit: independent of the service's own implementation.
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

async fn scopes_are_enforced(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let scoped = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "reader".into(),
            scopes: vec!["orders:read".into(), "orders:list".into()],
            ..Default::default()
        })
        .await;
    assert_eq!(
        code(&app.verify_key(&scoped.secret, &["orders:read"]).await),
        pb::VerifyCode::Valid
    );
    assert_eq!(
        code(
            &app.verify_key(&scoped.secret, &["orders:read", "orders:list"])
                .await
        ),
        pb::VerifyCode::Valid
    );
    let refused = app
        .verify_key(&scoped.secret, &["orders:read", "orders:write"])
        .await;
    assert!(!refused.valid);
    assert_eq!(code(&refused), pb::VerifyCode::InsufficientScope);
    assert_eq!(refused.key.unwrap().key_id, key_of(&scoped).key_id);

    let unscoped = app.issue("acme", "everything").await;
    assert_eq!(
        code(&app.verify_key(&unscoped.secret, &["anything:at_all"]).await),
        pb::VerifyCode::Valid
    );

    let full = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "full".into(),
            scopes: vec!["full_access".into()],
            ..Default::default()
        })
        .await;
    assert_eq!(
        code(
            &app.verify_key(&full.secret, &["admin", "billing:write"])
                .await
        ),
        pb::VerifyCode::Valid
    );
    app.stop().await;
}

async fn expired_key_is_expired(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let issued = app.issue("acme", "short lived").await;
    // Rotation with a zero grace period ends the old key now: expiry without waiting on a clock.
    app.rotate(
        "acme",
        &key_of(&issued).key_id,
        Some(prost_types::Duration::default()),
    )
    .await
    .unwrap();
    let verdict = app.verify_key(&issued.secret, &[]).await;
    assert!(!verdict.valid);
    assert_eq!(code(&verdict), pb::VerifyCode::Expired);
    assert_eq!(verdict.key.unwrap().state, pb::KeyState::Expired as i32);
    app.stop().await;
}

async fn ttl_expiry_is_checked_on_every_verify(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let issued = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "three seconds".into(),
            // Long enough to warm the caches on a loaded machine.
            expiration: Some(pb::issue_key_request::Expiration::Ttl(
                prost_types::Duration {
                    seconds: 3,
                    nanos: 0,
                },
            )),
            ..Default::default()
        })
        .await;
    // Warm the caches while valid.
    assert_eq!(
        code(&app.verify_key(&issued.secret, &[]).await),
        pb::VerifyCode::Valid
    );
    let expire = key_of(&issued).expire_time.unwrap();
    let expire_at = std::time::UNIX_EPOCH
        + std::time::Duration::new(expire.seconds as u64, expire.nanos as u32);
    // The event awaited here is the clock passing the expiry itself.
    if let Ok(remaining) = expire_at.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(remaining + std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        code(&app.verify_key(&issued.secret, &[]).await),
        pb::VerifyCode::Expired
    );
    app.stop().await;
}

async fn too_many_required_scopes_is_a_bad_request(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let scopes: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
    let status = app
        .verify
        .verify_key(pb::VerifyKeyRequest {
            key: "ka_live_x".into(),
            required_scopes: scopes,
            client_ip: String::new(),
            cost: None,
            minimum_role: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("required_scopes"));
    app.stop().await;
}

/// `minimum_role`: a key below it is refused (with its metadata), before any usage is consumed;
/// unset, any role passes; an unknown role is a bad request.
async fn minimum_role_is_enforced_before_usage(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let issued = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: "acme".into(),
            name: "viewer".into(),
            role: pb::Role::Viewer as i32,
            usage_limit: 2,
            ..Default::default()
        })
        .await;
    let ask = |minimum_role: pb::Role| pb::VerifyKeyRequest {
        key: issued.secret.clone(),
        minimum_role: minimum_role as i32,
        ..Default::default()
    };
    for minimum in [pb::Role::Developer, pb::Role::AccountAdmin] {
        let refused = app
            .verify
            .verify_key(ask(minimum))
            .await
            .unwrap()
            .into_inner();
        assert!(!refused.valid);
        assert_eq!(
            code(&refused),
            pb::VerifyCode::InsufficientRole,
            "{minimum:?}"
        );
        let key = refused.key.expect("the identified key's metadata");
        assert_eq!(key.role, pb::Role::Viewer as i32);
        assert_eq!(key.usage_remaining, 2, "nothing consumed");
    }
    for (minimum, remaining) in [(pb::Role::Trial, 1), (pb::Role::Viewer, 0)] {
        let passed = app
            .verify
            .verify_key(ask(minimum))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(code(&passed), pb::VerifyCode::Valid, "{minimum:?}");
        assert_eq!(passed.key.unwrap().usage_remaining, remaining);
    }
    let status = app
        .verify
        .verify_key(pb::VerifyKeyRequest {
            key: issued.secret.clone(),
            minimum_role: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    app.stop().await;
}

on_both_databases!(
    minimum_role_is_enforced_before_usage,
    valid_key_is_valid_with_metadata,
    malformed_keys_are_refused_without_lookup,
    unknown_key_and_wrong_secret_are_not_found,
    scopes_are_enforced,
    expired_key_is_expired,
    ttl_expiry_is_checked_on_every_verify,
    too_many_required_scopes_is_a_bad_request,
);
