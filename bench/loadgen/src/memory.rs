//! The server's resident memory and threads under a long flood: half the loops send a distinct
//! wrong secret for known keys, half a well-formed key with an unknown key id. Reads
//! /proc/PID/status of the server (same machine) when idle, right after the flood, and again
//! once the negative cache entries the flood created have expired.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use key_authority::pb::key_service_client::KeyServiceClient;

use crate::client::{Net, Result, UnknownIdProbe, WrongSecretProbe};
use crate::cold;
use crate::driver;
use crate::report::TargetLine;
use crate::stats::{Answers, Failures, answers_text};
use crate::warm::LoopSettings;

/// Resident memory above idle after the flood that the target allows.
const TARGET_GROWTH_MIB: f64 = 128.0;

/// Resident set size (MiB) and thread count of a process.
#[derive(Debug, Clone, Copy)]
pub struct Footprint {
    pub rss_mib: f64,
    pub threads: u64,
}

pub fn footprint(pid: u32) -> Result<Footprint> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
    };
    Ok(Footprint {
        rss_mib: field("VmRSS:").ok_or("no VmRSS in /proc status")? as f64 / 1024.0,
        threads: field("Threads:").ok_or("no Threads in /proc status")?,
    })
}

pub struct MemoryReport {
    pub flood_concurrency: usize,
    pub flood_for: Duration,
    pub settle: Duration,
    pub idle: Footprint,
    pub after_flood: Footprint,
    pub settled: Footprint,
    pub requests: u64,
    pub answers: Answers,
    pub failures: Failures,
}

pub async fn run(
    net: &Net,
    target: &str,
    server_pid: u32,
    flood_concurrency: usize,
    victims: usize,
    flood_for: Duration,
    settle: Duration,
) -> Result<MemoryReport> {
    let channel = net.connect(target).await?;
    let mut manager = KeyServiceClient::new(channel);
    let victims = Arc::new(
        cold::issue_keys(net, &mut manager, victims.max(1), "loadgen memory victim").await?,
    );
    let idle = footprint(server_pid)?;

    let loops = LoopSettings {
        warmup: Duration::ZERO,
        duration: flood_for,
        max_requests_per_loop: u64::MAX,
        pairs: 1,
    };
    let wrong_loops = flood_concurrency.div_ceil(2);
    let unknown_loops = flood_concurrency - wrong_loops;
    let channels = net.connect_for_loops(target, flood_concurrency).await?;
    let next_victim = Arc::new(AtomicUsize::new(0));
    let wrong: Vec<_> = (0..wrong_loops)
        .map(|i| {
            WrongSecretProbe::new(
                net,
                channels[i % channels.len()].clone(),
                victims.clone(),
                next_victim.clone(),
                i as u64 + 1,
            )
        })
        .collect();
    let unknown = (0..unknown_loops)
        .map(|i| {
            UnknownIdProbe::new(
                net,
                channels[(wrong_loops + i) % channels.len()].clone(),
                &victims[0].secret,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let window = loops.window();
    let (wrong, unknown) = tokio::join!(
        driver::run_loops(wrong, window),
        driver::run_loops(unknown, window),
    );
    let after_flood = footprint(server_pid)?;
    drop(channels);
    tokio::time::sleep(settle).await;
    let settled = footprint(server_pid)?;

    let mut answers = wrong.answers.clone();
    for (answer, count) in &unknown.answers {
        *answers.entry(answer).or_default() += count;
    }
    let mut failures = wrong.failures.clone();
    failures.merge(unknown.failures.clone());
    let report = MemoryReport {
        flood_concurrency,
        flood_for,
        settle,
        idle,
        after_flood,
        settled,
        requests: wrong.summary().count + unknown.summary().count,
        answers,
        failures,
    };
    report.print(target);
    Ok(report)
}

impl MemoryReport {
    fn print(&self, target: &str) {
        println!();
        println!(
            "## memory: {} loops for {} s (half wrong secrets for known keys, half unknown key \
             ids), target {target}; then {} s idle",
            self.flood_concurrency,
            self.flood_for.as_secs(),
            self.settle.as_secs(),
        );
        println!();
        println!("| when | resident MiB | above idle MiB | threads |");
        println!("|---|---|---|---|");
        for (when, footprint) in [
            ("idle", self.idle),
            ("right after the flood", self.after_flood),
            ("after the negative entries expired", self.settled),
        ] {
            println!(
                "| {when} | {:.1} | {:.1} | {} |",
                footprint.rss_mib,
                footprint.rss_mib - self.idle.rss_mib,
                footprint.threads
            );
        }
        println!();
        println!(
            "- {} requests: {}; failures: {}",
            self.requests,
            answers_text(&self.answers),
            self.failures
        );
    }

    pub fn targets(&self) -> Vec<TargetLine> {
        let growth = self.after_flood.rss_mib - self.idle.rss_mib;
        vec![TargetLine {
            target: format!(
                "resident memory after a {} s flood ≤ idle + {TARGET_GROWTH_MIB} MiB",
                self.flood_for.as_secs()
            ),
            measured: format!(
                "{:.1} → {:.1} MiB (+{growth:.1}); {:.1} MiB after {} s idle",
                self.idle.rss_mib,
                self.after_flood.rss_mib,
                self.settled.rss_mib,
                self.settle.as_secs()
            ),
            met: growth <= TARGET_GROWTH_MIB && self.failures.total() == 0,
            margin: format!("{:+.1} MiB", growth - TARGET_GROWTH_MIB),
        }]
    }
}
