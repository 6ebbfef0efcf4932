"""Webhooks through the Python client against the real server: CreateWebhook to a receiver on
127.0.0.1 (the server runs with --webhook-allow-private-targets), the signed POST of a key event
checked with verify_webhook, ListWebhooks, ListWebhookDeliveries, RedeliverWebhookEvent,
DeleteWebhook, and the refusals."""

from __future__ import annotations

import base64
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from conftest import DedicatedServer

from keyauthority_client import (
    KeyAuthority,
    WebhookDeliveryState,
    error_details,
    verify_webhook,
)

#: Longer than any delivery takes; only stops a broken test from hanging.
WAIT = 15.0
SUCCEEDED = WebhookDeliveryState.Value("WEBHOOK_DELIVERY_STATE_SUCCEEDED")
PENDING = WebhookDeliveryState.Value("WEBHOOK_DELIVERY_STATE_PENDING")
FAILED = WebhookDeliveryState.Value("WEBHOOK_DELIVERY_STATE_FAILED")
SECRET = re.compile(r"^whsec_[A-Za-z0-9+/]{43}=$")
T = TypeVar("T")


@dataclass(frozen=True)
class Received:
    """One POST the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """An HTTP server on 127.0.0.1 that answers every POST with 200 and queues what it got."""

    def __init__(self) -> None:
        self.requests: queue.Queue[Received] = queue.Queue()
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                headers = {name.lower(): value for name, value in self.headers.items()}
                requests.put(Received(self.path, headers, body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hooks/key-authority"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def next(self, timeout: float = WAIT) -> Received:
        try:
            return self.requests.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no webhook request within {timeout} s")

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def wait_until(read: Callable[[], T], done: Callable[[T], bool], timeout: float = WAIT) -> T:
    """Reads until ``done`` holds (the server records a delivery's outcome just after the
    receiver answered), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {timeout} s; last read: {value}")
        time.sleep(0.05)


def refusal(call: Callable[..., object], *args: object, **kwargs: object):
    with pytest.raises(grpc.RpcError) as refused:
        call(*args, **kwargs)
    return error_details(refused.value)


@pytest.fixture(scope="module")
def webhook_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DedicatedServer]:
    """A server of this module's own that accepts receivers on 127.0.0.1."""
    folder: Path = tmp_path_factory.mktemp("key-authority-webhooks")
    running = DedicatedServer(folder, {}, ["--webhook-allow-private-targets"])
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def admin(webhook_server: DedicatedServer) -> Iterator[KeyAuthority]:
    with webhook_server.client() as client:
        yield client


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    try:
        yield running
    finally:
        running.close()


def reference_library():
    """``standardwebhooks``, when installed (always in CI, which installs requirements.txt)."""
    if os.environ.get("KEY_AUTHORITY_REQUIRE_CLIENTS") == "1":
        import standardwebhooks

        return standardwebhooks
    try:
        import standardwebhooks
    except ImportError:
        return None
    return standardwebhooks


