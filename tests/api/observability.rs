//! Traces, metrics, logs and health: what an operator runs on.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use key_authority::pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::binary::{BINARY, connect, free_port};
use crate::common::{TestApp, TestDb, code, keys_as, on_both_databases, test_config};

/// A real OTLP trace receiver: the collector's TraceService, forwarding every span it gets.
struct Receiver(mpsc::UnboundedSender<Span>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let _ = self.0.send(span);
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The real binary exporting traces to a real OTLP receiver, always sampling a sampled caller's
/// trace, with one key issued.
struct TracedServer {
    spans: mpsc::UnboundedReceiver<Span>,
    collector: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    child: std::process::Child,
    channel: tonic::transport::Channel,
    issued: pb::IssueKeyResponse,
    _dir: tempfile::TempDir,
}

impl TracedServer {
    async fn start(extra_args: &[String]) -> Self {
        let (spans_tx, spans) = mpsc::unbounded_channel();
        let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let collector_addr = collector.local_addr().unwrap();
        let collector = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Receiver(spans_tx)))
                .serve_with_incoming(TcpListenerStream::new(collector)),
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new(BINARY)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(extra_args)
            .env(
                "DATABASE_URL",
                format!("sqlite://{}", dir.path().join("t.db").display()),
            )
            .env("KEY_AUTHORITY_ADMIN_TOKEN", "trace-admin")
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://{collector_addr}"),
            )
            .env("OTEL_SERVICE_NAME", "key-authority-under-test")
            .env("OTEL_TRACES_SAMPLER", "parentbased_always_on")
            .env("OTEL_BSP_SCHEDULE_DELAY", "50")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let channel = connect(port).await;
        let issued = keys_as(&channel, Some("trace-admin"))
            .issue_key(pb::IssueKeyRequest {
                workspace_id: "w".into(),
                name: "traced".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        Self {
            spans,
            collector,
            child,
            channel,
            issued,
            _dir: dir,
        }
    }

    /// The next exported span.
    async fn next_span(&mut self) -> Span {
        tokio::time::timeout(Duration::from_secs(30), self.spans.recv())
            .await
            .expect("spans are exported")
            .expect("the receiver is open")
    }

    /// SIGTERM, as an orchestrator stops it; waits for the exit.
    async fn stop(self) {
        let Self {
            mut child,
            channel,
            collector,
            ..
        } = self;
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        drop(channel);
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        collector.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_key_spans_join_the_callers_trace() {
    let mut server = TracedServer::start(&[]).await;
    let channel = server.channel.clone();
    let issued = server.issued.clone();

    // First a call whose caller did not sample its trace: under a parent-based sampler none of
    // its spans may be exported (they are checked for below, once the sampled call's arrive).
    let unsampled_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut request = tonic::Request::new(pb::VerifyKeyRequest {
        key: issued.secret.clone(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{unsampled_trace}-b7ad6b7169203331-00")
            .parse()
            .unwrap(),
    );
    pb::verify_service_client::VerifyServiceClient::new(channel.clone())
        .verify_key(request)
        .await
        .unwrap();

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(pb::VerifyKeyRequest {
        key: issued.secret.clone(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse().unwrap(),
    );
    let verdict = pb::verify_service_client::VerifyServiceClient::new(channel.clone())
        .verify_key(request)
        .await
        .unwrap()
        .into_inner();
    assert!(verdict.valid);

    // Await the exported RPC span of that call and its children.
    let mut of_trace: Vec<Span> = Vec::new();
    let rpc = loop {
        let span = server.next_span().await;
        assert_ne!(
            hex(&span.trace_id),
            unsampled_trace,
            "a span of an unsampled call was exported: {}",
            span.name
        );
        if hex(&span.trace_id) != trace_id {
            continue;
        }
        of_trace.push(span.clone());
        if span.name == "keyauthority.v1.VerifyService/VerifyKey" {
            break span;
        }
    };
    assert_eq!(
        hex(&rpc.parent_span_id),
        caller_span,
        "the RPC span is a child of the caller's"
    );
    let attributes: HashMap<String, String> = rpc
        .attributes
        .iter()
        .map(|kv| (kv.key.clone(), format!("{:?}", kv.value)))
        .collect();
    assert!(attributes["rpc.system"].contains("grpc"));
    assert!(attributes["rpc.service"].contains("keyauthority.v1.VerifyService"));
    assert!(attributes["rpc.method"].contains("VerifyKey"));
    // Children (cache lookups, the database read, argon2) end before their parent, so they were
    // exported with it or earlier.
    let rpc_span_id = rpc.span_id.clone();
    let children: Vec<&str> = of_trace
        .iter()
        .filter(|span| span.parent_span_id == rpc_span_id)
        .map(|span| span.name.as_str())
        .collect();
    assert!(children.contains(&"verify.verdict_cache"), "{children:?}");
    assert!(children.contains(&"verify.state_cache"), "{children:?}");
    // The secret is in no span.
    let secret_part = &issued.secret[issued.key.as_ref().unwrap().prefix.len()..];
    for span in &of_trace {
        assert!(
            !format!("{span:?}").contains(secret_part),
            "a secret in span {}",
            span.name
        );
    }

    drop(channel);
    server.stop().await;
}

/// Gateways join their caller's trace: ext_authz from Envoy's own context in the call's metadata
/// (the RPC span's parent), else from the checked request's `traceparent`; forward auth from
/// the `traceparent` the proxy passes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_checks_join_the_callers_trace() {
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

    let http_port = free_port();
    let mut server =
        TracedServer::start(&["--http-listen".into(), format!("127.0.0.1:{http_port}")]).await;
    let channel = server.channel.clone();
    let issued = server.issued.clone();
    let check = |headers: &[(&str, String)]| CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/".into(),
                    headers: headers
                        .iter()
                        .map(|(name, value)| ((*name).to_owned(), value.clone()))
                        .collect(),
                    ..HttpRequest::default()
                }),
                ..Request::default()
            }),
            ..AttributeContext::default()
        }),
    };
    let bearer = ("authorization", format!("Bearer {}", issued.secret));
    let traceparent = |trace: &str, span: &str| format!("00-{trace}-{span}-01");

    // Envoy's own trace context, in the call's metadata.
    let envoy_trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(check(std::slice::from_ref(&bearer)));
    request.metadata_mut().insert(
        "traceparent",
        traceparent(envoy_trace, "10f067aa0ba902b7")
            .parse()
            .unwrap(),
    );
    AuthorizationClient::new(channel.clone())
        .check(request)
        .await
        .unwrap();
    // No context from Envoy: the checked request's own.
    let request_trace = "6bf92f3577b34da6a3ce929d0e0e4736";
    AuthorizationClient::new(channel.clone())
        .check(check(&[
            bearer.clone(),
            (
                "traceparent",
                traceparent(request_trace, "20f067aa0ba902b7"),
            ),
        ]))
        .await
        .unwrap();
    // Forward auth: the traceparent the proxy passes on. (The server is another process here:
    // this one's HTTP client needs its own TLS provider installed, even for plain HTTP.)
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http_trace = "7bf92f3577b34da6a3ce929d0e0e4736";
    let answer = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{http_port}/auth"))
        .header("authorization", &bearer.1)
        .header("traceparent", traceparent(http_trace, "30f067aa0ba902b7"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), reqwest::StatusCode::OK);

    // (trace id, span name) → parent span id, for every exported span, until all three arrive.
    let mut seen: HashMap<(String, String), String> = HashMap::new();
    let wanted = [
        (
            envoy_trace,
            "envoy.service.auth.v3.Authorization/Check",
            "10f067aa0ba902b7",
        ),
        (request_trace, "gateway.check", "20f067aa0ba902b7"),
        (http_trace, "gateway.check", "30f067aa0ba902b7"),
    ];
    while !wanted
        .iter()
        .all(|(trace, name, _)| seen.contains_key(&((*trace).to_owned(), (*name).to_owned())))
    {
        let span = server.next_span().await;
        seen.insert((hex(&span.trace_id), span.name), hex(&span.parent_span_id));
    }
    for (trace, name, parent) in wanted {
        assert_eq!(
            seen[&(trace.to_owned(), name.to_owned())],
            parent,
            "{name} in {trace}"
        );
    }

    drop(channel);
    server.stop().await;
}

