//! Watching key events: each watcher reads the outbox in position order from where it starts,
//! then waits for the doorbell (the store's change feed: PostgreSQL NOTIFY from any replica, or
//! this process's own commits on SQLite) and reads on. Nothing is buffered for a watcher beyond a
//! small bounded channel: one that reads slowly makes its reader wait, and catches up from the
//! outbox. A missed doorbell costs at most one poll interval.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;

use super::{EventQuery, KeyEvent};
use crate::error::{Error, Result};
use crate::store::{Change, Store};

/// How watchers read, and how long events are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchConfig {
    /// Events read from the outbox in one query.
    pub batch: u32,
    /// Events waiting to be sent to one watcher; beyond this its reader waits for it.
    pub buffer: usize,
    /// How often a watcher reads on without a doorbell (the backstop for a missed one).
    pub poll_interval: Duration,
    /// How long events are kept before the pruning deletes them.
    pub retention: Duration,
    /// How often keys whose expiry passed are announced (`key.expired`).
    pub expiry_sweep_interval: Duration,
    /// Watchers reading the outbox at once. Every commit wakes every watcher: however many
    /// there are, they hold at most this many of the pool's connections, and the API the rest.
    pub concurrent_reads: usize,
    /// Watches open at once on this replica; one more is refused (OVERLOADED), so no caller can
    /// make the replica hold tasks without bound by opening watches on many connections.
    pub max_watchers: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            batch: 256,
            buffer: 64,
            poll_interval: Duration::from_secs(1),
            retention: Duration::from_secs(7 * 24 * 60 * 60),
            expiry_sweep_interval: Duration::from_secs(10),
            concurrent_reads: 4,
            max_watchers: 1024,
        }
    }
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchFrom {
    /// After this position (0: the oldest stored event).
    After(i64),
    /// After the newest event committed so far.
    Now,
}

/// The replica's watchers' shared parts: the store, the doorbell, and the shutdown signal.
#[derive(Clone)]
pub struct EventHub {
    store: Arc<dyn Store>,
    doorbell: watch::Receiver<u64>,
    shutdown: Arc<watch::Sender<bool>>,
    /// Permits to read the outbox (`WatchConfig::concurrent_reads`).
    reads: Arc<Semaphore>,
    config: WatchConfig,
    /// Watches open now.
    watchers: Arc<AtomicUsize>,
}

impl EventHub {
    /// Starts following the store's feed; the task ends when the feed does, or at `shut_down`
    /// (which drops the feed: on PostgreSQL, its LISTEN connection).
    pub fn start(store: Arc<dyn Store>, config: WatchConfig) -> (Self, JoinHandle<()>) {
        let (ring, doorbell) = watch::channel(0u64);
        let (shutdown, mut shutting_down) = watch::channel(false);
        let mut feed = store.changes();
        let task = tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    change = feed.next() => change,
                    _ = shutting_down.wait_for(|down| *down) => return,
                };
                match change {
                    // After a resync anything may have been missed: every watcher reads on.
                    Some(Change::Events | Change::Resync) => {
                        ring.send_modify(|rings| *rings = rings.wrapping_add(1));
                    }
                    Some(_) => {}
                    None => return,
                }
            }
        });
        let hub = Self {
            store,
            doorbell,
            shutdown: Arc::new(shutdown),
            reads: Arc::new(Semaphore::new(config.concurrent_reads.max(1))),
            config,
            watchers: Arc::default(),
        };
        (hub, task)
    }

    pub fn config(&self) -> &WatchConfig {
        &self.config
    }

    /// Watches open now, for metrics.
    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }

    /// Ends every watch (the server is shutting down): their streams finish cleanly.
    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
    }

    /// Rings (changes) when events may have been committed, on any replica.
    pub fn doorbell(&self) -> watch::Receiver<u64> {
        self.doorbell.clone()
    }

    /// Turns true at `shut_down`.
    pub fn shutting_down(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// A watch of `workspace_id`'s events (every workspace's with `None`) from `from`.
    /// `EventsPruned` if events after the starting position were pruned already.
    ///
    /// `credential`, the key id of an API key that opened the watch: the watch ends (with
    /// UNAUTHENTICATED) as soon as an event revokes, disables or expires that key, as every
    /// other call of a revoked key is refused at once.
    pub async fn subscribe(
        &self,
        workspace_id: Option<String>,
        from: WatchFrom,
        credential: Option<String>,
    ) -> Result<EventSubscription> {
        let latest = self.store.latest_event_position().await?;
        let after = match from {
            WatchFrom::Now => latest,
            WatchFrom::After(position) => {
                self.ensure_kept(position).await?;
                position
            }
        };
        // Counted here, before the watcher's task exists, so racing subscribers cannot overshoot.
        if self.watchers.fetch_add(1, Ordering::Relaxed) >= self.config.max_watchers {
            self.watchers.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::Overloaded);
        }
        let (sender, receiver) = mpsc::channel(self.config.buffer.max(1));
        let watcher = Watcher {
            hub: self.clone(),
            workspace_id,
            after,
            sender,
            // Only what happens from now on can end it: the key was valid when it opened.
            credential: credential.map(|key_id| (key_id, latest)),
        };
        tokio::spawn(watcher.run());
        Ok(EventSubscription {
            receiver,
            starts_after: after,
        })
    }

    /// Refuses a start before the oldest event still kept.
    async fn ensure_kept(&self, after: i64) -> Result<()> {
        let pruned_through = self.store.events_pruned_through().await?;
        if after < pruned_through {
            return Err(Error::EventsPruned { pruned_through });
        }
        Ok(())
    }
}

