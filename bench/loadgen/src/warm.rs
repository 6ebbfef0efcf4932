//! Warm VerifyKey against grpc.health Check in the same run: the hot path's cost over the
//! cheapest RPC the same server answers.

use std::sync::Arc;
use std::time::Duration;

use key_authority::pb;

use crate::client::{self, CheckProbe, Net, Result, VerifyProbe};
use crate::cpu;
use crate::driver::{self, Window};
use crate::report::TargetLine;
use crate::stats::{Failures, Summary, ratio, us};

#[derive(Debug, Clone)]
pub struct LoopSettings {
    /// Unrecorded run-in before each measured phase.
    pub warmup: Duration,
    /// Length of each measured phase.
    pub duration: Duration,
    pub max_requests_per_loop: u64,
    /// Alternating Check/VerifyKey pairs per concurrency level (warm only).
    pub pairs: u32,
}

impl LoopSettings {
    pub fn window(&self) -> Window {
        Window::starting_now(self.warmup, self.duration, self.max_requests_per_loop)
    }
}

/// One Check phase and the VerifyKey phase right after it, on the same connections.
pub struct Pair {
    pub check: Summary,
    pub verify: Summary,
    /// Server CPU time per answered request, in µs, when the server's pid was given.
    pub check_cpu_us: Option<f64>,
    pub verify_cpu_us: Option<f64>,
}

impl Pair {
    fn rps_ratio(&self) -> f64 {
        ratio(self.verify.rps, self.check.rps)
    }
    fn p50_ratio(&self) -> f64 {
        ratio(self.verify.p50_us, self.check.p50_us)
    }
    fn p99_ratio(&self) -> f64 {
        ratio(self.verify.p99_us, self.check.p99_us)
    }
    fn p999_ratio(&self) -> f64 {
        ratio(self.verify.p999_us, self.check.p999_us)
    }
    fn cpu_ratio(&self) -> Option<f64> {
        Some(ratio(self.check_cpu_us?, self.verify_cpu_us?))
    }
}

pub struct Level {
    pub concurrency: usize,
    pub connections: usize,
    /// Alternating pairs: the noise of a shared machine moves both RPCs of a pair alike, and
    /// the median over pairs discards the pairs it moved apart.
    pub pairs: Vec<Pair>,
    pub check_failures: Failures,
    pub verify_failures: Failures,
}

impl Level {
    /// The median over pairs of a per-pair ratio.
    fn median(&self, of: impl Fn(&Pair) -> Option<f64>) -> Option<f64> {
        let mut values: Vec<f64> = self.pairs.iter().filter_map(of).collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let middle = values.len() / 2;
        Some(if values.len() % 2 == 1 {
            values[middle]
        } else {
            (values[middle - 1] + values[middle]) / 2.0
        })
    }

    /// The pair whose RPS ratio is the median (the lower middle one for an even count).
    fn median_pair(&self) -> &Pair {
        let mut order: Vec<&Pair> = self.pairs.iter().collect();
        order.sort_by(|a, b| a.rps_ratio().total_cmp(&b.rps_ratio()));
        order[(order.len() - 1) / 2]
    }
}

pub struct WarmReport {
    pub levels: Vec<Level>,
}

pub async fn run(
    net: &Net,
    target: &str,
    concurrency: &[usize],
    loops: &LoopSettings,
    server_pid: Option<u32>,
) -> Result<WarmReport> {
    let channel = net.connect(target).await?;
    // Afterwards the key's state and verdict are cached.
    let key = client::issue_warm_key(net, channel, "loadgen warm").await?;
    let key: Arc<str> = Arc::from(key.secret.as_str());

    println!();
    println!(
        "## warm: grpc.health Check vs VerifyKey of one warm key, target {target}, {} s measured \
         per phase after {} s unrecorded warm-up, {} request loops per HTTP/2 connection, {} \
         alternating Check/VerifyKey pairs per level",
        loops.duration.as_secs_f64(),
        loops.warmup.as_secs_f64(),
        net.loops_per_connection,
        loops.pairs,
    );
    println!();
    println!(
        "| c | conns | pair | RPC | RPS | p50 µs | p99 µs | p99.9 µs | max µs | server CPU µs/req | failures |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut levels = Vec::new();
    for &c in concurrency {
        let channels = net.connect_for_loops(target, c).await?;
        let mut level = Level {
            concurrency: c,
            connections: channels.len(),
            pairs: Vec::new(),
            check_failures: Failures::default(),
            verify_failures: Failures::default(),
        };
        for pair in 1..=loops.pairs.max(1) {
            let probes = (0..c)
                .map(|i| CheckProbe::new(channels[i % channels.len()].clone()))
                .collect();
            let window = loops.window();
            let (check, check_cpu) = tokio::join!(
                driver::run_loops(probes, window),
                cpu::server_cpu_during(server_pid, window)
            );
            let check_summary = check.summary();
            let check_cpu_us = per_request(check_cpu, &check_summary);
            let row = Row {
                c,
                connections: channels.len(),
                pair,
            };
            row.print("Check", &check_summary, check_cpu_us, &check.failures);

            let probes = (0..c)
                .map(|i| {
                    VerifyProbe::new(
                        net,
                        channels[i % channels.len()].clone(),
                        key.clone(),
                        pb::VerifyCode::Valid,
                    )
                })
                .collect();
            let window = loops.window();
            let (verify, verify_cpu) = tokio::join!(
                driver::run_loops(probes, window),
                cpu::server_cpu_during(server_pid, window)
            );
            let verify_summary = verify.summary();
            let verify_cpu_us = per_request(verify_cpu, &verify_summary);
            row.print(
                "VerifyKey",
                &verify_summary,
                verify_cpu_us,
                &verify.failures,
            );
            level.check_failures.merge(check.failures);
            level.verify_failures.merge(verify.failures);
            level.pairs.push(Pair {
                check: check_summary,
                verify: verify_summary,
                check_cpu_us,
                verify_cpu_us,
            });
        }
        levels.push(level);
    }
    let report = WarmReport { levels };
    report.print_ratios();
    Ok(report)
}

/// Server CPU seconds over a window spread over the requests answered in it, in µs.
fn per_request(cpu_seconds: Option<f64>, summary: &Summary) -> Option<f64> {
    cpu_seconds
        .filter(|_| summary.count > 0)
        .map(|seconds| seconds * 1e6 / summary.count as f64)
}

struct Row {
    c: usize,
    connections: usize,
    pair: u32,
}

impl Row {
    fn print(&self, rpc: &str, summary: &Summary, cpu_us: Option<f64>, failures: &Failures) {
        println!(
            "| {} | {} | {} | {rpc} | {:.0} | {} | {} | {} | {} | {} | {failures} |",
            self.c,
            self.connections,
            self.pair,
            summary.rps,
            us(summary.p50_us),
            us(summary.p99_us),
            us(summary.p999_us),
            us(summary.max_us),
            cpu_us.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}")),
        );
    }
}

