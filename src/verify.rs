//! VerifyKey, the hot path. A warm verify is: shape and checksum, a BLAKE3 digest, two in-memory
//! lookups, a scope check and a counter bump. No database, no argon2, no lock held across an
//! await. A cold verify reads the key once and runs argon2 once on the bounded pool, however many
//! requests for the same key arrive at the same time (single-flight), and only with one of the
//! key's lockout attempts in hand (`lockout`), so concurrent guesses cannot outrun the lockout.

mod change_feed;
mod lockout;
mod state;
mod usage;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::future::Cache;
use tracing::Instrument as _;

pub use change_feed::{ChangeFeedStatus, follow_changes};
pub use lockout::{ClientIp, LockoutConfig, Lockouts};
pub use state::{Invalidator, StateEntry};
pub use usage::{UsageConfig, UsageRecorder};

use crate::error::{Error, Result};
use crate::key::{HashPool, Key, KeyState, PresentedKey, Role, Scopes};
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
    /// How long after its last confirmation from the database a key's cached state may still be
    /// served while the database cannot be reached (`--stale-if-error`); zero: never.
    pub stale_if_error: Duration,
    pub lockout: LockoutConfig,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self {
            verdict_cache_capacity: 500_000,
            negative_verdict_ttl: Duration::from_secs(60),
            state_cache_capacity: 200_000,
            state_ttl: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(30),
            lockout: LockoutConfig::default(),
        }
    }
}

/// Why a key was accepted or refused. A refusal is an answer, not an error.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Valid; for a usage-limited key, with the uses left after this one.
    Valid(Arc<StateEntry>, Option<i64>),
    Malformed,
    NotFound,
    Revoked(Arc<StateEntry>),
    Expired(Arc<StateEntry>),
    /// Disabled through UpdateKey: refused until enabled again.
    Disabled(Arc<StateEntry>),
    InsufficientScope(Arc<StateEntry>),
    /// Valid, but the key's role is below the request's minimum.
    InsufficientRole(Arc<StateEntry>),
    /// The key or the client IP is locked after too many failures: retry after this long.
    Locked(Duration),
    UsageExhausted(Arc<StateEntry>),
}

/// One VerifyKey question.
#[derive(Debug, Clone, Copy)]
pub struct VerifyRequest<'a> {
    pub key: &'a str,
    pub required_scopes: &'a [String],
    /// The end user's address, for IP lockouts.
    pub client_ip: Option<ClientIp>,
    /// Uses of a limited key to consume; 0 checks without consuming.
    pub cost: i64,
    /// The lowest role the key must have; None: any.
    pub minimum_role: Option<Role>,
}

impl<'a> VerifyRequest<'a> {
    /// A VerifyKey question as a caller sent it, checked: required scopes a key could hold,
    /// a client IP that is an address (or empty), a cost that is not negative (absent is 1).
    pub fn checked(
        key: &'a str,
        required_scopes: &'a [String],
        client_ip: &str,
        cost: Option<i64>,
    ) -> Result<Self> {
        Scopes::check_required(required_scopes)
            .map_err(|reason| Error::invalid("required_scopes", reason))?;
        let cost = cost.unwrap_or(1);
        if cost < 0 {
            return Err(Error::invalid("cost", "must not be negative"));
        }
        let client_ip =
            match client_ip {
                "" => None,
                text => Some(ClientIp::parse(text).ok_or_else(|| {
                    Error::invalid("client_ip", "must be an IPv4 or IPv6 address")
                })?),
            };
        Ok(Self {
            key,
            required_scopes,
            client_ip,
            cost,
            minimum_role: None,
        })
    }

    /// A plain check of `key`: no scopes, no client IP, cost 1.
    pub fn key(key: &'a str) -> Self {
        Self {
            key,
            required_scopes: &[],
            client_ip: None,
            cost: 1,
            minimum_role: None,
        }
    }
}

impl Verdict {
    pub fn is_valid(&self) -> bool {
        matches!(self, Self::Valid(..))
    }

    /// The uses left that the answer reports exactly, overriding the cached state's count: the
    /// decrement's own answer for a limited key, none for an exhausted one.
    pub fn usage_remaining(&self) -> Option<i64> {
        match self {
            Self::Valid(_, remaining) => *remaining,
            Self::UsageExhausted(_) => Some(0),
            _ => None,
        }
    }

