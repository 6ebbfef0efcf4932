//! Sending webhooks. Every replica runs one dispatcher: it leases webhooks that have work (rows
//! claimed with `FOR UPDATE SKIP LOCKED` on PostgreSQL, so two replicas never hold the same one)
//! and, for each, queues the new events it wants and sends its deliveries one at a time, oldest
//! first, recording every attempt. A failed attempt schedules the next with exponential backoff
//! and jitter and releases the webhook until then: nothing behind it overtakes it (order), and a
//! dead endpoint holds one task of this replica at most for one attempt's timeout. The gRPC API
//! never waits for any of this.
//!
//! A replica that dies mid-delivery leaves its lease to run out; the next replica to claim the
//! webhook finds the delivery still pending and sends it again (at least once; receivers dedupe
//! by the `webhook-id` header, the event id).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{Notify, Semaphore, watch};

use super::WebhookConfig;
use super::model::{Attempt, AttemptResult, ClaimedWebhook, Delivery, Lease, Webhook};
use super::signing::SigningKeys;
use super::target::{ForbiddenTarget, GuardedResolver, TargetPolicy};
use crate::error::{Error, Result};
use crate::events::{EventQuery, KeyEvent};
use crate::store::Store;
use crate::timestamp::{UnixMicros, duration_micros, now_micros, rfc3339};

/// Deliveries one lease sends before the webhook goes back to the queue (fairness between
/// webhooks when one has a long backlog).
const DELIVERIES_PER_LEASE: usize = 100;
/// Events read from the outbox at once when queueing deliveries.
const QUEUE_BATCH: u32 = 256;
/// The `user-agent` of webhook requests.
const USER_AGENT: &str = concat!("key-authority-webhooks/", env!("CARGO_PKG_VERSION"));

/// Counters for metrics, read at scrape time.
#[derive(Debug, Default)]
pub struct DispatchStats {
    pub attempts: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub delivered: AtomicU64,
    pub gave_up: AtomicU64,
    /// Microseconds from an event to its delivery, for the last one delivered.
    pub last_lag_micros: AtomicI64,
    /// Webhooks being sent to by this replica now.
    pub in_flight: AtomicU64,
}

pub struct Dispatcher {
    store: Arc<dyn Store>,
    client: reqwest::Client,
    policy: Arc<TargetPolicy>,
    keys: SigningKeys,
    config: WebhookConfig,
    /// This replica's lease owner id.
    owner: String,
    stats: Arc<DispatchStats>,
    /// The earliest retry this replica scheduled, so the loop wakes for it.
    next_due: std::sync::Mutex<Option<UnixMicros>>,
    /// Rung when a webhook task finishes: its slot is free and it may have more work.
    finished: Notify,
}

