//! Database errors to domain errors. What sqlx reports alike for every database (the pool, I/O,
//! TLS) is classified here; each database's own error codes in its file (`sqlite.rs`,
//! `postgres.rs`).

use sqlx::postgres::PgDatabaseError;
use sqlx::sqlite::SqliteError;

use super::{postgres, sqlite};
use crate::error::Error;

/// What a database error means to a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A concurrent change won (a lock, a serialization failure, a duplicate key): retry.
    Conflict,
    /// The database cannot serve right now: retry later.
    Unavailable,
    /// Anything else: a bug or an unexpected answer.
    Internal,
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        let outcome = match &error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Outcome::Unavailable,
            sqlx::Error::Database(database) => {
                if let Some(sqlite) = database.try_downcast_ref::<SqliteError>() {
                    sqlite::classify_error(sqlite)
                } else if let Some(postgres) = database.try_downcast_ref::<PgDatabaseError>() {
                    postgres::classify_error(postgres)
                } else {
                    Outcome::Internal
                }
            }
            _ => Outcome::Internal,
        };
        match outcome {
            Outcome::Conflict => Self::Conflict,
            Outcome::Unavailable => Self::Unavailable(error.to_string()),
            Outcome::Internal => Self::Internal(error.to_string()),
        }
    }
}
