//! VerifyService: the hot path's thin gRPC shell. A refused key is a normal response.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::minimum_role_from_proto;
use super::verify_reply::{VerifyKeyReply, fresh_view, valid_view};
use crate::auth::Authenticator;
use crate::metrics::Metrics;
use crate::pb;
use crate::verify::{Verdict, Verifier, VerifyRequest};

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

pub fn verdict_code(verdict: &Verdict) -> pb::VerifyCode {
    match verdict {
        Verdict::Valid(..) => pb::VerifyCode::Valid,
        Verdict::Malformed => pb::VerifyCode::Malformed,
        Verdict::NotFound => pb::VerifyCode::NotFound,
        Verdict::Revoked(_) => pb::VerifyCode::Revoked,
        Verdict::Expired(_) => pb::VerifyCode::Expired,
        Verdict::Disabled(_) => pb::VerifyCode::Disabled,
        Verdict::InsufficientScope(_) => pb::VerifyCode::InsufficientScope,
        Verdict::InsufficientRole(_) => pb::VerifyCode::InsufficientRole,
        Verdict::Locked(_) => pb::VerifyCode::Locked,
        Verdict::UsageExhausted(_) => pb::VerifyCode::UsageExhausted,
    }
}

#[tonic::async_trait]
impl pb::verify_service_server::VerifyService for VerifyServiceImpl {
    async fn verify_key(
        &self,
        request: Request<pb::VerifyKeyRequest>,
    ) -> Result<Response<VerifyKeyReply>, Status> {
        self.auth.check_verify_caller(request.metadata())?;
        let request = request.into_inner();
        let question = VerifyRequest {
            minimum_role: minimum_role_from_proto(request.minimum_role)?,
            ..VerifyRequest::checked(
                &request.key,
                &request.required_scopes,
                &request.client_ip,
                request.cost,
            )?
        };
        let verdict = self.verifier.verify(question).await?;
        let code = verdict_code(&verdict);
        self.metrics.record_verdict(code.as_str_name());
        tracing::debug!(
            code = code.as_str_name(),
            key_prefix = verdict.key().map(|key| key.prefix.as_str()),
            "verdict"
        );
        let key = match (verdict.entry(), verdict.usage_remaining()) {
            // The warm path: the same view for every answer from this cached state.
            (Some(entry), None) if verdict.is_valid() => valid_view(entry),
            (Some(entry), remaining) => entry.key().map(|key| fresh_view(key, remaining)),
            (None, _) => None,
        };
        Ok(Response::new(VerifyKeyReply {
            valid: verdict.is_valid(),
            code: code as i32,
            key,
            retry_after: verdict
                .retry_after()
                .and_then(|wait| prost_types::Duration::try_from(wait).ok()),
        }))
    }
}
