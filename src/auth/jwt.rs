//! Dashboard users: JWTs signed by the dashboard's identity provider, with an HS256 secret or a
//! public key (EdDSA, ES256 or RS256, recognised from the PEM file).

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::policy::Caller;
use crate::error::{Error, Result};
use crate::key::{Role, WorkspaceId};

/// Clock skew allowed on `exp` and `nbf` unless configured otherwise.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// How dashboard JWTs are verified.
#[derive(Clone, Default)]
pub struct JwtConfig {
    /// HS256 shared secret.
    pub secret: Option<String>,
    /// PEM public key (EdDSA, ES256 or RS256).
    pub public_key_pem: Option<Vec<u8>>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("public_key_pem", &self.public_key_pem.is_some())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    workspace_id: String,
    role: String,
}

pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl JwtVerifier {
    pub fn new(config: &JwtConfig) -> Result<Self> {
        let (key, algorithm) = match (&config.secret, &config.public_key_pem) {
            (Some(secret), None) => (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            (None, Some(pem)) => public_key(pem)?,
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "jwt",
                    "configure either a JWT secret or a JWT public key file, not both",
                ));
            }
            (None, None) => return Err(Error::invalid("jwt", "no JWT key configured")),
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = config.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // jsonwebtoken compares `iss` and `aud` only when a token has them: a configured one
        // must also be required, or a token that simply lacks it passes.
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Self { key, validation })
    }

    /// The dashboard user a token names, if its signature and claims check out.
    pub fn caller(&self, token: &str) -> Result<Caller> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |error| {
                tracing::debug!(%error, "jwt refused");
                Error::InvalidCredentials(match error.kind() {
                    ErrorKind::ExpiredSignature => "the token is expired",
                    ErrorKind::ImmatureSignature => "the token is not valid yet",
                    ErrorKind::InvalidAudience => "the token is for another audience",
                    ErrorKind::InvalidIssuer => "the token is from another issuer",
                    ErrorKind::InvalidSignature => "the token's signature does not verify",
                    ErrorKind::MissingRequiredClaim(claim) => missing_claim_message(claim),
                    _ => "the token is not a valid JWT",
                })
            },
        )?;
        let claims = data.claims;
        let role = Role::from_db(&claims.role)
            .and_then(super::policy::dashboard_role)
            .ok_or(Error::InvalidCredentials("the token's role is unknown"))?;
        let workspace_id = WorkspaceId::parse(&claims.workspace_id)
            .map_err(|_| Error::InvalidCredentials("the token's workspace_id is invalid"))?;
        if claims.sub.is_empty() {
            return Err(Error::InvalidCredentials("the token has no subject"));
        }
        // The subject is written to the audit trail (`user:<sub>`): no control characters, NUL
        // above all, which PostgreSQL cannot store.
        if claims.sub.chars().any(char::is_control) {
            return Err(Error::InvalidCredentials(
                "the token's subject contains control characters",
            ));
        }
        Ok(Caller::User {
            subject: claims.sub,
            workspace_id,
            role,
        })
    }
}

/// Why a token without a required claim is refused. jsonwebtoken counts a claim of the wrong
/// type (a numeric `iss`, say) as missing, hence "valid".
fn missing_claim_message(claim: &str) -> &'static str {
    match claim {
        "iss" => "the token has no valid iss claim",
        "aud" => "the token has no valid aud claim",
        "exp" => "the token has no valid exp claim",
        "sub" => "the token has no valid sub claim",
        _ => "the token lacks a required claim",
    }
}

/// Recognises the key type of a PEM public key.
fn public_key(pem: &[u8]) -> Result<(DecodingKey, Algorithm)> {
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        return Ok((key, Algorithm::EdDSA));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        return Ok((key, Algorithm::ES256));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok((key, Algorithm::RS256));
    }
    Err(Error::invalid(
        "jwt_public_key_file",
        "not a PEM Ed25519, P-256 or RSA public key",
    ))
}
