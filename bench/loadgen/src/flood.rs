//! Warm VerifyKey latency alone, then under a flood of wrong secrets for known keys (a distinct
//! wrong secret every request, so the server's negative-verdict cache never answers for it).
//!
//! The server locks a key's unrecognised secrets after a few failures (LOCKED, answered without
//! argon2). So the flood is run once per victim count: with many victims, each key stays under
//! the lockout threshold and every flood request costs a key-state lookup and one argon2 verify
//! (the worst case, which the target is judged on); with few victims, the lockout engages and
//! shows what it saves. Each flood phase gets fresh victims.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use key_authority::pb;
use key_authority::pb::key_service_client::KeyServiceClient;
use key_authority::pb::verify_service_client::VerifyServiceClient;
use tonic::transport::Channel;

use crate::client::{self, IssuedKey, Net, Result, VerifyProbe, WrongSecretProbe};
use crate::cold;
use crate::driver;
use crate::report::TargetLine;
use crate::stats::{Answers, Failures, Summary, answers_text, ratio, us};
use crate::warm::LoopSettings;

pub struct FloodPhase {
    pub victims: usize,
    pub under_flood: Summary,
    pub under_flood_failures: Failures,
    pub flood: Summary,
    pub flood_answers: Answers,
    pub flood_failures: Failures,
}

pub struct FloodReport {
    pub concurrency: usize,
    pub flood_concurrency: usize,
    pub alone: Summary,
    pub alone_failures: Failures,
    pub phases: Vec<FloodPhase>,
}

pub async fn run(
    net: &Net,
    target: &str,
    concurrency: usize,
    flood_concurrency: usize,
    victim_counts: &[usize],
    loops: &LoopSettings,
) -> Result<FloodReport> {
    let channel = net.connect(target).await?;
    let mut manager = KeyServiceClient::new(channel.clone());
    let mut verifier = VerifyServiceClient::new(channel);
    let warm_key = client::issue_key(net, &mut manager, "loadgen flood warm").await?;
    let mut victim_sets = Vec::new();
    for &count in victim_counts {
        victim_sets
            .push(cold::issue_keys(net, &mut manager, count.max(1), "loadgen flood victim").await?);
    }
    // Verify every key once: the warm key is then fully cached and the victims' states are
    // cached, so a flood request costs what a wrong secret for a known, cached key costs.
    for key in std::iter::once(&warm_key).chain(victim_sets.iter().flatten()) {
        let code =
            client::verify_code_patiently(&mut verifier, &key.secret, net.verify_auth.as_ref())
                .await
                .map_err(|failure| format!("warm-up VerifyKey failed: {failure:?}"))?;
        client::expect_code(code, pb::VerifyCode::Valid)
            .map_err(|failure| format!("warm-up VerifyKey: {failure:?}"))?;
    }
    let warm_key: Arc<str> = Arc::from(warm_key.secret.as_str());
    let warm_probes = |channels: &[Channel]| -> Vec<VerifyProbe> {
        (0..concurrency)
            .map(|i| {
                VerifyProbe::new(
                    net,
                    channels[i % channels.len()].clone(),
                    warm_key.clone(),
                    pb::VerifyCode::Valid,
                )
            })
            .collect()
    };

    let channels = net.connect_for_loops(target, concurrency).await?;
    let alone = driver::run_loops(warm_probes(&channels), loops.window()).await;

    let mut phases = Vec::new();
    for victims in victim_sets {
        let victims: Arc<Vec<IssuedKey>> = Arc::new(victims);
        let channels = net.connect_for_loops(target, concurrency).await?;
        // The flood arrives on connections of its own, as another client's would.
        let flood_channels = net.connect_for_loops(target, flood_concurrency).await?;
        let next_victim = Arc::new(AtomicUsize::new(0));
        let flood_probes: Vec<_> = (0..flood_concurrency)
            .map(|i| {
                WrongSecretProbe::new(
                    net,
                    flood_channels[i % flood_channels.len()].clone(),
                    victims.clone(),
                    next_victim.clone(),
                    i as u64 + 1,
                )
            })
            .collect();
        let window = loops.window();
        let (under_flood, flood) = tokio::join!(
            driver::run_loops(warm_probes(&channels), window),
            driver::run_loops(flood_probes, window),
        );
        phases.push(FloodPhase {
            victims: victims.len(),
            under_flood: under_flood.summary(),
            under_flood_failures: under_flood.failures,
            flood: flood.summary(),
            flood_answers: flood.answers,
            flood_failures: flood.failures,
        });
    }

    let report = FloodReport {
        concurrency,
        flood_concurrency,
        alone: alone.summary(),
        alone_failures: alone.failures,
        phases,
    };
    report.print(target, loops);
    Ok(report)
}

