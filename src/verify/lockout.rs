//! Brute-force lockouts: too many failed verifications of one key (a known key id with wrong
//! secrets) lock that key's unrecognised secrets; too many from one client IP lock that IP. A
//! locked request is refused without argon2 or a database read, so guessing stops costing CPU.
//!
//! Counters live in memory per replica, in bounded caches (moka): a flood of distinct IPs or key
//! ids evicts old counters instead of growing without bound. Each counter counts the failures
//! within a window that starts at its first failure.

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::sync::Cache;

#[derive(Debug, Clone)]
pub struct LockoutConfig {
    /// Failed verifications of one key within `window` that lock it.
    pub key_failures: u32,
    /// Failed verifications from one client IP within `window` that lock it.
    pub ip_failures: u32,
    pub window: Duration,
    /// How long a lockout lasts.
    pub duration: Duration,
    /// Keys and IPs tracked at most, each (counters and lockouts alike).
    pub capacity: u64,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        Self {
            key_failures: 10,
            ip_failures: 20,
            window: Duration::from_secs(5 * 60),
            duration: Duration::from_secs(15 * 60),
            capacity: 100_000,
        }
    }
}

/// A client address as lockouts count it: IPv4 addresses one by one, IPv6 by /64 network (one
/// host usually holds a whole /64, so single IPv6 addresses are free to rotate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientIp {
    V4(u32),
    V6Network(u64),
}

impl ClientIp {
    pub fn parse(text: &str) -> Option<Self> {
        Some(Self::from(text.parse::<IpAddr>().ok()?))
    }
}

impl From<IpAddr> for ClientIp {
    fn from(address: IpAddr) -> Self {
        match address {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(u32::from(v4)),
                None => Self::V6Network((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Failure counters and active lockouts of one kind of subject (key ids, or client IPs).
struct Tracker<K: Hash + Eq + Send + Sync + 'static> {
    threshold: u32,
    /// Lockouts engaged since start.
    engaged: AtomicU64,
    duration: Duration,
    failures: Cache<K, Arc<AtomicU32>>,
    locked_until: Cache<K, Instant>,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Tracker<K> {
    fn new(threshold: u32, config: &LockoutConfig) -> Self {
        Self {
            threshold,
            engaged: AtomicU64::new(0),
            duration: config.duration,
            failures: Cache::builder()
                .max_capacity(config.capacity)
                .time_to_live(config.window)
                .build(),
            locked_until: Cache::builder()
                .max_capacity(config.capacity)
                .time_to_live(config.duration)
                .build(),
        }
    }

    /// How long the subject stays locked, if it is.
    fn locked(&self, subject: &K) -> Option<Duration> {
        let until = self.locked_until.get(subject)?;
        let remaining = until.saturating_duration_since(Instant::now());
        (!remaining.is_zero()).then_some(remaining)
    }

    fn failed(&self, subject: &K) {
        if self.threshold == 0 {
            return;
        }
        let count = self
            .failures
            .get_with_by_ref(subject, || Arc::new(AtomicU32::new(0)))
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if count >= self.threshold {
            self.locked_until
                .insert(subject.clone(), Instant::now() + self.duration);
            self.failures.invalidate(subject);
            self.engaged.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn tracked(&self) -> u64 {
        self.failures.run_pending_tasks();
        self.locked_until.run_pending_tasks();
        self.failures.entry_count() + self.locked_until.entry_count()
    }
}

pub struct Lockouts {
    keys: Tracker<String>,
    ips: Tracker<ClientIp>,
}

impl Lockouts {
    pub fn new(config: &LockoutConfig) -> Self {
        Self {
            keys: Tracker::new(config.key_failures, config),
            ips: Tracker::new(config.ip_failures, config),
        }
    }

    /// How long until this request may be tried again, if its key or IP is locked.
    pub fn locked(&self, key_id: Option<&str>, ip: Option<ClientIp>) -> Option<Duration> {
        let ip_lock = ip.and_then(|ip| self.ips.locked(&ip));
        let key_lock = key_id.and_then(|key_id| self.keys.locked(&key_id.to_owned()));
        ip_lock.max(key_lock)
    }

    /// Counts a failed verification: against the IP always, against the key when a known key id
    /// was presented with a wrong secret.
    pub fn failed(&self, wrong_secret_for: Option<&str>, ip: Option<ClientIp>) {
        if let Some(ip) = ip {
            self.ips.failed(&ip);
        }
        if let Some(key_id) = wrong_secret_for {
            self.keys.failed(&key_id.to_owned());
        }
    }

    /// Lockouts engaged since start: (keys, IPs).
    pub fn engaged(&self) -> (u64, u64) {
        (
            self.keys.engaged.load(Ordering::Relaxed),
            self.ips.engaged.load(Ordering::Relaxed),
        )
    }

    /// Counters and lockouts held in memory, keys and IPs together.
    pub fn tracked(&self) -> u64 {
        self.keys.tracked() + self.ips.tracked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LockoutConfig {
        LockoutConfig {
            key_failures: 3,
            ip_failures: 5,
            window: Duration::from_secs(60),
            duration: Duration::from_secs(900),
            capacity: 1000,
        }
    }

    #[test]
    fn key_locks_at_threshold() {
        let lockouts = Lockouts::new(&config());
        for _ in 0..2 {
            lockouts.failed(Some("K"), None);
        }
        assert_eq!(lockouts.locked(Some("K"), None), None);
        lockouts.failed(Some("K"), None);
        let remaining = lockouts.locked(Some("K"), None).unwrap();
        assert!(remaining > Duration::from_secs(890));
        assert_eq!(lockouts.locked(Some("other"), None), None);
    }

    #[test]
    fn ip_locks_at_threshold() {
        let lockouts = Lockouts::new(&config());
        let ip = ClientIp::parse("198.51.100.4");
        for _ in 0..5 {
            lockouts.failed(None, ip);
        }
        assert!(lockouts.locked(None, ip).is_some());
        assert!(lockouts.locked(Some("K"), ip).is_some());
        assert_eq!(lockouts.locked(None, ClientIp::parse("198.51.100.5")), None);
    }

    #[test]
    fn ipv6_counts_by_network() {
        let a = ClientIp::parse("2001:db8:1:2::1").unwrap();
        let b = ClientIp::parse("2001:db8:1:2:ffff::9").unwrap();
        let c = ClientIp::parse("2001:db8:1:3::1").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            ClientIp::parse("::ffff:192.0.2.1"),
            ClientIp::parse("192.0.2.1")
        );
        assert_eq!(ClientIp::parse("not an ip"), None);
    }

    #[test]
    fn memory_is_bounded() {
        let lockouts = Lockouts::new(&LockoutConfig {
            capacity: 100,
            ..config()
        });
        for n in 0..10_000u32 {
            lockouts.failed(None, Some(ClientIp::V4(n)));
        }
        assert!(lockouts.tracked() <= 200, "{}", lockouts.tracked());
    }
}
