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

/// Runs argon2 on the blocking thread pool behind a semaphore, so at most `size` hashes run at
/// once and the async workers never do argon2 work: a flood of cold or wrong keys queues here
/// instead of stalling warm verifies.
#[derive(Clone, Debug)]
pub struct HashPool {
    hasher: SecretHasher,
    permits: Arc<Semaphore>,
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
}

impl HashPool {
    pub fn new(hasher: SecretHasher, size: usize) -> Self {
        Self {
            hasher,
            permits: Arc::new(Semaphore::new(size.max(1))),
            verifications: Arc::new(AtomicU64::new(0)),
            stats: Arc::default(),
        }
    }

    /// The PHC string of `plaintext`, computed off the async workers.
    pub async fn hash(&self, plaintext: String) -> Result<String, Error> {
        let hasher = self.hasher.clone();
        self.run(move || hasher.hash(&plaintext)).await
    }

    /// Whether `plaintext` matches `phc`, computed off the async workers.
    pub async fn verify(&self, plaintext: String, phc: String) -> Result<bool, Error> {
        let hasher = self.hasher.clone();
        self.verifications.fetch_add(1, Ordering::Relaxed);
        self.run(move || hasher.verify(&plaintext, &phc)).await
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
        }
    }

    #[tracing::instrument(name = "argon2", skip_all, level = "debug")]
    async fn run<T: Send + 'static>(
        &self,
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
            // The permit moves into the blocking task and is released when the computation
            // ends, not when the caller stops waiting: a cancelled request (a client deadline, a
            // dropped connection) must not free a permit while its argon2 still runs, or a flood
            // of impatient callers occupies more threads and cores than the pool allows.
            tokio::task::spawn_blocking(move || {
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
            })
            .await
            .map_err(|error| Error::Internal(format!("argon2 task failed: {error}")))
        }
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let pool = HashPool::new(hasher, 2);
        let impatient: Vec<_> = (0..24)
            .map(|n| {
                let pool = pool.clone();
                let phc = phc.clone();
                tokio::spawn(async move {
                    let verify = pool.verify(format!("wrong {n}"), phc);
                    let _ = tokio::time::timeout(std::time::Duration::from_millis(1), verify).await;
                })
            })
            .collect();
        for caller in impatient {
            caller.await.unwrap();
        }
        // Await the computations that outlived their callers.
        while pool.stats.running.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let stats = pool.stats();
        assert!(stats.runs >= 2, "some computations ran: {stats:?}");
        assert!(stats.most_running <= 2, "{stats:?}");
        assert_eq!(stats.in_flight, 0, "no caller is waiting any more");
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
