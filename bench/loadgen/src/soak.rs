//! Soak: a long run of high VerifyKey load spread over several replicas, with a low, steady mix of
//! management calls beside it, that checks three things at the end: no call failed or got a
//! wrong answer, each server's resident memory stayed flat, and every key's `total_requests` in
//! the database equals the VALID answers this client saw for it, exactly.
//!
//! The verified set (keys issued up front, half on each replica) is never rotated or revoked, so
//! its usage can only land on its own key ids; the management loop works on keys of its own
//! (issue, get, update, rotate with a grace period, list, revoke) and counts their VALID answers
//! too, by the key id presented: a rotated key's usage stays on the old id.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use key_authority::pb;
use key_authority::pb::key_service_client::KeyServiceClient;
use key_authority::pb::verify_service_client::VerifyServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::client::{self, IssuedKey, Net, Result, WORKSPACE, authorized};
use crate::memory::{Footprint, footprint};
use crate::report::TargetLine;
use crate::stats::{self, Failure, Failures, Summary, us};

/// Growth of resident memory from the middle of the run to its end that still counts as flat.
const FLAT_MIB: f64 = 8.0;

/// The grace period of every rotation: far longer than any soak, so the old key stays VALID.
const ROTATION_GRACE: Duration = Duration::from_secs(3600);

/// ListKeys page size of the management loop.
const LIST_PAGE_SIZE: i32 = 50;

#[derive(Debug, Clone)]
pub struct SoakSettings {
    /// How long the load runs.
    pub duration: Duration,
    /// Length of each reported interval (a minute by default).
    pub interval: Duration,
    /// Keys in the verified set, issued round robin over the replicas.
    pub keys: usize,
    /// VerifyKey request loops, spread round robin over the replicas.
    pub verify_loops: usize,
    /// A management cycle starts this often.
    pub management_every: Duration,
    /// Wait after the load before reading usage back (past at least one usage flush).
    pub settle: Duration,
    /// Keep re-reading mismatched usage for at most this long after `settle`.
    pub usage_deadline: Duration,
    /// The foreign-CPU log of bench/soak.sh's monitor (`<unix seconds> <% of a core>` lines).
    pub foreign_cpu_log: Option<PathBuf>,
}

/// One server under test.
#[derive(Debug, Clone)]
pub struct Replica {
    pub name: String,
    pub addr: String,
    pub pid: Option<u32>,
}

/// When the load started, when it stops, and which interval an instant falls in.
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    until: Instant,
    interval: Duration,
    intervals: usize,
}

impl Clock {
    fn new(duration: Duration, interval: Duration) -> Self {
        let start = Instant::now();
        let interval = interval.max(Duration::from_secs(1));
        let intervals = (duration.as_nanos().div_ceil(interval.as_nanos()) as usize).max(1);
        Self {
            start,
            until: start + duration,
            interval,
            intervals,
        }
    }

    fn index(&self, at: Instant) -> usize {
        let elapsed = at.saturating_duration_since(self.start);
        ((elapsed.as_nanos() / self.interval.as_nanos()) as usize).min(self.intervals - 1)
    }

    /// The length of interval `index` (the last one may be shorter).
    fn length(&self, index: usize) -> Duration {
        let from = self.interval * index as u32;
        let to = (self.interval * (index as u32 + 1)).min(self.until - self.start);
        to.saturating_sub(from)
    }
}

/// What every loop recorded in one interval.
struct Interval {
    verify: Histogram<u64>,
    verify_failures: u64,
    management_calls: u64,
    management_failures: u64,
}

impl Interval {
    fn new() -> Self {
        Self {
            verify: stats::new_histogram(),
            verify_failures: 0,
            management_calls: 0,
            management_failures: 0,
        }
    }
}

type Intervals = Arc<Mutex<Vec<Interval>>>;

/// What one VerifyKey loop saw: VALID answers per key of the verified set, failures, and keys
/// whose count is uncertain because a call failed (the server may have counted it).
struct LoopOutcome {
    valid: Vec<u64>,
    failures: Failures,
    uncertain: HashSet<usize>,
}