def test_a_key_event_is_posted_signed_listed_redelivered_and_the_webhook_deleted(
    admin: KeyAuthority, receiver: Receiver, workspace: str
) -> None:
    # Arrange: a webhook for key.issued only.
    created = admin.create_webhook(
        workspace, receiver.url, event_types=["key.issued"], description="billing sync"
    )
    secret = created.signing_secret
    webhook = created.webhook
    assert SECRET.match(secret), secret
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert str(uuid.UUID(webhook.webhook_id)) == webhook.webhook_id
    assert webhook.workspace_id == workspace
    assert webhook.url == receiver.url
    assert list(webhook.event_types) == ["key.issued"]
    assert webhook.description == "billing sync"
    assert webhook.created_by == "admin"
    assert webhook.create_time.seconds > 0
    # The hint: whsec_ and the first 4 characters of the base64.
    assert webhook.secret_hint == secret[:10]

    # Act: an event it wants.
    issued = admin.issue_key(workspace, "webhook subject")
    key_id = issued.key.key_id

    # Assert: one signed POST of it.
    first = receiver.next()
    assert first.path == "/hooks/key-authority"
    assert first.headers["content-type"].startswith("application/json")
    payload = verify_webhook(secret, first.headers, first.body)
    event_id = first.headers["webhook-id"]
    assert str(uuid.UUID(event_id)) == event_id
    assert payload["type"] == "key.issued"
    assert payload["timestamp"].endswith("Z")
    data = payload["data"]
    assert data["type"] == "key.issued"
    assert data["event_id"] == event_id
    assert data["key_id"] == key_id
    assert data["workspace_id"] == workspace
    assert data["position"] > 0
    assert data["actor"]["kind"] and data["actor"]["display"] == "admin"
    # The same request verifies with the Standard Webhooks reference library.
    standardwebhooks = reference_library()
    if standardwebhooks is not None:
        assert standardwebhooks.Webhook(secret).verify(first.body, first.headers) == payload

    # ListWebhooks shows it, without its secret.
    listed = admin.list_webhooks(workspace)
    assert listed == [webhook]
    assert secret not in str(listed[0])

    # One delivery, SUCCEEDED after one attempt answered 200.
    deliveries = wait_until(
        lambda: list(admin.iter_webhook_deliveries(workspace, webhook.webhook_id)),
        lambda found: len(found) == 1 and found[0].state == SUCCEEDED,
    )
    delivery = deliveries[0]
    assert delivery.webhook_id == webhook.webhook_id
    assert delivery.event_id == event_id
    assert delivery.event_type == "key.issued"
    assert delivery.position == data["position"]
    assert delivery.redelivery is False
    assert len(delivery.attempts) == 1
    attempt = delivery.attempts[0]
    assert (attempt.attempt, attempt.http_status, attempt.error) == (1, 200, "")
    assert attempt.attempt_time.seconds > 0

    # Redelivery: a new pending delivery, then a second POST with the same webhook-id.
    again = admin.redeliver_webhook_event(workspace, webhook.webhook_id, event_id)
    assert again.event_id == event_id
    assert again.webhook_id == webhook.webhook_id
    assert again.redelivery is True
    assert again.delivery_id != delivery.delivery_id
    assert again.state in (PENDING, SUCCEEDED)
    second = receiver.next()
    assert second.headers["webhook-id"] == event_id
    redelivered = verify_webhook(secret, second.headers, second.body)
    assert redelivered["data"] == data
    deliveries = wait_until(
        lambda: admin.list_webhook_deliveries(workspace, webhook.webhook_id).deliveries,
        lambda found: len(found) == 2 and all(each.state == SUCCEEDED for each in found),
    )
    assert [each.delivery_id for each in deliveries] == [again.delivery_id, delivery.delivery_id]
    assert [each.redelivery for each in deliveries] == [True, False]
    assert [each.attempts[0].http_status for each in deliveries] == [200, 200]
    # Paged one at a time, and filtered by state.
    page = admin.list_webhook_deliveries(workspace, webhook.webhook_id, page_size=1)
    assert [each.delivery_id for each in page.deliveries] == [again.delivery_id]
    assert page.next_page_token != ""
    paged = admin.iter_webhook_deliveries(workspace, webhook.webhook_id, page_size=1)
    assert [each.delivery_id for each in paged] == [again.delivery_id, delivery.delivery_id]
    failed = admin.list_webhook_deliveries(workspace, webhook.webhook_id, state=FAILED)
    assert (list(failed.deliveries), failed.next_page_token) == ([], "")
    details = refusal(
        admin.list_webhook_deliveries,
        workspace,
        webhook.webhook_id,
        page_token=page.next_page_token,
        state=FAILED,
    )
    assert (details.code, details.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )

    # An event of a type it does not want is not sent: the next POST is the next key.issued
    # (deliveries go out in event order, so a key.revoked would have come first).
    admin.revoke_key(workspace, key_id)
    later = admin.issue_key(workspace, "second subject")
    third = receiver.next()
    assert verify_webhook(secret, third.headers, third.body)["data"]["key_id"] == later.key.key_id

    # Delete: the webhook as it was, then nothing listed, and it is gone for every call.
    deleted = admin.delete_webhook(workspace, webhook.webhook_id)
    assert deleted == webhook
    assert admin.list_webhooks(workspace) == []
    for call, args in (
        (admin.delete_webhook, (workspace, webhook.webhook_id)),
        (admin.list_webhook_deliveries, (workspace, webhook.webhook_id)),
        (admin.redeliver_webhook_event, (workspace, webhook.webhook_id, event_id)),
    ):
        details = refusal(call, *args)
        assert (details.code, details.reason) == (grpc.StatusCode.NOT_FOUND, "WEBHOOK_NOT_FOUND")


