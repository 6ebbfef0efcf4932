"""A thin, typed wrapper over the generated KeyService and VerifyService stubs.

Every method sends one RPC and returns the generated protobuf message. Refusals raise the
``grpc.RpcError`` of the call unchanged; :func:`error_details` reads its ``google.rpc.ErrorInfo``,
``RetryInfo`` and ``BadRequest`` details. A refused key in VerifyKey is not an error: it is a
normal answer with ``valid == False`` and a ``code`` (``VERIFY_CODE_DISABLED`` included).

The mutations (issue, rotate, revoke, update, issue_trial) take a ``request_id``: a UUID such as
``str(uuid.uuid4())``, unique to the operation. Retrying with the same request id and the same
arguments returns the first call's answer (the same ``secret`` included) and changes nothing; the
same request id with other arguments is refused with ``FAILED_PRECONDITION``, reason
``IDEMPOTENCY_KEY_REUSED``.

:meth:`KeyAuthority.watch_key_events` streams key events (``event_pb2.KeyEvent``) as a
:class:`KeyEventWatch`: an iterator that can be cancelled from any thread and, with
``resume=True``, carries on by itself after a dropped connection from the last position it
delivered.

The webhook methods (:meth:`KeyAuthority.create_webhook` and the rest) manage the HTTP endpoints
that a workspace's key events are POSTed to; a receiver checks each request with
:func:`keyauthority_client.verify_webhook`.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import grpc
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ._gen.keyauthority.v1 import (
    audit_pb2,
    event_pb2,
    key_pb2,
    key_service_pb2,
    key_service_pb2_grpc,
    verify_service_pb2,
    verify_service_pb2_grpc,
    webhook_pb2,
)

#: The ``domain`` of every ErrorInfo key-authority sends.
ERROR_DOMAIN = "keyauthority.v1"

Seconds = dt.timedelta | float | int


def _duration(value: Seconds) -> duration_pb2.Duration:
    if not isinstance(value, dt.timedelta):
        value = dt.timedelta(seconds=value)
    duration = duration_pb2.Duration()
    duration.FromTimedelta(value)
    return duration


def _timestamp(value: dt.datetime, name: str = "expire_time") -> timestamp_pb2.Timestamp:
    if value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (e.g. datetime.now(timezone.utc))")
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromDatetime(value)
    return timestamp


#: The Key fields UpdateKey can change, in the order of the proto's update_mask comment.
UPDATABLE_FIELDS = (
    "name",
    "description",
    "scopes",
    "role",
    "metadata",
    "expire_time",
    "enabled",
)


class KeyAuthority:
    """A client of one key-authority endpoint.

    ``admin_token`` is the bearer token sent with every KeyService call: a platform admin token,
    a dashboard JWT or an API key of this service. ``verify_token`` is sent with VerifyKey, only
    needed when the operator set ``KEY_AUTHORITY_VERIFY_TOKENS``. Without ``credentials`` the
    channel is plaintext; pass ``grpc.ssl_channel_credentials(...)`` for TLS or mutual TLS.
    """

    def __init__(
        self,
        target: str,
        admin_token: str | None = None,
        *,
        verify_token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.target = target
        if credentials is None:
            self._channel = grpc.insecure_channel(target)
        else:
            self._channel = grpc.secure_channel(target, credentials)
        self._keys = key_service_pb2_grpc.KeyServiceStub(self._channel)
        self._verify = verify_service_pb2_grpc.VerifyServiceStub(self._channel)
        self._key_auth = _bearer(admin_token)
        self._verify_auth = _bearer(verify_token)
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KeyAuthority:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # KeyService ---------------------------------------------------------------------------------

    def issue_key(
        self,
        workspace_id: str,
        name: str,
        *,
        description: str = "",
        scopes: Iterable[str] = (),
        environment: key_pb2.Environment = key_pb2.ENVIRONMENT_UNSPECIFIED,
        role: key_pb2.Role = key_pb2.ROLE_UNSPECIFIED,
        ttl: Seconds | None = None,
        expire_time: dt.datetime | None = None,
        metadata: Mapping[str, str] | None = None,
        usage_limit: int = 0,
        request_id: str = "",
    ) -> key_service_pb2.IssueKeyResponse:
        """Issues a key. The response's ``secret`` is the whole key, shown this once only (a retry
        with the same ``request_id`` and arguments returns that same key and secret again)."""
        if ttl is not None and expire_time is not None:
            raise ValueError("give ttl or expire_time, not both")
        request = key_service_pb2.IssueKeyRequest(
            workspace_id=workspace_id,
            name=name,
            description=description,
            scopes=list(scopes),
            environment=environment,
            role=role,
            metadata=dict(metadata or {}),
            usage_limit=usage_limit,
            request_id=request_id,
        )
        if ttl is not None:
            request.ttl.CopyFrom(_duration(ttl))
        if expire_time is not None:
            request.expire_time.CopyFrom(_timestamp(expire_time))
        return self._keys.IssueKey(request, metadata=self._key_auth, timeout=self.timeout)

    def get_key(self, workspace_id: str, key_id: str) -> key_pb2.Key:
        request = key_service_pb2.GetKeyRequest(workspace_id=workspace_id, key_id=key_id)
        return self._keys.GetKey(request, metadata=self._key_auth, timeout=self.timeout).key

    def list_keys(
        self,
        workspace_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        include_inactive: bool = False,
    ) -> key_service_pb2.ListKeysResponse:
        """One page of a workspace's keys, newest first."""
        request = key_service_pb2.ListKeysRequest(
            workspace_id=workspace_id,
            page_size=page_size,
            page_token=page_token,
            include_inactive=include_inactive,
        )
        return self._keys.ListKeys(request, metadata=self._key_auth, timeout=self.timeout)

    def iter_keys(
        self, workspace_id: str, *, page_size: int = 0, include_inactive: bool = False
    ) -> Iterator[key_pb2.Key]:
        """Every key of a workspace, newest first, fetching pages as needed."""
        token = ""
        while True:
            page = self.list_keys(
                workspace_id,
                page_size=page_size,
                page_token=token,
                include_inactive=include_inactive,
            )
            yield from page.keys
            token = page.next_page_token
            if not token:
                return

    def revoke_key(self, workspace_id: str, key_id: str, *, request_id: str = "") -> key_pb2.Key:
        request = key_service_pb2.RevokeKeyRequest(
            workspace_id=workspace_id, key_id=key_id, request_id=request_id
        )
        return self._keys.RevokeKey(request, metadata=self._key_auth, timeout=self.timeout).key

    def revoke_key_chain(
        self, workspace_id: str, key_id: str, *, request_id: str = ""
    ) -> key_service_pb2.RevokeKeyResponse:
        """Revokes a key and every successor its rotations produced, in one transaction: for a
        leaked key that whoever holds it may have rotated. The response lists the successors."""
        request = key_service_pb2.RevokeKeyRequest(
            workspace_id=workspace_id,
            key_id=key_id,
            revoke_successors=True,
            request_id=request_id,
        )
        return self._keys.RevokeKey(request, metadata=self._key_auth, timeout=self.timeout)

    def report_usage(
        self,
        workspace_id: str,
        usage: Iterable[tuple[str, int, dt.datetime]],
        *,
        request_id: str,
    ) -> key_service_pb2.ReportUsageResponse:
        """Adds usage a caller-side verifier counted: ``(key_id, requests, last_used_time)`` per
        key (at most 1000, each key once) to the keys' ``total_requests`` and ``last_used_time``.
        Needs the developer role or above. ``request_id`` (a UUID) is required: the same batch
        sent again counts nothing and answers ``replayed``. Keys of another workspace, unknown
        or usage-limited come back in ``skipped_key_ids``."""
        request = key_service_pb2.ReportUsageRequest(
            workspace_id=workspace_id,
            request_id=request_id,
            usage=[
                key_service_pb2.KeyUsage(
                    key_id=key_id,
                    requests=requests,
                    last_used_time=_timestamp(last_used, "last_used_time"),
                )
                for key_id, requests, last_used in usage
            ],
        )
        return self._keys.ReportUsage(request, metadata=self._key_auth, timeout=self.timeout)

    def rotate_key(
        self,
        workspace_id: str,
        key_id: str,
        *,
        grace_period: Seconds | None = None,
        ttl: Seconds | None = None,
        expire_time: dt.datetime | None = None,
        request_id: str = "",
    ) -> key_service_pb2.RotateKeyResponse:
        """Replaces a key. ``grace_period`` None means the server's default (24 h); 0 ends the
        old key now. The successor keeps the old key's expiry unless ``ttl`` or ``expire_time``
        is given, which only a caller that may issue keys can do."""
        if ttl is not None and expire_time is not None:
            raise ValueError("give ttl or expire_time, not both")
        request = key_service_pb2.RotateKeyRequest(
            workspace_id=workspace_id, key_id=key_id, request_id=request_id
        )
        if grace_period is not None:
            request.grace_period.CopyFrom(_duration(grace_period))
        if ttl is not None:
            request.ttl.CopyFrom(_duration(ttl))
        if expire_time is not None:
            request.expire_time.CopyFrom(_timestamp(expire_time))
        return self._keys.RotateKey(request, metadata=self._key_auth, timeout=self.timeout)

    def issue_trial_key(
        self, *, name: str = "", client_ip: str = "", request_id: str = ""
    ) -> key_service_pb2.IssueTrialKeyResponse:
        """Issues a trial key. ``client_ip`` counts for the per-IP limit only when this client
        holds an admin token (a trusted front end); otherwise the connection's address does."""
        request = key_service_pb2.IssueTrialKeyRequest(
            name=name, client_ip=client_ip, request_id=request_id
        )
        return self._keys.IssueTrialKey(request, metadata=self._key_auth, timeout=self.timeout)

    def revoke_trial_key(self, prefix: str, *, client_ip: str = "") -> key_pb2.Key:
        """Revokes a trial key by its prefix. ``client_ip`` counts for the per-IP limit only when
        this client holds an admin token (a trusted front end)."""
        request = key_service_pb2.RevokeTrialKeyRequest(prefix=prefix, client_ip=client_ip)
        metadata = self._key_auth if client_ip else ()
        return self._keys.RevokeTrialKey(request, metadata=metadata, timeout=self.timeout).key

    def update_key(
        self,
        workspace_id: str,
        key_id: str,
        *,
        name: str | None = None,
        description: str | None = None,
        scopes: Iterable[str] | None = None,
        role: key_pb2.Role | None = None,
        metadata: Mapping[str, str] | None = None,
        expire_time: dt.datetime | None = None,
        enabled: bool | None = None,
        update_mask: Iterable[str] | None = None,
        etag: str = "",
        request_id: str = "",
    ) -> key_pb2.Key:
        """Changes a key's settings without minting a new secret; returns the key as it is after
        the update, with its new ``etag``.

        ``update_mask`` names the fields to change among :data:`UPDATABLE_FIELDS` (``"*"`` means
        all of them); None means the fields given here (not None), so ``enabled=False`` alone
        disables the key and ``update_mask=["expire_time"]`` alone removes its expiry. Fields
        outside the mask are ignored. With ``etag`` (from a Key you read), the update applies only
        if the key is still at that version: otherwise ``ABORTED``, reason ``ETAG_MISMATCH``
        (read the key again and redo the change). A disabled key verifies as
        ``VERIFY_CODE_DISABLED`` until ``enabled=True``; revoked and expired keys cannot be
        updated."""
        given = {
            "name": name,
            "description": description,
            "scopes": scopes,
            "role": role,
            "metadata": metadata,
            "expire_time": expire_time,
            "enabled": enabled,
        }
        key = key_pb2.Key(workspace_id=workspace_id, key_id=key_id, etag=etag)
        if name is not None:
            key.name = name
        if description is not None:
            key.description = description
        if scopes is not None:
            key.scopes.extend(scopes)
        if role is not None:
            key.role = role
        if metadata is not None:
            key.metadata.update(metadata)
        if expire_time is not None:
            key.expire_time.CopyFrom(_timestamp(expire_time))
        if enabled is not None:
            key.enabled = enabled
        if update_mask is None:
            paths = [field for field, value in given.items() if value is not None]
            if not paths:
                raise ValueError("nothing to update: give a field or an update_mask")
        else:
            paths = list(update_mask)
        request = key_service_pb2.UpdateKeyRequest(
            key=key,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            request_id=request_id,
        )
        return self._keys.UpdateKey(request, metadata=self._key_auth, timeout=self.timeout).key

    def list_audit_events(
        self,
        workspace_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        key_id: str = "",
        actor_kind: audit_pb2.ActorKind = audit_pb2.ACTOR_KIND_UNSPECIFIED,
        actor_id: str = "",
        action: audit_pb2.AuditAction = audit_pb2.AUDIT_ACTION_UNSPECIFIED,
        start_time: dt.datetime | None = None,
        end_time: dt.datetime | None = None,
    ) -> key_service_pb2.ListAuditEventsResponse:
        """One page of a workspace's audit events, newest first. The filters combine with AND;
        ``start_time`` is inclusive, ``end_time`` exclusive. A page token is bound to the
        workspace and to every filter."""
        request = key_service_pb2.ListAuditEventsRequest(
            workspace_id=workspace_id,
            page_size=page_size,
            page_token=page_token,
            key_id=key_id,
            actor_kind=actor_kind,
            actor_id=actor_id,
            action=action,
        )
        if start_time is not None:
            request.start_time.CopyFrom(_timestamp(start_time, "start_time"))
        if end_time is not None:
            request.end_time.CopyFrom(_timestamp(end_time, "end_time"))
        return self._keys.ListAuditEvents(request, metadata=self._key_auth, timeout=self.timeout)

    def iter_audit_events(
        self,
        workspace_id: str,
        *,
        page_size: int = 0,
        key_id: str = "",
        actor_kind: audit_pb2.ActorKind = audit_pb2.ACTOR_KIND_UNSPECIFIED,
        actor_id: str = "",
        action: audit_pb2.AuditAction = audit_pb2.AUDIT_ACTION_UNSPECIFIED,
        start_time: dt.datetime | None = None,
        end_time: dt.datetime | None = None,
    ) -> Iterator[audit_pb2.AuditEvent]:
        """Every audit event matching the filters, newest first, fetching pages as needed."""
        token = ""
        while True:
            page = self.list_audit_events(
                workspace_id,
                page_size=page_size,
                page_token=token,
                key_id=key_id,
                actor_kind=actor_kind,
                actor_id=actor_id,
                action=action,
                start_time=start_time,
                end_time=end_time,
            )
            yield from page.audit_events
            token = page.next_page_token
            if not token:
                return

    def watch_key_events(
        self,
        workspace_id: str = "",
        *,
        after_position: int = 0,
        from_now: bool = False,
        all_workspaces: bool = False,
        resume: bool = False,
    ) -> KeyEventWatch:
        """Watches a workspace's key events: the stored ones after ``after_position`` (0: from the
        oldest kept), or only new ones with ``from_now``, then each new one as it commits, in
        position order. Returns once the server has started the watch (with ``from_now``, what
        commits after that is delivered) or refused it (the first ``next()`` raises the refusal).
        Returns a :class:`KeyEventWatch`, an iterator of ``event_pb2.KeyEvent``
        (``type`` such as ``"key.issued"`` or ``"key.rotated"``; ignore types you do not know).
        Others than admins may leave ``workspace_id`` empty for their own; an admin may set
        ``all_workspaces`` (with no ``workspace_id``) to watch every workspace.

        The watch has no deadline (``timeout`` does not apply). Without ``resume`` the iteration
        ends when the call does: cleanly when the server shuts down, or with the call's
        ``grpc.RpcError``; watch again with ``after_position`` set to the last position you
        processed (:attr:`KeyEventWatch.last_position`) to miss nothing and see nothing twice.
        With ``resume=True`` the watch does that itself, for as long as it is iterated: after the
        server shut down, the connection broke or the service was briefly unavailable, it waits
        (100 ms doubling up to 5 s, with jitter, or the service's RetryInfo delay) and watches
        again after the last position it delivered. Errors that watching again cannot fix are
        raised either way: ``OUT_OF_RANGE`` with reason ``EVENTS_PRUNED`` (the events after the
        start were pruned; the message names the oldest position still available), refused
        credentials or role, a bad request. With ``from_now`` and ``resume``, a call that ends
        before delivering any event is followed by another ``from_now`` one, skipping what
        committed in between: pass ``after_position`` to be exact from the start.

        Stop it with :meth:`KeyEventWatch.cancel` (from any thread: the iteration then ends
        without an error), or use it as a context manager::

            with client.watch_key_events("acme", after_position=saved, resume=True) as events:
                for event in events:
                    handle(event)
                    saved = event.position
        """
        request = key_service_pb2.WatchKeyEventsRequest(
            workspace_id=workspace_id,
            after_position=after_position,
            from_now=from_now,
            all_workspaces=all_workspaces,
        )

        def open_call(request: key_service_pb2.WatchKeyEventsRequest) -> grpc.Call:
            return self._keys.WatchKeyEvents(request, metadata=self._key_auth)

        return KeyEventWatch(open_call, request, resume=resume)

    # Webhooks ------------------------------------------------------------------------------------

    def create_webhook(
        self,
        workspace_id: str,
        url: str,
        *,
        event_types: Iterable[str] = (),
        description: str = "",
    ) -> key_service_pb2.CreateWebhookResponse:
        """Creates a webhook: the workspace's key events of ``event_types`` (such as
        ``"key.rotated"``; empty means every type, including types added later) that commit from
        now on are POSTed to ``url`` as signed JSON, one at a time in event order, retried with
        backoff for up to a day. Check each request with
        :func:`~keyauthority_client.verify_webhook`.

        The response's ``signing_secret`` (``whsec_...``) is returned only this once: store it
        now; ``webhook.secret_hint`` later tells which secret a webhook has. A URL pointing at
        this server, or at a link-local, metadata, loopback or private address (unless the
        server allows private targets), is refused with ``INVALID_ARGUMENT``, reason
        ``WEBHOOK_TARGET_FORBIDDEN``. Needs the developer role or above."""
        request = key_service_pb2.CreateWebhookRequest(
            workspace_id=workspace_id,
            url=url,
            event_types=list(event_types),
            description=description,
        )
        return self._keys.CreateWebhook(request, metadata=self._key_auth, timeout=self.timeout)

    def list_webhooks(self, workspace_id: str = "") -> list[webhook_pb2.Webhook]:
        """A workspace's webhooks, oldest first (at most 16), without their secrets. Others than
        admins may leave ``workspace_id`` empty for their own."""
        request = key_service_pb2.ListWebhooksRequest(workspace_id=workspace_id)
        response = self._keys.ListWebhooks(request, metadata=self._key_auth, timeout=self.timeout)
        return list(response.webhooks)

    def delete_webhook(self, workspace_id: str, webhook_id: str) -> webhook_pb2.Webhook:
        """Deletes a webhook and its delivery history, and returns it as it was. Nothing more is
        sent to it (an attempt already under way finishes). An unknown webhook is
        ``NOT_FOUND``."""
        request = key_service_pb2.DeleteWebhookRequest(
            workspace_id=workspace_id, webhook_id=webhook_id
        )
        return self._keys.DeleteWebhook(
            request, metadata=self._key_auth, timeout=self.timeout
        ).webhook

    def list_webhook_deliveries(
        self,
        workspace_id: str,
        webhook_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        state: webhook_pb2.WebhookDeliveryState = webhook_pb2.WEBHOOK_DELIVERY_STATE_UNSPECIFIED,
    ) -> key_service_pb2.ListWebhookDeliveriesResponse:
        """One page of a webhook's deliveries, newest first, each with its attempts (HTTP status,
        error, duration). ``state`` keeps only the deliveries in that state
        (``WEBHOOK_DELIVERY_STATE_FAILED``, ...); a page token is bound to the webhook and to the
        state. An unknown webhook is ``NOT_FOUND``."""
        request = key_service_pb2.ListWebhookDeliveriesRequest(
            workspace_id=workspace_id,
            webhook_id=webhook_id,
            page_size=page_size,
            page_token=page_token,
            state=state,
        )
        return self._keys.ListWebhookDeliveries(
            request, metadata=self._key_auth, timeout=self.timeout
        )

    def iter_webhook_deliveries(
        self,
        workspace_id: str,
        webhook_id: str,
        *,
        page_size: int = 0,
        state: webhook_pb2.WebhookDeliveryState = webhook_pb2.WEBHOOK_DELIVERY_STATE_UNSPECIFIED,
    ) -> Iterator[webhook_pb2.WebhookDelivery]:
        """Every delivery of a webhook (in ``state``, if given), newest first, fetching pages as
        needed."""
        token = ""
        while True:
            page = self.list_webhook_deliveries(
                workspace_id, webhook_id, page_size=page_size, page_token=token, state=state
            )
            yield from page.deliveries
            token = page.next_page_token
            if not token:
                return

    def redeliver_webhook_event(
        self, workspace_id: str, webhook_id: str, event_id: str
    ) -> webhook_pb2.WebhookDelivery:
        """Sends a stored event to a webhook again (after the deliveries already queued for it),
        with the same ``webhook-id`` header, and returns the new, pending delivery. For a
        delivery that FAILED, or a receiver that lost what it received. An event no longer
        stored (past the event retention) is ``NOT_FOUND``."""
        request = key_service_pb2.RedeliverWebhookEventRequest(
            workspace_id=workspace_id, webhook_id=webhook_id, event_id=event_id
        )
        return self._keys.RedeliverWebhookEvent(
            request, metadata=self._key_auth, timeout=self.timeout
        ).delivery

    # VerifyService ------------------------------------------------------------------------------

    def verify_key(
        self,
        key: str,
        *,
        required_scopes: Iterable[str] = (),
        client_ip: str = "",
        cost: int | None = None,
        minimum_role: key_pb2.Role = key_pb2.ROLE_UNSPECIFIED,
    ) -> verify_service_pb2.VerifyKeyResponse:
        """Asks whether ``key`` is valid, holds ``required_scopes`` and has at least
        ``minimum_role`` (trial < viewer < developer < account admin; unset: any). A refused key
        is an answer (``valid`` False, ``code`` why), not an exception: an exception means the
        request was bad or the service could not decide, never "invalid"."""
        request = verify_service_pb2.VerifyKeyRequest(
            key=key,
            required_scopes=list(required_scopes),
            client_ip=client_ip,
            minimum_role=minimum_role,
        )
        if cost is not None:
            request.cost = cost
        return self._verify.VerifyKey(request, metadata=self._verify_auth, timeout=self.timeout)


