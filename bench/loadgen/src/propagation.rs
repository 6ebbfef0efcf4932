//! Propagation between replicas: revoke on A, then poll B with VerifyKey until it answers
//! REVOKED, timing from the moment RevokeKey returned on A; and, in the same rounds, the
//! `key.revoked` event's arrival on a WatchKeyEvents stream opened on B (live delivery).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use key_authority::pb;
use key_authority::pb::key_service_client::KeyServiceClient;
use key_authority::pb::verify_service_client::VerifyServiceClient;

use crate::client::{self, Net, Result};
use crate::report::TargetLine;
use crate::stats::{self, Failure, Failures, Summary, us};

#[derive(Debug, Clone, Copy)]
pub struct PropagationSettings {
    pub rounds: usize,
    /// Give up on one round (and count it as a failure) after this long.
    pub round_timeout: Duration,
    /// Stop starting new rounds after this long in total.
    pub time_budget: Duration,
}

pub struct PropagationReport {
    pub requested_rounds: usize,
    pub summary: Summary,
    /// From RevokeKey's return on A to the `key.revoked` event on B's watch stream.
    pub events: Summary,
    pub failures: Failures,
    pub polls: u64,
    pub stopped_by_budget: bool,
}

pub async fn run(
    net: &Net,
    target: &str,
    replica: &str,
    settings: PropagationSettings,
) -> Result<PropagationReport> {
    let mut manager = KeyServiceClient::new(net.connect(target).await?);
    let mut replica_verifier = VerifyServiceClient::new(net.connect(replica).await?);
    let arrivals = watch_revocations(net, replica).await?;
    let mut revoked_at_by_key = HashMap::new();
    let mut latencies = stats::new_histogram();
    let mut failures = Failures::default();
    let mut polls = 0u64;
    let started = Instant::now();
    let mut stopped_by_budget = false;
    for _ in 0..settings.rounds {
        if started.elapsed() >= settings.time_budget {
            stopped_by_budget = true;
            break;
        }
        let key = client::issue_key(net, &mut manager, "loadgen propagation").await?;
        // B must know the key as VALID first: its state and verdict are then cached.
        match client::verify_code(&mut replica_verifier, &key.secret, net.verify_auth.as_ref())
            .await
        {
            Ok(pb::VerifyCode::Valid) => {}
            Ok(code) => {
                failures.add(Failure::new(
                    format!("before revoke: code {code:?}"),
                    "expected Valid on the replica",
                ));
                continue;
            }
            Err(failure) => {
                failures.add(failure);
                continue;
            }
        }
        client::revoke_key(net, &mut manager, &key.key_id).await?;
        let revoked_at = Instant::now();
        revoked_at_by_key.insert(key.key_id.clone(), revoked_at);
        loop {
            let outcome =
                client::verify_code(&mut replica_verifier, &key.secret, net.verify_auth.as_ref())
                    .await;
            polls += 1;
            match outcome {
                Ok(pb::VerifyCode::Revoked) => {
                    stats::record(&mut latencies, revoked_at.elapsed());
                    break;
                }
                Ok(pb::VerifyCode::Valid) => {}
                Ok(code) => {
                    failures.add(Failure::new(
                        format!("after revoke: code {code:?}"),
                        "expected Valid then Revoked",
                    ));
                    break;
                }
                Err(failure) => {
                    failures.add(failure);
                    break;
                }
            }
            if revoked_at.elapsed() >= settings.round_timeout {
                failures.add(Failure::new(
                    "still VALID at round timeout",
                    format!("{:?}", settings.round_timeout),
                ));
                break;
            }
        }
    }
    // Events still on their way get a moment; a missing one counts as a failure of its own.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let arrived = arrivals.lock().expect("the watcher never panics").clone();
    let mut event_latencies = stats::new_histogram();
    let mut missing_events = 0;
    for (key_id, revoked_at) in &revoked_at_by_key {
        match arrived.get(key_id) {
            // An event can arrive before RevokeKey's answer does: that is no delay at all.
            Some(at) => stats::record(
                &mut event_latencies,
                at.saturating_duration_since(*revoked_at),
            ),
            None => missing_events += 1,
        }
    }
    let report = PropagationReport {
        requested_rounds: settings.rounds,
        summary: Summary::of(&latencies, Duration::ZERO, failures.total()),
        events: Summary::of(&event_latencies, Duration::ZERO, missing_events),
        failures,
        polls,
        stopped_by_budget,
    };
    report.print(target, replica, settings);
    Ok(report)
}

