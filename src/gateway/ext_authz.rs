//! Envoy's external authorization (`envoy.service.auth.v3.Authorization/Check`), served on the
//! gRPC port, for Envoy's `ext_authz` HTTP filter and Istio's CUSTOM authorization provider.
//!
//! Every answer is a `CheckResponse`, refusals included: a gRPC error would make Envoy answer
//! with its own `status_on_error` (403 by default), turning "the authority could not decide"
//! into a refusal the client cannot tell from a bad key. Only a caller that is not an allowed
//! front end (`--verify-token`) gets a gRPC error.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    Address, Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;
use tracing::field::Empty;

use super::decision::{Check, Decision, Gateway, GatewayKind, Identity, Refusal};
use super::presented::presented_key;
use super::routes::Requirement;
use crate::auth::Authenticator;
use crate::key::{Role, Scopes};
use crate::telemetry::rpc::{context_from, join_trace};
use crate::verify::ClientIp;

pub use envoy_types::ext_authz::v3::pb::AuthorizationServer;

/// Context extensions (set per route in Envoy's `check_settings`) that override the gateway
/// file's requirement for the request.
const SCOPES_EXTENSION: &str = "scopes";
const MINIMUM_ROLE_EXTENSION: &str = "minimum_role";
const COST_EXTENSION: &str = "cost";

/// gRPC status codes of `CheckResponse.status`.
const OK: i32 = 0;
const PERMISSION_DENIED: i32 = 7;
const RESOURCE_EXHAUSTED: i32 = 8;
const INTERNAL: i32 = 13;
const UNAVAILABLE: i32 = 14;
const UNAUTHENTICATED: i32 = 16;

pub struct ExtAuthz {
    gateway: Arc<Gateway>,
    auth: Arc<Authenticator>,
}

impl ExtAuthz {
    pub fn new(gateway: Arc<Gateway>, auth: Arc<Authenticator>) -> Self {
        Self { gateway, auth }
    }

    async fn check(&self, check: &CheckRequest, envoy_traced: bool) -> Decision {
        let attributes = check.attributes.as_ref();
        let http = attributes
            .and_then(|attributes| attributes.request.as_ref())
            .and_then(|request| request.http.as_ref());
        let headers = http.map(RequestHeaders::of).unwrap_or_default();
        let routes = &self.gateway.routes;
        let key = presented_key(
            headers.get("authorization"),
            headers.get(&routes.key.header),
        );
        let extensions = attributes.map(|attributes| &attributes.context_extensions);
        let requirement = match extensions.and_then(requirement_from_extensions) {
            Some(Ok(requirement)) => requirement,
            Some(Err(reason)) => return Decision::Refuse(Refusal::Misconfigured(reason)),
            None => {
                let (method, path) =
                    http.map_or(("", "/"), |http| (http.method.as_str(), http.path.as_str()));
                routes.requirement(method, path)
            }
        };
        let client_ip = attributes
            .and_then(|attributes| attributes.source.as_ref())
            .and_then(|source| source.address.as_ref())
            .and_then(|address| match address.address.as_ref()? {
                Address::SocketAddress(socket) => ClientIp::parse(&socket.address),
                _ => None,
            });
        // Without Envoy's trace context, the checked request's own `traceparent` is the trace
        // to join, on a span of its own; otherwise the RPC span is the gateway's span.
        let text = |name| {
            headers
                .get(name)
                .and_then(|value| std::str::from_utf8(value).ok())
        };
        let request_trace = text("traceparent").filter(|_| !envoy_traced);
        let span = match request_trace {
            Some(traceparent) => {
                let span = tracing::info_span!(
                    "gateway.check",
                    gateway = "ext_authz",
                    gateway.code = Empty,
                    trace_id = Empty
                );
                join_trace(&span, context_from(Some(traceparent), text("tracestate")));
                span
            }
            None => {
                tracing::debug_span!("gateway.check", gateway = "ext_authz", gateway.code = Empty)
            }
        };
        self.gateway
            .decide(
                GatewayKind::ExtAuthz,
                Check {
                    key: key.as_ref().map(|key| key.as_str()),
                    requirement: &requirement,
                    client_ip,
                },
            )
            .instrument(span)
            .await
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        self.auth.check_verify_caller(request.metadata())?;
        // Envoy sends its own trace context in the call's metadata (the RPC span's parent).
        let envoy_traced = request.metadata().contains_key("traceparent");
        let decision = ExtAuthz::check(self, request.get_ref(), envoy_traced).await;
        Ok(Response::new(render(&decision, &self.gateway)))
    }
}

/// The checked request's headers: Envoy sends them as a map, or as a list when
/// `encode_raw_headers` is set. Names are lower case either way.
#[derive(Default)]
struct RequestHeaders<'a> {
    map: Option<&'a HashMap<String, String>>,
    raw: &'a [HeaderValue],
}

impl<'a> RequestHeaders<'a> {
    fn of(http: &'a HttpRequest) -> Self {
        Self {
            map: Some(&http.headers),
            raw: http
                .header_map
                .as_ref()
                .map_or(&[], |map| map.headers.as_slice()),
        }
    }

    fn get(&self, name: &str) -> Option<&'a [u8]> {
        if let Some(value) = self.map.and_then(|map| map.get(name)) {
            return Some(value.as_bytes());
        }
        self.raw
            .iter()
            .find(|header| header.key.eq_ignore_ascii_case(name))
            .map(|header| {
                if header.raw_value.is_empty() {
                    header.value.as_bytes()
                } else {
                    header.raw_value.as_slice()
                }
            })
    }
}

