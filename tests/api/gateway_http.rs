//! HTTP forward auth (`--http-listen`), called directly as nginx, Caddy and Traefik call it: the
//! original request's headers in, 200 with the identity headers or a refusal of README's table
//! out. The real proxies in front of it are in `gateway_proxies`.

use std::net::SocketAddr;

use key_authority::config::Config;
use key_authority::gateway::{GatewayRoutes, TrustedProxies};
use key_authority::key::UnprovenBudget;
use key_authority::pb;
use key_authority::verify::LockoutConfig;
use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{TestApp, TestDb, key_of, on_both_databases, test_config};
use crate::observability::{samples, scrape};
use crate::verify::forge_numbered;

const WORKSPACE: &str = "acme";

const GATEWAY_FILE: &str = r#"
[[route]]
prefix = "/v1/billing"
methods = ["POST"]
scopes = ["billing:write"]

[[route]]
prefix = "/v1/billing"
scopes = ["billing:read"]

[[route]]
prefix = "/v1/admin"
minimum_role = "account_admin"
"#;

fn gateway_config(db: &TestDb) -> Config {
    let mut config = test_config(db);
    config.gateway.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.gateway.routes = GatewayRoutes::parse(GATEWAY_FILE).unwrap();
    config
}

/// A forward-auth call as a proxy makes it.
struct Call<'a> {
    headers: Vec<(&'a str, String)>,
}

impl<'a> Call<'a> {
    /// As nginx names the original request (`X-Original-URI`, `X-Original-Method`).
    fn to(method: &'a str, uri: &'a str) -> Self {
        Self {
            headers: vec![
                ("x-original-method", method.to_owned()),
                ("x-original-uri", uri.to_owned()),
            ],
        }
    }

    /// As Caddy and Traefik name it (`X-Forwarded-Method`, `X-Forwarded-Uri`).
    fn forwarded(method: &'a str, uri: &'a str) -> Self {
        Self {
            headers: vec![
                ("x-forwarded-method", method.to_owned()),
                ("x-forwarded-uri", uri.to_owned()),
            ],
        }
    }

    fn bearer(self, key: &str) -> Self {
        self.header("authorization", format!("Bearer {key}"))
    }

    fn header(mut self, name: &'a str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|value| value.to_str().unwrap())
    }

    /// The refusal's code, checked against the copy in `x-key-authority-error`.
    fn code(&self) -> String {
        let body: Value = serde_json::from_str(&self.body).expect("a JSON body");
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert_eq!(
            self.header("x-key-authority-error"),
            Some(self.body.as_str()),
            "the body, repeated for nginx"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        body["error"]["code"].as_str().unwrap().to_owned()
    }
}

async fn call(app: &TestApp, call: Call<'_>) -> Answer {
    let address = app.server.http_addr.expect("forward auth listens");
    let mut request = reqwest::Client::new().get(format!("http://{address}/auth"));
    for (name, value) in call.headers {
        request = request.header(name, value);
    }
    let response = request.send().await.expect("forward auth answers");
    Answer {
        status: response.status(),
        headers: response.headers().clone(),
        body: response.text().await.unwrap(),
    }
}

async fn issue(app: &mut TestApp, request: pb::IssueKeyRequest) -> (String, pb::Key) {
    let issued = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: WORKSPACE.into(),
            name: if request.name.is_empty() {
                "gateway key".into()
            } else {
                request.name.clone()
            },
            ..request
        })
        .await;
    (issued.secret.clone(), key_of(&issued).clone())
}

