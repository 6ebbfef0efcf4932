"""example.py (the README's snippet) runs against the live server and prints what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

CLIENT_DIR = Path(__file__).resolve().parents[1]


def test_example_runs(server) -> None:
    env = dict(
        os.environ,
        KEY_AUTHORITY_TARGET=server.target,
        KEY_AUTHORITY_ADMIN_TOKEN=server.admin_token,
    )
    result = subprocess.run(
        [sys.executable, "example.py"],
        cwd=CLIENT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result.stdout
    assert re.fullmatch(r"issued ka_live_[0-9A-Za-z]{12}", lines[0])
    assert lines[1:] == [
        "verify: VERIFY_CODE_VALID",
        "after revoke: VERIFY_CODE_REVOKED",
        "refused: INVALID_ARGUMENT {'field': 'name'}",
    ]