/// A closed VerifyKey loop over the whole verified set, starting at key `first`. Latencies go
/// into a histogram of the current interval, handed over to `intervals` when the interval ends:
/// one lock per loop per interval, nothing shared per request.
async fn verify_loop(
    mut verifier: VerifyServiceClient<Channel>,
    auth: Option<MetadataValue<Ascii>>,
    keys: Arc<Vec<IssuedKey>>,
    first: usize,
    clock: Clock,
    intervals: Intervals,
) -> LoopOutcome {
    let mut outcome = LoopOutcome {
        valid: vec![0; keys.len()],
        failures: Failures::default(),
        uncertain: HashSet::new(),
    };
    let mut current = 0;
    let mut latencies = stats::new_histogram();
    let mut failed = 0u64;
    let hand_over = |index: usize, latencies: &mut Histogram<u64>, failed: &mut u64| {
        let mut intervals = intervals.lock().expect("no loop panics holding the lock");
        let interval = &mut intervals[index];
        interval
            .verify
            .add(&*latencies)
            .expect("histograms with the same bounds merge");
        interval.verify_failures += *failed;
        latencies.reset();
        *failed = 0;
    };
    let mut next = first;
    loop {
        let start = Instant::now();
        if start >= clock.until {
            break;
        }
        let index = clock.index(start);
        if index != current {
            hand_over(current, &mut latencies, &mut failed);
            current = index;
        }
        let key = next % keys.len();
        next += 1;
        let answer = client::verify_code(&mut verifier, &keys[key].secret, auth.as_ref()).await;
        let elapsed = start.elapsed();
        match answer.and_then(|code| client::expect_code(code, pb::VerifyCode::Valid)) {
            Ok(()) => {
                stats::record(&mut latencies, elapsed);
                outcome.valid[key] += 1;
            }
            Err(failure) => {
                failed += 1;
                if failure.kind.starts_with("rpc ") {
                    outcome.uncertain.insert(key);
                }
                outcome.failures.add(failure);
            }
        }
    }
    hand_over(current, &mut latencies, &mut failed);
    outcome
}

/// The management loop: one cycle every `every`, alternating which replica does what, so each
/// call meets state that the other replica changed. Counts every VALID answer it gets, by the
/// presented key's id.
struct Manager {
    net: Net,
    every: Duration,
    managers: Vec<KeyServiceClient<Channel>>,
    verifiers: Vec<VerifyServiceClient<Channel>>,
    verified: Arc<Vec<IssuedKey>>,
    /// VALID answers per key id, for the keys this loop verified.
    valid: HashMap<String, u64>,
    /// Keys whose count is uncertain: a VerifyKey of theirs failed in the RPC.
    uncertain: HashSet<String>,
    calls: BTreeMap<&'static str, u64>,
    /// Latencies of the calls that succeeded, by RPC.
    latencies: BTreeMap<&'static str, Histogram<u64>>,
    failures: Failures,
    cycles: u64,
    /// The next ListKeys page (page tokens are valid on every replica).
    list_token: String,
    clock: Clock,
    intervals: Intervals,
}

impl Manager {
    /// Records one management call: its latency, its interval and, when it failed, why.
    fn record<T>(
        &mut self,
        rpc: &'static str,
        start: Instant,
        outcome: std::result::Result<T, Failure>,
    ) -> std::result::Result<T, Failure> {
        let elapsed = start.elapsed();
        *self.calls.entry(rpc).or_default() += 1;
        let index = self.clock.index(start);
        {
            let mut intervals = self
                .intervals
                .lock()
                .expect("no loop panics holding the lock");
            intervals[index].management_calls += 1;
            intervals[index].management_failures += u64::from(outcome.is_err());
        }
        match outcome {
            Ok(value) => {
                let latencies = self
                    .latencies
                    .entry(rpc)
                    .or_insert_with(stats::new_histogram);
                stats::record(latencies, elapsed);
                Ok(value)
            }
            Err(failure) => {
                let failure = Failure::new(format!("{rpc}: {}", failure.kind), failure.detail);
                self.failures.add(failure.clone());
                Err(failure)
            }
        }
    }

    fn admin<T>(&self, message: T) -> tonic::Request<T> {
        authorized(message, self.net.admin_auth.as_ref())
    }

    /// VerifyKey of `key` on `replica`, which must answer `expected`.
    async fn verify(
        &mut self,
        replica: usize,
        key: &IssuedKey,
        expected: pb::VerifyCode,
    ) -> std::result::Result<(), Failure> {
        let start = Instant::now();
        let auth = self.net.verify_auth.clone();
        let answer =
            client::verify_code(&mut self.verifiers[replica], &key.secret, auth.as_ref()).await;
        match &answer {
            Ok(pb::VerifyCode::Valid) => *self.valid.entry(key.key_id.clone()).or_default() += 1,
            Ok(_) => {}
            Err(_) => {
                self.uncertain.insert(key.key_id.clone());
            }
        }
        let outcome = answer.and_then(|code| client::expect_code(code, expected));
        self.record("VerifyKey", start, outcome)
    }

