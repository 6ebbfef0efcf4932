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

/// IssueTrialKey (or RevokeTrialKey) calls per client IP per minute. Unlike IssueKey's limit, 0
/// allows none: an operator who sets it to 0 means "issue no trial keys", never "no limit".
#[derive(Clone)]
pub struct TrialRateLimiter {
    per_ip: KeyedLimit<crate::verify::ClientIp>,
    allows_none: bool,
}

impl TrialRateLimiter {
    pub fn per_minute(count: u32) -> Self {
        Self {
            per_ip: KeyedLimit::new(count, TRIAL_LIMIT_PERIOD),
            allows_none: count == 0,
        }
    }

    /// Counts one call from `client_ip`.
    pub fn check(&self, client_ip: &crate::verify::ClientIp) -> crate::error::Result<()> {
        if self.allows_none {
            return Err(crate::error::Error::TrialKeysPaused);
        }
        self.per_ip
            .check(client_ip)
            .map_err(crate::error::Error::IpRateLimited)
    }

    pub fn forget_idle(&self) {
        self.per_ip.forget_idle();
    }
}

/// How long each limit's count is spread over.
pub const ISSUE_LIMIT_PERIOD: Duration = Duration::from_secs(60 * 60);
pub const TRIAL_LIMIT_PERIOD: Duration = Duration::from_secs(60);

/// Every rate limit of KeyService, built from the operator's counts. Cheap to clone; clones
/// share the counters.
#[derive(Clone)]
pub struct RateLimits {
    /// IssueKey per user (or API key) per hour.
    pub issue: IssueRateLimiter,
    /// IssueTrialKey per client IP per minute.
    pub trial: TrialRateLimiter,
    /// RevokeTrialKey per client IP per minute.
    pub trial_revoke: TrialRateLimiter,
}

impl RateLimits {
    pub fn new(issue_per_hour: u32, trial_per_minute: u32, trial_revokes_per_minute: u32) -> Self {
        Self {
            issue: KeyedLimit::new(issue_per_hour, ISSUE_LIMIT_PERIOD),
            trial: TrialRateLimiter::per_minute(trial_per_minute),
            trial_revoke: TrialRateLimiter::per_minute(trial_revokes_per_minute),
        }
    }

    /// Forgets callers whose limits have fully recovered, so memory follows recent callers.
    pub fn forget_idle(&self) {
        self.issue.forget_idle();
        self.trial.forget_idle();
        self.trial_revoke.forget_idle();
    }
}

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
    fn a_zero_trial_limit_allows_none() {
        let ip = crate::verify::ClientIp::parse("192.0.2.1").unwrap();
        let limiter = TrialRateLimiter::per_minute(0);
        assert!(matches!(
            limiter.check(&ip),
            Err(crate::error::Error::TrialKeysPaused)
        ));
        let limiter = TrialRateLimiter::per_minute(1);
        limiter.check(&ip).unwrap();
        assert!(matches!(
            limiter.check(&ip),
            Err(crate::error::Error::IpRateLimited(_))
        ));
    }

    #[test]
    fn zero_means_unlimited() {
        let limiter = KeyedLimit::new(0, Duration::from_secs(3600));
        for _ in 0..100 {
            limiter.check(&"alice").unwrap();
        }
    }
}
