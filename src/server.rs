//! Assembles the application (store, caches, services, health, reflection) and serves it until a
//! shutdown signal, then drains: stop accepting, finish in-flight calls, flush usage, close the
//! database pool.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::auth::{AuthConfig, Authenticator, IssueRateLimiter, TrialRateLimiter};
use crate::error::{Error, Result};
use crate::grpc::{KeyServiceImpl, VerifyServiceImpl};
use crate::key::{
    Brand, HashParams, HashPool, HashPriority, HashThreads, SecretHasher, UnprovenBudget,
};
use crate::keys::page_token::PageTokenCodec;
use crate::keys::{KeyLimits, KeyManager, TrialConfig};
use crate::metrics::{self, Metrics, Sources};
use crate::pb;
use crate::pb::key_service_server::KeyServiceServer;
use crate::pb::verify_service_server::VerifyServiceServer;
use crate::store::{self, Store};
use crate::telemetry::RpcLayer;
use crate::verify::{
    ChangeFeedStatus, UsageConfig, UsageRecorder, Verifier, VerifyConfig, follow_changes,
};

mod overload;

pub use overload::OverloadConfig;
use overload::OverloadLayer;

/// Management requests carry at most a few KiB of metadata and scopes.
const MAX_KEY_SERVICE_MESSAGE: usize = 64 * 1024;
/// VerifyKey requests are a key, a few scopes and an IP: tiny.
const MAX_VERIFY_MESSAGE: usize = 16 * 1024;
/// The deadline of a call whose client sets none (and the longest one a client may set).
const MAX_REQUEST_TIME: Duration = Duration::from_secs(30);

/// How often expired cache entries and lockouts are dropped when no traffic does it.
const CACHE_HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(5);

/// Everything the server needs, already validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: String,
    pub db_max_connections: u32,
    pub brand: Brand,
    pub hash_params: HashParams,
    /// How many argon2 computations may run at once.
    pub argon2_threads: usize,
    /// How the argon2 threads compete for CPU with the request workers.
    pub argon2_priority: HashPriority,
    /// The argon2 share of secrets nobody has proven yet.
    pub argon2_unproven: UnprovenBudget,
    pub verify: VerifyConfig,
    pub usage: UsageConfig,
    pub auth: AuthConfig,
    pub trial: TrialConfig,
    /// How far away expiries and rotation grace periods may be.
    pub limits: KeyLimits,
    /// Serve TLS (and require client certificates when a client CA is set).
    pub tls: Option<TlsConfig>,
    /// Where to serve Prometheus metrics (`GET /metrics`); none when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// How often the database is pinged for the health status.
    pub health_check_interval: Duration,
    /// How long a graceful shutdown waits for open calls before closing them.
    pub shutdown_grace: Duration,
    /// Calls in progress at once, and HTTP/2 streams per connection.
    pub overload: OverloadConfig,
}

/// PEM material for TLS, already read from disk.
#[derive(Clone)]
pub struct TlsConfig {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// When set, every client must present a certificate signed by this CA (mutual TLS).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl Config {
    /// A configuration for `database_url` with every other setting at its default.
    pub fn with_database(database_url: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            database_url: database_url.into(),
            db_max_connections: 16,
            brand: Brand::default(),
            hash_params: HashParams::default(),
            argon2_threads: std::thread::available_parallelism().map_or(2, usize::from),
            argon2_priority: HashPriority::default(),
            argon2_unproven: UnprovenBudget::default(),
            verify: VerifyConfig::default(),
            usage: UsageConfig::default(),
            auth: AuthConfig {
                issue_limit_per_hour: 10,
                trial_limit_per_minute: 5,
                trial_revoke_limit_per_minute: 5,
                ..AuthConfig::default()
            },
            trial: TrialConfig::default(),
            limits: KeyLimits::default(),
            tls: None,
            metrics_listen: None,
            health_check_interval: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(30),
            overload: OverloadConfig::default(),
        }
    }
}

/// The application's shared parts, built once.
pub struct App {
    pub store: Arc<dyn Store>,
    pub keys: Arc<KeyManager>,
    pub verifier: Arc<Verifier>,
    pub usage: UsageRecorder,
    pub auth: Arc<Authenticator>,
    pub issue_limiter: IssueRateLimiter,
    pub trial_limiter: TrialRateLimiter,
    pub trial_revoke_limiter: TrialRateLimiter,
    pub metrics: Arc<Metrics>,
    /// The cross-replica change feed (on a shared database) and what it has done.
    pub change_feed: Option<(JoinHandle<()>, ChangeFeedStatus)>,
}

impl App {
    pub async fn build(config: &Config) -> Result<Self> {
        let store = store::open(&config.database_url, config.db_max_connections).await?;
        let hasher = SecretHasher::new(config.hash_params)
            .map_err(|reason| Error::invalid("argon2", reason))?;
        let threads = HashThreads::new(config.argon2_threads, config.argon2_priority)?;
        let hashes = HashPool::new(hasher, threads).with_unproven_budget(config.argon2_unproven);
        let page_tokens = PageTokenCodec::new(store.shared_secret("page_token_mac").await?);
        let usage = UsageRecorder::new(store.clone());
        let verifier = Arc::new(Verifier::new(
            store.clone(),
            hashes.clone(),
            usage.clone(),
            &config.verify,
        ));
        let keys = Arc::new(
            KeyManager::new(
                store.clone(),
                hashes,
                config.brand.clone(),
                page_tokens,
                verifier.invalidator(),
                config.trial.clone(),
            )
            .with_limits(config.limits),
        );
        let auth = Arc::new(Authenticator::new(&config.auth, verifier.clone())?);
        // Replicas sharing the database tell each other about key changes; a database that only
        // this process uses (SQLite) has no changes to follow.
        let change_feed = store
            .kind()
            .is_shared()
            .then(|| follow_changes(store.changes(), verifier.invalidator()));
        let metrics = Metrics::new(Sources {
            verifier: verifier.clone(),
            store: store.clone(),
            change_feed: change_feed
                .as_ref()
                .map(|(_, status)| status.listening.clone()),
        });
        Ok(Self {
            metrics,
            change_feed,
            store,
            keys,
            verifier,
            usage,
            auth,
            issue_limiter: IssueRateLimiter::new(
                config.auth.issue_limit_per_hour,
                Duration::from_secs(3600),
            ),
            trial_limiter: TrialRateLimiter::per_minute(config.auth.trial_limit_per_minute),
            trial_revoke_limiter: TrialRateLimiter::per_minute(
                config.auth.trial_revoke_limit_per_minute,
            ),
        })
    }
}

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
    let app = App::build(&config).await?;
    let metrics_listener = match config.metrics_listen {
        Some(address) => Some(metrics::bind(address).await?),
        None => None,
    };
    run(listener, metrics_listener, app, config, shutdown).await
}