impl WarmReport {
    fn print_ratios(&self) {
        println!();
        println!("Medians over the pairs of each level (the RPS ratio's range in brackets):");
        println!();
        println!(
            "| c | conns | pairs | VerifyKey RPS / Check RPS | VerifyKey p50 / Check p50 | \
             VerifyKey p99 / Check p99 | VerifyKey p99.9 / Check p99.9 | \
             Check / VerifyKey server CPU per request |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        let show =
            |value: Option<f64>| value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.3}"));
        for level in &self.levels {
            let (low, high) = level
                .pairs
                .iter()
                .map(Pair::rps_ratio)
                .fold((f64::INFINITY, 0.0f64), |(low, high), r| {
                    (low.min(r), high.max(r))
                });
            println!(
                "| {} | {} | {} | {} [{low:.3}–{high:.3}] | {} | {} | {} | {} |",
                level.concurrency,
                level.connections,
                level.pairs.len(),
                show(level.median(|p| Some(p.rps_ratio()))),
                show(level.median(|p| Some(p.p50_ratio()))),
                show(level.median(|p| Some(p.p99_ratio()))),
                show(level.median(|p| Some(p.p999_ratio()))),
                show(level.median(Pair::cpu_ratio)),
            );
        }
        if self
            .levels
            .iter()
            .any(|l| l.median(Pair::cpu_ratio).is_some())
        {
            println!();
            println!(
                "Check / VerifyKey server CPU per request is the throughput ratio a server-bound \
                 run would show (one where the server, not the load generator, saturates its \
                 core)."
            );
        }
    }

    fn level(&self, concurrency: usize) -> Option<&Level> {
        self.levels.iter().find(|l| l.concurrency == concurrency)
    }

    pub fn targets(&self) -> Vec<TargetLine> {
        let mut lines = Vec::new();
        let answers_wrong = self
            .levels
            .iter()
            .map(|l| l.verify_failures.total() + l.check_failures.total())
            .sum::<u64>();
        if answers_wrong > 0 {
            lines.push(TargetLine::not_measured(
                "every warm answer correct",
                &format!("{answers_wrong} failed or wrong answers: figures below are suspect"),
            ));
        }
        const RPS: &str = "warm VerifyKey RPS >= 0.95 x Check RPS at c=64 (median of pairs)";
        lines.push(match self.level(64) {
            Some(l) => {
                let r = l.median(|p| Some(p.rps_ratio())).unwrap_or(0.0);
                let pair = l.median_pair();
                TargetLine::at_least(
                    RPS,
                    r,
                    0.95,
                    format!(
                        "{r:.3} (median pair: {:.0} / {:.0} RPS)",
                        pair.verify.rps, pair.check.rps
                    ),
                )
            }
            None => TargetLine::not_measured(RPS, "c=64 not run"),
        });
        if let Some(r) = self.level(64).and_then(|l| l.median(Pair::cpu_ratio)) {
            lines.push(TargetLine::at_least(
                "(same, server-bound estimate: Check / VerifyKey server CPU per request >= 0.95 at c=64)",
                r,
                0.95,
                format!("median {r:.3}"),
            ));
        }
        const P50: &str = "warm VerifyKey p50 <= 1.05 x Check p50 at c=1 (median of pairs)";
        lines.push(match self.level(1) {
            Some(l) => {
                let r = l.median(|p| Some(p.p50_ratio())).unwrap_or(f64::INFINITY);
                let pair = l.median_pair();
                TargetLine::at_most(
                    P50,
                    r,
                    1.05,
                    "(ratio)",
                    format!(
                        "{r:.3} (median pair: {} / {} µs)",
                        us(pair.verify.p50_us),
                        us(pair.check.p50_us)
                    ),
                )
            }
            None => TargetLine::not_measured(P50, "c=1 not run"),
        });
        const P99: &str = "warm VerifyKey p99 <= 1.25 x Check p99 at c=16 (median of pairs)";
        lines.push(match self.level(16) {
            Some(l) => {
                let r = l.median(|p| Some(p.p99_ratio())).unwrap_or(f64::INFINITY);
                TargetLine::at_most(P99, r, 1.25, "(ratio)", format!("{r:.3}"))
            }
            None => TargetLine::not_measured(P99, "c=16 not run"),
        });
        lines
    }
}
