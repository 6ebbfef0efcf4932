//! Brute-force lockouts: too many failed verifications of one key (a known key id with wrong
//! secrets) lock that key's unrecognised secrets; too many from one client IP lock that IP. A
//! locked request is refused without argon2 or a database read, so guessing stops costing CPU.
//!
//! An unrecognised secret is counted when its check *starts*, not when argon2 has answered: a
//! check in flight holds one of the window's attempts, so however many guesses arrive at once,
//! at most the threshold of them per key (and per client IP) reach argon2 in a window. A secret
//! that turns out right gives its attempt back; every other ending (wrong, abandoned, failed)
//! keeps it as a failure.
//!
//! Counters live in memory per replica, in bounded caches (moka): a flood of distinct IPs or key
//! ids evicts old counters instead of growing without bound. Each counter counts the attempts
//! within a window that starts at its first attempt.

use std::borrow::Borrow;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use moka::ops::compute::Op;
use moka::sync::Cache;

use crate::audit::LockoutAuditor;

#[derive(Debug, Clone)]
pub struct LockoutConfig {
    /// Unproven secrets of one key checked within `window` (failed, or still in flight) that
    /// lock it; 0 switches key lockouts off.
    pub key_failures: u32,
    /// Failures from one client IP within `window` (checks still in flight included) that lock
    /// it; 0 switches IP lockouts off.
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

/// An IPv4 address as usual; an IPv6 address as the /64 network it is counted by.
impl std::fmt::Display for ClientIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::V4(address) => std::net::Ipv4Addr::from(address).fmt(f),
            Self::V6Network(network) => {
                let address = std::net::Ipv6Addr::from(u128::from(network) << 64);
                write!(f, "{address}/64")
            }
        }
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

/// One subject's attempts within a window: failures, and checks still in flight ("pending").
/// Both live in one atomic word (failures in the high half, pending in the low half) so that
/// "failures + pending < threshold" is decided and taken in a single step.
#[derive(Debug, Default)]
struct Window {
    counts: AtomicU64,
}

const ONE_PENDING: u64 = 1;
const ONE_FAILURE: u64 = 1 << 32;

impl Window {
    /// Takes one attempt for a check about to start, unless the window has none left.
    fn try_reserve(&self, threshold: u32) -> bool {
        self.counts
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |counts| {
                let failures = counts >> 32;
                let pending = counts & u64::from(u32::MAX);
                (failures + pending < u64::from(threshold)).then_some(counts + ONE_PENDING)
            })
            .is_ok()
    }

    /// Gives a pending attempt back: the secret was right.
    fn release(&self) {
        self.counts.fetch_sub(ONE_PENDING, Ordering::AcqRel);
    }

    /// Turns a pending attempt into a failure in one step (the sum never dips, so no other
    /// check can slip in between). Returns the failures counted now.
    fn settle_failed(&self) -> u64 {
        (self
            .counts
            .fetch_add(ONE_FAILURE - ONE_PENDING, Ordering::AcqRel)
            >> 32)
            + 1
    }

    /// Counts a failure that had no pending attempt (nothing was checked: a repeated wrong
    /// secret, an unknown key, a malformed key). Returns the failures counted now.
    fn record_failure(&self) -> u64 {
        (self.counts.fetch_add(ONE_FAILURE, Ordering::AcqRel) >> 32) + 1
    }
}

