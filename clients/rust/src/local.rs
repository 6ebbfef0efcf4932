//! [`LocalVerifier`]: the verifier inside the caller. Warm keys are verified in this process
//! (a BLAKE3 digest, two in-memory lookups, an expiry and a scope check, three atomic counters);
//! everything else asks key-authority. Every change to a key reaches the local state through the
//! authority's event stream (WatchKeyEvents) within milliseconds; local VALID verdicts are
//! reported back in batches (ReportUsage). README.md, "The verifier inside the caller".

mod cache;
mod feed;
mod usage;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use feed::FeedStatus;

use cache::{FillTicket, LocalCaches, LocalKey};
use usage::UsageBook;

use crate::pb::{self, VerifyCode};
use crate::{Error, KeyAuthorityClient};

/// Keys are at most 256 bytes; anything longer goes to the authority, which refuses it.
const MAX_KEY_LEN: usize = 256;

/// How a [`LocalVerifier`] is set up. Made by [`LocalVerifier::builder`].
#[derive(Debug, Clone)]
pub struct LocalVerifierBuilder {
    client: KeyAuthorityClient,
    workspaces: Vec<String>,
    all_workspaces: bool,
    max_keys: u64,
    state_ttl: Duration,
    settle: Duration,
    expiry_margin: Duration,
    usage_interval: Duration,
}

impl LocalVerifierBuilder {
    /// The workspaces whose keys are verified locally (one event stream each). Keys of other
    /// workspaces are always verified remotely.
    pub fn workspaces<I, S>(mut self, workspaces: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.workspaces = workspaces.into_iter().map(Into::into).collect();
        self
    }

    /// Every workspace's keys, over one stream (the client's credential must be an admin token).
    pub fn all_workspaces(mut self) -> Self {
        self.all_workspaces = true;
        self
    }

    /// The most keys (and presented-key digests) held in memory; default 100,000. About 1 KiB
    /// per key with typical metadata.
    pub fn max_keys(mut self, max_keys: u64) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// How long a key's state is kept without any event (a backstop only: events drop it at
    /// once); default 10 minutes.
    pub fn state_ttl(mut self, ttl: Duration) -> Self {
        self.state_ttl = ttl;
        self
    }

    /// How long the stream must have been live, and a key free of events, before a remote
    /// answer about it is kept: the time any replica may take to apply a change it was notified
    /// of (its state TTL, 5 s by default, bounds even a lost notification). Default 5 s.
    pub fn settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// Keys expiring within this margin are verified remotely (the caller's and the
    /// authority's clocks may differ by that much); default 1 s.
    pub fn expiry_margin(mut self, margin: Duration) -> Self {
        self.expiry_margin = margin;
        self
    }

    /// How often local usage is reported (ReportUsage); default 1 s. A crash loses at most this
    /// long's usage (plus reports the authority could not take meanwhile).
    pub fn usage_interval(mut self, interval: Duration) -> Self {
        self.usage_interval = interval;
        self
    }

    /// Starts the event stream and the usage reports in the background (call it inside a
    /// Tokio runtime) and returns at once: until the stream is live every verify is remote.
    /// Fails without a workspace (or [`all_workspaces`](Self::all_workspaces)).
    pub fn start(self) -> Result<LocalVerifier, Error> {
        if self.workspaces.is_empty() && !self.all_workspaces {
            return Err(Error::from(tonic::Status::invalid_argument(
                "a LocalVerifier needs the workspaces it serves (or all_workspaces)",
            )));
        }
        let caches = Arc::new(LocalCaches::new(self.max_keys, self.state_ttl, self.settle));
        let (status, status_rx) = watch::channel(FeedStatus::default());
        let (stop, stop_rx) = watch::channel(false);
        let applied = Arc::new(AtomicU64::new(0));
        let feed = tokio::spawn(feed::follow(
            self.client.clone(),
            feed::requests(&self.workspaces, self.all_workspaces),
            caches.clone(),
            status,
            applied,
            stop_rx.clone(),
        ));
        let usage = Arc::new(UsageBook::new());
        let reporter = tokio::spawn(report_usage(
            self.client.clone(),
            usage.clone(),
            self.usage_interval,
            stop_rx,
        ));
        Ok(LocalVerifier {
            inner: Arc::new(Inner {
                client: self.client,
                workspaces: self.workspaces,
                all_workspaces: self.all_workspaces,
                caches,
                usage,
                expiry_margin_micros: i64::try_from(self.expiry_margin.as_micros())
                    .unwrap_or(i64::MAX),
                status: status_rx,
                stop,
                tasks: std::sync::Mutex::new(Some((feed, reporter))),
                local_answers: AtomicU64::new(0),
                remote_answers: AtomicU64::new(0),
            }),
        })
    }
}

