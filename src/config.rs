//! Configuration: the typed `Config` that the library (and the tests) use, with every default in
//! one place (`Config::default`), and the command-line flags, each with an environment variable,
//! whose defaults are read from it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::audit::AuditConfig;
use crate::auth::{AuthConfig, JwtConfig};
use crate::events::WatchConfig;
use crate::gateway::{GatewayConfig, TrustedProxies};
use crate::key::format::random_base62;
use crate::key::{Brand, HashParams, HashPriority, UnprovenBudget, WorkspaceId};
use crate::keys::idempotency::{IdempotencyConfig, MIN_SECRET_LEN};
use crate::keys::{KeyLimits, TrialConfig};
use crate::server::OverloadConfig;
use crate::telemetry::LogFormat;
use crate::verify::{LockoutConfig, UsageConfig, VerifyConfig};
use crate::webhooks::WebhookConfig;

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
    /// How long the audit trail is kept.
    pub audit: AuditConfig,
    /// Safe retries: how long request ids are remembered, and the key of derived secrets.
    pub idempotency: IdempotencyConfig,
    /// Key events: how watchers read them, how long they are kept, how often expiries are found.
    pub events: WatchConfig,
    /// Webhooks: which targets are allowed, how deliveries are timed and retried.
    pub webhooks: WebhookConfig,
    /// Gateways: HTTP forward auth's listener, the route file, the trusted proxies.
    pub gateway: GatewayConfig,
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

impl Default for Config {
    /// Every default of the service, in one place: the flags' defaults are these (see
    /// `ServeArgs`), and so are the tests'.
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            database_url: "sqlite://key-authority.db".to_owned(),
            db_max_connections: 16,
            brand: Brand::default(),
            hash_params: HashParams::default(),
            argon2_threads: std::thread::available_parallelism().map_or(2, usize::from),
            argon2_priority: HashPriority::default(),
            argon2_unproven: UnprovenBudget::default(),
            verify: VerifyConfig::default(),
            usage: UsageConfig::default(),
            auth: AuthConfig::default(),
            trial: TrialConfig::default(),
            limits: KeyLimits::default(),
            tls: None,
            metrics_listen: None,
            health_check_interval: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(30),
            overload: OverloadConfig::default(),
            audit: AuditConfig::default(),
            idempotency: IdempotencyConfig::default(),
            events: WatchConfig::default(),
            webhooks: WebhookConfig::default(),
            gateway: GatewayConfig::default(),
        }
    }
}

impl Config {
    /// A configuration for `database_url` with every other setting at its default.
    pub fn with_database(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            ..Self::default()
        }
    }
}

/// The defaults the flags show and fall back to.
fn defaults() -> &'static Config {
    static DEFAULTS: std::sync::LazyLock<Config> = std::sync::LazyLock::new(Config::default);
    &DEFAULTS
}

/// A default duration as a flag shows it ("5s", "15m", "10years").
fn shown(duration: Duration) -> humantime::Duration {
    duration.into()
}

#[derive(Debug, Parser)]
#[command(
    name = "key-authority",
    version,
    about = "The single authority for API keys"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// How log lines are written: `human` or `json`.
    #[arg(
        long,
        global = true,
        env = "KEY_AUTHORITY_LOG_FORMAT",
        value_enum,
        default_value = "human"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run migrations, then serve gRPC until SIGTERM or Ctrl-C.
    Serve(Box<ServeArgs>),
    /// Run the embedded database migrations and exit.
    Migrate(DatabaseArgs),
}

