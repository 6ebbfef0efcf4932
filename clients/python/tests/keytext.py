"""Builds well-formed key texts (right shape and checksum) that the server never issued."""

from __future__ import annotations

import secrets
import string
import zlib

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
ID_LEN = 12
SECRET_LEN = 32
CHECK_LEN = 6


def random_base62(length: int) -> str:
    return "".join(secrets.choice(BASE62) for _ in range(length))


def checksum(text: str) -> str:
    """The 6 base62 digits of CRC32 (IEEE) of ``text``, most significant first."""
    value = zlib.crc32(text.encode())
    digits = []
    for _ in range(CHECK_LEN):
        value, digit = divmod(value, 62)
        digits.append(BASE62[digit])
    return "".join(reversed(digits))


def with_checksum(body: str) -> str:
    return body + checksum(body)


def wrong_secret_for(prefix: str) -> str:
    """A well-formed key with this public prefix (``<brand>_<env>_<id>``) and a random secret."""
    return with_checksum(prefix + random_base62(SECRET_LEN))


def unknown_key(brand: str = "ka", environment: str = "live") -> str:
    """A well-formed key whose id does not exist."""
    return wrong_secret_for(f"{brand}_{environment}_{random_base62(ID_LEN)}")
