//! The key-state cache: key id → the key's mutable state, dropped the moment it changes.
//!
//! A change (revoke, rotate) invalidates the entry on the changing replica before the RPC returns
//! and on the others through PostgreSQL LISTEN/NOTIFY; a TTL bounds the damage of a lost
//! notification.
//!
//! Invalidating is not enough on its own: a database read that started before a change can land
//! after the invalidation and cache the old state, however long it took. So every load is
//! registered, before its read can start, under its key id with a "stale" flag, and deregistered
//! only once the entry it produced is in the cache (or the load was dropped). The entry carries
//! that flag. A change first sets the flag of every load of its key still registered, then drops
//! the cached entry:
//! - a load registered at the time of the change produces an entry already marked stale,
//!   whenever it lands;
//! - a load deregistered before the change has inserted its entry, which the invalidation drops;
//! - a caller that joined an in-flight load gets the loader's entry, and with it the flag.
//!
//! An entry whose flag is set is treated as missing. Nothing here expires or is evicted, so the
//! guarantee holds for a read of any duration and any cache capacity; the warm path pays one
//! atomic load for it.
//!
//! An entry is fresh for the state TTL after the read that confirmed it, and only while the
//! change feed has not broken since (`feed_interrupted`): a fresh entry is served without the
//! database. Past that it is read again; if the database cannot be reached, the entry is still
//! served up to `stale_if_error` after its confirmation (counted, and marked in the span), then
//! the caller gets UNAVAILABLE. README.md, "Faults", says what that exposes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use moka::future::Cache;
use tracing::Instrument as _;

use super::{VerifyConfig, shared_error};
use crate::error::{Error, Result};
use crate::key::{Key, KeyId, StoredKey};
use crate::store::Store;

/// What the database said about a key id, and whether a change has made it stale since.
#[derive(Debug)]
pub struct StateEntry {
    stored: Option<StoredKey>,
    /// Set by a change to the key that landed while the read behind this entry was in flight.
    stale: Arc<AtomicBool>,
    /// The key's view in VALID answers, encoded by the transport on first use and reused by
    /// every later answer from this entry (opaque here). A change to the key replaces the
    /// entry, so the view can never outlive the state it shows.
    valid_view: OnceLock<bytes::Bytes>,
    /// When the database said so: microseconds since the cache's origin.
    confirmed: u64,
}

impl StateEntry {
    pub fn stored(&self) -> Option<&StoredKey> {
        self.stored.as_ref()
    }

    pub fn key(&self) -> Option<&Key> {
        self.stored.as_ref().map(|stored| &stored.key)
    }

    /// The encoded view of the key for VALID answers: `encode`d once, then shared.
    pub fn valid_view(&self, encode: impl FnOnce(&Key) -> bytes::Bytes) -> Option<bytes::Bytes> {
        let key = self.key()?;
        Some(self.valid_view.get_or_init(|| encode(key)).clone())
    }

    fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }
}

/// The state cache and the means to invalidate it. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct Invalidator {
    store: Arc<dyn Store>,
    states: Cache<String, Arc<StateEntry>>,
    in_flight: Arc<InFlightLoads>,
    /// Database reads of key state since start: single-flight tests and metrics read it.
    loads: Arc<AtomicU64>,
    hits: Arc<AtomicU64>,
    /// Answers from state the database could not confirm (`stale_if_error`).
    stale_answers: Arc<AtomicU64>,
    /// The instant the cache's clock counts from (`StateEntry::confirmed`).
    origin: Instant,
    /// When the change feed last broke, on the cache's clock (0: never): entries confirmed
    /// before it may have missed a change, so they are no longer fresh.
    feed_broken: Arc<AtomicU64>,
    fresh_for: Duration,
    stale_if_error: Duration,
}

impl Invalidator {
    pub fn new(store: Arc<dyn Store>, config: &VerifyConfig) -> Self {
        Self {
            store,
            // Kept as long as they may be of use: fresh, or as the stale fallback.
            states: Cache::builder()
                .max_capacity(config.state_cache_capacity)
                .time_to_live(config.state_ttl.max(config.stale_if_error))
                .build(),
            in_flight: Arc::default(),
            loads: Arc::new(AtomicU64::new(0)),
            hits: Arc::new(AtomicU64::new(0)),
            stale_answers: Arc::new(AtomicU64::new(0)),
            origin: Instant::now(),
            feed_broken: Arc::new(AtomicU64::new(0)),
            fresh_for: config.state_ttl,
            stale_if_error: config.stale_if_error,
        }
    }

