//! WatchKeyEvents as a typed stream: [`KeyEventStream`], plain (one call) or resuming (one call
//! after another, each from the last position delivered).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher as _, Hasher as _};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio_stream::{Stream, StreamExt as _};
use tonic::Code;

use crate::pb;
use crate::{Error, KeyAuthorityClient};

/// The first pause before a resuming watch reconnects; it doubles after each failed attempt.
pub(crate) const FIRST_RESUME_DELAY: Duration = Duration::from_millis(100);
/// The longest pause between two reconnection attempts (before jitter).
pub(crate) const MAX_RESUME_DELAY: Duration = Duration::from_secs(5);

type Events = Pin<Box<dyn Stream<Item = Result<pb::KeyEvent, Error>> + Send>>;

/// A workspace's key events, in position order, as
/// `Stream<Item = Result<pb::KeyEvent, Error>>` (read it with `StreamExt::next` from
/// `tokio_stream` or `futures`). Made by [`KeyAuthorityClient::watch_key_events`] and
/// [`KeyAuthorityClient::watch_key_events_resuming`].
///
/// Dropping the stream cancels the watch. [`last_position`](Self::last_position) is the position
/// of the last event it delivered: store it with whatever processing the event caused, and watch
/// again with `after_position` set to it to miss nothing and see nothing twice.
///
/// After an `Err` the stream ends (a resuming stream yields only the errors it cannot resume
/// from).
pub struct KeyEventStream {
    events: Events,
    last_position: Option<i64>,
}

impl KeyEventStream {
    fn new(events: Events) -> Self {
        Self {
            events,
            last_position: None,
        }
    }

    /// The `position` of the last event this stream delivered; `None` before the first.
    pub fn last_position(&self) -> Option<i64> {
        self.last_position
    }
}

impl Stream for KeyEventStream {
    type Item = Result<pb::KeyEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = ready!(self.events.as_mut().poll_next(cx));
        if let Some(Ok(event)) = &next {
            self.last_position = Some(event.position);
        }
        Poll::Ready(next)
    }
}

impl fmt::Debug for KeyEventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEventStream")
            .field("last_position", &self.last_position)
            .finish_non_exhaustive()
    }
}

/// One WatchKeyEvents call's events: a response without an event is skipped, a failure is the
/// stream's last item.
pub(crate) fn plain(events: tonic::Streaming<pb::WatchKeyEventsResponse>) -> KeyEventStream {
    KeyEventStream::new(Box::pin(events.filter_map(|answer| match answer {
        Ok(answer) => answer.event.map(Ok),
        Err(status) => Some(Err(Error::from(status))),
    })))
}

/// A watch that reconnects by itself, from the last position it delivered.
pub(crate) fn resuming(
    client: KeyAuthorityClient,
    request: pb::WatchKeyEventsRequest,
) -> KeyEventStream {
    let resume = Resume {
        client,
        request,
        events: None,
        delay: FIRST_RESUME_DELAY,
        done: false,
    };
    KeyEventStream::new(Box::pin(Resuming {
        step: Some(Box::pin(resume.next())),
    }))
}

/// True when watching again can succeed: the service said it might (`UNAVAILABLE`, `ABORTED`,
/// `DEADLINE_EXCEEDED`, or a `RetryInfo`), or the connection broke under the call (`INTERNAL` or
/// `UNKNOWN` without key-authority's `ErrorInfo`: from the transport, not the service).
/// `EVENTS_PRUNED`, refused credentials or a bad request are final.
pub(crate) fn is_resumable(error: &Error) -> bool {
    error.is_retryable()
        || (error.reason().is_none() && matches!(error.code(), Code::Internal | Code::Unknown))
}

/// The state of a resuming watch between two events.
struct Resume {
    client: KeyAuthorityClient,
    /// The next call's request: after the last position delivered, once there is one.
    request: pb::WatchKeyEventsRequest,
    /// The call in progress, if any.
    events: Option<tonic::Streaming<pb::WatchKeyEventsResponse>>,
    /// The pause before the next reconnection.
    delay: Duration,
    /// A final error was delivered: nothing follows.
    done: bool,
}

