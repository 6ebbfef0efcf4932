//! Usage counting: VALID verdicts are counted in memory and written behind in one batch per
//! interval, so the hot path never waits for the database. A failed write keeps its counts for
//! the next attempt; a graceful shutdown flushes what is left. A SIGKILL loses at most one
//! interval of usage and nothing else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::key::KeyId;
use crate::store::{Store, UsageDelta};
use crate::timestamp::UnixMicros;

#[derive(Debug, Clone)]
pub struct UsageConfig {
    /// How often counted usage is written to the database.
    pub flush_interval: Duration,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    requests: i64,
    last_used_time: UnixMicros,
}

/// Counts are split over this many maps, each behind its own lock, by key id, so that request
/// workers counting different keys rarely wait for one another.
const SHARDS: usize = 16;

type Shard = Mutex<HashMap<KeyId, Pending>>;

/// Counts usage in memory. Cheap to clone; clones share the counts.
#[derive(Clone)]
pub struct UsageRecorder {
    pending: Arc<[Shard; SHARDS]>,
    store: Arc<dyn Store>,
    /// Serialises flushes, so the periodic flush and the shutdown flush never interleave.
    flushing: Arc<tokio::sync::Mutex<()>>,
    /// When usage was last fully written (nothing pending, or a successful flush).
    last_written: Arc<Mutex<std::time::Instant>>,
}

impl UsageRecorder {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            pending: Arc::new(std::array::from_fn(|_| Mutex::default())),
            store,
            flushing: Arc::default(),
            last_written: Arc::new(Mutex::new(std::time::Instant::now())),
        }
    }

    /// Counts one successful verification. Never blocks on I/O; the lock is held for a map update.
    pub fn record(&self, key_id: &KeyId, now: UnixMicros) {
        let mut pending = lock(self.shard(key_id));
        if let Some(counts) = pending.get_mut(key_id) {
            counts.requests += 1;
            counts.last_used_time = counts.last_used_time.max(now);
            return;
        }
        pending.insert(
            key_id.clone(),
            Pending {
                requests: 1,
                last_used_time: now,
            },
        );
    }

    /// Key ids are random text, so a few of their bytes spread keys evenly over the shards.
    fn shard(&self, key_id: &KeyId) -> &Shard {
        let spread = key_id.as_str().bytes().take(4).fold(0usize, |sum, byte| {
            sum.wrapping_mul(31).wrapping_add(usize::from(byte))
        });
        &self.pending[spread % SHARDS]
    }

    /// Writes every pending count, in key id order. On failure the counts not written go back,
    /// to be written by the next flush.
    pub async fn flush(&self) -> crate::error::Result<()> {
        let _one_at_a_time = self.flushing.lock().await;
        let mut taken = HashMap::new();
        for shard in self.pending.iter() {
            taken.extend(std::mem::take(&mut *lock(shard)));
        }
        if taken.is_empty() {
            self.mark_written();
            return Ok(());
        }
        let mut deltas: Vec<UsageDelta> = taken
            .iter()
            .map(|(key_id, counts)| UsageDelta {
                key_id: key_id.clone(),
                requests: counts.requests,
                last_used_time: counts.last_used_time,
            })
            .collect();
        // One order on every replica: whatever locks a store takes, they come in the same order.
        deltas.sort_by(|a, b| a.key_id.as_str().cmp(b.key_id.as_str()));
        if let Err(failure) = self.store.record_usage(&deltas).await {
            // What was written stays written; only the rest goes back, so nothing is counted
            // twice.
            let unwritten = deltas[failure.written.min(deltas.len())..]
                .iter()
                .filter_map(|delta| taken.remove_entry(&delta.key_id))
                .collect();
            self.put_back(unwritten);
            return Err(failure.error);
        }
        self.mark_written();
        Ok(())
    }

    fn mark_written(&self) {
        *lock(&self.last_written) = std::time::Instant::now();
    }

    /// How far behind the database's counters are: the time since usage was last fully
    /// written, and how many keys have counts waiting.
    pub fn lag(&self) -> (Duration, usize) {
        let since = lock(&self.last_written).elapsed();
        let pending = self.pending.iter().map(|shard| lock(shard).len()).sum();
        (since, pending)
    }

    fn put_back(&self, taken: HashMap<KeyId, Pending>) {
        for (key_id, counts) in taken {
            let mut pending = lock(self.shard(&key_id));
            let entry = pending.entry(key_id).or_insert(Pending {
                requests: 0,
                last_used_time: counts.last_used_time,
            });
            entry.requests += counts.requests;
            entry.last_used_time = entry.last_used_time.max(counts.last_used_time);
        }
    }

    /// Flushes every `interval` until `stop` is notified, then flushes once more.
    pub async fn run(self, config: UsageConfig, stop: Arc<Notify>) {
        let mut ticker = tokio::time::interval(config.flush_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if let Err(error) = self.flush().await {
                        tracing::warn!(%error, "usage flush failed, will retry");
                    }
                }
                () = stop.notified() => break,
            }
        }
        if let Err(error) = self.flush().await {
            tracing::error!(%error, "final usage flush failed: usage since the last flush is lost");
        }
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain counters: keep going.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}