    /// Now, on the cache's clock; never 0.
    fn clock(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn age(&self, entry: &StateEntry) -> Duration {
        Duration::from_micros(self.clock().saturating_sub(entry.confirmed))
    }

    /// Served without the database: within the TTL, and confirmed after the feed last broke.
    fn is_fresh(&self, entry: &StateEntry) -> bool {
        entry.confirmed > self.feed_broken.load(Ordering::Acquire)
            && self.age(entry) < self.fresh_for
    }

    /// Drops expired entries now (moka does it only while the cache is used).
    pub async fn run_pending_tasks(&self) {
        self.states.run_pending_tasks().await;
    }

    /// The key's current state: from memory when fresh, otherwise one database read shared by
    /// every concurrent caller.
    pub async fn get(&self, key_id: &str) -> Result<Arc<StateEntry>> {
        self.get_or_load(key_id)
            .instrument(tracing::debug_span!(
                "verify.state_cache",
                stale_if_error = tracing::field::Empty
            ))
            .await
    }

    async fn get_or_load(&self, key_id: &str) -> Result<Arc<StateEntry>> {
        loop {
            // The last confirmed state, should the database not answer now.
            let mut fallback = None;
            if let Some(entry) = self.states.get(key_id).await {
                if !entry.is_stale() {
                    if self.is_fresh(&entry) {
                        self.hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(entry);
                    }
                    fallback = Some(entry);
                }
                self.states.invalidate(key_id).await;
            }
            // Registered before our read can start; deregistered when dropped, after
            // `try_get_with` has inserted the entry (or on cancellation).
            let registration = self.in_flight.register(key_id);
            let stale = &registration.stale;
            let store = &self.store;
            let loads = &self.loads;
            let loaded = self
                .states
                .try_get_with_by_ref(key_id, async move {
                    loads.fetch_add(1, Ordering::Relaxed);
                    // Cold path only: a presented key's id always parses (`PresentedKey`
                    // checked its alphabet and length); anything else would be unknown.
                    let stored = match KeyId::parse(key_id) {
                        Some(key_id) => store.find_key_for_verify(&key_id).await?,
                        None => None,
                    };
                    Ok(Arc::new(StateEntry {
                        stored,
                        stale: stale.clone(),
                        valid_view: OnceLock::new(),
                        confirmed: self.clock(),
                    }))
                })
                .await
                .map_err(shared_error);
            let entry = match (loaded, fallback) {
                (Ok(entry), _) => entry,
                (Err(Error::Unavailable(why)), Some(last)) => {
                    return self.serve_stale(key_id, last, registration, why).await;
                }
                (Err(error), _) => return Err(error),
            };
            drop(registration);
            if !entry.is_stale() {
                return Ok(entry);
            }
            // A change landed while the read behind this entry was in flight: read again.
            self.states.invalidate(key_id).await;
        }
    }

    /// The database cannot be reached: answers from the last confirmed state if it is recent
    /// enough, keeping it cached (with this load's registration, so a change that lands meanwhile
    /// still drops it); UNAVAILABLE otherwise.
    async fn serve_stale(
        &self,
        key_id: &str,
        last: Arc<StateEntry>,
        registration: LoadRegistration<'_>,
        why: String,
    ) -> Result<Arc<StateEntry>> {
        if self.age(&last) > self.stale_if_error {
            return Err(Error::Unavailable(why));
        }
        let kept = Arc::new(StateEntry {
            stored: last.stored.clone(),
            stale: registration.stale.clone(),
            valid_view: last.valid_view.clone(),
            confirmed: last.confirmed,
        });
        self.states.insert(key_id.to_owned(), kept.clone()).await;
        drop(registration);
        if kept.is_stale() {
            // A change to this key landed: its old state must not be served.
            self.states.invalidate(key_id).await;
            return Err(Error::Unavailable(why));
        }
        self.stale_answers.fetch_add(1, Ordering::Relaxed);
        tracing::Span::current().record("stale_if_error", true);
        Ok(kept)
    }

    /// The change feed broke: changes may be missed from now on, so nothing cached so far is
    /// fresh any more. Kept (unlike at a resync) as the fallback for a database outage.
    pub fn feed_interrupted(&self) {
        self.feed_broken.store(self.clock(), Ordering::Release);
    }

    /// Answers served from state the database could not confirm.
    pub fn stale_answers(&self) -> u64 {
        self.stale_answers.load(Ordering::Relaxed)
    }

    /// (hits, misses, entries) of the state cache.
    pub fn stats(&self) -> (u64, u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.loads.load(Ordering::Relaxed),
            self.states.entry_count(),
        )
    }

