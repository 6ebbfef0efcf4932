//! Overload: calls over the concurrency limit are refused at once (UNAVAILABLE, OVERLOADED)
//! rather than queued, grpc.health keeps answering meanwhile, and the caller's deadline
//! (`grpc-timeout`) is honoured with DEADLINE_EXCEEDED.

use std::net::SocketAddr;
use std::time::Instant;

use key_authority::key::HashParams;
use key_authority::pb;
use key_authority::server::Config;
use prost::Message;
use prost::bytes::Bytes;
use tokio::task::JoinSet;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

use crate::common::{ADMIN_TOKEN, TestApp, TestDb, on_both_databases, reason, test_config};
use crate::observability::{samples, scrape};

/// argon2 costly enough that every IssueKey takes 100 ms or more (64 MiB, 3 passes: ~120 ms on
/// a free core), with metrics served.
fn slow_config(db: &TestDb) -> Config {
    let mut config = test_config(db);
    config.hash_params = HashParams {
        memory_kib: 64 * 1024,
        iterations: 3,
        parallelism: 1,
    };
    config.argon2_threads = 2;
    config.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config
}

fn issue_request(workspace_id: &str, name: &str) -> pb::IssueKeyRequest {
    pb::IssueKeyRequest {
        workspace_id: workspace_id.to_owned(),
        name: name.to_owned(),
        ..Default::default()
    }
}

fn assert_overloaded(status: &tonic::Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(status), "OVERLOADED");
    assert!(
        status
            .get_details_retry_info()
            .and_then(|info| info.retry_delay)
            .is_some(),
        "an OVERLOADED refusal says when to retry"
    );
}

fn assert_deadline_exceeded(status: &tonic::Status) {
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(reason(status), "DEADLINE_EXCEEDED");
}

async fn metric(address: SocketAddr, name: &str) -> f64 {
    samples(&scrape(address).await)
        .get(name)
        .copied()
        .unwrap_or(0.0)
}

async fn over_the_limit_calls_are_refused_at_once_while_health_answers(db: TestDb) {
    const LIMIT: usize = 2;
    const CALLS: usize = 20;
    let mut config = slow_config(&db);
    config.overload.max_concurrent_requests = LIMIT;
    let app = TestApp::spawn_with(config).await;
    let metrics = app.server.metrics_addr.expect("metrics are served");

    let mut calls = JoinSet::new();
    for index in 0..CALLS {
        let mut keys = app.keys.clone();
        calls.spawn(async move {
            let answer = keys
                .issue_key(issue_request("busy", &format!("key-{index}")))
                .await
                .map(drop);
            (answer, Instant::now())
        });
    }
    // The first answer is a refusal: the limit was full of slow calls at that moment.
    let (first, first_at) = calls.join_next().await.unwrap().unwrap();
    assert_overloaded(&first.expect_err("the first answer is a refusal"));
    // Health answers while those slow calls run (checked below: before any of them finished).
    let health = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("health answers under overload")
        .into_inner();
    let health_at = Instant::now();
    assert_eq!(health.status, ServingStatus::Serving as i32);

    let mut refused_at = vec![first_at];
    let mut succeeded_at = Vec::new();
    while let Some(joined) = calls.join_next().await {
        let (answer, at) = joined.unwrap();
        match answer {
            Ok(()) => succeeded_at.push(at),
            Err(status) => {
                assert_overloaded(&status);
                refused_at.push(at);
            }
        }
    }
    // The calls that got in all finished; the rest were refused, not queued behind them.
    assert!(
        succeeded_at.len() >= LIMIT,
        "{} succeeded",
        succeeded_at.len()
    );
    assert!(
        refused_at.len() >= CALLS / 2,
        "{} refused",
        refused_at.len()
    );
    let first_success = *succeeded_at.iter().min().unwrap();
    let last_refusal = *refused_at.iter().max().unwrap();
    assert!(
        last_refusal < first_success,
        "every refusal came back before the first admitted call finished"
    );
    assert!(
        health_at < first_success,
        "health answered during the overload"
    );

    let refusals = metric(
        metrics,
        r#"key_authority_grpc_server_refusals_total{reason="OVERLOADED"}"#,
    )
    .await;
    assert_eq!(refusals, refused_at.len() as f64);
    let unavailable = metric(
        metrics,
        r#"key_authority_grpc_server_requests_total{method="/keyauthority.v1.KeyService/IssueKey",code="UNAVAILABLE"}"#,
    )
    .await;
    assert_eq!(unavailable, refused_at.len() as f64);
    app.stop().await;
}

