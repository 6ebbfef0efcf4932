//! The two local caches, and the rules for filling them.
//!
//! - digest of a presented key → key id: filled only from the authority's VALID answer for that
//!   exact text, whose key id is the one embedded in the text. Immutable (a key id has one
//!   secret), so it is only evicted, never invalidated.
//! - key id → the key's state (scopes, role, environment, expiry; revoked or disabled once an
//!   event says so): dropped by every event about the key, and all of it when the event stream
//!   breaks.
//!
//! A remote answer is a fact about the moment a replica answered, and that replica may lag the
//! event stream by a little (its own change notification may not have arrived yet). So an
//! answer only fills the state cache when nothing the stream said could be newer than it:
//! - the stream has been live for at least `settle` before the call started (after a (re)connect
//!   a change committed while nobody listened could still be missing on some replica);
//! - no event about the key arrived within `settle` before the call started, nor during it;
//! - the stream has not broken since the call started.
//!
//! The check runs after the insertion (and every event and break drops state after recording
//! itself), so a fill racing an event or a break is dropped by one side or the other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use moka::sync::Cache;

use super::usage::UsageCell;
use crate::pb::{self, VerifyCode};

/// A key as the local verifier knows it: only keys the authority answered VALID for, without a
/// usage limit, in a watched workspace.
pub(crate) struct LocalKey {
    /// The public metadata of the VALID answer (or, once refused, as the event left it).
    pub key: Arc<pb::Key>,
    /// Sorted, for the scope check; `full_access` when empty or holding the `full_access` scope.
    scopes: Box<[String]>,
    full_access: bool,
    /// Microseconds since the Unix epoch; `None`: never expires.
    expire_micros: Option<i64>,
    /// Set by a `key.revoked` or `key.disabled` event: refused locally with this code.
    pub refused: Option<VerifyCode>,
    pub usage: Arc<UsageCell>,
}

impl LocalKey {
    pub fn new(key: pb::Key, usage: Arc<UsageCell>) -> Self {
        let mut scopes: Vec<String> = key.scopes.clone();
        scopes.sort_unstable();
        let full_access = scopes.is_empty() || scopes.iter().any(|scope| scope == "full_access");
        let expire_micros = key.expire_time.as_ref().map(|at| {
            at.seconds
                .saturating_mul(1_000_000)
                .saturating_add(i64::from(at.nanos / 1000))
        });
        Self {
            key: Arc::new(key),
            scopes: scopes.into_boxed_slice(),
            full_access,
            expire_micros,
            refused: None,
            usage,
        }
    }

    /// The same key, refused from now on with `code` (the key's view says so too).
    fn refused(&self, code: VerifyCode) -> Self {
        let mut key = pb::Key::clone(&self.key);
        key.state = match code {
            VerifyCode::Revoked => pb::KeyState::Revoked,
            _ => pb::KeyState::Disabled,
        } as i32;
        if code == VerifyCode::Disabled {
            key.enabled = false;
        }
        Self {
            key: Arc::new(key),
            scopes: self.scopes.clone(),
            full_access: self.full_access,
            expire_micros: self.expire_micros,
            refused: Some(code),
            usage: self.usage.clone(),
        }
    }

    /// True when the key is sure to be unexpired for `margin` after `now` (microseconds).
    pub fn lives_past(&self, now: i64, margin: i64) -> bool {
        self.expire_micros
            .is_none_or(|expiry| expiry > now.saturating_add(margin))
    }

    /// True when the key certainly grants every required scope: the server's rule (full access,
    /// or each scope held exactly). Anything else is for the authority to decide.
    pub fn grants(&self, required: &[String]) -> bool {
        self.full_access
            || required.iter().all(|needed| {
                self.scopes
                    .binary_search_by(|held| held.as_str().cmp(needed))
                    .is_ok()
            })
    }
}

/// What a stream event does to the local state of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Revoked (final) or disabled: refuse locally, whatever a lagging replica says.
    Refuse(VerifyCode),
    /// Anything else (updated, rotated, enabled, expired, locked, types added later): forget
    /// the state, so the next verify asks the authority.
    Forget,
    /// A new key: nothing is known of it here, and no replica can hold a VALID state of it
    /// that is out of date, so its first answer may be kept at once.
    Nothing,
}

impl Change {
    pub fn of_event(event_type: &str) -> Self {
        match event_type {
            "key.revoked" => Self::Refuse(VerifyCode::Revoked),
            "key.disabled" => Self::Refuse(VerifyCode::Disabled),
            "key.issued" => Self::Nothing,
            _ => Self::Forget,
        }
    }
}

