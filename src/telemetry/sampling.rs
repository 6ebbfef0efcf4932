//! Which RPCs are exported, decided once per call before its first span exists.
//!
//! tracing-opentelemetry builds OpenTelemetry data for every span it sees and asks the sampler
//! only later, so an unsampled call at a 1 % ratio still paid for its RPC span and every child
//! (about a fifth of warm VerifyKey throughput). Here the RPC layer asks the configured sampler
//! first (`decide`), runs the call with that decision in a task-local, and the OpenTelemetry
//! layer's filter (`in_exported_call`) lets no span of an unexported call through: such a call
//! costs the log layer's span and nothing more. The SDK is given `CallSampler`, which answers
//! a call's spans with the call's decision (so a trace is sampled whole) and background work
//! (no call) with the configured sampler.

use std::sync::OnceLock;

use opentelemetry::trace::{Link, SpanKind, TraceContextExt as _, TraceId, TraceState};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SamplingDecision, SamplingResult, ShouldSample};

/// The sampler from the standard `OTEL_TRACES_SAMPLER` variables, once exporting is set up.
static CONFIGURED: OnceLock<Box<dyn ShouldSample>> = OnceLock::new();

tokio::task_local! {
    /// Whether the call being served is exported.
    static EXPORTED: bool;
}

/// The sampler for the SDK: `configured` outside calls, each call's own decision inside one.
pub(super) fn install(configured: Box<dyn ShouldSample>) -> CallSampler {
    let _ = CONFIGURED.set(configured.clone());
    CallSampler { configured }
}

/// Whether a call with this parent context (from `traceparent`, or empty) is exported: the
/// configured sampler's answer for a server span, with a fresh trace id for a root. False, at
/// the cost of one load, when nothing is exported.
pub(crate) fn decide(
    parent: &Context,
    name: &str,
    fresh_trace_id: impl FnOnce() -> TraceId,
) -> bool {
    CONFIGURED
        .get()
        .is_some_and(|sampler| decide_with(sampler.as_ref(), parent, name, fresh_trace_id()))
}

fn decide_with(
    sampler: &dyn ShouldSample,
    parent: &Context,
    name: &str,
    fresh_trace_id: TraceId,
) -> bool {
    let parent_span = parent.span();
    let parent_trace = parent_span.span_context();
    let (parent, trace_id) = if parent_trace.is_valid() {
        (Some(parent), parent_trace.trace_id())
    } else {
        (None, fresh_trace_id)
    };
    sampler
        .should_sample(parent, trace_id, name, &SpanKind::Server, &[], &[])
        .decision
        == SamplingDecision::RecordAndSample
}

/// Runs `future` (a call) with its export decision.
pub(crate) fn scope<F: std::future::Future>(
    exported: bool,
    future: F,
) -> tokio::task::futures::TaskLocalFuture<bool, F> {
    EXPORTED.scope(exported, future)
}

/// Runs `make` (which creates the call's span) with the call's export decision.
pub(crate) fn sync_scope<T>(exported: bool, make: impl FnOnce() -> T) -> T {
    EXPORTED.sync_scope(exported, make)
}

/// The OpenTelemetry layer's filter: inside a call, only if the call is exported; outside any
/// call (background work), always (the SDK's sampler decides).
pub(super) fn in_exported_call() -> bool {
    EXPORTED.try_with(|exported| *exported).unwrap_or(true)
}

/// The SDK's sampler. See the module's comment.
#[derive(Debug, Clone)]
pub(super) struct CallSampler {
    configured: Box<dyn ShouldSample>,
}

impl ShouldSample for CallSampler {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        match EXPORTED.try_with(|exported| *exported) {
            // The layer's filter lets spans through only in exported calls, so this is one.
            Ok(exported) => SamplingResult {
                decision: if exported {
                    SamplingDecision::RecordAndSample
                } else {
                    SamplingDecision::Drop
                },
                attributes: Vec::new(),
                trace_state: parent_context.map_or_else(TraceState::default, |parent| {
                    parent.span().span_context().trace_state().clone()
                }),
            },
            Err(_) => self.configured.should_sample(
                parent_context,
                trace_id,
                name,
                span_kind,
                attributes,
                links,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags};
    use opentelemetry_sdk::trace::Sampler;

    fn remote_parent(sampled: bool) -> Context {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(7u128),
            SpanId::from(9u64),
            flags,
            true,
            TraceState::default(),
        ))
    }

    #[tokio::test]
    async fn a_call_is_sampled_whole_by_its_own_decision() {
        let sampler = CallSampler {
            configured: Box::new(Sampler::AlwaysOff),
        };
        let ask = |sampler: &CallSampler| {
            sampler
                .should_sample(
                    None,
                    TraceId::from(1u128),
                    "x",
                    &SpanKind::Internal,
                    &[],
                    &[],
                )
                .decision
        };
        // Outside a call: the configured sampler.
        assert_eq!(ask(&sampler), SamplingDecision::Drop);
        // Inside one: the call's decision, for every span of it.
        assert_eq!(
            scope(true, async { ask(&sampler) }).await,
            SamplingDecision::RecordAndSample
        );
        assert_eq!(sync_scope(false, || ask(&sampler)), SamplingDecision::Drop);
        assert!(in_exported_call());
        assert!(!sync_scope(false, in_exported_call));
    }

    #[test]
    fn parent_based_decisions_follow_the_callers_flag() {
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.0)));
        let fresh = TraceId::from(3u128);
        assert!(decide_with(&sampler, &remote_parent(true), "x", fresh));
        assert!(!decide_with(&sampler, &remote_parent(false), "x", fresh));
        // A root at ratio 0 is never sampled, at ratio 1 always.
        assert!(!decide_with(&sampler, &Context::new(), "x", fresh));
        let always = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(1.0)));
        assert!(decide_with(&always, &Context::new(), "x", fresh));
    }
}