#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// sqlite://PATH (created if missing) or postgres://USER:PASSWORD@HOST:PORT/DB.
    #[arg(long, env = "DATABASE_URL", default_value_t = defaults().database_url.clone())]
    pub database_url: String,

    /// Largest number of open database connections.
    #[arg(long, env = "KEY_AUTHORITY_DB_MAX_CONNECTIONS", default_value_t = defaults().db_max_connections)]
    pub db_max_connections: u32,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to serve gRPC on.
    #[arg(long, env = "KEY_AUTHORITY_LISTEN", default_value_t = defaults().listen)]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub database: DatabaseArgs,

    /// The brand that starts every key: 1 to 16 lowercase letters and digits.
    #[arg(long, env = "KEY_AUTHORITY_KEY_PREFIX", default_value_t = defaults().brand.as_str().to_owned())]
    pub key_prefix: String,

    /// argon2id memory cost in KiB.
    #[arg(long, env = "KEY_AUTHORITY_ARGON2_MEMORY_KIB", default_value_t = defaults().hash_params.memory_kib)]
    pub argon2_memory_kib: u32,

    /// argon2id passes over memory.
    #[arg(long, env = "KEY_AUTHORITY_ARGON2_ITERATIONS", default_value_t = defaults().hash_params.iterations)]
    pub argon2_iterations: u32,

    /// argon2id lanes.
    #[arg(long, env = "KEY_AUTHORITY_ARGON2_PARALLELISM", default_value_t = defaults().hash_params.parallelism)]
    pub argon2_parallelism: u32,

    /// How many argon2 computations may run at once (0 = the number of CPU cores).
    #[arg(long, env = "KEY_AUTHORITY_ARGON2_THREADS", default_value_t = 0)]
    pub argon2_threads: usize,

    /// Scheduling priority of the argon2 verification threads against the request workers:
    /// `low` (nice 19), `idle` (Linux SCHED_IDLE: only CPU nothing else on the machine wants) or
    /// `normal`.
    #[arg(long, env = "KEY_AUTHORITY_ARGON2_PRIORITY", value_enum, default_value_t = defaults().argon2_priority)]
    pub argon2_priority: HashPriority,

    /// argon2 verifications per second of secrets nobody has proven yet (first sight of a key,
    /// wrong secrets); beyond it they are refused with RESOURCE_EXHAUSTED. 0 = no rate limit.
    #[arg(long, env = "KEY_AUTHORITY_ARGON2_UNPROVEN_PER_SECOND", default_value_t = defaults().argon2_unproven.per_second)]
    pub argon2_unproven_per_second: u32,

    /// Unproven verifications that may wait or run at once; more are refused at once.
    #[arg(long, env = "KEY_AUTHORITY_ARGON2_UNPROVEN_QUEUE", default_value_t = defaults().argon2_unproven.queue_depth)]
    pub argon2_unproven_queue: usize,

    /// Largest number of verdicts (digest of a presented key → match or not) kept in memory.
    #[arg(long, env = "KEY_AUTHORITY_VERDICT_CACHE_CAPACITY", default_value_t = defaults().verify.verdict_cache_capacity)]
    pub verdict_cache_capacity: u64,

    /// How long a wrong secret's verdict is remembered.
    #[arg(long, env = "KEY_AUTHORITY_NEGATIVE_VERDICT_TTL", default_value_t = shown(defaults().verify.negative_verdict_ttl))]
    pub negative_verdict_ttl: humantime::Duration,

    /// Largest number of key states kept in memory.
    #[arg(long, env = "KEY_AUTHORITY_STATE_CACHE_CAPACITY", default_value_t = defaults().verify.state_cache_capacity)]
    pub state_cache_capacity: u64,

    /// How long a cached key state is trusted without a change notification.
    #[arg(long, env = "KEY_AUTHORITY_STATE_CACHE_TTL", default_value_t = shown(defaults().verify.state_ttl))]
    pub state_cache_ttl: humantime::Duration,

    /// While the database cannot be reached, a key's cached state is still served for this long
    /// after the database last confirmed it (each such answer is counted); then VerifyKey answers
    /// UNAVAILABLE. 0 serves nothing unconfirmed.
    #[arg(long, env = "KEY_AUTHORITY_STALE_IF_ERROR", default_value_t = shown(defaults().verify.stale_if_error))]
    pub stale_if_error: humantime::Duration,

    /// How often usage counters are written to the database.
    #[arg(long, env = "KEY_AUTHORITY_USAGE_FLUSH_INTERVAL", default_value_t = shown(defaults().usage.flush_interval))]
    pub usage_flush_interval: humantime::Duration,

    /// Platform admin tokens, comma-separated. Prefer the environment variable: flags show in `ps`.
    #[arg(
        long,
        env = "KEY_AUTHORITY_ADMIN_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub admin_token: Vec<String>,

    /// HS256 secret that verifies dashboard JWTs.
    #[arg(
        long,
        env = "KEY_AUTHORITY_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "jwt_public_key_file"
    )]
    pub jwt_secret: Option<String>,

    /// PEM public key (Ed25519, P-256 or RSA) that verifies dashboard JWTs (EdDSA, ES256, RS256).
    #[arg(long, env = "KEY_AUTHORITY_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// Required `iss` claim of dashboard JWTs.
    #[arg(long, env = "KEY_AUTHORITY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim of dashboard JWTs.
    #[arg(long, env = "KEY_AUTHORITY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock skew allowed on JWT `exp` and `nbf`.
    #[arg(long, env = "KEY_AUTHORITY_JWT_LEEWAY", default_value_t = shown(crate::auth::jwt::DEFAULT_LEEWAY))]
    pub jwt_leeway: humantime::Duration,

    /// IssueKey calls allowed per user per hour (admins exempt); 0 disables the limit.
    #[arg(long, env = "KEY_AUTHORITY_ISSUE_LIMIT_PER_HOUR", default_value_t = defaults().auth.issue_limit_per_hour)]
    pub issue_limit_per_hour: u32,

    /// Service tokens VerifyKey callers must present, comma-separated; unset leaves VerifyKey open.
    /// When set, KeyService refuses API keys as credentials (they would be an unguarded oracle).
    #[arg(
        long,
        env = "KEY_AUTHORITY_VERIFY_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub verify_tokens: Vec<String>,

    /// Unproven secrets of one key checked within the lockout window (failed or still in flight)
    /// that lock its unrecognised secrets; 0 = off.
    #[arg(long, env = "KEY_AUTHORITY_LOCKOUT_KEY_FAILURES", default_value_t = defaults().verify.lockout.key_failures)]
    pub lockout_key_failures: u32,

    /// Failures and unproven checks in flight from one client IP within the lockout window that
    /// lock the IP; 0 = off.
    #[arg(long, env = "KEY_AUTHORITY_LOCKOUT_IP_FAILURES", default_value_t = defaults().verify.lockout.ip_failures)]
    pub lockout_ip_failures: u32,

    /// The window in which failures are counted.
    #[arg(long, env = "KEY_AUTHORITY_LOCKOUT_WINDOW", default_value_t = shown(defaults().verify.lockout.window))]
    pub lockout_window: humantime::Duration,

    /// How long a lockout lasts.
    #[arg(long, env = "KEY_AUTHORITY_LOCKOUT_DURATION", default_value_t = shown(defaults().verify.lockout.duration))]
    pub lockout_duration: humantime::Duration,

    /// Keys and client IPs whose failures are tracked at most (each), bounding memory.
    #[arg(
        long,
        env = "KEY_AUTHORITY_LOCKOUT_CAPACITY",
        default_value_t = defaults().verify.lockout.capacity
    )]
    pub lockout_capacity: u64,

    /// The furthest a key's expiry (IssueKey or RotateKey `ttl`/`expire_time`) may be from now;
    /// 0 allows any expiry up to the end of year 9999 (the protobuf Timestamp range). Keys without
    /// an expiry are not affected.
    #[arg(long, env = "KEY_AUTHORITY_MAX_KEY_LIFETIME", default_value_t = shown(defaults().limits.max_key_lifetime.unwrap_or_default()))]
    pub max_key_lifetime: humantime::Duration,

    /// The longest grace period RotateKey may give the old key (an API key gets at most 24h).
    #[arg(long, env = "KEY_AUTHORITY_MAX_ROTATION_GRACE", default_value_t = shown(defaults().limits.max_rotation_grace))]
    pub max_rotation_grace: humantime::Duration,

    /// Serve IssueTrialKey and RevokeTrialKey; `false` answers both with UNIMPLEMENTED.
    #[arg(long, env = "KEY_AUTHORITY_TRIAL_KEYS", default_value_t = defaults().trial.enabled, action = clap::ArgAction::Set)]
    pub trial_keys: bool,

    /// The workspace trial keys belong to.
    #[arg(long, env = "KEY_AUTHORITY_TRIAL_WORKSPACE", default_value_t = defaults().trial.workspace_id.as_str().to_owned())]
    pub trial_workspace: String,

    /// Lifetime of a trial key.
    #[arg(long, env = "KEY_AUTHORITY_TRIAL_TTL", default_value_t = shown(defaults().trial.ttl))]
    pub trial_ttl: humantime::Duration,

    /// Uses (VALID verdicts) of a trial key.
    #[arg(long, env = "KEY_AUTHORITY_TRIAL_USAGE_LIMIT", default_value_t = defaults().trial.usage_limit)]
    pub trial_usage_limit: i64,

    /// IssueTrialKey calls per client IP per minute; 0 issues no trial keys at all.
    #[arg(
        long,
        env = "KEY_AUTHORITY_TRIAL_LIMIT_PER_MINUTE",
        default_value_t = defaults().auth.trial_limit_per_minute
    )]
    pub trial_limit_per_minute: u32,

    /// RevokeTrialKey calls per client IP per minute; 0 allows none.
    #[arg(
        long,
        env = "KEY_AUTHORITY_TRIAL_REVOKE_LIMIT_PER_MINUTE",
        default_value_t = defaults().auth.trial_revoke_limit_per_minute
    )]
    pub trial_revoke_limit_per_minute: u32,

    /// How long an expired trial key is kept before the background sweep deletes it.
    #[arg(long, env = "KEY_AUTHORITY_TRIAL_RETENTION", default_value_t = shown(defaults().trial.retention))]
    pub trial_retention: humantime::Duration,

    /// How often the background sweep deletes expired trial keys (in batches of 500).
    #[arg(long, env = "KEY_AUTHORITY_TRIAL_SWEEP_INTERVAL", default_value_t = shown(defaults().trial.sweep_interval))]
    pub trial_sweep_interval: humantime::Duration,

    /// How long audit events are kept before the background pruning deletes them.
    #[arg(long, env = "KEY_AUTHORITY_AUDIT_RETENTION", default_value_t = shown(defaults().audit.retention))]
    pub audit_retention: humantime::Duration,

    /// How often audit events past the retention are deleted (in batches of 1000).
    #[arg(long, env = "KEY_AUTHORITY_AUDIT_PRUNE_INTERVAL", default_value_t = shown(defaults().audit.prune_interval))]
    pub audit_prune_interval: humantime::Duration,

    /// How long a request id is remembered: a retry with the same id within it gets the first
    /// call's answer (the same secret included) and changes nothing. 0 switches safe retries off.
    #[arg(long, env = "KEY_AUTHORITY_IDEMPOTENCY_WINDOW", default_value_t = shown(defaults().idempotency.window))]
    pub idempotency_window: humantime::Duration,

    /// A file of at least 32 random bytes: the key under which the secrets of keys made with a
    /// request id are derived, kept out of the database. Unset, a key stored in the database is
    /// used. Every replica must read the same file.
    #[arg(long, env = "KEY_AUTHORITY_IDEMPOTENCY_SECRET_FILE")]
    pub idempotency_secret_file: Option<PathBuf>,

    /// How long key events (WatchKeyEvents) are kept before the pruning deletes them.
    #[arg(long, env = "KEY_AUTHORITY_EVENT_RETENTION", default_value_t = shown(defaults().events.retention))]
    pub event_retention: humantime::Duration,

    /// How often keys whose expiry passed are found and announced (`key.expired`).
    #[arg(long, env = "KEY_AUTHORITY_EXPIRY_SWEEP_INTERVAL", default_value_t = shown(defaults().events.expiry_sweep_interval))]
    pub expiry_sweep_interval: humantime::Duration,

    /// Let webhooks point at loopback and private addresses (a receiver on the same host or
    /// network). Link-local and cloud metadata addresses, and this server itself, stay refused.
    #[arg(
        long,
        env = "KEY_AUTHORITY_WEBHOOK_ALLOW_PRIVATE_TARGETS",
        default_value_t = false
    )]
    pub webhook_allow_private_targets: bool,

    /// The limit of one webhook request, connecting included; a slower endpoint is retried.
    #[arg(long, env = "KEY_AUTHORITY_WEBHOOK_TIMEOUT", default_value_t = shown(defaults().webhooks.timeout))]
    pub webhook_timeout: humantime::Duration,

    /// How long a webhook delivery is retried, counted from when it was queued (when its event
    /// happened, or when it was redelivered).
    #[arg(long, env = "KEY_AUTHORITY_WEBHOOK_RETRY_PERIOD", default_value_t = shown(defaults().webhooks.retry_period))]
    pub webhook_retry_period: humantime::Duration,

    /// The delay after a webhook delivery's first failed attempt; it doubles after each next
    /// one (with jitter), up to --webhook-backoff-max.
    #[arg(long, env = "KEY_AUTHORITY_WEBHOOK_BACKOFF_BASE", default_value_t = shown(defaults().webhooks.backoff_base))]
    pub webhook_backoff_base: humantime::Duration,

    /// The longest delay between two attempts of a webhook delivery.
    #[arg(long, env = "KEY_AUTHORITY_WEBHOOK_BACKOFF_MAX", default_value_t = shown(defaults().webhooks.backoff_max))]
    pub webhook_backoff_max: humantime::Duration,

    /// Webhooks this replica sends to at once (each has one delivery in flight at most).
    #[arg(long, env = "KEY_AUTHORITY_WEBHOOK_CONCURRENCY", default_value_t = defaults().webhooks.concurrency)]
    pub webhook_concurrency: usize,

    /// Webhooks a workspace may have.
    #[arg(long, env = "KEY_AUTHORITY_WEBHOOKS_PER_WORKSPACE", default_value_t = defaults().webhooks.max_per_workspace)]
    pub webhooks_per_workspace: usize,

    /// A file of at least 32 random bytes: the key webhook signing secrets are derived under,
    /// kept out of the database. Unset, a key stored in the database is used. Every replica must
    /// read the same file; changing it changes every webhook's secret.
    #[arg(long, env = "KEY_AUTHORITY_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,

    /// Serve HTTP forward auth (nginx auth_request, Caddy forward_auth, Traefik ForwardAuth) at
    /// http://ADDRESS/auth. Off unless set.
    #[arg(long, env = "KEY_AUTHORITY_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,

    /// The gateway file (TOML): scopes, minimum role and cost per route prefix and method, the
    /// API key header, the identity header names. Used by forward auth and Envoy ext_authz.
    #[arg(long, env = "KEY_AUTHORITY_GATEWAY_CONFIG")]
    pub gateway_config: Option<PathBuf>,

    /// Proxies whose X-Forwarded-For is believed by forward auth, as addresses or networks,
    /// comma separated; `none` for none.
    #[arg(
        long,
        env = "KEY_AUTHORITY_TRUSTED_PROXIES",
        default_value = "127.0.0.0/8,::1"
    )]
    pub trusted_proxies: String,

    /// Serve Prometheus metrics at http://ADDRESS/metrics.
    #[arg(long, env = "KEY_AUTHORITY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// How often the database is pinged for the grpc.health status.
    #[arg(long, env = "KEY_AUTHORITY_HEALTH_CHECK_INTERVAL", default_value_t = shown(defaults().health_check_interval))]
    pub health_check_interval: humantime::Duration,

    /// How long a graceful shutdown waits for open calls before closing them.
    #[arg(long, env = "KEY_AUTHORITY_SHUTDOWN_GRACE", default_value_t = shown(defaults().shutdown_grace))]
    pub shutdown_grace: humantime::Duration,

    /// gRPC calls in progress at once, across all connections; the next one is refused at once
    /// with UNAVAILABLE (reason OVERLOADED). grpc.health is exempt. 0 sets no limit.
    #[arg(long, env = "KEY_AUTHORITY_MAX_CONCURRENT_REQUESTS", default_value_t = defaults().overload.max_concurrent_requests)]
    pub max_concurrent_requests: usize,

    /// HTTP/2 streams a client may open at once on one connection (more wait on the client).
    /// 0 sets no limit.
    #[arg(long, env = "KEY_AUTHORITY_MAX_CONCURRENT_STREAMS", default_value_t = defaults().overload.max_concurrent_streams)]
    pub max_concurrent_streams: u32,

    /// PEM certificate chain: serve TLS.
    #[arg(long, env = "KEY_AUTHORITY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "KEY_AUTHORITY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate: require client certificates signed by it (mutual TLS).
    #[arg(long, env = "KEY_AUTHORITY_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

