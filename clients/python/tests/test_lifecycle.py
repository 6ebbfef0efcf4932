"""Issue, get, list with paging, rotate and revoke, through the Python client."""

from __future__ import annotations

import datetime as dt
import re

import grpc
import pytest

from keyauthority_client import (
    Environment,
    KeyAuthority,
    KeyState,
    Role,
    VerifyCode,
    error_details,
)

KEY_TEXT = re.compile(r"ka_live_[0-9A-Za-z]{50}")
THIRTY_DAYS = dt.timedelta(days=30)


def seconds_between(start, end) -> float:
    return (end.ToDatetime() - start.ToDatetime()).total_seconds()


def test_issue_then_get(client: KeyAuthority, workspace: str) -> None:
    issued = client.issue_key(
        workspace,
        "billing worker",
        description="charges cards",
        scopes=["payments:read", "payments:write"],
        environment=Environment.Value("ENVIRONMENT_LIVE"),
        role=Role.Value("ROLE_DEVELOPER"),
        ttl=THIRTY_DAYS,
        metadata={"team": "payments"},
    )
    key = issued.key
    assert KEY_TEXT.fullmatch(issued.secret), issued.secret
    assert re.fullmatch(r"[0-9A-Za-z]{12}", key.key_id)
    assert key.prefix == f"ka_live_{key.key_id}"
    assert issued.secret.startswith(key.prefix)
    assert key.workspace_id == workspace
    assert key.name == "billing worker"
    assert key.description == "charges cards"
    assert list(key.scopes) == ["payments:read", "payments:write"]
    assert key.environment == Environment.Value("ENVIRONMENT_LIVE")
    assert key.role == Role.Value("ROLE_DEVELOPER")
    assert key.state == KeyState.Value("KEY_STATE_ACTIVE")
    assert dict(key.metadata) == {"team": "payments"}
    assert key.created_by == "admin"
    assert key.revoked_by == ""
    assert key.usage_limit == 0
    assert key.total_requests == 0
    assert not key.HasField("revoke_time")
    assert abs(seconds_between(key.create_time, key.expire_time) - THIRTY_DAYS.total_seconds()) < 2

    fetched = client.get_key(workspace, key.key_id)
    assert fetched.key_id == key.key_id
    assert fetched.prefix == key.prefix
    assert fetched.name == key.name
    assert list(fetched.scopes) == list(key.scopes)
    assert dict(fetched.metadata) == {"team": "payments"}
    assert fetched.create_time == key.create_time
    assert fetched.expire_time == key.expire_time
    assert fetched.state == KeyState.Value("KEY_STATE_ACTIVE")

    # Defaults: live, developer, no scopes (full access), never expires.
    plain = client.issue_key(workspace, "plain").key
    assert plain.environment == Environment.Value("ENVIRONMENT_LIVE")
    assert plain.role == Role.Value("ROLE_DEVELOPER")
    assert list(plain.scopes) == []
    assert not plain.HasField("expire_time")


def tampered(token: str) -> str:
    middle = len(token) // 2
    return token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]


