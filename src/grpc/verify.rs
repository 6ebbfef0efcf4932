//! VerifyService: the hot path's thin gRPC shell. A refused key is a normal response.

use std::sync::Arc;

use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::convert::key_to_proto;
use crate::auth::{TokenSet, bearer_token};
use crate::error::Error;
use crate::pb;
use crate::verify::{Verdict, Verifier};

/// Required scopes beyond this are a bad request, not a verdict.
const MAX_REQUIRED_SCOPES: usize = 64;

pub struct VerifyServiceImpl {
    verifier: Arc<Verifier>,
    /// Service tokens callers must present; empty means VerifyKey is open.
    callers: TokenSet,
}

impl VerifyServiceImpl {
    pub fn new(verifier: Arc<Verifier>, callers: TokenSet) -> Self {
        Self { verifier, callers }
    }

    fn check_caller(&self, metadata: &MetadataMap) -> Result<(), Error> {
        if self.callers.is_empty() {
            return Ok(());
        }
        let token = bearer_token(metadata).ok_or(Error::MissingCredentials)?;
        if self.callers.contains(token) {
            return Ok(());
        }
        Err(Error::InvalidCredentials("unknown verify token"))
    }
}

fn verdict_code(verdict: &Verdict) -> pb::VerifyCode {
    match verdict {
        Verdict::Valid(_) => pb::VerifyCode::Valid,
        Verdict::Malformed => pb::VerifyCode::Malformed,
        Verdict::NotFound => pb::VerifyCode::NotFound,
        Verdict::Revoked(_) => pb::VerifyCode::Revoked,
        Verdict::Expired(_) => pb::VerifyCode::Expired,
        Verdict::InsufficientScope(_) => pb::VerifyCode::InsufficientScope,
    }
}

#[tonic::async_trait]
impl pb::verify_service_server::VerifyService for VerifyServiceImpl {
    async fn verify_key(
        &self,
        request: Request<pb::VerifyKeyRequest>,
    ) -> Result<Response<pb::VerifyKeyResponse>, Status> {
        self.check_caller(request.metadata())?;
        let request = request.into_inner();
        if request.required_scopes.len() > MAX_REQUIRED_SCOPES {
            return Err(Error::invalid(
                "required_scopes",
                format!("at most {MAX_REQUIRED_SCOPES} scopes are allowed"),
            )
            .into());
        }
        let verdict = self
            .verifier
            .verify(&request.key, &request.required_scopes)
            .await?;
        let code = verdict_code(&verdict);
        Ok(Response::new(pb::VerifyKeyResponse {
            valid: code == pb::VerifyCode::Valid,
            code: code as i32,
            key: verdict.key().map(key_to_proto),
        }))
    }
}
