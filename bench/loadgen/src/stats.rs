//! Latency histograms, failure tallies and the summaries printed in reports.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies in nanoseconds with 3 significant digits, from 1 ns to 60 s.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

pub fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX).max(1);
    histogram.saturating_record(nanos);
}

/// A request that got a wrong answer or an RPC error.
#[derive(Debug, Clone)]
pub struct Failure {
    /// A short label to group by, e.g. `rpc Unavailable` or `code NotFound`.
    pub kind: String,
    /// The first message seen for this kind.
    pub detail: String,
}

impl Failure {
    pub fn new(kind: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            detail: detail.into(),
        }
    }

    /// A failed RPC, by its code and, when it sent one, its ErrorInfo reason.
    pub fn rpc(status: &tonic::Status) -> Self {
        use tonic_types::StatusExt;
        let kind = match status.get_details_error_info() {
            Some(info) => format!("rpc {:?} {}", status.code(), info.reason),
            None => format!("rpc {:?}", status.code()),
        };
        Self::new(kind, status.message())
    }

    /// The server refused an unproven secret because its argon2 budget was spent.
    pub fn is_verify_busy(&self) -> bool {
        self.kind == "rpc ResourceExhausted VERIFY_BUSY"
    }
}

/// How many requests failed, by kind, with one sample message each.
#[derive(Debug, Default, Clone)]
pub struct Failures {
    counts: BTreeMap<String, (u64, String)>,
}

impl Failures {
    pub fn add(&mut self, failure: Failure) {
        let entry = self
            .counts
            .entry(failure.kind)
            .or_insert_with(|| (0, failure.detail));
        entry.0 += 1;
    }

    pub fn merge(&mut self, other: Failures) {
        for (kind, (count, detail)) in other.counts {
            let entry = self.counts.entry(kind).or_insert((0, detail));
            entry.0 += count;
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.values().map(|(count, _)| count).sum()
    }
}

impl fmt::Display for Failures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.counts.is_empty() {
            return f.write_str("0");
        }
        let mut first = true;
        for (kind, (count, detail)) in &self.counts {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{count} x {kind} ({detail})")?;
        }
        Ok(())
    }
}

/// How many accepted answers of each kind (e.g. `NOT_FOUND` and `LOCKED` for wrong secrets).
pub type Answers = BTreeMap<&'static str, u64>;

/// Answers as `NAME n, NAME n`.
pub fn answers_text(answers: &Answers) -> String {
    answers
        .iter()
        .map(|(name, count)| format!("{name} {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What one group of request loops recorded during a measured window.
pub struct Recorded {
    pub latencies: Histogram<u64>,
    pub answers: Answers,
    pub failures: Failures,
    pub window: Duration,
}

impl Recorded {
    pub fn empty(window: Duration) -> Self {
        Self {
            latencies: new_histogram(),
            answers: Answers::new(),
            failures: Failures::default(),
            window,
        }
    }

    pub fn merge(&mut self, latencies: &Histogram<u64>, answers: &Answers, failures: Failures) {
        self.latencies
            .add(latencies)
            .expect("histograms with the same bounds merge");
        for (name, count) in answers {
            *self.answers.entry(name).or_default() += count;
        }
        self.failures.merge(failures);
    }

    pub fn summary(&self) -> Summary {
        Summary::of(&self.latencies, self.window, self.failures.total())
    }
}

/// Count, rate and latency percentiles of one measurement, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub count: u64,
    pub failures: u64,
    pub rps: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Summary {
    /// `window` is the measured time the requests were spread over (for the rate); zero for
    /// sequential samples whose rate means nothing.
    pub fn of(latencies: &Histogram<u64>, window: Duration, failures: u64) -> Self {
        let count = latencies.len();
        let micros = |nanos: u64| nanos as f64 / 1000.0;
        let rps = if window.is_zero() {
            0.0
        } else {
            count as f64 / window.as_secs_f64()
        };
        if count == 0 {
            return Self {
                count,
                failures,
                rps,
                mean_us: f64::NAN,
                p50_us: f64::NAN,
                p99_us: f64::NAN,
                p999_us: f64::NAN,
                max_us: f64::NAN,
            };
        }
        Self {
            count,
            failures,
            rps,
            mean_us: latencies.mean() / 1000.0,
            p50_us: micros(latencies.value_at_quantile(0.50)),
            p99_us: micros(latencies.value_at_quantile(0.99)),
            p999_us: micros(latencies.value_at_quantile(0.999)),
            max_us: micros(latencies.max()),
        }
    }
}

/// A microsecond figure for a table: one decimal below 1000 µs, none above.
pub fn us(value: f64) -> String {
    if value.is_nan() {
        "n/a".to_owned()
    } else if value.abs() < 1000.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    }
}

/// A ratio for a table.
pub fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator == 0.0 {
        f64::NAN
    } else {
        numerator / denominator
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reports_microseconds() {
        let mut histogram = new_histogram();
        for micros in 1..=1000u64 {
            record(&mut histogram, Duration::from_micros(micros));
        }
        let summary = Summary::of(&histogram, Duration::from_secs(2), 0);
        assert_eq!(summary.count, 1000);
        assert!((summary.rps - 500.0).abs() < 1e-9);
        assert!((summary.p50_us - 500.0).abs() < 1.0, "{}", summary.p50_us);
        assert!((summary.p99_us - 990.0).abs() < 1.0, "{}", summary.p99_us);
        assert!((summary.max_us - 1000.0).abs() < 1.0, "{}", summary.max_us);
    }

    #[test]
    fn failures_group_by_kind() {
        let mut failures = Failures::default();
        failures.add(Failure::new("code NotFound", "first"));
        failures.add(Failure::new("code NotFound", "second"));
        failures.add(Failure::new("rpc Unavailable", "down"));
        assert_eq!(failures.total(), 3);
        assert_eq!(
            failures.to_string(),
            "2 x code NotFound (first); 1 x rpc Unavailable (down)"
        );
    }
}
