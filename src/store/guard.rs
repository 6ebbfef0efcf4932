//! Failing fast while the database is down: a circuit breaker in front of the store.
//!
//! Without it, every call that needs the database during an outage waits out the pool's acquire
//! timeout (5 s) before it fails, so a caller with a shorter deadline hears DEADLINE_EXCEEDED and
//! never the documented UNAVAILABLE. Here:
//! - the first call that finds the database unreachable (an I/O error, a refused or timed-out
//!   connection: `Error::Unavailable`) opens the breaker, and so does a failed health ping; a
//!   call that runs out of time waiting starts a probe, whose failure opens it;
//! - while it is open, every call fails at once with `Error::Unavailable`, and calls already
//!   waiting for the database give up too;
//! - a background probe opens a fresh connection every `PROBE_INTERVAL` and closes the breaker
//!   when one succeeds; the pool then reconnects by itself;
//! - whatever the breaker says, no call waits for the database past the gRPC call's deadline
//!   (`crate::deadline`): it answers UNAVAILABLE a little before.
//!
//! A mutation cut short this way is rolled back with its transaction, unless its commit was
//! already on its way: the caller cannot tell, and retries it with the same request id.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{
    Changes, DoneRequest, ExpirySweep, ListQuery, Mutation, PoolStats, Revocation, Rotation, Store,
    StoreKind, UsageDelta, UsageWriteError, WebhookStore,
};
use crate::audit::{AuditEvent, AuditQuery};
use crate::error::{Error, Result};
use crate::events::{EventQuery, KeyEvent};
use crate::key::{Key, KeyId, StoredKey, WorkspaceId};
use crate::timestamp::UnixMicros;
use crate::webhooks::model::{
    Attempt, AttemptResult, ClaimedWebhook, Delivery, DeliveryQuery, Lease, Webhook,
};

/// How often an open breaker probes the database.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The least time a call must have given the database for running out of it to start a probe.
const MIN_TELLING_BUDGET: Duration = Duration::from_millis(100);
/// What a call keeps of its deadline for answering (at most a quarter of it): the database gets
/// the rest. Generous, so that the answer beats the deadline on a busy machine too.
const ANSWER_MARGIN: Duration = Duration::from_millis(200);

/// Whether the database is known to be unreachable.
#[derive(Debug)]
pub struct Breaker {
    open: AtomicBool,
    /// Follows `open`, for waiting on it.
    state: watch::Sender<bool>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            open: AtomicBool::new(false),
            state: watch::channel(false).0,
        }
    }
}

impl Breaker {
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Opens the breaker (if it was closed), saying why in the log.
    pub fn trip(&self, why: &str) {
        if !self.open.swap(true, Ordering::AcqRel) {
            tracing::warn!(reason = %why, "database unreachable: failing fast until a probe reaches it");
            self.state.send_replace(true);
        }
    }

    fn close(&self) {
        if self.open.swap(false, Ordering::AcqRel) {
            tracing::info!("database reachable again");
            self.state.send_replace(false);
        }
    }

    fn refusal() -> Error {
        Error::Unavailable("the database is unreachable (failing fast until it answers)".to_owned())
    }
}

/// A store whose calls go through a `Breaker`.
pub struct GuardedStore {
    inner: Arc<dyn Store>,
    breaker: Arc<Breaker>,
    /// A probe started by a call that ran out of time is under way.
    suspecting: Arc<AtomicBool>,
}

