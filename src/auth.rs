//! Who is calling, and what they may do.
//!
//! KeyService callers authenticate with `authorization: Bearer <token>`, where the token is one
//! of: a platform admin token, a JWT from the dashboard's identity provider, or an API key issued
//! by this service (checked through the same cached path as VerifyKey). VerifyService is open by
//! default; operators can require a service token or a client certificate.

pub mod jwt;
pub mod policy;
pub mod rate_limit;
mod token_set;

use std::sync::Arc;

use tonic::metadata::MetadataMap;

pub use jwt::{JwtConfig, JwtVerifier};
pub use policy::{Action, Caller};
pub use rate_limit::IssueRateLimiter;
pub use token_set::TokenSet;

use crate::error::{Error, Result};
use crate::key::{PresentedKey, WorkspaceId};
use crate::verify::{Verdict, Verifier};

/// How KeyService callers are recognised.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Platform admin tokens (compared in constant time).
    pub admin_tokens: Vec<String>,
    /// Dashboard JWT verification, when configured.
    pub jwt: Option<JwtConfig>,
    /// Service tokens VerifyKey callers must present; empty means VerifyKey is open.
    pub verify_tokens: Vec<String>,
    /// IssueKey calls allowed per user per hour (admins exempt); 0 means unlimited.
    pub issue_limit_per_hour: u32,
}

/// The bearer token of a request, if any.
pub fn bearer_token(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

pub struct Authenticator {
    admin_tokens: TokenSet,
    jwt: Option<JwtVerifier>,
    verifier: Arc<Verifier>,
}

impl Authenticator {
    pub fn new(config: &AuthConfig, verifier: Arc<Verifier>) -> Result<Self> {
        let jwt = config.jwt.as_ref().map(JwtVerifier::new).transpose()?;
        Ok(Self {
            admin_tokens: TokenSet::new(&config.admin_tokens),
            jwt,
            verifier,
        })
    }

    /// Identifies the caller of a KeyService request.
    pub async fn caller(&self, metadata: &MetadataMap) -> Result<Caller> {
        let token = bearer_token(metadata).ok_or(Error::MissingCredentials)?;
        if PresentedKey::parse(token).is_some() {
            return self.api_key_caller(token).await;
        }
        if self.admin_tokens.contains(token) {
            return Ok(Caller::Admin);
        }
        if let Some(jwt) = &self.jwt
            && token.split('.').count() == 3
        {
            return jwt.caller(token);
        }
        Err(Error::InvalidCredentials("unknown token"))
    }

    async fn api_key_caller(&self, token: &str) -> Result<Caller> {
        match self.verifier.verify(token, &[]).await? {
            Verdict::Valid(entry) => {
                let key = entry
                    .key()
                    .ok_or(Error::Internal("a valid verdict without a key".to_owned()))?;
                let workspace_id = WorkspaceId::parse(&key.workspace_id)
                    .map_err(|reason| Error::Internal(format!("stored workspace: {reason}")))?;
                Ok(Caller::ApiKey {
                    key_id: key.key_id.as_str().to_owned(),
                    prefix: key.prefix.clone(),
                    name: key.name.clone(),
                    workspace_id,
                    role: key.role,
                })
            }
            Verdict::Revoked(_) => Err(Error::InvalidCredentials("the API key is revoked")),
            Verdict::Expired(_) => Err(Error::InvalidCredentials("the API key is expired")),
            _ => Err(Error::InvalidCredentials("unknown API key")),
        }
    }
}