async fn a_valid_key_passes_with_its_identity(db: TestDb) {
    let mut config = gateway_config(&db);
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let mut app = TestApp::spawn_with(config).await;
    let (secret, key) = issue(
        &mut app,
        pb::IssueKeyRequest {
            name: "billing reader".into(),
            scopes: vec!["billing:read".into(), "reports:read".into()],
            environment: pb::Environment::Test as i32,
            role: pb::Role::Viewer as i32,
            ..Default::default()
        },
    )
    .await;

    let allowed = call(
        &app,
        Call::to("GET", "/v1/billing/invoices?limit=5").bearer(&secret),
    )
    .await;
    assert_eq!(allowed.status, StatusCode::OK, "{}", allowed.body);
    assert_eq!(allowed.header("x-key-id"), Some(key.key_id.as_str()));
    assert_eq!(allowed.header("x-key-workspace"), Some(WORKSPACE));
    assert_eq!(allowed.header("x-key-role"), Some("viewer"));
    assert_eq!(allowed.header("x-key-environment"), Some("test"));
    assert_eq!(
        allowed.header("x-key-scopes"),
        Some("billing:read reports:read")
    );
    assert_eq!(allowed.header("cache-control"), Some("no-store"));
    assert_eq!(allowed.body, "");

    // Every place a key may be: bare, the API key header, Basic with an empty password.
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{secret}:"));
    for request in [
        Call::to("GET", "/").header("authorization", secret.clone()),
        Call::to("GET", "/").header("x-api-key", secret.clone()),
        Call::to("GET", "/").header("authorization", format!("Basic {basic}")),
    ] {
        let answer = call(&app, request).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert_eq!(answer.header("x-key-id"), Some(key.key_id.as_str()));
    }
    // The identity headers are ours, whatever the request sent.
    let forged = call(
        &app,
        Call::to("GET", "/")
            .bearer(&secret)
            .header("x-key-workspace", "someone-else"),
    )
    .await;
    assert_eq!(forged.header("x-key-workspace"), Some(WORKSPACE));

    let missing = call(&app, Call::to("GET", "/")).await;
    assert_eq!(missing.code(), "MISSING_AUTH_HEADER");

    // Counted as gateway checks, and the verdicts as VerifyKey's.
    let samples = samples(&scrape(app.server.metrics_addr.unwrap()).await);
    let get = |name: &str| samples.get(name).copied().unwrap_or_default();
    assert_eq!(
        get(r#"key_authority_gateway_requests_total{gateway="forward_auth",code="OK"}"#),
        5.0
    );
    assert_eq!(
        get(
            r#"key_authority_gateway_requests_total{gateway="forward_auth",code="MISSING_AUTH_HEADER"}"#
        ),
        1.0
    );
    assert_eq!(
        get(r#"key_authority_verify_verdicts_total{code="VERIFY_CODE_VALID"}"#),
        5.0
    );
    // ... and the key's usage like any verification's.
    app.server.verifier.usage().flush().await.unwrap();
    let used = app.get(WORKSPACE, &key.key_id).await.unwrap();
    assert_eq!(used.total_requests, 5);
    assert!(used.last_used_time.is_some());
    app.stop().await;
}

async fn every_refusal_has_its_status_and_code(db: TestDb) {
    let mut config = gateway_config(&db);
    config.trial.usage_limit = 1;
    let mut app = TestApp::spawn_with(config).await;
    let (reader, reader_key) = issue(
        &mut app,
        pb::IssueKeyRequest {
            name: "reader".into(),
            scopes: vec!["billing:read".into()],
            ..Default::default()
        },
    )
    .await;

    // 401 MISSING_AUTH_HEADER, with a Bearer challenge.
    let missing = call(&app, Call::to("GET", "/v1/billing")).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.code(), "MISSING_AUTH_HEADER");
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    assert_eq!(missing.header("retry-after"), None);

    // 401 INVALID_API_KEY: malformed, unknown, revoked.
    for key in ["not-a-key", &forge_numbered(&reader_key.prefix, 1)] {
        let invalid = call(&app, Call::to("GET", "/v1/billing").bearer(key)).await;
        assert_eq!(invalid.status, StatusCode::UNAUTHORIZED, "{key}");
        assert_eq!(invalid.code(), "INVALID_API_KEY");
        assert_eq!(
            invalid.header("www-authenticate"),
            Some("Bearer error=\"invalid_token\"")
        );
    }

    // 403 INSUFFICIENT_SCOPE: the POST route wants billing:write.
    let scope = call(
        &app,
        Call::to("POST", "/v1/billing/charges").bearer(&reader),
    )
    .await;
    assert_eq!(scope.status, StatusCode::FORBIDDEN);
    assert_eq!(scope.code(), "INSUFFICIENT_SCOPE");
    assert_eq!(
        scope.header("www-authenticate"),
        Some("Bearer error=\"insufficient_scope\"")
    );
    // The same through Caddy's and Traefik's headers.
    let scope = call(
        &app,
        Call::forwarded("POST", "/v1/billing/charges").bearer(&reader),
    )
    .await;
    assert_eq!(scope.code(), "INSUFFICIENT_SCOPE");
    let read = call(&app, Call::forwarded("GET", "/v1/billing").bearer(&reader)).await;
    assert_eq!(read.status, StatusCode::OK);
    // A client that names another path beside the proxy's (Caddy passes a client's
    // X-Original-URI through, nginx a client's X-Forwarded-Uri) only adds requirements.
    let smuggled = call(
        &app,
        Call::forwarded("POST", "/v1/billing/charges")
            .header("x-original-uri", "/v1/public")
            .header("x-original-method", "GET")
            .bearer(&reader),
    )
    .await;
    assert_eq!(smuggled.status, StatusCode::FORBIDDEN);
    assert_eq!(smuggled.code(), "INSUFFICIENT_SCOPE");
    // A proxy that names no path cannot be matched against routes.
    let unnamed = call(
        &app,
        Call {
            headers: Vec::new(),
        }
        .bearer(&reader),
    )
    .await;
    assert_eq!(unnamed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(unnamed.code(), "GATEWAY_MISCONFIGURED");
    // ... and a spelling of the path cannot dodge the route.
    let dodge = call(
        &app,
        Call::to("POST", "/v1/reports/..%2F..%2Fv1/billing/charges").bearer(&reader),
    )
    .await;
    assert_eq!(dodge.status, StatusCode::FORBIDDEN);
    assert_eq!(dodge.code(), "INSUFFICIENT_SCOPE");

    // 403 INSUFFICIENT_ROLE: /v1/admin wants an account admin; the key is a developer.
    // ... however the path is spelt for servers that drop path parameters, format suffixes or
    // case.
    for path in [
        "/v1/admin/users",
        "/v1/admin;x=1/users",
        "/v1/admin.json",
        "/V1/Admin/users",
    ] {
        let role = call(&app, Call::to("GET", path).bearer(&reader)).await;
        assert_eq!(role.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(role.code(), "INSUFFICIENT_ROLE", "{path}");
    }

    // 429 USAGE_EXHAUSTED: a key of one use, used.
    let (limited, _) = issue(
        &mut app,
        pb::IssueKeyRequest {
            name: "one use".into(),
            usage_limit: 1,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        call(&app, Call::to("GET", "/").bearer(&limited))
            .await
            .status,
        StatusCode::OK
    );
    let exhausted = call(&app, Call::to("GET", "/").bearer(&limited)).await;
    assert_eq!(exhausted.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(exhausted.code(), "USAGE_EXHAUSTED");
    assert_eq!(exhausted.header("retry-after"), None);

    // 402 TRIAL_OPS_EXHAUSTED: a trial key (one operation here), used.
    let trial = app
        .keys
        .issue_trial_key(pb::IssueTrialKeyRequest::default())
        .await
        .unwrap()
        .into_inner()
        .secret;
    assert_eq!(
        call(&app, Call::to("GET", "/").bearer(&trial)).await.status,
        StatusCode::OK
    );
    let trial_over = call(&app, Call::to("GET", "/").bearer(&trial)).await;
    assert_eq!(trial_over.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(trial_over.code(), "TRIAL_OPS_EXHAUSTED");

    // 401 INVALID_API_KEY for a revoked key, on the very next request.
    assert_eq!(
        call(&app, Call::to("GET", "/").bearer(&reader))
            .await
            .status,
        StatusCode::OK
    );
    app.revoke(WORKSPACE, &reader_key.key_id).await.unwrap();
    let revoked = call(&app, Call::to("GET", "/").bearer(&reader)).await;
    assert_eq!(revoked.status, StatusCode::UNAUTHORIZED);
    assert_eq!(revoked.code(), "INVALID_API_KEY");
    assert!(revoked.body.contains("revoked"), "{}", revoked.body);
    app.stop().await;
}

async fn lockouts_are_429_with_retry_after(db: TestDb) {
    let mut config = gateway_config(&db);
    config.verify.lockout.key_failures = 3;
    let mut app = TestApp::spawn_with(config).await;
    let (_, key) = issue(&mut app, pb::IssueKeyRequest::default()).await;
    for n in 1..=3 {
        let guess = call(
            &app,
            Call::to("GET", "/").bearer(&forge_numbered(&key.prefix, n)),
        )
        .await;
        assert_eq!(guess.code(), "INVALID_API_KEY", "guess {n}");
    }
    let locked = call(
        &app,
        Call::to("GET", "/").bearer(&forge_numbered(&key.prefix, 4)),
    )
    .await;
    assert_eq!(locked.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(locked.code(), "BRUTE_FORCE_LOCKOUT");
    // The lockout's remaining time in whole seconds, rounded up: at most its duration.
    let wait: u64 = locked.header("retry-after").unwrap().parse().unwrap();
    let duration = LockoutConfig::default().duration.as_secs();
    assert!(wait > duration - 60 && wait <= duration, "{wait}");
    app.stop().await;
}

/// X-Forwarded-For counts only from a trusted proxy: the lockout falls on the client's address
/// the proxy saw, not on the proxy, and a client cannot pick another address to dodge it.
async fn forwarded_for_is_believed_only_from_trusted_proxies(db: TestDb) {
    let mut config = gateway_config(&db);
    config.verify.lockout.ip_failures = 2;
    config.gateway.trusted_proxies = TrustedProxies::parse("127.0.0.1").unwrap();
    let mut app = TestApp::spawn_with(config).await;
    let (secret, _) = issue(&mut app, pb::IssueKeyRequest::default()).await;
    let attacker = "203.0.113.66";
    for _ in 0..2 {
        let guess = call(
            &app,
            Call::to("GET", "/")
                .bearer("ka_live_unknown")
                .header("x-forwarded-for", attacker),
        )
        .await;
        assert_eq!(guess.code(), "INVALID_API_KEY");
    }
    // The attacker's address is locked, even with a valid (cold) key, and whatever it writes
    // to the left of the address the proxy appended.
    let locked = call(
        &app,
        Call::to("GET", "/")
            .bearer(&secret)
            .header("x-forwarded-for", format!("198.51.100.1, {attacker}")),
    )
    .await;
    assert_eq!(locked.code(), "BRUTE_FORCE_LOCKOUT");
    // Another client behind the same proxy is not.
    let other = call(
        &app,
        Call::to("GET", "/")
            .bearer(&secret)
            .header("x-forwarded-for", "198.51.100.2"),
    )
    .await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.body);
    app.stop().await;
}

async fn an_undecidable_check_is_503_never_401(db: TestDb) {
    let mut config = gateway_config(&db);
    // No argon2 for secrets nobody has proven: a cold key cannot be decided.
    config.argon2_unproven = UnprovenBudget {
        per_second: 0,
        queue_depth: 0,
    };
    let mut app = TestApp::spawn_with(config).await;
    let (secret, _) = issue(&mut app, pb::IssueKeyRequest::default()).await;
    let busy = call(&app, Call::to("GET", "/").bearer(&secret)).await;
    assert_eq!(busy.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(busy.code(), "UNAVAILABLE");
    let wait: u64 = busy.header("retry-after").unwrap().parse().unwrap();
    assert!(wait >= 1, "{wait}");
    assert_eq!(busy.header("www-authenticate"), None);
    app.stop().await;
}

async fn front_ends_prove_themselves_when_verify_tokens_are_set(db: TestDb) {
    let mut config = gateway_config(&db);
    config.auth.verify_tokens = vec!["gateway-verify-token".into()];
    let mut app = TestApp::spawn_with(config).await;
    let (secret, _) = issue(&mut app, pb::IssueKeyRequest::default()).await;
    for token in [None, Some("wrong-token")] {
        let mut request = Call::to("GET", "/").bearer(&secret);
        if let Some(token) = token {
            request = request.header("x-key-authority-token", token);
        }
        let refused = call(&app, request).await;
        assert_eq!(
            refused.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{token:?}"
        );
        assert_eq!(refused.code(), "GATEWAY_MISCONFIGURED");
        assert_eq!(refused.header("www-authenticate"), None);
    }
    let allowed = call(
        &app,
        Call::to("GET", "/")
            .bearer(&secret)
            .header("x-key-authority-token", "gateway-verify-token"),
    )
    .await;
    assert_eq!(allowed.status, StatusCode::OK);
    app.stop().await;
}

async fn the_listener_answers_only_its_paths(db: TestDb) {
    let app = TestApp::spawn_with(gateway_config(&db)).await;
    let address = app.server.http_addr.unwrap();
    let client = reqwest::Client::new();
    let health = client
        .get(format!("http://{address}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let other = client
        .get(format!("http://{address}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::NOT_FOUND);
    // Any method: Traefik forwards the original one.
    let post = client
        .post(format!("http://{address}/auth"))
        .header("x-forwarded-uri", "/")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::UNAUTHORIZED);
    app.stop().await;
}

on_both_databases!(
    a_valid_key_passes_with_its_identity,
    every_refusal_has_its_status_and_code,
    lockouts_are_429_with_retry_after,
    forwarded_for_is_believed_only_from_trusted_proxies,
    an_undecidable_check_is_503_never_401,
    front_ends_prove_themselves_when_verify_tokens_are_set,
    the_listener_answers_only_its_paths,
);