/// The answer of [`LocalVerifier::verify`]: VerifyKey's, given here or by the authority.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Verification {
    /// Why the key was accepted or refused.
    pub code: VerifyCode,
    /// The key's public metadata, when the key was identified (as in `VerifyKeyResponse.key`).
    /// In a local answer it is the authority's last VALID answer for the key (so its
    /// `total_requests` and `last_used_time` are as of then), with the state of a revocation
    /// or a disabling applied.
    pub key: Option<Arc<pb::Key>>,
    /// For `LOCKED`: how long until the lockout ends.
    pub retry_after: Option<Duration>,
    /// Answered in this process, without a call.
    pub local: bool,
}

impl Verification {
    /// True if and only if the code is `VALID`.
    pub fn is_valid(&self) -> bool {
        self.code == VerifyCode::Valid
    }
}

/// Counters of a [`LocalVerifier`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalStats {
    /// Answers given in this process.
    pub local_answers: u64,
    /// Answers key-authority gave (VerifyKey calls that returned a verdict).
    pub remote_answers: u64,
    /// Key states held now (approximate, as moka counts).
    pub cached_keys: u64,
    /// Local VALID verdicts key-authority has accepted reports of.
    pub usage_reported: u64,
}

/// A caller-side verifier: warm keys in microseconds' fractions, every change to them pushed by
/// key-authority.
///
/// It keeps two bounded caches, as the server does: the digest of a presented key → its key id
/// (filled only by the authority's VALID answer for that exact key: the caller never holds a
/// hash), and key id → the key's state. A warm verify is local; a cold key, a usage-limited key,
/// a refusal (lockouts included), a key near its expiry, a scope the state does not plainly grant,
/// and anything while the event stream is down go to the authority. If the authority cannot be
/// reached either, [`verify`](Self::verify) fails with `UNAVAILABLE`: never read that as an
/// invalid key.
///
/// The client needs a KeyService credential that may watch the served workspaces and report
/// their usage (developer role or above, or an admin token for
/// [`all_workspaces`](LocalVerifierBuilder::all_workspaces)), and the verify token if the
/// deployment requires one.
///
/// A break of the event stream is noticed when the stream ends or fails; give the client's
/// `Endpoint` HTTP/2 keep-alives (`http2_keep_alive_interval`, `keep_alive_timeout`,
/// `keep_alive_while_idle`) so that a connection that dies silently is noticed within seconds.
///
/// Cheap to clone (clones share everything). Call [`shutdown`](Self::shutdown) before the
/// process exits, so that every local verdict is counted; dropping the last clone stops the
/// background tasks without reporting.
#[derive(Clone)]
pub struct LocalVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    client: KeyAuthorityClient,
    workspaces: Vec<String>,
    all_workspaces: bool,
    caches: Arc<LocalCaches>,
    usage: Arc<UsageBook>,
    expiry_margin_micros: i64,
    status: watch::Receiver<FeedStatus>,
    stop: watch::Sender<bool>,
    tasks: std::sync::Mutex<Option<(JoinHandle<()>, JoinHandle<()>)>>,
    local_answers: AtomicU64,
    remote_answers: AtomicU64,
}

impl std::fmt::Debug for LocalVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalVerifier")
            .field("workspaces", &self.inner.workspaces)
            .field("all_workspaces", &self.inner.all_workspaces)
            .field("status", &*self.inner.status.borrow())
            .finish_non_exhaustive()
    }
}

impl LocalVerifier {
    /// A verifier that calls key-authority with `client`. Name the workspaces it serves, then
    /// [`start`](LocalVerifierBuilder::start) it.
    pub fn builder(client: KeyAuthorityClient) -> LocalVerifierBuilder {
        LocalVerifierBuilder {
            client,
            workspaces: Vec::new(),
            all_workspaces: false,
            max_keys: 100_000,
            state_ttl: Duration::from_secs(600),
            settle: Duration::from_secs(5),
            expiry_margin: Duration::from_secs(1),
            usage_interval: Duration::from_secs(1),
        }
    }

