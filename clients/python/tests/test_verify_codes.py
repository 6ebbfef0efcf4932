"""Every VerifyKey verdict, each with the exact code and whether the key is in the answer."""

from __future__ import annotations

import datetime as dt

from keytext import unknown_key, with_checksum, wrong_secret_for

from keyauthority_client import KeyAuthority, KeyState, Role, VerifyCode

VALID = VerifyCode.Value("VERIFY_CODE_VALID")
MALFORMED = VerifyCode.Value("VERIFY_CODE_MALFORMED")
NOT_FOUND = VerifyCode.Value("VERIFY_CODE_NOT_FOUND")
REVOKED = VerifyCode.Value("VERIFY_CODE_REVOKED")
EXPIRED = VerifyCode.Value("VERIFY_CODE_EXPIRED")
INSUFFICIENT_SCOPE = VerifyCode.Value("VERIFY_CODE_INSUFFICIENT_SCOPE")
LOCKED = VerifyCode.Value("VERIFY_CODE_LOCKED")
USAGE_EXHAUSTED = VerifyCode.Value("VERIFY_CODE_USAGE_EXHAUSTED")
DISABLED = VerifyCode.Value("VERIFY_CODE_DISABLED")
INSUFFICIENT_ROLE = VerifyCode.Value("VERIFY_CODE_INSUFFICIENT_ROLE")


def test_valid(client: KeyAuthority, workspace: str) -> None:
    issued = client.issue_key(workspace, "valid", scopes=["payments:read", "payments:write"])
    answer = client.verify_key(issued.secret, required_scopes=["payments:write"])
    assert answer.valid is True
    assert answer.code == VALID
    assert answer.key.key_id == issued.key.key_id
    assert answer.key.workspace_id == workspace
    assert list(answer.key.scopes) == ["payments:read", "payments:write"]
    assert not answer.HasField("retry_after")
    # No required scopes: any valid key passes.
    assert client.verify_key(issued.secret).code == VALID


def test_malformed(client: KeyAuthority, workspace: str) -> None:
    secret = client.issue_key(workspace, "malformed").secret
    # The last character is the end of the checksum: change it and the text is no key.
    bad_check = secret[:-1] + ("0" if secret[-1] != "0" else "1")
    for text in ["", "not-a-key", secret + "x", bad_check, secret.replace("_live_", "_prod_")]:
        answer = client.verify_key(text)
        assert (answer.valid, answer.code) == (False, MALFORMED), text
        assert not answer.HasField("key")


def test_not_found(client: KeyAuthority, workspace: str) -> None:
    issued = client.issue_key(workspace, "not found")
    for text in [unknown_key(), wrong_secret_for(issued.key.prefix)]:
        answer = client.verify_key(text)
        assert (answer.valid, answer.code) == (False, NOT_FOUND), text
        assert not answer.HasField("key")


def test_revoked(client: KeyAuthority, workspace: str) -> None:
    issued = client.issue_key(workspace, "revoked")
    assert client.verify_key(issued.secret).code == VALID
    client.revoke_key(workspace, issued.key.key_id)
    answer = client.verify_key(issued.secret)
    assert (answer.valid, answer.code) == (False, REVOKED)
    assert answer.key.key_id == issued.key.key_id
    assert answer.key.state == KeyState.Value("KEY_STATE_REVOKED")


def test_expired_by_rotation_without_grace(client: KeyAuthority, workspace: str) -> None:
    issued = client.issue_key(workspace, "expired")
    rotated = client.rotate_key(workspace, issued.key.key_id, grace_period=0)
    answer = client.verify_key(issued.secret)
    assert (answer.valid, answer.code) == (False, EXPIRED)
    assert answer.key.key_id == issued.key.key_id
    assert answer.key.state == KeyState.Value("KEY_STATE_EXPIRED")
    assert client.verify_key(rotated.secret).code == VALID


