//! Hashing keys at rest with argon2id. The PHC string carries its parameters, so they can be
//! raised later without breaking existing keys.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, PasswordHasher, Version};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

/// The longest argon2 output a stored hash may have (PHC strings allow up to 64 bytes).
const MAX_OUTPUT_LEN: usize = 64;

thread_local! {
    /// argon2's working memory, kept by each thread that verifies and reused by its next
    /// verification: allocating megabytes per hash costs time and, across many threads,
    /// fragments the allocator's arenas so a flood leaves the process hundreds of MiB larger.
    static ARGON2_BLOCKS: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

use super::hash_threads::HashThreads;
use crate::error::Error;

/// argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for HashParams {
    /// 4 MiB, one pass, one lane: about 1.3 ms here. Keys carry about 190 random bits, so the
    /// hash guards a stolen database against nothing that a higher cost would stop; the cost
    /// that matters is how fast a restarted replica can warm its caches (README.md, "Hashing").
    fn default() -> Self {
        Self {
            memory_kib: 4 * 1024,
            iterations: 1,
            parallelism: 1,
        }
    }
}

/// Hashes and verifies whole key texts. Cheap to clone.
#[derive(Clone)]
pub struct SecretHasher {
    argon2: Argon2<'static>,
}

impl std::fmt::Debug for SecretHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretHasher").finish_non_exhaustive()
    }
}

impl SecretHasher {
    pub fn new(params: HashParams) -> Result<Self, String> {
        let params = Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            None,
        )
        .map_err(|error| format!("invalid argon2 parameters: {error}"))?;
        Ok(Self {
            argon2: Argon2::new(Algorithm::Argon2id, Version::V0x13, params),
        })
    }

    /// The PHC string of `plaintext` with a fresh random salt. CPU-heavy: call it off the async
    /// workers.
    pub fn hash(&self, plaintext: &str) -> String {
        self.argon2
            .hash_password(plaintext.as_bytes())
            .expect("argon2 hashing with validated parameters cannot fail")
            .to_string()
    }

    /// True when `plaintext` matches `phc`, with the parameters the PHC string carries. A
    /// malformed PHC string never matches. CPU-heavy; reuses this thread's working memory.
    pub fn verify(&self, plaintext: &str, phc: &str) -> bool {
        ARGON2_BLOCKS.with_borrow_mut(|blocks| verify_with_memory(plaintext, phc, blocks))
    }
}

/// Recomputes the hash of `plaintext` with `phc`'s algorithm, version, parameters and salt into
/// `blocks` (grown as needed, never shrunk), and compares it with `phc`'s in constant time.
fn verify_with_memory(plaintext: &str, phc: &str, blocks: &mut Vec<Block>) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&hash.salt, &hash.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(hash.algorithm.as_str()) else {
        return false;
    };
    let version = match hash.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(version)) => version,
        Some(Err(_)) => return false,
    };
    let Ok(params) = Params::try_from(&hash) else {
        return false;
    };
    let expected = expected.as_bytes();
    let mut computed = [0u8; MAX_OUTPUT_LEN];
    let Some(computed) = computed.get_mut(..expected.len()) else {
        return false;
    };
    let block_count = params.block_count();
    if blocks.len() < block_count {
        blocks.resize(block_count, Block::default());
    }
    let argon2 = Argon2::new(algorithm, version, params);
    argon2
        .hash_password_into_with_memory(
            plaintext.as_bytes(),
            salt,
            computed,
            &mut blocks[..block_count],
        )
        .is_ok()
        && bool::from(computed.ct_eq(expected))
}

/// The share of argon2 that secrets nobody has proven yet may take on one replica. A right
/// secret seen for the first time is unproven too: a legitimate cold key competes inside this
/// budget with a flood of wrong ones (README.md, "Abuse controls").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnprovenBudget {
    /// Verifications started per second; 0 means no rate limit.
    pub per_second: u32,
    /// Verifications that may be waiting for a thread or running at once; more are refused at
    /// once.
    pub queue_depth: usize,
}

impl Default for UnprovenBudget {
    /// About half of what two cores verify per second at the default argon2 cost (~1.3 ms
    /// each), so unproven secrets can never take more than about one core, and a queue that
    /// drains in a few milliseconds. Not yet tuned by the benchmark's flood phase.
    fn default() -> Self {
        Self {
            per_second: 500,
            queue_depth: 16,
        }
    }
}

