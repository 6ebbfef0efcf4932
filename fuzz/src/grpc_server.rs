//! grpc_server: whole calls into the generated KeyService and VerifyService servers, as HTTP/2
//! requests reach them from tonic's transport: routing, gRPC framing, our `ServerCodec`, the
//! authentication of the caller (admin token, JWT, API key), the handler's request conversion
//! and the operation itself, on a SQLite database built once per process.
//!
//! The oracle besides "no panic": a call never ends in INTERNAL or UNKNOWN (whatever the bytes,
//! a bad request is the caller's error), and a status message stays short.

use std::net::SocketAddr;
use std::sync::LazyLock;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use key_authority::config::Config;
use key_authority::grpc::{KeyServiceImpl, VerifyServiceImpl};
use key_authority::key::HashParams;
use key_authority::pb;
use key_authority::pb::key_service_server::KeyServiceServer;
use key_authority::pb::verify_service_server::VerifyServiceServer;
use key_authority::server::App;
use key_authority::webhooks::target::parse_url;
use prost::Message as _;
use tonic::Code;
use tonic::codegen::Service as _;
use tonic::transport::server::TcpConnectInfo;

use super::{MAX_STATUS_MESSAGE, REQUESTS, jwt_config, jwt_token};

/// The platform admin token of the fuzzed server.
pub const ADMIN_TOKEN: &str = "fuzz-admin-token";

/// The servers' message limits, as `server/serving.rs` sets them.
const MAX_KEY_SERVICE_MESSAGE: usize = 64 * 1024;
const MAX_VERIFY_MESSAGE: usize = 16 * 1024;

/// Flag bits of a `grpc_server` input's second byte.
const AUTH_MODE: u8 = 0b11;
const RAW_BODY: u8 = 1 << 2;
const GZIP: u8 = 1 << 3;
const IDEMPOTENCY_KEY: u8 = 1 << 4;
const TRACEPARENT: u8 = 1 << 5;

struct Harness {
    runtime: tokio::runtime::Runtime,
    keys: KeyServiceServer<KeyServiceImpl>,
    verify: VerifyServiceServer<VerifyServiceImpl>,
    _database_dir: tempfile::TempDir,
}

static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // On tmpfs when there is one: every commit syncs, and the disk's speed is not under test.
    let database_dir = tempfile::Builder::new()
        .prefix("key-authority-fuzz")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("a temporary directory");
    let mut config = Config::with_database(format!(
        "sqlite://{}",
        database_dir.path().join("keys.db").display()
    ));
    config.db_max_connections = 4;
    config.hash_params = HashParams {
        memory_kib: 1024,
        iterations: 1,
        parallelism: 1,
    };
    config.argon2_threads = 1;
    config.auth.admin_tokens = vec![ADMIN_TOKEN.to_owned()];
    config.auth.jwt = Some(jwt_config());
    config.trial.enabled = true;
    let app = runtime
        .block_on(App::build(&config, Vec::new()))
        .expect("the fuzzed server builds");
    let keys = KeyServiceServer::new(KeyServiceImpl::new(
        app.keys.clone(),
        app.webhooks.clone(),
        app.auth.clone(),
    ))
    .max_decoding_message_size(MAX_KEY_SERVICE_MESSAGE);
    let verify = VerifyServiceServer::new(VerifyServiceImpl::new(
        app.verifier.clone(),
        app.auth.clone(),
        app.metrics.clone(),
    ))
    .max_decoding_message_size(MAX_VERIFY_MESSAGE);
    Harness {
        runtime,
        keys,
        verify,
        _database_dir: database_dir,
    }
});

/// `FUZZ_VERBOSE=1` prints every call's status (to see what a seed or a crash input reaches).
static VERBOSE: LazyLock<bool> = LazyLock::new(|| std::env::var_os("FUZZ_VERBOSE").is_some());

/// Takes a length byte and that many bytes off the front of `data`, as text.
fn take_text<'a>(data: &mut &'a [u8]) -> Option<&'a str> {
    let (&len, rest) = data.split_first()?;
    let len = usize::from(len).min(rest.len());
    let (text, rest) = rest.split_at(len);
    *data = rest;
    std::str::from_utf8(text).ok()
}

