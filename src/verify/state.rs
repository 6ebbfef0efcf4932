//! The key-state cache: key id → the key's mutable state, dropped the moment it changes.
//!
//! A change (revoke, rotate) invalidates the entry on the changing replica before the RPC returns
//! and on the others through PostgreSQL LISTEN/NOTIFY; a TTL bounds the damage of a lost
//! notification. A generation counter closes the race in which a database read that started
//! before a change would otherwise cache the old state after the invalidation: every entry
//! remembers the generation at which its read started, and an entry older than the latest change
//! of its key is treated as missing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use moka::future::Cache;
use tracing::Instrument as _;

use super::{VerifyConfig, shared_error};
use crate::error::Result;
use crate::key::{Key, StoredKey};
use crate::store::Store;

/// What the database said about a key id, and when that read started.
#[derive(Debug)]
pub struct StateEntry {
    stored: Option<StoredKey>,
    generation: u64,
}

impl StateEntry {
    pub fn stored(&self) -> Option<&StoredKey> {
        self.stored.as_ref()
    }

    pub fn key(&self) -> Option<&Key> {
        self.stored.as_ref().map(|stored| &stored.key)
    }
}

/// The state cache and the means to invalidate it. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct Invalidator {
    store: Arc<dyn Store>,
    states: Cache<String, Arc<StateEntry>>,
    /// Latest change generation of recently changed keys; kept at least as long as a state entry.
    changed_at: Cache<String, u64>,
    generation: Arc<AtomicU64>,
    /// Generation of the last "drop everything" (a broken notification stream).
    all_changed_at: Arc<AtomicU64>,
    /// Database reads of key state since start: single-flight tests and metrics read it.
    loads: Arc<AtomicU64>,
    hits: Arc<AtomicU64>,
}

impl Invalidator {
    pub fn new(store: Arc<dyn Store>, config: &VerifyConfig) -> Self {
        Self {
            store,
            states: Cache::builder()
                .max_capacity(config.state_cache_capacity)
                .time_to_live(config.state_ttl)
                .build(),
            changed_at: Cache::builder()
                .max_capacity(config.state_cache_capacity)
                .time_to_live(config.state_ttl)
                .build(),
            generation: Arc::new(AtomicU64::new(1)),
            all_changed_at: Arc::new(AtomicU64::new(0)),
            loads: Arc::new(AtomicU64::new(0)),
            hits: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The key's current state: from memory when fresh, otherwise one database read shared by
    /// every concurrent caller.
    pub async fn get(&self, key_id: &str) -> Result<Arc<StateEntry>> {
        self.get_or_load(key_id)
            .instrument(tracing::debug_span!("verify.state_cache"))
            .await
    }

    async fn get_or_load(&self, key_id: &str) -> Result<Arc<StateEntry>> {
        loop {
            if let Some(entry) = self.states.get(key_id).await {
                if self.is_fresh(key_id, &entry).await {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(entry);
                }
                self.states.invalidate(key_id).await;
            }
            let started_at = self.generation.load(Ordering::Acquire);
            let store = &self.store;
            let loads = &self.loads;
            let entry = self
                .states
                .try_get_with_by_ref(key_id, async move {
                    loads.fetch_add(1, Ordering::Relaxed);
                    let stored = store.find_key_for_verify(key_id).await?;
                    Ok(Arc::new(StateEntry {
                        stored,
                        generation: started_at,
                    }))
                })
                .await
                .map_err(shared_error)?;
            if self.is_fresh(key_id, &entry).await {
                return Ok(entry);
            }
            // A change landed while this read was in flight: read again.
            self.states.invalidate(key_id).await;
        }
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

    /// Drops one key's state, here and now.
    pub async fn key_changed(&self, key_id: &str) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.changed_at.insert(key_id.to_owned(), generation).await;
        self.states.invalidate(key_id).await;
    }

    /// Drops every key's state: used when change notifications may have been missed.
    pub fn everything_changed(&self) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.all_changed_at.store(generation, Ordering::Release);
        self.states.invalidate_all();
    }

    async fn is_fresh(&self, key_id: &str, entry: &StateEntry) -> bool {
        // Fast path: nothing changed anywhere since this entry's read started.
        if entry.generation >= self.generation.load(Ordering::Acquire) {
            return true;
        }
        if entry.generation < self.all_changed_at.load(Ordering::Acquire) {
            return false;
        }
        match self.changed_at.get(key_id).await {
            Some(changed) => entry.generation >= changed,
            None => true,
        }
    }
}
