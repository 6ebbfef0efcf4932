"""Starts the real key-authority binary once per session and hands out clients of it.

The binary is ``$KEY_AUTHORITY_BIN``, else ``../../target/debug/key-authority`` (``cargo build``).
It serves on a free 127.0.0.1 port with a temporary SQLite database and a random admin token,
and is stopped with SIGTERM when the session ends (a clean exit is asserted).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

CLIENT_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = CLIENT_DIR.parents[1]
sys.path.insert(0, str(CLIENT_DIR))

from keyauthority_client import _codegen  # noqa: E402

# Regenerate on every run, so the suite always tests the protos as they are now.
_codegen.generate()

from keyauthority_client import KeyAuthority  # noqa: E402

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


@dataclass(frozen=True)
class Server:
    target: str
    admin_token: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _binary() -> Path:
    configured = os.environ.get("KEY_AUTHORITY_BIN")
    binary = Path(configured) if configured else REPO_DIR / "target" / "debug" / "key-authority"
    if not binary.is_file():
        pytest.exit(
            f"server binary not found at {binary}: run `cargo build` or set KEY_AUTHORITY_BIN",
            returncode=2,
        )
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _server_env(admin_token: str) -> dict[str, str]:
    # Only this suite's configuration: drop anything the caller's environment would add.
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("KEY_AUTHORITY_", "OTEL_")) and name != "DATABASE_URL"
    }
    env["KEY_AUTHORITY_ADMIN_TOKEN"] = admin_token
    env.setdefault("RUST_LOG", "info")
    return env


def _die_with_parent() -> None:
    # Linux: if this test process is killed outright, the server gets SIGTERM instead of living on.
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _wait_serving(process: subprocess.Popen[bytes], target: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"key-authority exited with {process.returncode} before serving:\n"
                    + log.read_text(errors="replace")
                )
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(
                    f"key-authority did not report SERVING within {START_TIMEOUT} s:\n"
                    + log.read_text(errors="replace")
                )
            time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def _launch(
    binary: Path,
    target: str,
    database: Path,
    log: Path,
    admin_token: str,
    extra_env: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    env = _server_env(admin_token)
    env.update(extra_env or {})
    with log.open("ab") as sink:
        return subprocess.Popen(
            [
                str(binary),
                "serve",
                "--listen",
                target,
                "--database-url",
                f"sqlite://{database}",
                "--shutdown-grace",
                "5s",
                *extra_args,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    binary = _binary()
    folder = tmp_path_factory.mktemp("key-authority")
    admin_token = "kaadmin_pytest_" + secrets.token_hex(16)
    # The port is free when probed; should another process take it first, try again.
    for attempt in range(3):
        port = _free_port()
        target = f"127.0.0.1:{port}"
        log = folder / f"server-{attempt}.log"
        process = _launch(binary, target, folder / f"keys-{attempt}.db", log, admin_token)
        try:
            _wait_serving(process, target, log)
            break
        except RuntimeError:
            _stop(process)
            if attempt == 2 or "in use" not in log.read_text(errors="replace"):
                raise
    running = Server(target=target, admin_token=admin_token, process=process, log=log)
    try:
        yield running
    finally:
        code = _stop(process)
    assert code == 0, f"key-authority exited with {code} on SIGTERM:\n{running.log_text()}"


class DedicatedServer:
    """A key-authority of one test's (or one module's) own, with extra environment and
    command-line flags, which the test may stop and start again on the same address and database
    (as a restarted replica)."""

    def __init__(
        self, folder: Path, extra_env: dict[str, str], extra_args: Sequence[str] = ()
    ) -> None:
        self.binary = _binary()
        self.folder = folder
        self.extra_env = extra_env
        self.extra_args = tuple(extra_args)
        self.admin_token = "kaadmin_pytest_" + secrets.token_hex(16)
        self.target = f"127.0.0.1:{_free_port()}"
        self.database = folder / "keys.db"
        self.log = folder / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.process is None, "already running"
        process = _launch(
            self.binary,
            self.target,
            self.database,
            self.log,
            self.admin_token,
            self.extra_env,
            self.extra_args,
        )
        try:
            _wait_serving(process, self.target, self.log)
        except RuntimeError:
            _stop(process)
            raise
        self.process = process

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM); a clean exit is asserted."""
        if self.process is None:
            return
        code = _stop(self.process)
        self.process = None
        assert code == 0, f"key-authority exited with {code} on SIGTERM:\n{self.log_text()}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self, token: str | None = None) -> KeyAuthority:
        return KeyAuthority(self.target, admin_token=token or self.admin_token)


@pytest.fixture
def dedicated_server(tmp_path: Path) -> Iterator[Callable[..., DedicatedServer]]:
    """Starts servers of this test's own, with extra environment (KEY_AUTHORITY_...) and, in
    ``args``, extra flags of ``key-authority serve``."""
    started: list[DedicatedServer] = []

    def start(args: Sequence[str] = (), **extra_env: str) -> DedicatedServer:
        folder = tmp_path / f"server-{len(started)}"
        folder.mkdir()
        running = DedicatedServer(folder, extra_env, args)
        started.append(running)
        running.start()
        return running

    try:
        yield start
    finally:
        for running in started:
            running.stop()


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[KeyAuthority]:
    """A client holding the admin token."""
    with KeyAuthority(server.target, admin_token=server.admin_token) as admin:
        yield admin


@pytest.fixture(scope="session")
def anonymous(server: Server) -> Iterator[KeyAuthority]:
    """A client without credentials."""
    with KeyAuthority(server.target) as nobody:
        yield nobody


@pytest.fixture
def workspace() -> str:
    """A workspace of its own for each test, so tests never see each other's keys."""
    return f"ws-{uuid.uuid4().hex[:16]}"