impl Resume {
    /// The next event (or final error), and the state to carry on from; `None` once done.
    async fn next(mut self) -> Option<(Result<pb::KeyEvent, Error>, Self)> {
        if self.done {
            return None;
        }
        loop {
            let events = match self.events.as_mut() {
                Some(events) => events,
                None => match self.client.open_watch(self.request.clone()).await {
                    Ok(events) => self.events.insert(events),
                    Err(error) if is_resumable(&error) => {
                        self.pause(error.retry_delay()).await;
                        continue;
                    }
                    Err(error) => return Some((Err(self.finish(error)), self)),
                },
            };
            match events.message().await {
                Ok(Some(pb::WatchKeyEventsResponse { event: Some(event) })) => {
                    self.request.after_position = event.position;
                    self.request.from_now = false;
                    self.delay = FIRST_RESUME_DELAY;
                    return Some((Ok(event), self));
                }
                Ok(Some(_)) => {}
                // The server ended the watch cleanly: it is shutting down. Another replica, or
                // this one once restarted, carries on from the same position.
                Ok(None) => {
                    self.events = None;
                    self.pause(None).await;
                }
                Err(status) => {
                    self.events = None;
                    let error = Error::from(status);
                    if !is_resumable(&error) {
                        return Some((Err(self.finish(error)), self));
                    }
                    self.pause(error.retry_delay()).await;
                }
            }
        }
    }

    fn finish(&mut self, error: Error) -> Error {
        self.done = true;
        error
    }

    /// Waits before reconnecting: the service's delay if it gave one, else the backoff with
    /// jitter (half fixed, half random, so watchers of a restarted server do not all return at
    /// once).
    async fn pause(&mut self, service_delay: Option<Duration>) {
        let backoff = self.delay;
        self.delay = (self.delay * 2).min(MAX_RESUME_DELAY);
        let delay = service_delay.unwrap_or_else(|| {
            let half = backoff / 2;
            let random = RandomState::new().build_hasher().finish();
            half + half.mul_f64((random % 1024) as f64 / 1024.0)
        });
        tokio::time::sleep(delay).await;
    }
}

type Step = Pin<Box<dyn Future<Output = Option<(Result<pb::KeyEvent, Error>, Resume)>> + Send>>;

/// `Resume::next` after `Resume::next`, as a stream.
struct Resuming {
    step: Option<Step>,
}

impl Stream for Resuming {
    type Item = Result<pb::KeyEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(step) = self.step.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(step.as_mut().poll(cx)) {
            Some((item, resume)) => {
                self.step = Some(Box::pin(resume.next()));
                Poll::Ready(Some(item))
            }
            None => {
                self.step = None;
                Poll::Ready(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Status;
    use tonic_types::{ErrorDetails, StatusExt as _};

    fn refusal(code: Code, reason: &str) -> Error {
        let details = ErrorDetails::with_error_info(
            reason,
            "keyauthority.v1",
            std::collections::HashMap::new(),
        );
        Error::from(Status::with_error_details(code, "refused", details))
    }

    #[test]
    fn what_a_resuming_watch_resumes_from() {
        assert!(is_resumable(&Error::from(Status::unavailable("down"))));
        assert!(is_resumable(&Error::from(Status::internal("h2 error"))));
        assert!(is_resumable(&Error::from(Status::unknown("reset"))));
        assert!(is_resumable(&refusal(Code::Unavailable, "UNAVAILABLE")));
        assert!(!is_resumable(&refusal(Code::Internal, "INTERNAL")));
        assert!(!is_resumable(&refusal(
            Code::OutOfRange,
            Error::EVENTS_PRUNED
        )));
        assert!(!is_resumable(&refusal(
            Code::PermissionDenied,
            "INSUFFICIENT_ROLE"
        )));
        assert!(!is_resumable(&Error::from(Status::cancelled("cancelled"))));
    }
}