/// One unary call over a bare HTTP/2 connection, with the `grpc-timeout` header the test chooses.
/// (A tonic client enforces that deadline itself and would give up before the server answered.)
async fn call_with_grpc_timeout(
    address: SocketAddr,
    path: &str,
    message: &impl Message,
    grpc_timeout: &str,
) -> tonic::Status {
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{address}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .header("grpc-timeout", grpc_timeout)
        .body(())
        .unwrap();
    let (response, mut request_body) = client.send_request(request, false).unwrap();
    let encoded = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(encoded.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&encoded);
    request_body.send_data(Bytes::from(frame), true).unwrap();
    let (parts, mut body) = response.await.unwrap().into_parts();
    // A refusal comes "trailers-only": its status is in the headers.
    if let Some(status) = tonic::Status::from_header_map(&parts.headers) {
        return status;
    }
    while let Some(data) = body.data().await {
        data.unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    tonic::Status::from_header_map(&trailers).expect("a grpc-status")
}

async fn list_names(app: &TestApp, workspace_id: &str) -> Vec<String> {
    app.keys
        .clone()
        .list_keys(pb::ListKeysRequest {
            workspace_id: workspace_id.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|key| key.name)
        .collect()
}

const ISSUE_KEY: &str = "/keyauthority.v1.KeyService/IssueKey";

async fn a_call_whose_deadline_has_passed_is_not_worked_on(db: TestDb) {
    let app = TestApp::spawn_with(slow_config(&db)).await;
    let metrics = app.server.metrics_addr.expect("metrics are served");
    let hashes_before = app.server.verifier.hash_pool().stats();

    let status = call_with_grpc_timeout(
        app.server.local_addr,
        ISSUE_KEY,
        &issue_request("late", "never"),
        "0n",
    )
    .await;

    assert_deadline_exceeded(&status);
    let hashes = app.server.verifier.hash_pool().stats();
    assert_eq!(hashes.runs, hashes_before.runs, "no argon2 ran");
    assert_eq!(hashes.in_flight, 0, "no argon2 is queued or running");
    assert!(list_names(&app, "late").await.is_empty());
    let refusals = metric(
        metrics,
        r#"key_authority_grpc_server_refusals_total{reason="DEADLINE_EXCEEDED"}"#,
    )
    .await;
    assert_eq!(refusals, 1.0);
    app.stop().await;
}

async fn a_running_call_is_dropped_when_its_deadline_passes(db: TestDb) {
    let app = TestApp::spawn_with(slow_config(&db)).await;
    let address = app.server.local_addr;

    // The same slow call twice at once: one with a 20 ms deadline, one with none.
    let mut keys = app.keys.clone();
    let unbounded = tokio::spawn(async move {
        let answer = keys.issue_key(issue_request("patient", "kept")).await;
        (answer, Instant::now())
    });
    let status = call_with_grpc_timeout(
        address,
        ISSUE_KEY,
        &issue_request("hasty", "dropped"),
        "20m",
    )
    .await;
    let deadline_answered_at = Instant::now();
    let (answer, unbounded_at) = unbounded.await.unwrap();

    assert_deadline_exceeded(&status);
    answer.expect("the call without a deadline succeeds");
    assert!(
        deadline_answered_at < unbounded_at,
        "the deadline's answer came before the same work without a deadline finished"
    );
    // Dropped, not finished in the background: its key was never stored.
    assert!(list_names(&app, "hasty").await.is_empty());
    assert_eq!(list_names(&app, "patient").await, ["kept"]);
    app.stop().await;
}

/// The server advertises its cap on concurrent streams per connection in its HTTP/2 SETTINGS.
async fn each_connection_gets_a_capped_number_of_streams(db: TestDb) {
    let mut config = test_config(&db);
    config.overload.max_concurrent_streams = 3;
    let app = TestApp::spawn_with(config).await;

    let tcp = tokio::net::TcpStream::connect(app.server.local_addr)
        .await
        .unwrap();
    let (client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    // One exchange, so that the server's SETTINGS have been received and acknowledged.
    let exchange = async {
        let mut client = client.ready().await.unwrap();
        let request = http::Request::post(format!(
            "http://{}/grpc.health.v1.Health/Check",
            app.server.local_addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        response.await.unwrap()
    };
    let response = tokio::select! {
        response = exchange => response,
        ended = &mut connection => panic!("connection ended first: {ended:?}"),
    };

    assert_eq!(response.status(), http::StatusCode::OK);
    assert_eq!(connection.max_concurrent_send_streams(), 3);
    drop(connection);
    app.stop().await;
}

on_both_databases!(
    each_connection_gets_a_capped_number_of_streams,
    over_the_limit_calls_are_refused_at_once_while_health_answers,
    a_call_whose_deadline_has_passed_is_not_worked_on,
    a_running_call_is_dropped_when_its_deadline_passes,
);
