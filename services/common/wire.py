"""Hand-assembled protobuf wire bytes for hot paths that splice pre-serialized messages (Protocol Buffers encoding
guide: https://protobuf.dev/programming-guides/encoding/)."""

from __future__ import annotations


def varint(n: int) -> bytes:
    """Base-128 varint encoding of a non-negative integer (ValueError for a negative one)."""
    if n < 0x80:
        if n < 0:
            raise ValueError("varint of a negative number")
        return _ONE_BYTE[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_ONE_BYTE = tuple(bytes((i,)) for i in range(0x80))
