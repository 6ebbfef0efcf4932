//! VerifyKey, the hot path. A warm verify is: shape and checksum, a BLAKE3 digest, two in-memory
//! lookups, a scope check and a counter bump. No database, no argon2, no lock held across an
//! await. A cold verify reads the key once and runs argon2 once on the bounded pool, however many
//! requests for the same key arrive at the same time (single-flight).

mod state;
mod usage;

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;

pub use state::{Invalidator, StateEntry};
pub use usage::{UsageConfig, UsageRecorder};

use crate::error::{Error, Result};
use crate::key::{HashPool, Key, KeyState, PresentedKey};
use crate::store::Store;
use crate::timestamp::now_micros;

/// Sizes and lifetimes of the VerifyKey caches.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// Entries in the verdict cache (digest of a presented key → whether its secret matched).
    pub verdict_cache_capacity: u64,
    /// How long a wrong secret's verdict is remembered.
    pub negative_verdict_ttl: Duration,
    /// Entries in the key-state cache (key id → revoked? expiry, scopes, role, ...).
    pub state_cache_capacity: u64,
    /// How long a key's state is trusted without a change notification: the backstop bound on
    /// how long a lost notification can keep a revoked key valid on another replica.
    pub state_ttl: Duration,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self {
            verdict_cache_capacity: 500_000,
            negative_verdict_ttl: Duration::from_secs(60),
            state_cache_capacity: 200_000,
            state_ttl: Duration::from_secs(5),
        }
    }
}

/// Why a key was accepted or refused. A refusal is an answer, not an error.
#[derive(Debug, Clone)]
pub enum Verdict {
    Valid(Arc<StateEntry>),
    Malformed,
    NotFound,
    Revoked(Arc<StateEntry>),
    Expired(Arc<StateEntry>),
    InsufficientScope(Arc<StateEntry>),
}

impl Verdict {
    /// The key's public metadata, when the key was identified.
    pub fn key(&self) -> Option<&Key> {
        match self {
            Self::Valid(entry)
            | Self::Revoked(entry)
            | Self::Expired(entry)
            | Self::InsufficientScope(entry) => entry.key(),
            Self::Malformed | Self::NotFound => None,
        }
    }
}

/// Whether a presented secret matched its key's hash (immutable, so cached until evicted) or not
/// (cached briefly, so a repeated wrong key costs one argon2 at most).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SecretVerdict {
    Matches,
    DoesNotMatch,
}

struct VerdictExpiry {
    negative_ttl: Duration,
}

impl moka::Expiry<[u8; 32], SecretVerdict> for VerdictExpiry {
    fn expire_after_create(
        &self,
        _digest: &[u8; 32],
        verdict: &SecretVerdict,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        match verdict {
            SecretVerdict::Matches => None,
            SecretVerdict::DoesNotMatch => Some(self.negative_ttl),
        }
    }
}

pub struct Verifier {
    states: Invalidator,
    verdicts: Cache<[u8; 32], SecretVerdict>,
    hashes: HashPool,
    usage: UsageRecorder,
}

impl Verifier {
    pub fn new(
        store: Arc<dyn Store>,
        hashes: HashPool,
        usage: UsageRecorder,
        config: &VerifyConfig,
    ) -> Self {
        let verdicts = Cache::builder()
            .max_capacity(config.verdict_cache_capacity)
            .expire_after(VerdictExpiry {
                negative_ttl: config.negative_verdict_ttl,
            })
            .build();
        Self {
            states: Invalidator::new(store, config),
            verdicts,
            hashes,
            usage,
        }
    }

    /// The handle that management operations and change notifications use to drop cached state.
    pub fn invalidator(&self) -> Invalidator {
        self.states.clone()
    }

    pub fn hash_pool(&self) -> &HashPool {
        &self.hashes
    }

    /// Decides on a presented key. `Err` only when the service cannot decide (the database is
    /// unreachable and nothing usable is cached): never answer "invalid" for an outage.
    pub async fn verify(&self, text: &str, required_scopes: &[String]) -> Result<Verdict> {
        let Some(presented) = PresentedKey::parse(text) else {
            return Ok(Verdict::Malformed);
        };
        let entry = self.states.get(presented.key_id()).await?;
        let Some(stored) = entry.stored() else {
            return Ok(Verdict::NotFound);
        };
        if self.secret_verdict(presented, &stored.secret_hash).await? == SecretVerdict::DoesNotMatch
        {
            return Ok(Verdict::NotFound);
        }
        let now = now_micros();
        match stored.key.state_at(now) {
            KeyState::Revoked => return Ok(Verdict::Revoked(entry)),
            KeyState::Expired => return Ok(Verdict::Expired(entry)),
            KeyState::Active => {}
        }
        if !stored.key.scopes.grant_all(required_scopes) {
            return Ok(Verdict::InsufficientScope(entry));
        }
        self.usage.record(stored.key.key_id.as_str(), now);
        Ok(Verdict::Valid(entry))
    }

    async fn secret_verdict(
        &self,
        presented: PresentedKey<'_>,
        secret_hash: &str,
    ) -> Result<SecretVerdict> {
        // The digest, never the plaintext, is the cache key.
        let digest: [u8; 32] = *blake3::hash(presented.expose_secret().as_bytes()).as_bytes();
        if let Some(verdict) = self.verdicts.get(&digest).await {
            return Ok(verdict);
        }
        let plaintext = presented.expose_secret().to_owned();
        let phc = secret_hash.to_owned();
        let hashes = &self.hashes;
        self.verdicts
            .try_get_with(digest, async move {
                match hashes.verify(plaintext, phc).await? {
                    true => Ok(SecretVerdict::Matches),
                    false => Ok(SecretVerdict::DoesNotMatch),
                }
            })
            .await
            .map_err(shared_error)
    }
}

/// moka hands every waiter of a failed single-flight load the same `Arc<Error>`.
pub(crate) fn shared_error(error: Arc<Error>) -> Error {
    match error.as_ref() {
        Error::Unavailable(detail) => Error::Unavailable(detail.clone()),
        Error::Conflict => Error::Conflict,
        other => Error::Internal(other.to_string()),
    }
}