/// Attempt windows and active lockouts of one kind of subject (key ids, or client IPs).
struct Tracker<K: Hash + Eq + Send + Sync + 'static> {
    /// Attempts per window that lock the subject; 0 switches this lockout off.
    threshold: u32,
    /// Lockouts engaged since start.
    engaged: AtomicU64,
    duration: Duration,
    windows: Cache<K, Arc<Window>>,
    locked_until: Cache<K, Instant>,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Tracker<K> {
    fn new(threshold: u32, config: &LockoutConfig) -> Self {
        Self {
            threshold,
            engaged: AtomicU64::new(0),
            duration: config.duration,
            windows: Cache::builder()
                .max_capacity(config.capacity)
                .time_to_live(config.window)
                .build(),
            locked_until: Cache::builder()
                .max_capacity(config.capacity)
                .time_to_live(config.duration)
                .build(),
        }
    }

    /// Drops expired counters and lockouts now (see `Lockouts::run_pending_tasks`).
    fn run_pending_tasks(&self) {
        self.windows.run_pending_tasks();
        self.locked_until.run_pending_tasks();
    }

    /// How long the subject stays locked, if it is.
    fn locked<Q>(&self, subject: &Q) -> Option<Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let until = self.locked_until.get(subject)?;
        let remaining = until.saturating_duration_since(Instant::now());
        (!remaining.is_zero()).then_some(remaining)
    }

    /// Takes one attempt of the subject's window for a check about to start. `Ok(None)` when
    /// this lockout is switched off; `Err` with how long to wait when no attempt is left.
    fn reserve(&self, subject: &K) -> Result<Option<Arc<Window>>, Duration> {
        if self.threshold == 0 {
            return Ok(None);
        }
        if let Some(remaining) = self.locked(subject) {
            return Err(remaining);
        }
        let window = self
            .windows
            .get_with_by_ref(subject, || Arc::new(Window::default()));
        if !window.try_reserve(self.threshold) {
            // Every attempt is a failure or in flight: if the checks in flight fail, the lockout
            // about to engage lasts this long.
            return Err(self.locked(subject).unwrap_or(self.duration));
        }
        // A lockout engaged between the first look and the reservation replaced the window, so
        // this reservation may sit in a fresh one: the lockout is in place by now, look again.
        if let Some(remaining) = self.locked(subject) {
            window.release();
            return Err(remaining);
        }
        Ok(Some(window))
    }

    /// Counts a failure with no pending attempt behind it.
    /// Counts a failure; true if it engaged a lockout.
    fn failed(&self, subject: &K) -> bool {
        if self.threshold == 0 {
            return false;
        }
        let window = self
            .windows
            .get_with_by_ref(subject, || Arc::new(Window::default()));
        let failures = window.record_failure();
        self.engage_at_threshold(subject, &window, failures)
    }

    /// Settles a pending attempt as a failure; true if it engaged a lockout.
    fn settle_failed(&self, subject: &K, window: &Arc<Window>) -> bool {
        let failures = window.settle_failed();
        self.engage_at_threshold(subject, window, failures)
    }

    /// Locks the subject when this failure is the one that reached the threshold (exactly one
    /// failure sees the count equal it), then retires its window so that a fresh one starts
    /// after the lockout. The lockout is inserted first: `reserve` relies on that order.
    fn engage_at_threshold(&self, subject: &K, window: &Arc<Window>, failures: u64) -> bool {
        if failures != u64::from(self.threshold) {
            return false;
        }
        self.locked_until
            .insert(subject.clone(), Instant::now() + self.duration);
        self.engaged.fetch_add(1, Ordering::Relaxed);
        // Only this window: one that replaced it (after its time ran out) has counts of its own.
        self.windows
            .entry_by_ref(subject)
            .and_compute_with(|current| match current {
                Some(entry) if Arc::ptr_eq(entry.value(), window) => Op::Remove,
                _ => Op::Nop,
            });
        true
    }

    fn tracked(&self) -> u64 {
        self.windows.run_pending_tasks();
        self.locked_until.run_pending_tasks();
        self.windows.entry_count() + self.locked_until.entry_count()
    }
}

pub struct Lockouts {
    keys: Tracker<String>,
    ips: Tracker<ClientIp>,
    /// Told of every key lockout, for the audit trail; unset in tools and unit tests.
    auditor: OnceLock<LockoutAuditor>,
}

impl Lockouts {
    pub fn new(config: &LockoutConfig) -> Self {
        Self {
            keys: Tracker::new(config.key_failures, config),
            ips: Tracker::new(config.ip_failures, config),
            auditor: OnceLock::new(),
        }
    }

    /// Reports every key lockout from now on to `auditor` (once; a second auditor is ignored).
    pub fn report_to(&self, auditor: LockoutAuditor) {
        let _ = self.auditor.set(auditor);
    }

    fn key_locked(&self, key_id: &str, ip: Option<ClientIp>) {
        if let Some(auditor) = self.auditor.get() {
            auditor.engaged(key_id, ip);
        }
    }

    /// Drops expired counters and lockouts now. moka removes expired entries only while its
    /// caches are used, so after a flood an idle replica would keep them all.
    pub fn run_pending_tasks(&self) {
        self.keys.run_pending_tasks();
        self.ips.run_pending_tasks();
    }

    /// How long until this request may be tried again, if its key or IP is locked. Reads only:
    /// the early refusal that spares a locked request its database read.
    pub fn locked(&self, key_id: Option<&str>, ip: Option<ClientIp>) -> Option<Duration> {
        let ip_lock = ip.and_then(|ip| self.ips.locked(&ip));
        let key_lock = key_id.and_then(|key_id| self.keys.locked(key_id));
        ip_lock.max(key_lock)
    }

    /// Counts a failed verification that checked no secret (malformed, unknown key, a wrong
    /// secret already known to be wrong): against the IP always, against the key when a known
    /// key id was presented with a wrong secret.
    pub fn failed(&self, wrong_secret_for: Option<&str>, ip: Option<ClientIp>) {
        if let Some(ip) = ip {
            self.ips.failed(&ip);
        }
        if let Some(key_id) = wrong_secret_for
            && self.keys.failed(&key_id.to_owned())
        {
            self.key_locked(key_id, ip);
        }
    }