def test_an_empty_event_type_list_receives_every_type(
    admin: KeyAuthority, receiver: Receiver, workspace: str
) -> None:
    created = admin.create_webhook(workspace, receiver.url)
    assert list(created.webhook.event_types) == []
    issued = admin.issue_key(workspace, "everything")
    admin.revoke_key(workspace, issued.key.key_id)
    types = [
        verify_webhook(created.signing_secret, got.headers, got.body)["type"]
        for got in (receiver.next(), receiver.next())
    ]
    assert types == ["key.issued", "key.revoked"]
    admin.delete_webhook(workspace, created.webhook.webhook_id)


def test_metadata_addresses_and_the_server_itself_are_refused(
    admin: KeyAuthority, webhook_server: DedicatedServer, workspace: str
) -> None:
    # Even with private targets allowed: link-local (the cloud metadata service) and this
    # server's own port stay forbidden.
    for url in (
        "http://169.254.169.254/",
        "http://169.254.169.254/latest/meta-data/",
        f"http://{webhook_server.target}/",
    ):
        details = refusal(admin.create_webhook, workspace, url, event_types=["key.issued"])
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT, url
        assert (details.reason, details.domain) == ("WEBHOOK_TARGET_FORBIDDEN", "keyauthority.v1")
        assert details.metadata == {"field": "url"}
    assert admin.list_webhooks(workspace) == []


def test_bad_requests_are_refused_naming_the_field(admin: KeyAuthority, workspace: str) -> None:
    for url in ("", "ftp://example.com/", "not a url", "http://user:pw@127.0.0.1/"):
        details = refusal(admin.create_webhook, workspace, url)
        assert (details.code, details.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        ), url
        assert details.metadata == {"field": "url"}
    for event_types in (["key.unknown"], ["key.issued", "key.issued"]):
        details = refusal(
            admin.create_webhook, workspace, "http://127.0.0.1:9/", event_types=event_types
        )
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.metadata == {"field": "event_types"}
    assert admin.list_webhooks(workspace) == []

    unknown = str(uuid.uuid4())
    for call, args in (
        (admin.delete_webhook, (workspace, unknown)),
        (admin.list_webhook_deliveries, (workspace, unknown)),
        (admin.redeliver_webhook_event, (workspace, unknown, str(uuid.uuid4()))),
    ):
        details = refusal(call, *args)
        assert (details.code, details.reason) == (grpc.StatusCode.NOT_FOUND, "WEBHOOK_NOT_FOUND")
    details = refusal(admin.list_webhook_deliveries, workspace, unknown, page_size=-1)
    assert (details.code, details.metadata) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        {"field": "page_size"},
    )
    details = refusal(admin.delete_webhook, workspace, "")
    assert (details.code, details.metadata) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        {"field": "webhook_id"},
    )


def test_redelivering_an_unknown_event_is_not_found(
    admin: KeyAuthority, workspace: str
) -> None:
    created = admin.create_webhook(workspace, "http://127.0.0.1:9/never")
    webhook_id = created.webhook.webhook_id
    details = refusal(admin.redeliver_webhook_event, workspace, webhook_id, str(uuid.uuid4()))
    assert (details.code, details.reason) == (grpc.StatusCode.NOT_FOUND, "EVENT_NOT_FOUND")
    details = refusal(admin.redeliver_webhook_event, workspace, webhook_id, "")
    assert (details.code, details.metadata) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        {"field": "event_id"},
    )
    admin.delete_webhook(workspace, webhook_id)


def test_webhooks_need_credentials(webhook_server: DedicatedServer, workspace: str) -> None:
    with KeyAuthority(webhook_server.target) as anonymous:
        details = refusal(anonymous.list_webhooks, workspace)
    assert details.code == grpc.StatusCode.UNAUTHENTICATED