    async fn run(mut self) -> Self {
        let replicas = self.managers.len();
        let mut ticker = tokio::time::interval_at(
            self.clock.start.into(),
            self.every.max(Duration::from_millis(1)),
        );
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if Instant::now() >= self.clock.until {
                break;
            }
            let home = self.cycles as usize % replicas;
            let other = (home + 1) % replicas;
            // A failed step ends its cycle; the failure is already recorded.
            let _ = self.cycle(home, other).await;
            self.cycles += 1;
        }
        self
    }

    /// One cycle: a fresh key is issued on `home`, verified, read and updated across replicas,
    /// rotated with a grace period (both keys VALID), a page of ListKeys read, one key of the
    /// verified set renamed (its cached state is dropped on both replicas while it is under
    /// load), and the fresh key revoked with its successor (both REVOKED on the replica that
    /// revoked them: read your writes).
    async fn cycle(&mut self, home: usize, other: usize) -> std::result::Result<(), Failure> {
        let cycle = self.cycles;

        let start = Instant::now();
        let request = self.admin(pb::IssueKeyRequest {
            workspace_id: WORKSPACE.to_owned(),
            name: format!("loadgen soak churn {cycle}"),
            ..Default::default()
        });
        let outcome = self.managers[home]
            .issue_key(request)
            .await
            .map_err(|status| Failure::rpc(&status))
            .and_then(|response| {
                let response = response.into_inner();
                match response.key {
                    Some(key) if !response.secret.is_empty() => Ok(IssuedKey {
                        key_id: key.key_id,
                        secret: response.secret,
                    }),
                    _ => Err(Failure::new("incomplete answer", "no key or no secret")),
                }
            });
        let key = self.record("IssueKey", start, outcome)?;

        self.verify(other, &key, pb::VerifyCode::Valid).await?;

        let start = Instant::now();
        let request = self.admin(pb::GetKeyRequest {
            workspace_id: WORKSPACE.to_owned(),
            key_id: key.key_id.clone(),
        });
        let outcome = self.managers[other]
            .get_key(request)
            .await
            .map_err(|status| Failure::rpc(&status))
            .and_then(|response| {
                let stored = response.into_inner().key;
                match stored {
                    Some(stored) if stored.state == pb::KeyState::Active as i32 => Ok(stored),
                    other => Err(Failure::new(
                        "not active",
                        format!("state {:?}", other.map(|key| key.state)),
                    )),
                }
            });
        let stored = self.record("GetKey", start, outcome)?;

        let start = Instant::now();
        let description = format!("soak cycle {cycle}");
        let request = self.admin(pb::UpdateKeyRequest {
            key: Some(pb::Key {
                key_id: key.key_id.clone(),
                workspace_id: WORKSPACE.to_owned(),
                description: description.clone(),
                etag: stored.etag,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["description".to_owned()],
            }),
            ..Default::default()
        });
        let outcome = self.managers[home]
            .update_key(request)
            .await
            .map_err(|status| Failure::rpc(&status))
            .and_then(|response| match response.into_inner().key {
                Some(updated) if updated.description == description => Ok(()),
                _ => Err(Failure::new("update not applied", "description differs")),
            });
        self.record("UpdateKey", start, outcome)?;

        let start = Instant::now();
        let request = self.admin(pb::RotateKeyRequest {
            workspace_id: WORKSPACE.to_owned(),
            key_id: key.key_id.clone(),
            grace_period: Some(prost_types::Duration {
                seconds: ROTATION_GRACE.as_secs() as i64,
                nanos: 0,
            }),
            ..Default::default()
        });
        let outcome = self.managers[other]
            .rotate_key(request)
            .await
            .map_err(|status| Failure::rpc(&status))
            .and_then(|response| {
                let response = response.into_inner();
                let successor = response.key.map(|key| key.key_id).unwrap_or_default();
                let linked = response
                    .previous_key
                    .is_some_and(|previous| previous.rotated_to_key_id == successor);
                if successor.is_empty() || response.secret.is_empty() || !linked {
                    return Err(Failure::new(
                        "incomplete answer",
                        "no successor, no secret or no link from the old key",
                    ));
                }
                Ok(IssuedKey {
                    key_id: successor,
                    secret: response.secret,
                })
            });
        let successor = self.record("RotateKey", start, outcome)?;

        self.verify(home, &key, pb::VerifyCode::Valid).await?;
        self.verify(home, &successor, pb::VerifyCode::Valid).await?;

        let start = Instant::now();
        let page_token = std::mem::take(&mut self.list_token);
        let request = self.admin(pb::ListKeysRequest {
            workspace_id: WORKSPACE.to_owned(),
            page_size: LIST_PAGE_SIZE,
            page_token,
            ..Default::default()
        });
        let outcome = self.managers[other]
            .list_keys(request)
            .await
            .map_err(|status| Failure::rpc(&status))
            // A page may be empty: the keys after the last token may all have been revoked.
            .map(|response| response.into_inner().next_page_token);
        self.list_token = self.record("ListKeys", start, outcome)?;

        let start = Instant::now();
        let renamed = self.verified[cycle as usize % self.verified.len()]
            .key_id
            .clone();
        let name = format!("loadgen soak verified (renamed in cycle {cycle})");
        let request = self.admin(pb::UpdateKeyRequest {
            key: Some(pb::Key {
                key_id: renamed,
                workspace_id: WORKSPACE.to_owned(),
                name: name.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["name".to_owned()],
            }),
            ..Default::default()
        });
        let outcome = self.managers[home]
            .update_key(request)
            .await
            .map_err(|status| Failure::rpc(&status))
            .and_then(|response| match response.into_inner().key {
                Some(updated) if updated.name == name => Ok(()),
                _ => Err(Failure::new("update not applied", "name differs")),
            });
        self.record("UpdateKey", start, outcome)?;

        let start = Instant::now();
        let request = self.admin(pb::RevokeKeyRequest {
            workspace_id: WORKSPACE.to_owned(),
            key_id: key.key_id.clone(),
            revoke_successors: true,
            ..Default::default()
        });
        let outcome = self.managers[home]
            .revoke_key(request)
            .await
            .map_err(|status| Failure::rpc(&status))
            .and_then(|response| {
                let response = response.into_inner();
                let revoked = response
                    .key
                    .is_some_and(|key| key.state == pb::KeyState::Revoked as i32);
                let successor_revoked = response.successors.iter().any(|key| {
                    key.key_id == successor.key_id && key.state == pb::KeyState::Revoked as i32
                });
                if revoked && successor_revoked {
                    Ok(())
                } else {
                    Err(Failure::new(
                        "not revoked",
                        "the key or its successor is not REVOKED in the answer",
                    ))
                }
            });
        self.record("RevokeKey", start, outcome)?;

        self.verify(home, &key, pb::VerifyCode::Revoked).await?;
        self.verify(home, &successor, pb::VerifyCode::Revoked)
            .await?;
        Ok(())
    }
}

