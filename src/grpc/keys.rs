//! KeyService: each RPC authenticates its caller (one call), turns the request into a command,
//! hands both to the key manager with the call's context, and turns the result into the
//! response (`key_service!`). Every decision is in `keys` and `auth::policy`.

use std::sync::Arc;

use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::audit::CallContext;
use crate::auth::{Authenticator, Caller, Origin};
use crate::error::Error;
use crate::keys::KeyManager;
use crate::keys::idempotency::parse_request_id;
use crate::pb;
use crate::telemetry::rpc::call_trace_id;
use crate::verify::ClientIp;
use crate::webhooks::WebhookManager;

/// The header HTTP gateways forward a client's idempotency key in; the same as `request_id`.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

pub struct KeyServiceImpl {
    keys: Arc<KeyManager>,
    webhooks: Arc<WebhookManager>,
    auth: Arc<Authenticator>,
}

impl KeyServiceImpl {
    pub fn new(
        keys: Arc<KeyManager>,
        webhooks: Arc<WebhookManager>,
        auth: Arc<Authenticator>,
    ) -> Self {
        Self {
            keys,
            webhooks,
            auth,
        }
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

/// What the audit trail records of a call besides the change: the peer's exact address, the
/// trace, and the request id (from the request, or the `idempotency-key` header).
fn call_context<T: RequestIdField>(request: &Request<T>) -> Result<CallContext, Error> {
    let metadata = request.metadata();
    let request_id = if T::TAKES_REQUEST_ID {
        request_id(request.get_ref().request_id(), metadata)?
    } else {
        String::new()
    };
    let traceparent = metadata
        .get("traceparent")
        .and_then(|value| value.to_str().ok());
    Ok(CallContext {
        client_ip: request
            .remote_addr()
            .map(|peer| peer.ip().to_canonical().to_string())
            .unwrap_or_default(),
        trace_id: call_trace_id(traceparent),
        request_id,
    })
}

/// The request id of a call: the field, or the header when the field is empty. Both given and
/// different is a contradiction the caller must resolve.
fn request_id(field: &str, metadata: &MetadataMap) -> Result<String, Error> {
    let header = match metadata.get(IDEMPOTENCY_KEY_HEADER) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| Error::invalid(IDEMPOTENCY_KEY_HEADER, "must be ASCII"))?,
        ),
    };
    let field = (!field.is_empty())
        .then(|| parse_request_id("request_id", field))
        .transpose()?;
    let header = header
        .map(|header| parse_request_id(IDEMPOTENCY_KEY_HEADER, header))
        .transpose()?;
    match (field, header) {
        (Some(field), Some(header)) if field != header => Err(Error::invalid(
            "request_id",
            "differs from the idempotency-key header",
        )),
        (Some(id), _) | (None, Some(id)) => Ok(id),
        (None, None) => Ok(String::new()),
    }
}

/// The requests that may carry a request id, and where.
trait RequestIdField {
    const TAKES_REQUEST_ID: bool = false;

    fn request_id(&self) -> &str {
        ""
    }
}

macro_rules! request_id_field {
    (with { $($with:ty),* } without { $($without:ty),* }) => {
        $(impl RequestIdField for $with {
            const TAKES_REQUEST_ID: bool = true;

            fn request_id(&self) -> &str {
                &self.request_id
            }
        })*
        $(impl RequestIdField for $without {})*
    };
}

request_id_field! {
    with {
        pb::IssueKeyRequest, pb::RevokeKeyRequest, pb::RotateKeyRequest, pb::UpdateKeyRequest,
        pb::IssueTrialKeyRequest, pb::ReportUsageRequest
    }
    without {
        pb::GetKeyRequest, pb::ListKeysRequest, pb::ListAuditEventsRequest,
        pb::RevokeTrialKeyRequest, pb::CreateWebhookRequest, pb::ListWebhooksRequest,
        pb::DeleteWebhookRequest, pb::ListWebhookDeliveriesRequest,
        pb::RedeliverWebhookEventRequest
    }
}