impl GuardedStore {
    /// Wraps `inner` and starts its probe, which ends when the store is dropped.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        let breaker = Arc::new(Breaker::default());
        tokio::spawn(probe(Arc::downgrade(&inner), breaker.clone()));
        Self {
            inner,
            breaker,
            suspecting: Arc::default(),
        }
    }

    /// A call ran out of time waiting for the database. Slow is not down, so the breaker stays
    /// closed, but one probe (a fresh connection) finds out at once: while the pool keeps
    /// retrying connections to a server that is gone, every call would otherwise wait out its
    /// whole deadline.
    fn suspect(&self) {
        if self.breaker.is_open() || self.suspecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (store, breaker) = (Arc::downgrade(&self.inner), self.breaker.clone());
        let suspecting = self.suspecting.clone();
        tokio::spawn(async move {
            if let Some(store) = store.upgrade() {
                match tokio::time::timeout(PROBE_TIMEOUT, store.probe()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => breaker.trip(&error.to_string()),
                    Err(_) => breaker.trip("a probe found no database within its timeout"),
                }
            }
            // At most one probe per interval, however many calls run out of time: a caller
            // cannot turn its own short deadlines into a stream of fresh connections.
            tokio::time::sleep(PROBE_INTERVAL).await;
            suspecting.store(false, Ordering::Release);
        });
    }

    /// Runs one database call: refused at once while the breaker is open; given up when the
    /// breaker opens meanwhile or the gRPC call's deadline is near; opens the breaker when the
    /// database turns out to be unreachable.
    async fn guard<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        if self.breaker.is_open() {
            return Err(Breaker::refusal());
        }
        let mut state = self.breaker.state.subscribe();
        let budget = crate::deadline::remaining()
            .map(|left| left.saturating_sub(ANSWER_MARGIN.min(left / 4)));
        let bounded = async {
            match budget {
                Some(budget) => tokio::time::timeout(budget, call).await.map_err(|_| {
                    Error::Unavailable(
                        "the database did not answer before the call's deadline".to_owned(),
                    )
                }),
                None => Ok(call.await),
            }
        };
        let result = tokio::select! {
            result = bounded => match result {
                Ok(result) => result,
                Err(too_late) => {
                    // A deadline too short for any database says nothing about this one.
                    if budget.is_some_and(|budget| budget >= MIN_TELLING_BUDGET) {
                        self.suspect();
                    }
                    return Err(too_late);
                }
            },
            _ = state.wait_for(|open| *open) => return Err(Breaker::refusal()),
        };
        if let Err(Error::Unavailable(why)) = &result {
            self.breaker.trip(why);
        }
        result
    }
}