/// How long a caller refused for a full queue should wait before trying again.
const QUEUE_FULL_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs argon2 on its own fixed set of threads behind a semaphore, so at most one hash per
/// thread runs at once and the async workers never do argon2 work: a flood of cold or wrong keys
/// queues here instead of stalling warm verifies.
#[derive(Clone, Debug)]
pub struct HashPool {
    hasher: SecretHasher,
    threads: HashThreads,
    permits: Arc<Semaphore>,
    budget: UnprovenBudget,
    unproven_rate: Option<Arc<governor::DefaultDirectRateLimiter>>,
    verifications: Arc<AtomicU64>,
    stats: Arc<PoolCounters>,
}

#[derive(Debug, Default)]
struct PoolCounters {
    /// Computations waiting for a permit or running.
    in_flight: AtomicU64,
    /// Computations finished (hashes and verifications).
    runs: AtomicU64,
    /// Time spent computing, in nanoseconds, over all runs.
    run_nanos: AtomicU64,
    /// Computations running on a thread right now, and the most there ever were at once.
    running: AtomicU64,
    most_running: AtomicU64,
    /// Unproven verifications waiting for a permit.
    unproven_waiting: AtomicU64,
    /// Unproven verifications refused because the budget was spent.
    unproven_refused: AtomicU64,
}

/// One unproven verification counted against the queue depth until it ends.
struct Waiting(Arc<PoolCounters>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.unproven_waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One caller waiting for or running a computation, for the `in_flight` gauge.
struct InFlight(Arc<PoolCounters>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the argon2 pool has done, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashPoolStats {
    pub verifications: u64,
    pub in_flight: u64,
    pub runs: u64,
    pub run_nanos: u64,
    /// The most computations that ever ran at once: never above the pool's size.
    pub most_running: u64,
    /// Unproven verifications refused because the budget was spent.
    pub unproven_refused: u64,
}

impl HashPool {
    pub fn new(hasher: SecretHasher, threads: HashThreads) -> Self {
        Self {
            hasher,
            permits: Arc::new(Semaphore::new(threads.threads())),
            threads,
            budget: UnprovenBudget {
                per_second: 0,
                queue_depth: usize::MAX,
            },
            unproven_rate: None,
            verifications: Arc::new(AtomicU64::new(0)),
            stats: Arc::default(),
        }
    }

    /// The PHC string of `plaintext`, computed off the async workers. Hashing serves an
    /// authenticated, rate-limited caller (IssueKey, RotateKey, IssueTrialKey), so it runs at
    /// normal priority on tokio's blocking threads (still within the pool's permits), never on
    /// the lowered verification threads, where a busy machine could starve it past a deadline.
    pub async fn hash(&self, plaintext: String) -> Result<String, Error> {
        let hasher = self.hasher.clone();
        self.run(Lane::Hash, move || hasher.hash(&plaintext)).await
    }

    /// Whether `plaintext` matches `phc`, computed off the async workers.
    pub async fn verify(&self, plaintext: String, phc: String) -> Result<bool, Error> {
        let hasher = self.hasher.clone();
        self.verifications.fetch_add(1, Ordering::Relaxed);
        self.run(Lane::Verify, move || hasher.verify(&plaintext, &phc))
            .await
    }

    /// The same pool with a budget for [`verify_unproven`](Self::verify_unproven).
    pub fn with_unproven_budget(mut self, budget: UnprovenBudget) -> Self {
        self.unproven_rate = std::num::NonZeroU32::new(budget.per_second).map(|rate| {
            Arc::new(governor::RateLimiter::direct(governor::Quota::per_second(
                rate,
            )))
        });
        self.budget = budget;
        self
    }

    /// Like [`verify`](Self::verify), for a secret nobody has proven yet, within the budget: when
    /// the rate is spent or the queue is full, refused at once with `Error::VerifyBusy` (the
    /// service did not decide, so never "invalid").
    pub async fn verify_unproven(&self, plaintext: String, phc: String) -> Result<bool, Error> {
        let counters = &self.stats;
        let waiting = counters.unproven_waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(counters.clone());
        if waiting >= self.budget.queue_depth as u64 {
            counters.unproven_refused.fetch_add(1, Ordering::Relaxed);
            return Err(Error::VerifyBusy(QUEUE_FULL_RETRY));
        }
        if let Some(rate) = &self.unproven_rate
            && let Err(not_until) = rate.check()
        {
            counters.unproven_refused.fetch_add(1, Ordering::Relaxed);
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            return Err(Error::VerifyBusy(
                wait.max(std::time::Duration::from_millis(1)),
            ));
        }
        self.verify(plaintext, phc).await
    }

    /// How many argon2 verifications ran since start: single-flight tests and metrics read it.
    pub fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> HashPoolStats {
        HashPoolStats {
            verifications: self.verifications.load(Ordering::Relaxed),
            in_flight: self.stats.in_flight.load(Ordering::Relaxed),
            runs: self.stats.runs.load(Ordering::Relaxed),
            run_nanos: self.stats.run_nanos.load(Ordering::Relaxed),
            most_running: self.stats.most_running.load(Ordering::Relaxed),
            unproven_refused: self.stats.unproven_refused.load(Ordering::Relaxed),
        }
    }

    #[tracing::instrument(name = "argon2", skip_all, level = "debug")]
    async fn run<T: Send + 'static>(
        &self,
        lane: Lane,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        let counters = self.stats.clone();
        counters.in_flight.fetch_add(1, Ordering::Relaxed);
        // Counted down however this ends, a caller that stops waiting included.
        let _in_flight = InFlight(counters.clone());
        async {
            let permit = self
                .permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Error::Internal("argon2 pool closed".to_owned()))?;
            let counters = counters.clone();
            // The permit moves into the computation and is released when it ends, not when the
            // caller stops waiting: a cancelled request (a client deadline, a dropped
            // connection) must not free a permit while its argon2 still runs, or a flood of
            // impatient callers queues more work than there are threads.
            let work = move || {
                let _permit = permit;
                let running = counters.running.fetch_add(1, Ordering::Relaxed) + 1;
                counters.most_running.fetch_max(running, Ordering::Relaxed);
                let started = std::time::Instant::now();
                let output = work();
                let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                counters.run_nanos.fetch_add(nanos, Ordering::Relaxed);
                counters.runs.fetch_add(1, Ordering::Relaxed);
                counters.running.fetch_sub(1, Ordering::Relaxed);
                output
            };
            match lane {
                Lane::Verify => self.threads.run(work).await,
                Lane::Hash => tokio::task::spawn_blocking(work)
                    .await
                    .map_err(|error| Error::Internal(format!("argon2 task failed: {error}"))),
            }
        }
        .await
    }
}

