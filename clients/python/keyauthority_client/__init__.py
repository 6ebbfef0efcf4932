"""A Python client of key-authority: stubs generated from ../../proto, and a thin typed wrapper.

from keyauthority_client import KeyAuthority, VerifyCode, error_details

KeyAuthority.watch_key_events streams key events (KeyEvent) as a cancellable KeyEventWatch, which
can resume by itself after a dropped connection.

verify_webhook checks a webhook request key-authority sent (its Standard Webhooks signature and
timestamp) and returns the parsed payload; it needs only the standard library.
"""

from ._codegen import ensure_generated

# The stubs are generated, not checked in: make them on first use if `python generate.py` has
# not been run yet (this needs grpcio-tools).
ensure_generated()

from ._gen.keyauthority.v1 import (  # noqa: E402
    audit_pb2,
    event_pb2,
    key_pb2,
    key_service_pb2,
    verify_service_pb2,
    webhook_pb2,
)
from .client import (  # noqa: E402
    ERROR_DOMAIN,
    EVENTS_PRUNED,
    UPDATABLE_FIELDS,
    ErrorDetails,
    KeyAuthority,
    KeyEventWatch,
    error_details,
    is_resumable,
)
from .webhooks import (  # noqa: E402
    DEFAULT_TOLERANCE,
    WebhookVerificationError,
    verify_webhook,
)

Environment = key_pb2.Environment
Role = key_pb2.Role
KeyState = key_pb2.KeyState
VerifyCode = verify_service_pb2.VerifyCode
AuditAction = audit_pb2.AuditAction
ActorKind = audit_pb2.ActorKind
AuditOutcome = audit_pb2.AuditOutcome
KeyEvent = event_pb2.KeyEvent
Webhook = webhook_pb2.Webhook
WebhookDelivery = webhook_pb2.WebhookDelivery
WebhookDeliveryState = webhook_pb2.WebhookDeliveryState

__all__ = [
    "DEFAULT_TOLERANCE",
    "ERROR_DOMAIN",
    "EVENTS_PRUNED",
    "UPDATABLE_FIELDS",
    "ActorKind",
    "AuditAction",
    "AuditOutcome",
    "Environment",
    "ErrorDetails",
    "KeyAuthority",
    "KeyEvent",
    "KeyEventWatch",
    "KeyState",
    "Role",
    "VerifyCode",
    "Webhook",
    "WebhookDelivery",
    "WebhookDeliveryState",
    "WebhookVerificationError",
    "audit_pb2",
    "error_details",
    "event_pb2",
    "is_resumable",
    "key_pb2",
    "key_service_pb2",
    "verify_service_pb2",
    "verify_webhook",
    "webhook_pb2",
]