/// A resident-memory reading of every replica.
struct Sample {
    label: &'static str,
    elapsed: Duration,
    /// One per replica with a pid, in replica order.
    footprints: Vec<Option<Footprint>>,
}

/// Reads every replica's footprint when the load starts, at the end of each interval, in the
/// middle of the run and at its end.
async fn sample_memory(replicas: Vec<Replica>, clock: Clock) -> Vec<Sample> {
    let duration = clock.until - clock.start;
    let middle = duration / 2;
    let mut times: Vec<Duration> = (1..clock.intervals)
        .map(|index| clock.interval * index as u32)
        .chain([Duration::ZERO, middle, duration])
        .collect();
    times.sort();
    times.dedup();
    let mut samples = Vec::with_capacity(times.len());
    for elapsed in times {
        tokio::time::sleep_until((clock.start + elapsed).into()).await;
        let label = if elapsed.is_zero() {
            "start"
        } else if elapsed == middle {
            "middle"
        } else if elapsed == duration {
            "end"
        } else {
            ""
        };
        let footprints = replicas
            .iter()
            .map(|replica| replica.pid.and_then(|pid| footprint(pid).ok()))
            .collect();
        samples.push(Sample {
            label,
            elapsed,
            footprints,
        });
    }
    samples
}

/// How the stored usage compared with the VALID answers seen.
struct UsageCheck {
    keys: usize,
    verified_keys: usize,
    /// Keys whose count is uncertain because one of their calls failed in the RPC; not compared.
    uncertain: usize,
    /// Exact at the first reading, `settle` after the load.
    exact_first: usize,
    /// (key id, VALID answers seen, total_requests stored), after re-reading until the deadline.
    mismatched: Vec<(String, u64, i64)>,
    /// From the end of the load to the reading at which every compared key was exact.
    exact_after: Option<Duration>,
    valid_answers: u64,
}