pub(crate) struct LocalCaches {
    pub digests: Cache<[u8; 32], Arc<str>>,
    pub states: Cache<Arc<str>, Arc<LocalKey>>,
    /// The stream is live: local answers may be given.
    live: AtomicBool,
    guard: Mutex<FillGuard>,
    /// Bumped by every break of the stream.
    epoch: AtomicU64,
    settle: Duration,
}

/// When things happened, for the fill rule.
struct FillGuard {
    /// When the stream (re)connected; `None` while it is down.
    live_since: Option<Instant>,
    /// When an event about each key last arrived; entries older than `settle` are pruned.
    changed: HashMap<Arc<str>, Instant>,
    last_prune: Instant,
}

/// Taken before a remote call: what the fill rule compares against afterwards.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FillTicket {
    started: Instant,
    epoch: u64,
}

impl LocalCaches {
    pub fn new(max_keys: u64, state_ttl: Duration, settle: Duration) -> Self {
        Self {
            digests: Cache::builder().max_capacity(max_keys).build(),
            states: Cache::builder()
                .max_capacity(max_keys)
                .time_to_live(state_ttl)
                .build(),
            live: AtomicBool::new(false),
            guard: Mutex::new(FillGuard {
                live_since: None,
                changed: HashMap::new(),
                last_prune: Instant::now(),
            }),
            epoch: AtomicU64::new(0),
            settle,
        }
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// When local answers may start: the stream's connection time plus `settle`.
    pub fn ready_at(&self) -> Option<Instant> {
        self.lock().live_since.map(|since| since + self.settle)
    }

    pub fn ticket(&self) -> FillTicket {
        FillTicket {
            started: Instant::now(),
            epoch: self.epoch.load(Ordering::Acquire),
        }
    }

    /// Caches the authority's VALID answer for `digest` (checked by the caller: the exact key,
    /// its id, no usage limit, a watched workspace) if the fill rule allows; true if it stayed.
    pub fn fill(
        &self,
        digest: [u8; 32],
        key_id: Arc<str>,
        state: LocalKey,
        ticket: FillTicket,
    ) -> bool {
        if !self.may_fill(&key_id, ticket) {
            return false;
        }
        self.digests.insert(digest, key_id.clone());
        self.states.insert(key_id.clone(), Arc::new(state));
        // Checked again after the insertion: an event or a break recorded meanwhile drops it.
        if self.may_fill(&key_id, ticket) {
            return true;
        }
        self.states.invalidate(&key_id);
        false
    }

    fn may_fill(&self, key_id: &str, ticket: FillTicket) -> bool {
        if self.epoch.load(Ordering::Acquire) != ticket.epoch || !self.is_live() {
            return false;
        }
        let guard = self.lock();
        let settled_since = ticket.started.checked_sub(self.settle);
        let Some(live_since) = guard.live_since else {
            return false;
        };
        let calm = |since: Instant| settled_since.is_some_and(|settled| since <= settled);
        if !calm(live_since) {
            return false;
        }
        guard
            .changed
            .get(key_id)
            .is_none_or(|changed| calm(*changed))
    }

    /// An event about `key_id` arrived.
    pub fn key_changed(&self, key_id: &str, change: Change) {
        if change == Change::Nothing {
            return;
        }
        {
            let mut guard = self.lock();
            let now = Instant::now();
            if now.duration_since(guard.last_prune) > self.settle {
                let settle = self.settle;
                guard
                    .changed
                    .retain(|_, changed| now.duration_since(*changed) <= settle);
                guard.last_prune = now;
            }
            guard.changed.insert(Arc::from(key_id), now);
        }
        match (change, self.states.get(key_id)) {
            (Change::Refuse(code), Some(known)) => {
                self.states.insert(
                    known.key.key_id.as_str().into(),
                    Arc::new(known.refused(code)),
                );
            }
            _ => self.states.invalidate(key_id),
        }
    }

    /// The stream is (back) up: local answers resume once `settle` has passed.
    pub fn stream_up(&self) {
        self.lock().live_since = Some(Instant::now());
        self.live.store(true, Ordering::Release);
    }

    /// The stream broke (or the verifier is shutting down): nothing is answered locally until it
    /// is back, and every state known so far is dropped, since a change may be missed from now.
    pub fn stream_down(&self) {
        self.live.store(false, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.lock().live_since = None;
        self.states.invalidate_all();
    }

    fn lock(&self) -> MutexGuard<'_, FillGuard> {
        // Nothing panics while it is held; the maps stay consistent between statements.
        self.guard.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(scopes: &[&str], expire_seconds: Option<i64>) -> LocalKey {
        let key = pb::Key {
            key_id: "AAAAAAAAAAAA".into(),
            scopes: scopes.iter().map(|scope| scope.to_string()).collect(),
            expire_time: expire_seconds.map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
            ..Default::default()
        };
        LocalKey::new(
            key,
            Arc::new(UsageCell::new("AAAAAAAAAAAA".into(), "acme".into())),
        )
    }

    #[test]
    fn scopes_are_granted_as_the_server_grants_them() {
        let required = |scopes: &[&str]| scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(key(&[], None).grants(&required(&["anything"])));
        assert!(key(&["full_access"], None).grants(&required(&["anything"])));
        let narrow = key(&["b:read", "a:write"], None);
        assert!(narrow.grants(&required(&[])));
        assert!(narrow.grants(&required(&["a:write", "b:read"])));
        assert!(!narrow.grants(&required(&["b:*"])), "no wildcard locally");
        assert!(!narrow.grants(&required(&["c"])));
    }

    #[test]
    fn a_key_near_its_expiry_is_not_answered_locally() {
        let expiring = key(&[], Some(100));
        assert!(expiring.lives_past(98_000_000, 1_000_000));
        assert!(!expiring.lives_past(99_000_000, 1_000_000));
        assert!(!expiring.lives_past(100_000_000, 0));
        assert!(key(&[], None).lives_past(i64::MAX, 1_000_000));
    }

    #[test]
    fn fills_wait_for_the_stream_and_for_calm() {
        let caches = LocalCaches::new(100, Duration::from_secs(60), Duration::ZERO);
        let id: Arc<str> = "AAAAAAAAAAAA".into();
        let ticket = caches.ticket();
        assert!(
            !caches.fill([1; 32], id.clone(), key(&[], None), ticket),
            "not live"
        );
        caches.stream_up();
        let ticket = caches.ticket();
        assert!(caches.fill([1; 32], id.clone(), key(&[], None), ticket));
        assert!(caches.states.get(&id).is_some());

        // A break while a call is in flight: its answer is not kept.
        let ticket = caches.ticket();
        caches.stream_down();
        caches.stream_up();
        assert!(!caches.fill([1; 32], id.clone(), key(&[], None), ticket));
        assert!(caches.states.get(&id).is_none());
    }

    #[test]
    fn an_event_during_a_call_keeps_its_answer_out() {
        let caches = LocalCaches::new(100, Duration::from_secs(60), Duration::from_secs(3600));
        caches.stream_up();
        let id: Arc<str> = "AAAAAAAAAAAA".into();
        // Not settled: the stream has just connected.
        assert!(!caches.fill([1; 32], id.clone(), key(&[], None), caches.ticket()));

        let caches = LocalCaches::new(100, Duration::from_secs(60), Duration::ZERO);
        caches.stream_up();
        let ticket = caches.ticket();
        std::thread::sleep(Duration::from_millis(2));
        caches.key_changed(&id, Change::Forget);
        assert!(!caches.fill([1; 32], id.clone(), key(&[], None), ticket));
        assert!(caches.fill([1; 32], id.clone(), key(&[], None), caches.ticket()));
    }

    #[test]
    fn revocation_and_disabling_are_kept_as_refusals() {
        let caches = LocalCaches::new(100, Duration::from_secs(60), Duration::ZERO);
        caches.stream_up();
        let id: Arc<str> = "AAAAAAAAAAAA".into();
        assert!(caches.fill([1; 32], id.clone(), key(&[], None), caches.ticket()));
        caches.key_changed(&id, Change::of_event("key.revoked"));
        let refused = caches.states.get(&id).expect("kept");
        assert_eq!(refused.refused, Some(VerifyCode::Revoked));
        assert_eq!(refused.key.state, pb::KeyState::Revoked as i32);
        caches.key_changed(&id, Change::of_event("key.updated"));
        assert!(caches.states.get(&id).is_none());
        assert_eq!(
            Change::of_event("key.disabled"),
            Change::Refuse(VerifyCode::Disabled)
        );
        assert_eq!(Change::of_event("key.something_new"), Change::Forget);
        assert_eq!(Change::of_event("key.issued"), Change::Nothing);
    }
}
