//! KeyService: parse the request, call the key manager, build the response.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{
    duration_from_proto, environment_from_proto, key_to_proto, require_key_id, role_from_proto,
};
use crate::auth::{Action, Authenticator, Caller, IssueRateLimiter, TrialRateLimiter};
use crate::error::Error;
use crate::key::{KeyDescription, KeyName, Metadata, Scopes, WorkspaceId};
use crate::keys::{
    Actor, DEFAULT_PAGE_SIZE, Expiration, KeyManager, ListRequest, MAX_PAGE_SIZE, NewKey,
    RotateRequest, RotationRights,
};
use crate::pb;
use crate::pb::issue_key_request::Expiration as PbExpiration;
use crate::pb::rotate_key_request::Expiration as PbRotateExpiration;
use crate::timestamp;
use crate::verify::ClientIp;

pub struct KeyServiceImpl {
    keys: Arc<KeyManager>,
    auth: Arc<Authenticator>,
    issue_limiter: IssueRateLimiter,
    trial_limiter: TrialRateLimiter,
    trial_revoke_limiter: TrialRateLimiter,
}

impl KeyServiceImpl {
    pub fn new(
        keys: Arc<KeyManager>,
        auth: Arc<Authenticator>,
        issue_limiter: IssueRateLimiter,
        trial_limiter: TrialRateLimiter,
        trial_revoke_limiter: TrialRateLimiter,
    ) -> Self {
        Self {
            keys,
            auth,
            issue_limiter,
            trial_limiter,
            trial_revoke_limiter,
        }
    }

    /// The end user's address: `claimed` (a request's `client_ip`) from a trusted front end,
    /// otherwise the connection's peer.
    fn trial_client_ip<T>(&self, request: &Request<T>, claimed: &str) -> Result<ClientIp, Error> {
        if !claimed.is_empty() && self.auth.is_trusted_front_end(request.metadata()) {
            return ClientIp::parse(claimed)
                .ok_or_else(|| Error::invalid("client_ip", "must be an IPv4 or IPv6 address"));
        }
        request
            .remote_addr()
            .map(|peer| ClientIp::from(peer.ip()))
            .ok_or_else(|| Error::Internal("no peer address".to_owned()))
    }

    /// Authenticates the caller and settles the workspace the request acts in.
    async fn caller_in<T>(
        &self,
        request: &Request<T>,
        workspace_id: &str,
    ) -> Result<(Caller, WorkspaceId), Error> {
        // An API key's failures count under the connection's address: a KeyService caller is
        // not a trusted front end that could speak for someone else's.
        let peer = request.remote_addr().map(|peer| ClientIp::from(peer.ip()));
        let caller = self.auth.caller(request.metadata(), peer).await?;
        let workspace_id = caller.workspace_for(workspace_id)?;
        Ok((caller, workspace_id))
    }
}

fn parse_new_key(request: pb::IssueKeyRequest, workspace_id: WorkspaceId) -> Result<NewKey, Error> {
    let expiration = match &request.expiration {
        None => Expiration::Never,
        Some(PbExpiration::ExpireTime(at)) => Expiration::At(
            timestamp::from_proto(at)
                .ok_or_else(|| Error::invalid("expire_time", "is out of range"))?,
        ),
        Some(PbExpiration::Ttl(ttl)) => Expiration::After(duration_from_proto("ttl", ttl)?),
    };
    if request.usage_limit < 0 {
        return Err(Error::invalid("usage_limit", "must not be negative"));
    }
    Ok(NewKey {
        usage_limit: request.usage_limit,
        workspace_id,
        name: KeyName::parse(&request.name).map_err(|reason| Error::invalid("name", reason))?,
        description: KeyDescription::parse(&request.description)
            .map_err(|reason| Error::invalid("description", reason))?,
        scopes: Scopes::parse(&request.scopes)
            .map_err(|reason| Error::invalid("scopes", reason))?,
        environment: environment_from_proto(request.environment)?,
        role: role_from_proto(request.role)?,
        expiration,
        metadata: Metadata::parse(&request.metadata)
            .map_err(|reason| Error::invalid("metadata", reason))?,
    })
}

fn parse_rotate_request(
    request: &pb::RotateKeyRequest,
    rights: RotationRights,
) -> Result<RotateRequest, Error> {
    let grace_period = request
        .grace_period
        .as_ref()
        .map(|grace| duration_from_proto("grace_period", grace))
        .transpose()?;
    let expiration = match &request.expiration {
        None => None,
        Some(PbRotateExpiration::ExpireTime(at)) => Some(Expiration::At(
            timestamp::from_proto(at)
                .ok_or_else(|| Error::invalid("expire_time", "is out of range"))?,
        )),
        Some(PbRotateExpiration::Ttl(ttl)) => {
            Some(Expiration::After(duration_from_proto("ttl", ttl)?))
        }
    };
    Ok(RotateRequest {
        grace_period,
        expiration,
        rights,
    })
}

