//! Overload protection around every gRPC call: a server-wide limit on calls in progress that
//! refuses the excess at once (OVERLOADED) instead of queueing it, and the caller's deadline
//! (`grpc-timeout`) enforced with DEADLINE_EXCEEDED: a call whose deadline has passed before its
//! handler runs is not worked on, and a running call is dropped when its deadline passes.
//!
//! grpc.health is exempt from the limit, so that a load balancer can tell a busy server (health
//! answers, calls are refused) from a dead one (nothing answers).
//!
//! Why not tower's `GlobalConcurrencyLimit` + `LoadShed`: they decide in `poll_ready`, before the
//! request (and so its path) is known, which rules out exempting health. Here the decision is one
//! `try_acquire` on a semaphore shared by every connection, taken in `call`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::futures::TaskLocalFuture;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::error::Error;
use crate::metrics::Metrics;

/// The limits, from `--max-concurrent-requests` and `--max-concurrent-streams`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverloadConfig {
    /// Calls (other than grpc.health) in progress at once across all connections; the next one
    /// is refused with UNAVAILABLE / OVERLOADED. 0 sets no limit.
    pub max_concurrent_requests: usize,
    /// HTTP/2 streams a client may open at once on one connection (advertised in SETTINGS; a
    /// client waits for a free stream rather than being refused). 0 sets no limit.
    pub max_concurrent_streams: u32,
}

impl Default for OverloadConfig {
    /// Sized for two cores. A warm VerifyKey takes microseconds, so throughput saturates both
    /// cores at about 16 calls in flight; a closed-loop benchmark with more outstanding calls only
    /// adds queueing, never throughput. 1024 leaves 64 connections × 16 streams unrefused (at
    /// ~60k calls/s that queue is ~17 ms), while bounding the memory and the argon2 backlog a
    /// flood of cold calls can build. 128 streams per connection (nginx's default) lets one
    /// connection hold at most an eighth of the server's slots.
    fn default() -> Self {
        Self {
            max_concurrent_requests: 1024,
            max_concurrent_streams: 128,
        }
    }
}

/// Wraps every call: limit, then deadline. Built once; per call a header lookup, a
/// `try_acquire` and a timer.
#[derive(Clone)]
pub struct OverloadLayer {
    /// None when there is no limit.
    permits: Option<Arc<Semaphore>>,
    /// The deadline of a call that sends no `grpc-timeout`.
    max_request_time: Duration,
    metrics: Arc<Metrics>,
}

impl OverloadLayer {
    pub fn new(config: OverloadConfig, max_request_time: Duration, metrics: Arc<Metrics>) -> Self {
        let permits = (config.max_concurrent_requests > 0)
            .then(|| Arc::new(Semaphore::new(config.max_concurrent_requests)));
        Self {
            permits,
            max_request_time,
            metrics,
        }
    }
}

impl OverloadLayer {
    /// The server-wide slots, for other listeners (the HTTP gateway) to share; None: no limit.
    pub fn permits(&self) -> Option<Arc<Semaphore>> {
        self.permits.clone()
    }
}

impl<S> Layer<S> for OverloadLayer {
    type Service = OverloadService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OverloadService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct OverloadService<S> {
    inner: S,
    layer: OverloadLayer,
}

/// grpc.health (Check and Watch) answers whatever the load: it is how load balancers tell busy
/// from dead. Reflection is not exempt: it is no liveness signal, and exempting it would leave
/// an unauthenticated way around the limit.
fn is_exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for OverloadService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = OverloadFuture<TaskLocalFuture<Instant, S::Future>, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // The deadline counts from here, before tonic's own `grpc-timeout` timer (started after
        // this returns), so this layer answers first and with the right code.
        let timeout = grpc_timeout(request.headers())
            .map_or(self.layer.max_request_time, |timeout| {
                timeout.min(self.layer.max_request_time)
            });
        let deadline = Instant::now() + timeout;
        if timeout.is_zero() {
            return self.refuse(Error::DeadlineExceeded);
        }
        let permit = match &self.layer.permits {
            Some(permits) if !is_exempt(request.uri().path()) => {
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => return self.refuse(Error::Overloaded),
                }
            }
            _ => None,
        };
        OverloadFuture::Running {
            // The store reads the deadline to answer before it (`deadline`).
            inner: crate::deadline::scope(deadline, self.inner.call(request)),
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            deadline,
            polled: false,
            _permit: permit,
            metrics: self.layer.metrics.clone(),
        }
    }
}

impl<S> OverloadService<S> {
    fn refuse<F, B: Default>(&self, error: Error) -> OverloadFuture<F, B> {
        self.layer.metrics.record_refusal(error.reason());
        OverloadFuture::Refused {
            response: Some(tonic::Status::from(error).into_http()),
        }
    }
}

pin_project_lite::pin_project! {
    #[project = Projected]
    pub enum OverloadFuture<F, B> {
        Refused { response: Option<http::Response<B>> },
        Running {
            #[pin]
            inner: F,
            timer: Pin<Box<Sleep>>,
            deadline: Instant,
            // Whether the handler has run at all: a call whose deadline passed before its first
            // poll (a busy runtime) is refused without starting it.
            polled: bool,
            // Held until the handler has answered.
            _permit: Option<OwnedSemaphorePermit>,
            metrics: Arc<Metrics>,
        },
    }
}

impl<F, B, E> Future for OverloadFuture<F, B>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    B: Default,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Refused { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            Projected::Running {
                mut inner,
                timer,
                deadline,
                polled,
                metrics,
                ..
            } => {
                if *polled && let Poll::Ready(output) = inner.as_mut().poll(cx) {
                    return Poll::Ready(output);
                }
                // Compare with the clock too, not only the timer: whichever of this timer and
                // tonic's fires first, this answer must win.
                let expired = timer.as_mut().poll(cx).is_ready() || Instant::now() >= *deadline;
                if expired {
                    metrics.record_refusal(Error::DeadlineExceeded.reason());
                    tracing::debug!(started = *polled, "deadline exceeded: call dropped");
                    return Poll::Ready(Ok(
                        tonic::Status::from(Error::DeadlineExceeded).into_http()
                    ));
                }
                if !*polled {
                    *polled = true;
                    return inner.poll(cx);
                }
                Poll::Pending
            }
        }
    }
}

/// The `grpc-timeout` header: 1 to 8 digits and a unit (H, M, S, m, u, n). None when absent or
/// malformed, as tonic treats it.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Option<Duration> {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(&headers)
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("0n"), Some(Duration::ZERO));
    }

    #[test]
    fn malformed_grpc_timeouts_are_ignored() {
        for value in ["", "m", "5", "123456789m", "5x", "-5m", "5 m", "1.5S", "é"] {
            let mut headers = http::HeaderMap::new();
            if let Ok(header) = value.parse() {
                headers.insert("grpc-timeout", header);
            }
            assert_eq!(grpc_timeout(&headers), None, "{value:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[test]
    fn only_health_is_exempt() {
        assert!(is_exempt("/grpc.health.v1.Health/Check"));
        assert!(is_exempt("/grpc.health.v1.Health/Watch"));
        assert!(!is_exempt("/keyauthority.v1.VerifyService/VerifyKey"));
        assert!(!is_exempt(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_exempt("/grpc.health.v1.HealthX/Check"));
    }
}
