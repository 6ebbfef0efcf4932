"""Verifies the webhooks key-authority sends, for the receiving side.

key-authority POSTs each key event to a webhook's URL as JSON, signed as Standard Webhooks
specifies: the ``webhook-id`` header is the event's id (the same on every retry, so a receiver can
drop duplicates), ``webhook-timestamp`` the Unix time of the attempt in seconds, and
``webhook-signature`` one or more space-separated ``v1,<base64>`` entries, each the HMAC-SHA256 of
``{webhook-id}.{webhook-timestamp}.{body}`` keyed with the webhook's signing secret (the bytes
after ``whsec_``, base64-decoded).

This module needs only the standard library, so a receiver can use it without gRPC.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

#: The prefix of a signing secret as CreateWebhook returns it.
SECRET_PREFIX = "whsec_"
#: How far the ``webhook-timestamp`` may be from now, either way, by default (5 minutes).
DEFAULT_TOLERANCE = dt.timedelta(minutes=5)

_ID_HEADER = "webhook-id"
_TIMESTAMP_HEADER = "webhook-timestamp"
_SIGNATURE_HEADER = "webhook-signature"
_SIGNATURE_VERSION = "v1"


class WebhookVerificationError(ValueError):
    """A webhook request that must not be trusted: a header missing or malformed, a timestamp
    outside the tolerance, no signature matching the secret, or a body that is not JSON. The
    message says which; answer such a request with a 4xx status and do not act on it."""


def verify_webhook(
    secret: str,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance: dt.timedelta | float | int = DEFAULT_TOLERANCE,
    now: dt.datetime | float | None = None,
) -> dict[str, Any]:
    """Checks a webhook request from key-authority and returns its parsed JSON payload.

    ``secret`` is the webhook's signing secret (``whsec_...``, from CreateWebhook's
    ``signing_secret``). ``headers`` are the request's headers, in any case (a ``dict``, or the
    headers object of ``http.server``, Flask, Django or Starlette). ``body`` is the request body
    exactly as received: verify the raw bytes, never JSON parsed and serialised again.

    The request is refused (:class:`WebhookVerificationError`) when a ``webhook-*`` header is
    missing or malformed, when ``webhook-timestamp`` is more than ``tolerance`` (seconds or a
    ``timedelta``; 5 minutes by default) before or after ``now`` (the current time by default),
    or when no ``v1`` entry of ``webhook-signature`` is the expected signature (compared in
    constant time; any one match is enough, so the sender may list several). A ``ValueError``
    is raised for a secret that is not ``whsec_`` and base64.

    The payload is ``{"type": "key.rotated", "timestamp": "<RFC 3339>", "data": {...}}``, where
    ``data`` is the key event (``event_id``, ``position``, ``type``, ``workspace_id``, ``key_id``,
    ``event_time``, ``actor``, ``changes``, and for a rotation ``new_key_id`` and
    ``old_key_expire_time``). ``data["event_id"]`` equals ``webhook-id``: process each event id
    once, as retries and redeliveries send it again.
    """
    key = _signing_key(secret)
    message_id, timestamp_text, signatures = _signature_headers(headers)
    _check_timestamp(timestamp_text, tolerance, now)

    raw = body.encode() if isinstance(body, str) else bytes(body)
    signed = b".".join((message_id.encode(), timestamp_text.encode(), raw))
    expected = hmac.new(key, signed, hashlib.sha256).digest()
    candidates = _v1_signatures(signatures)
    if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
        raise WebhookVerificationError("no webhook-signature entry matches the signing secret")

    try:
        payload = json.loads(raw)
    except ValueError as error:
        raise WebhookVerificationError(f"the signed body is not JSON: {error}") from None
    if not isinstance(payload, dict):
        raise WebhookVerificationError("the signed body is not a JSON object")
    return payload


def _signing_key(secret: str) -> bytes:
    encoded = secret[len(SECRET_PREFIX) :] if secret.startswith(SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the signing secret is not whsec_ followed by base64") from None
    if not key:
        raise ValueError("the signing secret is empty")
    return key


def _signature_headers(headers: Mapping[str, str]) -> tuple[str, str, str]:
    # Header names are case-insensitive; a plain dict may hold them in any case.
    lowered = {name.lower(): value for name, value in headers.items()}
    found = []
    for name in (_ID_HEADER, _TIMESTAMP_HEADER, _SIGNATURE_HEADER):
        value = lowered.get(name)
        if value is None or not str(value).strip():
            raise WebhookVerificationError(f"the {name} header is missing")
        found.append(str(value).strip())
    return found[0], found[1], found[2]


def _check_timestamp(
    text: str, tolerance: dt.timedelta | float | int, now: dt.datetime | float | None
) -> None:
    # Unix seconds as ASCII digits only: no sign, fraction, exponent or spaces, so that the
    # signed text is the one the sender meant.
    if not (text.isascii() and text.isdigit()) or len(text) > 15:
        raise WebhookVerificationError("the webhook-timestamp header is not Unix seconds")
    if isinstance(tolerance, dt.timedelta):
        tolerance = tolerance.total_seconds()
    if isinstance(now, dt.datetime):
        now = now.timestamp()
    current = time.time() if now is None else float(now)
    offset = int(text) - current
    if offset < -tolerance:
        raise WebhookVerificationError(
            f"the webhook-timestamp is {-offset:.0f} s old, beyond the {tolerance:.0f} s tolerance"
        )
    if offset > tolerance:
        raise WebhookVerificationError(
            f"the webhook-timestamp is {offset:.0f} s ahead, beyond the {tolerance:.0f} s tolerance"
        )


def _v1_signatures(header: str) -> list[bytes]:
    """The decoded ``v1`` signatures of the header; entries of other versions (such as
    ``v1a``) or undecodable ones are skipped."""
    decoded = []
    for entry in header.split():
        version, _, signature = entry.partition(",")
        if version != _SIGNATURE_VERSION or not signature:
            continue
        try:
            decoded.append(base64.b64decode(signature, validate=True))
        except (binascii.Error, ValueError):
            continue
    return decoded
