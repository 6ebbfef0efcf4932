//! The event stream that keeps the local state true: WatchKeyEvents of each workspace served (or
//! of all of them, for an admin credential), from the moment of connection. Every event drops (or,
//! for a revocation or a disabling, refuses) its key's local state. When any stream ends or
//! fails, all local state is dropped at once and the verifier answers nothing locally until
//! every stream is back (then the fill rule's `settle` applies; `cache`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::{StreamExt as _, StreamMap};
use tonic::Status;

use super::cache::{Change, LocalCaches};
use crate::pb;
use crate::{Error, KeyAuthorityClient, KeyEventStream};

/// The first pause before reconnecting; doubled after each failure up to `MAX_RECONNECT_DELAY`.
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(50);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// What the stream has done so far, for tests, metrics and `wait_ready`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedStatus {
    /// Every stream is connected now.
    pub live: bool,
    /// Times every stream was (re)connected.
    pub connects: u64,
    /// Times a live stream broke.
    pub breaks: u64,
    /// Events applied to the local state since start.
    pub events_applied: u64,
}

/// The streams to open: one request per workspace, or one for every workspace.
pub(crate) fn requests(workspaces: &[String], all: bool) -> Vec<pb::WatchKeyEventsRequest> {
    if all {
        return vec![pb::WatchKeyEventsRequest {
            from_now: true,
            all_workspaces: true,
            ..Default::default()
        }];
    }
    workspaces
        .iter()
        .map(|workspace_id| pb::WatchKeyEventsRequest {
            workspace_id: workspace_id.clone(),
            from_now: true,
            ..Default::default()
        })
        .collect()
}

type Events =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::KeyEvent, Error>> + Send>>;

/// Follows the streams until `stop` turns true, reconnecting after every break.
pub(crate) async fn follow(
    client: KeyAuthorityClient,
    requests: Vec<pb::WatchKeyEventsRequest>,
    caches: Arc<LocalCaches>,
    status: watch::Sender<FeedStatus>,
    applied: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut delay = FIRST_RECONNECT_DELAY;
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        let connected = tokio::select! {
            connected = connect(&client, &requests) => connected,
            _ = stop.changed() => return,
        };
        match connected {
            Ok(mut streams) => {
                caches.stream_up();
                status.send_modify(|status| {
                    status.live = true;
                    status.connects += 1;
                });
                delay = FIRST_RECONNECT_DELAY;
                let why = tokio::select! {
                    why = apply(&mut streams, &caches, &status, &applied) => why,
                    _ = stop.changed() => return,
                };
                caches.stream_down();
                status.send_modify(|status| {
                    status.live = false;
                    status.breaks += 1;
                });
                tracing::warn!(code = ?why.code(), message = why.message(), "key event stream broke: local state dropped, verifying remotely until it is back");
            }
            Err(error) => {
                tracing::warn!(code = ?error.code(), message = error.message(), "cannot open the key event stream: verifying remotely");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
        delay = (delay * 2).min(MAX_RECONNECT_DELAY);
    }
}

/// Opens every stream; fails if any cannot be opened.
async fn connect(
    client: &KeyAuthorityClient,
    requests: &[pb::WatchKeyEventsRequest],
) -> Result<StreamMap<usize, Events>, Error> {
    let mut streams = StreamMap::new();
    for (index, request) in requests.iter().enumerate() {
        let events: KeyEventStream = client.watch_key_events(request.clone()).await?;
        // A stream that ends is a break like any other: say so with a last item.
        let ended = tokio_stream::once(Err(Error::from(Status::unavailable(
            "the key event stream ended",
        ))));
        streams.insert(index, Box::pin(events.chain(ended)) as Events);
    }
    Ok(streams)
}

/// Applies events until a stream fails; returns why.
async fn apply(
    streams: &mut StreamMap<usize, Events>,
    caches: &LocalCaches,
    status: &watch::Sender<FeedStatus>,
    applied: &AtomicU64,
) -> Error {
    loop {
        match streams.next().await {
            Some((_, Ok(event))) => {
                caches.key_changed(&event.key_id, Change::of_event(&event.r#type));
                applied.fetch_add(1, Ordering::Relaxed);
                status.send_modify(|status| status.events_applied += 1);
            }
            Some((_, Err(error))) => return error,
            None => return Error::from(Status::unavailable("no key event stream")),
        }
    }
}
