//! HTTP forward auth on `--http-listen`: the endpoint nginx `auth_request`, Caddy `forward_auth`
//! and Traefik `ForwardAuth` call with the original request's headers. `/auth` answers 200 with
//! the identity headers, or a refusal: its status, a JSON body, `Retry-After` where waiting helps,
//! and the body again in `x-key-authority-error` (nginx drops an auth response's body; its
//! configuration in README.md rebuilds the refusal from that header).
//!
//! The original request is read from `X-Original-URI` / `X-Forwarded-Uri` and
//! `X-Original-Method` / `X-Forwarded-Method`; the client's address from `X-Forwarded-For` only
//! when the peer is a trusted proxy. Keys in query strings are not read: URLs end up in logs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use axum::routing::{any, get};
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::field::Empty;

use super::client_address::TrustedProxies;
use super::decision::{Check, Decision, Gateway, GatewayKind, Refusal, cannot_decide};
use super::presented::presented_key;
use crate::auth::Authenticator;
use crate::error::Error;
use crate::telemetry::rpc::traced_request;

/// The header a front end sends its verify token in, when `--verify-token` is set
/// (`Authorization` carries the end user's key here).
pub const VERIFY_TOKEN_HEADER: &str = "x-key-authority-token";
/// The refusal's JSON body, repeated as a header for proxies that drop the body (nginx).
pub const ERROR_HEADER: &str = "x-key-authority-error";

/// The most names (X-Original-*, X-Forwarded-*) one request may be given; each costs a route
/// lookup.
const MAX_NAMES: usize = 8;

/// How long one check may take before it is answered 503: shorter than any proxy's timeout for
/// its auth request, so the client gets our answer rather than the proxy's 500 or 504.
const CHECK_TIME: Duration = Duration::from_secs(10);

/// What the endpoint needs.
pub struct ForwardAuth {
    pub gateway: Arc<Gateway>,
    pub auth: Arc<Authenticator>,
    pub trusted_proxies: TrustedProxies,
    /// The gRPC server's concurrency slots, shared: a flood here cannot starve VerifyKey.
    pub permits: Option<Arc<Semaphore>>,
}

/// Serves forward auth on `listener` until `shutdown` completes, then finishes open requests.
pub async fn serve(
    listener: TcpListener,
    forward_auth: Arc<ForwardAuth>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use axum::serve::ListenerExt as _;
    let app = Router::new()
        .route("/auth", any(authorize))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|| async { plain_refusal(StatusCode::NOT_FOUND, "NOT_FOUND", "no such path") })
        .with_state(forward_auth);
    // Small answers must not wait for Nagle's algorithm.
    let listener = listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    });
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    if let Err(error) = served {
        tracing::error!(%error, "HTTP gateway failed");
    }
}

async fn authorize(
    State(endpoint): State<Arc<ForwardAuth>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let make_span = || {
        tracing::info_span!(
            "gateway.check",
            otel.kind = "server",
            gateway = "forward_auth",
            gateway.code = Empty,
            trace_id = Empty,
        )
    };
    let check = async {
        let decision = endpoint.decide(peer, &method, &headers).await;
        respond(&decision, &endpoint.gateway)
    };
    traced_request("gateway.check", &headers, make_span, check).await
}

impl ForwardAuth {
    async fn decide(&self, peer: SocketAddr, method: &Method, headers: &HeaderMap) -> Decision {
        let started = std::time::Instant::now();
        let refuse = |refusal| {
            let decision = Decision::Refuse(refusal);
            self.gateway
                .count(GatewayKind::ForwardAuth, &decision, started);
            decision
        };
        let token = || header_text(headers, VERIFY_TOKEN_HEADER);
        if self.auth.check_verify_token(token).is_err() {
            return refuse(Refusal::UnknownGateway);
        }
        let _permit = match &self.permits {
            Some(permits) => match permits.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => return refuse(cannot_decide(&Error::Overloaded)),
            },
            None => None,
        };
        let routes = &self.gateway.routes;
        // nginx names the original request in X-Original-*, Caddy and Traefik in X-Forwarded-*.
        // A proxy sets its own; a client may add the others, and they pass through. So every
        // name given counts, and the request must meet all their requirements: an added name
        // can only ask for more, never for less.
        let methods = header_values(headers, ["x-original-method", "x-forwarded-method"]);
        let uris = header_values(headers, ["x-original-uri", "x-forwarded-uri"]);
        if methods.len() > MAX_NAMES || uris.len() > MAX_NAMES {
            return refuse(Refusal::Misconfigured(
                "too many X-Original-* / X-Forwarded-* values for one request",
            ));
        }
        if uris.is_empty() && routes.has_routes() {
            return refuse(Refusal::Misconfigured(
                "the proxy sent neither X-Original-URI nor X-Forwarded-Uri: routes cannot be matched",
            ));
        }
        let methods = if methods.is_empty() {
            vec![method.as_str()]
        } else {
            methods
        };
        let uris = if uris.is_empty() { vec!["/"] } else { uris };
        let requirement = routes.strictest(&methods, &uris);
        let key = presented_key(
            headers
                .get(http::header::AUTHORIZATION)
                .map(HeaderValue::as_bytes),
            headers.get(&routes.key.header).map(HeaderValue::as_bytes),
        );
        let forwarded_for = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .collect::<Vec<_>>();
        let client_ip = self
            .trusted_proxies
            .client_address(peer.ip(), forwarded_for.into_iter());
        let check = Check {
            key: key.as_ref().map(|key| key.as_str()),
            requirement: &requirement,
            client_ip: Some(client_ip),
        };
        let deadline = tokio::time::Instant::now() + CHECK_TIME;
        let decided = crate::deadline::scope(
            deadline,
            self.gateway.decide(GatewayKind::ForwardAuth, check),
        );
        match tokio::time::timeout_at(deadline, decided).await {
            Ok(decision) => decision,
            Err(_) => refuse(cannot_decide(&Error::DeadlineExceeded)),
        }
    }
}

/// Every non-empty value of these headers, in order.
fn header_values<'a, const N: usize>(headers: &'a HeaderMap, names: [&str; N]) -> Vec<&'a str> {
    names
        .into_iter()
        .flat_map(|name| headers.get_all(name))
        .filter_map(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .collect()
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
}

/// A decision as the HTTP answer the proxy relays.
fn respond(decision: &Decision, gateway: &Gateway) -> Response {
    match decision {
        Decision::Allow(identity) => {
            let mut response = Response::new(Body::empty());
            let headers = response.headers_mut();
            for (name, value) in identity.headers(&gateway.routes) {
                // Names were checked when the gateway file was read; values are ids, role and
                // environment words and scopes, all visible ASCII.
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    headers.insert(name, value);
                }
            }
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Decision::Refuse(refusal) => refused(*refusal),
    }
}

fn refused(refusal: Refusal) -> Response {
    let body = refusal.body();
    let mut response = Response::new(Body::from(body.clone()));
    *response.status_mut() =
        StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(seconds) = refusal.retry_after_seconds() {
        headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    if let Some(challenge) = refusal.www_authenticate() {
        headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    }
    // The body is JSON of fixed ASCII messages: always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&body) {
        headers.insert(HeaderName::from_static(ERROR_HEADER), value);
    }
    response
}

fn plain_refusal(status: StatusCode, code: &'static str, message: &'static str) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