/// Where a computation runs: verifications on the pool's own threads (at their priority),
/// hashes of new keys on tokio's blocking threads at normal priority.
#[derive(Debug, Clone, Copy)]
enum Lane {
    Verify,
    Hash,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn threads(count: usize) -> HashThreads {
        HashThreads::new(count, super::super::HashPriority::Normal).unwrap()
    }

    fn hasher() -> SecretHasher {
        SecretHasher::new(HashParams {
            memory_kib: 256,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap()
    }

    #[test]
    fn hash_verifies_only_the_same_text() {
        let hasher = hasher();
        let phc = hasher.hash("ka_live_secret");
        assert!(phc.starts_with("$argon2id$v=19$m=256,t=1,p=1$"));
        assert!(!phc.contains("ka_live_secret"));
        assert!(hasher.verify("ka_live_secret", &phc));
        assert!(!hasher.verify("ka_live_secreT", &phc));
        assert!(!hasher.verify("ka_live_secret", "not a phc string"));
    }

    #[test]
    fn salts_differ() {
        let hasher = hasher();
        assert_ne!(hasher.hash("same"), hasher.hash("same"));
    }

    #[test]
    fn verification_uses_the_parameters_in_the_phc_string() {
        let old = hasher().hash("text");
        let stronger = SecretHasher::new(HashParams {
            memory_kib: 512,
            iterations: 2,
            parallelism: 1,
        })
        .unwrap();
        assert!(stronger.verify("text", &old));
    }

    #[test]
    fn reused_memory_verifies_like_a_fresh_allocation() {
        use argon2::PasswordVerifier;

        let small = hasher().hash("small key");
        let large = SecretHasher::new(HashParams {
            memory_kib: 2048,
            iterations: 2,
            parallelism: 2,
        })
        .unwrap()
        .hash("large key");
        // One buffer for every case, grown by the large hash, then reused by the small one.
        let mut blocks = Vec::new();
        for (plaintext, phc, matches) in [
            ("large key", large.as_str(), true),
            ("small key", small.as_str(), true),
            ("small kez", small.as_str(), false),
            ("large key", small.as_str(), false),
            ("small key", "$argon2id$v=19$m=256,t=1,p=1$bm9zYWx0", false),
            ("small key", "not a phc string", false),
            ("small key", "", false),
        ] {
            assert_eq!(
                verify_with_memory(plaintext, phc, &mut blocks),
                matches,
                "{plaintext} against {phc}"
            );
            let reference = PasswordHash::new(phc).is_ok_and(|hash| {
                Argon2::default()
                    .verify_password(plaintext.as_bytes(), &hash)
                    .is_ok()
            });
            assert_eq!(reference, matches, "argon2's own verification agrees");
        }
        assert_eq!(blocks.len(), 2048, "grown to the largest, never shrunk");
    }

    /// Callers that stop waiting (a deadline, a dropped connection) do not free a permit while
    /// their argon2 still runs: the pool never runs more computations at once than its size.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_callers_keep_their_permit_until_argon2_ends() {
        let hasher = SecretHasher::new(HashParams {
            memory_kib: 2048,
            iterations: 2,
            parallelism: 1,
        })
        .unwrap();
        let phc = hasher.hash("key");
        let pool = HashPool::new(hasher, threads(2));
        let spawn_caller = |n: usize| {
            let pool = pool.clone();
            let phc = phc.clone();
            tokio::spawn(async move { pool.verify(format!("wrong {n}"), phc).await })
        };
        let impatient: Vec<_> = (0..24).map(spawn_caller).collect();
        // Once argon2 runs for two of them (whatever the machine's load: a fixed timeout could
        // expire before any computation starts), patient callers queue up, and then every
        // impatient caller gives up, the two whose computations run among them. Were their
        // permits freed with them, the patient ones would start beside those computations.
        let started = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while pool.stats.running.load(Ordering::Relaxed) < 2 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(started.is_ok(), "argon2 started: {:?}", pool.stats());
        let patient: Vec<_> = (24..28).map(spawn_caller).collect();
        for caller in &impatient {
            caller.abort();
        }
        for caller in impatient {
            let _ = caller.await;
        }
        for caller in patient {
            assert!(!caller.await.unwrap().unwrap(), "a wrong secret");
        }
        // Await the computations that outlived their callers.
        while pool.stats.running.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let stats = pool.stats();
        assert!(
            stats.runs >= 6,
            "the two cut short and the four patient: {stats:?}"
        );
        assert!(stats.most_running <= 2, "{stats:?}");
        assert_eq!(stats.in_flight, 0, "no caller is waiting any more");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unproven_secrets_beyond_the_queue_are_refused_at_once() {
        let hasher = hasher();
        let phc = hasher.hash("key");
        let pool = HashPool::new(hasher, threads(1)).with_unproven_budget(UnprovenBudget {
            per_second: 0,
            queue_depth: 2,
        });
        // Hold the only thread, so verifications queue.
        let permit = pool.permits.clone().acquire_owned().await.unwrap();
        let queued: Vec<_> = (0..2)
            .map(|_| {
                let pool = pool.clone();
                let phc = phc.clone();
                tokio::spawn(async move { pool.verify_unproven("key".into(), phc).await })
            })
            .collect();
        while pool.stats.unproven_waiting.load(Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        let refused = pool.verify_unproven("key".into(), phc.clone()).await;
        assert!(matches!(refused, Err(Error::VerifyBusy(delay)) if delay == QUEUE_FULL_RETRY));
        drop(permit);
        for verification in queued {
            assert!(verification.await.unwrap().unwrap(), "the queued ones ran");
        }
        assert_eq!(pool.stats().unproven_refused, 1);
        // Proven paths (hashing, plain verify) are not budgeted.
        assert!(pool.verify("key".into(), phc).await.unwrap());
    }

    #[tokio::test]
    async fn unproven_secrets_beyond_the_rate_are_refused_with_the_wait() {
        let hasher = hasher();
        let phc = hasher.hash("key");
        let pool = HashPool::new(hasher, threads(2)).with_unproven_budget(UnprovenBudget {
            per_second: 2,
            queue_depth: 100,
        });
        // governor's quota allows a burst of the per-second rate.
        assert!(
            pool.verify_unproven("key".into(), phc.clone())
                .await
                .unwrap()
        );
        assert!(
            !pool
                .verify_unproven("kez".into(), phc.clone())
                .await
                .unwrap()
        );
        let refused = pool.verify_unproven("key".into(), phc).await;
        let Err(Error::VerifyBusy(wait)) = refused else {
            panic!("expected VerifyBusy, got {refused:?}");
        };
        assert!(wait > std::time::Duration::ZERO && wait <= std::time::Duration::from_millis(500));
        assert_eq!(pool.stats().unproven_refused, 1);
    }

    #[test]
    fn invalid_parameters_are_refused() {
        assert!(
            SecretHasher::new(HashParams {
                memory_kib: 1,
                iterations: 0,
                parallelism: 1
            })
            .is_err()
        );
    }
}
