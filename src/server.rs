//! The composition root: builds the application's parts (store, caches, verifier, key manager,
//! authentication) from a `Config`. Serving and draining are in `serving`, grpc.health in
//! `health`, the periodic background work in `background`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::audit::{AuditConfig, LockoutAuditor, write_lockouts};
use crate::auth::{Authenticator, RateLimits};
pub use crate::config::{Config, TlsConfig};
use crate::error::{Error, Result};
use crate::events::EventHub;
use crate::gateway::Gateway;
use crate::key::{HashPool, HashThreads, SecretHasher};
use crate::keys::KeyManager;
use crate::keys::idempotency::{Idempotency, IdempotencyConfig, SHARED_SECRET_NAME};
use crate::keys::page_token::PageTokenCodec;
use crate::metrics::{Metrics, Sources};
use crate::store::{self, Store};
use crate::verify::{ChangeFeedStatus, UsageRecorder, Verifier, follow_changes};
use crate::webhooks::{Dispatcher, SigningKeys, TargetPolicy, WebhookManager, signing};

mod background;
mod health;
mod overload;
mod serving;

pub use overload::OverloadConfig;
pub use serving::{RunningServer, serve, serve_on, shutdown_signal};

/// The application's shared parts, built once.
pub struct App {
    pub store: Arc<dyn Store>,
    pub keys: Arc<KeyManager>,
    pub verifier: Arc<Verifier>,
    pub usage: UsageRecorder,
    pub auth: Arc<Authenticator>,
    /// KeyService's rate limits (shared with the key manager), for forgetting idle callers.
    pub rate_limits: RateLimits,
    pub metrics: Arc<Metrics>,
    /// The cross-replica change feed (on a shared database) and what it has done.
    pub change_feed: Option<(JoinHandle<()>, ChangeFeedStatus)>,
    /// How long the audit trail is kept.
    pub audit: AuditConfig,
    /// How long request ids are remembered, and how they are pruned.
    pub idempotency: IdempotencyConfig,
    /// Writes lockout events behind VerifyKey; ends when the verifier is dropped.
    pub lockout_writer: JoinHandle<()>,
    /// WatchKeyEvents' watchers, and the task that rings their doorbell.
    pub events: EventHub,
    pub event_doorbell: JoinHandle<()>,
    /// The webhook RPCs, and the sending of webhooks (run by `background`).
    pub webhooks: Arc<WebhookManager>,
    pub dispatcher: Arc<Dispatcher>,
    /// Envoy ext_authz and HTTP forward auth: the verifier behind the gateway file's routes.
    pub gateway: Arc<Gateway>,
}

impl App {
    /// `own_addresses`: where this server listens, which no webhook may point at.
    pub async fn build(config: &Config, own_addresses: Vec<SocketAddr>) -> Result<Self> {
        let store = store::open(&config.database_url, config.db_max_connections).await?;
        let hasher = SecretHasher::new(config.hash_params)
            .map_err(|reason| Error::invalid("argon2", reason))?;
        let threads = HashThreads::new(config.argon2_threads, config.argon2_priority)?;
        let hashes = HashPool::new(hasher, threads).with_unproven_budget(config.argon2_unproven);
        let page_token_key = store.shared_secret("page_token_mac").await?;
        let page_tokens = PageTokenCodec::new(page_token_key.clone());
        // Kept out of the database when the operator gives a file (README, "Safe retries").
        let idempotency_key = match &config.idempotency.secret {
            Some(secret) => secret.clone(),
            None => store.shared_secret(SHARED_SECRET_NAME).await?,
        };
        let usage = UsageRecorder::new(store.clone());
        let verifier = Arc::new(Verifier::new(
            store.clone(),
            hashes.clone(),
            usage.clone(),
            &config.verify,
        ));
        // Lockouts reach the audit trail through a bounded queue, never slowing VerifyKey.
        let (lockout_auditor, lockouts) = LockoutAuditor::channel();
        verifier.lockouts().report_to(lockout_auditor);
        let lockout_writer = tokio::spawn(write_lockouts(store.clone(), lockouts));
        let rate_limits = RateLimits::new(
            config.auth.issue_limit_per_hour,
            config.auth.trial_limit_per_minute,
            config.auth.trial_revoke_limit_per_minute,
        );
        let (events, event_doorbell) = EventHub::start(store.clone(), config.events);
        let keys = Arc::new(
            KeyManager::new(
                store.clone(),
                hashes,
                config.brand.clone(),
                page_tokens,
                verifier.invalidator(),
                config.trial.clone(),
            )
            .with_limits(config.limits)
            .with_rate_limits(rate_limits.clone())
            .with_idempotency(Idempotency::new(idempotency_key, config.idempotency.window))
            .with_events(events.clone()),
        );
        let (webhooks, dispatcher) = webhooks(
            config,
            store.clone(),
            own_addresses,
            PageTokenCodec::new(page_token_key),
        )
        .await?;
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
            events: events.clone(),
            webhooks: dispatcher.stats(),
        });
        let gateway = Arc::new(Gateway::new(
            verifier.clone(),
            metrics.clone(),
            Arc::new(config.gateway.routes.clone()),
        ));
        Ok(Self {
            gateway,
            metrics,
            change_feed,
            audit: config.audit,
            idempotency: config.idempotency.clone(),
            lockout_writer,
            events,
            event_doorbell,
            webhooks,
            dispatcher,
            store,
            keys,
            verifier,
            usage,
            auth,
            rate_limits,
        })
    }
}

/// The webhook RPCs' manager and the dispatcher that sends, sharing the target rules and the
/// signing key (from the operator's file, else one kept in the database).
async fn webhooks(
    config: &Config,
    store: Arc<dyn Store>,
    own_addresses: Vec<SocketAddr>,
    page_tokens: PageTokenCodec,
) -> Result<(Arc<WebhookManager>, Arc<Dispatcher>)> {
    let policy = Arc::new(TargetPolicy {
        allow_private: config.webhooks.allow_private_targets,
        own_addresses,
    });
    let key = match &config.webhooks.secret {
        Some(secret) => secret.clone(),
        None => store.shared_secret(signing::SHARED_SECRET_NAME).await?,
    };
    let keys = SigningKeys::new(key);
    let dispatcher = Arc::new(Dispatcher::new(
        store.clone(),
        policy.clone(),
        keys.clone(),
        config.webhooks.clone(),
    )?);
    let manager = Arc::new(WebhookManager::new(
        store,
        policy,
        keys,
        config.webhooks.clone(),
        page_tokens,
        dispatcher.clone(),
    ));
    Ok((manager, dispatcher))
}
