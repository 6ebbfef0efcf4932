//! Prometheus metrics on `--metrics-listen` (`GET /metrics`, OpenMetrics text).
//!
//! Events on the request path (RPCs, verdicts) are recorded into a registry owned by this server
//! (no process-wide globals). Everything else (caches, argon2, the database pool, usage
//! write-behind, lockouts, the change feed) is read from the components' own counters at scrape
//! time, so the domain code knows nothing of Prometheus.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, text::encode};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::store::Store;
use crate::verify::Verifier;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GatewayLabels {
    gateway: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    code: &'static str,
}

/// Request latency buckets, in seconds: a warm check is tens of microseconds, a cold one with
/// argon2 and the database tens of milliseconds.
const LATENCY_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

pub struct Metrics {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_seconds: Family<RpcLabels, Histogram>,
    verdicts: Family<VerdictLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    gateway_requests: Family<GatewayLabels, Counter>,
    gateway_seconds: Family<GatewayLabels, Histogram>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The components whose counters are read at scrape time.
pub struct Sources {
    pub verifier: Arc<Verifier>,
    pub store: Arc<dyn Store>,
    /// How many times the change feed established a LISTEN (PostgreSQL only).
    pub change_feed: Option<watch::Receiver<u64>>,
    /// WatchKeyEvents' watchers.
    pub events: crate::events::EventHub,
    /// What this replica's webhook dispatcher has sent.
    pub webhooks: Arc<crate::webhooks::DispatchStats>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(sources: Sources) -> Arc<Self> {
        let mut registry = Registry::with_prefix("key_authority");
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "grpc_server_requests",
            "gRPC requests handled, by method and status code",
            rpc_requests.clone(),
        );
        let rpc_seconds = Family::<RpcLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(LATENCY_BUCKETS)
        });
        registry.register(
            "grpc_server_request_duration_seconds",
            "gRPC request latency, by method and status code",
            rpc_seconds.clone(),
        );
        let verdicts = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "verify_verdicts",
            "VerifyKey answers, by verdict code",
            verdicts.clone(),
        );
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "grpc_server_refusals",
            "gRPC requests refused or abandoned by overload protection, by reason: OVERLOADED (over \
             the concurrency limit) or DEADLINE_EXCEEDED (the caller's deadline passed)",
            refusals.clone(),
        );
        let gateway_requests = Family::<GatewayLabels, Counter>::default();
        registry.register(
            "gateway_requests",
            "Gateway checks (Envoy ext_authz `ext_authz`, HTTP forward auth `forward_auth`), by \
             answer code: OK or the refusal's code",
            gateway_requests.clone(),
        );
        let gateway_seconds = Family::<GatewayLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(LATENCY_BUCKETS)
        });
        registry.register(
            "gateway_request_duration_seconds",
            "Gateway check latency, by gateway and answer code",
            gateway_seconds.clone(),
        );
        registry.register_collector(Box::new(sources));
        Arc::new(Self {
            registry,
            rpc_requests,
            rpc_seconds,
            verdicts,
            refusals,
            gateway_requests,
            gateway_seconds,
        })
    }

    pub fn record_rpc(&self, method: &'static str, code: &'static str, elapsed: Duration) {
        let labels = RpcLabels { method, code };
        self.rpc_requests.get_or_create(&labels).inc();
        self.rpc_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn record_verdict(&self, code: &'static str) {
        self.verdicts.get_or_create(&VerdictLabels { code }).inc();
    }

    /// A request refused or abandoned by overload protection; `reason` is its ErrorInfo reason.
    pub fn record_refusal(&self, reason: &'static str) {
        self.refusals.get_or_create(&RefusalLabels { reason }).inc();
    }

    /// A gateway check answered with `code` (OK, or the refusal's code).
    pub fn record_gateway(&self, gateway: &'static str, code: &'static str, elapsed: Duration) {
        let labels = GatewayLabels { gateway, code };
        self.gateway_requests.get_or_create(&labels).inc();
        self.gateway_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

fn counter(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    value: impl Into<f64>,
) -> std::fmt::Result {
    let metric = ConstCounter::new(value.into());
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    value: impl Into<f64>,
) -> std::fmt::Result {
    let metric = ConstGauge::new(value.into());
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl prometheus_client::collector::Collector for Sources {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> std::fmt::Result {
        let e = &mut encoder;
        let caches = self.verifier.cache_stats();
        counter(
            e,
            "verdict_cache_hits",
            "Verdict cache lookups that hit",
            caches.verdict_hits as f64,
        )?;
        counter(
            e,
            "verdict_cache_misses",
            "Verdict cache lookups that missed",
            caches.verdict_misses as f64,
        )?;
        gauge(
            e,
            "verdict_cache_entries",
            "Entries in the verdict cache",
            caches.verdict_entries as f64,
        )?;
        counter(
            e,
            "state_cache_hits",
            "Key-state cache lookups that hit",
            caches.state_hits as f64,
        )?;
        counter(
            e,
            "state_cache_misses",
            "Key-state cache lookups that read the database",
            caches.state_misses as f64,
        )?;
        gauge(
            e,
            "state_cache_entries",
            "Entries in the key-state cache",
            caches.state_entries as f64,
        )?;

        counter(
            e,
            "state_stale_answers",
            "VerifyKey answers from cached key state the database could not confirm (it was \
             unreachable; within --stale-if-error of the last confirmation)",
            caches.state_stale_answers as f64,
        )?;
        gauge(
            e,
            "db_unreachable",
            "1 while the database is known to be unreachable (calls fail fast), else 0",
            if self
                .store
                .breaker()
                .is_some_and(|breaker| breaker.is_open())
            {
                1.0
            } else {
                0.0
            },
        )?;

        let argon2 = self.verifier.hash_pool().stats();
        gauge(
            e,
            "argon2_in_flight",
            "argon2 computations queued or running",
            argon2.in_flight as f64,
        )?;
        counter(
            e,
            "argon2_runs",
            "argon2 computations finished (hashes and verifications)",
            argon2.runs as f64,
        )?;
        counter(
            e,
            "argon2_verifications",
            "argon2 verifications started",
            argon2.verifications as f64,
        )?;
        counter(
            e,
            "argon2_unproven_refused",
            "Verifications of unproven secrets refused because their argon2 budget was spent",
            argon2.unproven_refused as f64,
        )?;
        counter(
            e,
            "argon2_run_seconds",
            "Time spent computing argon2",
            argon2.run_nanos as f64 / 1e9,
        )?;

        let pool = self.store.pool_stats();
        gauge(
            e,
            "db_pool_connections_open",
            "Open database connections",
            pool.open,
        )?;
        gauge(
            e,
            "db_pool_connections_idle",
            "Idle database connections",
            pool.idle,
        )?;
        gauge(
            e,
            "db_pool_connections_max",
            "Largest number of database connections",
            pool.max,
        )?;

        let (lag, pending) = self.verifier.usage().lag();
        gauge(
            e,
            "usage_write_lag_seconds",
            "Time since usage counters were last fully written",
            lag.as_secs_f64(),
        )?;
        gauge(
            e,
            "usage_pending_keys",
            "Keys with usage counts not yet written",
            pending as f64,
        )?;

        let (key_lockouts, ip_lockouts) = self.verifier.lockouts().engaged();
        counter(
            e,
            "key_lockouts",
            "Key lockouts engaged after repeated wrong secrets",
            key_lockouts as f64,
        )?;
        counter(
            e,
            "ip_lockouts",
            "Client IP lockouts engaged after repeated failures",
            ip_lockouts as f64,
        )?;
        counter(
            e,
            "audit_lockout_events_dropped",
            "Lockout audit events dropped because the audit writer was behind",
            self.verifier.lockouts().audit_events_dropped() as f64,
        )?;

        gauge(
            e,
            "event_watchers",
            "WatchKeyEvents streams open on this replica",
            self.events.watchers() as f64,
        )?;

        let webhooks = &self.webhooks;
        let read = |counter: &std::sync::atomic::AtomicU64| {
            counter.load(std::sync::atomic::Ordering::Relaxed) as f64
        };
        counter(
            e,
            "webhook_attempts",
            "Webhook requests sent by this replica (each attempt of each delivery)",
            read(&webhooks.attempts),
        )?;
        counter(
            e,
            "webhook_attempt_failures",
            "Webhook requests that failed: no answer in time, no connection, or a non-2xx status",
            read(&webhooks.failed_attempts),
        )?;
        counter(
            e,
            "webhook_deliveries",
            "Webhook deliveries that succeeded (a 2xx answer)",
            read(&webhooks.delivered),
        )?;
        counter(
            e,
            "webhook_deliveries_failed",
            "Webhook deliveries given up after the retry period",
            read(&webhooks.gave_up),
        )?;
        gauge(
            e,
            "webhook_delivery_lag_seconds",
            "From queueing to success, of the last webhook delivery this replica made",
            webhooks
                .last_lag_micros
                .load(std::sync::atomic::Ordering::Relaxed) as f64
                / 1e6,
        )?;
        gauge(
            e,
            "webhooks_in_flight",
            "Webhooks this replica is sending to now",
            read(&webhooks.in_flight),
        )?;

        if let Some(listening) = &self.change_feed {
            let reconnects = listening.borrow().saturating_sub(1);
            counter(
                e,
                "change_feed_reconnects",
                "LISTEN/NOTIFY connections re-established",
                reconnects as f64,
            )?;
        }
        Ok(())
    }
}

/// Serves `GET /metrics` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    if let Err(error) = axum::serve(listener, app).await {
        tracing::error!(%error, "metrics endpoint failed");
    }
}

/// Binds the metrics address, so a bad address fails at start-up.
pub async fn bind(address: SocketAddr) -> crate::error::Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|error| {
        crate::error::Error::Internal(format!("cannot listen for metrics on {address}: {error}"))
    })
}
