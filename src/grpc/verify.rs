//! VerifyService: the hot path's thin gRPC shell. A refused key is a normal response.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::verify_reply::{VerifyKeyReply, fresh_view, valid_view};
use crate::auth::Authenticator;
use crate::error::Error;
use crate::key::Scope;
use crate::metrics::Metrics;
use crate::pb;
use crate::verify::{ClientIp, Verdict, Verifier, VerifyRequest};

/// Required scopes beyond this are a bad request, not a verdict.
const MAX_REQUIRED_SCOPES: usize = 64;

pub struct VerifyServiceImpl {
    verifier: Arc<Verifier>,
    /// Decides who may call VerifyKey (open unless verify tokens are configured).
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
}

impl VerifyServiceImpl {
    pub fn new(verifier: Arc<Verifier>, auth: Arc<Authenticator>, metrics: Arc<Metrics>) -> Self {
        Self {
            verifier,
            auth,
            metrics,
        }
    }
}

fn verdict_code(verdict: &Verdict) -> pb::VerifyCode {
    match verdict {
        Verdict::Valid(..) => pb::VerifyCode::Valid,
        Verdict::Malformed => pb::VerifyCode::Malformed,
        Verdict::NotFound => pb::VerifyCode::NotFound,
        Verdict::Revoked(_) => pb::VerifyCode::Revoked,
        Verdict::Expired(_) => pb::VerifyCode::Expired,
        Verdict::InsufficientScope(_) => pb::VerifyCode::InsufficientScope,
        Verdict::Locked(_) => pb::VerifyCode::Locked,
        Verdict::UsageExhausted(_) => pb::VerifyCode::UsageExhausted,
    }
}

fn parse_client_ip(text: &str) -> Result<Option<ClientIp>, Error> {
    if text.is_empty() {
        return Ok(None);
    }
    ClientIp::parse(text)
        .map(Some)
        .ok_or_else(|| Error::invalid("client_ip", "must be an IPv4 or IPv6 address"))
}

#[tonic::async_trait]
impl pb::verify_service_server::VerifyService for VerifyServiceImpl {
    async fn verify_key(
        &self,
        request: Request<pb::VerifyKeyRequest>,
    ) -> Result<Response<VerifyKeyReply>, Status> {
        self.auth.check_verify_caller(request.metadata())?;
        let request = request.into_inner();
        if request.required_scopes.len() > MAX_REQUIRED_SCOPES {
            return Err(Error::invalid(
                "required_scopes",
                format!("at most {MAX_REQUIRED_SCOPES} scopes are allowed"),
            )
            .into());
        }
        // A required scope no key can hold is a caller's bug: say so, rather than answer
        // INSUFFICIENT_SCOPE (or VALID, for a full-access key).
        for scope in &request.required_scopes {
            Scope::check(scope).map_err(|reason| Error::invalid("required_scopes", reason))?;
        }
        let cost = request.cost.unwrap_or(1);
        if cost < 0 {
            return Err(Error::invalid("cost", "must not be negative").into());
        }
        let verdict = self
            .verifier
            .verify(VerifyRequest {
                key: &request.key,
                required_scopes: &request.required_scopes,
                client_ip: parse_client_ip(&request.client_ip)?,
                cost,
            })
            .await?;
        let code = verdict_code(&verdict);
        self.metrics.record_verdict(code.as_str_name());
        tracing::debug!(
            code = code.as_str_name(),
            key_prefix = verdict.key().map(|key| key.prefix.as_str()),
            "verdict"
        );
        let key = match &verdict {
            // The warm path: the same view for every answer from this cached state.
            Verdict::Valid(entry, None) => valid_view(entry),
            // The decrement's own answer is exact; the cached state's count is not.
            Verdict::Valid(entry, Some(remaining)) => {
                entry.key().map(|key| fresh_view(key, Some(*remaining)))
            }
            Verdict::UsageExhausted(entry) => entry.key().map(|key| fresh_view(key, Some(0))),
            other => other.key().map(|key| fresh_view(key, None)),
        };
        let retry_after = match verdict {
            Verdict::Locked(remaining) => prost_types::Duration::try_from(remaining).ok(),
            _ => None,
        };
        Ok(Response::new(VerifyKeyReply {
            valid: code == pb::VerifyCode::Valid,
            code: code as i32,
            key,
            retry_after,
        }))
    }
}