/// While the breaker is open, tries a fresh connection every `PROBE_INTERVAL`; closes it on the
/// first that answers.
async fn probe(store: Weak<dyn Store>, breaker: Arc<Breaker>) {
    let mut state = breaker.state.subscribe();
    loop {
        if state.wait_for(|open| *open).await.is_err() {
            return;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
        let Some(store) = store.upgrade() else {
            return;
        };
        if let Ok(Ok(())) = tokio::time::timeout(PROBE_TIMEOUT, store.probe()).await {
            breaker.close();
        }
    }
}

#[async_trait]
impl Store for GuardedStore {
    async fn insert_key(&self, key: &StoredKey, mutation: &Mutation) -> Result<()> {
        self.guard(self.inner.insert_key(key, mutation)).await
    }

    async fn get_key(&self, workspace_id: &WorkspaceId, key_id: &KeyId) -> Result<Option<Key>> {
        self.guard(self.inner.get_key(workspace_id, key_id)).await
    }

    async fn find_key_for_verify(&self, key_id: &KeyId) -> Result<Option<StoredKey>> {
        self.guard(self.inner.find_key_for_verify(key_id)).await
    }

    async fn list_keys(&self, query: &ListQuery) -> Result<(Vec<Key>, i64)> {
        self.guard(self.inner.list_keys(query)).await
    }

    async fn revoke_key(
        &self,
        workspace_id: &WorkspaceId,
        key_id: &KeyId,
        successors: bool,
        revoked_by: &str,
        mutation: &Mutation,
    ) -> Result<Option<Revocation>> {
        self.guard(
            self.inner
                .revoke_key(workspace_id, key_id, successors, revoked_by, mutation),
        )
        .await
    }

    async fn rotate_key(
        &self,
        workspace_id: &WorkspaceId,
        key_id: &KeyId,
        version: i64,
        successor: &StoredKey,
        previous_expire_time: UnixMicros,
        mutation: &Mutation,
    ) -> Result<Option<Rotation>> {
        self.guard(self.inner.rotate_key(
            workspace_id,
            key_id,
            version,
            successor,
            previous_expire_time,
            mutation,
        ))
        .await
    }

    async fn update_key(&self, key: &Key, mutation: &Mutation) -> Result<Option<Key>> {
        self.guard(self.inner.update_key(key, mutation)).await
    }

    async fn find_request(&self, scope: &str, request_id: &str) -> Result<Option<DoneRequest>> {
        self.guard(self.inner.find_request(scope, request_id)).await
    }

    async fn delete_requests_before(&self, before: UnixMicros, limit: u32) -> Result<u64> {
        self.guard(self.inner.delete_requests_before(before, limit))
            .await
    }

    async fn insert_audit_event(
        &self,
        workspace_id: &WorkspaceId,
        key_id: &KeyId,
        mutation: &Mutation,
    ) -> Result<()> {
        self.guard(
            self.inner
                .insert_audit_event(workspace_id, key_id, mutation),
        )
        .await
    }

    async fn list_audit_events(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>> {
        self.guard(self.inner.list_audit_events(query)).await
    }

    async fn delete_audit_events_before(&self, before: UnixMicros, limit: u32) -> Result<u64> {
        self.guard(self.inner.delete_audit_events_before(before, limit))
            .await
    }

    async fn list_key_events(&self, query: &EventQuery) -> Result<Vec<KeyEvent>> {
        self.guard(self.inner.list_key_events(query)).await
    }

    async fn latest_event_position(&self) -> Result<i64> {
        self.guard(self.inner.latest_event_position()).await
    }

    async fn events_pruned_through(&self) -> Result<i64> {
        self.guard(self.inner.events_pruned_through()).await
    }

    async fn delete_key_events_before(&self, before: UnixMicros, limit: u32) -> Result<u64> {
        self.guard(self.inner.delete_key_events_before(before, limit))
            .await
    }

    async fn announce_expired_keys(&self, now: UnixMicros, limit: u32) -> Result<ExpirySweep> {
        self.guard(self.inner.announce_expired_keys(now, limit))
            .await
    }

    async fn record_usage(
        &self,
        deltas: &[UsageDelta],
    ) -> std::result::Result<(), UsageWriteError> {
        // Background work: no call deadline to keep.
        if self.breaker.is_open() {
            return Err(UsageWriteError {
                written: 0,
                error: Breaker::refusal(),
            });
        }
        let result = self.inner.record_usage(deltas).await;
        if let Err(UsageWriteError {
            error: Error::Unavailable(why),
            ..
        }) = &result
        {
            self.breaker.trip(why);
        }
        result
    }

    async fn report_usage(
        &self,
        workspace_id: &WorkspaceId,
        deltas: &[UsageDelta],
        claim: Option<&super::RequestClaim>,
    ) -> Result<Vec<KeyId>> {
        self.guard(self.inner.report_usage(workspace_id, deltas, claim))
            .await
    }

    async fn consume_usage(&self, budget_id: &str, cost: i64) -> Result<Option<i64>> {
        self.guard(self.inner.consume_usage(budget_id, cost)).await
    }

    async fn delete_ended_trial_keys(&self, before: UnixMicros, limit: u32) -> Result<u64> {
        self.guard(self.inner.delete_ended_trial_keys(before, limit))
            .await
    }

    async fn shared_secret(&self, name: &str) -> Result<Vec<u8>> {
        self.guard(self.inner.shared_secret(name)).await
    }

    fn webhooks(&self) -> &dyn WebhookStore {
        self
    }

    async fn ping(&self) -> Result<()> {
        self.guard(self.inner.ping()).await
    }

    async fn probe(&self) -> Result<()> {
        self.inner.probe().await
    }

    fn breaker(&self) -> Option<&Breaker> {
        Some(&self.breaker)
    }

    fn kind(&self) -> StoreKind {
        self.inner.kind()
    }

    fn changes(&self) -> Changes {
        self.inner.changes()
    }

    fn pool_stats(&self) -> PoolStats {
        self.inner.pool_stats()
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

#[async_trait]
impl WebhookStore for GuardedStore {
    async fn insert_webhook(&self, webhook: &Webhook, max_per_workspace: usize) -> Result<bool> {
        let inner = self.inner.webhooks();
        self.guard(inner.insert_webhook(webhook, max_per_workspace))
            .await
    }

    async fn list_webhooks(&self, workspace_id: &str) -> Result<Vec<Webhook>> {
        self.guard(self.inner.webhooks().list_webhooks(workspace_id))
            .await
    }

    async fn get_webhook(&self, workspace_id: &str, webhook_id: &str) -> Result<Option<Webhook>> {
        let inner = self.inner.webhooks();
        self.guard(inner.get_webhook(workspace_id, webhook_id))
            .await
    }

    async fn delete_webhook(
        &self,
        workspace_id: &str,
        webhook_id: &str,
    ) -> Result<Option<Webhook>> {
        let inner = self.inner.webhooks();
        self.guard(inner.delete_webhook(workspace_id, webhook_id))
            .await
    }

    async fn list_deliveries(&self, query: &DeliveryQuery) -> Result<Vec<Delivery>> {
        self.guard(self.inner.webhooks().list_deliveries(query))
            .await
    }

    async fn find_event(&self, workspace_id: &str, event_id: &str) -> Result<Option<KeyEvent>> {
        let inner = self.inner.webhooks();
        self.guard(inner.find_event(workspace_id, event_id)).await
    }

    async fn event_at(&self, position: i64) -> Result<Option<KeyEvent>> {
        self.guard(self.inner.webhooks().event_at(position)).await
    }

    async fn queue_redelivery(
        &self,
        webhook_id: &str,
        event: &KeyEvent,
        now: UnixMicros,
        max_pending: u32,
    ) -> Result<Option<Delivery>> {
        let inner = self.inner.webhooks();
        self.guard(inner.queue_redelivery(webhook_id, event, now, max_pending))
            .await
    }

    async fn claim_webhooks(
        &self,
        owner: &str,
        now: UnixMicros,
        lease_until: UnixMicros,
        limit: u32,
    ) -> Result<Vec<ClaimedWebhook>> {
        let inner = self.inner.webhooks();
        self.guard(inner.claim_webhooks(owner, now, lease_until, limit))
            .await
    }

    async fn queue_deliveries(
        &self,
        lease: &Lease,
        from: i64,
        through: i64,
        events: &[KeyEvent],
        now: UnixMicros,
        lease_until: UnixMicros,
    ) -> Result<bool> {
        let inner = self.inner.webhooks();
        self.guard(inner.queue_deliveries(lease, from, through, events, now, lease_until))
            .await
    }

    async fn next_delivery(&self, webhook_id: &str) -> Result<Option<Delivery>> {
        self.guard(self.inner.webhooks().next_delivery(webhook_id))
            .await
    }

    async fn record_attempt(
        &self,
        lease: &Lease,
        delivery: &Delivery,
        attempt: &Attempt,
        result: AttemptResult,
        lease_until: UnixMicros,
    ) -> Result<bool> {
        let inner = self.inner.webhooks();
        self.guard(inner.record_attempt(lease, delivery, attempt, result, lease_until))
            .await
    }

    async fn release_webhook(&self, lease: &Lease, due_time: UnixMicros) -> Result<()> {
        let inner = self.inner.webhooks();
        self.guard(inner.release_webhook(lease, due_time)).await
    }

    async fn delete_finished_deliveries(&self, before: UnixMicros, limit: u32) -> Result<u64> {
        let inner = self.inner.webhooks();
        self.guard(inner.delete_finished_deliveries(before, limit))
            .await
    }
}
