//! Gateways: the key authority in front of HTTP APIs with configuration only. Envoy's
//! `ext_authz` (`envoy.service.auth.v3.Authorization/Check`, on the gRPC port) and HTTP forward
//! auth (`--http-listen`, for nginx `auth_request`, Caddy `forward_auth`, Traefik `ForwardAuth`).
//!
//! Both are translators, like `grpc/`: each parses its request into the same VerifyKey question
//! (`decision`), asks the same verifier, and renders the verdict in its protocol. No decision
//! is made twice.

mod client_address;
mod decision;
pub mod ext_authz;
pub mod forward_auth;
mod presented;
mod routes;

use std::path::PathBuf;

pub use client_address::TrustedProxies;
pub use decision::{Decision, Gateway, GatewayKind, Identity, Refusal};
pub use routes::{GatewayRoutes, IdentityHeaders, KeyHeaders, Requirement};

/// The gateways' settings (`--http-listen`, `--gateway-config`, `--trusted-proxies`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GatewayConfig {
    /// Where HTTP forward auth listens; None: it is off.
    pub http_listen: Option<std::net::SocketAddr>,
    /// The gateway file's routes and header names (defaults when no file is given).
    pub routes: GatewayRoutes,
    /// The file they came from, for the start-up log.
    pub routes_file: Option<PathBuf>,
    pub trusted_proxies: TrustedProxies,
}

impl GatewayConfig {
    /// Reads and checks the gateway file; the error names the file and what is wrong.
    pub fn read_routes(path: &std::path::Path) -> Result<GatewayRoutes, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read gateway file {}: {error}", path.display()))?;
        GatewayRoutes::parse(&text)
            .map_err(|error| format!("gateway file {}: {error}", path.display()))
    }
}
