//! No secret escapes: a full session against the real binary at `RUST_LOG=trace`, exporting
//! spans to a real OTLP receiver, then every byte the session left behind (the database's files,
//! every log line, every exported span, every error the calls got back, every metrics scrape) is
//! scanned for every secret of the session: zero hits.

use std::collections::BTreeSet;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use key_authority::pb;
use key_authority::pb::verify_service_client::VerifyServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::binary::{ServerProcess, connect, free_port, serve_command};
use crate::common::{Bearer, Claims, KeysClient, TestDb, claims, keys_as, now, on_both_databases};
use crate::observability::scrape;
use crate::webhook_receiver::{PATIENCE, Receiver};

const ISSUER: &str = "https://dashboard.example";
const AUDIENCE: &str = "key-authority";
const WORKSPACE: &str = "w";

/// A real OTLP trace receiver (the collector's TraceService) that keeps every export whole.
struct SpanReceiver(mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for SpanReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn span_names(export: &ExportTraceServiceRequest) -> impl Iterator<Item = &str> {
    export
        .resource_spans
        .iter()
        .flat_map(|resource| &resource.scope_spans)
        .flat_map(|scope| &scope.spans)
        .map(|span| span.name.as_str())
}

/// A fresh random token: 32 hex digits from the OS generator.
fn random_token(kind: &str) -> String {
    format!("{kind}-{}", uuid::Uuid::new_v4().simple())
}

fn sign(claims: &Claims<'_>, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Every secret of the session, each with what it is.
#[derive(Default)]
struct Secrets(Vec<(String, Vec<u8>)>);

impl Secrets {
    fn add(&mut self, what: impl Into<String>, secret: impl AsRef<[u8]>) {
        let secret = secret.as_ref().to_vec();
        assert!(secret.len() >= 16, "long enough not to match by chance");
        self.0.push((what.into(), secret));
    }

    /// An API key's secret: the 32 random characters after its public prefix (the 6 that follow
    /// are their checksum).
    fn add_key(&mut self, what: &str, plaintext: &str, prefix: &str) {
        assert!(plaintext.starts_with(prefix) && plaintext.len() == prefix.len() + 38);
        self.add(what, &plaintext[prefix.len()..prefix.len() + 32]);
    }

    /// A JWT is a bearer credential through its signature.
    fn add_jwt(&mut self, what: &str, jwt: &str) {
        let signature = jwt.rsplit('.').next().unwrap();
        self.add(what, signature);
    }
}

/// The text of every refusal the calls got back: message, details and metadata.
#[derive(Default)]
struct Refusals {
    text: Vec<u8>,
    codes: Vec<Code>,
}

impl Refusals {
    /// Records the refusal `result` must be, and returns its code.
    fn refused<T>(&mut self, result: Result<T, tonic::Status>) -> Code {
        let Err(status) = result else {
            panic!("the call was expected to be refused");
        };
        self.text.extend_from_slice(status.message().as_bytes());
        self.text.extend_from_slice(status.details());
        self.text
            .extend_from_slice(format!("{:?}", status.metadata()).as_bytes());
        self.codes.push(status.code());
        status.code()
    }
}

type VerifyClient = VerifyServiceClient<InterceptedService<Channel, Bearer>>;

async fn verify(client: &mut VerifyClient, key: &str, scopes: &[&str]) -> pb::VerifyCode {
    let verdict = client
        .verify_key(pb::VerifyKeyRequest {
            key: key.to_owned(),
            required_scopes: scopes.iter().map(|scope| (*scope).to_owned()).collect(),
            client_ip: "198.51.100.7".into(),
            cost: None,
            minimum_role: 0,
        })
        .await
        .expect("VerifyKey answers")
        .into_inner();
    pb::VerifyCode::try_from(verdict.code).unwrap()
}

async fn issue(keys: &mut KeysClient, request: pb::IssueKeyRequest) -> pb::IssueKeyResponse {
    keys.issue_key(request)
        .await
        .expect("IssueKey")
        .into_inner()
}

fn issue_request(name: &str) -> pb::IssueKeyRequest {
    pb::IssueKeyRequest {
        workspace_id: WORKSPACE.into(),
        name: name.into(),
        scopes: vec!["read".into()],
        ..Default::default()
    }
}

async fn no_secret_escapes_a_full_session(db: TestDb) {
    let (exports_tx, mut exports_rx) = mpsc::unbounded_channel();
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = collector.local_addr().unwrap();
    let collector_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(SpanReceiver(exports_tx)))
            .serve_with_incoming(TcpListenerStream::new(collector)),
    );
    let mut hooks = Receiver::accepting().await;

    let mut secrets = Secrets::default();
    let admin_token = random_token("admin");
    let jwt_secret = random_token("jwt-secret");
    let verify_token = random_token("verify");
    secrets.add("admin token", &admin_token);
    secrets.add("JWT secret", &jwt_secret);
    secrets.add("verify token", &verify_token);

    let port = free_port();
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut command = serve_command(port, &db.url, &admin_token);
    command
        .args(["--log-format", "json", "--webhook-allow-private-targets"])
        .args(["--metrics-listen", &metrics.to_string()])
        .env("RUST_LOG", "trace")
        .env("KEY_AUTHORITY_JWT_SECRET", &jwt_secret)
        .env("KEY_AUTHORITY_JWT_ISSUER", ISSUER)
        .env("KEY_AUTHORITY_JWT_AUDIENCE", AUDIENCE)
        .env("KEY_AUTHORITY_VERIFY_TOKENS", &verify_token)
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{collector_addr}"),
        )
        .env("OTEL_TRACES_SAMPLER", "always_on")
        .env("OTEL_BSP_SCHEDULE_DELAY", "50");
    let server = ServerProcess::spawn(command);
    let channel = connect(port).await;

    let mut admin = keys_as(&channel, Some(&admin_token));
    let jwt = |role: &str| sign(&claims(WORKSPACE, role), &jwt_secret);
    let (developer_jwt, viewer_jwt, account_admin_jwt) =
        (jwt("developer"), jwt("viewer"), jwt("account_admin"));
    secrets.add_jwt("developer JWT", &developer_jwt);
    secrets.add_jwt("viewer JWT", &viewer_jwt);
    secrets.add_jwt("account admin JWT", &account_admin_jwt);
    let mut developer = keys_as(&channel, Some(&developer_jwt));
    let mut viewer = keys_as(&channel, Some(&viewer_jwt));
    let mut account_admin = keys_as(&channel, Some(&account_admin_jwt));
    let mut verifier =
        VerifyServiceClient::with_interceptor(channel.clone(), Bearer::new(Some(&verify_token)));
    let mut scrapes = Vec::new();

    // A webhook, made from the dashboard, receiving every event of the workspace.
    let created = account_admin
        .create_webhook(pb::CreateWebhookRequest {
            workspace_id: WORKSPACE.into(),
            url: hooks.url.clone(),
            event_types: vec![],
            description: "secrets scan".into(),
        })
        .await
        .expect("CreateWebhook")
        .into_inner();
    let signing_secret = created.signing_secret.clone();
    let signing_key = signing_secret
        .strip_prefix("whsec_")
        .expect("a whsec_ secret");
    secrets.add("webhook signing secret", signing_key);
    secrets.add(
        "webhook signing key bytes",
        base64::engine::general_purpose::STANDARD
            .decode(signing_key)
            .unwrap(),
    );

    // Issue (admin and dashboard), verify every way, rotate, update, revoke.
    let first = issue(&mut admin, issue_request("first")).await;
    let first_key = first.key.clone().unwrap();
    secrets.add_key("issued key", &first.secret, &first_key.prefix);
    assert_eq!(
        verify(&mut verifier, &first.secret, &["read"]).await,
        pb::VerifyCode::Valid
    );
    assert_eq!(
        verify(&mut verifier, &first.secret, &["write"]).await,
        pb::VerifyCode::InsufficientScope
    );
    let forged = crate::verify::forge_with_same_prefix(&first_key.prefix);
    secrets.add_key("forged key", &forged, &first_key.prefix);
    assert_eq!(
        verify(&mut verifier, &forged, &[]).await,
        pb::VerifyCode::NotFound
    );
    assert_eq!(
        verify(&mut verifier, "not a key at all", &[]).await,
        pb::VerifyCode::Malformed
    );
    let second = issue(&mut developer, issue_request("second")).await;
    let second_key = second.key.clone().unwrap();
    secrets.add_key(
        "key issued by a developer",
        &second.secret,
        &second_key.prefix,
    );
    assert_eq!(
        verify(&mut verifier, &second.secret, &[]).await,
        pb::VerifyCode::Valid
    );
    let rotated = admin
        .rotate_key(pb::RotateKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: first_key.key_id.clone(),
            grace_period: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("RotateKey")
        .into_inner();
    let successor = rotated.key.clone().unwrap();
    secrets.add_key("rotated key", &rotated.secret, &successor.prefix);
    assert_eq!(
        verify(&mut verifier, &first.secret, &[]).await,
        pb::VerifyCode::Valid,
        "in its grace period"
    );
    assert_eq!(
        verify(&mut verifier, &rotated.secret, &[]).await,
        pb::VerifyCode::Valid
    );
    developer
        .update_key(pb::UpdateKeyRequest {
            key: Some(pb::Key {
                workspace_id: WORKSPACE.into(),
                key_id: second_key.key_id.clone(),
                name: "second, renamed".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["name".into()],
            }),
            request_id: String::new(),
        })
        .await
        .expect("UpdateKey");
    admin
        .revoke_key(pb::RevokeKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: successor.key_id.clone(),
            ..Default::default()
        })
        .await
        .expect("RevokeKey");
    assert_eq!(
        verify(&mut verifier, &rotated.secret, &[]).await,
        pb::VerifyCode::Revoked
    );
    scrapes.push(scrape(metrics).await);

    // A safe retry: the replay answers with the same secret.
    let retried = pb::IssueKeyRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        ..issue_request("retried")
    };
    let retried_first = issue(&mut admin, retried.clone()).await;
    let retried_again = issue(&mut admin, retried).await;
    assert_eq!(retried_first.secret, retried_again.secret);
    secrets.add_key(
        "key issued with a request id",
        &retried_first.secret,
        &retried_first.key.as_ref().unwrap().prefix,
    );

    // Reads from the dashboard and the audit trail.
    let listed = viewer
        .list_keys(pb::ListKeysRequest {
            workspace_id: WORKSPACE.into(),
            include_inactive: true,
            ..Default::default()
        })
        .await
        .expect("ListKeys")
        .into_inner();
    assert_eq!(listed.keys.len(), 4);
    viewer
        .get_key(pb::GetKeyRequest {
            workspace_id: WORKSPACE.into(),
            key_id: second_key.key_id.clone(),
        })
        .await
        .expect("GetKey");
    admin
        .list_audit_events(pb::ListAuditEventsRequest {
            workspace_id: WORKSPACE.into(),
            ..Default::default()
        })
        .await
        .expect("ListAuditEvents");

    // Trial keys.
    let anonymous = keys_as(&channel, None);
    let trial = anonymous
        .clone()
        .issue_trial_key(pb::IssueTrialKeyRequest::default())
        .await
        .expect("IssueTrialKey")
        .into_inner();
    let trial_key = trial.key.clone().unwrap();
    secrets.add_key("trial key", &trial.secret, &trial_key.prefix);
    assert_eq!(
        verify(&mut verifier, &trial.secret, &[]).await,
        pb::VerifyCode::Valid
    );
    anonymous
        .clone()
        .revoke_trial_key(pb::RevokeTrialKeyRequest {
            prefix: trial_key.prefix.clone(),
            client_ip: String::new(),
        })
        .await
        .expect("RevokeTrialKey");

    // Refusals, each presenting something secret or asking for something it may not have.
    let mut refusals = Refusals::default();
    let wrong_admin_token = random_token("admin");
    secrets.add("wrong admin token", &wrong_admin_token);
    let code = refusals.refused(
        keys_as(&channel, Some(&wrong_admin_token))
            .issue_key(issue_request("nope"))
            .await,
    );
    assert_eq!(code, Code::Unauthenticated);
    let forged_jwt = sign(&claims(WORKSPACE, "account_admin"), &random_token("other"));
    secrets.add_jwt("JWT signed with another secret", &forged_jwt);
    let code = refusals.refused(
        keys_as(&channel, Some(&forged_jwt))
            .issue_key(issue_request("nope"))
            .await,
    );
    assert_eq!(code, Code::Unauthenticated);
    let expired_jwt = sign(
        &Claims {
            exp: now() - 3600,
            nbf: now() - 7200,
            ..claims(WORKSPACE, "developer")
        },
        &jwt_secret,
    );
    secrets.add_jwt("expired JWT", &expired_jwt);
    let code = refusals.refused(
        keys_as(&channel, Some(&expired_jwt))
            .list_keys(pb::ListKeysRequest::default())
            .await,
    );
    assert_eq!(code, Code::Unauthenticated);
    // An API key as a management credential: refused while verify tokens are required.
    let code = refusals.refused(
        keys_as(&channel, Some(&second.secret))
            .list_keys(pb::ListKeysRequest::default())
            .await,
    );
    assert_eq!(code, Code::Unauthenticated);
    let code = refusals.refused(
        viewer
            .revoke_key(pb::RevokeKeyRequest {
                workspace_id: WORKSPACE.into(),
                key_id: second_key.key_id.clone(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    let code = refusals.refused(
        admin
            .get_key(pb::GetKeyRequest {
                workspace_id: WORKSPACE.into(),
                key_id: "AAAAAAAAAAAA".into(),
            })
            .await,
    );
    assert_eq!(code, Code::NotFound);
    let wrong_verify_token = random_token("verify");
    secrets.add("wrong verify token", &wrong_verify_token);
    for token in [None, Some(wrong_verify_token.as_str())] {
        let code = refusals.refused(
            VerifyServiceClient::with_interceptor(channel.clone(), Bearer::new(token))
                .verify_key(pb::VerifyKeyRequest {
                    key: second.secret.clone(),
                    ..Default::default()
                })
                .await,
        );
        assert_eq!(code, Code::Unauthenticated);
    }

    // The webhook got the session's events, signed with its secret.
    let delivered = hooks.until("key.revoked", &successor.key_id).await;
    assert!(
        delivered
            .iter()
            .any(|request| request.event_type() == "key.issued")
    );
    for request in &delivered {
        assert!(request.signed_by(&signing_secret), "signed");
    }
    scrapes.push(scrape(metrics).await);

    // Every RPC of the session was exported; await the last one's span.
    let mut exports = Vec::new();
    let mut exported_names = BTreeSet::new();
    let last_rpc = "keyauthority.v1.KeyService/RevokeTrialKey";
    while !exported_names.contains(last_rpc) {
        let export = tokio::time::timeout(PATIENCE, exports_rx.recv())
            .await
            .expect("spans are exported")
            .expect("the receiver runs");
        exported_names.extend(span_names(&export).map(str::to_owned));
        exports.push(export);
    }

    drop((
        admin,
        developer,
        viewer,
        account_admin,
        verifier,
        anonymous,
        channel,
    ));
    server.terminate();
    let exited = server.wait().await;
    assert!(exited.status.success(), "graceful exit");
    // The spans the shutdown flushed, after its exit.
    while let Ok(export) = exports_rx.try_recv() {
        exported_names.extend(span_names(&export).map(str::to_owned));
        exports.push(export);
    }
    collector_task.abort();
    for rpc in [
        "CreateWebhook",
        "IssueKey",
        "RotateKey",
        "UpdateKey",
        "RevokeKey",
        "ListKeys",
        "GetKey",
        "ListAuditEvents",
        "IssueTrialKey",
        "RevokeTrialKey",
    ] {
        let name = format!("keyauthority.v1.KeyService/{rpc}");
        assert!(
            exported_names.contains(&name),
            "{name} in {exported_names:?}"
        );
    }
    assert!(exported_names.contains("keyauthority.v1.VerifyService/VerifyKey"));

    // The scan sees what it should: the public values that sit where the secrets would be.
    let logs = String::from_utf8_lossy(&exited.stderr).into_owned();
    assert!(
        logs.contains("key issued") && logs.contains(&first_key.key_id),
        "the session was logged"
    );
    assert!(logs.contains(r#""level":"TRACE""#), "trace lines are there");
    assert!(scrapes[0].contains("key_authority_verify_verdicts_total"));

    // Everything the session left behind.
    let mut surfaces: Vec<(String, Vec<u8>)> = vec![
        ("stderr".into(), exited.stderr),
        ("stdout".into(), exited.stdout),
        ("refusals".into(), refusals.text),
    ];
    for (n, text) in scrapes.into_iter().enumerate() {
        surfaces.push((format!("metrics scrape {n}"), text.into_bytes()));
    }
    for (n, export) in exports.iter().enumerate() {
        surfaces.push((format!("OTLP export {n}"), export.encode_to_vec()));
    }
    let mut database_bytes = 0;
    let mut prefix_in_database = false;
    for file in db.data_files().await {
        let Ok(bytes) = std::fs::read(&file) else {
            continue; // a file PostgreSQL removed meanwhile
        };
        database_bytes += bytes.len();
        prefix_in_database |= memchr::memmem::find(&bytes, first_key.prefix.as_bytes()).is_some();
        surfaces.push((file.display().to_string(), bytes));
    }
    assert!(prefix_in_database, "the scanned files hold the keys");

    let mut hits = Vec::new();
    for (surface, bytes) in &surfaces {
        for (what, secret) in &secrets.0 {
            if memchr::memmem::find(bytes, secret).is_some() {
                hits.push(format!("{what} in {surface}"));
            }
        }
    }
    assert!(hits.is_empty(), "secrets found: {hits:#?}");
    eprintln!(
        "secrets scan: {} secrets, {} surfaces, {} bytes of logs, {} OTLP exports, {} database \
         bytes, {} refusals: no hit",
        secrets.0.len(),
        surfaces.len(),
        logs.len(),
        exports.len(),
        database_bytes,
        refusals.codes.len()
    );
}

on_both_databases!(no_secret_escapes_a_full_session);
