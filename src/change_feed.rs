//! Cross-replica invalidation on PostgreSQL: every replica LISTENs on the key-change channel and
//! drops a key's cached state when another replica changes it. A revoke's NOTIFY is sent inside
//! its transaction, so it is delivered on commit and only then.
//!
//! A notification can be lost only while the listening connection is down. So whenever the
//! connection is (re-)established, the whole state cache is dropped: whatever changed while
//! nobody was listening is read afresh. The state cache TTL bounds the rest (a replica still
//! serving from cache before it notices that its connection died).

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::{broadcast, watch};

use crate::store::KEY_CHANGED_CHANNEL;
use crate::verify::Invalidator;

/// The `application_name` of the listening connection, so operators (and tests) can find it.
pub const LISTENER_APPLICATION_NAME: &str = "key-authority-listener";
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the change feed has done, for tests and operators.
#[derive(Clone)]
pub struct ChangeFeedStatus {
    /// How many times a LISTEN was established (1 after the first connect).
    pub listening: watch::Receiver<u64>,
    /// Key ids whose change notification was applied to the cache, in order.
    pub applied: broadcast::Sender<String>,
}

/// Starts the change feed in the background. Stops when the returned task is aborted.
pub fn spawn(
    database_url: &str,
    invalidator: Invalidator,
) -> (tokio::task::JoinHandle<()>, ChangeFeedStatus) {
    let (listening_tx, listening) = watch::channel(0);
    let (applied, _) = broadcast::channel(1024);
    let status = ChangeFeedStatus {
        listening,
        applied: applied.clone(),
    };
    let url = database_url.to_owned();
    let task = tokio::spawn(async move {
        run(&url, invalidator, listening_tx, applied).await;
    });
    (task, status)
}

async fn run(
    url: &str,
    invalidator: Invalidator,
    listening: watch::Sender<u64>,
    applied: broadcast::Sender<String>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let mut listener = match connect(url).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "change feed cannot connect");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = MIN_BACKOFF;
        now_listening(&invalidator, &listening);
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => {
                    invalidator.key_changed(notification.payload()).await;
                    let _ = applied.send(notification.payload().to_owned());
                }
                // sqlx has already reconnected and re-issued LISTEN: catch up on what we missed.
                Ok(None) => {
                    tracing::warn!("change feed connection lost and re-established");
                    now_listening(&invalidator, &listening);
                }
                Err(error) => {
                    tracing::warn!(%error, "change feed failed, reconnecting");
                    invalidator.everything_changed();
                    break;
                }
            }
        }
    }
}

fn now_listening(invalidator: &Invalidator, listening: &watch::Sender<u64>) {
    // Anything may have changed while nobody was listening.
    invalidator.everything_changed();
    listening.send_modify(|count| *count += 1);
    tracing::info!("change feed listening");
}

async fn connect(url: &str) -> Result<PgListener, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?.application_name(LISTENER_APPLICATION_NAME);
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(KEY_CHANGED_CHANNEL).await?;
    Ok(listener)
}
