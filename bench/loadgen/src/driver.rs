//! Closed-loop load: N request loops, each sending its next request as soon as the previous one
//! answered, bounded both in time and in count. Each loop keeps its own histogram (no shared
//! state on the hot path); they are merged when the window closes.

use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::stats::{self, Answers, Failure, Failures, Recorded};

/// One kind of request that a loop sends again and again.
pub trait Probe: Send + 'static {
    /// Sends one request. `Ok` carries the answer's name (an accepted answer, e.g. `VALID`);
    /// `Err` when the RPC failed or its answer was not an accepted one.
    fn call(&mut self) -> impl Future<Output = Result<&'static str, Failure>> + Send;
}

/// When loops start recording, when they stop sending, and the most each may send.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub measure_from: Instant,
    pub until: Instant,
    pub max_requests_per_loop: u64,
}

impl Window {
    /// A window opening now: `warmup` unrecorded, then `duration` recorded.
    pub fn starting_now(warmup: Duration, duration: Duration, max_requests_per_loop: u64) -> Self {
        let measure_from = Instant::now() + warmup;
        Self {
            measure_from,
            until: measure_from + duration,
            max_requests_per_loop,
        }
    }

    pub fn measured(&self) -> Duration {
        self.until - self.measure_from
    }
}

/// Runs one loop per probe until the window closes and merges what they recorded. A request
/// counts when it *started* inside the measured part of the window.
pub async fn run_loops<P: Probe>(probes: Vec<P>, window: Window) -> Recorded {
    let tasks: Vec<_> = probes
        .into_iter()
        .map(|probe| tokio::spawn(one_loop(probe, window)))
        .collect();
    let mut recorded = Recorded::empty(window.measured());
    for task in tasks {
        match task.await {
            Ok((latencies, answers, failures)) => recorded.merge(&latencies, &answers, failures),
            Err(error) => recorded
                .failures
                .add(Failure::new("loop panicked", error.to_string())),
        }
    }
    recorded
}

async fn one_loop<P: Probe>(mut probe: P, window: Window) -> (Histogram<u64>, Answers, Failures) {
    let mut latencies = stats::new_histogram();
    let mut answers = Answers::new();
    let mut failures = Failures::default();
    let mut sent = 0u64;
    loop {
        let start = Instant::now();
        if start >= window.until || sent >= window.max_requests_per_loop {
            break;
        }
        sent += 1;
        let outcome = probe.call().await;
        let elapsed = start.elapsed();
        if start < window.measure_from {
            continue;
        }
        match outcome {
            Ok(answer) => {
                stats::record(&mut latencies, elapsed);
                *answers.entry(answer).or_default() += 1;
            }
            Err(failure) => failures.add(failure),
        }
    }
    (latencies, answers, failures)
}
