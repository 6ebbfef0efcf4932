//! Rate limits per caller (IssueKey per user) and per client IP (IssueTrialKey): keyed GCRA
//! limiters (governor). Idle keys are forgotten periodically, so memory stays bounded by the
//! number of recently active callers.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// A keyed limiter; cheap to clone. Disabled when built with a zero rate.
#[derive(Clone)]
pub struct KeyedLimit<K: Hash + Eq + Clone> {
    limiter: Option<Arc<DefaultKeyedRateLimiter<K>>>,
}

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    /// `count` calls per `period` per key, in a burst of up to `count`; 0 disables the limit.
    pub fn new(count: u32, period: Duration) -> Self {
        let limiter = NonZeroU32::new(count).and_then(|count| {
            let quota = Quota::with_period(period / count.get())?.allow_burst(count);
            Some(Arc::new(RateLimiter::keyed(quota)))
        });
        Self { limiter }
    }

    /// Counts one call for `key`; `Err` holds how long to wait (at least a second).
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check_key(key).map_err(|not_until| {
            not_until
                .wait_time_from(DefaultClock::default().now())
                .max(Duration::from_secs(1))
        })
    }

    /// Forgets keys whose limits have fully recovered.
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// IssueKey calls per user per hour.
pub type IssueRateLimiter = KeyedLimit<String>;

/// IssueTrialKey calls per client IP per minute.
pub type TrialRateLimiter = KeyedLimit<crate::verify::ClientIp>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_key() {
        let limiter = KeyedLimit::new(3, Duration::from_secs(3600));
        for _ in 0..3 {
            limiter.check(&"alice").unwrap();
        }
        let wait = limiter.check(&"alice").unwrap_err();
        assert!(wait > Duration::from_secs(60) && wait <= Duration::from_secs(20 * 60));
        limiter.check(&"bob").unwrap();
    }

    #[test]
    fn zero_means_unlimited() {
        let limiter = KeyedLimit::new(0, Duration::from_secs(3600));
        for _ in 0..100 {
            limiter.check(&"alice").unwrap();
        }
    }
}
