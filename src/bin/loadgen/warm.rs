//! Warm VerifyKey against grpc.health Check in the same run: the hot path's cost over the
//! cheapest RPC the same server answers.

use std::sync::Arc;
use std::time::Duration;

use key_authority::pb;
use key_authority::pb::key_service_client::KeyServiceClient;
use key_authority::pb::verify_service_client::VerifyServiceClient;

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
}

impl LoopSettings {
    pub fn window(&self) -> Window {
        Window::starting_now(self.warmup, self.duration, self.max_requests_per_loop)
    }
}

pub struct Level {
    pub concurrency: usize,
    pub connections: usize,
    pub check: Summary,
    pub verify: Summary,
    /// Server CPU time per answered request, in µs, when the server's pid was given.
    pub check_cpu_us: Option<f64>,
    pub verify_cpu_us: Option<f64>,
    pub check_failures: Failures,
    pub verify_failures: Failures,
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
    let key = client::issue_key(
        net,
        &mut KeyServiceClient::new(channel.clone()),
        "loadgen warm",
    )
    .await?;
    // The warm-up verify: afterwards the key's state and verdict are cached.
    let mut verifier = VerifyServiceClient::new(channel);
    let code = client::verify_code(&mut verifier, &key.secret, net.verify_auth.as_ref())
        .await
        .map_err(|failure| format!("warm-up VerifyKey failed: {failure:?}"))?;
    client::expect_code(code, pb::VerifyCode::Valid)
        .map_err(|failure| format!("warm-up VerifyKey: {failure:?}"))?;
    let key: Arc<str> = Arc::from(key.secret.as_str());

    println!();
    println!(
        "## warm: grpc.health Check vs VerifyKey of one warm key, target {target}, {} s measured \
         per phase after {} s unrecorded warm-up, {} request loops per HTTP/2 connection",
        loops.duration.as_secs_f64(),
        loops.warmup.as_secs_f64(),
        net.loops_per_connection
    );
    println!();
    println!(
        "| c | conns | RPC | RPS | p50 µs | p99 µs | p99.9 µs | max µs | server CPU µs/req | failures |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut levels = Vec::new();
    for &c in concurrency {
        let channels = net.connect_for_loops(target, c).await?;
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
        print_row(
            c,
            channels.len(),
            "Check",
            &check_summary,
            check_cpu_us,
            &check.failures,
        );

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
        print_row(
            c,
            channels.len(),
            "VerifyKey",
            &verify_summary,
            verify_cpu_us,
            &verify.failures,
        );
        levels.push(Level {
            concurrency: c,
            connections: channels.len(),
            check: check_summary,
            verify: verify_summary,
            check_cpu_us,
            verify_cpu_us,
            check_failures: check.failures,
            verify_failures: verify.failures,
        });
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

fn print_row(
    c: usize,
    connections: usize,
    rpc: &str,
    summary: &Summary,
    cpu_us: Option<f64>,
    failures: &Failures,
) {
    println!(
        "| {c} | {connections} | {rpc} | {:.0} | {} | {} | {} | {} | {} | {failures} |",
        summary.rps,
        us(summary.p50_us),
        us(summary.p99_us),
        us(summary.p999_us),
        us(summary.max_us),
        cpu_us.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}")),
    );
}

impl WarmReport {
    fn print_ratios(&self) {
        println!();
        println!(
            "| c | conns | VerifyKey RPS / Check RPS | VerifyKey p50 / Check p50 | \
             VerifyKey p99 / Check p99 | VerifyKey p99.9 / Check p99.9 | \
             Check / VerifyKey server CPU per request |"
        );
        println!("|---|---|---|---|---|---|---|");
        for level in &self.levels {
            let cpu = match (level.check_cpu_us, level.verify_cpu_us) {
                (Some(check), Some(verify)) => format!("{:.3}", ratio(check, verify)),
                _ => "n/a".to_owned(),
            };
            println!(
                "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {cpu} |",
                level.concurrency,
                level.connections,
                ratio(level.verify.rps, level.check.rps),
                ratio(level.verify.p50_us, level.check.p50_us),
                ratio(level.verify.p99_us, level.check.p99_us),
                ratio(level.verify.p999_us, level.check.p999_us),
            );
        }
        if self.levels.iter().any(|l| l.check_cpu_us.is_some()) {
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
        const RPS: &str = "warm VerifyKey RPS >= 0.9 x Check RPS at c=64";
        lines.push(match self.level(64) {
            Some(l) => {
                let r = ratio(l.verify.rps, l.check.rps);
                TargetLine::at_least(
                    RPS,
                    r,
                    0.9,
                    format!("{:.0} / {:.0} RPS = {r:.3}", l.verify.rps, l.check.rps),
                )
            }
            None => TargetLine::not_measured(RPS, "c=64 not run"),
        });
        if let Some((check, verify)) = self
            .level(64)
            .and_then(|l| Some((l.check_cpu_us?, l.verify_cpu_us?)))
        {
            let r = ratio(check, verify);
            lines.push(TargetLine::at_least(
                "(same, server-bound estimate: Check / VerifyKey server CPU per request >= 0.9 at c=64)",
                r,
                0.9,
                format!("{check:.2} / {verify:.2} µs = {r:.3}"),
            ));
        }
        const P50: &str = "warm VerifyKey p50 <= 1.15 x Check p50 at c=1";
        lines.push(match self.level(1) {
            Some(l) => {
                let r = ratio(l.verify.p50_us, l.check.p50_us);
                TargetLine::at_most(
                    P50,
                    r,
                    1.15,
                    "(ratio)",
                    format!(
                        "{} / {} µs = {r:.3}",
                        us(l.verify.p50_us),
                        us(l.check.p50_us)
                    ),
                )
            }
            None => TargetLine::not_measured(P50, "c=1 not run"),
        });
        const P99: &str = "warm VerifyKey p99 <= 1.25 x Check p99 at c=16";
        lines.push(match self.level(16) {
            Some(l) => {
                let r = ratio(l.verify.p99_us, l.check.p99_us);
                TargetLine::at_most(
                    P99,
                    r,
                    1.25,
                    "(ratio)",
                    format!(
                        "{} / {} µs = {r:.3}",
                        us(l.verify.p99_us),
                        us(l.check.p99_us)
                    ),
                )
            }
            None => TargetLine::not_measured(P99, "c=16 not run"),
        });
        lines
    }
}