def test_insufficient_scope(client: KeyAuthority, workspace: str) -> None:
    issued = client.issue_key(workspace, "reader", scopes=["payments:read"])
    answer = client.verify_key(issued.secret, required_scopes=["payments:read", "payments:write"])
    assert (answer.valid, answer.code) == (False, INSUFFICIENT_SCOPE)
    assert answer.key.key_id == issued.key.key_id
    # The scope `full_access` grants everything.
    admin = client.issue_key(workspace, "full", scopes=["full_access"])
    assert client.verify_key(admin.secret, required_scopes=["anything:at_all"]).code == VALID


def test_locked_after_ten_wrong_secrets(client: KeyAuthority, workspace: str) -> None:
    issued = client.issue_key(workspace, "locked")
    other = client.issue_key(workspace, "other")
    # The owner's key is verified (and so proven correct) before the attack.
    assert client.verify_key(issued.secret).code == VALID
    for attempt in range(10):
        answer = client.verify_key(wrong_secret_for(issued.key.prefix))
        assert answer.code == NOT_FOUND, f"wrong secret #{attempt + 1}"
    answer = client.verify_key(wrong_secret_for(issued.key.prefix))
    assert (answer.valid, answer.code) == (False, LOCKED)
    assert not answer.HasField("key")
    retry_after = answer.retry_after.ToTimedelta()
    assert dt.timedelta(0) < retry_after <= dt.timedelta(minutes=15)
    # A secret already proven correct keeps working, and other keys are not affected.
    assert client.verify_key(issued.secret).code == VALID
    assert client.verify_key(other.secret).code == VALID


def test_usage_exhausted(client: KeyAuthority, workspace: str) -> None:
    issued = client.issue_key(workspace, "metered", usage_limit=1)
    assert issued.key.usage_limit == 1
    assert issued.key.usage_remaining == 1
    # cost 0 checks without consuming.
    checked = client.verify_key(issued.secret, cost=0)
    assert (checked.code, checked.key.usage_remaining) == (VALID, 1)
    first = client.verify_key(issued.secret)
    assert (first.valid, first.code, first.key.usage_remaining) == (True, VALID, 0)
    second = client.verify_key(issued.secret)
    assert (second.valid, second.code) == (False, USAGE_EXHAUSTED)
    assert second.key.key_id == issued.key.key_id
    assert second.key.usage_remaining == 0


def test_disabled(client: KeyAuthority, workspace: str) -> None:
    issued = client.issue_key(workspace, "disabled", scopes=["payments:read"])
    client.update_key(workspace, issued.key.key_id, enabled=False)
    for scopes in ([], ["payments:read"]):
        answer = client.verify_key(issued.secret, required_scopes=scopes)
        assert (answer.valid, answer.code) == (False, DISABLED)
        assert VerifyCode.Name(answer.code) == "VERIFY_CODE_DISABLED"
        assert answer.key.key_id == issued.key.key_id
        assert answer.key.state == KeyState.Value("KEY_STATE_DISABLED")
        assert answer.key.enabled is False
    client.update_key(workspace, issued.key.key_id, enabled=True)
    assert client.verify_key(issued.secret).code == VALID


def test_checksum_helper_agrees_with_the_server(client: KeyAuthority, workspace: str) -> None:
    secret = client.issue_key(workspace, "checksum").secret
    assert with_checksum(secret[:-6]) == secret


def test_insufficient_role(client: KeyAuthority, workspace: str) -> None:
    issued = client.issue_key(workspace, "viewer", role=Role.Value("ROLE_VIEWER"))
    answer = client.verify_key(issued.secret, minimum_role=Role.Value("ROLE_DEVELOPER"))
    assert (answer.valid, answer.code) == (False, INSUFFICIENT_ROLE)
    assert answer.key.key_id == issued.key.key_id
    answer = client.verify_key(issued.secret, minimum_role=Role.Value("ROLE_VIEWER"))
    assert answer.code == VALID
