//! A real key-authority per test, and an echo service protected by a VerifyKeyLayer.

use std::net::SocketAddr;
use std::time::Duration;

use key_authority::key::HashParams;
use key_authority::server::{Config, RunningServer};
use key_authority_client::{KeyAuthorityClient, VerifiedKey, VerifyKeyLayer, pb};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use tower::Layer as _;

pub mod echo {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("echo.v1");
}

use echo::echo_service_client::EchoServiceClient;
use echo::echo_service_server::{EchoService, EchoServiceServer};
use echo::{EchoRequest, EchoResponse};

/// The platform admin token of every test server.
pub const ADMIN_TOKEN: &str = "client-tests-admin-token-0123456789";

/// key-authority on a free port with its own database, removed when this is dropped.
pub struct KeyAuthority {
    pub server: RunningServer,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl KeyAuthority {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        Self::start_in(dir, SocketAddr::from(([127, 0, 0, 1], 0)), adjust).await
    }

    /// Stops the server gracefully and starts it again on the same address and database, so
    /// clients reconnect to it as to a restarted (or another) replica.
    pub async fn restart(self) -> Self {
        let Self {
            server, _dir: dir, ..
        } = self;
        let address = server.local_addr;
        server.shutdown().await.expect("clean shutdown");
        Self::start_in(dir, address, |_| {}).await
    }

    async fn start_in(
        dir: tempfile::TempDir,
        listen: SocketAddr,
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = Config::with_database(format!("sqlite://{}/db", dir.path().display()));
        config.listen = listen;
        config.auth.admin_tokens = vec![ADMIN_TOKEN.to_owned()];
        // Cheap argon2: these tests are about the client, not the hash.
        config.hash_params = HashParams {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        };
        config.shutdown_grace = Duration::from_secs(2);
        adjust(&mut config);
        let server = RunningServer::start(config)
            .await
            .expect("key-authority starts");
        let url = format!("http://{}", server.local_addr);
        Self {
            server,
            url,
            _dir: dir,
        }
    }

    /// A client acting as the platform admin.
    pub async fn admin(&self) -> KeyAuthorityClient {
        KeyAuthorityClient::connect(self.url.clone())
            .await
            .expect("connects")
            .with_bearer_token(ADMIN_TOKEN)
            .expect("an ASCII token")
    }

    /// How many VerifyKey calls with a well-formed key reached the server so far (each is a
    /// verdict-cache hit or miss there).
    pub fn verify_calls(&self) -> u64 {
        let stats = self.server.verifier.cache_stats();
        stats.verdict_hits + stats.verdict_misses
    }

    /// Graceful shutdown: afterwards nothing listens on its port.
    pub async fn stop(self) {
        self.server.shutdown().await.expect("clean shutdown");
    }
}

/// Issues a key in `workspace` and returns its id and plaintext.
pub async fn issue(
    admin: &KeyAuthorityClient,
    workspace: &str,
    scopes: &[&str],
    usage_limit: i64,
) -> (String, String) {
    let issued = admin
        .issue_key(pb::IssueKeyRequest {
            workspace_id: workspace.into(),
            name: format!("{workspace} test key"),
            scopes: scopes.iter().map(|scope| scope.to_string()).collect(),
            usage_limit,
            ..Default::default()
        })
        .await
        .expect("IssueKey");
    (issued.key.expect("a key").key_id, issued.secret)
}

/// Answers with the message and the caller's workspace and key id, from the VerifiedKey.
struct Echo;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let caller = request
            .extensions()
            .get::<VerifiedKey>()
            .cloned()
            .ok_or_else(|| Status::internal("no VerifiedKey"))?;
        Ok(Response::new(EchoResponse {
            message: request.into_inner().message,
            workspace_id: caller.workspace_id,
            key_id: caller.key_id,
        }))
    }
}

/// Serves EchoService behind `layer` on a free port (until the test's runtime ends).
pub async fn serve_echo(layer: VerifyKeyLayer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("an address");
    tokio::spawn(
        Server::builder()
            .add_service(layer.layer(EchoServiceServer::new(Echo)))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    address
}

/// Calls Echo with `authorization: Bearer <key>`, or with no header at all.
pub async fn echo(address: SocketAddr, key: Option<&str>) -> Result<EchoResponse, Status> {
    echo_with_header(address, key.map(|key| format!("Bearer {key}")).as_deref()).await
}

/// Calls Echo with this exact `authorization` header value, if any.
pub async fn echo_with_header(
    address: SocketAddr,
    authorization: Option<&str>,
) -> Result<EchoResponse, Status> {
    let mut client = EchoServiceClient::connect(format!("http://{address}"))
        .await
        .expect("the echo service is up");
    let mut request = Request::new(EchoRequest {
        message: "hello".into(),
    });
    if let Some(value) = authorization {
        let value: MetadataValue<_> = value.parse().expect("an ASCII header");
        request.metadata_mut().insert("authorization", value);
    }
    client.echo(request).await.map(Response::into_inner)
}

/// The ErrorInfo reason and domain of a refusal.
pub fn reason(status: &Status) -> (String, String) {
    let error = key_authority_client::Error::from(status.clone());
    let info = error.error_info().expect("an ErrorInfo detail");
    (info.reason.clone(), info.domain.clone())
}
