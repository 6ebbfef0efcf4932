"""Generates the Python stubs of key-authority's protos with grpcio-tools.

The stubs are not checked in: they are written to ``keyauthority_client/_gen/`` (git-ignored) by
``python generate.py``, by the test suite's conftest, or on first import when missing. protoc
writes absolute imports (``from keyauthority.v1 import key_pb2``); they are rewritten to point
inside this package, so nothing has to be added to ``sys.path``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
GEN_DIR = PACKAGE_DIR / "_gen"
# clients/python/keyauthority_client/ -> the repository root -> proto/
DEFAULT_PROTO_DIR = PACKAGE_DIR.parents[2] / "proto"
PROTO_PACKAGE = "keyauthority/v1"
_IMPORT = re.compile(r"^(from|import) keyauthority\.v1\b", re.MULTILINE)


def proto_dir() -> Path:
    """The folder of ``keyauthority/v1/*.proto``: ``$KEY_AUTHORITY_PROTO_DIR``, else the repo's."""
    return Path(os.environ.get("KEY_AUTHORITY_PROTO_DIR") or DEFAULT_PROTO_DIR).resolve()


def is_generated() -> bool:
    """True when every proto has its stubs, written after the proto last changed (a checkout
    whose protos gained a file or a field regenerates on its next import)."""
    sources = sorted((proto_dir() / PROTO_PACKAGE).glob("*.proto"))
    generated = GEN_DIR / "keyauthority" / "v1"
    for source in sources:
        stub = generated / f"{source.stem}_pb2_grpc.py"
        if not stub.is_file() or stub.stat().st_mtime < source.stat().st_mtime:
            return False
    return bool(sources) or (generated / "verify_service_pb2_grpc.py").is_file()


def generate(protos: Path | None = None) -> Path:
    """(Re)generates every stub into ``_gen/`` and returns that folder."""
    protos = (protos or proto_dir()).resolve()
    sources = sorted((protos / PROTO_PACKAGE).glob("*.proto"))
    if not sources:
        raise FileNotFoundError(f"no .proto files in {protos / PROTO_PACKAGE}")
    # Write into a fresh folder next to _gen/, then swap it in, so a reader never sees half a set.
    staging = Path(tempfile.mkdtemp(prefix="_gen-", dir=PACKAGE_DIR))
    try:
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{protos}",
            f"--python_out={staging}",
            f"--pyi_out={staging}",
            f"--grpc_python_out={staging}",
            *(str(source.relative_to(protos)) for source in sources),
        ]
        result = subprocess.run(command, cwd=protos, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                "grpc_tools.protoc failed (is grpcio-tools installed?):\n"
                + result.stdout
                + result.stderr
            )
        for path in staging.rglob("*.py*"):
            text = path.read_text()
            path.write_text(_IMPORT.sub(r"\1 keyauthority_client._gen.keyauthority.v1", text))
        for folder in (staging, staging / "keyauthority", staging / "keyauthority" / "v1"):
            (folder / "__init__.py").touch()
        shutil.rmtree(GEN_DIR, ignore_errors=True)
        staging.rename(GEN_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return GEN_DIR


def ensure_generated() -> None:
    """Generates the stubs unless they are there already."""
    if not is_generated():
        generate()