    /// How many key states were read from the database since start.
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Drops one key's state, here and now, including any read of it still in flight.
    pub async fn key_changed(&self, key_id: &str) {
        // Poison first: a load that deregisters after this has its entry in the cache already,
        // and the invalidation below drops it.
        self.in_flight.poison(key_id);
        self.states.invalidate(key_id).await;
    }

    /// Drops every key's state: used when change notifications may have been missed.
    pub fn everything_changed(&self) {
        self.in_flight.poison_all();
        self.states.invalidate_all();
    }
}

/// Loads of key state in flight, by key id: what a change must mark stale. Touched only on the
/// cold path, and never locked across an await.
#[derive(Default)]
struct InFlightLoads {
    slots: Mutex<HashMap<String, LoadSlot>>,
}

/// The flag shared by the loads of one key registered since its last change. Sharing one flag
/// (rather than one per caller) keeps a cold flood of one key at O(1) work per caller; a change
/// removes the slot, so loads registered after it start with a clean flag.
struct LoadSlot {
    stale: Arc<AtomicBool>,
    registered: usize,
}

impl InFlightLoads {
    fn register<'a>(&'a self, key_id: &'a str) -> LoadRegistration<'a> {
        let mut slots = self.lock();
        let slot = slots.entry(key_id.to_owned()).or_insert_with(|| LoadSlot {
            stale: Arc::new(AtomicBool::new(false)),
            registered: 0,
        });
        slot.registered += 1;
        LoadRegistration {
            loads: self,
            key_id,
            stale: slot.stale.clone(),
        }
    }

    fn deregister(&self, key_id: &str, stale: &Arc<AtomicBool>) {
        let mut slots = self.lock();
        // A change since our registration removed our slot (and set our flag): nothing to do.
        let Some(slot) = slots.get_mut(key_id) else {
            return;
        };
        if !Arc::ptr_eq(&slot.stale, stale) {
            return;
        }
        slot.registered -= 1;
        if slot.registered == 0 {
            slots.remove(key_id);
        }
    }

    /// Marks every registered load of `key_id` stale.
    fn poison(&self, key_id: &str) {
        if let Some(slot) = self.lock().remove(key_id) {
            slot.stale.store(true, Ordering::Release);
        }
    }

    /// Marks every registered load stale.
    fn poison_all(&self) {
        for (_, slot) in self.lock().drain() {
            slot.stale.store(true, Ordering::Release);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, LoadSlot>> {
        // Nothing panics while the lock is held, and the map is consistent between statements.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn registered(&self, key_id: &str) -> usize {
        self.lock().get(key_id).map_or(0, |slot| slot.registered)
    }
}

/// One caller's registration of a load; deregisters on drop.
struct LoadRegistration<'a> {
    loads: &'a InFlightLoads,
    key_id: &'a str,
    stale: Arc<AtomicBool>,
}

impl Drop for LoadRegistration<'_> {
    fn drop(&mut self) {
        self.loads.deregister(self.key_id, &self.stale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_set(flag: &AtomicBool) -> bool {
        flag.load(Ordering::Acquire)
    }

    #[test]
    fn a_change_marks_the_loads_registered_at_that_moment_only() {
        let loads = InFlightLoads::default();
        let before = loads.register("a");
        let joiner = loads.register("a");
        let other_key = loads.register("b");
        assert!(
            Arc::ptr_eq(&before.stale, &joiner.stale),
            "one flag per key"
        );
        assert_eq!(loads.registered("a"), 2);

        loads.poison("a");
        assert!(is_set(&before.stale) && is_set(&joiner.stale));
        assert!(!is_set(&other_key.stale), "another key's load is untouched");

        let after = loads.register("a");
        assert!(
            !is_set(&after.stale),
            "a load after the change starts clean"
        );
        assert_eq!(loads.registered("a"), 1);
        // The old registrations leave the new slot alone when they end.
        drop(before);
        drop(joiner);
        assert_eq!(loads.registered("a"), 1);
        drop(after);
        assert_eq!(loads.registered("a"), 0);
        assert!(loads.lock().contains_key("b"));
        drop(other_key);
        assert!(loads.lock().is_empty(), "nothing is left behind");
    }

    #[test]
    fn everything_changed_marks_every_registered_load() {
        let loads = InFlightLoads::default();
        let a = loads.register("a");
        let b = loads.register("b");
        loads.poison_all();
        assert!(is_set(&a.stale) && is_set(&b.stale));
        assert!(!is_set(&loads.register("a").stale));
        drop((a, b));
        assert!(loads.lock().is_empty());
    }

    #[test]
    fn a_change_with_no_load_in_flight_registers_nothing() {
        let loads = InFlightLoads::default();
        loads.poison("a");
        loads.poison_all();
        assert!(loads.lock().is_empty());
    }
}
