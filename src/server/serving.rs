//! Serving and draining: binds, serves every service behind the RPC and overload layers until a
//! shutdown signal, then drains (stop accepting, finish in-flight calls, flush usage, close the
//! database pool). Also the handle tests and embedders run a server with.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use super::overload::OverloadLayer;
use super::{App, Config, TlsConfig, background, health};
use crate::error::{Error, Result};
use crate::gateway::ext_authz::{AuthorizationServer, ExtAuthz};
use crate::gateway::forward_auth::{self, ForwardAuth};
use crate::grpc::{KeyServiceImpl, VerifyServiceImpl};
use crate::metrics;
use crate::pb;
use crate::pb::key_service_server::KeyServiceServer;
use crate::pb::verify_service_server::VerifyServiceServer;
use crate::telemetry::RpcLayer;
use crate::verify::{ChangeFeedStatus, Verifier};

/// Management requests carry at most a few KiB of metadata and scopes.
const MAX_KEY_SERVICE_MESSAGE: usize = 64 * 1024;
/// VerifyKey requests are a key, a few scopes and an IP: tiny.
const MAX_VERIFY_MESSAGE: usize = 16 * 1024;
/// Envoy's CheckRequest carries the checked request's headers (Envoy's own limit is 60 KiB by
/// default) and, when configured, some of its body.
const MAX_EXT_AUTHZ_MESSAGE: usize = 256 * 1024;
/// The deadline of a call whose client sets none (and the longest one a client may set).
const MAX_REQUEST_TIME: Duration = Duration::from_secs(30);

/// Binds `config.listen` and serves until `shutdown` completes.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|error| Error::Internal(format!("cannot listen on {}: {error}", config.listen)))?;
    serve_on(listener, config, shutdown).await
}

/// Serves on an already bound listener until `shutdown` completes, then drains.
pub async fn serve_on(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listeners = Listeners::bind(listener, &config).await?;
    let app = App::build(&config, listeners.addresses()).await?;
    run(listeners, app, config, shutdown).await
}

/// Every listener of one server: gRPC, and the optional metrics and HTTP gateway ones.
struct Listeners {
    grpc: TcpListener,
    metrics: Option<TcpListener>,
    http: Option<TcpListener>,
}

impl Listeners {
    async fn bind(grpc: TcpListener, config: &Config) -> Result<Self> {
        let metrics = match config.metrics_listen {
            Some(address) => Some(metrics::bind(address).await?),
            None => None,
        };
        let http = match config.gateway.http_listen {
            Some(address) => Some(TcpListener::bind(address).await.map_err(|error| {
                Error::Internal(format!("cannot listen for HTTP on {address}: {error}"))
            })?),
            None => None,
        };
        Ok(Self {
            grpc,
            metrics,
            http,
        })
    }

    /// The addresses this server listens on: never a webhook's target.
    fn addresses(&self) -> Vec<SocketAddr> {
        [Some(&self.grpc), self.metrics.as_ref(), self.http.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|listener| listener.local_addr().ok())
            .collect()
    }
}

