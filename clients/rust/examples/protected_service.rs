//! A tiny gRPC service (`echo.v1.EchoService`) that only answers callers holding an API key with
//! the scope `echo:call`, checked by key-authority through `VerifyKeyLayer`. grpc.health stays
//! open.
//!
//! ```sh
//! cargo run --release -- serve                                        # key-authority on :50051
//! KEY_AUTHORITY_URL=http://127.0.0.1:50051 LISTEN=127.0.0.1:50052 \
//!   cargo run -p key-authority-client --example protected_service
//! grpcurl -plaintext -import-path clients/rust/proto -proto echo/v1/echo.proto \
//!   -H "authorization: Bearer ka_live_…" -d '{"message": "hello"}' \
//!   127.0.0.1:50052 echo.v1.EchoService/Echo
//! ```

use key_authority_client::{KeyAuthorityClient, VerifiedKey, VerifyKeyLayer};
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use tower::Layer as _;

mod echo {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("echo.v1");
}

use echo::echo_service_server::{EchoService, EchoServiceServer};
use echo::{EchoRequest, EchoResponse};

struct Echo;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        // The layer let the call in, so the verified key is in the extensions.
        let caller = request
            .extensions()
            .get::<VerifiedKey>()
            .cloned()
            .ok_or_else(|| Status::internal("not behind VerifyKeyLayer"))?;
        println!(
            "echo for workspace {} (key {})",
            caller.workspace_id, caller.prefix
        );
        Ok(Response::new(EchoResponse {
            message: request.into_inner().message,
            workspace_id: caller.workspace_id,
            key_id: caller.key_id,
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let key_authority_url =
        std::env::var("KEY_AUTHORITY_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:50052".into());

    let key_authority = KeyAuthorityClient::connect_lazy(key_authority_url)?;
    let verify_keys = VerifyKeyLayer::new(key_authority).require_scopes(["echo:call"]);
    let (_, health) = tonic_health::server::health_reporter();

    println!("echo.v1.EchoService on {listen}, keys checked by key-authority");
    Server::builder()
        .add_service(health) // open: load balancers probe it without a key
        .add_service(verify_keys.layer(EchoServiceServer::new(Echo))) // needs scope echo:call
        .serve_with_shutdown(listen.parse()?, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
