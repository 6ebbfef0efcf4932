//! A database outage, for real: the PostgreSQL server is stopped (a fast shutdown) under the
//! service and started again. Cold keys and management calls get UNAVAILABLE with a RetryInfo
//! before their deadline; warm keys are served within `--stale-if-error` of their last
//! confirmation, then get UNAVAILABLE too (and never with `--stale-if-error 0`); health goes
//! NOT_SERVING and back; everything recovers without a restart, and no usage is lost or counted
//! twice. PostgreSQL only: it has a server to lose.

use std::time::{Duration, Instant};

use key_authority::config::Config;
use key_authority::pb;
use tonic::Code;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;

use crate::common::{Backend, TestApp, TestDb, key_of, reason, test_config};
use crate::postgres_cluster::{Cluster, private_cluster};

/// How long an awaited change may take: far more than it ever should.
const PATIENCE: Duration = Duration::from_secs(30);
/// Long enough for a stop of the server on a loaded machine to fit in it.
const STALE_IF_ERROR: Duration = Duration::from_secs(6);

fn outage_config(url: &str, stale_if_error: Duration) -> Config {
    let mut config = test_config(&TestDb {
        backend: Backend::Postgres,
        url: url.to_owned(),
        dir: None,
    });
    // Entries are fresh for a moment only, so the outage is met by reads, not by the TTL.
    config.verify.state_ttl = Duration::from_millis(200);
    config.verify.stale_if_error = stale_if_error;
    config.health_check_interval = Duration::from_millis(200);
    config.usage.flush_interval = Duration::from_millis(100);
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config
}

/// Shorter than the pool's 5 s acquire timeout: the answer must come before it (with room for
/// a machine whose 2 cores other builds share).
const DEADLINE: Duration = Duration::from_secs(2);
/// The same under continuous load, on a machine whose 2 cores other builds share.
const LOADED_DEADLINE: Duration = Duration::from_secs(3);

fn verify_request(key: &str) -> tonic::Request<pb::VerifyKeyRequest> {
    verify_request_within(key, DEADLINE)
}

fn verify_request_within(key: &str, deadline: Duration) -> tonic::Request<pb::VerifyKeyRequest> {
    let mut request = tonic::Request::new(pb::VerifyKeyRequest {
        key: key.to_owned(),
        ..Default::default()
    });
    request.set_timeout(deadline);
    request
}

async fn verify(app: &TestApp, key: &str) -> Result<pb::VerifyKeyResponse, tonic::Status> {
    app.verify
        .clone()
        .verify_key(verify_request(key))
        .await
        .map(tonic::Response::into_inner)
}

fn assert_unavailable(status: &tonic::Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(status), "DATABASE_UNAVAILABLE", "{status:?}");
    assert!(
        status
            .get_details_retry_info()
            .and_then(|info| info.retry_delay)
            .is_some(),
        "says when to retry"
    );
}

/// Waits for the health status of VerifyService to become `wanted`.
async fn await_health(app: &TestApp, wanted: ServingStatus) {
    let mut health = HealthClient::new(app.channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "keyauthority.v1.VerifyService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(PATIENCE, async {
        while let Some(status) = watch.message().await.unwrap() {
            if status.status == wanted as i32 {
                return;
            }
        }
        panic!("the health watch ended");
    })
    .await
    .expect("the health status changes in time");
}

/// Stops the database server (off the runtime's threads: it blocks until the server is gone).
async fn stop_server(cluster: &Cluster) {
    tokio::task::block_in_place(|| cluster.stop());
}

async fn start_server(cluster: &Cluster) {
    tokio::task::block_in_place(|| cluster.start_again());
}

