"""Request ids (idempotent retries), UpdateKey with its mask and etag, disabling and enabling a
key, and the audit trail those changes leave, through the Python client."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import grpc
import pytest

from keyauthority_client import (
    ActorKind,
    AuditAction,
    AuditOutcome,
    KeyAuthority,
    KeyState,
    Role,
    VerifyCode,
    error_details,
)

REVOKE = AuditAction.Value("AUDIT_ACTION_REVOKE")
UPDATE = AuditAction.Value("AUDIT_ACTION_UPDATE")
DISABLE = AuditAction.Value("AUDIT_ACTION_DISABLE")
ADMIN = ActorKind.Value("ACTOR_KIND_ADMIN")
APPLIED = AuditOutcome.Value("AUDIT_OUTCOME_APPLIED")


def refusal(call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as refused:
        call(*args, **kwargs)
    return error_details(refused.value)


def request_id() -> str:
    return str(uuid.uuid4())


def action_names(events) -> list[str]:
    return [AuditAction.Name(event.action) for event in events]


def test_issue_with_a_request_id_is_idempotent(client: KeyAuthority, workspace: str) -> None:
    rid = request_id()
    first = client.issue_key(workspace, "idempotent", scopes=["a:read"], request_id=rid)
    again = client.issue_key(workspace, "idempotent", scopes=["a:read"], request_id=rid)
    assert again.key.key_id == first.key.key_id
    assert again.secret == first.secret
    assert client.list_keys(workspace).total_size == 1

    details = refusal(client.issue_key, workspace, "another name", scopes=["a:read"], request_id=rid)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (details.reason, details.domain) == ("IDEMPOTENCY_KEY_REUSED", "keyauthority.v1")
    assert client.list_keys(workspace).total_size == 1

    # Without a request id every call is a new key.
    assert client.issue_key(workspace, "idempotent").key.key_id != first.key.key_id

    # The retry changed nothing: one ISSUE event, carrying the request id.
    events = list(client.iter_audit_events(workspace, key_id=first.key.key_id))
    assert action_names(events) == ["AUDIT_ACTION_ISSUE"]
    assert events[0].request_id == rid


def test_rotate_and_revoke_with_a_request_id_are_idempotent(
    client: KeyAuthority, workspace: str
) -> None:
    issued = client.issue_key(workspace, "rotated")
    rid = request_id()
    rotated = client.rotate_key(workspace, issued.key.key_id, grace_period=0, request_id=rid)
    again = client.rotate_key(workspace, issued.key.key_id, grace_period=0, request_id=rid)
    assert again.key.key_id == rotated.key.key_id
    assert again.secret == rotated.secret
    details = refusal(
        client.rotate_key, workspace, issued.key.key_id, grace_period=60, request_id=rid
    )
    assert (details.code, details.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "IDEMPOTENCY_KEY_REUSED",
    )

    rid = request_id()
    revoked = client.revoke_key(workspace, rotated.key.key_id, request_id=rid)
    assert revoked.state == KeyState.Value("KEY_STATE_REVOKED")
    assert client.revoke_key(workspace, rotated.key.key_id, request_id=rid) == revoked
    details = refusal(client.revoke_key, workspace, issued.key.key_id, request_id=rid)
    assert details.reason == "IDEMPOTENCY_KEY_REUSED"

    # One event per change: the retries added none. The ROTATE event (on the old key) names the
    # successor.
    events = list(client.iter_audit_events(workspace, key_id=issued.key.key_id))
    assert action_names(events) == ["AUDIT_ACTION_ROTATE", "AUDIT_ACTION_ISSUE"]
    changes = {change.field: change.new_value for change in events[0].changes}
    assert json.loads(changes["rotated_to_key_id"]) == rotated.key.key_id
    revokes = list(client.iter_audit_events(workspace, key_id=rotated.key.key_id, action=REVOKE))
    assert len(revokes) == 1
    assert revokes[0].request_id == rid


def test_issue_trial_key_with_a_request_id_is_idempotent(client: KeyAuthority) -> None:
    rid = request_id()
    first = client.issue_trial_key(name="trial", client_ip="198.51.100.77", request_id=rid)
    again = client.issue_trial_key(name="trial", client_ip="198.51.100.77", request_id=rid)
    assert (again.key.key_id, again.secret) == (first.key.key_id, first.secret)


def test_update_name_and_scopes_with_the_mask(client: KeyAuthority, workspace: str) -> None:
    issued = client.issue_key(
        workspace, "before", description="kept", scopes=["a:read"], metadata={"team": "x"}
    )
    original = issued.key
    assert original.enabled is True
    assert original.etag != ""

    updated = client.update_key(
        workspace,
        original.key_id,
        name="after",
        scopes=["a:read", "b:write"],
        # Outside the mask: ignored.
        description="not applied",
        update_mask=["name", "scopes"],
    )
    assert updated.key_id == original.key_id
    assert updated.name == "after"
    assert list(updated.scopes) == ["a:read", "b:write"]
    assert updated.description == "kept"
    assert dict(updated.metadata) == {"team": "x"}
    assert updated.etag not in ("", original.etag)
    assert updated.update_time.ToDatetime() >= original.create_time.ToDatetime()
    assert updated.state == KeyState.Value("KEY_STATE_ACTIVE")

    fetched = client.get_key(workspace, original.key_id)
    assert (fetched.name, list(fetched.scopes), fetched.etag) == (
        "after",
        ["a:read", "b:write"],
        updated.etag,
    )
    # The same secret still works, with the new scopes.
    answer = client.verify_key(issued.secret, required_scopes=["b:write"])
    assert answer.code == VerifyCode.Value("VERIFY_CODE_VALID")

    # Without a mask, the fields given are the mask.
    described = client.update_key(workspace, original.key_id, description="new text")
    assert (described.description, described.name) == ("new text", "after")

    # A mask path that is no updatable field is refused.
    details = refusal(client.update_key, workspace, original.key_id, update_mask=["prefix"])
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_stale_etag_is_a_conflict(client: KeyAuthority, workspace: str) -> None:
    key = client.issue_key(workspace, "contended").key
    first = client.update_key(workspace, key.key_id, name="first writer", etag=key.etag)
    assert first.name == "first writer"

    details = refusal(client.update_key, workspace, key.key_id, name="second", etag=key.etag)
    assert details.code == grpc.StatusCode.ABORTED
    assert (details.reason, details.domain) == ("ETAG_MISMATCH", "keyauthority.v1")
    assert client.get_key(workspace, key.key_id).name == "first writer"

    # Re-read, redo: the current etag applies.
    second = client.update_key(workspace, key.key_id, name="second", etag=first.etag)
    assert second.name == "second"


def test_disable_then_enable(client: KeyAuthority, workspace: str) -> None:
    issued = client.issue_key(workspace, "switch")
    key_id = issued.key.key_id
    renamed = client.update_key(workspace, key_id, name="switched", update_mask=["name"])
    rid = request_id()

    disabled = client.update_key(
        workspace, key_id, enabled=False, update_mask=["enabled"], request_id=rid
    )
    assert disabled.enabled is False
    assert disabled.state == KeyState.Value("KEY_STATE_DISABLED")
    answer = client.verify_key(issued.secret)
    assert (answer.valid, answer.code) == (False, VerifyCode.Value("VERIFY_CODE_DISABLED"))
    assert VerifyCode.Name(answer.code) == "VERIFY_CODE_DISABLED"
    assert answer.key.key_id == key_id
    fetched = client.get_key(workspace, key_id)
    assert KeyState.Name(fetched.state) == "KEY_STATE_DISABLED"
    assert fetched.enabled is False
    # Listings hide disabled keys unless asked for inactive ones.
    assert [key.key_id for key in client.list_keys(workspace).keys] == []
    listed = client.list_keys(workspace, include_inactive=True)
    assert [key.key_id for key in listed.keys] == [key_id]

    enabled = client.update_key(workspace, key_id, enabled=True)
    assert enabled.enabled is True
    assert enabled.state == KeyState.Value("KEY_STATE_ACTIVE")
    assert client.verify_key(issued.secret).code == VerifyCode.Value("VERIFY_CODE_VALID")

    # The audit trail of the key, newest first: one event per change, by the admin token.
    page = client.list_audit_events(workspace, key_id=key_id)
    events = list(page.audit_events)
    assert page.next_page_token == ""
    assert action_names(events) == [
        "AUDIT_ACTION_ENABLE",
        "AUDIT_ACTION_DISABLE",
        "AUDIT_ACTION_UPDATE",
        "AUDIT_ACTION_ISSUE",
    ]
    for event in events:
        assert event.key_id == key_id
        assert event.workspace_id == workspace
        assert event.actor.kind == ADMIN
        assert (event.actor.id, event.actor.display) == ("admin", "admin")
        assert event.outcome == APPLIED
        assert event.event_id != ""
        assert event.client_ip == "127.0.0.1"
    times = [event.event_time.ToDatetime() for event in events]
    assert times == sorted(times, reverse=True)
    assert len({event.event_id for event in events}) == 4

    enable, disable, update, issue = events
    assert disable.request_id == rid
    changes = {change.field: change for change in disable.changes}
    assert json.loads(changes["enabled"].old_value) is True
    assert json.loads(changes["enabled"].new_value) is False
    changes = {change.field: change for change in enable.changes}
    assert (json.loads(changes["enabled"].old_value), json.loads(changes["enabled"].new_value)) == (
        False,
        True,
    )
    changes = {change.field: change for change in update.changes}
    assert json.loads(changes["name"].old_value) == "switch"
    assert json.loads(changes["name"].new_value) == "switched"
    assert renamed.name == "switched"
    assert issue.changes, "an ISSUE event lists the new key's fields"
    for change in issue.changes:
        assert change.old_value == "null"
        assert issued.secret not in change.new_value

    # Filters combine with AND.
    only = client.list_audit_events(workspace, key_id=key_id, action=DISABLE)
    assert [event.event_id for event in only.audit_events] == [disable.event_id]
    by_admin = client.list_audit_events(workspace, key_id=key_id, actor_kind=ADMIN, actor_id="admin")
    assert len(by_admin.audit_events) == 4
    other_kind = client.list_audit_events(
        workspace, key_id=key_id, actor_kind=ActorKind.Value("ACTOR_KIND_API_KEY")
    )
    assert list(other_kind.audit_events) == []
    window = client.list_audit_events(
        workspace,
        key_id=key_id,
        start_time=disable.event_time.ToDatetime(tzinfo=dt.UTC),
    )
    assert [event.event_id for event in window.audit_events] == [
        enable.event_id,
        disable.event_id,
    ]

    # Paging one event at a time follows next_page_token to the same list.
    paged = []
    token = ""
    while True:
        page = client.list_audit_events(workspace, key_id=key_id, page_size=1, page_token=token)
        assert len(page.audit_events) == 1
        paged.append(page.audit_events[0].event_id)
        token = page.next_page_token
        if not token:
            break
    assert paged == [event.event_id for event in events]
    # The workspace has this one key: its whole trail is the key's.
    assert [event.event_id for event in client.iter_audit_events(workspace, page_size=3)] == paged


def test_audit_page_tokens_are_bound_to_the_filters(client: KeyAuthority, workspace: str) -> None:
    key_id = client.issue_key(workspace, "paged").key.key_id
    client.update_key(workspace, key_id, name="renamed")
    first = client.list_audit_events(workspace, key_id=key_id, page_size=1)
    assert first.next_page_token != ""
    details = refusal(
        client.list_audit_events,
        workspace,
        key_id=key_id,
        action=UPDATE,
        page_size=1,
        page_token=first.next_page_token,
    )
    assert (details.code, details.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    details = refusal(client.list_audit_events, workspace, page_size=-1)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT


def test_an_updated_role_is_stored(client: KeyAuthority, workspace: str) -> None:
    key = client.issue_key(workspace, "viewer to be", role=Role.Value("ROLE_DEVELOPER")).key
    updated = client.update_key(workspace, key.key_id, role=Role.Value("ROLE_VIEWER"))
    assert updated.role == Role.Value("ROLE_VIEWER")
    events = list(client.iter_audit_events(workspace, key_id=key.key_id, action=UPDATE))
    assert len(events) == 1
    assert "role" in [change.field for change in events[0].changes]


def test_report_usage_counts_a_batch_once(client: KeyAuthority, workspace: str) -> None:
    issued = client.issue_key(workspace, "reported")
    key_id = issued.key.key_id
    used = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(minutes=1)
    rid = request_id()

    first = client.report_usage(workspace, [(key_id, 7, used)], request_id=rid)
    assert (first.replayed, first.counted_keys, list(first.skipped_key_ids)) == (False, 1, [])
    retry = client.report_usage(workspace, [(key_id, 7, used)], request_id=rid)
    assert (retry.replayed, retry.counted_keys) == (True, 0)

    details = refusal(client.report_usage, workspace, [(key_id, 8, used)], request_id=rid)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.reason == "IDEMPOTENCY_KEY_REUSED"

    other = client.report_usage(
        workspace, [(key_id, 1, used), ("AAAAAAAAAAAA", 1, used)], request_id=request_id()
    )
    assert (other.counted_keys, list(other.skipped_key_ids)) == (1, ["AAAAAAAAAAAA"])
    key = client.get_key(workspace, key_id)
    assert key.total_requests == 8
    assert key.last_used_time.ToDatetime(dt.timezone.utc) == used

    details = refusal(client.report_usage, workspace, [(key_id, 1, used)], request_id="")
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
