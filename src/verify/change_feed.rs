//! Cross-replica invalidation: applies the store's change feed (`Store::changes`) to the key-state
//! cache. A changed key's state is dropped; when the feed (re)starts listening, the whole state
//! cache is dropped, since a change may have been missed; when it breaks, nothing cached is fresh
//! any more (every use reads the database, or falls back within `--stale-if-error` when that
//! cannot be reached). The state cache TTL bounds the rest (a replica still serving from cache
//! before it notices that its feed broke).

use tokio::sync::{broadcast, watch};
use tokio_stream::StreamExt as _;

use super::Invalidator;
use crate::store::{Change, Changes};

/// What the change feed has done, for tests and operators.
#[derive(Clone)]
pub struct ChangeFeedStatus {
    /// How many times the feed started listening (1 after the first connect).
    pub listening: watch::Receiver<u64>,
    /// Key ids whose change notification was applied to the cache, in order.
    pub applied: broadcast::Sender<String>,
}

/// Applies `changes` to the state cache in the background, until the task is aborted.
pub fn follow_changes(
    changes: Changes,
    invalidator: Invalidator,
) -> (tokio::task::JoinHandle<()>, ChangeFeedStatus) {
    let (listening_tx, listening) = watch::channel(0);
    let (applied, _) = broadcast::channel(1024);
    let status = ChangeFeedStatus {
        listening,
        applied: applied.clone(),
    };
    let task = tokio::spawn(apply(changes, invalidator, listening_tx, applied));
    (task, status)
}

async fn apply(
    mut changes: Changes,
    invalidator: Invalidator,
    listening: watch::Sender<u64>,
    applied: broadcast::Sender<String>,
) {
    while let Some(change) = changes.next().await {
        match change {
            Change::Key(key_id) => {
                invalidator.key_changed(&key_id).await;
                let _ = applied.send(key_id);
            }
            Change::Resync => {
                // Anything may have changed while nobody was listening.
                invalidator.everything_changed();
                listening.send_modify(|count| *count += 1);
                tracing::info!("change feed listening");
            }
            // Nothing cached is fresh any more, but it stays as the fallback while the
            // database cannot be reached (`--stale-if-error`); the resync drops it all.
            Change::Interrupted => invalidator.feed_interrupted(),
            // New key events are the watchers' business (`events::EventHub`).
            Change::Events => {}
        }
    }
}
