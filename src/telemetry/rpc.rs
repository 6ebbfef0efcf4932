//! A tower layer around every gRPC call: the RPC span (a child of the caller's span, from the W3C
//! `traceparent` / `tracestate` metadata), and the RPC count and latency by method and status
//! code. It is built once; per call it costs a header lookup, a span and a clock read.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::Frame;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tower::{Layer, Service};
use tracing::Instrument as _;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct RpcLayer {
    metrics: Arc<Metrics>,
}

impl RpcLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RpcService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = known_method(request.uri().path());
        let parent = caller_context(request.headers());
        let exported = super::sampling::decide(&parent, method, log_only_trace_id);
        let span = super::sampling::sync_scope(exported, || rpc_span(method, parent));
        let started = Instant::now();
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let future = super::sampling::scope(exported, future);
        let metrics = self.metrics.clone();
        let outcome = Outcome {
            metrics,
            method,
            started,
            code: CANCELLED,
            span: span.clone(),
        };
        Box::pin(
            async move {
                let response = future.await?;
                let mut outcome = outcome;
                // Errors usually come "trailers-only": the status is in the headers.
                if let Some(code) = grpc_status(response.headers()) {
                    outcome.code = code;
                    drop(outcome);
                    return Ok(response.map(|body| MeteredBody {
                        body,
                        outcome: None,
                    }));
                }
                Ok(response.map(|body| MeteredBody {
                    body,
                    outcome: Some(outcome),
                }))
            }
            .instrument(span),
        )
    }
}

/// Records the call when dropped: once its status is known, or with CANCELLED if the response
/// was abandoned first.
struct Outcome {
    metrics: Arc<Metrics>,
    method: &'static str,
    started: Instant,
    /// The numeric gRPC status code.
    code: i32,
    span: tracing::Span,
}

const CANCELLED: i32 = 1;
const UNKNOWN: i32 = 2;

impl Drop for Outcome {
    fn drop(&mut self) {
        self.span.record("rpc.grpc.status_code", self.code);
        self.metrics
            .record_rpc(self.method, code_name(self.code), self.started.elapsed());
    }
}

pin_project_lite::pin_project! {
    /// The response body, watched for the trailers that carry the gRPC status.
    pub struct MeteredBody<B> {
        #[pin]
        body: B,
        outcome: Option<Outcome>,
    }
}

impl<B: http_body::Body> http_body::Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
            && let Some(mut outcome) = this.outcome.take()
        {
            outcome.code = grpc_status(trailers).unwrap_or(UNKNOWN);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Runs a non-gRPC server request (the HTTP gateway) like an RPC: a server span named `name`,
/// child of the caller's span from its W3C headers, under the same export decision, with the
/// trace id as a field. `make_span` creates the span (it must declare `trace_id`).
pub fn traced_request<F: std::future::Future>(
    name: &'static str,
    headers: &http::HeaderMap,
    make_span: impl FnOnce() -> tracing::Span,
    future: F,
) -> impl std::future::Future<Output = F::Output> {
    let parent = caller_context(headers);
    let exported = super::sampling::decide(&parent, name, log_only_trace_id);
    let span = super::sampling::sync_scope(exported, || {
        let span = make_span();
        join_trace(&span, parent);
        span
    });
    super::sampling::scope(exported, future.instrument(span))
}

/// Makes `parent` (a caller's context) the parent of `span`, when it has one, and records the
/// trace id `span` belongs to. Used where the caller's context arrives inside the request (the
/// HTTP headers an Envoy ext_authz check carries) rather than in the call's own metadata.
pub fn join_trace(span: &tracing::Span, parent: opentelemetry::Context) {
    if span.is_disabled() {
        return;
    }
    let parent_trace = parent.span().span_context().trace_id();
    if parent_trace != TraceId::INVALID {
        let _ = span.set_parent(parent);
    }
    let exported_trace = span.context().span().span_context().trace_id();
    let trace_id = [exported_trace, parent_trace]
        .into_iter()
        .find(|id| *id != TraceId::INVALID)
        .unwrap_or_else(log_only_trace_id);
    span.record("trace_id", tracing::field::display(trace_id));
}

/// The trace context a `traceparent` / `tracestate` pair names; empty when none is valid.
pub fn context_from(traceparent: Option<&str>, tracestate: Option<&str>) -> opentelemetry::Context {
    let mut headers = http::HeaderMap::new();
    for (name, value) in [("traceparent", traceparent), ("tracestate", tracestate)] {
        if let Some(value) = value.and_then(|value| http::HeaderValue::from_str(value).ok()) {
            headers.insert(name, value);
        }
    }
    caller_context(&headers)
}

/// The caller's trace context, from the W3C `traceparent` / `tracestate` metadata.
fn caller_context(headers: &http::HeaderMap) -> opentelemetry::Context {
    if headers.contains_key("traceparent") {
        TraceContextPropagator::new().extract(&HeaderExtractor(headers))
    } else {
        opentelemetry::Context::new()
    }
}

/// The RPC span, following OpenTelemetry's RPC semantic conventions, with the caller's span as
/// its parent and the trace id as a field, so every log line inside the call carries it.
fn rpc_span(method: &'static str, parent: opentelemetry::Context) -> tracing::Span {
    let (service, rpc) = method
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("unknown", "unknown"));
    let span = tracing::info_span!(
        "rpc",
        otel.name = method.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = rpc,
        rpc.grpc.status_code = Empty,
        trace_id = Empty,
        // VerifyKey answered from state the database could not confirm (`--stale-if-error`);
        // recorded on the innermost span that has it (this one when debug spans are off).
        stale_if_error = Empty,
    );
    join_trace(&span, parent);
    span
}

