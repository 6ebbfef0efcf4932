//! Logs and traces, set up once from `main`.
//!
//! - Logs: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), human-readable or JSON.
//!   Lines logged inside an RPC carry its `trace_id` (a field of the RPC span).
//! - Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans are exported over OTLP/gRPC, with
//!   the standard `OTEL_SERVICE_NAME` and `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`. When
//!   it is not set, no exporter or OpenTelemetry layer exists at all.

pub mod rpc;
mod sampling;

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

pub use rpc::RpcLayer;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: one line per event, colours on a terminal.
    Human,
    /// For machines: one JSON object per line, with the fields of the enclosing spans.
    Json,
}

/// Libraries whose most verbose levels would print protocol frames or SQL: kept at `info` even
/// when `RUST_LOG` asks for more, so that no level can put a request's bytes (which may hold a
/// key) into the logs.
const QUIET_DEPENDENCIES: &[&str] = &[
    "h2=info",
    "hyper=info",
    "tonic=info",
    "tower=info",
    "sqlx=warn",
];

/// Flushes exported spans on drop (at shutdown).
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("exporting the last spans failed: {error}");
        }
    }
}

fn log_filter() -> EnvFilter {
    let requested = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let mut filter = EnvFilter::try_new(&requested).unwrap_or_else(|error| {
        eprintln!("ignoring RUST_LOG={requested:?}: {error}");
        EnvFilter::new("info")
    });
    for directive in QUIET_DEPENDENCIES {
        filter = filter.add_directive(directive.parse().expect("a valid directive"));
    }
    filter
}

/// Installs logging, and OTLP tracing when configured. Call once, inside the Tokio runtime.
pub fn init(format: LogFormat) -> TelemetryGuard {
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Human => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => fmt
            .json()
            // The span list carries the RPC span, and with it the trace id, on every line.
            .with_current_span(false)
            .with_span_list(true)
            .boxed(),
    };
    let (otel_layer, provider) = match otlp_provider() {
        Some(provider) => {
            let tracer = provider.tracer("key-authority");
            // Spans of our own code down to debug (cache lookups, argon2, queries), others at info.
            let filter = EnvFilter::new("info,key_authority=debug");
            let layer =
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    // Per span, these cost a thread-name allocation and file/line attributes that
                    // the span name and the service already tell; busy/idle timing and activating
                    // the OpenTelemetry context cost clock reads and a context switch on every poll
                    // of every span, and nothing here reads the active OpenTelemetry context.
                    .with_threads(false)
                    .with_location(false)
                    .with_tracked_inactivity(false)
                    .with_context_activation(false)
                    // No span of a call that is not exported (sampling.rs). Dynamic: asked per span,
                    // never cached per call site as a plain `filter_fn` would be.
                    .with_filter(filter.and(tracing_subscriber::filter::dynamic_filter_fn(
                        |_, _| sampling::in_exported_call(),
                    )));
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(log_filter()))
        .with(otel_layer)
        .init();
    TelemetryGuard { provider }
}

fn otlp_provider() -> Option<SdkTracerProvider> {
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|value| !value.is_empty()));
    if !configured {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
    {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("OTLP tracing disabled: {error}");
            return None;
        }
    };
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("key-authority");
    }
    // The sampler the OTEL_TRACES_SAMPLER variables configure, consulted once per call.
    let sampler = sampling::install(opentelemetry_sdk::trace::Config::default().sampler);
    Some(
        SdkTracerProvider::builder()
            .with_sampler(sampler)
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    )
}