/// GET /metrics over plain HTTP/1.1.
pub(crate) async fn scrape(address: std::net::SocketAddr) -> String {
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap()
    })
    .await
    .unwrap()
}

/// Every sample line of an exposition, by name and labels; panics on a line that does not parse.
pub(crate) fn samples(text: &str) -> HashMap<String, f64> {
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    let mut samples = HashMap::new();
    for line in text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        samples.insert(name.to_owned(), value);
    }
    samples
}

async fn metrics_parse_and_move(db: TestDb) {
    let mut config = test_config(&db);
    config.metrics_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let mut app = TestApp::spawn_with(config).await;
    let address = app.server.metrics_addr.expect("metrics are served");
    let issued = app.issue("acme", "measured").await;
    for _ in 0..3 {
        assert!(app.verify_key(&issued.secret, &[]).await.valid);
    }
    assert_eq!(
        code(&app.verify_key("garbage", &[]).await),
        pb::VerifyCode::Malformed
    );
    let _ = app.get("acme", "AAAAAAAAAAAA").await.unwrap_err();

    let samples = samples(&scrape(address).await);
    let get = |name: &str| {
        *samples
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(
        get(r#"key_authority_verify_verdicts_total{code="VERIFY_CODE_VALID"}"#),
        3.0
    );
    assert_eq!(
        get(r#"key_authority_verify_verdicts_total{code="VERIFY_CODE_MALFORMED"}"#),
        1.0
    );
    assert_eq!(
        get(
            r#"key_authority_grpc_server_requests_total{method="/keyauthority.v1.VerifyService/VerifyKey",code="OK"}"#
        ),
        4.0
    );
    assert_eq!(
        get(
            r#"key_authority_grpc_server_requests_total{method="/keyauthority.v1.KeyService/GetKey",code="NOT_FOUND"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            r#"key_authority_grpc_server_request_duration_seconds_count{method="/keyauthority.v1.KeyService/IssueKey",code="OK"}"#
        ),
        1.0
    );
    assert_eq!(get("key_authority_verdict_cache_misses_total"), 1.0);
    assert_eq!(get("key_authority_verdict_cache_hits_total"), 2.0);
    assert_eq!(get("key_authority_state_cache_misses_total"), 1.0);
    assert_eq!(get("key_authority_argon2_verifications_total"), 1.0);
    assert_eq!(
        get("key_authority_argon2_runs_total"),
        2.0,
        "one hash at issue, one verify"
    );
    assert!(get("key_authority_argon2_run_seconds_total") > 0.0);
    assert_eq!(get("key_authority_argon2_in_flight"), 0.0);
    assert!(get("key_authority_db_pool_connections_open") >= 1.0);
    assert!(samples.contains_key("key_authority_usage_write_lag_seconds"));
    assert!(samples.contains_key("key_authority_key_lockouts_total"));
    assert_eq!(
        samples.get("key_authority_audit_lockout_events_dropped_total"),
        Some(&0.0)
    );
    assert_eq!(samples.get("key_authority_event_watchers"), Some(&0.0));
    assert_eq!(
        samples.contains_key("key_authority_change_feed_reconnects_total"),
        db.backend == crate::common::Backend::Postgres
    );
    app.stop().await;
}

on_both_databases!(metrics_parse_and_move);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_most_verbose_logs_hold_no_secret_and_carry_trace_ids() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(BINARY)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-format",
            "json",
        ])
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.path().join("l.db").display()),
        )
        .env("KEY_AUTHORITY_ADMIN_TOKEN", "log-admin")
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::BufReader::new(stderr)
            .read_to_string(&mut text)
            .unwrap();
        text
    });
    let channel = connect(port).await;
    let mut admin = keys_as(&channel, Some("log-admin"));
    let mut verify = pb::verify_service_client::VerifyServiceClient::new(channel.clone());
    let mut secrets = Vec::new();

    // A full lifecycle: issue, verify (right, wrong, scoped), use a key as a caller, list,
    // rotate, revoke, trial keys.
    let issued = admin
        .issue_key(pb::IssueKeyRequest {
            workspace_id: "w".into(),
            name: "logged".into(),
            scopes: vec!["read".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    secrets.push(issued.secret.clone());
    for (key, scopes) in [
        (issued.secret.clone(), vec![]),
        (issued.secret.clone(), vec!["write".to_owned()]),
        (
            crate::verify::forge_with_same_prefix(&issued.key.as_ref().unwrap().prefix),
            vec![],
        ),
    ] {
        verify
            .verify_key(pb::VerifyKeyRequest {
                key,
                required_scopes: scopes,
                client_ip: "198.51.100.1".into(),
                cost: None,
                minimum_role: 0,
            })
            .await
            .unwrap();
    }
    let as_key = keys_as(&channel, Some(&issued.secret))
        .list_keys(pb::ListKeysRequest::default())
        .await;
    assert!(as_key.is_ok());
    let missing = admin
        .get_key(pb::GetKeyRequest {
            workspace_id: "w".into(),
            key_id: "AAAAAAAAAAAA".into(),
        })
        .await;
    assert!(missing.is_err());
    let rotated = admin
        .rotate_key(pb::RotateKeyRequest {
            workspace_id: "w".into(),
            key_id: issued.key.as_ref().unwrap().key_id.clone(),
            grace_period: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    secrets.push(rotated.secret.clone());
    admin
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: "w".into(),
            key_id: rotated.key.as_ref().unwrap().key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let trial = keys_as(&channel, None)
        .issue_trial_key(pb::IssueTrialKeyRequest::default())
        .await
        .unwrap()
        .into_inner();
    secrets.push(trial.secret.clone());
    verify
        .verify_key(pb::VerifyKeyRequest {
            key: trial.secret.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop((admin, verify, channel));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    let logs = reader.join().unwrap();

    assert!(
        logs.contains(r#""message":"verdict""#),
        "debug lines are there"
    );
    assert!(
        logs.contains(r#""message":"request refused""#),
        "debug lines are there"
    );
    for secret in &secrets {
        let secret_part = &secret[secret.len() - 38..];
        assert!(!logs.contains(secret_part), "a secret reached the logs");
    }
    assert!(
        !logs.contains("log-admin"),
        "the admin token reached the logs"
    );
    let mut lines_in_requests = 0;
    for line in logs.lines() {
        let json: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        let spans = json["spans"].as_array().cloned().unwrap_or_default();
        if let Some(rpc) = spans.iter().find(|span| span["name"] == "rpc") {
            lines_in_requests += 1;
            let trace_id = rpc["trace_id"].as_str().expect("a trace id");
            assert_eq!(trace_id.len(), 32, "{line}");
        }
    }
    assert!(
        lines_in_requests > 0,
        "some lines were logged inside requests"
    );
    let issued_line = logs
        .lines()
        .find(|line| line.contains("key issued"))
        .expect("the issue was logged");
    assert!(issued_line.contains("trace_id"), "{issued_line}");
}

/// A TCP proxy in front of the database that the test can cut and restore, as a network
/// failure would.
struct CuttableProxy {
    port: u16,
    open: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    async fn start(target_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (open, open_rx) = tokio::sync::watch::channel(true);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !*open_rx.borrow() {
                    continue; // refused: dropped at once
                }
                let mut cut = open_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self { port, open, task }
    }

    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let cluster = crate::postgres_cluster::cluster().unwrap();
    let proxy = CuttableProxy::start(cluster.port).await;
    let through_proxy = TestDb {
        backend: db.backend,
        url: db
            .url
            .replace(&format!(":{}/", cluster.port), &format!(":{}/", proxy.port)),
        dir: None,
    };
    let mut config = test_config(&through_proxy);
    config.health_check_interval = Duration::from_millis(50);
    let app = TestApp::spawn_with(config).await;
    let mut health = HealthClient::new(app.channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "keyauthority.v1.VerifyService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_status = async || {
        watch
            .message()
            .await
            .unwrap()
            .expect("the watch stays open")
            .status
    };
    assert_eq!(next_status().await, ServingStatus::Serving as i32);

    proxy.set_open(false);
    assert_eq!(next_status().await, ServingStatus::NotServing as i32);
    // A key the server never saw cannot be decided while the database is away: UNAVAILABLE,
    // never "invalid".
    let status = app
        .verify
        .clone()
        .verify_key(pb::VerifyKeyRequest {
            key: crate::verify::forge_with_same_prefix("ka_live_AAAAAAAAAAAA"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);

    proxy.set_open(true);
    assert_eq!(next_status().await, ServingStatus::Serving as i32);
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status, ServingStatus::Serving as i32);
    // Graceful shutdown: the open Watch hears NOT_SERVING first.
    let stopping = tokio::spawn(app.stop());
    assert_eq!(next_status().await, ServingStatus::NotServing as i32);
    drop(watch);
    drop(health);
    stopping.await.unwrap();
    proxy.task.abort();
}
