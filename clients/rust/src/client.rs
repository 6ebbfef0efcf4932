//! [`KeyAuthorityClient`]: every RPC of `KeyService` and `VerifyService` over one tonic channel.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::Error;
use crate::pb;
use crate::pb::key_service_client::KeyServiceClient;
use crate::pb::verify_service_client::VerifyServiceClient;
use crate::watch::{self, KeyEventStream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A typed client of key-authority.
///
/// Cloning is cheap and clones share the channel (one HTTP/2 connection, reconnected on
/// demand), so make one per process and clone it where needed. Every method takes `&self`.
///
/// ```no_run
/// # async fn example() -> Result<(), key_authority_client::Error> {
/// use key_authority_client::{KeyAuthorityClient, pb};
///
/// let client = KeyAuthorityClient::connect("http://127.0.0.1:50051")
///     .await?
///     .with_bearer_token(&std::env::var("KEY_AUTHORITY_ADMIN_TOKEN").unwrap_or_default())?;
/// let issued = client
///     .issue_key(pb::IssueKeyRequest {
///         workspace_id: "acme".into(),
///         name: "billing worker".into(),
///         scopes: vec!["payments:read".into()],
///         ..Default::default()
///     })
///     .await?;
/// // issued.secret is the plaintext key: shown once, store it now.
/// let verdict = client
///     .verify_key(pb::VerifyKeyRequest {
///         key: issued.secret,
///         required_scopes: vec!["payments:read".into()],
///         ..Default::default()
///     })
///     .await?;
/// assert_eq!(verdict.code(), pb::VerifyCode::Valid);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct KeyAuthorityClient {
    keys: KeyServiceClient<Channel>,
    verify: VerifyServiceClient<Channel>,
    /// `Bearer <token>` for KeyService calls.
    bearer: Option<MetadataValue<Ascii>>,
    /// `Bearer <service token>` for VerifyKey, when the operator set `KEY_AUTHORITY_VERIFY_TOKENS`.
    verify_token: Option<MetadataValue<Ascii>>,
    timeout: Option<Duration>,
}

