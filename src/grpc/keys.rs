//! KeyService: each RPC authenticates its caller (one call), turns the request into a command,
//! hands both to the key manager, and turns the result into the response. Every decision is in
//! `keys` and `auth::policy`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::key_to_proto;
use crate::auth::{Authenticator, Caller, Origin};
use crate::error::Error;
use crate::keys::KeyManager;
use crate::pb;
use crate::verify::ClientIp;

pub struct KeyServiceImpl {
    keys: Arc<KeyManager>,
    auth: Arc<Authenticator>,
}

impl KeyServiceImpl {
    pub fn new(keys: Arc<KeyManager>, auth: Arc<Authenticator>) -> Self {
        Self { keys, auth }
    }

    /// Where the request came from: its peer, and whether it carries a front end's token.
    fn origin<T>(&self, request: &Request<T>) -> Origin {
        Origin {
            peer: request.remote_addr().map(|peer| ClientIp::from(peer.ip())),
            trusted_front_end: self.auth.is_trusted_front_end(request.metadata()),
        }
    }

    /// The authenticated caller. An API key's failures count under the connection's address:
    /// a KeyService caller is not a trusted front end that could speak for someone else's.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Error> {
        let peer = request.remote_addr().map(|peer| ClientIp::from(peer.ip()));
        self.auth.caller(request.metadata(), peer).await
    }
}

#[tonic::async_trait]
impl pb::key_service_server::KeyService for KeyServiceImpl {
    async fn issue_key(
        &self,
        request: Request<pb::IssueKeyRequest>,
    ) -> Result<Response<pb::IssueKeyResponse>, Status> {
        let caller = self.caller(&request).await?;
        let issued = self.keys.issue(&caller, request.into_inner().try_into()?);
        Ok(Response::new(issued.await?.into()))
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::GetKeyResponse>, Status> {
        let caller = self.caller(&request).await?;
        let key = self.keys.get(&caller, request.into_inner().try_into()?);
        Ok(Response::new(pb::GetKeyResponse {
            key: Some(key_to_proto(&key.await?)),
        }))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let caller = self.caller(&request).await?;
        let page = self.keys.list(&caller, request.into_inner().try_into()?);
        Ok(Response::new(page.await?.into()))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        let caller = self.caller(&request).await?;
        let revoked = self.keys.revoke(&caller, request.into_inner().try_into()?);
        Ok(Response::new(revoked.await?.into()))
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        let caller = self.caller(&request).await?;
        let rotated = self.keys.rotate(&caller, request.into_inner().try_into()?);
        Ok(Response::new(rotated.await?.into()))
    }

    async fn issue_trial_key(
        &self,
        request: Request<pb::IssueTrialKeyRequest>,
    ) -> Result<Response<pb::IssueTrialKeyResponse>, Status> {
        let origin = self.origin(&request);
        let issued = self.keys.issue_trial(&origin, request.into_inner().into());
        Ok(Response::new(issued.await?.into()))
    }

    async fn revoke_trial_key(
        &self,
        request: Request<pb::RevokeTrialKeyRequest>,
    ) -> Result<Response<pb::RevokeTrialKeyResponse>, Status> {
        let origin = self.origin(&request);
        let key = self.keys.revoke_trial(&origin, request.into_inner().into());
        Ok(Response::new(pb::RevokeTrialKeyResponse {
            key: Some(key_to_proto(&key.await?)),
        }))
    }
}
