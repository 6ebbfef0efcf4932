//! Storage: one trait, two databases. The SQL is shared (`sql.rs`) so SQLite and PostgreSQL
//! cannot drift apart; each database file adds only its connection set-up, migrations, change
//! notifications and error codes. Nothing outside this module knows which database it runs on.

mod error;
pub mod guard;
mod postgres;
mod row;
mod sql;
mod sqlite;
pub mod webhooks;

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use tokio_stream::Stream;

pub use postgres::{KEY_CHANGED_CHANNEL, LISTENER_APPLICATION_NAME, PostgresStore};
pub use sqlite::SqliteStore;
pub use webhooks::WebhookStore;

pub use crate::audit::AuditRecord;
use crate::audit::{AuditEvent, AuditQuery};
use crate::error::{Error, Result};
use crate::events::{EventQuery, KeyEvent};
use crate::key::{Key, KeyId, StoredKey, WorkspaceId};
use crate::timestamp::UnixMicros;

/// What a mutation writes besides its change: its audit event and, for a request with a request
/// id, the claim that makes a retry find it instead of repeating it.
#[derive(Debug, Clone)]
pub struct Mutation {
    pub audit: AuditRecord,
    pub claim: Option<RequestClaim>,
}

impl Mutation {
    pub fn new(audit: AuditRecord, claim: Option<RequestClaim>) -> Self {
        Self { audit, claim }
    }
}

/// A request id, claimed first in the mutation's transaction. A concurrent duplicate's claim
/// waits for that transaction: if it commits, the duplicate fails with
/// `Error::DuplicateRequest` and reads the claim (`Store::find_request`); if it rolls back,
/// the duplicate goes ahead. A claim older than `stale_before` is replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestClaim {
    /// The caller's namespace of request ids: workspace and caller.
    pub scope: String,
    pub request_id: String,
    /// The RPC, such as `IssueKey`.
    pub operation: &'static str,
    /// SHA-256 (hex) of the request's parameters.
    pub fingerprint: String,
    /// The key the request makes or changes.
    pub key_id: String,
    /// Re-derives the secret of a key the request made (with the server's idempotency key).
    pub salt: Vec<u8>,
    pub create_time: UnixMicros,
    pub stale_before: UnixMicros,
}

/// A request id that a committed mutation claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoneRequest {
    pub operation: String,
    pub fingerprint: String,
    pub key_id: String,
    pub salt: Vec<u8>,
    pub create_time: UnixMicros,
}

/// One page of a workspace's keys, newest first.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub workspace_id: WorkspaceId,
    pub include_inactive: bool,
    /// Keys strictly older than this `(create_time, key_id)` position; `None` starts at the newest.
    pub after: Option<(UnixMicros, KeyId)>,
    pub limit: u32,
    /// "Now", for deciding which keys are expired.
    pub now: UnixMicros,
}

/// Usage counted in memory, added to a key's counters in one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    pub key_id: KeyId,
    pub requests: i64,
    pub last_used_time: UnixMicros,
}

/// A usage batch that failed part of the way: the first `written` deltas are stored, the rest
/// are not.
#[derive(Debug)]
pub struct UsageWriteError {
    pub written: usize,
    pub error: Error,
}

/// One batch of the expiry sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExpirySweep {
    /// Keys whose end was taken care of (announced, or silently for a key revoked before it).
    pub marked: u64,
    /// `key.expired` events written.
    pub announced: u64,
}

/// Connections of the database pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub open: u32,
    pub idle: u32,
    pub max: u32,
}

/// A revocation: the key as it is now and, when asked for, its successors in rotation order.
#[derive(Debug, Clone)]
pub struct Revocation {
    pub key: Key,
    pub successors: Vec<Key>,
    /// The ids of the keys this call revoked (not those that were revoked already).
    pub newly_revoked: Vec<KeyId>,
}

/// A successful rotation: the old key (now ending at its new expiry) and its successor.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub previous: Key,
    pub successor: Key,
}

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

impl StoreKind {
    /// The name in logs and metrics: `sqlite` or `postgres`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }

    /// Whether other processes (replicas) may change this database, so that caches must follow
    /// `Store::changes`. A SQLite file has one process.
    pub fn is_shared(self) -> bool {
        match self {
            Self::Sqlite => false,
            Self::Postgres => true,
        }
    }
}

