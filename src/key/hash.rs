//! Hashing keys at rest with argon2id. The PHC string carries its parameters, so they can be
//! raised later without breaking existing keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use tokio::sync::Semaphore;

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

    /// True when `plaintext` matches `phc`. A malformed PHC string never matches. CPU-heavy.
    pub fn verify(&self, plaintext: &str, phc: &str) -> bool {
        self.argon2
            .verify_password(plaintext.as_bytes(), phc)
            .is_ok()
    }
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
}

/// What the argon2 pool has done, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashPoolStats {
    pub verifications: u64,
    pub in_flight: u64,
    pub runs: u64,
    pub run_nanos: u64,
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
        }
    }

    #[tracing::instrument(name = "argon2", skip_all, level = "debug")]
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        let counters = self.stats.clone();
        counters.in_flight.fetch_add(1, Ordering::Relaxed);
        let outcome = async {
            let _permit = self
                .permits
                .acquire()
                .await
                .map_err(|_| Error::Internal("argon2 pool closed".to_owned()))?;
            let counters = counters.clone();
            tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let output = work();
                let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                counters.run_nanos.fetch_add(nanos, Ordering::Relaxed);
                counters.runs.fetch_add(1, Ordering::Relaxed);
                output
            })
            .await
            .map_err(|error| Error::Internal(format!("argon2 task failed: {error}")))
        }
        .await;
        counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        outcome
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
