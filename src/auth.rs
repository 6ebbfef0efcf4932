//! Who is calling, and what they may do.
//!
//! KeyService callers authenticate with `authorization: Bearer <token>`, where the token is one
//! of: a platform admin token, a JWT from the dashboard's identity provider, or an API key issued
//! by this service (checked through the same cached path and the same lockouts as VerifyKey,
//! counted under the connection's peer address). VerifyService is open by default; operators can
//! require a service token or a client certificate. Once they do, KeyService refuses API keys
//! outright: answering for an API key is answering "is this key valid?", the very question the
//! verify tokens reserve for trusted front ends.

pub mod jwt;
pub mod policy;
pub mod rate_limit;
mod token_set;

use std::sync::Arc;

use tonic::metadata::MetadataMap;

pub use jwt::{JwtConfig, JwtVerifier};
pub use policy::{Action, Caller, Origin};
pub use rate_limit::{IssueRateLimiter, KeyedLimit, RateLimits, TrialRateLimiter};
pub use token_set::TokenSet;

use crate::error::{Error, Result};
use crate::key::PresentedKey;
use crate::verify::{ClientIp, Verifier, VerifyRequest};

/// How KeyService callers are recognised.
#[derive(Clone)]
pub struct AuthConfig {
    /// Platform admin tokens (compared in constant time).
    pub admin_tokens: Vec<String>,
    /// Dashboard JWT verification, when configured.
    pub jwt: Option<JwtConfig>,
    /// Service tokens VerifyKey callers must present; empty means VerifyKey is open.
    pub verify_tokens: Vec<String>,
    /// IssueKey calls allowed per user per hour (admins exempt); 0 means unlimited.
    pub issue_limit_per_hour: u32,
    /// IssueTrialKey calls allowed per client IP per minute; 0 issues none.
    pub trial_limit_per_minute: u32,
    /// RevokeTrialKey calls allowed per client IP per minute; 0 allows none.
    pub trial_revoke_limit_per_minute: u32,
}

impl Default for AuthConfig {
    /// No credentials; the default rate limits.
    fn default() -> Self {
        Self {
            admin_tokens: Vec::new(),
            jwt: None,
            verify_tokens: Vec::new(),
            issue_limit_per_hour: 10,
            trial_limit_per_minute: 5,
            trial_revoke_limit_per_minute: 5,
        }
    }
}

impl std::fmt::Debug for AuthConfig {
    /// Counts tokens, never prints them: a configuration may be logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("admin_tokens", &self.admin_tokens.len())
            .field("jwt", &self.jwt)
            .field("verify_tokens", &self.verify_tokens.len())
            .field("issue_limit_per_hour", &self.issue_limit_per_hour)
            .field("trial_limit_per_minute", &self.trial_limit_per_minute)
            .field(
                "trial_revoke_limit_per_minute",
                &self.trial_revoke_limit_per_minute,
            )
            .finish()
    }
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
    verify_tokens: TokenSet,
    jwt: Option<JwtVerifier>,
    verifier: Arc<Verifier>,
}

impl Authenticator {
    pub fn new(config: &AuthConfig, verifier: Arc<Verifier>) -> Result<Self> {
        let jwt = config.jwt.as_ref().map(JwtVerifier::new).transpose()?;
        Ok(Self {
            admin_tokens: TokenSet::new(&config.admin_tokens),
            verify_tokens: TokenSet::new(&config.verify_tokens),
            jwt,
            verifier,
        })
    }

    /// Identifies the caller of a KeyService request that came from `peer`.
    pub async fn caller(&self, metadata: &MetadataMap, peer: Option<ClientIp>) -> Result<Caller> {
        let token = bearer_token(metadata).ok_or(Error::MissingCredentials)?;
        if PresentedKey::parse(token).is_some() {
            // Refused before any lookup: no answer here may tell a right key from a wrong one.
            if !self.verify_tokens.is_empty() {
                return Err(Error::InvalidCredentials(
                    "API keys cannot call KeyService on a server that requires verify tokens",
                ));
            }
            return self.api_key_caller(token, peer).await;
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

    /// Lets a VerifyKey call through: always when no verify tokens are configured, otherwise
    /// only with one of them.
    pub fn check_verify_caller(&self, metadata: &MetadataMap) -> Result<()> {
        self.check_verify_token(|| bearer_token(metadata))
    }

    /// The same rule for a caller whose token arrives elsewhere (the HTTP gateway's header).
    pub fn check_verify_token<'a>(&self, token: impl FnOnce() -> Option<&'a str>) -> Result<()> {
        if self.verify_tokens.is_empty() {
            return Ok(());
        }
        let token = token().ok_or(Error::MissingCredentials)?;
        if self.verify_tokens.contains(token) {
            return Ok(());
        }
        Err(Error::InvalidCredentials("unknown verify token"))
    }

    /// True for a trusted front end (a caller with an admin or verify token), whose word on the
    /// end user's IP address is taken.
    pub fn is_trusted_front_end(&self, metadata: &MetadataMap) -> bool {
        bearer_token(metadata).is_some_and(|token| {
            self.admin_tokens.contains(token) || self.verify_tokens.contains(token)
        })
    }

    async fn api_key_caller(&self, token: &str, peer: Option<ClientIp>) -> Result<Caller> {
        // A management call checks the key without consuming any of a usage limit. Its wrong
        // guesses count against the key and the caller's address like VerifyKey's.
        let check = VerifyRequest {
            cost: 0,
            client_ip: peer,
            ..VerifyRequest::key(token)
        };
        policy::api_key_caller(&self.verifier.verify(check).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_tokens() {
        let config = AuthConfig {
            admin_tokens: vec!["admin-secret-token".to_owned()],
            verify_tokens: vec!["verify-secret-token".to_owned()],
            ..AuthConfig::default()
        };
        let printed = format!("{config:?}");
        assert!(!printed.contains("admin-secret-token"), "{printed}");
        assert!(!printed.contains("verify-secret-token"), "{printed}");
    }
}