/// How a lease ended.
enum Drained {
    /// Nothing more to do before this time.
    DueAt(UnixMicros),
    /// Another replica holds the webhook now (or it was deleted): leave it.
    LeaseLost,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        policy: Arc<TargetPolicy>,
        keys: SigningKeys,
        config: WebhookConfig,
    ) -> Result<Self> {
        // reqwest's rustls needs a process-wide crypto provider: ring, as tonic uses. Installing
        // it twice (another server in the same process) is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            // A redirect or a proxy would take the request past the target checks.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                policy: policy.clone(),
            }))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|error| Error::Internal(format!("webhook HTTP client: {error}")))?;
        Ok(Self {
            store,
            client,
            policy,
            keys,
            config,
            owner: uuid::Uuid::new_v4().to_string(),
            stats: Arc::default(),
            next_due: std::sync::Mutex::new(None),
            finished: Notify::new(),
        })
    }

    /// Looks for work at once (a redelivery was queued on this replica).
    pub fn wake(&self) {
        self.finished.notify_one();
    }

    pub fn stats(&self) -> Arc<DispatchStats> {
        self.stats.clone()
    }

    /// How long a lease lasts: an attempt's timeout twice over, and a margin for the database.
    fn lease_length(&self) -> i64 {
        duration_micros(self.config.timeout * 2 + Duration::from_secs(2))
    }

    /// Claims and sends until `shutdown` turns true; wakes on new events (`doorbell`), on a
    /// finished task, on its own scheduled retries, and every poll interval (others' retries,
    /// other replicas' leases running out).
    pub async fn run(
        self: Arc<Self>,
        mut doorbell: watch::Receiver<u64>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let slots = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let mut doorbell_rings = true;
        loop {
            let free = slots.available_permits();
            if free > 0 {
                let now = now_micros();
                let claimed = self
                    .store
                    .webhooks()
                    .claim_webhooks(
                        &self.owner,
                        now,
                        now + self.lease_length(),
                        u32::try_from(free).unwrap_or(u32::MAX),
                    )
                    .await;
                match claimed {
                    Ok(claimed) => {
                        for webhook in claimed {
                            let Ok(permit) = slots.clone().try_acquire_owned() else {
                                break;
                            };
                            let dispatcher = self.clone();
                            tokio::spawn(async move {
                                dispatcher.work(webhook).await;
                                drop(permit);
                                dispatcher.finished.notify_one();
                            });
                        }
                    }
                    Err(error) => tracing::warn!(%error, "claiming webhooks failed"),
                }
            }
            let wait = self.wait_time();
            tokio::select! {
                // A doorbell whose sender is gone (the hub stopped) is never ready again, rather
                // than ready at once forever.
                rung = doorbell.changed(), if doorbell_rings => doorbell_rings = rung.is_ok(),
                _ = self.finished.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|down| *down) => return,
            }
        }
    }

    /// Until the next retry this replica scheduled, or the poll interval, whichever is sooner.
    fn wait_time(&self) -> Duration {
        let now = now_micros();
        let mut next_due = self
            .next_due
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let until_due = match *next_due {
            Some(due) if due > now => Some(Duration::from_micros((due - now) as u64)),
            Some(_) => {
                *next_due = None;
                Some(Duration::ZERO)
            }
            None => None,
        };
        until_due.map_or(self.config.poll_interval, |wait| {
            wait.min(self.config.poll_interval)
        })
    }

    fn note_due(&self, due: UnixMicros) {
        let mut next_due = self
            .next_due
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        *next_due = Some(next_due.map_or(due, |known| known.min(due)));
    }

    /// Sends one claimed webhook's due deliveries, then releases it until its next due time.
    async fn work(&self, claimed: ClaimedWebhook) {
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let lease = Lease {
            webhook_id: claimed.webhook.webhook_id.clone(),
            owner: self.owner.clone(),
        };
        let due = match self.drain(&claimed, &lease).await {
            Ok(Drained::DueAt(due)) => Some(due),
            Ok(Drained::LeaseLost) => None,
            Err(error) => {
                tracing::warn!(%error, webhook_id = %lease.webhook_id, "webhook delivery failed");
                Some(now_micros() + duration_micros(self.config.poll_interval))
            }
        };
        if let Some(due) = due {
            if let Err(error) = self.store.webhooks().release_webhook(&lease, due).await {
                // The lease runs out by itself.
                tracing::warn!(%error, webhook_id = %lease.webhook_id, "releasing a webhook failed");
            }
            self.note_due(due);
        }
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    async fn drain(&self, claimed: &ClaimedWebhook, lease: &Lease) -> Result<Drained> {
        let webhook = &claimed.webhook;
        let mut cursor = claimed.cursor;
        for _ in 0..DELIVERIES_PER_LEASE {
            if !self.queue_new_events(webhook, lease, &mut cursor).await? {
                return Ok(Drained::LeaseLost);
            }
            let now = now_micros();
            let Some(delivery) = self
                .store
                .webhooks()
                .next_delivery(&webhook.webhook_id)
                .await?
            else {
                return Ok(Drained::DueAt(now));
            };
            if let Some(at) = delivery.next_attempt_time.filter(|at| *at > now) {
                return Ok(Drained::DueAt(at));
            }
            let (attempt, result) = self.attempt(webhook, &delivery).await?;
            let lease_until = now_micros() + self.lease_length();
            let recorded = self
                .store
                .webhooks()
                .record_attempt(lease, &delivery, &attempt, result, lease_until)
                .await?;
            if !recorded {
                return Ok(Drained::LeaseLost);
            }
            self.count(&delivery, &attempt, result);
            if let AttemptResult::RetryAt(at) = result {
                return Ok(Drained::DueAt(at));
            }
        }
        // A long backlog: back to the queue, due at once.
        Ok(Drained::DueAt(now_micros()))
    }

    /// Queues the workspace's events after the cursor that the webhook wants, and moves the
    /// cursor past every event read. `false` if the lease was lost.
    async fn queue_new_events(
        &self,
        webhook: &Webhook,
        lease: &Lease,
        cursor: &mut i64,
    ) -> Result<bool> {
        let events = self
            .store
            .list_key_events(&EventQuery {
                workspace_id: Some(webhook.workspace_id.clone()),
                after: *cursor,
                limit: QUEUE_BATCH,
            })
            .await?;
        let Some(through) = events.last().map(|event| event.position) else {
            return Ok(true);
        };
        let wanted: Vec<KeyEvent> = events
            .into_iter()
            .filter(|event| webhook.wants(&event.event_type))
            .collect();
        let now = now_micros();
        let queued = self
            .store
            .webhooks()
            .queue_deliveries(
                lease,
                *cursor,
                through,
                &wanted,
                now,
                now + self.lease_length(),
            )
            .await?;
        *cursor = through;
        Ok(queued)
    }

    /// One HTTP request of a delivery, and what it leaves the delivery as.
    async fn attempt(
        &self,
        webhook: &Webhook,
        delivery: &Delivery,
    ) -> Result<(Attempt, AttemptResult)> {
        let started = Instant::now();
        let attempt_time = now_micros();
        let outcome = self.send(webhook, delivery).await?;
        let (http_status, error) = match outcome {
            Sent::Answered(status) if (200..300).contains(&status) => (status, String::new()),
            Sent::Answered(status) => (status, format!("HTTP {status}")),
            Sent::Failed(error) => (0, error),
            Sent::Unsendable(error) => {
                let attempt = Attempt {
                    attempt: delivery.attempt_count + 1,
                    attempt_time,
                    http_status: 0,
                    error,
                    duration_micros: 0,
                };
                return Ok((attempt, AttemptResult::GaveUp));
            }
        };
        let attempt = Attempt {
            attempt: delivery.attempt_count + 1,
            attempt_time,
            http_status,
            duration_micros: i64::try_from(started.elapsed().as_micros()).unwrap_or(i64::MAX),
            error,
        };
        let result = if attempt.error.is_empty() {
            AttemptResult::Delivered
        } else {
            self.retry_or_give_up(delivery, &attempt)
        };
        Ok((attempt, result))
    }

    /// After a failed attempt: the next one after an exponential, jittered delay, unless the
    /// retry period is over. The last retry falls at its end. The period counts from when the
    /// delivery was queued (as its event happened), not from its first attempt: behind an
    /// endpoint that was down for a day, the deliveries queued meanwhile get one attempt each
    /// instead of a day each, so the queue drains once the endpoint is back.
    fn retry_or_give_up(&self, delivery: &Delivery, attempt: &Attempt) -> AttemptResult {
        let give_up_at = delivery.create_time + duration_micros(self.config.retry_period);
        if attempt.attempt_time >= give_up_at {
            return AttemptResult::GaveUp;
        }
        let delay = backoff(
            self.config.backoff_base,
            self.config.backoff_max,
            attempt.attempt,
            random_unit(),
        );
        AttemptResult::RetryAt((now_micros() + duration_micros(delay)).min(give_up_at))
    }

    async fn send(&self, webhook: &Webhook, delivery: &Delivery) -> Result<Sent> {
        let Some(event) = self.store.webhooks().event_at(delivery.position).await? else {
            return Ok(Sent::Unsendable(
                "the event was pruned (past the event retention) before it was delivered"
                    .to_owned(),
            ));
        };
        if webhook.secret_check != self.keys.check_value(&webhook.webhook_id) {
            // Another replica, with the right key, may take the next attempt.
            return Ok(Sent::Failed(
                "not sent: this replica's webhook signing key is not the one the webhook was \
                 created under (every replica must use the same --webhook-secret-file)"
                    .to_owned(),
            ));
        }
        let Ok(url) = url::Url::parse(&webhook.url) else {
            return Ok(Sent::Unsendable("the stored URL does not parse".to_owned()));
        };
        if let Err(reason) = self.policy.check_literal(&url) {
            return Ok(Sent::Failed(ForbiddenTarget(reason).to_string()));
        }
        let body = payload(&event).to_string();
        let timestamp = now_micros() / 1_000_000;
        let signature = self.keys.secret_for(&webhook.webhook_id).sign(
            &event.event_id,
            timestamp,
            body.as_bytes(),
        );
        let response = self
            .client
            .post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &event.event_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        Ok(match response {
            Ok(response) => Sent::Answered(i32::from(response.status().as_u16())),
            Err(error) => Sent::Failed(self.describe(&error)),
        })
    }

    /// An attempt's error as recorded: what went wrong, without the URL (whose query may hold
    /// something the receiver treats as a credential).
    fn describe(&self, error: &reqwest::Error) -> String {
        if error.is_timeout() {
            return format!(
                "timed out after {}",
                humantime::format_duration(self.config.timeout)
            );
        }
        let mut causes = Vec::new();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            causes.push(cause.to_string());
            source = cause.source();
        }
        if let Some(forbidden) = causes
            .iter()
            .find(|cause| cause.starts_with("target forbidden"))
        {
            return forbidden.clone();
        }
        let kind = if error.is_connect() {
            "could not connect"
        } else {
            "request failed"
        };
        match causes.last() {
            Some(cause) => format!("{kind}: {cause}"),
            None => kind.to_owned(),
        }
    }

    fn count(&self, delivery: &Delivery, attempt: &Attempt, result: AttemptResult) {
        self.stats.attempts.fetch_add(1, Ordering::Relaxed);
        match result {
            AttemptResult::Delivered => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                // From the moment the event was queued for this webhook (its occur time may be
                // a key's expiry, found later).
                let lag = attempt.attempt_time - delivery.create_time;
                self.stats
                    .last_lag_micros
                    .store(lag.max(0), Ordering::Relaxed);
            }
            AttemptResult::RetryAt(_) => {
                self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
            }
            AttemptResult::GaveUp => {
                self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                self.stats.gave_up.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What became of a request.
enum Sent {
    /// The endpoint answered with this status.
    Answered(i32),
    /// No answer (timeout, connection refused, forbidden target), or not sent for a reason
    /// that may pass: retried.
    Failed(String),
    /// Can never be sent: given up at once.
    Unsendable(String),
}

/// A webhook request's body: the Standard Webhooks envelope (`type`, `timestamp`, `data`) around
/// the event. `data` has `KeyEvent`'s field names, in plain JSON rather than the proto's JSON
/// mapping: `position` a number, the actor's `kind` in lower case (`admin`, `api_key`, ...), and
/// `changes` as the audit trail keeps them (`field`, `old`, `new`, the values as JSON values).
/// README.md, "Webhooks", documents it.
pub fn payload(event: &KeyEvent) -> serde_json::Value {
    let mut data = json!({
        "event_id": event.event_id,
        "position": event.position,
        "type": event.event_type,
        "workspace_id": event.workspace_id,
        "key_id": event.key_id,
        "event_time": rfc3339(event.occur_time),
        "actor": {
            "kind": event.actor.kind.as_str(),
            "id": event.actor.id,
            "display": event.actor.display,
        },
        "changes": event.changes,
    });
    if let Some(new_key_id) = &event.new_key_id {
        data["new_key_id"] = json!(new_key_id);
    }
    if let Some(expire_time) = &event.old_key_expire_time {
        data["old_key_expire_time"] = json!(expire_time);
    }
    json!({
        "type": event.event_type,
        "timestamp": rfc3339(event.occur_time),
        "data": data,
    })
}

/// The delay before attempt `attempt + 1`: `base` doubled per attempt so far, at most `max`,
/// scaled by `unit` (in [0, 1)) into its upper half, so replicas' and webhooks' retries spread out.
pub fn backoff(base: Duration, max: Duration, attempt: i32, unit: f64) -> Duration {
    let doublings = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(0)
        .min(30);
    let full = base.saturating_mul(1u32 << doublings).min(max);
    full.mul_f64(0.5 + unit.clamp(0.0, 1.0) / 2.0)
}

fn random_unit() -> f64 {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_jitters_in_the_upper_half() {
        let base = Duration::from_secs(5);
        let max = Duration::from_secs(3600);
        assert_eq!(backoff(base, max, 1, 1.0), Duration::from_secs(5));
        assert_eq!(backoff(base, max, 1, 0.0), Duration::from_millis(2500));
        assert_eq!(backoff(base, max, 3, 1.0), Duration::from_secs(20));
        assert_eq!(backoff(base, max, 12, 1.0), max);
        assert_eq!(backoff(base, max, i32::MAX, 1.0), max);
        assert_eq!(backoff(base, max, 0, 1.0), base);
    }

    #[test]
    fn jitter_is_spread() {
        let draws: Vec<f64> = (0..64).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|draw| (0.0..1.0).contains(draw)));
        assert!(draws.iter().any(|draw| *draw < 0.5) && draws.iter().any(|draw| *draw >= 0.5));
    }
}