/// What a cache of key state must learn from `Store::changes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The key with this id changed: its cached state is stale.
    Key(String),
    /// The feed listens (for the first time, or again): changes made while it did not were
    /// missed, so everything may have changed.
    Resync,
    /// The feed stopped listening: changes are missed until the next `Resync`, so everything may
    /// have changed.
    Interrupted,
    /// Key events were committed (up to this position, if known): watchers read on.
    Events,
}

/// The changes to keys made through any connection to the database, as `Store::changes` yields
/// them.
pub type Changes = Pin<Box<dyn Stream<Item = Change> + Send>>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts a new key and its audit record. A key id collision is `Error::Conflict`; a
    /// request id claimed already is `Error::DuplicateRequest`.
    async fn insert_key(&self, key: &StoredKey, mutation: &Mutation) -> Result<()>;

    async fn get_key(&self, workspace_id: &WorkspaceId, key_id: &KeyId) -> Result<Option<Key>>;

    /// The key and its hash, by id alone: the VerifyKey lookup.
    async fn find_key_for_verify(&self, key_id: &KeyId) -> Result<Option<StoredKey>>;

    /// One page of keys and the number of keys matching the query across all pages.
    async fn list_keys(&self, query: &ListQuery) -> Result<(Vec<Key>, i64)>;

    /// Sets the key's revoke time (and `revoked_by`) unless it is already revoked (then nothing
    /// changes and its event says UNCHANGED), and returns the key as it is now. With
    /// `successors`, does the same in the same transaction for every key the rotation chain
    /// leads to from it, each newly revoked one with its own event and change notification.
    /// `None` if no such key exists in the workspace.
    async fn revoke_key(
        &self,
        workspace_id: &WorkspaceId,
        key_id: &KeyId,
        successors: bool,
        revoked_by: &str,
        mutation: &Mutation,
    ) -> Result<Option<Revocation>>;

    /// Atomically marks `key_id` as rotated to `successor` (only if it is active, enabled, not
    /// rotated yet and still at `version`), caps its expiry at `previous_expire_time`, and
    /// inserts the successor. `None` when the key was not in that state at that moment: the
    /// caller re-reads to say why.
    async fn rotate_key(
        &self,
        workspace_id: &WorkspaceId,
        key_id: &KeyId,
        version: i64,
        successor: &StoredKey,
        previous_expire_time: UnixMicros,
        mutation: &Mutation,
    ) -> Result<Option<Rotation>>;

    /// Writes `key`'s settings (name, description, scopes, role, metadata, expire_time,
    /// enabled) over the stored key of the same workspace and id, if that is still at
    /// `key.version` and not revoked; bumps the version, sets `update_time` to the event's time,
    /// notifies the other replicas, and returns the key as it is now. `None` if the key moved
    /// on (or does not exist): the caller re-reads to say why.
    async fn update_key(&self, key: &Key, mutation: &Mutation) -> Result<Option<Key>>;

    /// The request id `request_id` of `scope`, if a committed mutation claimed it.
    async fn find_request(&self, scope: &str, request_id: &str) -> Result<Option<DoneRequest>>;

    /// Deletes up to `limit` request claims made before `before`; returns how many.
    async fn delete_requests_before(&self, before: UnixMicros, limit: u32) -> Result<u64>;

    /// Writes one audit event that comes with no change (a lockout, written behind; an update
    /// that changed nothing), claiming the mutation's request id if it has one.
    async fn insert_audit_event(
        &self,
        workspace_id: &WorkspaceId,
        key_id: &KeyId,
        mutation: &Mutation,
    ) -> Result<()>;

    /// A page of a workspace's audit events, newest first.
    async fn list_audit_events(&self, query: &AuditQuery) -> Result<Vec<AuditEvent>>;

    /// Deletes up to `limit` audit events that happened before `before`; returns how many.
    async fn delete_audit_events_before(&self, before: UnixMicros, limit: u32) -> Result<u64>;

    /// The key events after a position, in position order (the outbox, for watchers).
    async fn list_key_events(&self, query: &EventQuery) -> Result<Vec<KeyEvent>>;

    /// The highest position written so far (0 if none).
    async fn latest_event_position(&self) -> Result<i64>;

    /// The highest position the pruning deleted (0 if none): a watcher starting below it has
    /// missed events.
    async fn events_pruned_through(&self) -> Result<i64>;

    /// Deletes up to `limit` of the oldest events (by position) that happened before `before`,
    /// stopping at the first that did not: a prefix of the positions, so `events_pruned_through`
    /// covers every deleted one. Returns how many.
    async fn delete_key_events_before(&self, before: UnixMicros, limit: u32) -> Result<u64>;

    /// Announces, once per key, up to `limit` keys whose expiry passed by `now` (`key.expired`,
    /// at the key's expire time; none for a key revoked before it ended): how many keys it took
    /// and how many events it wrote.
    async fn announce_expired_keys(&self, now: UnixMicros, limit: u32) -> Result<ExpirySweep>;

    /// Adds a batch of usage to the keys' counters, in the order given. On PostgreSQL each key's
    /// counters are one statement of their own: a flush never holds one row's lock while it
    /// waits for another's, so the flushes of two replicas (and a revocation walking a rotation
    /// chain) cannot deadlock with it. SQLite, with one writer, writes the batch in one
    /// transaction. On failure, says how many of the deltas (a prefix) were written.
    async fn record_usage(&self, deltas: &[UsageDelta])
    -> std::result::Result<(), UsageWriteError>;

    /// ReportUsage: adds `deltas` (in key id order) to the counters of the keys of
    /// `workspace_id` that have no usage limit, in one transaction that first claims the batch's
    /// request id (`claim`; `Error::DuplicateRequest` if a committed batch holds it). Returns
    /// the key ids that counted nothing.
    async fn report_usage(
        &self,
        workspace_id: &WorkspaceId,
        deltas: &[UsageDelta],
        claim: Option<&RequestClaim>,
    ) -> Result<Vec<KeyId>>;

    /// Atomically consumes `cost` uses of a usage budget (with `cost` 0, checks that one is
    /// left). `Some(remaining)` on success; `None` when not enough are left.
    async fn consume_usage(&self, budget_id: &str, cost: i64) -> Result<Option<i64>>;

    /// Deletes up to `limit` trial keys that expired before `before` (and the budgets no key
    /// draws on any more); returns how many keys were deleted.
    async fn delete_ended_trial_keys(&self, before: UnixMicros, limit: u32) -> Result<u64>;

    /// A random secret shared by every replica on this database, created on first use.
    async fn shared_secret(&self, name: &str) -> Result<Vec<u8>>;

    /// The webhooks' part of the store (`store/webhooks.rs`).
    fn webhooks(&self) -> &dyn WebhookStore;

    /// Succeeds when the database answers.
    async fn ping(&self) -> Result<()>;

    /// Succeeds when a fresh connection (not one of the pool's) reaches the database: how an
    /// open circuit breaker finds it again.
    async fn probe(&self) -> Result<()> {
        self.ping().await
    }

    /// The circuit breaker in front of this store (`open` puts one there), if any.
    fn breaker(&self) -> Option<&guard::Breaker> {
        None
    }

    /// Which database this is.
    fn kind(&self) -> StoreKind;

    /// Key changes and new key events as they commit, by every process sharing the database,
    /// this one included (PostgreSQL: LISTEN on a connection of its own, reconnecting with
    /// backoff). On a database that only this process uses (SQLite) it yields only `Events` (and
    /// `Resync` if a consumer fell behind): the process invalidates its caches itself. Each call
    /// starts its own feed, which stops when the stream is dropped.
    fn changes(&self) -> Changes;

    /// The connection pool's use, for metrics.
    fn pool_stats(&self) -> PoolStats;

    /// Waits for in-flight queries and closes every connection.
    async fn close(&self);
}

/// Connects to the database named by `url` (`sqlite://...` or `postgres://...`), runs the
/// embedded migrations, and puts it behind a circuit breaker (`guard`).
pub async fn open(url: &str, max_connections: u32) -> Result<Arc<dyn Store>> {
    let inner: Arc<dyn Store> = if url.starts_with("sqlite:") {
        Arc::new(SqliteStore::open(url, max_connections).await?)
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Arc::new(PostgresStore::open(url, max_connections).await?)
    } else {
        return Err(Error::invalid(
            "database_url",
            "must start with sqlite:, postgres: or postgresql:",
        ));
    };
    Ok(Arc::new(guard::GuardedStore::new(inner)))
}

/// Runs the embedded migrations of the database named by `url`, then closes it.
pub async fn migrate(url: &str) -> Result<()> {
    open(url, 1).await?.close().await;
    Ok(())
}