    /// How long a locked-out caller should wait.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Locked(remaining) => Some(*remaining),
            _ => None,
        }
    }

    /// The key's cached state, when the key was identified.
    pub fn entry(&self) -> Option<&Arc<StateEntry>> {
        match self {
            Self::Valid(entry, _)
            | Self::Revoked(entry)
            | Self::Expired(entry)
            | Self::Disabled(entry)
            | Self::InsufficientScope(entry)
            | Self::InsufficientRole(entry)
            | Self::UsageExhausted(entry) => Some(entry),
            Self::Malformed | Self::NotFound | Self::Locked(_) => None,
        }
    }

    /// The key's public metadata, when the key was identified.
    pub fn key(&self) -> Option<&Key> {
        self.entry().and_then(|entry| entry.key())
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
    store: Arc<dyn Store>,
    states: Invalidator,
    verdicts: Cache<[u8; 32], SecretVerdict>,
    hashes: HashPool,
    usage: UsageRecorder,
    lockouts: Lockouts,
    verdict_hits: AtomicU64,
    verdict_misses: AtomicU64,
}

/// Cache counters and sizes, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub verdict_hits: u64,
    pub verdict_misses: u64,
    pub verdict_entries: u64,
    pub state_hits: u64,
    pub state_misses: u64,
    pub state_entries: u64,
    /// Answers from state the database could not confirm (`--stale-if-error`).
    pub state_stale_answers: u64,
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
            states: Invalidator::new(store.clone(), config),
            store,
            verdicts,
            hashes,
            usage,
            lockouts: Lockouts::new(&config.lockout),
            verdict_hits: AtomicU64::new(0),
            verdict_misses: AtomicU64::new(0),
        }
    }

    /// The handle that management operations and change notifications use to drop cached state.
    pub fn invalidator(&self) -> Invalidator {
        self.states.clone()
    }

    pub fn hash_pool(&self) -> &HashPool {
        &self.hashes
    }

    pub fn lockouts(&self) -> &Lockouts {
        &self.lockouts
    }

    pub fn usage(&self) -> &UsageRecorder {
        &self.usage
    }

    /// Drops every expired entry of the caches and lockouts now. moka removes expired entries
    /// only while a cache is used, so after a flood of wrong secrets and unknown key ids an idle
    /// replica would hold them, and the memory behind them, until its next burst of traffic.
    pub async fn run_pending_tasks(&self) {
        self.verdicts.run_pending_tasks().await;
        self.states.run_pending_tasks().await;
        self.lockouts.run_pending_tasks();
    }

    /// Runs `run_pending_tasks` every `interval`, forever.
    pub async fn keep_caches_tidy(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.run_pending_tasks().await;
        }
    }

    pub fn cache_stats(&self) -> CacheStats {
        let (state_hits, state_misses, state_entries) = self.states.stats();
        CacheStats {
            verdict_hits: self.verdict_hits.load(Ordering::Relaxed),
            verdict_misses: self.verdict_misses.load(Ordering::Relaxed),
            verdict_entries: self.verdicts.entry_count(),
            state_hits,
            state_misses,
            state_entries,
            state_stale_answers: self.states.stale_answers(),
        }
    }

    /// Decides on a presented key. `Err` only when the service cannot decide (the database is
    /// unreachable and nothing usable is cached): never answer "invalid" for an outage.
    pub async fn verify(&self, request: VerifyRequest<'_>) -> Result<Verdict> {
        let ip = request.client_ip;
        let Some(presented) = PresentedKey::parse(request.key) else {
            if let Some(remaining) = self.lockouts.locked(None, ip) {
                return Ok(Verdict::Locked(remaining));
            }
            self.lockouts.failed(None, ip);
            return Ok(Verdict::Malformed);
        };
        // The digest, never the plaintext, is the cache key.
        let digest: [u8; 32] = *blake3::hash(presented.expose_secret().as_bytes()).as_bytes();
        let known = self
            .verdicts
            .get(&digest)
            .instrument(tracing::debug_span!("verify.verdict_cache"))
            .await;
        let counter = match known {
            Some(_) => &self.verdict_hits,
            None => &self.verdict_misses,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // A secret already proven correct passes any lockout: an attacker who knows a public
        // prefix cannot lock its owner out. Anything else is refused while locked, unhashed and
        // unread. (The attempt taken before argon2, in `check_secret`, is what holds under
        // concurrency; this look only spares a locked request the database read.)
        if known != Some(SecretVerdict::Matches)
            && let Some(remaining) = self.lockouts.locked(Some(presented.key_id()), ip)
        {
            return Ok(Verdict::Locked(remaining));
        }
        let entry = self.states.get(presented.key_id()).await?;
        let Some(stored) = entry.stored() else {
            self.lockouts.failed(None, ip);
            return Ok(Verdict::NotFound);
        };
        let (verdict, counted) = match known {
            Some(verdict) => (verdict, false),
            None => match self
                .check_secret(presented, digest, &stored.secret_hash, ip)
                .await?
            {
                SecretCheck::Ran(verdict) => (verdict, true),
                SecretCheck::Joined(verdict) => (verdict, false),
                SecretCheck::Refused(remaining) => return Ok(Verdict::Locked(remaining)),
            },
        };
        if verdict == SecretVerdict::DoesNotMatch {
            if !counted {
                self.lockouts.failed(Some(presented.key_id()), ip);
            }
            return Ok(Verdict::NotFound);
        }
        let now = now_micros();
        match stored.key.state_at(now) {
            KeyState::Revoked => return Ok(Verdict::Revoked(entry)),
            KeyState::Expired => return Ok(Verdict::Expired(entry)),
            KeyState::Disabled => return Ok(Verdict::Disabled(entry)),
            KeyState::Active => {}
        }
        if !stored.key.scopes.grant_all(request.required_scopes) {
            return Ok(Verdict::InsufficientScope(entry));
        }
        if request
            .minimum_role
            .is_some_and(|minimum| stored.key.role < minimum)
        {
            return Ok(Verdict::InsufficientRole(entry));
        }
        let remaining = if stored.key.usage_limit > 0 {
            // Limited keys take the strict path: an atomic decrement in the database, of the
            // budget the whole rotation chain shares. A limited key always has a budget; were
            // one missing, no budget row matches and the key is refused, never granted.
            let budget_id = stored.key.budget_id.as_deref().unwrap_or_default();
            match self.store.consume_usage(budget_id, request.cost).await? {
                Some(remaining) => Some(remaining),
                None => return Ok(Verdict::UsageExhausted(entry)),
            }
        } else {
            None
        };
        self.usage.record(&stored.key.key_id, now);
        Ok(Verdict::Valid(entry, remaining))
    }

    /// Runs argon2 once for a presented key, however many requests ask at the same time, and
    /// only with an attempt of the key's (and the client IP's) lockout window in hand: the
    /// attempt is taken before argon2 starts, so concurrent guesses cannot outrun the lockout.
    async fn check_secret(
        &self,
        presented: PresentedKey<'_>,
        digest: [u8; 32],
        secret_hash: &str,
        ip: Option<ClientIp>,
    ) -> Result<SecretCheck> {
        let key_id = presented.key_id();
        let plaintext = presented.expose_secret().to_owned();
        let phc = secret_hash.to_owned();
        let hashes = &self.hashes;
        let lockouts = &self.lockouts;
        let checked = self
            .verdicts
            .entry(digest)
            .or_try_insert_with(async move {
                let attempt = lockouts
                    .begin_check(key_id, ip)
                    .map_err(CheckError::Refused)?;
                // Not in the verdict cache: nobody has proven this secret, so it runs within the
                // replica's argon2 budget for unproven secrets.
                let matches = match hashes.verify_unproven(plaintext, phc).await {
                    Ok(matches) => matches,
                    Err(Error::VerifyBusy(retry)) => {
                        // argon2 never ran: nothing was tried, so nothing counts.
                        attempt.not_tried();
                        return Err(CheckError::Failed(Error::VerifyBusy(retry)));
                    }
                    Err(error) => return Err(CheckError::Failed(error)),
                };
                if !matches {
                    // Dropping the attempt counts the failure.
                    return Ok(SecretVerdict::DoesNotMatch);
                }
                attempt.matched();
                Ok::<_, CheckError>(SecretVerdict::Matches)
            })
            .await;
        match checked {
            Ok(entry) if entry.is_fresh() => Ok(SecretCheck::Ran(entry.into_value())),
            Ok(entry) => Ok(SecretCheck::Joined(entry.into_value())),
            Err(error) => match error.as_ref() {
                CheckError::Refused(remaining) => Ok(SecretCheck::Refused(*remaining)),
                CheckError::Failed(error) => Err(clone_shared(error)),
            },
        }
    }
}

/// What checking an unrecognised secret came to.
enum SecretCheck {
    /// This request ran argon2; a wrong secret is already counted as a failure.
    Ran(SecretVerdict),
    /// Another request's argon2 answered (or had just answered); nothing counted for this one.
    Joined(SecretVerdict),
    /// The key or the client IP has no attempt left in this window: argon2 did not run.
    Refused(Duration),
}

/// Why a single-flight check gave no verdict, shared by all its waiters.
#[derive(Debug)]
enum CheckError {
    Refused(Duration),
    Failed(Error),
}

/// moka hands every waiter of a failed single-flight load the same `Arc<Error>`.
pub(crate) fn shared_error(error: Arc<Error>) -> Error {
    clone_shared(&error)
}

fn clone_shared(error: &Error) -> Error {
    match error {
        Error::Unavailable(detail) => Error::Unavailable(detail.clone()),
        Error::VerifyBusy(retry) => Error::VerifyBusy(*retry),
        Error::Conflict => Error::Conflict,
        other => Error::Internal(other.to_string()),
    }
}
