//! The verifier inside the caller (`key_authority_client::LocalVerifier`): a warm key verified
//! in this process (latency per call and verifies per second on one thread), beside remote
//! VerifyKey over a connection on the same machine; and propagation of revocations, disablings,
//! updates and rotations made on a replica to the local verifier.

use std::time::{Duration, Instant};

use key_authority::pb::key_service_client::KeyServiceClient;
use key_authority_client::pb::VerifyCode;
use key_authority_client::{KeyAuthorityClient, LocalVerifier};

use crate::client::{self, Net, Result};
use crate::report::TargetLine;
use crate::stats::{self, Summary, us};

#[derive(Debug, Clone, Copy)]
pub struct LocalSettings {
    /// How long each measured phase lasts.
    pub duration: Duration,
    /// Revocations timed.
    pub rounds: usize,
    /// The verifier's fill rule (`LocalVerifierBuilder::settle`).
    pub settle: Duration,
    /// Keys verified (and so held) to measure the verifier's memory per key; 0 skips it.
    pub memory_keys: usize,
}

pub struct LocalReport {
    /// Per call, in a closed loop on one thread (timer overhead included).
    local: Summary,
    /// Verifies per second on one thread, untimed loop.
    local_per_second: f64,
    remote: Summary,
    /// From a change's return (RevokeKey, UpdateKey, RotateKey) to the local verifier's answer
    /// showing it.
    propagation: Summary,
    /// From RevokeKey's send to the same.
    propagation_from_send: Summary,
    /// From the send, per kind of change.
    by_kind: Vec<(&'static str, Summary)>,
    /// (keys held, resident bytes added per key held), if measured.
    memory: Option<(u64, f64)>,
}

pub async fn run(
    net: &Net,
    target: &str,
    replica: &str,
    admin_token: Option<&str>,
    verify_token: Option<&str>,
    settings: LocalSettings,
) -> Result<LocalReport> {
    let mut caller = KeyAuthorityClient::connect(format!("http://{target}")).await?;
    if let Some(token) = admin_token {
        caller = caller.with_bearer_token(token)?;
    }
    if let Some(token) = verify_token {
        caller = caller.with_verify_token(token)?;
    }
    let verifier = LocalVerifier::builder(caller.clone())
        .workspaces([client::WORKSPACE])
        .settle(settings.settle)
        .start()?;
    tokio::time::timeout(Duration::from_secs(30), verifier.wait_ready())
        .await
        .map_err(|_| "the local verifier's event stream did not connect in 30 s")?;
    let mut manager = KeyServiceClient::new(net.connect(replica).await?);

    // A warm key: proven once by the authority, then answered here.
    let key = client::issue_key(net, &mut manager, "loadgen local").await?;
    let first = verifier.verify(&key.secret, &[], None).await?;
    if !first.is_valid() || verifier.verify_local(&key.secret, &[]).is_none() {
        return Err("the warm key is not answered locally".into());
    }
    let (local, local_per_second) =
        measure_local(&verifier, &key.secret, settings.duration).await?;
    let remote = measure_remote(&caller, &key.secret, settings.duration).await?;
    let (propagation, propagation_from_send, by_kind) =
        measure_propagation(net, &verifier, &mut manager, settings).await?;
    let memory = match settings.memory_keys {
        0 => None,
        keys => Some(measure_memory(net, &verifier, &mut manager, keys).await?),
    };
    if let Err(error) = verifier.shutdown().await {
        eprintln!("loadgen: the local verifier's last usage report failed: {error}");
    }
    let report = LocalReport {
        local,
        local_per_second,
        remote,
        propagation,
        propagation_from_send,
        by_kind,
        memory,
    };
    report.print(target, replica, settings);
    Ok(report)
}

/// The warm local path on one blocking thread: first each call timed, then untimed for the rate.
async fn measure_local(
    verifier: &LocalVerifier,
    secret: &str,
    duration: Duration,
) -> Result<(Summary, f64)> {
    let verifier = verifier.clone();
    let secret = secret.to_owned();
    let measured = tokio::task::spawn_blocking(move || {
        let scopes: [String; 0] = [];
        let mut latencies = stats::new_histogram();
        let mut wrong = 0u64;
        let end = Instant::now() + duration;
        while Instant::now() < end {
            for _ in 0..1000 {
                let started = Instant::now();
                let answer = verifier.verify_local(&secret, &scopes);
                stats::record(&mut latencies, started.elapsed());
                if !answer.is_some_and(|answer| answer.is_valid()) {
                    wrong += 1;
                }
            }
        }
        let started = Instant::now();
        let mut calls = 0u64;
        while started.elapsed() < duration {
            for _ in 0..10_000 {
                if verifier.verify_local(&secret, &scopes).is_none() {
                    wrong += 1;
                }
            }
            calls += 10_000;
        }
        let rate = calls as f64 / started.elapsed().as_secs_f64();
        (Summary::of(&latencies, duration, wrong), rate, wrong)
    })
    .await?;
    let (summary, rate, wrong) = measured;
    if wrong > 0 {
        return Err(format!("{wrong} local verifies were not VALID").into());
    }
    Ok((summary, rate))
}

/// VerifyKey of the same key over gRPC, one call at a time.
async fn measure_remote(
    caller: &KeyAuthorityClient,
    secret: &str,
    duration: Duration,
) -> Result<Summary> {
    let mut latencies = stats::new_histogram();
    let request = key_authority_client::pb::VerifyKeyRequest {
        key: secret.to_owned(),
        ..Default::default()
    };
    let started = Instant::now();
    while started.elapsed() < duration {
        let call = Instant::now();
        let answer = caller.verify_key(request.clone()).await?;
        stats::record(&mut latencies, call.elapsed());
        if answer.code() != VerifyCode::Valid {
            return Err(format!("remote VerifyKey answered {:?}", answer.code()).into());
        }
    }
    Ok(Summary::of(&latencies, started.elapsed(), 0))
}

/// This process's resident memory before and after the verifier takes in `keys` more keys (each
/// issued first, then verified once: a VALID answer fills both caches). An upper bound per key:
/// the remote calls' own buffers count too, and freed memory is not always given back.
async fn measure_memory(
    net: &Net,
    verifier: &LocalVerifier,
    manager: &mut KeyServiceClient<tonic::transport::Channel>,
    keys: usize,
) -> Result<(u64, f64)> {
    let mut secrets = Vec::with_capacity(keys);
    for _ in 0..keys {
        secrets.push(
            client::issue_key(net, manager, "loadgen local memory")
                .await?
                .secret,
        );
    }
    let held_before = verifier.stats().cached_keys;
    let before = crate::memory::footprint(std::process::id())?.rss_mib;
    for secret in &secrets {
        if !verifier.verify(secret, &[], None).await?.is_valid() {
            return Err("a freshly issued key is not VALID".into());
        }
    }
    let after = crate::memory::footprint(std::process::id())?.rss_mib;
    let held = verifier.stats().cached_keys.saturating_sub(held_before);
    if held == 0 {
        return Err("the verifier kept none of the keys".into());
    }
    Ok((held, (after - before) * 1024.0 * 1024.0 / held as f64))
}

/// A change whose arrival at the local verifier is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChangeKind {
    Revoke,
    Disable,
    /// UpdateKey narrowing the scopes: the local state is forgotten.
    Update,
    /// RotateKey with an hour's grace: the old key's local state is forgotten.
    Rotate,
}

