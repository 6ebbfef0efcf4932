"""Refusals: the gRPC code, and the google.rpc ErrorInfo / RetryInfo / BadRequest details."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from keyauthority_client import (
    ERROR_DOMAIN,
    Environment,
    KeyAuthority,
    KeyState,
    Role,
    VerifyCode,
    error_details,
)


def refusal(call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as refused:
        call(*args, **kwargs)
    return error_details(refused.value)


def test_invalid_argument_names_the_field(client: KeyAuthority, workspace: str) -> None:
    details = refusal(client.issue_key, workspace, "")
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "INVALID_ARGUMENT"
    assert details.domain == ERROR_DOMAIN == "keyauthority.v1"
    assert details.metadata == {"field": "name"}
    assert details.message.startswith("invalid name: ")
    assert [field for field, _ in details.field_violations] == ["name"]
    assert details.retry_delay is None

    details = refusal(client.verify_key, "ka_live_x", client_ip="not-an-ip")
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (details.reason, details.domain) == ("INVALID_ARGUMENT", "keyauthority.v1")
    assert details.metadata == {"field": "client_ip"}

    details = refusal(client.list_keys, workspace, page_size=-1)
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert details.metadata == {"field": "page_size"}

    details = refusal(
        client.issue_key,
        workspace,
        "past",
        expire_time=dt.datetime(2001, 1, 1, tzinfo=dt.UTC),
    )
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert details.metadata == {"field": "expire_time"}


def test_ip_rate_limited_trial_keys_carry_retry_info(
    client: KeyAuthority, anonymous: KeyAuthority
) -> None:
    # The admin token makes this client a trusted front end, so client_ip is honoured: this test
    # has an address of its own.
    ip = "198.51.100.23"
    issued = [client.issue_trial_key(name=f"trial {n}", client_ip=ip) for n in range(5)]
    for trial in issued:
        assert trial.secret.startswith("ka_trial_")
        assert trial.key.workspace_id == "trial"
        assert trial.key.environment == Environment.Value("ENVIRONMENT_TRIAL")
        assert trial.key.role == Role.Value("ROLE_TRIAL")
        assert trial.key.usage_limit == 10
        lifetime = trial.key.expire_time.ToDatetime() - trial.key.create_time.ToDatetime()
        assert abs(lifetime - dt.timedelta(minutes=30)) < dt.timedelta(seconds=2)

    details = refusal(client.issue_trial_key, client_ip=ip)
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.reason == "IP_RATE_LIMITED"
    assert details.domain == "keyauthority.v1"
    assert details.metadata == {}
    assert details.retry_delay is not None
    assert dt.timedelta(0) < details.retry_delay <= dt.timedelta(minutes=1)

    # The limit is per address.
    assert client.issue_trial_key(client_ip="198.51.100.24").key.role == Role.Value("ROLE_TRIAL")

    # A trial key verifies, and anyone may revoke it by its prefix.
    trial = issued[0]
    assert client.verify_key(trial.secret).code == VerifyCode.Value("VERIFY_CODE_VALID")
    revoked = anonymous.revoke_trial_key(trial.key.prefix)
    assert revoked.state == KeyState.Value("KEY_STATE_REVOKED")
    assert client.verify_key(trial.secret).code == VerifyCode.Value("VERIFY_CODE_REVOKED")
    # A trusted front end revokes on behalf of an end user's address (its own per-IP limit).
    on_behalf = client.revoke_trial_key(issued[1].key.prefix, client_ip=ip)
    assert on_behalf.state == KeyState.Value("KEY_STATE_REVOKED")


def test_credentials_are_required(anonymous: KeyAuthority, server, workspace: str) -> None:
    details = refusal(anonymous.list_keys, workspace)
    assert details.code == grpc.StatusCode.UNAUTHENTICATED
    assert (details.reason, details.domain) == ("MISSING_AUTH_HEADER", "keyauthority.v1")

    with KeyAuthority(server.target, admin_token="kaadmin_wrong") as impostor:
        details = refusal(impostor.list_keys, workspace)
    assert details.code == grpc.StatusCode.UNAUTHENTICATED
    assert details.reason == "INVALID_CREDENTIALS"

    # VerifyService needs no credentials (no verify tokens configured).
    assert anonymous.verify_key("not-a-key").code == VerifyCode.Value("VERIFY_CODE_MALFORMED")


def test_unknown_key_is_not_found(client: KeyAuthority, workspace: str) -> None:
    details = refusal(client.get_key, workspace, "AAAAAAAAAAAA")
    assert details.code == grpc.StatusCode.NOT_FOUND
    assert (details.reason, details.domain, details.metadata) == (
        "KEY_NOT_FOUND",
        "keyauthority.v1",
        {},
    )
    assert details.retry_delay is None


def test_an_api_key_cannot_mint_keys(client: KeyAuthority, server, workspace: str) -> None:
    issued = client.issue_key(workspace, "caller", role=Role.Value("ROLE_ACCOUNT_ADMIN"))
    with KeyAuthority(server.target, admin_token=issued.secret) as as_key:
        # An API key acts in its own workspace: an empty workspace_id means that one.
        assert [key.key_id for key in as_key.list_keys("").keys] == [issued.key.key_id]
        details = refusal(as_key.issue_key, workspace, "minted")
        assert (details.code, details.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "INSUFFICIENT_ROLE",
        )
        details = refusal(as_key.list_keys, workspace + "-elsewhere")
        assert (details.code, details.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "WORKSPACE_MISMATCH",
        )
