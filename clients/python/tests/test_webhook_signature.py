"""verify_webhook against signatures this test computes itself with hmac and hashlib: valid,
tampered, wrong secret, stale or future timestamps, several signatures, missing or malformed
headers; and against the Standard Webhooks reference library (``standardwebhooks``), both ways.
No server is needed."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import time

import pytest

from keyauthority_client import WebhookVerificationError, verify_webhook

MESSAGE_ID = "5f0c1f0e-8a8e-4d47-9b0e-3d8a2c1b7e10"
BODY = json.dumps(
    {
        "type": "key.issued",
        "timestamp": "2026-11-24T03:53:30.123Z",
        "data": {"event_id": MESSAGE_ID, "position": 7, "type": "key.issued", "key_id": "k1"},
    },
    separators=(",", ":"),
).encode()


def new_secret() -> tuple[str, bytes]:
    key = secrets.token_bytes(32)
    return "whsec_" + base64.b64encode(key).decode(), key


def sign(key: bytes, message_id: str, timestamp: int | str, body: bytes) -> str:
    """One ``v1,`` entry, computed here from the scheme, not with the code under test."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def headers(key: bytes, timestamp: int | None = None, body: bytes = BODY) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": MESSAGE_ID,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, MESSAGE_ID, timestamp, body),
    }


def refused(secret: str, request_headers: dict[str, str], body: bytes = BODY, **kw) -> str:
    with pytest.raises(WebhookVerificationError) as error:
        verify_webhook(secret, request_headers, body, **kw)
    return str(error.value)


def test_a_valid_request_returns_the_parsed_payload() -> None:
    secret, key = new_secret()
    payload = verify_webhook(secret, headers(key), BODY)
    assert payload == json.loads(BODY)
    assert payload["data"]["event_id"] == MESSAGE_ID
    # The body may be given as text too, and header names in any case.
    mixed_case = {name.title(): value for name, value in headers(key).items()}
    assert verify_webhook(secret, mixed_case, BODY.decode()) == payload


def test_a_published_standard_webhooks_example_verifies() -> None:
    # The example secret, message and signature that the Standard Webhooks libraries test with.
    example = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    body = b'{"test": 2432232314}'
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    assert verify_webhook(secret, example, body, now=1614265330) == {"test": 2432232314}
    assert "no webhook-signature entry" in refused(secret, example, body + b" ", now=1614265330)


def test_a_tampered_body_is_refused() -> None:
    secret, key = new_secret()
    tampered = BODY.replace(b'"key_id":"k1"', b'"key_id":"k2"')
    assert tampered != BODY
    message = refused(secret, headers(key), tampered)
    assert message == "no webhook-signature entry matches the signing secret"


def test_a_changed_id_or_timestamp_is_refused() -> None:
    secret, key = new_secret()
    now = int(time.time())
    other_id = headers(key, now) | {"webhook-id": "another-id"}
    assert "no webhook-signature entry" in refused(secret, other_id)
    other_time = headers(key, now) | {"webhook-timestamp": str(now - 1)}
    assert "no webhook-signature entry" in refused(secret, other_time)


def test_another_secret_is_refused() -> None:
    _, key = new_secret()
    other_secret, _ = new_secret()
    assert "no webhook-signature entry" in refused(other_secret, headers(key))


def test_timestamps_beyond_the_tolerance_are_refused_either_way() -> None:
    secret, key = new_secret()
    now = 1_800_000_000
    assert verify_webhook(secret, headers(key, now - 300), BODY, now=now)
    assert verify_webhook(secret, headers(key, now + 300), BODY, now=now)
    old = refused(secret, headers(key, now - 301), now=now)
    assert old == "the webhook-timestamp is 301 s old, beyond the 300 s tolerance"
    ahead = refused(secret, headers(key, now + 301), now=now)
    assert ahead == "the webhook-timestamp is 301 s ahead, beyond the 300 s tolerance"
    # A request signed an hour ago, as a replay would be, against the real clock.
    assert "old" in refused(secret, headers(key, int(time.time()) - 3600))


