//! The embedded default: one SQLite file, one node.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool};

use super::row::KeyRow;
use super::sql::impl_sql_store;
use crate::error::{Error, Result};

pub struct SqliteStore {
    pool: SqlitePool,
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
        Ok(Self { pool })
    }

    /// One node, nobody to tell.
    async fn key_changed(_tx: &mut sqlx::Transaction<'_, Sqlite>, _key_id: &str) -> Result<()> {
        Ok(())
    }
}

impl_sql_store!(SqliteStore, Sqlite);