    /// Verifies `key` with `required_scopes`: locally when it can, else with VerifyKey (sending
    /// `client_ip` for the authority's lockouts). `Err` only when the authority had to be asked
    /// and could not answer (`UNAVAILABLE` and the like) or refused the call itself.
    pub async fn verify(
        &self,
        key: &str,
        required_scopes: &[String],
        client_ip: Option<IpAddr>,
    ) -> Result<Verification, Error> {
        if let Some(answer) = self.verify_local(key, required_scopes) {
            return Ok(answer);
        }
        self.verify_remote(key, required_scopes, client_ip).await
    }

    /// The local answer, if this process can give one now; `None`: ask the authority. Counts a
    /// local VALID verdict for the usage reports. No I/O, no await, no allocation.
    pub fn verify_local(&self, key: &str, required_scopes: &[String]) -> Option<Verification> {
        let inner = &*self.inner;
        if key.len() > MAX_KEY_LEN || !inner.caches.is_live() {
            return None;
        }
        // The digest, never the plaintext, is the cache key.
        let digest = *blake3::hash(key.as_bytes()).as_bytes();
        let key_id = inner.caches.digests.get(&digest)?;
        let state = inner.caches.states.get(&key_id)?;
        let now = now_micros();
        if let Some(code) = state.refused {
            // The server's order: revoked, then expired, then disabled. A disabled key whose
            // expiry may have passed is the authority's to call EXPIRED.
            if code == VerifyCode::Disabled && !state.lives_past(now, inner.expiry_margin_micros) {
                return None;
            }
            inner.local_answers.fetch_add(1, Ordering::Relaxed);
            return Some(Verification {
                code,
                key: Some(state.key.clone()),
                retry_after: None,
                local: true,
            });
        }
        if !state.lives_past(now, inner.expiry_margin_micros)
            || !well_formed(required_scopes)
            || !state.grants(required_scopes)
        {
            return None;
        }
        state.usage.record(now);
        inner.local_answers.fetch_add(1, Ordering::Relaxed);
        Some(Verification {
            code: VerifyCode::Valid,
            key: Some(state.key.clone()),
            retry_after: None,
            local: true,
        })
    }

    /// Asks key-authority, and keeps a VALID answer if it is one the local state may hold.
    async fn verify_remote(
        &self,
        key: &str,
        required_scopes: &[String],
        client_ip: Option<IpAddr>,
    ) -> Result<Verification, Error> {
        let inner = &*self.inner;
        let ticket = inner.caches.ticket();
        let answer = inner
            .client
            .verify_key(pb::VerifyKeyRequest {
                key: key.to_owned(),
                required_scopes: required_scopes.to_vec(),
                client_ip: client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                cost: None,
                minimum_role: 0,
            })
            .await?;
        inner.remote_answers.fetch_add(1, Ordering::Relaxed);
        let code = answer.code();
        if code == VerifyCode::Valid
            && answer.valid
            && let Some(found) = &answer.key
        {
            self.keep(key, found, ticket);
        }
        Ok(Verification {
            code,
            key: answer.key.map(Arc::new),
            retry_after: answer
                .retry_after
                .and_then(|delay| Duration::try_from(delay).ok()),
            local: false,
        })
    }

    /// Caches a VALID answer for `presented`: only for the key id embedded in that exact text,
    /// without a usage limit, in a workspace whose events this verifier hears.
    fn keep(&self, presented: &str, key: &pb::Key, ticket: FillTicket) {
        let inner = &*self.inner;
        if key.usage_limit != 0
            || embedded_key_id(presented) != Some(key.key_id.as_str())
            || !(inner.all_workspaces || inner.workspaces.contains(&key.workspace_id))
        {
            return;
        }
        let digest = *blake3::hash(presented.as_bytes()).as_bytes();
        let key_id: Arc<str> = Arc::from(key.key_id.as_str());
        let usage = inner.usage.cell(&key_id, &key.workspace_id);
        let state = LocalKey::new(key.clone(), usage);
        inner.caches.fill(digest, key_id, state, ticket);
    }

    /// The event stream's progress.
    pub fn status(&self) -> watch::Receiver<FeedStatus> {
        self.inner.status.clone()
    }

