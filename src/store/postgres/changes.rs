//! PostgreSQL's change feed: a dedicated connection LISTENs on the key-change channel and turns
//! what arrives into `Change`s. A change's NOTIFY is sent inside its transaction, so it is
//! delivered on commit and only then.
//!
//! A notification can be lost only while the listening connection is down. So every time the
//! connection is (re-)established the feed says `Resync` (whatever changed while nobody was
//! listening must be read afresh), and when it breaks, `Interrupted`.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{KEY_CHANGED_CHANNEL, KEY_EVENT_CHANNEL};
use crate::store::{Change, Changes};

/// The `application_name` of the listening connection, so operators (and tests) can find it.
pub const LISTENER_APPLICATION_NAME: &str = "key-authority-listener";
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Changes not yet taken by the consumer; beyond this the listener waits for it.
const QUEUE: usize = 1024;

/// Starts listening in the background; the listener stops when the stream is dropped.
pub(super) fn spawn(options: PgConnectOptions) -> Changes {
    let (sender, receiver) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        tokio::select! {
            () = listen(options.application_name(LISTENER_APPLICATION_NAME), &sender) => {}
            () = sender.closed() => {}
        }
    });
    Box::pin(ReceiverStream::new(receiver))
}

/// Listens until the receiver is gone, reconnecting with backoff whenever the connection fails.
async fn listen(options: PgConnectOptions, changes: &mpsc::Sender<Change>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let mut listener = match connect(&options).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "change feed cannot connect");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = MIN_BACKOFF;
        if changes.send(Change::Resync).await.is_err() {
            return;
        }
        loop {
            let change = match listener.try_recv().await {
                Ok(Some(notification)) if notification.channel() == KEY_EVENT_CHANNEL => {
                    Change::Events
                }
                Ok(Some(notification)) => Change::Key(notification.payload().to_owned()),
                // sqlx has already reconnected and re-issued LISTEN: catch up on what we missed.
                Ok(None) => {
                    tracing::warn!("change feed connection lost and re-established");
                    Change::Resync
                }
                Err(error) => {
                    tracing::warn!(%error, "change feed failed, reconnecting");
                    if changes.send(Change::Interrupted).await.is_err() {
                        return;
                    }
                    break;
                }
            };
            if changes.send(change).await.is_err() {
                return;
            }
        }
    }
}

async fn connect(options: &PgConnectOptions) -> Result<PgListener, sqlx::Error> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.clone())
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener
        .listen_all([KEY_CHANGED_CHANNEL, KEY_EVENT_CHANNEL])
        .await?;
    Ok(listener)
}