/// Waits `settle`, then reads every key's `total_requests` (GetKey, replicas in turn) and
/// compares it with `expected`; mismatched keys are read again every second until `deadline`.
async fn check_usage(
    net: &Net,
    managers: &mut [KeyServiceClient<Channel>],
    expected: &BTreeMap<String, u64>,
    uncertain: &HashSet<String>,
    verified_keys: usize,
    load_ended: Instant,
    settings: &SoakSettings,
) -> Result<UsageCheck> {
    tokio::time::sleep(settings.settle).await;
    let deadline = Instant::now() + settings.usage_deadline;
    let mut pending: Vec<(&String, u64)> = expected
        .iter()
        .filter(|(key_id, _)| !uncertain.contains(*key_id))
        .map(|(key_id, count)| (key_id, *count))
        .collect();
    let compared = pending.len();
    let mut first = true;
    let mut exact_first = 0;
    loop {
        let mut mismatched = Vec::new();
        for (turn, (key_id, count)) in pending.iter().enumerate() {
            let replica = turn % managers.len();
            let request = authorized(
                pb::GetKeyRequest {
                    workspace_id: WORKSPACE.to_owned(),
                    key_id: (*key_id).clone(),
                },
                net.admin_auth.as_ref(),
            );
            let stored = managers[replica]
                .get_key(request)
                .await?
                .into_inner()
                .key
                .ok_or("GetKey answered without a key")?;
            if stored.total_requests != *count as i64 {
                mismatched.push((*key_id, *count, stored.total_requests));
            }
        }
        if first {
            exact_first = compared - mismatched.len();
            first = false;
        }
        if mismatched.is_empty() || Instant::now() >= deadline {
            let exact_after = mismatched.is_empty().then(|| load_ended.elapsed());
            return Ok(UsageCheck {
                keys: expected.len(),
                verified_keys,
                uncertain: expected.len() - compared,
                exact_first,
                mismatched: mismatched
                    .into_iter()
                    .map(|(key_id, count, stored)| (key_id.clone(), count, stored))
                    .collect(),
                exact_after,
                valid_answers: expected.values().sum(),
            });
        }
        pending = mismatched
            .into_iter()
            .map(|(key_id, count, _)| (key_id, count))
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Average foreign CPU (% of one core) and the seconds above `busy` % in [from, to) Unix
/// seconds, from the monitor's `<unix seconds> <percent>` lines.
fn foreign_cpu(log: &[(u64, f64)], from: u64, to: u64) -> Option<(f64, usize)> {
    let inside: Vec<f64> = log
        .iter()
        .filter(|(at, _)| *at >= from && *at < to)
        .map(|(_, percent)| *percent)
        .collect();
    if inside.is_empty() {
        return None;
    }
    let busy = inside.iter().filter(|percent| **percent > 15.0).count();
    Some((inside.iter().sum::<f64>() / inside.len() as f64, busy))
}

fn read_cpu_log(path: &PathBuf) -> Vec<(u64, f64)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
        })
        .collect()
}

pub struct SoakReport {
    replicas: Vec<Replica>,
    settings: SoakSettings,
    clock: Clock,
    start_unix: u64,
    intervals: Vec<Interval>,
    samples: Vec<Sample>,
    verify_failures: Failures,
    verify_answers: u64,
    manager: Manager,
    usage: UsageCheck,
    foreign: Vec<(u64, f64)>,
}