/// A key from a file: at least `MIN_SECRET_LEN` bytes.
fn read_secret_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let secret = read_file(path, what)?;
    if secret.len() < MIN_SECRET_LEN {
        return Err(format!(
            "{what} {} must hold at least {MIN_SECRET_LEN} bytes, it holds {}",
            path.display(),
            secret.len()
        ));
    }
    Ok(secret)
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|error| format!("cannot read {what} {}: {error}", path.display()))
}

/// When no admin token and no JWT key is configured, makes up an admin token so that a first run
/// is usable and never open. Returns it, for `main` to print once.
pub fn ensure_admin_access(config: &mut Config) -> Option<String> {
    if !config.auth.admin_tokens.is_empty() || config.auth.jwt.is_some() {
        return None;
    }
    // 40 base62 characters from the OS CSPRNG: about 238 bits.
    let token = format!("kaadmin_{}", random_base62(40));
    config.auth.admin_tokens.push(token.clone());
    Some(token)
}

impl ServeArgs {
    pub fn into_config(self) -> Result<Config, String> {
        let argon2_threads = match self.argon2_threads {
            0 => std::thread::available_parallelism().map_or(2, usize::from),
            threads => threads,
        };
        if Duration::from(self.usage_flush_interval).is_zero() {
            return Err("usage flush interval must be positive".to_owned());
        }
        let jwt_public_key = self
            .jwt_public_key_file
            .as_deref()
            .map(|path| read_file(path, "JWT public key"))
            .transpose()?;
        let jwt = (self.jwt_secret.is_some() || jwt_public_key.is_some()).then_some(JwtConfig {
            secret: self.jwt_secret,
            public_key_pem: jwt_public_key,
            issuer: self.jwt_issuer,
            audience: self.jwt_audience,
            leeway: Duration::from(self.jwt_leeway),
        });
        let idempotency_secret = self
            .idempotency_secret_file
            .as_deref()
            .map(|path| read_secret_file(path, "idempotency secret file"))
            .transpose()?;
        let webhook_secret = self
            .webhook_secret_file
            .as_deref()
            .map(|path| read_secret_file(path, "webhook secret file"))
            .transpose()?;
        let gateway = GatewayConfig {
            http_listen: self.http_listen,
            routes: self
                .gateway_config
                .as_deref()
                .map(GatewayConfig::read_routes)
                .transpose()?
                .unwrap_or_default(),
            routes_file: self.gateway_config,
            trusted_proxies: TrustedProxies::parse(&self.trusted_proxies)?,
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsConfig {
                cert_pem: read_file(cert, "TLS certificate")?,
                key_pem: read_file(key, "TLS key")?,
                client_ca_pem: self
                    .tls_client_ca
                    .as_deref()
                    .map(|path| read_file(path, "TLS client CA"))
                    .transpose()?,
            }),
            _ => None,
        };
        Ok(Config {
            auth: AuthConfig {
                admin_tokens: self.admin_token,
                jwt,
                verify_tokens: self.verify_tokens,
                issue_limit_per_hour: self.issue_limit_per_hour,
                trial_limit_per_minute: self.trial_limit_per_minute,
                trial_revoke_limit_per_minute: self.trial_revoke_limit_per_minute,
            },
            trial: TrialConfig {
                enabled: self.trial_keys,
                workspace_id: WorkspaceId::parse(&self.trial_workspace)
                    .map_err(|reason| format!("trial workspace {reason}"))?,
                ttl: Duration::from(self.trial_ttl),
                usage_limit: self.trial_usage_limit.max(1),
                retention: Duration::from(self.trial_retention),
                sweep_interval: Duration::from(self.trial_sweep_interval)
                    .max(Duration::from_millis(10)),
                ..TrialConfig::default()
            },
            limits: KeyLimits {
                max_key_lifetime: (!Duration::from(self.max_key_lifetime).is_zero())
                    .then_some(Duration::from(self.max_key_lifetime)),
                max_rotation_grace: Duration::from(self.max_rotation_grace),
            },
            audit: AuditConfig {
                retention: Duration::from(self.audit_retention),
                prune_interval: Duration::from(self.audit_prune_interval)
                    .max(Duration::from_millis(10)),
                ..AuditConfig::default()
            },
            idempotency: IdempotencyConfig {
                window: Duration::from(self.idempotency_window),
                secret: idempotency_secret,
                ..IdempotencyConfig::default()
            },
            events: WatchConfig {
                retention: Duration::from(self.event_retention),
                expiry_sweep_interval: Duration::from(self.expiry_sweep_interval)
                    .max(Duration::from_millis(10)),
                ..WatchConfig::default()
            },
            webhooks: WebhookConfig {
                allow_private_targets: self.webhook_allow_private_targets,
                timeout: Duration::from(self.webhook_timeout).max(Duration::from_millis(10)),
                retry_period: Duration::from(self.webhook_retry_period),
                backoff_base: Duration::from(self.webhook_backoff_base)
                    .max(Duration::from_millis(10)),
                backoff_max: Duration::from(self.webhook_backoff_max)
                    .max(Duration::from_millis(10)),
                concurrency: self.webhook_concurrency.max(1),
                max_per_workspace: self.webhooks_per_workspace,
                secret: webhook_secret,
                ..WebhookConfig::default()
            },
            tls,
            gateway,
            metrics_listen: self.metrics_listen,
            shutdown_grace: Duration::from(self.shutdown_grace),
            overload: OverloadConfig {
                max_concurrent_requests: self.max_concurrent_requests,
                max_concurrent_streams: self.max_concurrent_streams,
            },
            health_check_interval: Duration::from(self.health_check_interval)
                .max(Duration::from_millis(10)),
            listen: self.listen,
            database_url: self.database.database_url,
            db_max_connections: self.database.db_max_connections,
            brand: Brand::parse(&self.key_prefix)?,
            hash_params: HashParams {
                memory_kib: self.argon2_memory_kib,
                iterations: self.argon2_iterations,
                parallelism: self.argon2_parallelism,
            },
            argon2_threads,
            argon2_priority: self.argon2_priority,
            argon2_unproven: UnprovenBudget {
                per_second: self.argon2_unproven_per_second,
                queue_depth: self.argon2_unproven_queue.max(1),
            },
            verify: VerifyConfig {
                verdict_cache_capacity: self.verdict_cache_capacity,
                negative_verdict_ttl: Duration::from(self.negative_verdict_ttl),
                state_cache_capacity: self.state_cache_capacity,
                state_ttl: Duration::from(self.state_cache_ttl),
                stale_if_error: Duration::from(self.stale_if_error),
                lockout: LockoutConfig {
                    key_failures: self.lockout_key_failures,
                    ip_failures: self.lockout_ip_failures,
                    window: Duration::from(self.lockout_window),
                    duration: Duration::from(self.lockout_duration),
                    capacity: self.lockout_capacity,
                },
            },
            usage: UsageConfig {
                flush_interval: Duration::from(self.usage_flush_interval),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let cli = Cli::try_parse_from(["key-authority", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("expected serve");
        };
        let config = args.into_config().unwrap();
        // One source of defaults: the flags' are `Config::default()`'s, field for field.
        assert_eq!(format!("{config:?}"), format!("{:?}", Config::default()));
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(config.brand.as_str(), "ka");
        assert_eq!(config.verify.state_ttl, Duration::from_secs(5));
        // The flags' defaults are the library's defaults.
        assert_eq!(config.limits, KeyLimits::default());
        assert_eq!(config.argon2_unproven, UnprovenBudget::default());
        assert_eq!(config.overload, OverloadConfig::default());
        assert!(config.trial.enabled);
        assert_eq!(config.trial.retention, TrialConfig::default().retention);
        assert_eq!(
            config.trial.sweep_interval,
            TrialConfig::default().sweep_interval
        );
    }

    fn serve_args(args: &[&str]) -> Box<ServeArgs> {
        let cli = Cli::try_parse_from(["key-authority", "serve"].iter().chain(args)).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("expected serve");
        };
        args
    }

    #[test]
    fn idempotency_settings_parse() {
        let config = serve_args(&[]).into_config().unwrap();
        assert_eq!(config.idempotency.window, Duration::from_secs(24 * 60 * 60));
        assert_eq!(config.idempotency.secret, None);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("idempotency.key");
        std::fs::write(&file, [7u8; 32]).unwrap();
        let path = file.to_str().unwrap();
        let config = serve_args(&[
            "--idempotency-window",
            "90s",
            "--idempotency-secret-file",
            path,
        ])
        .into_config()
        .unwrap();
        assert_eq!(config.idempotency.window, Duration::from_secs(90));
        assert_eq!(config.idempotency.secret, Some(vec![7u8; 32]));
        assert!(
            !format!("{config:?}").contains("7, 7"),
            "the secret never shows"
        );

        std::fs::write(&file, [7u8; 31]).unwrap();
        let error = serve_args(&["--idempotency-secret-file", path])
            .into_config()
            .unwrap_err();
        assert!(error.contains("at least 32 bytes"), "{error}");
        let missing = dir.path().join("missing");
        assert!(
            serve_args(&["--idempotency-secret-file", missing.to_str().unwrap()])
                .into_config()
                .is_err()
        );
    }

    #[test]
    fn bad_prefix_is_refused() {
        let cli =
            Cli::try_parse_from(["key-authority", "serve", "--key-prefix", "Bad_One"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("expected serve");
        };
        assert!(args.into_config().is_err());
    }
}
