//! Storage: one trait, two databases. The SQL is shared (`sql.rs`) so SQLite and PostgreSQL
//! cannot drift apart; each database file adds only its connection set-up, migrations, change
//! notifications and error codes. Nothing outside this module knows which database it runs on.

mod error;
mod postgres;
mod row;
mod sql;
mod sqlite;

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use tokio_stream::Stream;

pub use postgres::{KEY_CHANGED_CHANNEL, LISTENER_APPLICATION_NAME, PostgresStore};
pub use sqlite::SqliteStore;

use crate::error::{Error, Result};
use crate::key::{Key, KeyId, StoredKey, WorkspaceId};
use crate::timestamp::UnixMicros;

/// A mutation's audit record, written in the same transaction as the mutation.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    /// What happened: `issue`, `revoke`, `rotate`.
    pub action: &'static str,
    /// Who did it, as authenticated (`admin`, `user:<sub>`, `key:<prefix>`), or `anonymous`.
    pub actor: String,
    pub occur_time: UnixMicros,
    /// A small JSON object with details worth keeping (never a secret).
    pub detail: String,
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
}

/// The changes to keys made through any connection to the database, as `Store::changes` yields
/// them.
pub type Changes = Pin<Box<dyn Stream<Item = Change> + Send>>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts a new key and its audit record. A key id collision is `Error::Conflict`.
    async fn insert_key(&self, key: &StoredKey, audit: &AuditRecord) -> Result<()>;

    async fn get_key(&self, workspace_id: &WorkspaceId, key_id: &KeyId) -> Result<Option<Key>>;

    /// The key and its hash, by id alone: the VerifyKey lookup.
    async fn find_key_for_verify(&self, key_id: &KeyId) -> Result<Option<StoredKey>>;

    /// One page of keys and the number of keys matching the query across all pages.
    async fn list_keys(&self, query: &ListQuery) -> Result<(Vec<Key>, i64)>;

    /// Sets the key's revoke time unless it is already revoked (then nothing changes), and
    /// returns the key as it is now. With `successors`, does the same in the same transaction
    /// for every key the rotation chain leads to from it, each with its audit record and change
    /// notification. `None` if no such key exists in the workspace.
    async fn revoke_key(
        &self,
        workspace_id: &WorkspaceId,
        key_id: &KeyId,
        successors: bool,
        audit: &AuditRecord,
    ) -> Result<Option<Revocation>>;

    /// Atomically marks `key_id` as rotated to `successor` (only if it is active and not rotated
    /// yet), caps its expiry at `previous_expire_time`, and inserts the successor. `None` when
    /// the key was not in a rotatable state at that moment: the caller re-reads to say why.
    async fn rotate_key(
        &self,
        workspace_id: &WorkspaceId,
        key_id: &KeyId,
        successor: &StoredKey,
        previous_expire_time: UnixMicros,
        audit: &AuditRecord,
    ) -> Result<Option<Rotation>>;

    /// Adds a batch of usage to the keys' counters in one transaction.
    async fn record_usage(&self, deltas: &[UsageDelta]) -> Result<()>;

    /// Atomically consumes `cost` uses of a usage budget (with `cost` 0, checks that one is
    /// left). `Some(remaining)` on success; `None` when not enough are left.
    async fn consume_usage(&self, budget_id: &str, cost: i64) -> Result<Option<i64>>;

    /// Deletes up to `limit` trial keys that expired before `before` (and the budgets no key
    /// draws on any more); returns how many keys were deleted.
    async fn delete_ended_trial_keys(&self, before: UnixMicros, limit: u32) -> Result<u64>;

    /// A random secret shared by every replica on this database, created on first use.
    async fn shared_secret(&self, name: &str) -> Result<Vec<u8>>;

    /// Succeeds when the database answers.
    async fn ping(&self) -> Result<()>;

    /// Which database this is.
    fn kind(&self) -> StoreKind;

    /// Key changes as they commit, by every process sharing the database, this one included
    /// (PostgreSQL: LISTEN on a connection of its own, reconnecting with backoff). Never yields
    /// on a database that only this process uses (SQLite): it invalidates its caches itself.
    /// Each call starts its own feed, which stops when the stream is dropped.
    fn changes(&self) -> Changes;

    /// The connection pool's use, for metrics.
    fn pool_stats(&self) -> PoolStats;

    /// Waits for in-flight queries and closes every connection.
    async fn close(&self);
}

/// Connects to the database named by `url` (`sqlite://...` or `postgres://...`) and runs the
/// embedded migrations.
pub async fn open(url: &str, max_connections: u32) -> Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        return Ok(Arc::new(SqliteStore::open(url, max_connections).await?));
    }
    if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        return Ok(Arc::new(PostgresStore::open(url, max_connections).await?));
    }
    Err(Error::invalid(
        "database_url",
        "must start with sqlite:, postgres: or postgresql:",
    ))
}

/// Runs the embedded migrations of the database named by `url`, then closes it.
pub async fn migrate(url: &str) -> Result<()> {
    open(url, 1).await?.close().await;
    Ok(())
}
