"""A Python client of key-authority: stubs generated from ../../proto, and a thin typed wrapper.

from keyauthority_client import KeyAuthority, VerifyCode, error_details
"""

from ._codegen import ensure_generated

# The stubs are generated, not checked in: make them on first use if `python generate.py` has
# not been run yet (this needs grpcio-tools).
ensure_generated()

from ._gen.keyauthority.v1 import key_pb2, key_service_pb2, verify_service_pb2  # noqa: E402
from .client import ERROR_DOMAIN, ErrorDetails, KeyAuthority, error_details  # noqa: E402

Environment = key_pb2.Environment
Role = key_pb2.Role
KeyState = key_pb2.KeyState
VerifyCode = verify_service_pb2.VerifyCode

__all__ = [
    "ERROR_DOMAIN",
    "Environment",
    "ErrorDetails",
    "KeyAuthority",
    "KeyState",
    "Role",
    "VerifyCode",
    "error_details",
    "key_pb2",
    "key_service_pb2",
    "verify_service_pb2",
]