/// A trace id for log correlation when nothing is exported and the caller sent none: unique in
/// this process, cheap (no system call), and never sent anywhere.
fn log_only_trace_id() -> TraceId {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let mut bytes = [0u8; 8];
        let _ = getrandom::fill(&mut bytes);
        u64::from_le_bytes(bytes)
    });
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    TraceId::from(u128::from(seed) << 64 | u128::from(splitmix64(seed ^ count)))
}

fn splitmix64(mut value: u64) -> u64 {
    value = value.wrapping_add(0x9E37_79B9_7F4A_7C15);
    value = (value ^ (value >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    value ^ (value >> 31)
}

/// The method path as a static label, so metrics never allocate per call or grow without bound.
fn known_method(path: &str) -> &'static str {
    const METHODS: &[&str] = &[
        "/keyauthority.v1.VerifyService/VerifyKey",
        "/keyauthority.v1.KeyService/IssueKey",
        "/keyauthority.v1.KeyService/GetKey",
        "/keyauthority.v1.KeyService/ListKeys",
        "/keyauthority.v1.KeyService/RevokeKey",
        "/keyauthority.v1.KeyService/RotateKey",
        "/keyauthority.v1.KeyService/IssueTrialKey",
        "/keyauthority.v1.KeyService/RevokeTrialKey",
        "/keyauthority.v1.KeyService/UpdateKey",
        "/keyauthority.v1.KeyService/ListAuditEvents",
        "/keyauthority.v1.KeyService/WatchKeyEvents",
        "/keyauthority.v1.KeyService/CreateWebhook",
        "/keyauthority.v1.KeyService/ListWebhooks",
        "/keyauthority.v1.KeyService/DeleteWebhook",
        "/keyauthority.v1.KeyService/ListWebhookDeliveries",
        "/keyauthority.v1.KeyService/RedeliverWebhookEvent",
        "/keyauthority.v1.KeyService/ReportUsage",
        "/envoy.service.auth.v3.Authorization/Check",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ];
    METHODS
        .iter()
        .find(|known| **known == path)
        .copied()
        .unwrap_or("/unknown/unknown")
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()
}

/// gRPC status codes by name, as in OpenTelemetry's `rpc.grpc.status_code` and our metrics.
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// The trace id a call belongs to, for its audit event: the caller's, from a valid W3C
/// `traceparent`, else the one this service exports for it; empty when neither exists (a
/// log-only id would name nothing anyone can look up).
pub fn call_trace_id(traceparent: Option<&str>) -> String {
    if let Some(trace_id) = traceparent.and_then(traceparent_trace_id) {
        return trace_id.to_owned();
    }
    let context = tracing::Span::current().context();
    let trace_id = context.span().span_context().trace_id();
    if trace_id == TraceId::INVALID {
        String::new()
    } else {
        trace_id.to_string()
    }
}

/// The trace id field of a `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if well formed and
/// not all zeros.
fn traceparent_trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (_version, trace_id) = (parts.next()?, parts.next()?);
    let well_formed = trace_id.len() == 32
        && trace_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && trace_id.bytes().any(|b| b != b'0');
    well_formed.then_some(trace_id)
}

#[cfg(test)]
mod trace_id_tests {
    use super::*;

    #[test]
    fn a_traceparent_gives_its_trace_id_and_garbage_gives_none() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            traceparent_trace_id(&format!("00-{id}-00f067aa0ba902b7-01")),
            Some(id)
        );
        assert_eq!(
            traceparent_trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(
            traceparent_trace_id("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(traceparent_trace_id("garbage"), None);
        assert_eq!(traceparent_trace_id("00-é"), None);
    }
}

#[cfg(test)]
mod known_method_tests {
    use prost::Message as _;

    use super::*;

    /// Every RPC of our protos has its own label: a new RPC cannot be counted as `unknown`.
    #[test]
    fn every_rpc_of_the_protos_is_known() {
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        let mut checked = 0;
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    assert_eq!(known_method(&path), path, "{path} has no label");
                    checked += 1;
                }
            }
        }
        assert!(checked >= 11, "only {checked} RPCs found");
    }
}