    /// Waits until local answers can be given: the stream is live and has been for the
    /// `settle` time.
    pub async fn wait_ready(&self) {
        let mut status = self.status();
        loop {
            if status.wait_for(|status| status.live).await.is_err() {
                return;
            }
            match self.inner.caches.ready_at() {
                Some(at) => {
                    tokio::time::sleep_until(at.into()).await;
                    if self.inner.caches.is_live() {
                        return;
                    }
                }
                None => {
                    let _ = status.changed().await;
                }
            }
        }
    }

    /// Counters, for metrics and tests.
    pub fn stats(&self) -> LocalStats {
        let inner = &*self.inner;
        inner.caches.states.run_pending_tasks();
        LocalStats {
            local_answers: inner.local_answers.load(Ordering::Relaxed),
            remote_answers: inner.remote_answers.load(Ordering::Relaxed),
            cached_keys: inner.caches.states.entry_count(),
            usage_reported: inner.usage.reported(),
        }
    }

    /// Local VALID verdicts not yet accepted by key-authority: counted, or in a report it has
    /// not taken yet. What a crash now would lose.
    pub async fn unreported_usage(&self) -> u64 {
        self.inner.usage.unreported().await
    }

    /// Reports the usage counted so far now, rather than at the next interval.
    pub async fn report_usage(&self) -> Result<(), Error> {
        self.inner.usage.report(&self.inner.client).await
    }

    /// Stops the event stream (every later verify is remote) and reports every local verdict
    /// not yet reported. `Err` if the authority could not take them all: they are lost.
    pub async fn shutdown(&self) -> Result<(), Error> {
        let inner = &*self.inner;
        inner.stop.send_replace(true);
        inner.caches.stream_down();
        let tasks = inner
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((feed, reporter)) = tasks {
            let _ = feed.await;
            let _ = reporter.await;
        }
        // A few tries, for an authority that is restarting; each success may leave counts taken
        // after an earlier failure, so report until nothing is left.
        let mut failures = 0;
        loop {
            match inner.usage.report(&inner.client).await {
                Ok(()) if inner.usage.unreported().await == 0 => return Ok(()),
                Ok(()) => {}
                Err(error) if failures >= 4 => return Err(error),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100 << failures)).await;
                    failures += 1;
                }
            }
        }
    }
}

/// Reports usage every `interval` until `stop`.
async fn report_usage(
    client: KeyAuthorityClient,
    usage: Arc<UsageBook>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if let Err(error) = usage.report(&client).await {
                    tracing::warn!(code = ?error.code(), message = error.message(), "usage report failed, will retry");
                }
            }
            // The only change ever sent is the stop.
            _ = stop.changed() => return,
        }
    }
}

/// Required scopes VerifyKey would accept: at most 64, each 1 to 128 ASCII letters, digits and
/// `:._-/*`. Anything else goes to the authority, which refuses it (INVALID_ARGUMENT).
fn well_formed(required_scopes: &[String]) -> bool {
    required_scopes.len() <= 64
        && required_scopes.iter().all(|scope| {
            (1..=128).contains(&scope.len())
                && scope
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b":._-/*".contains(&byte))
        })
}

/// The key id inside a key's text `<brand>_<env>_<id><secret><check>`: the 12 characters after
/// the second underscore.
fn embedded_key_id(key: &str) -> Option<&str> {
    let mut parts = key.splitn(3, '_');
    let (_brand, _env, rest) = (parts.next()?, parts.next()?, parts.next()?);
    rest.get(..12)
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_scopes_verify_key_accepts_are_checked_locally() {
        let scopes = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(well_formed(&scopes(&[])));
        assert!(well_formed(&scopes(&["orders:read", "a.b-c_d/e*"])));
        assert!(!well_formed(&scopes(&[""])));
        assert!(!well_formed(&scopes(&["has space"])));
        assert!(!well_formed(&scopes(&["é"])));
        assert!(!well_formed(&scopes(&[&"a".repeat(129)])));
        assert!(!well_formed(&vec!["a".to_string(); 65]));
    }

    #[test]
    fn the_key_id_is_read_from_the_keys_text() {
        assert_eq!(
            embedded_key_id("ka_live_AbCdEfGhIjKlSECRETCHECK"),
            Some("AbCdEfGhIjKl")
        );
        assert_eq!(embedded_key_id("ka_live_short"), None);
        assert_eq!(embedded_key_id("nounderscore"), None);
    }
}