fn parse_list_request(
    request: pb::ListKeysRequest,
    workspace_id: WorkspaceId,
) -> Result<ListRequest, Error> {
    let page_size = match request.page_size {
        size if size < 0 => return Err(Error::invalid("page_size", "must not be negative")),
        0 => DEFAULT_PAGE_SIZE,
        size => (size as u32).min(MAX_PAGE_SIZE),
    };
    Ok(ListRequest {
        workspace_id,
        page_size,
        page_token: request.page_token,
        include_inactive: request.include_inactive,
    })
}

#[tonic::async_trait]
impl pb::key_service_server::KeyService for KeyServiceImpl {
    async fn issue_key(
        &self,
        request: Request<pb::IssueKeyRequest>,
    ) -> Result<Response<pb::IssueKeyResponse>, Status> {
        let (caller, workspace_id) = self
            .caller_in(&request, &request.get_ref().workspace_id)
            .await?;
        let new_key = parse_new_key(request.into_inner(), workspace_id)?;
        caller.authorize(Action::Issue { role: new_key.role })?;
        if let Some(limit_key) = caller.rate_limit_key() {
            self.issue_limiter
                .check(&limit_key)
                .map_err(Error::RateLimited)?;
        }
        let issued = self.keys.issue(new_key, &caller.actor()).await?;
        Ok(Response::new(pb::IssueKeyResponse {
            key: Some(key_to_proto(&issued.key)),
            secret: issued.plaintext,
        }))
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::GetKeyResponse>, Status> {
        let (caller, workspace_id) = self
            .caller_in(&request, &request.get_ref().workspace_id)
            .await?;
        caller.authorize(Action::Read)?;
        let key = self
            .keys
            .get(&workspace_id, require_key_id(&request.get_ref().key_id)?)
            .await?;
        Ok(Response::new(pb::GetKeyResponse {
            key: Some(key_to_proto(&key)),
        }))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let (caller, workspace_id) = self
            .caller_in(&request, &request.get_ref().workspace_id)
            .await?;
        caller.authorize(Action::Read)?;
        let page = self
            .keys
            .list(parse_list_request(request.into_inner(), workspace_id)?)
            .await?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: page.keys.iter().map(key_to_proto).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
            total_size: page.total_size,
        }))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        let (caller, workspace_id) = self
            .caller_in(&request, &request.get_ref().workspace_id)
            .await?;
        let request = request.get_ref();
        let key_id = require_key_id(&request.key_id)?;
        caller.authorize(Action::Revoke { key_id })?;
        if request.revoke_successors {
            caller.authorize(Action::RevokeWithSuccessors)?;
        }
        let revoked = self
            .keys
            .revoke(
                &workspace_id,
                key_id,
                request.revoke_successors,
                &caller.actor(),
            )
            .await?;
        Ok(Response::new(pb::RevokeKeyResponse {
            key: Some(key_to_proto(&revoked.key)),
            successors: revoked.successors.iter().map(key_to_proto).collect(),
        }))
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        let (caller, workspace_id) = self
            .caller_in(&request, &request.get_ref().workspace_id)
            .await?;
        let request = request.get_ref();
        let key_id = require_key_id(&request.key_id)?;
        caller.authorize(Action::Rotate { key_id })?;
        let rotation = parse_rotate_request(request, caller.rotation_rights())?;
        let (issued, previous) = self
            .keys
            .rotate(&workspace_id, key_id, rotation, &caller.actor())
            .await?;
        Ok(Response::new(pb::RotateKeyResponse {
            key: Some(key_to_proto(&issued.key)),
            secret: issued.plaintext,
            previous_key: Some(key_to_proto(&previous)),
        }))
    }

    async fn issue_trial_key(
        &self,
        request: Request<pb::IssueTrialKeyRequest>,
    ) -> Result<Response<pb::IssueTrialKeyResponse>, Status> {
        self.keys.ensure_trial_enabled()?;
        let client_ip = self.trial_client_ip(&request, &request.get_ref().client_ip)?;
        let name = match request.get_ref().name.as_str() {
            "" => "trial",
            name => name,
        };
        let name = KeyName::parse(name).map_err(|reason| Error::invalid("name", reason))?;
        self.trial_limiter.check(&client_ip)?;
        let issued = self
            .keys
            .issue_trial(name, &Actor::new("trial".to_owned()))
            .await?;
        Ok(Response::new(pb::IssueTrialKeyResponse {
            key: Some(key_to_proto(&issued.key)),
            secret: issued.plaintext,
        }))
    }

    async fn revoke_trial_key(
        &self,
        request: Request<pb::RevokeTrialKeyRequest>,
    ) -> Result<Response<pb::RevokeTrialKeyResponse>, Status> {
        self.keys.ensure_trial_enabled()?;
        let client_ip = self.trial_client_ip(&request, &request.get_ref().client_ip)?;
        self.trial_revoke_limiter.check(&client_ip)?;
        let key = self
            .keys
            .revoke_trial(&request.get_ref().prefix, &Actor::new("trial".to_owned()))
            .await?;
        Ok(Response::new(pb::RevokeTrialKeyResponse {
            key: Some(key_to_proto(&key)),
        }))
    }
}
