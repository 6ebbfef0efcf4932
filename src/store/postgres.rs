//! PostgreSQL: several stateless replicas share one database and tell each other about key
//! changes with LISTEN/NOTIFY (`changes.rs`).

mod changes;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgPoolOptions};
use sqlx::{PgPool, Postgres};

use super::error::Outcome;
use super::row::KeyRow;
use super::sql::impl_sql_store;
use crate::error::{Error, Result};
use crate::store::{Changes, StoreKind};

pub use changes::LISTENER_APPLICATION_NAME;

/// The channel on which a change to a key is announced to every replica; the payload is the
/// key id.
pub const KEY_CHANGED_CHANNEL: &str = "key_authority_key_changed";

/// The channel on which new key events are announced (the payload is the position), so that
/// watchers on every replica read on at once.
pub const KEY_EVENT_CHANNEL: &str = "key_authority_key_event";

/// The advisory lock every transaction that writes key events takes first: positions are
/// assigned and committed in the same order, so a reader never sees a position before a lower
/// one that is still to commit.
const EVENT_ORDER_LOCK: i64 = 0x6b61_6576_656e_7473; // "kaevents"

pub struct PostgresStore {
    pool: PgPool,
    /// How to connect, kept for the change feed's own connection.
    options: PgConnectOptions,
}

impl PostgresStore {
    /// Connects to the database named by `url` and runs the migrations.
    pub async fn open(url: &str, max_connections: u32) -> Result<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|error| Error::invalid("database_url", error.to_string()))?
            .application_name("key-authority");
        // One connection first, for a start-up failure that says why (the pool would only say
        // that it timed out): the server then exits, and its supervisor restarts it.
        {
            use sqlx::Connection as _;
            let connection = sqlx::PgConnection::connect_with(&options)
                .await
                .map_err(|error| {
                    Error::Unavailable(format!(
                        "cannot connect to PostgreSQL at {}:{}: {error}",
                        options.get_host(),
                        options.get_port()
                    ))
                })?;
            let _ = connection.close().await;
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("migrations/postgres")
            .run(&pool)
            .await
            .map_err(|error| Error::Internal(format!("postgres migrations failed: {error}")))?;
        Ok(Self { pool, options })
    }

    const KIND: StoreKind = StoreKind::Postgres;

    /// A usage statement per key, each its own transaction: a flush never waits for a lock while
    /// holding another, so two replicas' flushes and a revocation of a rotation chain cannot
    /// deadlock.
    const USAGE_IN_ONE_TRANSACTION: bool = false;

    /// A connection of its own, opened and closed: the pool's may be broken, and waiting on the
    /// pool while the server is down takes its whole acquire timeout.
    async fn probe_connection(&self) -> Result<()> {
        use sqlx::Connection as _;
        let mut connection = sqlx::PgConnection::connect_with(&self.options).await?;
        sqlx::query("select 1").execute(&mut connection).await?;
        connection.close().await?;
        Ok(())
    }

    /// What other replicas change, from a LISTEN connection of its own.
    fn change_feed(&self) -> Changes {
        changes::spawn(self.options.clone())
    }

    /// NOTIFY inside the changing transaction: PostgreSQL delivers it on commit, and only then.
    async fn key_changed(tx: &mut sqlx::Transaction<'_, Postgres>, key_id: &str) -> Result<()> {
        sqlx::query("select pg_notify($1, $2)")
            .bind(KEY_CHANGED_CHANNEL)
            .bind(key_id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

impl PostgresStore {
    async fn order_events(tx: &mut sqlx::Transaction<'_, Postgres>) -> Result<()> {
        sqlx::query("select pg_advisory_xact_lock($1)")
            .bind(EVENT_ORDER_LOCK)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn event_written(tx: &mut sqlx::Transaction<'_, Postgres>, position: i64) -> Result<()> {
        sqlx::query("select pg_notify($1, $2)")
            .bind(KEY_EVENT_CHANNEL)
            .bind(position.to_string())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// NOTIFY (in the transaction) reaches this replica's watchers too.
    fn events_committed(&self) {}
}

impl_sql_store!(PostgresStore, Postgres);
super::webhooks::impl_sql_webhook_store!(
    PostgresStore,
    Postgres,
    super::webhooks::CLAIM_WEBHOOKS_POSTGRES
);

/// PostgreSQL's SQLSTATE codes, by what they mean to a caller.
pub(super) fn classify_error(error: &PgDatabaseError) -> Outcome {
    classify_code(error.code())
}

fn classify_code(sqlstate: &str) -> Outcome {
    match sqlstate {
        // serialization_failure, deadlock_detected, unique_violation.
        "40001" | "40P01" | "23505" => Outcome::Conflict,
        // too_many_connections.
        "53300" => Outcome::Unavailable,
        // Class 08, connection exceptions; 57P, the server shutting down or unreachable.
        code if code.starts_with("08") || code.starts_with("57P") => Outcome::Unavailable,
        _ => Outcome::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_what_a_retry_can_fix() {
        for code in ["40001", "40P01", "23505"] {
            assert_eq!(classify_code(code), Outcome::Conflict, "{code}");
        }
        for code in ["08006", "08001", "57P01", "57P03", "53300"] {
            assert_eq!(classify_code(code), Outcome::Unavailable, "{code}");
        }
        // foreign_key_violation, undefined_table, disk_full.
        for code in ["23503", "42P01", "53100"] {
            assert_eq!(classify_code(code), Outcome::Internal, "{code}");
        }
    }
}
