//! Cold VerifyKey: the first verify of a key the server has never verified (a database read and
//! one argon2id verify), against the cost of one argon2id verify measured in this process.

use std::time::{Duration, Instant};

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use key_authority::pb;
use key_authority::pb::key_service_client::KeyServiceClient;
use key_authority::pb::verify_service_client::VerifyServiceClient;

use crate::client::{self, IssuedKey, Net, Result};
use crate::report::TargetLine;
use crate::stats::{self, Failures, Summary, us};

/// The server's argon2id parameters, to reproduce its cost here.
#[derive(Debug, Clone, Copy)]
pub struct Argon2Settings {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    /// How many verifies to time.
    pub samples: usize,
}

pub struct ColdReport {
    pub keys: usize,
    pub cold: Summary,
    pub warm_after: Summary,
    pub failures: Failures,
    pub argon2: Summary,
    pub argon2_settings: Argon2Settings,
}

pub async fn run(
    net: &Net,
    target: &str,
    keys: usize,
    argon2: Argon2Settings,
) -> Result<ColdReport> {
    let channel = net.connect(target).await?;
    let mut manager = KeyServiceClient::new(channel.clone());
    let mut verifier = VerifyServiceClient::new(channel);
    let issued = issue_keys(net, &mut manager, keys, "loadgen cold").await?;

    let (cold, failures) = first_verifies(net, &mut verifier, &issued).await;
    // The same keys again, now cached: what the cold path adds is the difference.
    let (warm_after, warm_failures) = first_verifies(net, &mut verifier, &issued).await;
    let mut failures = failures;
    failures.merge(warm_failures);
    let argon2_summary = time_argon2(argon2).await?;

    let report = ColdReport {
        keys,
        cold,
        warm_after,
        failures,
        argon2: argon2_summary,
        argon2_settings: argon2,
    };
    report.print(target);
    Ok(report)
}

/// Issues `count` keys one after the other (never verified, so never cached by the server).
pub async fn issue_keys(
    net: &Net,
    manager: &mut KeyServiceClient<tonic::transport::Channel>,
    count: usize,
    name: &str,
) -> Result<Vec<IssuedKey>> {
    let mut issued = Vec::with_capacity(count);
    for _ in 0..count {
        issued.push(client::issue_key(net, manager, name).await?);
    }
    Ok(issued)
}

/// Verifies each key once, sequentially, timing each; every answer must be VALID.
pub async fn first_verifies(
    net: &Net,
    verifier: &mut VerifyServiceClient<tonic::transport::Channel>,
    keys: &[IssuedKey],
) -> (Summary, Failures) {
    let mut latencies = stats::new_histogram();
    let mut failures = Failures::default();
    for key in keys {
        let start = Instant::now();
        let outcome = client::verify_code(verifier, &key.secret, net.verify_auth.as_ref()).await;
        let elapsed = start.elapsed();
        match outcome.and_then(|code| client::expect_code(code, pb::VerifyCode::Valid)) {
            Ok(()) => stats::record(&mut latencies, elapsed),
            Err(failure) => failures.add(failure),
        }
    }
    (
        Summary::of(&latencies, Duration::ZERO, failures.total()),
        failures,
    )
}