async fn run(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    mut app: App,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
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
    report_health(&health_reporter, true).await;
    let health_watch = tokio::spawn(watch_database(
        app.store.clone(),
        health_reporter.clone(),
        config.health_check_interval,
    ));
    // On the shutdown signal: report NOT_SERVING (load balancers stop sending), then drain.
    let (draining_tx, draining) = oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        health_watch.abort();
        report_health(&health_reporter, false).await;
        let _ = draining_tx.send(());
    };

    let key_service = KeyServiceServer::new(KeyServiceImpl::new(
        app.keys.clone(),
        app.auth.clone(),
        app.issue_limiter.clone(),
        app.trial_limiter.clone(),
        app.trial_revoke_limiter.clone(),
    ))
    .max_decoding_message_size(MAX_KEY_SERVICE_MESSAGE);
    let verify_service = VerifyServiceServer::new(VerifyServiceImpl::new(
        app.verifier.clone(),
        app.auth.clone(),
        app.metrics.clone(),
    ))
    .max_decoding_message_size(MAX_VERIFY_MESSAGE);
    background.push(tokio::spawn(forget_idle_limits(
        app.issue_limiter.clone(),
        [app.trial_limiter.clone(), app.trial_revoke_limiter.clone()],
    )));
    background.push(tokio::spawn(sweep_trial_keys(app.keys.clone())));
    background.push(tokio::spawn(
        app.verifier
            .clone()
            .keep_caches_tidy(CACHE_HOUSEKEEPING_INTERVAL),
    ));

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
        .layer(OverloadLayer::new(
            config.overload,
            MAX_REQUEST_TIME,
            app.metrics.clone(),
        ))
        .add_service(health_service)
        .add_service(reflection_v1()?)
        .add_service(reflection_v1alpha()?)
        .add_service(key_service)
        .add_service(verify_service)
        .serve_with_incoming_shutdown(
            // Small unary RPCs must not wait for Nagle's algorithm (a ~40 ms stall otherwise).
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        );
    // Finish in-flight calls, but not forever: a client holding a stream open (a health Watch,
    // say) must not keep the process alive past the grace period.
    let grace = config.shutdown_grace;
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

/// Every service is SERVING while the database answers, NOT_SERVING while it does not.
async fn report_health(reporter: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(
            <KeyServiceServer<KeyServiceImpl> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    reporter
        .set_service_status(
            <VerifyServiceServer<VerifyServiceImpl> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// Pings the database every `interval` and reports the health status when it changes.
async fn watch_database(
    store: Arc<dyn Store>,
    reporter: tonic_health::server::HealthReporter,
    interval: Duration,
) {
    let mut serving = true;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // No timeout of our own around the ping: the pool's acquire timeout bounds it, and
        // cancelling connection attempts half-way can leave the pool short of connections.
        let answered = store.ping().await.is_ok();
        if answered != serving {
            serving = answered;
            if serving {
                tracing::info!("database reachable again: SERVING");
            } else {
                tracing::warn!("database unreachable: NOT_SERVING");
            }
            report_health(&reporter, serving).await;
        }
    }
}

fn server_tls(tls: &TlsConfig) -> ServerTlsConfig {
    let config = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
    match &tls.client_ca_pem {
        Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
        None => config,
    }
}

/// Keeps the rate limiter's memory bounded by recently active callers.
async fn forget_idle_limits(issue: IssueRateLimiter, trial: [TrialRateLimiter; 2]) {
    let mut ticker = tokio::time::interval(Duration::from_secs(60));
    loop {
        ticker.tick().await;
        issue.forget_idle();
        for limiter in &trial {
            limiter.forget_idle();
        }
    }
}

/// Deletes trial keys some time after they expired, in bounded batches. Every replica sweeps;
/// a batch that another replica deleted first simply finds nothing.
async fn sweep_trial_keys(keys: Arc<KeyManager>) {
    let mut ticker = tokio::time::interval(keys.trial_config().sweep_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match keys.sweep_trial_keys().await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "expired trial keys deleted"),
            Err(error) => tracing::warn!(%error, "trial key sweep failed"),
        }
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
        // Built before spawning, so a bad database URL fails here and not at shutdown.
        let app = App::build(&config).await?;
        let metrics_listener = match config.metrics_listen {
            Some(address) => Some(metrics::bind(address).await?),
            None => None,
        };
        let metrics_addr = metrics_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok());
        let verifier = app.verifier.clone();
        let change_feed = app.change_feed.as_ref().map(|(_, status)| status.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(listener, metrics_listener, app, config, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            local_addr,
            metrics_addr,
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