def test_list_pages_newest_first(client: KeyAuthority, workspace: str) -> None:
    ids = [client.issue_key(workspace, f"key {n}").key.key_id for n in range(5)]
    newest_first = list(reversed(ids))

    pages = []
    token = ""
    while True:
        page = client.list_keys(workspace, page_size=2, page_token=token)
        assert page.total_size == 5
        pages.append([key.key_id for key in page.keys])
        token = page.next_page_token
        if not token:
            break
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:5]]

    assert [key.key_id for key in client.iter_keys(workspace, page_size=3)] == newest_first
    everything = client.list_keys(workspace)
    assert [key.key_id for key in everything.keys] == newest_first
    assert everything.next_page_token == ""
    assert everything.total_size == 5

    # A token is bound to its workspace and to include_inactive.
    first = client.list_keys(workspace, page_size=2)
    for other in (
        dict(workspace_id=workspace + "-other", page_token=first.next_page_token),
        dict(workspace_id=workspace, page_token=first.next_page_token, include_inactive=True),
        dict(workspace_id=workspace, page_token=tampered(first.next_page_token)),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            client.list_keys(other.pop("workspace_id"), page_size=2, **other)
        details = error_details(refused.value)
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.reason == "INVALID_PAGE_TOKEN"
        assert details.metadata == {"field": "page_token"}


def test_rotate_keeps_the_old_key_for_the_grace_period(
    client: KeyAuthority, workspace: str
) -> None:
    old = client.issue_key(
        workspace, "rotated", scopes=["reports:read"], ttl=THIRTY_DAYS, metadata={"a": "b"}
    )
    rotated = client.rotate_key(workspace, old.key.key_id, grace_period=dt.timedelta(hours=1))

    new = rotated.key
    assert new.key_id != old.key.key_id
    assert KEY_TEXT.fullmatch(rotated.secret)
    assert rotated.secret != old.secret
    assert rotated.secret.startswith(new.prefix)
    assert new.name == "rotated"
    assert list(new.scopes) == ["reports:read"]
    assert dict(new.metadata) == {"a": "b"}
    assert new.rotated_from_key_id == old.key.key_id
    assert new.state == KeyState.Value("KEY_STATE_ACTIVE")
    # A rotation renews the secret, not the lifetime: the successor ends when the old key would.
    assert new.expire_time == old.key.expire_time

    previous = rotated.previous_key
    assert previous.key_id == old.key.key_id
    assert previous.rotated_to_key_id == new.key_id
    grace_left = seconds_between(new.create_time, previous.expire_time)
    assert 3590 < grace_left <= 3600

    # Both work during the grace period.
    assert client.verify_key(old.secret).code == VerifyCode.Value("VERIFY_CODE_VALID")
    assert client.verify_key(rotated.secret).code == VerifyCode.Value("VERIFY_CODE_VALID")
    assert client.get_key(workspace, old.key.key_id).rotated_to_key_id == new.key_id

    with pytest.raises(grpc.RpcError) as refused:
        client.rotate_key(workspace, old.key.key_id)
    details = error_details(refused.value)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.reason == "KEY_ALREADY_ROTATED"
    assert new.key_id in details.message


def test_revoke(client: KeyAuthority, workspace: str) -> None:
    issued = client.issue_key(workspace, "to revoke")
    kept = client.issue_key(workspace, "kept")

    revoked = client.revoke_key(workspace, issued.key.key_id)
    assert revoked.key_id == issued.key.key_id
    assert revoked.state == KeyState.Value("KEY_STATE_REVOKED")
    assert revoked.revoked_by == "admin"
    assert revoked.HasField("revoke_time")

    # Revoking again is no error and changes nothing.
    again = client.revoke_key(workspace, issued.key.key_id)
    assert again.state == KeyState.Value("KEY_STATE_REVOKED")
    assert again.revoke_time == revoked.revoke_time

    assert client.get_key(workspace, issued.key.key_id).state == KeyState.Value("KEY_STATE_REVOKED")
    active = client.list_keys(workspace)
    assert [key.key_id for key in active.keys] == [kept.key.key_id]
    assert active.total_size == 1
    everything = client.list_keys(workspace, include_inactive=True)
    assert [key.key_id for key in everything.keys] == [kept.key.key_id, issued.key.key_id]
    assert everything.total_size == 2

    answer = client.verify_key(issued.secret)
    assert not answer.valid
    assert answer.code == VerifyCode.Value("VERIFY_CODE_REVOKED")

    with pytest.raises(grpc.RpcError) as refused:
        client.rotate_key(workspace, issued.key.key_id)
    details = error_details(refused.value)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.reason == "KEY_REVOKED"


def test_rotate_with_a_new_expiry_then_revoke_the_chain(
    client: KeyAuthority, workspace: str
) -> None:
    old = client.issue_key(workspace, "chained", ttl=THIRTY_DAYS)
    renewed = client.rotate_key(
        workspace, old.key.key_id, grace_period=0, ttl=dt.timedelta(days=90)
    )
    lifetime = seconds_between(renewed.key.create_time, renewed.key.expire_time)
    assert abs(lifetime - dt.timedelta(days=90).total_seconds()) < 2
    again = client.rotate_key(workspace, renewed.key.key_id, grace_period=60)
    assert again.key.expire_time == renewed.key.expire_time

    chain = client.revoke_key_chain(workspace, old.key.key_id)
    assert chain.key.key_id == old.key.key_id
    assert [key.key_id for key in chain.successors] == [renewed.key.key_id, again.key.key_id]
    assert {key.state for key in chain.successors} == {KeyState.Value("KEY_STATE_REVOKED")}
    assert client.verify_key(again.secret).code == VerifyCode.Value("VERIFY_CODE_REVOKED")


def test_expiries_stay_within_the_maximum_lifetime_and_render_as_json(
    client: KeyAuthority, workspace: str
) -> None:
    from google.protobuf import json_format

    with pytest.raises(grpc.RpcError) as refused:
        client.issue_key(workspace, "forever", ttl=dt.timedelta(days=11 * 366))
    details = error_details(refused.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "ttl" in details.message

    client.issue_key(workspace, "long", ttl=dt.timedelta(days=9 * 365))
    listed = json_format.MessageToDict(client.list_keys(workspace))
    assert listed["keys"][0]["expireTime"].endswith("Z")
