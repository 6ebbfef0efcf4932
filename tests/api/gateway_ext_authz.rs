//! Envoy ext_authz: `envoy.service.auth.v3.Authorization/Check` on the gRPC port, called with a
//! client generated from Envoy's own protos (the envoy-types crate), as Envoy's ext_authz filter
//! and Istio's CUSTOM provider call it.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::{
    Address, HeaderMap, HeaderValue, HeaderValueOption, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use key_authority::gateway::GatewayRoutes;
use key_authority::pb;
use serde_json::Value;
use tonic::transport::Channel;

use crate::common::{TestApp, TestDb, key_of, on_both_databases, test_config};
use crate::verify::forge_numbered;

const WORKSPACE: &str = "acme";

/// What Envoy's ext_authz filter sends for one request.
#[derive(Default)]
struct Checked<'a> {
    method: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, String)>,
    client: &'a str,
    extensions: Vec<(&'a str, &'a str)>,
    /// Headers as Envoy sends them with `encode_raw_headers`: a list of raw values.
    raw: bool,
}

impl<'a> Checked<'a> {
    fn get(path: &'a str) -> Self {
        Self {
            method: "GET",
            path,
            client: "198.51.100.7",
            ..Self::default()
        }
    }

    fn bearer(mut self, key: &str) -> Self {
        self.headers
            .push(("authorization", format!("Bearer {key}")));
        self
    }

    fn request(self) -> CheckRequest {
        let mut headers: HashMap<String, String> = self
            .headers
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect();
        headers.insert(":path".into(), self.path.into());
        let (headers, header_map) = if self.raw {
            let raw = headers
                .into_iter()
                .map(|(key, value)| HeaderValue {
                    key,
                    raw_value: value.into_bytes(),
                    ..HeaderValue::default()
                })
                .collect();
            (HashMap::new(), Some(HeaderMap { headers: raw }))
        } else {
            (headers, None)
        };
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: Some(Address {
                        address: Some(AddressKind::SocketAddress(SocketAddress {
                            address: self.client.into(),
                            ..SocketAddress::default()
                        })),
                    }),
                    ..Peer::default()
                }),
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: self.method.into(),
                        path: self.path.into(),
                        headers,
                        header_map,
                        ..HttpRequest::default()
                    }),
                    ..Request::default()
                }),
                context_extensions: self
                    .extensions
                    .into_iter()
                    .map(|(name, value)| (name.to_owned(), value.to_owned()))
                    .collect(),
                ..AttributeContext::default()
            }),
        }
    }
}

fn client(app: &TestApp) -> AuthorizationClient<Channel> {
    AuthorizationClient::new(app.channel.clone())
}

async fn check(app: &TestApp, checked: Checked<'_>) -> CheckResponse {
    client(app)
        .check(checked.request())
        .await
        .expect("Check answers every request with a CheckResponse")
        .into_inner()
}

fn ok_response(response: &CheckResponse) -> &OkHttpResponse {
    assert_eq!(response.status.as_ref().unwrap().code, 0, "{response:?}");
    match &response.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok,
        other => panic!("an OK response, not {other:?}"),
    }
}

/// (HTTP status, code from the JSON body, headers) of a denied response, with its gRPC code.
fn denied(response: &CheckResponse, grpc_code: i32) -> (i32, String, HashMap<String, String>) {
    assert_eq!(
        response.status.as_ref().unwrap().code,
        grpc_code,
        "{response:?}"
    );
    let Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
        status,
        headers,
        body,
    })) = &response.http_response
    else {
        panic!("a denied response, not {response:?}");
    };
    let body: Value = serde_json::from_str(body).unwrap();
    (
        status.as_ref().unwrap().code,
        body["error"]["code"].as_str().unwrap().to_owned(),
        header_map(headers),
    )
}

fn header_map(headers: &[HeaderValueOption]) -> HashMap<String, String> {
    headers
        .iter()
        .map(|option| {
            let header = option.header.as_ref().unwrap();
            (header.key.clone(), header.value.clone())
        })
        .collect()
}

async fn issue(app: &mut TestApp, scopes: &[&str]) -> (String, pb::Key) {
    let issued = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: WORKSPACE.into(),
            name: "behind envoy".into(),
            scopes: scopes.iter().map(|scope| (*scope).to_owned()).collect(),
            ..Default::default()
        })
        .await;
    (issued.secret.clone(), key_of(&issued).clone())
}

