//! IssueKey rate limits per user: a keyed GCRA limiter (governor). Idle users are forgotten
//! periodically, so memory stays bounded by the number of recently active users.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::{Error, Result};

#[derive(Clone)]
pub struct IssueRateLimiter {
    limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
}

impl IssueRateLimiter {
    /// `per_hour` calls per key per hour, in a burst of up to `per_hour`; 0 disables the limit.
    pub fn new(per_hour: u32) -> Self {
        let limiter = NonZeroU32::new(per_hour)
            .map(|per_hour| Arc::new(RateLimiter::keyed(Quota::per_hour(per_hour))));
        Self { limiter }
    }

    /// Counts one call for `key`, or says how long to wait.
    pub fn check(&self, key: &str) -> Result<()> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check_key(&key.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Error::RateLimited(wait.max(Duration::from_secs(1)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_key() {
        let limiter = IssueRateLimiter::new(3);
        for _ in 0..3 {
            limiter.check("alice").unwrap();
        }
        let Err(Error::RateLimited(wait)) = limiter.check("alice") else {
            panic!("the fourth call is limited");
        };
        assert!(wait > Duration::from_secs(60) && wait <= Duration::from_secs(20 * 60));
        limiter.check("bob").unwrap();
    }

    #[test]
    fn zero_means_unlimited() {
        let limiter = IssueRateLimiter::new(0);
        for _ in 0..100 {
            limiter.check("alice").unwrap();
        }
    }
}
