"""WatchKeyEvents through the Python client: stored then live events, a reconnection after the
last position, every workspace for an admin, EVENTS_PRUNED, cancelling, and a resuming watch
carried across a server restart."""

from __future__ import annotations

import queue
import threading
import time
import uuid

import grpc
import pytest

from keyauthority_client import (
    EVENTS_PRUNED,
    ActorKind,
    KeyAuthority,
    KeyEvent,
    KeyEventWatch,
    Role,
    error_details,
)

#: Longer than any event takes to arrive; only stops a broken test from hanging.
WAIT = 15.0
_END = object()


class Reader:
    """Iterates a watch in a thread of its own, so the test can wait for each item with a
    timeout: events, then the error that ended the iteration (if any) and the end."""

    def __init__(self, watch: KeyEventWatch) -> None:
        self.watch = watch
        self.items: queue.Queue[object] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.watch:
                self.items.put(event)
        except grpc.RpcError as error:
            self.items.put(error)
        self.items.put(_END)

    def next(self, timeout: float = WAIT) -> object:
        try:
            return self.items.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"nothing from the watch within {timeout} s")

    def event(self) -> KeyEvent:
        item = self.next()
        assert isinstance(item, KeyEvent), f"expected an event, got {item!r}"
        return item

    def close(self) -> None:
        self.watch.cancel()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the watch did not stop on cancel()"


def test_stored_then_live_events_and_a_reconnection_after_the_last_position(
    client: KeyAuthority, workspace: str
) -> None:
    key_id = client.issue_key(workspace, "watched").key.key_id

    # From 0: the stored key.issued.
    from_start = Reader(client.watch_key_events(workspace))
    issued = from_start.event()
    assert issued.type == "key.issued"
    assert (issued.workspace_id, issued.key_id) == (workspace, key_id)
    assert issued.position > 0
    assert uuid.UUID(issued.event_id)
    assert issued.HasField("event_time")
    assert issued.actor.kind == ActorKind.Value("ACTOR_KIND_ADMIN")

    # From now: only what commits after the watch started, here a rotation with both key ids.
    from_now = Reader(client.watch_key_events(workspace, from_now=True))
    successor = client.rotate_key(workspace, key_id).key.key_id
    rotated = from_now.event()
    assert rotated.type == "key.rotated"
    assert (rotated.key_id, rotated.new_key_id) == (key_id, successor)
    assert rotated.HasField("old_key_expire_time")
    assert rotated.position > issued.position
    # The watch from 0 follows it live, as the same event.
    assert from_start.event() == rotated
    assert from_start.watch.last_position == rotated.position
    from_start.close()
    from_now.close()

    # Reconnecting after the last position processed: only what came later.
    client.revoke_key(workspace, successor)
    resumed = Reader(client.watch_key_events(workspace, after_position=rotated.position))
    revoked = resumed.event()
    assert (revoked.type, revoked.key_id) == ("key.revoked", successor)
    assert revoked.position > rotated.position
    resumed.close()


def test_an_admin_watches_every_workspace_and_a_workspace_key_only_its_own(
    client: KeyAuthority, server
) -> None:
    east, west = (f"ws-{uuid.uuid4().hex[:12]}" for _ in range(2))
    east_key = client.issue_key(east, "east").key.key_id
    west_key = client.issue_key(west, "west").key.key_id

    # The session's server has other tests' events too: keep this test's two workspaces.
    everything = Reader(client.watch_key_events(all_workspaces=True))
    seen = {}
    while len(seen) < 2:
        event = everything.event()
        if event.workspace_id in (east, west):
            seen[event.workspace_id] = (event.type, event.key_id)
    everything.close()
    assert seen == {east: ("key.issued", east_key), west: ("key.issued", west_key)}

    # An account admin's API key: its own workspace, never every one.
    secret = client.issue_key(west, "west admin", role=Role.Value("ROLE_ACCOUNT_ADMIN")).secret
    with KeyAuthority(server.target, admin_token=secret) as west_admin:
        refused = Reader(west_admin.watch_key_events(all_workspaces=True))
        error = refused.next()
        assert isinstance(error, grpc.RpcError)
        assert error_details(error).code == grpc.StatusCode.PERMISSION_DENIED
        assert refused.next() is _END

        own = Reader(west_admin.watch_key_events())
        event = own.event()
        assert (event.workspace_id, event.key_id) == (west, west_key)
        own.close()


def test_cancel_ends_the_iteration_from_another_thread(
    client: KeyAuthority, workspace: str
) -> None:
    with client.watch_key_events(workspace, from_now=True, resume=True) as watch:
        reader = Reader(watch)
        time.sleep(0.2)  # the reader is waiting for an event
        reader.close()
        assert reader.next() is _END  # no error: a cancelled watch just ends
    assert watch.cancelled


def test_a_start_before_the_oldest_kept_event_is_events_pruned(dedicated_server) -> None:
    # Events are pruned as soon as the pruning (on the audit pruning's schedule) runs.
    running = dedicated_server(
        KEY_AUTHORITY_EVENT_RETENTION="1ms", KEY_AUTHORITY_AUDIT_PRUNE_INTERVAL="50ms"
    )
    with running.client() as admin:
        admin.issue_key("acme", "soon pruned")
        deadline = time.monotonic() + WAIT
        while True:
            reader = Reader(admin.watch_key_events("acme"))
            item = reader.next()
            if isinstance(item, grpc.RpcError):
                break
            reader.close()
            assert time.monotonic() < deadline, "the events were never pruned"
            time.sleep(0.05)
        details = error_details(item)
        assert details.code == grpc.StatusCode.OUT_OF_RANGE
        assert (details.reason, details.domain) == (EVENTS_PRUNED, "keyauthority.v1")
        assert "position" in details.message

        # A resuming watch does not retry it: it raises it.
        resuming = Reader(admin.watch_key_events("acme", resume=True))
        error = resuming.next()
        assert isinstance(error, grpc.RpcError)
        assert error_details(error).reason == "EVENTS_PRUNED"
        assert resuming.next() is _END


def test_a_resuming_watch_carries_on_across_a_server_restart(dedicated_server) -> None:
    running = dedicated_server()
    # The watcher's channel lives through the restart; the calls after it use a fresh client.
    with running.client() as watcher:
        with running.client() as admin:
            before = admin.issue_key("acme", "before").key.key_id
        resuming = Reader(watcher.watch_key_events("acme", resume=True))
        plain = Reader(watcher.watch_key_events("acme"))
        first = resuming.event()
        assert (first.type, first.key_id) == ("key.issued", before)
        assert plain.event() == first

        # The server shuts down (ending every watch cleanly) and comes back on the same address
        # and database.
        running.stop()
        # The plain watch ended with its call, without an error.
        assert plain.next() is _END
        running.start()

        with running.client() as admin:
            after = admin.issue_key("acme", "after").key.key_id
            # The resuming one watched again after the last position it delivered: the new
            # event, and not the first one again.
            second = resuming.event()
            assert (second.type, second.key_id) == ("key.issued", after)
            assert second.position > first.position
            # And live, on the same watch.
            successor = admin.rotate_key("acme", after).key.key_id
            third = resuming.event()
            assert (third.type, third.new_key_id) == ("key.rotated", successor)
            assert resuming.watch.last_position == third.position
        resuming.close()
