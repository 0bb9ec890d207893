"""Opaque keyset page tokens for ListBars: the last returned bucket time, the resolved end of the range and a
fingerprint of the query the token belongs to, base64url-encoded."""

from __future__ import annotations

import base64
import struct
import zlib
from dataclasses import dataclass

_FMT = ">BqqI"  # version, last bucket (epoch µs), end of range (epoch µs), crc32 of the query
_VERSION = 1


@dataclass(frozen=True)
class PageToken:
    """Resume point: bars strictly after ``after_us`` up to ``end_us`` (UTC epoch microseconds)."""

    after_us: int
    end_us: int
    fingerprint: int


def fingerprint(*parts: object) -> int:
    """crc32 of the query's identifying fields."""
    return zlib.crc32("|".join(map(str, parts)).encode())


def encode(tok: PageToken) -> str:
    """The opaque string form."""
    raw = struct.pack(_FMT, _VERSION, tok.after_us, tok.end_us, tok.fingerprint)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(text: str) -> PageToken:
    """Parse a token; ValueError when malformed."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        ver, after, end, fp = struct.unpack(_FMT, raw)
    except (ValueError, struct.error, TypeError) as e:
        raise ValueError("malformed page_token") from e
    if ver != _VERSION:
        raise ValueError("unsupported page_token version")
    return PageToken(after, end, fp)