impl FloodReport {
    fn print(&self, target: &str, loops: &LoopSettings) {
        println!();
        println!(
            "## flood: warm VerifyKey (c={}) alone, then with {} more loops sending a distinct \
             wrong secret per request for known keys (taken in turn), target {target}, {} s \
             measured after {} s warm-up",
            self.concurrency,
            self.flood_concurrency,
            loops.duration.as_secs_f64(),
            loops.warmup.as_secs_f64(),
        );
        println!();
        println!("| what | RPS | p50 µs | p99 µs | p99.9 µs | max µs | answers | failures |");
        println!("|---|---|---|---|---|---|---|---|");
        let row = |what: &str, s: &Summary, answers: String, failures: &Failures| {
            println!(
                "| {what} | {:.0} | {} | {} | {} | {} | {answers} | {failures} |",
                s.rps,
                us(s.p50_us),
                us(s.p99_us),
                us(s.p999_us),
                us(s.max_us),
            );
        };
        row(
            "warm VerifyKey alone",
            &self.alone,
            format!("VALID {}", self.alone.count),
            &self.alone_failures,
        );
        for phase in &self.phases {
            row(
                &format!("warm VerifyKey under flood ({} victim keys)", phase.victims),
                &phase.under_flood,
                format!("VALID {}", phase.under_flood.count),
                &phase.under_flood_failures,
            );
            row(
                &format!("wrong-secret flood ({} victim keys)", phase.victims),
                &phase.flood,
                answers_text(&phase.flood_answers),
                &phase.flood_failures,
            );
        }
        println!();
        for phase in &self.phases {
            let share = |answer: &str| {
                let count = phase.flood_answers.get(answer).copied().unwrap_or(0);
                100.0 * count as f64 / phase.flood.count.max(1) as f64
            };
            println!(
                "- {} victim keys: warm p99 under flood / alone = {:.2}, p50 ratio {:.2}; flood \
                 {:.0} wrong secrets/s, {:.1} % of them LOCKED and {:.1} % BUSY (both refused \
                 without argon2)",
                phase.victims,
                ratio(phase.under_flood.p99_us, self.alone.p99_us),
                ratio(phase.under_flood.p50_us, self.alone.p50_us),
                phase.flood.rps,
                share("LOCKED"),
                share("BUSY"),
            );
        }
    }

    pub fn targets(&self) -> Vec<TargetLine> {
        let mut lines = Vec::new();
        let failures = self.alone_failures.total()
            + self
                .phases
                .iter()
                .map(|p| p.under_flood_failures.total() + p.flood_failures.total())
                .sum::<u64>();
        if failures > 0 {
            lines.push(TargetLine::not_measured(
                "every flood-phase answer correct",
                &format!("{failures} failed or wrong answers (see the flood table)"),
            ));
        }
        // Judged on the phase whose flood ran the most argon2 (fewest LOCKED): the worst case.
        let worst = self.phases.iter().min_by_key(|p| {
            p.flood_answers.get("LOCKED").copied().unwrap_or(0) * 1000 / p.flood.count.max(1)
        });
        let Some(phase) = worst else {
            return lines;
        };
        let r = ratio(phase.under_flood.p99_us, self.alone.p99_us);
        lines.push(TargetLine::at_most(
            "warm p99 under wrong-secret flood <= 2 x without",
            r,
            2.0,
            "(ratio)",
            format!(
                "{} / {} µs = {r:.2} ({} victims, flood {:.0}/s, {})",
                us(phase.under_flood.p99_us),
                us(self.alone.p99_us),
                phase.victims,
                phase.flood.rps,
                answers_text(&phase.flood_answers)
            ),
        ));
        lines
    }
}