pub async fn run(net: &Net, replicas: &[Replica], settings: &SoakSettings) -> Result<SoakReport> {
    if replicas.is_empty() || settings.keys == 0 || settings.verify_loops == 0 {
        return Err("a soak needs at least one replica, one key and one loop".into());
    }
    let mut managers = Vec::new();
    let mut verifiers = Vec::new();
    for replica in replicas {
        let channel = net.connect(&replica.addr).await?;
        managers.push(KeyServiceClient::new(channel.clone()));
        verifiers.push(VerifyServiceClient::new(channel));
    }

    // The verified set: issued round robin, then verified once on every replica, so the load
    // starts warm everywhere. Those VALID answers count too.
    let mut keys = Vec::with_capacity(settings.keys);
    for index in 0..settings.keys {
        let replica = index % replicas.len();
        keys.push(client::issue_key(net, &mut managers[replica], "loadgen soak verified").await?);
    }
    let mut valid_before = vec![0u64; keys.len()];
    for (index, key) in keys.iter().enumerate() {
        for verifier in &mut verifiers {
            let code =
                client::verify_code_patiently(verifier, &key.secret, net.verify_auth.as_ref())
                    .await
                    .map_err(|failure| format!("warm-up VerifyKey failed: {failure:?}"))?;
            client::expect_code(code, pb::VerifyCode::Valid)
                .map_err(|failure| format!("warm-up VerifyKey: {failure:?}"))?;
            valid_before[index] += 1;
        }
    }
    let keys = Arc::new(keys);

    let mut loop_channels = Vec::new();
    for (index, replica) in replicas.iter().enumerate() {
        let loops_here = (settings.verify_loops + replicas.len() - 1 - index) / replicas.len();
        loop_channels.push(net.connect_for_loops(&replica.addr, loops_here).await?);
    }

    let clock = Clock::new(settings.duration, settings.interval);
    let start_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let intervals: Intervals = Arc::new(Mutex::new(
        (0..clock.intervals).map(|_| Interval::new()).collect(),
    ));
    let sampler = tokio::spawn(sample_memory(replicas.to_vec(), clock));
    let loops: Vec<_> = (0..settings.verify_loops)
        .map(|index| {
            let replica = index % replicas.len();
            let channels = &loop_channels[replica];
            let channel = channels[(index / replicas.len()) % channels.len()].clone();
            tokio::spawn(verify_loop(
                VerifyServiceClient::new(channel),
                net.verify_auth.clone(),
                keys.clone(),
                index * keys.len() / settings.verify_loops,
                clock,
                intervals.clone(),
            ))
        })
        .collect();
    let manager = tokio::spawn(
        Manager {
            net: net.clone(),
            every: settings.management_every,
            managers: managers.clone(),
            verifiers,
            verified: keys.clone(),
            valid: HashMap::new(),
            uncertain: HashSet::new(),
            calls: BTreeMap::new(),
            latencies: BTreeMap::new(),
            failures: Failures::default(),
            cycles: 0,
            list_token: String::new(),
            clock,
            intervals: intervals.clone(),
        }
        .run(),
    );

    let mut verify_failures = Failures::default();
    let mut valid = valid_before;
    let mut uncertain = HashSet::new();
    for task in loops {
        let outcome = task.await?;
        for (total, seen) in valid.iter_mut().zip(&outcome.valid) {
            *total += seen;
        }
        verify_failures.merge(outcome.failures);
        uncertain.extend(
            outcome
                .uncertain
                .iter()
                .map(|&key| keys[key].key_id.clone()),
        );
    }
    let manager = manager.await?;
    let load_ended = Instant::now();
    let samples = sampler.await?;

    let mut expected: BTreeMap<String, u64> = keys
        .iter()
        .zip(&valid)
        .map(|(key, count)| (key.key_id.clone(), *count))
        .collect();
    let verify_answers = expected.values().sum::<u64>() - keys.len() as u64 * replicas.len() as u64;
    for (key_id, count) in &manager.valid {
        *expected.entry(key_id.clone()).or_default() += count;
    }
    uncertain.extend(manager.uncertain.iter().cloned());
    let usage = check_usage(
        net,
        &mut managers,
        &expected,
        &uncertain,
        keys.len(),
        load_ended,
        settings,
    )
    .await?;

    let intervals = std::mem::take(&mut *intervals.lock().expect("every loop has ended"));
    let foreign = settings
        .foreign_cpu_log
        .as_ref()
        .map(read_cpu_log)
        .unwrap_or_default();
    let report = SoakReport {
        replicas: replicas.to_vec(),
        settings: settings.clone(),
        clock,
        start_unix,
        intervals,
        samples,
        verify_failures,
        verify_answers,
        manager,
        usage,
        foreign,
    };
    report.print();
    Ok(report)
}

fn mib(footprint: Option<Footprint>) -> String {
    footprint.map_or_else(|| "n/a".to_owned(), |f| format!("{:.1}", f.rss_mib))
}

impl SoakReport {
    fn errors(&self) -> u64 {
        self.verify_failures.total() + self.manager.failures.total()
    }

    /// The footprints of replica `index` labelled `label`.
    fn labelled(&self, label: &str, index: usize) -> Option<Footprint> {
        self.samples
            .iter()
            .find(|sample| sample.label == label)
            .and_then(|sample| sample.footprints[index])
    }

