//! Who may call what: admin tokens, dashboard JWTs, API keys; roles, workspaces, rate limits.

use std::sync::OnceLock;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use key_authority::auth::JwtConfig;
use key_authority::pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{
    Claims, JWT_SECRET, KeysClient, TestApp, TestDb, claims, hs256, jwt_user, key_of, keys_as, now,
    on_both_databases, reason, test_config, with_dashboard_jwts,
};

/// A server that accepts the admin token and HS256 dashboard JWTs, with IssueKey limited to
/// `issue_limit` per user per hour.
async fn spawn(db: &TestDb, issue_limit: u32) -> TestApp {
    let mut config = with_dashboard_jwts(test_config(db));
    config.auth.issue_limit_per_hour = issue_limit;
    TestApp::spawn_with(config).await
}

async fn issue_key_with_role(
    app: &mut TestApp,
    workspace: &str,
    role: pb::Role,
) -> pb::IssueKeyResponse {
    app.issue_with(pb::IssueKeyRequest {
        workspace_id: workspace.into(),
        name: format!("{role:?} key"),
        role: role as i32,
        ..Default::default()
    })
    .await
}

/// The outcome of one RPC: Ok, or the refusal's code.
type Outcome = Result<(), Code>;

async fn try_every_rpc(
    client: &mut KeysClient,
    workspace: &str,
    target: &str,
    own_key: Option<&str>,
) -> [Outcome; 10] {
    let code = |result: Result<(), tonic::Status>| result.map_err(|status| status.code());
    let issue = code(
        client
            .issue_key(pb::IssueKeyRequest {
                workspace_id: workspace.into(),
                name: "made by matrix".into(),
                role: pb::Role::Viewer as i32,
                ..Default::default()
            })
            .await
            .map(drop),
    );
    let get = code(
        client
            .get_key(pb::GetKeyRequest {
                workspace_id: workspace.into(),
                key_id: target.into(),
            })
            .await
            .map(drop),
    );
    let list = code(
        client
            .list_keys(pb::ListKeysRequest {
                workspace_id: workspace.into(),
                ..Default::default()
            })
            .await
            .map(drop),
    );
    let audit = code(
        client
            .list_audit_events(pb::ListAuditEventsRequest {
                workspace_id: workspace.into(),
                ..Default::default()
            })
            .await
            .map(drop),
    );
    let update = code(
        client
            .update_key(pb::UpdateKeyRequest {
                key: Some(pb::Key {
                    workspace_id: workspace.into(),
                    key_id: target.into(),
                    name: "renamed".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["name".into()],
                }),
                ..Default::default()
            })
            .await
            .map(drop),
    );
    let rotate = code(
        client
            .rotate_key(pb::RotateKeyRequest {
                workspace_id: workspace.into(),
                key_id: target.into(),
                grace_period: None,
                ..Default::default()
            })
            .await
            .map(drop),
    );
    let revoke = code(
        client
            .revoke_key(pb::RevokeKeyRequest {
                workspace_id: workspace.into(),
                key_id: target.into(),
                ..Default::default()
            })
            .await
            .map(drop),
    );
    // Before the key revokes itself, which ends its right to call anything.
    let webhooks = code(
        client
            .list_webhooks(pb::ListWebhooksRequest {
                workspace_id: workspace.into(),
            })
            .await
            .map(drop),
    );
    // Before the key revokes itself, too. A fresh batch id per call: a replay would say nothing
    // about the caller's rights.
    static BATCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let batch = BATCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let report = code(
        client
            .report_usage(pb::ReportUsageRequest {
                workspace_id: workspace.into(),
                request_id: format!("00000000-0000-4000-8000-{batch:012}"),
                usage: vec![pb::KeyUsage {
                    key_id: target.into(),
                    requests: 1,
                    last_used_time: Some(prost_types::Timestamp {
                        seconds: 1_700_000_000,
                        nanos: 0,
                    }),
                }],
            })
            .await
            .map(drop),
    );
    let revoke_self = match own_key {
        Some(own) => code(
            client
                .revoke_key(pb::RevokeKeyRequest {
                    workspace_id: workspace.into(),
                    key_id: own.into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        None => Ok(()),
    };
    [
        issue,
        get,
        list,
        audit,
        update,
        rotate,
        revoke,
        revoke_self,
        webhooks,
        report,
    ]
}

async fn role_matrix_for_every_caller_kind(db: TestDb) {
    let mut app = spawn(&db, 0).await;
    const OK: Outcome = Ok(());
    const DENIED: Outcome = Err(Code::PermissionDenied);
    const UNAUTHENTICATED: Outcome = Err(Code::Unauthenticated);

    // (caller, token, [issue, get, list, audit, update other, rotate other, revoke other,
    // revoke self, webhooks, report usage])
    let mut rows: Vec<(String, Option<String>, [Outcome; 10])> = vec![
        (
            "admin".into(),
            Some(crate::common::ADMIN_TOKEN.into()),
            [OK, OK, OK, OK, OK, OK, OK, OK, OK, OK],
        ),
        // Callers without a key of their own have no "revoke self" to try: it reads as OK.
        (
            "anonymous".into(),
            None,
            [
                UNAUTHENTICATED,
                UNAUTHENTICATED,
                UNAUTHENTICATED,
                UNAUTHENTICATED,
                UNAUTHENTICATED,
                UNAUTHENTICATED,
                UNAUTHENTICATED,
                OK,
                UNAUTHENTICATED,
                UNAUTHENTICATED,
            ],
        ),
        (
            "garbage token".into(),
            Some("not-a-token".into()),
            [
                UNAUTHENTICATED,
                UNAUTHENTICATED,
                UNAUTHENTICATED,
                UNAUTHENTICATED,
                UNAUTHENTICATED,
                UNAUTHENTICATED,
                UNAUTHENTICATED,
                OK,
                UNAUTHENTICATED,
                UNAUTHENTICATED,
            ],
        ),
        (
            "jwt viewer".into(),
            Some(jwt_user("acme", "viewer")),
            [
                DENIED, OK, OK, OK, DENIED, DENIED, DENIED, OK, DENIED, DENIED,
            ],
        ),
        (
            "jwt developer".into(),
            Some(jwt_user("acme", "developer")),
            [OK, OK, OK, OK, OK, OK, OK, OK, OK, OK],
        ),
        (
            "jwt account_admin".into(),
            Some(jwt_user("acme", "account_admin")),
            [OK, OK, OK, OK, OK, OK, OK, OK, OK, OK],
        ),
    ];
    let mut own_keys = Vec::new();
    for (role, expected) in [
        (
            pb::Role::Viewer,
            [
                DENIED, OK, OK, OK, DENIED, DENIED, DENIED, OK, DENIED, DENIED,
            ],
        ),
        (
            pb::Role::Developer,
            [DENIED, OK, OK, OK, OK, OK, OK, OK, OK, OK],
        ),
        (
            pb::Role::AccountAdmin,
            [DENIED, OK, OK, OK, OK, OK, OK, OK, OK, OK],
        ),
    ] {
        let key = issue_key_with_role(&mut app, "acme", role).await;
        own_keys.push(Some(key_of(&key).key_id.clone()));
        rows.push((format!("api key {role:?}"), Some(key.secret), expected));
    }

    for (index, (caller, token, expected)) in rows.into_iter().enumerate() {
        // A fresh target per caller, since rotations and revocations consume it.
        let target = key_of(&app.issue("acme", "target").await).key_id.clone();
        let own = own_keys.get(index.wrapping_sub(6)).cloned().flatten();
        let mut client = keys_as(&app.channel, token.as_deref());
        let outcome = try_every_rpc(&mut client, "acme", &target, own.as_deref()).await;
        assert_eq!(
            outcome, expected,
            "{caller}: [issue, get, list, audit, update, rotate, revoke, revoke self, webhooks, report]"
        );
    }
    app.stop().await;
}

async fn no_caller_reaches_another_workspace(db: TestDb) {
    let mut app = spawn(&db, 0).await;
    let theirs = key_of(&app.issue("beta", "theirs").await).key_id.clone();
    let api_key = issue_key_with_role(&mut app, "alpha", pb::Role::AccountAdmin)
        .await
        .secret;
    for token in [jwt_user("alpha", "account_admin"), api_key] {
        let mut client = keys_as(&app.channel, Some(&token));
        // Naming the other workspace is refused outright, on every RPC.
        let outcome = try_every_rpc(&mut client, "beta", &theirs, None).await;
        assert_eq!(outcome[..7], [Err(Code::PermissionDenied); 7]);
        assert_eq!(outcome[8], Err(Code::PermissionDenied));
        assert_eq!(outcome[9], Err(Code::PermissionDenied), "report usage");
        let status = client
            .get_key(pb::GetKeyRequest {
                workspace_id: "beta".into(),
                key_id: theirs.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(reason(&status), "WORKSPACE_MISMATCH");
        // Using their key id in one's own workspace finds nothing.
        let outcome = try_every_rpc(&mut client, "", &theirs, None).await;
        assert_eq!(outcome[1], Err(Code::NotFound), "get");
        assert_eq!(outcome[4], Err(Code::NotFound), "update");
        assert_eq!(outcome[5], Err(Code::NotFound), "rotate");
        assert_eq!(outcome[6], Err(Code::NotFound), "revoke");
        // Their listing is not ours.
        let listed = client
            .list_keys(pb::ListKeysRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(listed.keys.iter().all(|key| key.workspace_id == "alpha"));
    }
    let theirs_now = app.get("beta", &theirs).await.unwrap();
    assert_eq!(theirs_now.state, pb::KeyState::Active as i32, "untouched");
    assert_eq!(theirs_now.rotated_to_key_id, "");
    app.stop().await;
}

async fn bad_jwts_are_unauthenticated(db: TestDb) {
    let mut app = spawn(&db, 0).await;
    let wrong_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("acme", "developer"),
        &EncodingKey::from_secret(b"some other secret"),
    )
    .unwrap();
    let cases = [
        (
            "expired",
            hs256(&Claims {
                exp: now() - 3600,
                nbf: now() - 7200,
                ..claims("acme", "developer")
            }),
        ),
        (
            "not yet valid",
            hs256(&Claims {
                nbf: now() + 3600,
                exp: now() + 7200,
                ..claims("acme", "developer")
            }),
        ),
        ("wrongly signed", wrong_key),
        (
            "wrong audience",
            hs256(&Claims {
                aud: Some("another-service"),
                ..claims("acme", "developer")
            }),
        ),
        (
            "wrong issuer",
            hs256(&Claims {
                iss: Some("https://evil.example"),
                ..claims("acme", "developer")
            }),
        ),
        ("unknown role", hs256(&claims("acme", "superuser"))),
        (
            // It would be written to the audit trail, and PostgreSQL cannot store NUL.
            "NUL in the subject",
            hs256(&Claims {
                sub: "user\u{0}1",
                ..claims("acme", "developer")
            }),
        ),
    ];
    for (what, token) in cases {
        let status = keys_as(&app.channel, Some(&token))
            .list_keys(pb::ListKeysRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{what}");
        assert_eq!(reason(&status), "INVALID_CREDENTIALS", "{what}");
    }
    let status = keys_as(&app.channel, None)
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "MISSING_AUTH_HEADER");
    // And a good one works.
    keys_as(&app.channel, Some(&jwt_user("acme", "viewer")))
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap();
    app.issue("acme", "k").await;
    app.stop().await;
}

async fn public_key_jwts_verify(db: TestDb) {
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut config = test_config(&db);
    config.auth.jwt = Some(JwtConfig {
        public_key_pem: Some(key_pair.public_key_pem().into_bytes()),
        ..JwtConfig::default()
    });
    let app = TestApp::spawn_with(config).await;
    let signing = EncodingKey::from_ed_pem(key_pair.serialize_pem().as_bytes()).unwrap();
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        &Claims {
            iss: None,
            aud: None,
            ..claims("acme", "developer")
        },
        &signing,
    )
    .unwrap();
    let issued = keys_as(&app.channel, Some(&token))
        .issue_key(pb::IssueKeyRequest {
            name: "from an EdDSA user".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key = issued.key.unwrap();
    assert_eq!(key.workspace_id, "acme");
    assert_eq!(key.created_by, "user:user-1");
    // An HS256 token is refused when the server expects EdDSA.
    let status = keys_as(&app.channel, Some(&jwt_user("acme", "developer")))
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    app.stop().await;
}

async fn configured_iss_and_aud_are_required(db: TestDb) {
    let without_iss = hs256(&Claims {
        iss: None,
        ..claims("acme", "viewer")
    });
    let without_aud = hs256(&Claims {
        aud: None,
        ..claims("acme", "viewer")
    });
    // A claim of the wrong type is no claim at all.
    let numeric_iss = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({
            "sub": "user-1",
            "workspace_id": "acme",
            "role": "viewer",
            "exp": now() + 600,
            "iss": 42,
            "aud": "key-authority",
        }),
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();

    // Issuer and audience configured: a token must carry both.
    let app = spawn(&db, 0).await;
    for (what, token, claim) in [
        ("no iss", &without_iss, "iss"),
        ("no aud", &without_aud, "aud"),
        ("numeric iss", &numeric_iss, "iss"),
    ] {
        let status = keys_as(&app.channel, Some(token))
            .list_keys(pb::ListKeysRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{what}");
        assert_eq!(reason(&status), "INVALID_CREDENTIALS", "{what}");
        assert_eq!(
            status.message(),
            format!("invalid credentials: the token has no valid {claim} claim"),
            "{what}"
        );
    }
    app.stop().await;

    // Control: with neither configured, the same tokens are accepted.
    let mut config = test_config(&db);
    config.auth.jwt = Some(JwtConfig {
        secret: Some(JWT_SECRET.to_owned()),
        leeway: Duration::from_secs(5),
        ..JwtConfig::default()
    });
    let app = TestApp::spawn_with(config).await;
    for token in [&without_iss, &without_aud, &numeric_iss] {
        keys_as(&app.channel, Some(token))
            .list_keys(pb::ListKeysRequest::default())
            .await
            .unwrap();
    }
    app.stop().await;
}

/// A server that trusts dashboard JWTs signed by the private half of `public_key_pem` (with the
/// issuer and audience of `claims`), checked end to end: the role a token names is the role the
/// caller gets; a token signed by another key of the same type, or without `aud`, is refused.
async fn public_key_round_trip(
    db: &TestDb,
    algorithm: Algorithm,
    public_key_pem: String,
    signing: &EncodingKey,
    impostor: &EncodingKey,
) {
    let mut config = test_config(db);
    config.auth.jwt = Some(JwtConfig {
        public_key_pem: Some(public_key_pem.into_bytes()),
        issuer: Some("https://dashboard.example".to_owned()),
        audience: Some("key-authority".to_owned()),
        leeway: Duration::from_secs(5),
        ..JwtConfig::default()
    });
    let app = TestApp::spawn_with(config).await;
    let header = Header::new(algorithm);
    let sign = |claims: &Claims<'_>, key: &EncodingKey| {
        jsonwebtoken::encode(&header, claims, key).unwrap()
    };

    let developer = sign(&claims("acme", "developer"), signing);
    let issued = keys_as(&app.channel, Some(&developer))
        .issue_key(pb::IssueKeyRequest {
            name: format!("from an {algorithm:?} user"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key = issued.key.unwrap();
    assert_eq!(key.workspace_id, "acme");
    assert_eq!(key.created_by, "user:user-1");

    let viewer = sign(&claims("acme", "viewer"), signing);
    let status = keys_as(&app.channel, Some(&viewer))
        .issue_key(pb::IssueKeyRequest {
            name: "a viewer may not".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "{algorithm:?} viewer"
    );
    assert_eq!(reason(&status), "INSUFFICIENT_ROLE", "{algorithm:?} viewer");

    let forged = sign(&claims("acme", "developer"), impostor);
    let no_audience = sign(
        &Claims {
            aud: None,
            ..claims("acme", "developer")
        },
        signing,
    );
    for (what, token) in [("another key", forged), ("no aud", no_audience)] {
        let status = keys_as(&app.channel, Some(&token))
            .list_keys(pb::ListKeysRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{algorithm:?} {what}");
        assert_eq!(
            reason(&status),
            "INVALID_CREDENTIALS",
            "{algorithm:?} {what}"
        );
    }
    app.stop().await;
}

fn p256_key_pair() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

async fn es256_public_key_jwts_verify(db: TestDb) {
    let key_pair = p256_key_pair();
    let signing = EncodingKey::from_ec_pem(key_pair.serialize_pem().as_bytes()).unwrap();
    let impostor = EncodingKey::from_ec_pem(p256_key_pair().serialize_pem().as_bytes()).unwrap();
    public_key_round_trip(
        &db,
        Algorithm::ES256,
        key_pair.public_key_pem(),
        &signing,
        &impostor,
    )
    .await;
}

/// Two 2048-bit RSA keys (the server's and an impostor's) as PKCS#8 PEM, made once per test
/// binary: RSA key generation is the slow part of these tests.
fn rsa_private_keys() -> &'static [rsa::RsaPrivateKey; 2] {
    static KEYS: OnceLock<[rsa::RsaPrivateKey; 2]> = OnceLock::new();
    KEYS.get_or_init(|| {
        let generate =
            || rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("an RSA key");
        [generate(), generate()]
    })
}

fn rsa_signing_key(key: &rsa::RsaPrivateKey) -> EncodingKey {
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
    EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap()
}

async fn rs256_public_key_jwts_verify(db: TestDb) {
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    // Off the async workers: the first caller generates the keys, the other waits for them.
    let [server_key, impostor_key] = tokio::task::spawn_blocking(rsa_private_keys).await.unwrap();
    let public_key_pem = server_key
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    public_key_round_trip(
        &db,
        Algorithm::RS256,
        public_key_pem,
        &rsa_signing_key(server_key),
        &rsa_signing_key(impostor_key),
    )
    .await;
}

async fn revoked_or_expired_api_keys_cannot_call(db: TestDb) {
    let mut app = spawn(&db, 0).await;
    let caller = issue_key_with_role(&mut app, "acme", pb::Role::Developer).await;
    let mut as_key = keys_as(&app.channel, Some(&caller.secret));
    as_key
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap();
    app.revoke("acme", &key_of(&caller).key_id).await.unwrap();
    let status = as_key
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "INVALID_CREDENTIALS");

    let expiring = issue_key_with_role(&mut app, "acme", pb::Role::Developer).await;
    app.rotate(
        "acme",
        &key_of(&expiring).key_id,
        Some(prost_types::Duration::default()),
    )
    .await
    .unwrap();
    let status = keys_as(&app.channel, Some(&expiring.secret))
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    app.stop().await;
}

async fn nobody_grants_a_role_above_their_own(db: TestDb) {
    let mut app = spawn(&db, 0).await;
    let mut developer = keys_as(&app.channel, Some(&jwt_user("acme", "developer")));
    let status = developer
        .issue_key(pb::IssueKeyRequest {
            name: "escalate".into(),
            role: pb::Role::AccountAdmin as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason(&status), "INSUFFICIENT_ROLE");
    let admin_key = issue_key_with_role(&mut app, "acme", pb::Role::AccountAdmin).await;
    let status = developer
        .rotate_key(pb::RotateKeyRequest {
            key_id: key_of(&admin_key).key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "rotating would mint an account_admin secret"
    );
    app.stop().await;
}

async fn actors_are_recorded(db: TestDb) {
    let mut app = spawn(&db, 0).await;
    let by_admin = app.issue("acme", "by admin").await;
    assert_eq!(key_of(&by_admin).created_by, "admin");
    let caller = issue_key_with_role(&mut app, "acme", pb::Role::Developer).await;
    let caller_key = key_of(&caller).clone();
    let revoked = keys_as(&app.channel, Some(&caller.secret))
        .revoke_key(pb::RevokeKeyRequest {
            key_id: key_of(&by_admin).key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(
        revoked.revoked_by,
        format!("key:{} ({})", caller_key.prefix, caller_key.name)
    );
    let mut user = keys_as(&app.channel, Some(&jwt_user("acme", "developer")));
    let issued = user
        .issue_key(pb::IssueKeyRequest {
            name: "by user".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.key.unwrap().created_by, "user:user-1");
    app.stop().await;
}

async fn issuing_is_rate_limited_per_user(db: TestDb) {
    let mut app = spawn(&db, 3).await;
    let mut user = keys_as(&app.channel, Some(&jwt_user("acme", "developer")));
    let request = || pb::IssueKeyRequest {
        name: "limited".into(),
        ..Default::default()
    };
    for _ in 0..3 {
        user.issue_key(request()).await.unwrap();
    }
    let status = user.issue_key(request()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "RATE_LIMITED");
    let delay = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("a retry delay");
    assert!(
        delay >= Duration::from_secs(60) && delay <= Duration::from_secs(20 * 60),
        "{delay:?}"
    );
    // Another user is not affected; neither are admins.
    let other = hs256(&Claims {
        sub: "user-2",
        ..claims("acme", "developer")
    });
    keys_as(&app.channel, Some(&other))
        .issue_key(request())
        .await
        .unwrap();
    for _ in 0..5 {
        app.issue("acme", "admin is exempt").await;
    }
    app.stop().await;
}

on_both_databases!(
    role_matrix_for_every_caller_kind,
    no_caller_reaches_another_workspace,
    bad_jwts_are_unauthenticated,
    public_key_jwts_verify,
    configured_iss_and_aud_are_required,
    es256_public_key_jwts_verify,
    rs256_public_key_jwts_verify,
    revoked_or_expired_api_keys_cannot_call,
    nobody_grants_a_role_above_their_own,
    actors_are_recorded,
    issuing_is_rate_limited_per_user,
);