/// KeyService's RPCs. Every one is the same steps: who is calling (the authenticated caller, or
/// for trial keys the request's origin), the call's context, the request converted into its
/// command, the key manager's operation, whose result converts into the response. A new RPC is
/// one line here.
macro_rules! key_service {
    (
        authenticated { $($rpc:ident($request:ty) -> $response:ty = $operation:ident;)* }
        webhooks { $($hook_rpc:ident($hook_request:ty) -> $hook_response:ty = $hook_operation:ident;)* }
        anonymous { $($open_rpc:ident($open_request:ty) -> $open_response:ty = $open_operation:ident;)* }
    ) => {
        #[tonic::async_trait]
        impl pb::key_service_server::KeyService for KeyServiceImpl {
            type WatchKeyEventsStream = super::events::WatchStream;

            async fn watch_key_events(
                &self,
                request: Request<pb::WatchKeyEventsRequest>,
            ) -> Result<Response<Self::WatchKeyEventsStream>, Status> {
                let caller = self.caller(&request).await?;
                let command = request.into_inner().try_into()?;
                let events = self.keys.watch_events(&caller, command).await?;
                let starts_after = events.starts_after();
                let mut response = Response::new(super::events::stream(events));
                // Where the watch starts, so that one opened `from_now` can be resumed exactly
                // even if it ends before its first event.
                response.metadata_mut().insert(
                    super::events::STARTS_AFTER_HEADER,
                    starts_after.into(),
                );
                Ok(response)
            }

            $(
                async fn $rpc(
                    &self,
                    request: Request<$request>,
                ) -> Result<Response<$response>, Status> {
                    let caller = self.caller(&request).await?;
                    let context = call_context(&request)?;
                    let command = request.into_inner().try_into()?;
                    let result = self.keys.$operation(&caller, &context, command).await?;
                    Ok(Response::new(result.into()))
                }
            )*
            $(
                async fn $hook_rpc(
                    &self,
                    request: Request<$hook_request>,
                ) -> Result<Response<$hook_response>, Status> {
                    let caller = self.caller(&request).await?;
                    let context = call_context(&request)?;
                    // Some requests convert infallibly; `Error::from` unifies both kinds.
                    let command = request.into_inner().try_into().map_err(Error::from)?;
                    let result = self.webhooks.$hook_operation(&caller, &context, command).await?;
                    Ok(Response::new(result.into()))
                }
            )*
            $(
                async fn $open_rpc(
                    &self,
                    request: Request<$open_request>,
                ) -> Result<Response<$open_response>, Status> {
                    // Switched off, the trial RPCs read nothing of a request.
                    self.keys.ensure_trial_enabled()?;
                    let origin = self.origin(&request);
                    let context = call_context(&request)?;
                    let command = request.into_inner().into();
                    let result = self.keys.$open_operation(&origin, &context, command);
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
        update_key(pb::UpdateKeyRequest) -> pb::UpdateKeyResponse = update;
        list_audit_events(pb::ListAuditEventsRequest) -> pb::ListAuditEventsResponse = list_audit_events;
        report_usage(pb::ReportUsageRequest) -> pb::ReportUsageResponse = report_usage;
    }
    webhooks {
        create_webhook(pb::CreateWebhookRequest) -> pb::CreateWebhookResponse = create;
        list_webhooks(pb::ListWebhooksRequest) -> pb::ListWebhooksResponse = list;
        delete_webhook(pb::DeleteWebhookRequest) -> pb::DeleteWebhookResponse = delete;
        list_webhook_deliveries(pb::ListWebhookDeliveriesRequest) -> pb::ListWebhookDeliveriesResponse = list_deliveries;
        redeliver_webhook_event(pb::RedeliverWebhookEventRequest) -> pb::RedeliverWebhookEventResponse = redeliver;
    }
    anonymous {
        issue_trial_key(pb::IssueTrialKeyRequest) -> pb::IssueTrialKeyResponse = issue_trial;
        revoke_trial_key(pb::RevokeTrialKeyRequest) -> pb::RevokeTrialKeyResponse = revoke_trial;
    }
}