async fn run(
    listeners: Listeners,
    mut app: App,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let Listeners {
        grpc: listener,
        metrics: metrics_listener,
        http: http_listener,
    } = listeners;
    let local_addr = listener
        .local_addr()
        .map_err(|error| Error::Internal(error.to_string()))?;

    let mut background = Vec::new();
    if let Some((task, _)) = app.change_feed.take() {
        background.push(task);
    }
    if let Some(listener) = metrics_listener {
        background.push(tokio::spawn(metrics::serve(listener, app.metrics.clone())));
    }
    let stop_usage = Arc::new(Notify::new());
    let usage_task = tokio::spawn(
        app.usage
            .clone()
            .run(config.usage.clone(), stop_usage.clone()),
    );

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health::report(&health_reporter, true).await;
    let health_watch = tokio::spawn(health::watch_database(
        app.store.clone(),
        health_reporter.clone(),
        config.health_check_interval,
    ));
    // On the shutdown signal: report NOT_SERVING (load balancers stop sending), then drain.
    let (draining_tx, draining) = oneshot::channel::<()>();
    let (stop_http, http_stopped) = oneshot::channel::<()>();
    let events = app.events.clone();
    let shutdown = async move {
        shutdown.await;
        let _ = stop_http.send(());
        // Open watches end now, or draining would wait for them until the grace ran out.
        events.shut_down();
        health_watch.abort();
        health::report(&health_reporter, false).await;
        let _ = draining_tx.send(());
    };

    let key_service = KeyServiceServer::new(KeyServiceImpl::new(
        app.keys.clone(),
        app.webhooks.clone(),
        app.auth.clone(),
    ))
    .max_decoding_message_size(MAX_KEY_SERVICE_MESSAGE);
    let verify_service = VerifyServiceServer::new(VerifyServiceImpl::new(
        app.verifier.clone(),
        app.auth.clone(),
        app.metrics.clone(),
    ))
    .max_decoding_message_size(MAX_VERIFY_MESSAGE);
    let ext_authz = AuthorizationServer::new(ExtAuthz::new(app.gateway.clone(), app.auth.clone()))
        .max_decoding_message_size(MAX_EXT_AUTHZ_MESSAGE);
    background.extend(background::spawn(&app));
    let overload = OverloadLayer::new(config.overload, MAX_REQUEST_TIME, app.metrics.clone());
    let http_gateway = http_listener.map(|listener| {
        let endpoint = Arc::new(ForwardAuth {
            gateway: app.gateway.clone(),
            auth: app.auth.clone(),
            trusted_proxies: config.gateway.trusted_proxies.clone(),
            permits: overload.permits(),
        });
        if let Ok(address) = listener.local_addr() {
            tracing::info!(%address, "HTTP forward auth serving at /auth");
        }
        tokio::spawn(forward_auth::serve(listener, endpoint, async {
            let _ = http_stopped.await;
        }))
    });

    // The overload layer enforces every deadline (the caller's, or MAX_REQUEST_TIME) and answers
    // DEADLINE_EXCEEDED, so tonic's own default timeout is not set: it would only add a second
    // timer to every call that sends no grpc-timeout.
    let mut builder = tonic::transport::Server::builder().max_concurrent_streams(
        (config.overload.max_concurrent_streams > 0)
            .then_some(config.overload.max_concurrent_streams),
    );
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(server_tls(tls))
            .map_err(|error| Error::invalid("tls", error.to_string()))?;
    }

    tracing::info!(%local_addr, database = app.store.kind().as_str(), "key-authority serving");
    let served = builder
        // Outermost first: refusals are counted and traced like every other answer.
        .layer(RpcLayer::new(app.metrics.clone()))
        .layer(overload)
        .add_service(health_service)
        .add_service(reflection_v1()?)
        .add_service(reflection_v1alpha()?)
        .add_service(key_service)
        .add_service(verify_service)
        .add_service(ext_authz)
        .serve_with_incoming_shutdown(
            // Small unary RPCs must not wait for Nagle's algorithm (a ~40 ms stall otherwise).
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        );
    // Finish in-flight calls, but not forever: a client holding a stream open (a health Watch,
    // say) must not keep the process alive past the grace period.
    let grace = config.shutdown_grace;
    let served = async {
        let served = served.await;
        if let Some(http_gateway) = http_gateway {
            let _ = http_gateway.await;
        }
        served
    };
    let served = tokio::select! {
        served = served => served,
        () = async {
            match draining.await {
                Ok(()) => tokio::time::sleep(grace).await,
                Err(_) => std::future::pending().await,
            }
        } => {
            tracing::warn!(?grace, "calls still open after the shutdown grace period: closing them");
            Ok(())
        }
    };

    // In-flight calls have finished: write the last usage, then close the pool.
    stop_usage.notify_one();
    if usage_task.await.is_err() {
        tracing::error!("usage writer panicked");
    }
    for task in background {
        task.abort();
    }
    app.store.close().await;
    tracing::info!("key-authority stopped");
    served.map_err(|error| Error::Internal(format!("server failed: {error}")))
}

fn server_tls(tls: &TlsConfig) -> ServerTlsConfig {
    let config = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
    match &tls.client_ca_pem {
        Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
        None => config,
    }
}

fn reflection_v1() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|error| Error::Internal(format!("reflection: {error}")))
}

/// v1alpha too: Python's grpcio-reflection and older tools only speak it.
fn reflection_v1alpha() -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|error| Error::Internal(format!("reflection: {error}")))
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received, draining");
}

/// A server running in the background: what tests and embedders use.
pub struct RunningServer {
    pub local_addr: SocketAddr,
    /// The server's verifier, so tests can read its argon2 counter.
    pub verifier: Arc<Verifier>,
    /// On a shared database (PostgreSQL), what the cross-replica change feed has done.
    pub change_feed: Option<ChangeFeedStatus>,
    /// Where `/metrics` is served, when it is.
    pub metrics_addr: Option<SocketAddr>,
    /// Where HTTP forward auth is served, when it is.
    pub http_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
}

impl RunningServer {
    /// Binds `config.listen` (port 0 picks a free port) and serves in a background task.
    pub async fn start(config: Config) -> Result<Self> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|error| Error::Internal(format!("cannot listen: {error}")))?;
        let local_addr = listener
            .local_addr()
            .map_err(|error| Error::Internal(error.to_string()))?;
        let listeners = Listeners::bind(listener, &config).await?;
        // Built before spawning, so a bad database URL fails here and not at shutdown.
        let app = App::build(&config, listeners.addresses()).await?;
        let address_of = |listener: &Option<TcpListener>| {
            listener
                .as_ref()
                .and_then(|listener| listener.local_addr().ok())
        };
        let metrics_addr = address_of(&listeners.metrics);
        let http_addr = address_of(&listeners.http);
        let verifier = app.verifier.clone();
        let change_feed = app.change_feed.as_ref().map(|(_, status)| status.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(listeners, app, config, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            local_addr,
            metrics_addr,
            http_addr,
            verifier,
            change_feed,
            stop: Some(stop),
            task,
        })
    }

    /// Graceful shutdown, as on SIGTERM; returns once usage is flushed and the pool closed.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .map_err(|error| Error::Internal(format!("server task failed: {error}")))?
    }
}