    fn print(&self) {
        let s = &self.settings;
        let names: Vec<&str> = self.replicas.iter().map(|r| r.name.as_str()).collect();
        println!();
        println!(
            "## soak: {} s of VerifyKey load ({} closed loops over replicas {}) and a management \
             cycle every {} ms; {} keys in the verified set",
            s.duration.as_secs(),
            s.verify_loops,
            self.replicas
                .iter()
                .map(|r| format!("{} ({})", r.name, r.addr))
                .collect::<Vec<_>>()
                .join(", "),
            s.management_every.as_millis(),
            s.keys,
        );

        println!();
        println!("| check | result |");
        println!("|---|---|");
        let requests = self.verify_answers
            + self.verify_failures.total()
            + self.manager.calls.values().sum::<u64>();
        println!(
            "| errors (target 0) | {} of {requests} calls: VerifyKey loops {}; management {} |",
            self.errors(),
            self.verify_failures,
            self.manager.failures
        );
        let u = &self.usage;
        println!(
            "| usage exact at the end | {} of {} keys exact ({} of the verified set, {} churn \
             keys; {} VALID answers in all){}{} |",
            u.keys - u.uncertain - u.mismatched.len(),
            u.keys,
            u.verified_keys,
            u.keys - u.verified_keys,
            u.valid_answers,
            match u.exact_after {
                Some(after) => format!(
                    "; {} exact at the first reading, all {:.1} s after the load",
                    u.exact_first,
                    after.as_secs_f64()
                ),
                None => format!("; MISMATCHED: {}", self.mismatch_text()),
            },
            if u.uncertain > 0 {
                format!(
                    "; {} keys not compared (a call of theirs failed)",
                    u.uncertain
                )
            } else {
                String::new()
            },
        );
        for (index, name) in names.iter().enumerate() {
            println!(
                "| resident MiB of {name}, start / middle / end | {} / {} / {} |",
                mib(self.labelled("start", index)),
                mib(self.labelled("middle", index)),
                mib(self.labelled("end", index)),
            );
        }
        if let Some((average, busy)) = foreign_cpu(
            &self.foreign,
            self.start_unix,
            self.start_unix + s.duration.as_secs(),
        ) {
            println!(
                "| CPU used outside the soak | {average:.1} % of a core on average; above 15 % \
                 during {busy} s |"
            );
        }

        println!();
        println!(
            "Per interval of {} s (requests counted in the interval they started in; resident \
             memory at its end):",
            self.clock.interval.as_secs()
        );
        println!();
        let rss_columns: String = names.iter().map(|n| format!(" {n} MiB |")).collect();
        println!(
            "| interval | VerifyKey answers | RPS | p50 µs | p99 µs | p99.9 µs | max µs | \
             management calls | errors | foreign CPU % |{rss_columns}"
        );
        println!(
            "|---|---|---|---|---|---|---|---|---|---|{}",
            "---|".repeat(names.len())
        );
        for (index, interval) in self.intervals.iter().enumerate() {
            let length = self.clock.length(index);
            let summary = Summary::of(&interval.verify, length, interval.verify_failures);
            let from = self.clock.interval * index as u32;
            let foreign = foreign_cpu(
                &self.foreign,
                self.start_unix + from.as_secs(),
                self.start_unix + (from + length).as_secs(),
            )
            .map_or_else(|| "n/a".to_owned(), |(average, _)| format!("{average:.1}"));
            let end = from + length;
            let rss: String = (0..names.len())
                .map(|replica| {
                    let at_end = self
                        .samples
                        .iter()
                        .find(|sample| sample.elapsed == end)
                        .and_then(|sample| sample.footprints[replica]);
                    format!(" {} |", mib(at_end))
                })
                .collect();
            println!(
                "| {}–{} s | {} | {:.0} | {} | {} | {} | {} | {} | {} | {foreign} |{rss}",
                from.as_secs(),
                end.as_secs(),
                summary.count,
                summary.rps,
                us(summary.p50_us),
                us(summary.p99_us),
                us(summary.p999_us),
                us(summary.max_us),
                interval.management_calls,
                interval.verify_failures + interval.management_failures,
            );
        }

        println!();
        println!("Resident memory and threads:");
        println!();
        let columns: String = names
            .iter()
            .map(|n| format!(" {n} MiB | {n} threads |"))
            .collect();
        println!("| when | s |{columns}");
        println!("|---|---|{}", "---|---|".repeat(names.len()));
        for sample in &self.samples {
            let cells: String = sample
                .footprints
                .iter()
                .map(|footprint| {
                    format!(
                        " {} | {} |",
                        mib(*footprint),
                        footprint.map_or_else(|| "n/a".to_owned(), |f| f.threads.to_string())
                    )
                })
                .collect();
            println!("| {} | {} |{cells}", sample.label, sample.elapsed.as_secs());
        }

        let m = &self.manager;
        println!();
        println!(
            "Management: {} cycles started, one every {} ms at most (a cycle that takes longer \
             delays the next):",
            m.cycles,
            s.management_every.as_millis()
        );
        println!();
        println!("| RPC | calls | p50 µs | p99 µs | max µs |");
        println!("|---|---|---|---|---|");
        for (rpc, calls) in &m.calls {
            let summary = m.latencies.get(rpc).map_or_else(
                || Summary::of(&stats::new_histogram(), Duration::ZERO, 0),
                |latencies| Summary::of(latencies, Duration::ZERO, 0),
            );
            println!(
                "| {rpc} | {calls} | {} | {} | {} |",
                us(summary.p50_us),
                us(summary.p99_us),
                us(summary.max_us)
            );
        }
        println!();
        println!(
            "(VerifyKey here is the management cycle's own: the first verify of a fresh key on a \
             replica runs argon2, which yields the CPU to the warm load at nice 19.)"
        );
    }