async fn stored_requests(app: &mut TestApp, key_id: &str) -> i64 {
    app.get("acme", key_id)
        .await
        .expect("GetKey")
        .total_requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_fast_serves_warm_keys_for_a_bounded_time_and_recovers() {
    let Some(cluster) = private_cluster() else {
        return;
    };
    let url = cluster.create_database().await;
    let mut lenient = TestApp::spawn_with(outage_config(&url, STALE_IF_ERROR)).await;
    let mut strict = TestApp::spawn_with(outage_config(&url, Duration::ZERO)).await;
    let warm = lenient.issue("acme", "warm").await;
    let warm_id = key_of(&warm).key_id.clone();
    let cold = lenient.issue("acme", "cold").await;
    let mut valid_answers = 0;
    // The warm key's last confirmation from the database comes after this instant.
    let before_confirmation = Instant::now();
    for app in [&mut lenient, &mut strict] {
        assert!(app.verify_key(&warm.secret, &[]).await.valid);
        valid_answers += 1;
    }

    stop_server(&cluster).await;
    let outage = Instant::now();

    // A warm key: served from its last confirmed state by the lenient replica...
    let answer = verify(&lenient, &warm.secret).await.expect("served stale");
    assert!(answer.valid);
    valid_answers += 1;
    // ... never by the strict one.
    // (Until its state is no longer fresh: the state TTL, or the listener noticing the outage.)
    let deadline = Instant::now() + PATIENCE;
    loop {
        match verify(&strict, &warm.secret).await {
            Ok(answer) => {
                assert!(answer.valid && Instant::now() < deadline, "still fresh");
                valid_answers += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => {
                assert_unavailable(&status);
                break;
            }
        }
    }
    // A cold key: no verdict without the database, and an answer before the 1 s deadline.
    assert_unavailable(&verify(&lenient, &cold.secret).await.unwrap_err());
    // Management calls: UNAVAILABLE, nothing done.
    let mut issue = tonic::Request::new(pb::IssueKeyRequest {
        workspace_id: "acme".into(),
        name: "during the outage".into(),
        ..Default::default()
    });
    issue.set_timeout(DEADLINE);
    assert_unavailable(&lenient.keys.issue_key(issue).await.unwrap_err());
    let mut get = tonic::Request::new(pb::GetKeyRequest {
        workspace_id: "acme".into(),
        key_id: warm_id.clone(),
    });
    get.set_timeout(DEADLINE);
    assert_unavailable(&lenient.keys.get_key(get).await.unwrap_err());
    await_health(&lenient, ServingStatus::NotServing).await;

    // Once the database is known to be down, refusals are immediate.
    let started = Instant::now();
    assert_unavailable(&verify(&lenient, &cold.secret).await.unwrap_err());
    let fast = started.elapsed();

    let text = crate::observability::scrape(lenient.server.metrics_addr.unwrap()).await;
    let samples = crate::observability::samples(&text);
    assert_eq!(samples["key_authority_db_unreachable"], 1.0);

    // The warm key, again and again, until its window closes: then UNAVAILABLE.
    let closed = loop {
        match verify(&lenient, &warm.secret).await {
            Ok(answer) => {
                assert!(answer.valid, "stale answers are the last confirmed state");
                valid_answers += 1;
                // The last confirmation came before the outage.
                assert!(
                    outage.elapsed() < STALE_IF_ERROR + Duration::from_millis(500),
                    "served past its window"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => {
                assert_unavailable(&status);
                break before_confirmation.elapsed();
            }
        }
    };
    assert!(
        closed >= STALE_IF_ERROR,
        "the window closed early: {closed:?}"
    );
    // Counted (the first answers after the stop may still have been fresh ones: within the state
    // TTL, before the listener noticed the outage; the later ones in the window were stale).
    let text = crate::observability::scrape(lenient.server.metrics_addr.unwrap()).await;
    let stale = crate::observability::samples(&text)["key_authority_state_stale_answers_total"];
    assert!(stale >= 1.0, "stale answers counted: {stale}");

    start_server(&cluster).await;
    await_health(&lenient, ServingStatus::Serving).await;
    await_health(&strict, ServingStatus::Serving).await;
    // Everything works again, without a restart.
    let deadline = Instant::now() + PATIENCE;
    let recovered = loop {
        match verify(&lenient, &cold.secret).await {
            Ok(answer) => break answer,
            Err(status) => {
                assert_unavailable(&status);
                assert!(Instant::now() < deadline, "no recovery");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(recovered.valid);
    valid_answers += 1;
    assert!(verify(&strict, &warm.secret).await.unwrap().valid);
    valid_answers += 1;
    lenient.issue("acme", "after the outage").await;

    // Every VALID answer, the stale ones included, is counted once (written when the database
    // came back).
    let expected_warm = valid_answers - 1;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let counted = stored_requests(&mut lenient, &warm_id).await
            + stored_requests(&mut lenient, &key_of(&cold).key_id).await;
        if counted == valid_answers {
            break;
        }
        assert!(counted < valid_answers, "usage counted twice: {counted}");
        assert!(
            Instant::now() < deadline,
            "usage lost: {counted} of {valid_answers}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stored_requests(&mut lenient, &warm_id).await, expected_warm);
    eprintln!("refusal once known down: {fast:?}; window closed after {closed:?}");
    lenient.stop().await;
    strict.stop().await;
    stop_server(&cluster).await;
}

/// Without its database at start-up the server does not start half-way: it exits non-zero at
/// once, saying which database it could not reach and why (never the password), so that its
/// supervisor restarts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_its_database_exits_saying_why() {
    let nothing_listens = crate::binary::free_port();
    let child = std::process::Command::new(crate::binary::BINARY)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env(
            "DATABASE_URL",
            format!("postgres://keys:pw-never-logged@127.0.0.1:{nothing_listens}/keys"),
        )
        .env("KEY_AUTHORITY_ADMIN_TOKEN", "outage-test-admin")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exit = tokio::time::timeout(
        PATIENCE,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("the server gives up in time")
    .unwrap()
    .unwrap();
    assert!(!exit.status.success());
    let stderr = String::from_utf8_lossy(&exit.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot connect to PostgreSQL at 127.0.0.1:{nothing_listens}"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(!stderr.contains("pw-never-logged"), "{stderr}");
}

/// What the load loops saw.
#[derive(Default)]
struct Seen {
    valid: std::sync::atomic::AtomicI64,
    unavailable: std::sync::atomic::AtomicI64,
    other: std::sync::Mutex<Vec<String>>,
    issued: std::sync::Mutex<Vec<String>>,
}

/// VerifyKey and IssueKey run without pause while the database is stopped and started again:
/// every answer is a correct verdict, a successful issue, or UNAVAILABLE before the deadline;
/// nothing else, no acknowledged key lost, every VALID answer counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_through_an_outage_gets_verdicts_or_unavailable() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let Some(cluster) = private_cluster() else {
        return;
    };
    let url = cluster.create_database().await;
    let mut app = TestApp::spawn_with(outage_config(&url, STALE_IF_ERROR)).await;
    let mut keys = Vec::new();
    for index in 0..3 {
        let issued = app.issue("acme", &format!("loaded {index}")).await;
        keys.push((key_of(&issued).key_id.clone(), issued.secret));
    }
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for (_, secret) in keys.clone() {
        let (client, seen, stop) = (app.verify.clone(), seen.clone(), stop.clone());
        loops.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client
                    .clone()
                    .verify_key(verify_request_within(&secret, LOADED_DEADLINE))
                    .await
                {
                    Ok(answer) if answer.get_ref().valid => {
                        seen.valid.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status)
                        if status.code() == Code::Unavailable
                            && reason(&status) == "DATABASE_UNAVAILABLE" =>
                    {
                        seen.unavailable.fetch_add(1, Ordering::Relaxed);
                    }
                    other => seen.other.lock().unwrap().push(format!("{other:?}")),
                }
            }
        }));
    }
    {
        let (client, seen, stop) = (app.keys.clone(), seen.clone(), stop.clone());
        loops.push(tokio::spawn(async move {
            let mut index = 0;
            while !stop.load(Ordering::Relaxed) {
                index += 1;
                let mut request = tonic::Request::new(pb::IssueKeyRequest {
                    workspace_id: "acme".into(),
                    name: format!("issued under load {index}"),
                    ..Default::default()
                });
                request.set_timeout(LOADED_DEADLINE);
                match client.clone().issue_key(request).await {
                    Ok(issued) => seen
                        .issued
                        .lock()
                        .unwrap()
                        .push(issued.into_inner().key.unwrap().key_id),
                    Err(status)
                        if status.code() == Code::Unavailable
                            && reason(&status) == "DATABASE_UNAVAILABLE" => {}
                    Err(status) => seen.other.lock().unwrap().push(format!("{status:?}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let at_least = |count: &std::sync::atomic::AtomicI64, floor: i64| {
        let count = count.load(Ordering::Relaxed);
        count >= floor
    };
    let await_count = async |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + PATIENCE;
        while !done() {
            assert!(Instant::now() < deadline, "{what} in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    await_count("VALID answers before the outage", &|| {
        at_least(&seen.valid, 50)
    })
    .await;
    stop_server(&cluster).await;
    await_count("UNAVAILABLE answers during the outage", &|| {
        at_least(&seen.unavailable, 50)
    })
    .await;
    start_server(&cluster).await;
    await_health(&app, ServingStatus::Serving).await;
    let valid_after_restart = seen.valid.load(Ordering::Relaxed) + 50;
    await_count("VALID answers after the outage", &|| {
        at_least(&seen.valid, valid_after_restart)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in loops {
        task.await.unwrap();
    }

    let other = seen.other.lock().unwrap().clone();
    assert!(
        other.is_empty(),
        "answers other than a verdict or UNAVAILABLE: {other:?}"
    );
    let issued = seen.issued.lock().unwrap().clone();
    for key_id in issued {
        app.get("acme", &key_id)
            .await
            .expect("an acknowledged key is stored");
    }
    let valid = seen.valid.load(Ordering::Relaxed);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut counted = 0;
        for (key_id, _) in &keys {
            counted += stored_requests(&mut app, key_id).await;
        }
        if counted == valid {
            break;
        }
        assert!(counted < valid, "usage counted twice: {counted} of {valid}");
        assert!(
            Instant::now() < deadline,
            "usage lost: {counted} of {valid}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
    stop_server(&cluster).await;
}