impl ChangeKind {
    const ALL: [Self; 4] = [Self::Revoke, Self::Disable, Self::Update, Self::Rotate];

    fn name(self) -> &'static str {
        match self {
            Self::Revoke => "RevokeKey",
            Self::Disable => "UpdateKey enabled=false",
            Self::Update => "UpdateKey scopes",
            Self::Rotate => "RotateKey (1 h grace)",
        }
    }

    /// Whether the local verifier's answer shows the change.
    fn arrived(self, answer: Option<key_authority_client::Verification>) -> bool {
        match self {
            Self::Revoke => answer.is_some_and(|answer| answer.code == VerifyCode::Revoked),
            Self::Disable => answer.is_some_and(|answer| answer.code == VerifyCode::Disabled),
            Self::Update | Self::Rotate => answer.is_none(),
        }
    }

    async fn make(
        self,
        net: &Net,
        manager: &mut KeyServiceClient<tonic::transport::Channel>,
        key_id: &str,
    ) -> Result<()> {
        use key_authority::pb;
        let auth = net.admin_auth.as_ref();
        let update = |mask: &str, key: pb::Key| pb::UpdateKeyRequest {
            key: Some(pb::Key {
                workspace_id: client::WORKSPACE.to_owned(),
                key_id: key_id.to_owned(),
                ..key
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec![mask.to_owned()],
            }),
            ..Default::default()
        };
        match self {
            Self::Revoke => client::revoke_key(net, manager, key_id).await?,
            Self::Disable => {
                let request = update("enabled", pb::Key::default());
                manager
                    .update_key(client::authorized(request, auth))
                    .await?;
            }
            Self::Update => {
                let narrowed = pb::Key {
                    scopes: vec!["loadgen:narrowed".to_owned()],
                    ..Default::default()
                };
                let request = update("scopes", narrowed);
                manager
                    .update_key(client::authorized(request, auth))
                    .await?;
            }
            Self::Rotate => {
                let request = pb::RotateKeyRequest {
                    workspace_id: client::WORKSPACE.to_owned(),
                    key_id: key_id.to_owned(),
                    grace_period: Some(prost_types::Duration {
                        seconds: 3600,
                        nanos: 0,
                    }),
                    ..Default::default()
                };
                manager
                    .rotate_key(client::authorized(request, auth))
                    .await?;
            }
        }
        Ok(())
    }
}