/// A watch's events, in position order; it ends with an error (database trouble, or events
/// pruned before the watcher read them) or when the server shuts down.
pub struct EventSubscription {
    receiver: mpsc::Receiver<Result<KeyEvent>>,
    starts_after: i64,
}

impl EventSubscription {
    /// The position the watch starts after (for `WatchFrom::Now`, the newest event when it
    /// began): a client that loses the stream before its first event resumes from here.
    pub fn starts_after(&self) -> i64 {
        self.starts_after
    }

    pub async fn next(&mut self) -> Option<Result<KeyEvent>> {
        self.receiver.recv().await
    }

    pub fn into_stream(self) -> tokio_stream::wrappers::ReceiverStream<Result<KeyEvent>> {
        tokio_stream::wrappers::ReceiverStream::new(self.receiver)
    }
}

/// One watcher's task: read a batch, send it (waiting for the reader), wait for the doorbell.
struct Watcher {
    hub: EventHub,
    workspace_id: Option<String>,
    /// Every event after this position that the watcher may see is still to be sent: the last
    /// event sent or, for one workspace's watcher, the newest position of any workspace it has
    /// read past (other workspaces' events are gaps in its positions, not missed events).
    after: i64,
    sender: mpsc::Sender<Result<KeyEvent>>,
    /// The API key that opened the watch, and the newest position when it did.
    credential: Option<(String, i64)>,
}

/// What one read of the outbox found.
struct Batch {
    events: Vec<KeyEvent>,
    /// As many events as a read takes: more may follow at once.
    full: bool,
    /// A workspace's watcher has seen every event of its workspace up to here once `events` are
    /// sent.
    read_through: Option<i64>,
}

impl Watcher {
    /// Follows until the watch ends; `subscribe` counted it open.
    async fn run(mut self) {
        self.follow().await;
        self.hub.watchers.fetch_sub(1, Ordering::Relaxed);
    }

    async fn follow(&mut self) {
        let mut doorbell = self.hub.doorbell.clone();
        let mut shutdown = self.hub.shutdown.subscribe();
        loop {
            if *shutdown.borrow_and_update() {
                return;
            }
            // Rings from here on wake the wait below, so none between the read and it is lost.
            doorbell.borrow_and_update();
            let batch = match self.read().await {
                Ok(batch) => batch,
                Err(error) => {
                    let _ = self.sender.send(Err(error)).await;
                    return;
                }
            };
            for event in batch.events {
                self.after = event.position;
                let ends_credential = self.ends_credential(&event);
                tokio::select! {
                    sent = self.sender.send(Ok(event)) => if sent.is_err() { return },
                    _ = shutdown.changed() => return,
                }
                if ends_credential {
                    let refusal = Error::InvalidCredentials(
                        "the API key that opened this watch was revoked, disabled or expired",
                    );
                    let _ = self.sender.send(Err(refusal)).await;
                    return;
                }
            }
            if let Some(read_through) = batch.read_through {
                self.after = self.after.max(read_through);
            }
            if batch.full {
                continue;
            }
            let rung = async {
                // The doorbell stopped (its feed ended, or the server is shutting down): poll
                // instead of spinning, and still end at once on shutdown.
                if doorbell.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = rung => {}
                () = tokio::time::sleep(self.hub.config.poll_interval) => {}
                () = self.sender.closed() => return,
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Whether `event`, committed after the watch opened, ends the API key that opened it.
    fn ends_credential(&self, event: &KeyEvent) -> bool {
        const ENDINGS: [&str; 3] = ["key.revoked", "key.disabled", "key.expired"];
        self.credential.as_ref().is_some_and(|(key_id, opened_at)| {
            event.position > *opened_at
                && event.key_id == *key_id
                && ENDINGS.contains(&event.event_type.as_str())
        })
    }

    /// The next events; `EventsPruned` when the pruning overtook this watcher.
    async fn read(&self) -> Result<Batch> {
        // The semaphore is never closed.
        let _permit = self
            .hub
            .reads
            .acquire()
            .await
            .map_err(|error| Error::Internal(error.to_string()))?;
        let store = &self.hub.store;
        // Read first: every position up to the newest has committed (positions commit in
        // order), so the batch below holds each of them that belongs to this workspace.
        let newest = match self.workspace_id {
            Some(_) => Some(store.latest_event_position().await?),
            None => None,
        };
        let limit = self.hub.config.batch.max(1);
        let query = EventQuery {
            workspace_id: self.workspace_id.clone(),
            after: self.after,
            limit,
        };
        let events = store.list_key_events(&query).await?;
        let full = events.len() >= limit as usize;
        // Positions this read skips may be rolled back, another workspace's, or pruned while
        // this watcher lagged; only the last are missed. The check comes after the read: the
        // pruning deletes a prefix, so if it has not passed `after` by now, the batch is whole.
        let skipped = match events.first() {
            Some(first) => first.position > self.after + 1,
            None => newest.is_some_and(|newest| newest > self.after),
        };
        if skipped {
            self.hub.ensure_kept(self.after).await?;
        }
        Ok(Batch {
            events,
            full,
            read_through: if full { None } else { newest },
        })
    }
}