async fn a_valid_key_reaches_the_upstream_with_its_identity_and_without_the_key(db: TestDb) {
    let mut app = TestApp::spawn(&db).await;
    let (secret, key) = issue(&mut app, &["orders:read"]).await;
    let response = check(&app, Checked::get("/v1/orders").bearer(&secret)).await;
    let ok = ok_response(&response);
    let headers = header_map(&ok.headers);
    assert_eq!(headers["x-key-id"], key.key_id);
    assert_eq!(headers["x-key-workspace"], WORKSPACE);
    assert_eq!(headers["x-key-role"], "developer");
    assert_eq!(headers["x-key-environment"], "live");
    assert_eq!(headers["x-key-scopes"], "orders:read");
    // Overwritten, so a client's own x-key-id never reaches the upstream as ours.
    for option in &ok.headers {
        assert_eq!(option.append_action, 2, "OVERWRITE_IF_EXISTS_OR_ADD");
    }
    assert_eq!(ok.headers_to_remove, ["authorization", "x-api-key"]);

    // The API key header and Envoy's raw header encoding work as well.
    let mut from_header = Checked::get("/v1/orders");
    from_header.headers.push(("x-api-key", secret.clone()));
    ok_response(&check(&app, from_header).await);
    let raw = Checked {
        raw: true,
        ..Checked::get("/v1/orders").bearer(&secret)
    };
    let response = check(&app, raw).await;
    assert_eq!(
        header_map(&ok_response(&response).headers)["x-key-id"],
        key.key_id
    );
    app.stop().await;
}

async fn refusals_are_denied_responses_with_status_code_and_body(db: TestDb) {
    let mut config = test_config(&db);
    config.gateway.routes = GatewayRoutes::parse(
        r#"
        [[route]]
        prefix = "/v1/orders"
        methods = ["POST"]
        scopes = ["orders:write"]
        "#,
    )
    .unwrap();
    config.verify.lockout.ip_failures = 2;
    let mut app = TestApp::spawn_with(config).await;
    let (secret, key) = issue(&mut app, &["orders:read"]).await;

    let (status, code, headers) = denied(&check(&app, Checked::get("/v1/orders")).await, 16);
    assert_eq!((status, code.as_str()), (401, "MISSING_AUTH_HEADER"));
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert_eq!(headers["content-type"], "application/json");

    let post = Checked {
        method: "POST",
        ..Checked::get("/v1/orders/17")
    };
    let (status, code, _) = denied(&check(&app, post.bearer(&secret)).await, 7);
    assert_eq!((status, code.as_str()), (403, "INSUFFICIENT_SCOPE"));

    // Context extensions (Envoy's per-route check_settings) set the requirement instead.
    let mut extended = Checked::get("/anything").bearer(&secret);
    extended.extensions = vec![("minimum_role", "account_admin")];
    let (status, code, _) = denied(&check(&app, extended).await, 7);
    assert_eq!((status, code.as_str()), (403, "INSUFFICIENT_ROLE"));
    let mut extended = Checked::get("/v1/orders").bearer(&secret);
    extended.extensions = vec![("scopes", "orders:read")];
    ok_response(&check(&app, extended).await);
    let mut misconfigured = Checked::get("/").bearer(&secret);
    misconfigured.extensions = vec![("cost", "lots")];
    let (status, code, _) = denied(&check(&app, misconfigured).await, 13);
    assert_eq!((status, code.as_str()), (500, "GATEWAY_MISCONFIGURED"));

    // The client address from Envoy's source attribute feeds the IP lockout.
    for n in 1..=2 {
        let guess = Checked {
            client: "203.0.113.66",
            ..Checked::get("/").bearer(&forge_numbered(&key.prefix, n))
        };
        let (status, code, _) = denied(&check(&app, guess).await, 16);
        assert_eq!((status, code.as_str()), (401, "INVALID_API_KEY"));
    }
    let locked = Checked {
        client: "203.0.113.66",
        ..Checked::get("/").bearer(&forge_numbered(&key.prefix, 3))
    };
    let (status, code, headers) = denied(&check(&app, locked).await, 8);
    assert_eq!((status, code.as_str()), (429, "BRUTE_FORCE_LOCKOUT"));
    assert!(headers["retry-after"].parse::<u64>().unwrap() >= 1);
    // Another client is not locked out; the key's proven secret passes anyway.
    ok_response(&check(&app, Checked::get("/").bearer(&secret)).await);

    // Revoked: refused on the very next check.
    app.revoke(WORKSPACE, &key.key_id).await.unwrap();
    let (status, code, _) = denied(&check(&app, Checked::get("/").bearer(&secret)).await, 16);
    assert_eq!((status, code.as_str()), (401, "INVALID_API_KEY"));
    app.stop().await;
}

async fn only_configured_front_ends_may_check(db: TestDb) {
    let mut config = test_config(&db);
    config.auth.verify_tokens = vec!["envoy-verify-token".into()];
    let mut app = TestApp::spawn_with(config).await;
    let (secret, _) = issue(&mut app, &[]).await;
    let status = client(&app)
        .check(Checked::get("/").bearer(&secret).request())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let mut request = tonic::Request::new(Checked::get("/").bearer(&secret).request());
    request.metadata_mut().insert(
        "authorization",
        "Bearer envoy-verify-token".parse().unwrap(),
    );
    let response = client(&app).check(request).await.unwrap().into_inner();
    ok_response(&response);
    app.stop().await;
}

on_both_databases!(
    a_valid_key_reaches_the_upstream_with_its_identity_and_without_the_key,
    refusals_are_denied_responses_with_status_code_and_body,
    only_configured_front_ends_may_check,
);