    /// Takes one attempt of `key_id`'s window (and of `ip`'s) for an unrecognised secret about
    /// to be checked with argon2. `Err` with how long to wait when either has none left: the
    /// check must not run. Until settled, the attempt counts against both thresholds.
    pub fn begin_check(
        &self,
        key_id: &str,
        ip: Option<ClientIp>,
    ) -> Result<PendingCheck<'_>, Duration> {
        let key_id = key_id.to_owned();
        let key_window = self.keys.reserve(&key_id)?;
        let ip_window = match ip.map(|ip| self.ips.reserve(&ip)).transpose() {
            Ok(window) => window.flatten(),
            Err(remaining) => {
                // Not checked, so not a failure of the key: give its attempt back.
                if let Some(window) = key_window {
                    window.release();
                }
                return Err(remaining);
            }
        };
        Ok(PendingCheck {
            lockouts: self,
            key: key_window.map(|window| (key_id, window)),
            ip: ip.zip(ip_window),
        })
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

/// An unrecognised secret being checked: it holds one attempt of its key's window (and of its
/// client IP's) until settled. [`PendingCheck::matched`] gives the attempts back; dropping it
/// any other way (a wrong secret, a check abandoned or failed midway, whose argon2 may still
/// run) counts a failure, so no ending frees an attempt without proof.
#[must_use = "dropping a pending check counts a failure"]
pub struct PendingCheck<'a> {
    lockouts: &'a Lockouts,
    key: Option<(String, Arc<Window>)>,
    ip: Option<(ClientIp, Arc<Window>)>,
}

impl PendingCheck<'_> {
    /// The check never reached argon2 (its budget was spent): the attempt is given back and
    /// counts as nothing.
    pub fn not_tried(self) {
        self.matched();
    }

    /// The secret was right: not a failure, and its attempts are free again.
    pub fn matched(mut self) {
        if let Some((_, window)) = self.key.take() {
            window.release();
        }
        if let Some((_, window)) = self.ip.take() {
            window.release();
        }
    }
}

impl Drop for PendingCheck<'_> {
    fn drop(&mut self) {
        if let Some((key_id, window)) = self.key.take()
            && self.lockouts.keys.settle_failed(&key_id, &window)
        {
            let ip = self.ip.as_ref().map(|(ip, _)| *ip);
            self.lockouts.key_locked(&key_id, ip);
        }
        if let Some((ip, window)) = self.ip.take() {
            self.lockouts.ips.settle_failed(&ip, &window);
        }
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
    fn a_check_in_flight_counts_against_the_threshold() {
        let lockouts = Lockouts::new(&config());
        let first = lockouts.begin_check("K", None).unwrap();
        let second = lockouts.begin_check("K", None).unwrap();
        let third = lockouts.begin_check("K", None).unwrap();
        // Nothing has failed yet, but three checks are in flight: a fourth may not start.
        assert_eq!(lockouts.locked(Some("K"), None), None);
        let refused = lockouts.begin_check("K", None).err().unwrap();
        assert!(refused > Duration::from_secs(890), "{refused:?}");
        // A right secret gives its attempt back, uncounted.
        first.matched();
        let fourth = lockouts.begin_check("K", None).unwrap();
        drop(second);
        drop(third);
        assert_eq!(lockouts.locked(Some("K"), None), None, "two failures");
        drop(fourth);
        assert!(lockouts.locked(Some("K"), None).is_some(), "three failures");
        assert_eq!(lockouts.engaged(), (1, 0));
        assert!(lockouts.begin_check("K", None).is_err());
        assert!(lockouts.begin_check("other", None).is_ok());
    }

    #[test]
    fn an_ip_without_attempts_left_refuses_and_spares_the_key() {
        let lockouts = Lockouts::new(&config());
        let ip = ClientIp::parse("198.51.100.4");
        let held: Vec<_> = (0..5)
            .map(|n| lockouts.begin_check(&format!("K{n}"), ip).unwrap())
            .collect();
        assert!(lockouts.begin_check("K9", ip).is_err());
        // K9's attempt was given back: three checks of it still fit from elsewhere.
        for _ in 0..3 {
            lockouts.begin_check("K9", None).unwrap().matched();
        }
        drop(held);
        assert!(lockouts.locked(None, ip).is_some());
    }

    #[test]
    fn racing_threads_start_at_most_the_threshold_of_checks() {
        let lockouts = Lockouts::new(&config());
        let started = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..16 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        if let Ok(check) = lockouts.begin_check("K", None) {
                            started.fetch_add(1, Ordering::Relaxed);
                            drop(check);
                        }
                    }
                });
            }
        });
        assert_eq!(started.load(Ordering::Relaxed), 3);
        assert!(lockouts.locked(Some("K"), None).is_some());
    }

    #[test]
    fn a_zero_threshold_switches_the_lockout_off() {
        let lockouts = Lockouts::new(&LockoutConfig {
            key_failures: 0,
            ..config()
        });
        for _ in 0..10 {
            drop(lockouts.begin_check("K", None).unwrap());
            lockouts.failed(Some("K"), None);
        }
        assert_eq!(lockouts.locked(Some("K"), None), None);
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