#: The first pause before a resuming watch watches again; it doubles up to RESUME_MAX_DELAY.
RESUME_FIRST_DELAY = 0.1
RESUME_MAX_DELAY = 5.0
_RETRYABLE_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)


def is_resumable(error: grpc.RpcError) -> bool:
    """True when watching again can succeed after this error: the service said it might
    (``UNAVAILABLE``, ``ABORTED``, ``DEADLINE_EXCEEDED``, or a RetryInfo), or the connection broke
    under the call (``INTERNAL`` or ``UNKNOWN`` without key-authority's ErrorInfo). Never for
    ``EVENTS_PRUNED``, refused credentials or a bad request."""
    details = error_details(error)
    if details.code in _RETRYABLE_CODES or details.retry_delay is not None:
        return True
    transport = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    return details.code in transport and not details.reason


class KeyEventWatch(Iterator[event_pb2.KeyEvent]):
    """The key events of :meth:`KeyAuthority.watch_key_events`, in position order.

    Iterate it once, in one thread; :meth:`cancel` may be called from any thread and ends the
    iteration (without an error). :attr:`last_position` is the position of the last event
    delivered: store it with whatever processing the event caused, and watch again after it.
    """

    def __init__(
        self,
        open_call: Callable[[key_service_pb2.WatchKeyEventsRequest], grpc.Call],
        request: key_service_pb2.WatchKeyEventsRequest,
        *,
        resume: bool = False,
    ) -> None:
        self._open_call = open_call
        self._request = request
        self._resume = resume
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._call: grpc.Call | None = None
        #: The position of the last event delivered; None before the first.
        self.last_position: int | None = None
        # Open the first call now and wait for the server to start the watch (its response
        # headers; a refusal's status is raised by the first next()): a from_now watch then
        # delivers whatever commits after this returns.
        first = self._start()
        if first is not None:
            first.initial_metadata()  # type: ignore[attr-defined]
        self._events = self._run(first)

    def __iter__(self) -> KeyEventWatch:
        return self

    def __next__(self) -> event_pb2.KeyEvent:
        event = next(self._events)
        self.last_position = event.position
        return event

    def __enter__(self) -> KeyEventWatch:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stops the watch: the call in progress is cancelled and the iteration ends. Safe from
        any thread, and more than once."""
        self._cancelled.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()

    def _start(self) -> grpc.Call | None:
        call = self._open_call(self._request)
        with self._lock:
            self._call = call
        if self._cancelled.is_set():  # cancelled while the call was being opened
            call.cancel()
            return None
        return call

    def _run(self, first: grpc.Call | None) -> Iterator[event_pb2.KeyEvent]:
        delay = RESUME_FIRST_DELAY
        call = first
        try:
            while not self._cancelled.is_set():
                if call is None:
                    call = self._start()
                    if call is None:
                        return
                wait: float | None = None
                try:
                    for answer in call:  # type: ignore[attr-defined]
                        if not answer.HasField("event"):
                            continue
                        self._request.after_position = answer.event.position
                        self._request.from_now = False
                        delay = RESUME_FIRST_DELAY
                        yield answer.event
                    # The call ended cleanly: the server is shutting down.
                    if not self._resume:
                        return
                except grpc.RpcError as error:
                    if self._cancelled.is_set():
                        return
                    if not self._resume or not is_resumable(error):
                        raise
                    retry_delay = error_details(error).retry_delay
                    if retry_delay is not None:
                        wait = retry_delay.total_seconds()
                finally:
                    call.cancel()
                    call = None
                    with self._lock:
                        self._call = None
                if wait is None:
                    wait = delay / 2 + random.uniform(0, delay / 2)
                delay = min(delay * 2, RESUME_MAX_DELAY)
                if self._cancelled.wait(wait):
                    return
        finally:
            self._cancelled.set()


def _bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


#: The ErrorInfo reason of a watch that starts before the oldest key event still kept.
EVENTS_PRUNED = "EVENTS_PRUNED"


@dataclass(frozen=True)
class ErrorDetails:
    """What a refusal says, decoded from its ``grpc-status-details-bin`` trailer."""

    code: grpc.StatusCode
    message: str
    #: ErrorInfo.reason: a stable code such as ``INVALID_ARGUMENT``, ``KEY_NOT_FOUND``,
    #: ``ETAG_MISMATCH`` (ABORTED: the key changed since its etag was read),
    #: ``IDEMPOTENCY_KEY_REUSED`` (FAILED_PRECONDITION: a request id sent with other arguments) or
    #: ``EVENTS_PRUNED`` (OUT_OF_RANGE: a watch starts, or fell, behind the oldest key event still
    #: kept; the message names that position: resynchronise, then watch from it or from now).
    reason: str = ""
    #: ErrorInfo.domain: ``keyauthority.v1``.
    domain: str = ""
    #: ErrorInfo.metadata, e.g. ``{"field": "name"}`` for an invalid field.
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: RetryInfo.retry_delay, when retrying after that delay can succeed.
    retry_delay: dt.timedelta | None = None
    #: BadRequest field violations as (field, description).
    field_violations: tuple[tuple[str, str], ...] = ()


def error_details(error: grpc.RpcError) -> ErrorDetails:
    """Decodes the google.rpc details of a failed call (via grpcio-status)."""
    # A grpc.RpcError raised by a call is also a grpc.Call: it has code(), details() and the
    # trailing metadata that from_call reads.
    call: grpc.Call = error  # type: ignore[assignment]
    status = rpc_status.from_call(call)
    if status is None:
        return ErrorDetails(code=call.code(), message=call.details() or "")
    reason, domain, metadata = "", "", {}
    retry_delay = None
    violations: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToTimedelta()
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
    return ErrorDetails(
        code=call.code(),
        message=status.message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        retry_delay=retry_delay,
        field_violations=tuple(violations),
    )
