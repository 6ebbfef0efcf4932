//! KeyService: each RPC authenticates its caller (one call), turns the request into a command,
//! hands both to the key manager, and turns the result into the response (`key_service!`).
//! Every decision is in `keys` and `auth::policy`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

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

/// KeyService's RPCs. Every one is the same three steps: who is calling (the authenticated
/// caller, or for trial keys the request's origin), the request converted into its command, the
/// key manager's operation, whose result converts into the response. A new RPC is one line here.
macro_rules! key_service {
    (
        authenticated { $($rpc:ident($request:ty) -> $response:ty = $operation:ident;)* }
        anonymous { $($open_rpc:ident($open_request:ty) -> $open_response:ty = $open_operation:ident;)* }
    ) => {
        #[tonic::async_trait]
        impl pb::key_service_server::KeyService for KeyServiceImpl {
            $(
                async fn $rpc(
                    &self,
                    request: Request<$request>,
                ) -> Result<Response<$response>, Status> {
                    let caller = self.caller(&request).await?;
                    let command = request.into_inner().try_into()?;
                    let result = self.keys.$operation(&caller, command).await?;
                    Ok(Response::new(result.into()))
                }
            )*
            $(
                async fn $open_rpc(
                    &self,
                    request: Request<$open_request>,
                ) -> Result<Response<$open_response>, Status> {
                    let origin = self.origin(&request);
                    let result = self.keys.$open_operation(&origin, request.into_inner().into());
                    Ok(Response::new(result.await?.into()))
                }
            )*
        }
    };
}

key_service! {
    authenticated {
        issue_key(pb::IssueKeyRequest) -> pb::IssueKeyResponse = issue;
        get_key(pb::GetKeyRequest) -> pb::GetKeyResponse = get;
        list_keys(pb::ListKeysRequest) -> pb::ListKeysResponse = list;
        revoke_key(pb::RevokeKeyRequest) -> pb::RevokeKeyResponse = revoke;
        rotate_key(pb::RotateKeyRequest) -> pb::RotateKeyResponse = rotate;
    }
    anonymous {
        issue_trial_key(pb::IssueTrialKeyRequest) -> pb::IssueTrialKeyResponse = issue_trial;
        revoke_trial_key(pb::RevokeTrialKeyRequest) -> pb::RevokeTrialKeyResponse = revoke_trial;
    }
}
