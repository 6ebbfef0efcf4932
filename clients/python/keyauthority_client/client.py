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
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import grpc
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ._gen.keyauthority.v1 import (
    audit_pb2,
    key_pb2,
    key_service_pb2,
    key_service_pb2_grpc,
    verify_service_pb2,
    verify_service_pb2_grpc,
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

    # VerifyService ------------------------------------------------------------------------------

    def verify_key(
        self,
        key: str,
        *,
        required_scopes: Iterable[str] = (),
        client_ip: str = "",
        cost: int | None = None,
    ) -> verify_service_pb2.VerifyKeyResponse:
        """Asks whether ``key`` is valid and holds ``required_scopes``. A refused key is an
        answer (``valid`` False, ``code`` why), not an exception: an exception means the
        request was bad or the service could not decide, never "invalid"."""
        request = verify_service_pb2.VerifyKeyRequest(
            key=key, required_scopes=list(required_scopes), client_ip=client_ip
        )
        if cost is not None:
            request.cost = cost
        return self._verify.VerifyKey(request, metadata=self._verify_auth, timeout=self.timeout)


def _bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


@dataclass(frozen=True)
class ErrorDetails:
    """What a refusal says, decoded from its ``grpc-status-details-bin`` trailer."""

    code: grpc.StatusCode
    message: str
    #: ErrorInfo.reason: a stable code such as ``INVALID_ARGUMENT``, ``KEY_NOT_FOUND``,
    #: ``ETAG_MISMATCH`` (ABORTED: the key changed since its etag was read) or
    #: ``IDEMPOTENCY_KEY_REUSED`` (FAILED_PRECONDITION: a request id sent with other arguments).
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