/// The time of one argon2id verify of a key-sized text with the server's parameters, on a
/// blocking thread of this process.
pub async fn time_argon2(settings: Argon2Settings) -> Result<Summary> {
    tokio::task::spawn_blocking(move || -> Result<Summary> {
        let params = Params::new(
            settings.memory_kib,
            settings.iterations,
            settings.parallelism,
            None,
        )
        .map_err(|error| format!("invalid argon2 parameters: {error}"))?;
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let text = b"ka_live_0123456789ABabcdefghijklmnopqrstuvwxyz012345QRSTUV";
        let phc = argon2
            .hash_password_with_salt(text, b"loadgen-fixed-salt")
            .map_err(|error| format!("argon2 hash failed: {error}"))?
            .to_string();
        let mut latencies = stats::new_histogram();
        // One untimed verify first: page faults of the first allocation are not the server's
        // steady state.
        argon2
            .verify_password(text, phc.as_str())
            .map_err(|error| format!("argon2 verify failed: {error}"))?;
        for _ in 0..settings.samples.max(1) {
            let start = Instant::now();
            let outcome = argon2.verify_password(text, phc.as_str());
            stats::record(&mut latencies, start.elapsed());
            outcome.map_err(|error| format!("argon2 verify failed: {error}"))?;
        }
        Ok(Summary::of(&latencies, Duration::ZERO, 0))
    })
    .await?
}

impl ColdReport {
    fn print(&self, target: &str) {
        let a = self.argon2_settings;
        println!();
        println!(
            "## cold: first VerifyKey of {} freshly issued keys, sequential (c=1), target {target}",
            self.keys
        );
        println!();
        println!("| what | n | p50 µs | p99 µs | max µs | mean µs |");
        println!("|---|---|---|---|---|---|");
        let row = |what: &str, s: &Summary| {
            println!(
                "| {what} | {} | {} | {} | {} | {} |",
                s.count,
                us(s.p50_us),
                us(s.p99_us),
                us(s.max_us),
                us(s.mean_us)
            );
        };
        row("cold VerifyKey (first verify of each key)", &self.cold);
        row(
            "warm VerifyKey (second verify, same keys)",
            &self.warm_after,
        );
        row(
            &format!(
                "argon2id verify in-process (m={} KiB, t={}, p={})",
                a.memory_kib, a.iterations, a.parallelism
            ),
            &self.argon2,
        );
        println!();
        println!(
            "cold − argon2 (same percentile): p50 {} µs, p99 {} µs; cold − argon2 − warm round \
             trip (p50): {} µs; failures: {}",
            us(self.cold.p50_us - self.argon2.p50_us),
            us(self.cold.p99_us - self.argon2.p99_us),
            us(self.cold.p50_us - self.argon2.p50_us - self.warm_after.p50_us),
            self.failures
        );
        if self.cold.p50_us < self.argon2.p50_us {
            println!(
                "NOTE: the cold p50 is below one argon2 verify: the server did not run argon2 on \
                 the first verify (it may warm its caches at issue time), so this is not a cold \
                 measurement."
            );
        }
    }

    pub fn targets(&self) -> Vec<TargetLine> {
        let limit = self.argon2.p50_us + 2000.0;
        let mut lines = Vec::new();
        if self.failures.total() > 0 {
            lines.push(TargetLine::not_measured(
                "every cold answer VALID",
                &format!("{}", self.failures),
            ));
        }
        lines.push(TargetLine::at_most(
            "cold VerifyKey p50 <= one argon2 verify + 2 ms",
            self.cold.p50_us / 1000.0,
            limit / 1000.0,
            "ms",
            format!(
                "{} µs vs {} + 2000 µs",
                us(self.cold.p50_us),
                us(self.argon2.p50_us)
            ),
        ));
        lines.push(TargetLine::at_most(
            "cold VerifyKey p99 <= argon2 verify p99 + 2 ms",
            self.cold.p99_us / 1000.0,
            (self.argon2.p99_us + 2000.0) / 1000.0,
            "ms",
            format!(
                "{} µs vs {} + 2000 µs",
                us(self.cold.p99_us),
                us(self.argon2.p99_us)
            ),
        ));
        lines.push(TargetLine::at_most(
            "cold VerifyKey p99 <= argon2 verify p50 + 2 ms (strict reading)",
            self.cold.p99_us / 1000.0,
            limit / 1000.0,
            "ms",
            format!(
                "{} µs vs {} + 2000 µs",
                us(self.cold.p99_us),
                us(self.argon2.p50_us)
            ),
        ));
        lines
    }
}
