//! The test harness: a fresh database per test, the real server on port 0, real gRPC clients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use key_authority::key::HashParams;
use key_authority::pb;
use key_authority::pb::key_service_client::KeyServiceClient;
use key_authority::pb::verify_service_client::VerifyServiceClient;
use key_authority::server::{Config, RunningServer};
use sqlx::Connection;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The platform admin token every test server accepts.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Adds `authorization: Bearer <token>` to every call, as a real client would.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Self {
        Self(token.map(|token| format!("Bearer {token}").parse().expect("ASCII token")))
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type KeysClient = KeyServiceClient<InterceptedService<Channel, Bearer>>;
pub type VerifyClient = VerifyServiceClient<InterceptedService<Channel, Bearer>>;

/// A KeyService client that authenticates with `token` (or not at all).
pub fn keys_as(channel: &Channel, token: Option<&str>) -> KeysClient {
    KeyServiceClient::with_interceptor(channel.clone(), Bearer::new(token))
}

use crate::postgres_cluster;

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh, empty database that lives as long as this value.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    /// For SQLite, the folder holding the file; removed on drop.
    pub dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let url = format!("sqlite://{}", dir.path().join("keys.db").display());
        Self {
            backend: Backend::Sqlite,
            url,
            dir: Some(dir),
        }
    }

    /// `None` when PostgreSQL is not installed (the harness says so and the test skips).
    pub async fn postgres() -> Option<Self> {
        let cluster = postgres_cluster::cluster()?;
        let name = format!("t_{}", random_suffix());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Right after start-up the server may still refuse queries for a moment.
            match sqlx::PgConnection::connect(&cluster.url("postgres")).await {
                Ok(mut admin) => {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {name}")))
                        .execute(&mut admin)
                        .await
                        .expect("create a test database");
                    break;
                }
                Err(error) if Instant::now() < deadline => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("cannot reach the test cluster: {error}"),
            }
        }
        Some(Self {
            backend: Backend::Postgres,
            url: cluster.url(&name),
            dir: None,
        })
    }

    /// Every file that holds this database's data: the SQLite file with its WAL, or the whole
    /// PostgreSQL data folder (after a checkpoint, so everything committed is on disk).
    pub async fn data_files(&self) -> Vec<PathBuf> {
        match self.backend {
            Backend::Sqlite => {
                let dir = self.dir.as_ref().expect("sqlite has a dir").path();
                list_files(dir.to_path_buf())
            }
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(&self.url).await.unwrap();
                sqlx::query("checkpoint")
                    .execute(&mut connection)
                    .await
                    .unwrap();
                let cluster = postgres_cluster::cluster().expect("cluster running");
                list_files(cluster.data_dir.clone())
            }
        }
    }
}

fn list_files(root: PathBuf) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![root];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