/// The requirement Envoy's route configuration sets in context extensions, if it sets any.
fn requirement_from_extensions(
    extensions: &HashMap<String, String>,
) -> Option<Result<Requirement, &'static str>> {
    let scopes = extensions.get(SCOPES_EXTENSION);
    let role = extensions.get(MINIMUM_ROLE_EXTENSION);
    let cost = extensions.get(COST_EXTENSION);
    if scopes.is_none() && role.is_none() && cost.is_none() {
        return None;
    }
    let parse = || {
        let scopes: Vec<String> = scopes
            .map(|text| {
                text.split([' ', ','])
                    .filter(|scope| !scope.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Scopes::check_required(&scopes)
            .map_err(|_| "the route's `scopes` context extension holds an invalid scope")?;
        let minimum_role = role
            .map(|name| {
                Role::from_db(name.trim()).ok_or(
                    "the route's `minimum_role` context extension is not trial, viewer, \
                     developer or account_admin",
                )
            })
            .transpose()?;
        let cost = match cost {
            Some(text) => text
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|cost| *cost >= 0)
                .ok_or("the route's `cost` context extension is not a whole number >= 0")?,
            None => 1,
        };
        Ok(Requirement {
            scopes,
            minimum_role,
            cost,
        })
    };
    Some(parse())
}

/// A decision as Envoy's `CheckResponse`.
fn render(decision: &Decision, gateway: &Gateway) -> CheckResponse {
    match decision {
        Decision::Allow(identity) => allowed(identity, gateway),
        Decision::Refuse(refusal) => denied(*refusal),
    }
}

fn allowed(identity: &Identity, gateway: &Gateway) -> CheckResponse {
    let routes = &gateway.routes;
    let headers = identity
        .headers(routes)
        .into_iter()
        // Overwrite: a client-sent `x-key-id` must never reach the upstream as ours.
        .map(|(name, value)| header(name, value, HeaderAppendAction::OverwriteIfExistsOrAdd))
        .collect();
    let headers_to_remove = if routes.key.strip {
        vec!["authorization".to_owned(), routes.key.header.clone()]
    } else {
        Vec::new()
    };
    CheckResponse {
        status: Some(rpc::Status {
            code: OK,
            ..rpc::Status::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove,
            ..OkHttpResponse::default()
        })),
        ..CheckResponse::default()
    }
}

fn denied(refusal: Refusal) -> CheckResponse {
    let mut headers = vec![header(
        "content-type",
        "application/json",
        HeaderAppendAction::OverwriteIfExistsOrAdd,
    )];
    if let Some(seconds) = refusal.retry_after_seconds() {
        headers.push(header(
            "retry-after",
            &seconds.to_string(),
            HeaderAppendAction::OverwriteIfExistsOrAdd,
        ));
    }
    if let Some(challenge) = refusal.www_authenticate() {
        headers.push(header(
            "www-authenticate",
            challenge,
            HeaderAppendAction::OverwriteIfExistsOrAdd,
        ));
    }
    let code = match refusal.status() {
        401 => UNAUTHENTICATED,
        402 | 403 => PERMISSION_DENIED,
        429 => RESOURCE_EXHAUSTED,
        503 => UNAVAILABLE,
        _ => INTERNAL,
    };
    CheckResponse {
        status: Some(rpc::Status {
            code,
            message: refusal.message().to_owned(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(refusal.status()),
            }),
            headers,
            body: refusal.body(),
        })),
        ..CheckResponse::default()
    }
}

fn header(name: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    #[allow(deprecated)] // `append` is deprecated in favour of `append_action`; left unset.
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_owned(),
            value: value.to_owned(),
            raw_value: Vec::new(),
        }),
        append: None,
        append_action: action.into(),
        // An empty scopes header still replaces one the client sent.
        keep_empty_value: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extensions(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn context_extensions_set_the_requirement() {
        assert_eq!(requirement_from_extensions(&extensions(&[])), None);
        let requirement = requirement_from_extensions(&extensions(&[
            ("scopes", "billing:read, billing:write"),
            ("minimum_role", "developer"),
            ("cost", "3"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(requirement.scopes, ["billing:read", "billing:write"]);
        assert_eq!(requirement.minimum_role, Some(Role::Developer));
        assert_eq!(requirement.cost, 3);
        for bad in [
            &[("scopes", "not a scope!")][..],
            &[("minimum_role", "owner")],
            &[("cost", "-1")],
            &[("cost", "many")],
        ] {
            assert!(
                matches!(requirement_from_extensions(&extensions(bad)), Some(Err(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_refusal_is_a_denied_response_never_an_error() {
        let response = denied(Refusal::Locked(std::time::Duration::from_millis(1500)));
        assert_eq!(response.status.as_ref().unwrap().code, RESOURCE_EXHAUSTED);
        let Some(HttpResponse::DeniedResponse(denied)) = response.http_response else {
            panic!("a denied response");
        };
        assert_eq!(denied.status.unwrap().code, 429);
        let headers: Vec<(String, String)> = denied
            .headers
            .into_iter()
            .map(|option| {
                let header = option.header.unwrap();
                (header.key, header.value)
            })
            .collect();
        assert!(headers.contains(&("retry-after".to_owned(), "2".to_owned())));
        assert!(denied.body.contains("BRUTE_FORCE_LOCKOUT"));
    }
}