def test_the_tolerance_can_be_changed() -> None:
    secret, key = new_secret()
    now = 1_800_000_000
    assert verify_webhook(secret, headers(key, now - 20), BODY, tolerance=30, now=now)
    refused(secret, headers(key, now - 40), tolerance=30, now=now)
    tolerance = dt.timedelta(minutes=1)
    at = dt.datetime.fromtimestamp(now, dt.timezone.utc)
    assert verify_webhook(secret, headers(key, now - 60), BODY, tolerance=tolerance, now=at)
    refused(secret, headers(key, now - 61), tolerance=tolerance, now=at)


def test_any_one_of_several_signatures_is_enough() -> None:
    secret, key = new_secret()
    _, other_key = new_secret()
    now = int(time.time())
    right = sign(key, MESSAGE_ID, now, BODY)
    wrong = sign(other_key, MESSAGE_ID, now, BODY)
    for entries in (f"{wrong} {right}", f"{right} {wrong}", f"v1,!!! {wrong}  {right}"):
        request = headers(key, now) | {"webhook-signature": entries}
        assert verify_webhook(secret, request, BODY)["type"] == "key.issued"
    # Only v1 entries count: the right bytes under another version, or none at all, are refused.
    other_version = "v1a," + right.removeprefix("v1,")
    for entries in (wrong, other_version, right.removeprefix("v1,"), f"{wrong} {wrong}"):
        request = headers(key, now) | {"webhook-signature": entries}
        assert "no webhook-signature entry" in refused(secret, request)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_missing_header_is_refused(missing: str) -> None:
    secret, key = new_secret()
    request = headers(key)
    del request[missing]
    assert refused(secret, request) == f"the {missing} header is missing"
    assert refused(secret, request | {missing: ""}) == f"the {missing} header is missing"


@pytest.mark.parametrize("timestamp", ["1.8e9", "-1", "+1800000000", "1800000000.5", "soon"])
def test_a_timestamp_that_is_not_unix_seconds_is_refused(timestamp: str) -> None:
    secret, key = new_secret()
    request = headers(key) | {"webhook-timestamp": timestamp}
    request["webhook-signature"] = sign(key, MESSAGE_ID, timestamp, BODY)
    assert refused(secret, request) == "the webhook-timestamp header is not Unix seconds"


def test_a_signed_body_that_is_not_a_json_object_is_refused() -> None:
    secret, key = new_secret()
    for body in (b"not json", b"[1, 2]"):
        message = refused(secret, headers(key, body=body), body)
        assert message.startswith("the signed body is not")


def test_a_malformed_secret_is_a_value_error() -> None:
    _, key = new_secret()
    for secret in ("whsec_***", "whsec_", ""):
        with pytest.raises(ValueError) as error:
            verify_webhook(secret, headers(key), BODY)
        assert not isinstance(error.value, WebhookVerificationError)
    # The bare base64, without its prefix, is accepted (as the reference libraries do).
    bare = base64.b64encode(key).decode()
    assert verify_webhook(bare, headers(key), BODY)["type"] == "key.issued"


def reference_library():
    """The ``standardwebhooks`` package: required when the client suites are
    (KEY_AUTHORITY_REQUIRE_CLIENTS=1, as in CI), else the test is skipped without it."""
    if os.environ.get("KEY_AUTHORITY_REQUIRE_CLIENTS") == "1":
        import standardwebhooks

        return standardwebhooks
    return pytest.importorskip("standardwebhooks")


def test_the_reference_library_signature_verifies_here() -> None:
    standardwebhooks = reference_library()
    secret, _ = new_secret()
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    signature = standardwebhooks.Webhook(secret).sign(MESSAGE_ID, now, BODY.decode())
    request = {
        "webhook-id": MESSAGE_ID,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }
    assert verify_webhook(secret, request, BODY) == json.loads(BODY)
    assert "no webhook-signature entry" in refused(secret, request, BODY + b"\n")


def test_a_signature_made_as_we_verify_verifies_with_the_reference_library() -> None:
    standardwebhooks = reference_library()
    secret, key = new_secret()
    request = headers(key)
    assert verify_webhook(secret, request, BODY) == json.loads(BODY)
    assert standardwebhooks.Webhook(secret).verify(BODY, request) == json.loads(BODY)
    # Both refuse the same wrong secret.
    other_secret, _ = new_secret()
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(other_secret).verify(BODY, request)
    refused(other_secret, request)