    fn mismatch_text(&self) -> String {
        let mismatched = &self.usage.mismatched;
        let shown: Vec<String> = mismatched
            .iter()
            .take(5)
            .map(|(key_id, seen, stored)| format!("{key_id} saw {seen} stored {stored}"))
            .collect();
        format!(
            "{} keys ({}{})",
            mismatched.len(),
            shown.join(", "),
            if mismatched.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        )
    }

    pub fn targets(&self) -> Vec<TargetLine> {
        let mut lines = vec![TargetLine {
            target: "soak: no failed call and no wrong answer".to_owned(),
            measured: format!("{} errors", self.errors()),
            met: self.errors() == 0,
            margin: if self.errors() == 0 {
                "none".to_owned()
            } else {
                format!("{} over", self.errors())
            },
        }];
        let u = &self.usage;
        let exact = u.mismatched.is_empty() && u.uncertain == 0;
        lines.push(TargetLine {
            target: "soak: every key's total_requests = the VALID answers seen for it".to_owned(),
            measured: format!(
                "{} of {} keys exact",
                u.keys - u.uncertain - u.mismatched.len(),
                u.keys
            ),
            met: exact,
            margin: if exact {
                "exact".to_owned()
            } else {
                format!(
                    "{} mismatched, {} not compared",
                    u.mismatched.len(),
                    u.uncertain
                )
            },
        });
        for (index, replica) in self.replicas.iter().enumerate() {
            let target = format!(
                "soak: resident memory of {} flat (end ≤ middle + {FLAT_MIB} MiB)",
                replica.name
            );
            let (Some(start), Some(middle), Some(end)) = (
                self.labelled("start", index),
                self.labelled("middle", index),
                self.labelled("end", index),
            ) else {
                lines.push(TargetLine::not_measured(
                    &target,
                    "no pid, or /proc unreadable",
                ));
                continue;
            };
            lines.push(TargetLine::at_most(
                &target,
                end.rss_mib - middle.rss_mib,
                FLAT_MIB,
                "MiB",
                format!(
                    "{:.1} → {:.1} → {:.1} MiB",
                    start.rss_mib, middle.rss_mib, end.rss_mib
                ),
            ));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_splits_the_run_into_intervals() {
        let clock = Clock::new(Duration::from_secs(150), Duration::from_secs(60));
        assert_eq!(clock.intervals, 3);
        assert_eq!(clock.index(clock.start), 0);
        assert_eq!(clock.index(clock.start + Duration::from_secs(60)), 1);
        // Requests that start after the end still land in the last interval.
        assert_eq!(clock.index(clock.start + Duration::from_secs(500)), 2);
        assert_eq!(clock.length(0), Duration::from_secs(60));
        assert_eq!(clock.length(2), Duration::from_secs(30));
    }

    #[test]
    fn foreign_cpu_averages_the_seconds_inside() {
        let log = [(9, 100.0), (10, 10.0), (11, 30.0), (12, 50.0)];
        let (average, busy) = foreign_cpu(&log, 10, 12).expect("two seconds inside");
        assert!((average - 20.0).abs() < 1e-9);
        assert_eq!(busy, 1);
        assert!(foreign_cpu(&log, 20, 30).is_none());
    }
}