impl KeyAuthorityClient {
    /// Connects to `endpoint` (e.g. `"http://127.0.0.1:50051"`, or a configured
    /// [`Endpoint`] for TLS, timeouts and keep-alives) and fails if it cannot be reached now.
    pub async fn connect<D>(endpoint: D) -> Result<Self, Error>
    where
        D: TryInto<Endpoint>,
        D::Error: Into<BoxError>,
    {
        let endpoint = parse_endpoint(endpoint)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| Error::transport("cannot connect to key-authority", error))?;
        Ok(Self::new(channel))
    }

    /// Like [`connect`](Self::connect) but connects on the first call (and reconnects after a
    /// failure), so a service can start while key-authority is down. Calls made while it is
    /// unreachable fail with `UNAVAILABLE`. Call it inside a Tokio runtime.
    pub fn connect_lazy<D>(endpoint: D) -> Result<Self, Error>
    where
        D: TryInto<Endpoint>,
        D::Error: Into<BoxError>,
    {
        Ok(Self::new(parse_endpoint(endpoint)?.connect_lazy()))
    }

    /// A client over an existing channel.
    pub fn new(channel: Channel) -> Self {
        Self {
            keys: KeyServiceClient::new(channel.clone()),
            verify: VerifyServiceClient::new(channel),
            bearer: None,
            verify_token: None,
            timeout: None,
        }
    }

    /// Sends `authorization: Bearer <token>` on every KeyService call: a platform admin token, a
    /// dashboard JWT or an API key. The value is marked sensitive, so HTTP/2 header compression
    /// and debug output leave it out. Fails if the token is not printable ASCII.
    pub fn with_bearer_token(mut self, token: &str) -> Result<Self, Error> {
        self.bearer = Some(bearer_value(token)?);
        Ok(self)
    }

    /// Sends `authorization: Bearer <token>` on VerifyKey calls, for deployments that restrict
    /// VerifyKey with `KEY_AUTHORITY_VERIFY_TOKENS`. Fails if the token is not printable ASCII.
    pub fn with_verify_token(mut self, token: &str) -> Result<Self, Error> {
        self.verify_token = Some(bearer_value(token)?);
        Ok(self)
    }

    /// A deadline for every call: sent to the server as `grpc-timeout` and enforced here too
    /// (a call still unanswered after it fails with `DEADLINE_EXCEEDED`). None by default.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Issues a key. The response's `secret` is the plaintext key, returned only this once (a
    /// retry with the same `request_id` and the same parameters returns that same key and secret
    /// again).
    pub async fn issue_key(
        &self,
        request: pb::IssueKeyRequest,
    ) -> Result<pb::IssueKeyResponse, Error> {
        let mut client = self.keys.clone();
        self.finish(client.issue_key(self.key_request(request)))
            .await
    }

    /// Adds usage counted by a caller-side verifier to its keys' `total_requests` and
    /// `last_used_time` (needs the developer role or above). `request_id` (a UUID) is required:
    /// a retry of the same batch counts nothing and answers `replayed`. Keys of another
    /// workspace, unknown or usage-limited come back in `skipped_key_ids`.
    pub async fn report_usage(
        &self,
        request: pb::ReportUsageRequest,
    ) -> Result<pb::ReportUsageResponse, Error> {
        let mut client = self.keys.clone();
        self.finish(client.report_usage(self.key_request(request)))
            .await
    }

    /// Returns one key's public metadata.
    pub async fn get_key(&self, request: pb::GetKeyRequest) -> Result<pb::GetKeyResponse, Error> {
        let mut client = self.keys.clone();
        self.finish(client.get_key(self.key_request(request))).await
    }

    /// Lists a workspace's keys, newest first, one page at a time (pass `next_page_token` on).
    pub async fn list_keys(
        &self,
        request: pb::ListKeysRequest,
    ) -> Result<pb::ListKeysResponse, Error> {
        let mut client = self.keys.clone();
        self.finish(client.list_keys(self.key_request(request)))
            .await
    }

    /// Revokes a key; it stops verifying at once. Revoking a revoked key changes nothing. With
    /// `revoke_successors`, every key its rotations produced is revoked too, in one transaction
    /// (use it for a leaked key that whoever holds it may have rotated). Takes a `request_id`.
    pub async fn revoke_key(
        &self,
        request: pb::RevokeKeyRequest,
    ) -> Result<pb::RevokeKeyResponse, Error> {
        let mut client = self.keys.clone();
        self.finish(client.revoke_key(self.key_request(request)))
            .await
    }

    /// Replaces a key by a new one; the old key keeps working for the grace period. The
    /// successor keeps the old key's expiry and usage budget unless the request sets a new
    /// expiration (callers that may issue keys only). Takes a `request_id`: a retry returns the
    /// same successor and secret.
    pub async fn rotate_key(
        &self,
        request: pb::RotateKeyRequest,
    ) -> Result<pb::RotateKeyResponse, Error> {
        let mut client = self.keys.clone();
        self.finish(client.rotate_key(self.key_request(request)))
            .await
    }

    /// Issues a short-lived, usage-limited trial key. Needs no credentials; limited per client
    /// IP (`RESOURCE_EXHAUSTED`, reason `IP_RATE_LIMITED`, with a [`retry_delay`](Error::retry_delay)).
    /// Takes a `request_id`.
    pub async fn issue_trial_key(
        &self,
        request: pb::IssueTrialKeyRequest,
    ) -> Result<pb::IssueTrialKeyResponse, Error> {
        let mut client = self.keys.clone();
        self.finish(client.issue_trial_key(self.key_request(request)))
            .await
    }

    /// Revokes a trial key by its public prefix. Needs no credentials.
    pub async fn revoke_trial_key(
        &self,
        request: pb::RevokeTrialKeyRequest,
    ) -> Result<pb::RevokeTrialKeyResponse, Error> {
        let mut client = self.keys.clone();
        self.finish(client.revoke_trial_key(self.key_request(request)))
            .await
    }

    /// Changes a key's settings without minting a new secret; the response's `key` is the key as
    /// it is after the update, with its new `etag`.
    ///
    /// `request.key` names the key (`key_id`, `workspace_id`) and holds the new values;
    /// `update_mask` lists the fields to change among `name`, `description`, `scopes`, `role`,
    /// `metadata`, `expire_time` and `enabled` (`*` for all), and fields outside it are ignored.
    /// Always send a mask: without one the service changes only the fields set to non-default
    /// values, so `enabled: false` would change nothing. `expire_time` in the mask with no value
    /// removes the expiry. With `key.etag` set (from a key you read), the update applies only if
    /// the key is still at that version; otherwise the error is `ABORTED` with the reason
    /// `ETAG_MISMATCH` (read the key again and redo the change). A disabled key verifies as
    /// [`VerifyCode::Disabled`](pb::VerifyCode::Disabled) until it is enabled again; revoked and
    /// expired keys cannot be updated. Takes a `request_id`.
    ///
    /// ```no_run
    /// # async fn example(client: key_authority_client::KeyAuthorityClient, etag: String)
    /// # -> Result<(), key_authority_client::Error> {
    /// use key_authority_client::pb;
    ///
    /// let updated = client
    ///     .update_key(pb::UpdateKeyRequest {
    ///         key: Some(pb::Key {
    ///             workspace_id: "acme".into(),
    ///             key_id: "3kF9aQ2mX7pL".into(),
    ///             enabled: false,
    ///             etag,
    ///             ..Default::default()
    ///         }),
    ///         update_mask: Some(prost_types::FieldMask {
    ///             paths: vec!["enabled".into()],
    ///         }),
    ///         ..Default::default()
    ///     })
    ///     .await?;
    /// assert_eq!(updated.key.unwrap().state(), pb::KeyState::Disabled);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn update_key(
        &self,
        request: pb::UpdateKeyRequest,
    ) -> Result<pb::UpdateKeyResponse, Error> {
        let mut client = self.keys.clone();
        self.finish(client.update_key(self.key_request(request)))
            .await
    }

    /// Lists a workspace's audit events, newest first, one page at a time (pass
    /// `next_page_token` on, with the same filters). The filters (`key_id`, `actor_kind`,
    /// `actor_id`, `action`, `start_time` inclusive, `end_time` exclusive) combine with AND.
    pub async fn list_audit_events(
        &self,
        request: pb::ListAuditEventsRequest,
    ) -> Result<pb::ListAuditEventsResponse, Error> {
        let mut client = self.keys.clone();
        self.finish(client.list_audit_events(self.key_request(request)))
            .await
    }

    /// Watches a workspace's key events: the stored ones after `after_position` (0: from the
    /// oldest kept), or only new ones with `from_now`, then each new one as it commits, in
    /// position order. Resolves once the service accepted the watch (refusals such as
    /// `PERMISSION_DENIED` or [`EVENTS_PRUNED`](Error::is_events_pruned) come here); then the
    /// [`KeyEventStream`] yields `Result<pb::KeyEvent, Error>`. An admin names the workspace, or
    /// sets `all_workspaces` (admins only) with an empty `workspace_id`.
    ///
    /// The stream ends when the call does: with an `Err` (the connection broke, ...) or cleanly
    /// (the server is shutting down). Watch again with `after_position` set to the last position
    /// you processed ([`KeyEventStream::last_position`]) to miss nothing and see nothing twice,
    /// or let [`watch_key_events_resuming`](Self::watch_key_events_resuming) do it. Drop the
    /// stream to cancel the watch. [`with_timeout`](Self::with_timeout) bounds the wait for the
    /// service to accept the watch, not the watch itself.
    ///
    /// ```no_run
    /// # async fn example(client: key_authority_client::KeyAuthorityClient)
    /// # -> Result<(), key_authority_client::Error> {
    /// use key_authority_client::pb;
    /// use tokio_stream::StreamExt as _;
    ///
    /// let mut events = client
    ///     .watch_key_events(pb::WatchKeyEventsRequest {
    ///         workspace_id: "acme".into(),
    ///         after_position: 0, // or the last position this consumer processed
    ///         ..Default::default()
    ///     })
    ///     .await?;
    /// while let Some(event) = events.next().await {
    ///     let event = event?;
    ///     match event.r#type.as_str() {
    ///         "key.rotated" => println!("{} -> {}", event.key_id, event.new_key_id),
    ///         other => println!("{other} {}", event.key_id), // ignore types you do not know
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn watch_key_events(
        &self,
        request: pb::WatchKeyEventsRequest,
    ) -> Result<KeyEventStream, Error> {
        Ok(watch::plain(self.open_watch(request).await?))
    }

    /// Like [`watch_key_events`](Self::watch_key_events), but the stream outlives its calls:
    /// when a call ends (the server shut down, the connection broke, the service was briefly
    /// unavailable) it watches again after the last position it delivered, after a pause that
    /// starts at 100 ms and doubles up to 5 s (with jitter; the service's `RetryInfo` delay when
    /// it sends one), for as long as the stream is kept. So it misses nothing and delivers
    /// nothing twice, across restarts and replicas.
    ///
    /// Errors that watching again cannot fix (refused credentials or role, a bad request,
    /// [`EVENTS_PRUNED`](Error::is_events_pruned)) are yielded once, and the stream ends. It
    /// connects on the first poll. With `from_now`, a call that ends before delivering any event
    /// is followed by another `from_now` one, which skips what committed in between: to be exact
    /// from the start, pass an `after_position` instead. Drop the stream to stop.
    pub fn watch_key_events_resuming(&self, request: pb::WatchKeyEventsRequest) -> KeyEventStream {
        watch::resuming(self.clone(), request)
    }

    /// Creates a webhook: the workspace's key events of `event_types` (such as `key.rotated`;
    /// empty means every type, including types added later) that commit from now on are POSTed
    /// to `url` as signed JSON, one at a time in event order, retried with backoff for up to a
    /// day. Check each request with [`verify_webhook`](crate::verify_webhook).
    ///
    /// The response's `signing_secret` (`whsec_...`) is returned only this once: store it now;
    /// `webhook.secret_hint` later tells which secret a webhook has. A URL pointing at this
    /// server, or at a link-local, metadata, loopback or private address (unless the server
    /// allows private targets), is refused with `INVALID_ARGUMENT`, reason
    /// `WEBHOOK_TARGET_FORBIDDEN`. Needs the developer role or above.
    ///
    /// ```no_run
    /// # async fn example(client: key_authority_client::KeyAuthorityClient)
    /// # -> Result<(), key_authority_client::Error> {
    /// use key_authority_client::pb;
    ///
    /// let created = client
    ///     .create_webhook(pb::CreateWebhookRequest {
    ///         workspace_id: "acme".into(),
    ///         url: "https://billing.example.com/hooks/keys".into(),
    ///         event_types: vec!["key.revoked".into(), "key.rotated".into()],
    ///         ..Default::default()
    ///     })
    ///     .await?;
    /// // created.signing_secret: shown once, give it to the receiver now.
    /// # Ok(())
    /// # }
    /// ```
    pub async fn create_webhook(
        &self,
        request: pb::CreateWebhookRequest,
    ) -> Result<pb::CreateWebhookResponse, Error> {
        let mut client = self.keys.clone();
        self.finish(client.create_webhook(self.key_request(request)))
            .await
    }

    /// Lists a workspace's webhooks, oldest first (at most 16), without their secrets.
    pub async fn list_webhooks(
        &self,
        request: pb::ListWebhooksRequest,
    ) -> Result<pb::ListWebhooksResponse, Error> {
        let mut client = self.keys.clone();
        self.finish(client.list_webhooks(self.key_request(request)))
            .await
    }

    /// Deletes a webhook and its delivery history; the response holds the webhook as it was.
    /// Nothing more is sent to it (an attempt already under way finishes). An unknown webhook is
    /// `NOT_FOUND`.
    pub async fn delete_webhook(
        &self,
        request: pb::DeleteWebhookRequest,
    ) -> Result<pb::DeleteWebhookResponse, Error> {
        let mut client = self.keys.clone();
        self.finish(client.delete_webhook(self.key_request(request)))
            .await
    }

    /// Lists a webhook's deliveries, newest first, each with its attempts (HTTP status, error,
    /// duration), one page at a time (pass `next_page_token` on, with the same `state` filter).
    /// An unknown webhook is `NOT_FOUND`.
    pub async fn list_webhook_deliveries(
        &self,
        request: pb::ListWebhookDeliveriesRequest,
    ) -> Result<pb::ListWebhookDeliveriesResponse, Error> {
        let mut client = self.keys.clone();
        self.finish(client.list_webhook_deliveries(self.key_request(request)))
            .await
    }

    /// Sends a stored event to a webhook again (after the deliveries already queued for it), with
    /// the same `webhook-id` header; the response holds the new, pending delivery. For a delivery
    /// that FAILED, or a receiver that lost what it received. An event no longer stored (past the
    /// event retention) is `NOT_FOUND`.
    pub async fn redeliver_webhook_event(
        &self,
        request: pb::RedeliverWebhookEventRequest,
    ) -> Result<pb::RedeliverWebhookEventResponse, Error> {
        let mut client = self.keys.clone();
        self.finish(client.redeliver_webhook_event(self.key_request(request)))
            .await
    }

    /// Verifies a key. A refused key is an `Ok` answer with `valid == false` and a
    /// [`code`](pb::VerifyKeyResponse::code) saying why (`REVOKED`, `DISABLED`, ...); an `Err`
    /// means the request was bad or the service could not decide (`UNAVAILABLE`): never treat
    /// an `Err` as "invalid".
    pub async fn verify_key(
        &self,
        request: pb::VerifyKeyRequest,
    ) -> Result<pb::VerifyKeyResponse, Error> {
        let mut request = tonic::Request::new(request);
        if let Some(token) = &self.verify_token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        if let Some(timeout) = self.timeout {
            request.set_timeout(timeout);
        }
        let mut client = self.verify.clone();
        self.finish(client.verify_key(request)).await
    }

    /// Opens one WatchKeyEvents call; the timeout bounds the wait for the service to accept it
    /// (its response headers), never the stream.
    pub(crate) async fn open_watch(
        &self,
        request: pb::WatchKeyEventsRequest,
    ) -> Result<tonic::Streaming<pb::WatchKeyEventsResponse>, Error> {
        let mut client = self.keys.clone();
        let call = client.watch_key_events(self.authorized(request));
        let answer = match self.timeout {
            Some(timeout) => tokio::time::timeout(timeout, call)
                .await
                .map_err(|_| Error::timeout(timeout))?,
            None => call.await,
        };
        answer.map(tonic::Response::into_inner).map_err(Error::from)
    }

    fn key_request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = self.authorized(message);
        if let Some(timeout) = self.timeout {
            request.set_timeout(timeout);
        }
        request
    }

    /// A KeyService request with the bearer token, and no deadline.
    fn authorized<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.bearer {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        request
    }

    async fn finish<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Error> {
        let answer = match self.timeout {
            Some(timeout) => tokio::time::timeout(timeout, call)
                .await
                .map_err(|_| Error::timeout(timeout))?,
            None => call.await,
        };
        answer.map(tonic::Response::into_inner).map_err(Error::from)
    }
}

impl fmt::Debug for KeyAuthorityClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the tokens themselves.
        f.debug_struct("KeyAuthorityClient")
            .field("bearer_token", &self.bearer.as_ref().map(|_| "<set>"))
            .field("verify_token", &self.verify_token.as_ref().map(|_| "<set>"))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn parse_endpoint<D>(endpoint: D) -> Result<Endpoint, Error>
where
    D: TryInto<Endpoint>,
    D::Error: Into<BoxError>,
{
    endpoint.try_into().map_err(|error| {
        let error: BoxError = error.into();
        Error::invalid_argument(format!("invalid key-authority endpoint: {error}"))
    })
}

fn bearer_value(token: &str) -> Result<MetadataValue<Ascii>, Error> {
    let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| Error::invalid_argument("the token is not printable ASCII"))?;
    value.set_sensitive(true);
    Ok(value)
}