pub fn random_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{}_{}_{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The configuration tests use: port 0 and a cheap argon2 so suites stay fast.
pub fn test_config(db: &TestDb) -> Config {
    let mut config = Config::with_database(db.url.clone());
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.db_max_connections = 8;
    config.hash_params = HashParams {
        memory_kib: 1024,
        iterations: 1,
        parallelism: 1,
    };
    config.auth.admin_tokens = vec![ADMIN_TOKEN.to_owned()];
    config
}

/// A running server and clients connected to it.
pub struct TestApp {
    pub server: RunningServer,
    /// Authenticated as a platform admin.
    pub keys: KeysClient,
    /// VerifyKey is open by default: no credentials.
    pub verify: VerifyClient,
    pub channel: Channel,
}

impl TestApp {
    pub async fn spawn(db: &TestDb) -> Self {
        Self::spawn_with(test_config(db)).await
    }

    pub async fn spawn_with(config: Config) -> Self {
        let server = RunningServer::start(config).await.expect("server starts");
        // On PostgreSQL, wait for the change feed: establishing LISTEN drops every cached state
        // (anything may have changed while nobody listened), which would make cache-counting
        // tests depend on timing.
        if let Some(feed) = &server.change_feed {
            let mut listening = feed.listening.clone();
            listening
                .wait_for(|count| *count >= 1)
                .await
                .expect("change feed runs");
        }
        let channel = Channel::from_shared(format!("http://{}", server.local_addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to the server");
        Self {
            keys: keys_as(&channel, Some(ADMIN_TOKEN)),
            verify: VerifyServiceClient::with_interceptor(channel.clone(), Bearer::new(None)),
            channel,
            server,
        }
    }

    /// Graceful shutdown, as on SIGTERM.
    pub async fn stop(self) {
        drop(self.keys);
        drop(self.verify);
        drop(self.channel);
        self.server.shutdown().await.expect("clean shutdown");
    }

    pub async fn issue(&mut self, workspace_id: &str, name: &str) -> pb::IssueKeyResponse {
        self.issue_with(pb::IssueKeyRequest {
            workspace_id: workspace_id.to_owned(),
            name: name.to_owned(),
            ..Default::default()
        })
        .await
    }

    pub async fn issue_with(&mut self, request: pb::IssueKeyRequest) -> pb::IssueKeyResponse {
        self.keys
            .issue_key(request)
            .await
            .expect("IssueKey succeeds")
            .into_inner()
    }

    pub async fn verify_key(&mut self, key: &str, scopes: &[&str]) -> pb::VerifyKeyResponse {
        self.verify
            .verify_key(pb::VerifyKeyRequest {
                key: key.to_owned(),
                required_scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                // No client IP: IP lockouts have tests of their own.
                client_ip: String::new(),
                cost: None,
                minimum_role: 0,
            })
            .await
            .expect("VerifyKey answers")
            .into_inner()
    }

    pub async fn get(
        &mut self,
        workspace_id: &str,
        key_id: &str,
    ) -> Result<pb::Key, tonic::Status> {
        self.keys
            .get_key(pb::GetKeyRequest {
                workspace_id: workspace_id.to_owned(),
                key_id: key_id.to_owned(),
            })
            .await
            .map(|response| response.into_inner().key.expect("GetKey returns a key"))
    }

    pub async fn revoke(
        &mut self,
        workspace_id: &str,
        key_id: &str,
    ) -> Result<pb::Key, tonic::Status> {
        self.keys
            .revoke_key(pb::RevokeKeyRequest {
                workspace_id: workspace_id.to_owned(),
                key_id: key_id.to_owned(),
                ..Default::default()
            })
            .await
            .map(|response| response.into_inner().key.expect("RevokeKey returns a key"))
    }

    pub async fn rotate(
        &mut self,
        workspace_id: &str,
        key_id: &str,
        grace: Option<prost_types::Duration>,
    ) -> Result<pb::RotateKeyResponse, tonic::Status> {
        self.keys
            .rotate_key(pb::RotateKeyRequest {
                workspace_id: workspace_id.to_owned(),
                key_id: key_id.to_owned(),
                grace_period: grace,
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
    }
}

pub fn code(response: &pb::VerifyKeyResponse) -> pb::VerifyCode {
    pb::VerifyCode::try_from(response.code).expect("a known verify code")
}

pub fn key_of(response: &pb::IssueKeyResponse) -> &pb::Key {
    response.key.as_ref().expect("a key")
}

/// The ErrorInfo reason of a refusal.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// The rows `sql` selects, read straight from the test's database (SQLite or PostgreSQL).
pub async fn query_rows<T>(db: &TestDb, sql: &'static str) -> Vec<T>
where
    T: Send
        + Unpin
        + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
        + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    match db.backend {
        Backend::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query_as(sql)
                .fetch_all(&mut connection)
                .await
                .unwrap()
        }
        Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query_as(sql)
                .fetch_all(&mut connection)
                .await
                .unwrap()
        }
    }
}

/// The one value a one-row, one-column `sql` selects.
pub async fn query_value(db: &TestDb, sql: &'static str) -> i64 {
    let rows: Vec<(i64,)> = query_rows(db, sql).await;
    rows.first().expect("one row").0
}

/// Every audit event of the database, oldest first: (key id, action, actor).
pub async fn audit_events(db: &TestDb) -> Vec<(String, String, String)> {
    query_rows(
        db,
        "select key_id, action, actor from audit_event order by event_id",
    )
    .await
}

/// Runs each listed `async fn(TestDb)` as two tests: one on SQLite, one on PostgreSQL.
macro_rules! on_both_databases {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::common::TestDb::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let Some(db) = $crate::common::TestDb::postgres().await else {
                        return;
                    };
                    super::$test(db).await;
                }
            )*
        }
    };
}

pub(crate) use on_both_databases;

// Dashboard users: HS256 JWTs signed with a secret the test servers share.

pub const JWT_SECRET: &str = "dashboard-signing-secret-for-tests";

#[derive(Serialize)]
pub struct Claims<'a> {
    pub sub: &'a str,
    pub workspace_id: &'a str,
    pub role: &'a str,
    pub exp: u64,
    pub nbf: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<&'a str>,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn claims<'a>(workspace_id: &'a str, role: &'a str) -> Claims<'a> {
    Claims {
        sub: "user-1",
        workspace_id,
        role,
        exp: now() + 600,
        nbf: now() - 10,
        iss: Some("https://dashboard.example"),
        aud: Some("key-authority"),
    }
}

pub fn hs256(claims: &Claims<'_>) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// A dashboard user's HS256 JWT (subject `user-1`) for `with_dashboard_jwts` servers.
pub fn jwt_user(workspace_id: &str, role: &str) -> String {
    hs256(&claims(workspace_id, role))
}

/// `config` accepting the HS256 dashboard JWTs of `jwt_user`.
pub fn with_dashboard_jwts(mut config: Config) -> Config {
    config.auth.jwt = Some(key_authority::auth::JwtConfig {
        secret: Some(JWT_SECRET.to_owned()),
        issuer: Some("https://dashboard.example".to_owned()),
        audience: Some("key-authority".to_owned()),
        leeway: Duration::from_secs(5),
        ..key_authority::auth::JwtConfig::default()
    });
    config
}