/// Per round, a fresh warm key and one change made on `manager`'s replica (revoke, disable,
/// update, rotate in turn); then the local verifier is checked after each event it applies until
/// its answer shows the change. Returns (from the change's return, from its send), all kinds,
/// and per kind.
async fn measure_propagation(
    net: &Net,
    verifier: &LocalVerifier,
    manager: &mut KeyServiceClient<tonic::transport::Channel>,
    settings: LocalSettings,
) -> Result<(Summary, Summary, Vec<(&'static str, Summary)>)> {
    let mut from_return = stats::new_histogram();
    let mut from_send = stats::new_histogram();
    let mut by_kind: Vec<_> = ChangeKind::ALL
        .iter()
        .map(|_| stats::new_histogram())
        .collect();
    let mut failures = 0u64;
    for round in 0..settings.rounds {
        let kind = ChangeKind::ALL[round % ChangeKind::ALL.len()];
        let key = client::issue_key(net, manager, "loadgen local propagation").await?;
        let first = verifier.verify(&key.secret, &[], None).await?;
        if !first.is_valid() || verifier.verify_local(&key.secret, &[]).is_none() {
            failures += 1;
            continue;
        }
        let mut status = verifier.status();
        status.borrow_and_update();
        let sent = Instant::now();
        kind.make(net, manager, &key.key_id).await?;
        let returned = Instant::now();
        // Checked after every event the verifier applies (no spinning: the loop shares its one
        // core with the verifier's stream task).
        loop {
            if kind.arrived(verifier.verify_local(&key.secret, &[])) {
                stats::record(&mut from_return, returned.elapsed());
                stats::record(&mut from_send, sent.elapsed());
                stats::record(&mut by_kind[round % ChangeKind::ALL.len()], sent.elapsed());
                break;
            }
            let wait = Duration::from_secs(10).saturating_sub(sent.elapsed());
            if tokio::time::timeout(wait, status.changed()).await.is_err() {
                failures += 1;
                break;
            }
        }
    }
    let kinds = ChangeKind::ALL
        .iter()
        .zip(&by_kind)
        .map(|(kind, latencies)| (kind.name(), Summary::of(latencies, Duration::ZERO, 0)))
        .collect();
    Ok((
        Summary::of(&from_return, Duration::ZERO, failures),
        Summary::of(&from_send, Duration::ZERO, failures),
        kinds,
    ))
}

impl LocalReport {
    fn print(&self, target: &str, replica: &str, settings: LocalSettings) {
        println!();
        println!(
            "## local verifier: connected to {target}; revocations made on {replica}; \
             {:?} per phase",
            settings.duration
        );
        println!();
        println!("| path | p50 ns | p99 ns | p99.9 ns | verifies per second (one thread) |");
        println!("|---|---|---|---|---|");
        let ns = |micros: f64| format!("{:.0}", micros * 1000.0);
        println!(
            "| LocalVerifier::verify_local, warm key | {} | {} | {} | {:.0} |",
            ns(self.local.p50_us),
            ns(self.local.p99_us),
            ns(self.local.p999_us),
            self.local_per_second
        );
        println!(
            "| VerifyKey over gRPC, same machine, c=1 | {} | {} | {} | {:.0} |",
            ns(self.remote.p50_us),
            ns(self.remote.p99_us),
            ns(self.remote.p999_us),
            self.remote.rps
        );
        println!();
        println!(
            "Local p50 is {:.0}x faster than remote; local verifies per second are {:.0}x remote's \
             at c=1. Timed calls include about 20-40 ns of timer reads.",
            self.remote.p50_us / self.local.p50_us,
            self.local_per_second / self.remote.rps
        );
        println!();
        println!(
            "Propagation of a change made on {replica} to the local verifier ({} rounds: \
             revoke, disable, update scopes, rotate in turn; a fresh warm key each):",
            settings.rounds
        );
        println!();
        println!("| change, timed from | rounds | p50 µs | p99 µs | max µs | failures |");
        println!("|---|---|---|---|---|---|");
        let mut rows = vec![
            ("all, from the change's return", &self.propagation),
            ("all, from the change's send", &self.propagation_from_send),
        ];
        rows.extend(self.by_kind.iter().map(|(name, s)| (*name, s)));
        for (from, s) in rows {
            println!(
                "| {from} | {} | {} | {} | {} | {} |",
                s.count,
                us(s.p50_us),
                us(s.p99_us),
                us(s.max_us),
                s.failures
            );
        }
        if let Some((held, per_key)) = self.memory {
            println!();
            println!(
                "Memory: {held} more keys held added {per_key:.0} bytes of resident memory per key \
                 (an upper bound: the remote calls' buffers count too)."
            );
        }
    }

    pub fn targets(&self) -> Vec<TargetLine> {
        vec![
            TargetLine::at_most(
                "local warm verify p50 <= 1 µs",
                self.local.p50_us,
                1.0,
                "µs",
                format!(
                    "p50 {:.0} ns, p99 {:.0} ns",
                    self.local.p50_us * 1000.0,
                    self.local.p99_us * 1000.0
                ),
            ),
            TargetLine::at_least(
                "local verifies per second per core >= 1,000,000",
                self.local_per_second,
                1_000_000.0,
                format!("{:.0} per second on one thread", self.local_per_second),
            ),
            TargetLine::at_most(
                "revoke/disable/update/rotate propagation to the local verifier p99 <= 10 ms",
                self.propagation_from_send.p99_us / 1000.0,
                10.0,
                "ms",
                format!(
                    "p99 {} µs from the change's send ({} µs from its return), {} rounds, {} failures",
                    us(self.propagation_from_send.p99_us),
                    us(self.propagation.p99_us),
                    self.propagation.count,
                    self.propagation.failures
                ),
            ),
        ]
    }
}
