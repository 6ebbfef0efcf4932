//! The server's periodic background work: forgetting idle rate-limit entries, sweeping expired
//! trial keys, pruning the audit trail and the request ids past their window, and dropping
//! expired cache entries when no traffic does it.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::App;
use crate::audit::{self, AuditConfig};
use crate::auth::RateLimits;
use crate::events::{self, WatchConfig};
use crate::keys::KeyManager;
use crate::keys::idempotency::IdempotencyConfig;
use crate::store::Store;
use crate::webhooks;

/// How often expired cache entries and lockouts are dropped when no traffic does it.
const CACHE_HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(5);

/// Starts every periodic task; they run until aborted.
pub(super) fn spawn(app: &App) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(forget_idle_limits(app.rate_limits.clone())),
        tokio::spawn(sweep_trial_keys(app.keys.clone())),
        tokio::spawn(prune_audit_trail(app.store.clone(), app.audit)),
        tokio::spawn(prune_key_events(
            app.store.clone(),
            app.audit.prune_interval,
            *app.events.config(),
        )),
        tokio::spawn(announce_expired_keys(
            app.store.clone(),
            *app.events.config(),
        )),
        tokio::spawn(prune_request_ids(app.keys.clone(), app.idempotency.clone())),
        tokio::spawn(
            app.dispatcher
                .clone()
                .run(app.events.doorbell(), app.events.shutting_down()),
        ),
        tokio::spawn(
            app.verifier
                .clone()
                .keep_caches_tidy(CACHE_HOUSEKEEPING_INTERVAL),
        ),
    ]
}

/// Keeps the rate limiter's memory bounded by recently active callers.
async fn forget_idle_limits(limits: RateLimits) {
    let mut ticker = tokio::time::interval(Duration::from_secs(60));
    loop {
        ticker.tick().await;
        limits.forget_idle();
    }
}

/// Deletes audit events past their retention, in bounded batches.
async fn prune_audit_trail(store: Arc<dyn Store>, config: AuditConfig) {
    let mut ticker = tokio::time::interval(config.prune_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match audit::prune(store.as_ref(), &config).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "audit events past their retention deleted"),
            Err(error) => tracing::warn!(%error, "audit pruning failed"),
        }
    }
}

/// Deletes the request ids past their window, in bounded batches: after that, nothing can
/// derive the secrets of the keys they made. Every replica prunes.
async fn prune_request_ids(keys: Arc<KeyManager>, config: IdempotencyConfig) {
    let mut ticker = tokio::time::interval(config.prune_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match keys.prune_requests(config.prune_batch).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "request ids past their window deleted"),
            Err(error) => tracing::warn!(%error, "request id pruning failed"),
        }
    }
}

/// Deletes key events past their retention, and the finished webhook deliveries of that age, in
/// bounded batches (on the audit pruning's schedule).
async fn prune_key_events(store: Arc<dyn Store>, every: Duration, config: WatchConfig) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match events::prune(store.as_ref(), &config).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "key events past their retention deleted"),
            Err(error) => tracing::warn!(%error, "key event pruning failed"),
        }
        // Finished webhook deliveries go with the events they delivered.
        match webhooks::prune_deliveries(store.as_ref(), config.retention).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "finished webhook deliveries deleted"),
            Err(error) => tracing::warn!(%error, "webhook delivery pruning failed"),
        }
    }
}

/// Announces keys whose expiry passed (`key.expired`, once per key). Every replica sweeps; the
/// database lets only one announce each key.
async fn announce_expired_keys(store: Arc<dyn Store>, config: WatchConfig) {
    let mut ticker = tokio::time::interval(config.expiry_sweep_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match events::announce_expired(store.as_ref()).await {
            Ok(0) => {}
            Ok(announced) => tracing::info!(announced, "expired keys announced"),
            Err(error) => tracing::warn!(%error, "expiry sweep failed"),
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