/// Watches every workspace's events on `replica` from now on, and records when each
/// `key.revoked` arrived, by key id.
async fn watch_revocations(
    net: &Net,
    replica: &str,
) -> Result<Arc<Mutex<HashMap<String, Instant>>>> {
    let mut watcher = KeyServiceClient::new(net.connect(replica).await?);
    let request = pb::WatchKeyEventsRequest {
        from_now: true,
        all_workspaces: true,
        ..Default::default()
    };
    let mut stream = watcher
        .watch_key_events(client::authorized(request, net.admin_auth.as_ref()))
        .await?
        .into_inner();
    let arrivals = Arc::new(Mutex::new(HashMap::new()));
    let recorded = arrivals.clone();
    tokio::spawn(async move {
        while let Ok(Some(response)) = stream.message().await {
            let arrived = Instant::now();
            if let Some(event) = response.event
                && event.r#type == "key.revoked"
            {
                recorded
                    .lock()
                    .expect("the recorder never panics")
                    .insert(event.key_id, arrived);
            }
        }
    });
    Ok(arrivals)
}

impl PropagationReport {
    fn print(&self, target: &str, replica: &str, settings: PropagationSettings) {
        let s = &self.summary;
        println!();
        println!(
            "## propagation: RevokeKey on {target}, then VerifyKey on {replica} in a tight loop \
             until REVOKED, timed from RevokeKey's return"
        );
        println!();
        println!(
            "| rounds measured | p50 µs | p99 µs | max µs | mean µs | polls per round | failures |"
        );
        println!("|---|---|---|---|---|---|---|");
        let rounds = s.count + s.failures;
        println!(
            "| {} of {} | {} | {} | {} | {} | {:.1} | {} |",
            s.count,
            self.requested_rounds,
            us(s.p50_us),
            us(s.p99_us),
            us(s.max_us),
            us(s.mean_us),
            self.polls as f64 / rounds.max(1) as f64,
            self.failures
        );
        let e = &self.events;
        println!();
        println!(
            "Live event delivery: `key.revoked` on a WatchKeyEvents stream opened on {replica}, \
             timed from RevokeKey's return on {target}:"
        );
        println!();
        println!("| events measured | p50 µs | p99 µs | max µs | mean µs | missing |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            e.count,
            us(e.p50_us),
            us(e.p99_us),
            us(e.max_us),
            us(e.mean_us),
            e.failures
        );
        if self.stopped_by_budget {
            println!();
            println!(
                "Stopped early: the time budget of {:?} ran out after {rounds} rounds.",
                settings.time_budget
            );
        }
    }

    pub fn targets(&self) -> Vec<TargetLine> {
        let mut lines = Vec::new();
        if self.failures.total() > 0 {
            lines.push(TargetLine::not_measured(
                "every propagation round ends REVOKED",
                &self.failures.to_string(),
            ));
        }
        lines.push(TargetLine::at_most(
            "live event delivery p99 <= 10 ms",
            self.events.p99_us / 1000.0,
            10.0,
            "ms",
            format!(
                "p99 {} µs over {} events ({} missing, max {} µs)",
                us(self.events.p99_us),
                self.events.count,
                self.events.failures,
                us(self.events.max_us)
            ),
        ));
        lines.push(TargetLine::at_most(
            "revocation propagation p99 <= 10 ms",
            self.summary.p99_us / 1000.0,
            10.0,
            "ms",
            format!(
                "p99 {} µs over {} rounds (max {} µs)",
                us(self.summary.p99_us),
                self.summary.count,
                us(self.summary.max_us)
            ),
        ));
        lines
    }
}
