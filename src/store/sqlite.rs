//! The embedded default: one SQLite file, one node.

use std::str::FromStr;
use std::time::Duration;

use sqlx::error::DatabaseError as _;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteError, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, SqlitePool};

use super::error::Outcome;
use super::row::KeyRow;
use super::sql::impl_sql_store;
use crate::error::{Error, Result};
use crate::store::{Change, Changes, StoreKind};

/// Doorbell rings a slow consumer may miss before it is told to resync.
const EVENT_DOORBELL_CAPACITY: usize = 16;

pub struct SqliteStore {
    pool: SqlitePool,
    /// Rung after every commit that wrote key events: this process's watchers read on.
    events: tokio::sync::broadcast::Sender<Change>,
}

impl SqliteStore {
    /// Opens (creating if missing) the SQLite file named by `url` and runs the migrations.
    pub async fn open(url: &str, max_connections: u32) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|error| Error::invalid("database_url", error.to_string()))?
            .create_if_missing(true)
            // WAL lets readers run beside the one writer; FULL makes every commit durable.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options)
            .await?;
        sqlx::migrate!("migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|error| Error::Internal(format!("sqlite migrations failed: {error}")))?;
        let (events, _) = tokio::sync::broadcast::channel(EVENT_DOORBELL_CAPACITY);
        Ok(Self { pool, events })
    }

    const KIND: StoreKind = StoreKind::Sqlite;

    /// One writer at a time: no deadlock to fear, and one commit (one fsync) per usage batch.
    const USAGE_IN_ONE_TRANSACTION: bool = true;

    /// A file has no connection to lose: the pool's will do.
    async fn probe_connection(&self) -> Result<()> {
        sqlx::query("select 1").execute(&self.pool).await?;
        Ok(())
    }

    /// One node: every change is made by this process, which invalidates its caches itself, so
    /// there is nothing to follow.
    /// Only this process writes: the feed is its own doorbell for new events. A consumer that
    /// fell behind gets `Resync` (it reads everything on anyway).
    fn change_feed(&self) -> Changes {
        use tokio_stream::StreamExt as _;
        let rung = tokio_stream::wrappers::BroadcastStream::new(self.events.subscribe());
        Box::pin(rung.map(|change| change.unwrap_or(Change::Resync)))
    }

    async fn order_events(_tx: &mut sqlx::Transaction<'_, Sqlite>) -> Result<()> {
        // One writer at a time: positions commit in order by themselves.
        Ok(())
    }

    async fn event_written(_tx: &mut sqlx::Transaction<'_, Sqlite>, _position: i64) -> Result<()> {
        Ok(())
    }

    fn events_committed(&self) {
        // Nobody listening is fine.
        let _ = self.events.send(Change::Events);
    }

    /// One node, nobody to tell.
    async fn key_changed(_tx: &mut sqlx::Transaction<'_, Sqlite>, _key_id: &str) -> Result<()> {
        Ok(())
    }
}

impl_sql_store!(SqliteStore, Sqlite);
super::webhooks::impl_sql_webhook_store!(
    SqliteStore,
    Sqlite,
    super::webhooks::CLAIM_WEBHOOKS_SQLITE
);

/// SQLite's (extended) result codes, by what they mean to a caller.
pub(super) fn classify_error(error: &SqliteError) -> Outcome {
    error
        .code()
        .map_or(Outcome::Internal, |code| classify_code(&code))
}

fn classify_code(code: &str) -> Outcome {
    match code {
        // SQLITE_BUSY, SQLITE_LOCKED and their extended codes: another writer holds the lock.
        "5" | "6" | "261" | "262" | "517" => Outcome::Conflict,
        // SQLITE_CONSTRAINT_UNIQUE, SQLITE_CONSTRAINT_PRIMARYKEY: a duplicate key.
        "2067" | "1555" => Outcome::Conflict,
        _ => Outcome::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_and_duplicates_are_conflicts_the_rest_internal() {
        for code in ["5", "6", "261", "262", "517", "2067", "1555"] {
            assert_eq!(classify_code(code), Outcome::Conflict, "{code}");
        }
        // SQLITE_CONSTRAINT_FOREIGNKEY, SQLITE_CONSTRAINT_NOTNULL, SQLITE_ERROR.
        for code in ["787", "1299", "1"] {
            assert_eq!(classify_code(code), Outcome::Internal, "{code}");
        }
    }
}