/// `data`: a selector byte (`REQUESTS`); a flag byte (bits 0-1: the caller, as the admin, with
/// no credentials, with the text below as the whole `authorization` header, or with a JWT
/// signed with the right secret whose claims are that text; bit 2: the body is sent as is,
/// else as one uncompressed gRPC frame; bit 3: `grpc-encoding: gzip`; bit 4: an
/// `idempotency-key` header; bit 5: a `traceparent` header); for the non-admin callers and each
/// header present, a length byte and that many bytes of text; then the body.
pub fn grpc_server(data: &[u8]) {
    let [selector, flags, ref rest @ ..] = *data else {
        return;
    };
    let mut rest = rest;
    let rpc = REQUESTS[usize::from(selector) % REQUESTS.len()];
    let auth_mode = flags & AUTH_MODE;
    let credentials = match auth_mode {
        0 => Some(format!("Bearer {ADMIN_TOKEN}")),
        1 => None,
        2 => Some(take_text(&mut rest).unwrap_or_default().to_owned()),
        _ => Some(format!(
            "Bearer {}",
            jwt_token(1, take_text(&mut rest).unwrap_or_default())
        )),
    };
    let idempotency_key = (flags & IDEMPOTENCY_KEY != 0).then(|| take_text(&mut rest));
    let traceparent = (flags & TRACEPARENT != 0).then(|| take_text(&mut rest));
    let body = rest;
    if rpc == "CreateWebhook" && resolves_a_name(flags, body) {
        return;
    }

    let service = if rpc == "VerifyKey" {
        "VerifyService"
    } else {
        "KeyService"
    };
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("/keyauthority.v1.{service}/{rpc}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    let mut headers = vec![];
    if let Some(credentials) = credentials {
        headers.push(("authorization", credentials));
    }
    if let Some(Some(key)) = idempotency_key {
        headers.push(("idempotency-key", key.to_owned()));
    }
    if let Some(Some(traceparent)) = traceparent {
        headers.push(("traceparent", traceparent.to_owned()));
    }
    if flags & GZIP != 0 {
        headers.push(("grpc-encoding", "gzip".to_owned()));
    }
    for (name, value) in headers {
        // A value HTTP/2 could not carry never reaches a server.
        let Ok(value) = http::HeaderValue::from_str(&value) else {
            return;
        };
        request = request.header(name, value);
    }
    let body = if flags & RAW_BODY != 0 {
        Bytes::copy_from_slice(body)
    } else {
        let mut framed = Vec::with_capacity(5 + body.len());
        framed.push(0);
        framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        framed.extend_from_slice(body);
        Bytes::from(framed)
    };
    let mut request = request.body(Full::new(body)).expect("a valid request");
    // What tonic's TCP transport gives every call (the server listens on TCP only): without a
    // peer, the trial RPCs answer INTERNAL ("no peer address"), which no real call can reach.
    request.extensions_mut().insert(TcpConnectInfo {
        local_addr: Some(SocketAddr::from(([127, 0, 0, 1], 50051))),
        remote_addr: Some(SocketAddr::from(([198, 51, 100, 2], 40000))),
    });

    let harness = &*HARNESS;
    let status = harness.runtime.block_on(async {
        let response = if service == "VerifyService" {
            harness.verify.clone().call(request).await
        } else {
            harness.keys.clone().call(request).await
        };
        let response = response.expect("tonic's servers never fail a call");
        if let Some(status) = tonic::Status::from_header_map(response.headers()) {
            return Some(status);
        }
        if rpc == "WatchKeyEvents" {
            // An open watch never ends by itself.
            return None;
        }
        let collected = response
            .into_body()
            .collect()
            .await
            .expect("a unary response body");
        collected
            .trailers()
            .and_then(tonic::Status::from_header_map)
    });
    if *VERBOSE {
        eprintln!("{rpc}: {status:?}");
    }
    if let Some(status) = status {
        assert!(
            !matches!(status.code(), Code::Internal | Code::Unknown)
                || is_tonic_framing_error(&status),
            "{rpc} answered {:?}: {}",
            status.code(),
            status.message()
        );
        assert!(
            status.message().len() <= MAX_STATUS_MESSAGE,
            "{rpc} answered a status message of {} bytes",
            status.message().len()
        );
    }
}

/// The INTERNAL answers tonic gives, before any message reaches our codec, to bytes that are
/// not gRPC frames: a compressed-flag without `grpc-encoding` (INTERNAL as the gRPC compression
/// spec requires), a flag byte other than 0 and 1, a body that ends inside a frame, and a unary
/// call whose body holds no frame at all. Found by this target on its first runs; no gRPC
/// library sends them. Any other INTERNAL fails.
fn is_tonic_framing_error(status: &tonic::Status) -> bool {
    status.code() == Code::Internal
        && [
            "protocol error: received message with compressed-flag but no grpc-encoding",
            "protocol error: received message with invalid compression flag",
            "Unexpected EOF decoding stream",
            "Missing request message",
        ]
        .iter()
        .any(|framing| status.message().starts_with(framing))
}

/// Whether CreateWebhook would resolve a host name (a DNS query on every run, and seconds for a
/// name that does not answer): such inputs are skipped. Raw or compressed bodies are skipped
/// too, since they cannot be read here; every other RPC covers the framing.
fn resolves_a_name(flags: u8, body: &[u8]) -> bool {
    if flags & (RAW_BODY | GZIP) != 0 {
        return true;
    }
    let Ok(request) = pb::CreateWebhookRequest::decode(body) else {
        return false;
    };
    let Ok(url) = parse_url(&request.url) else {
        return false;
    };
    match url.host() {
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            !(name == "localhost" || name.ends_with(".localhost"))
        }
        _ => false,
    }
}
