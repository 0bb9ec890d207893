"""L1: an in-process LRU of serialized responses, bounded by entry count and payload bytes, with a TTL."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from services.query.cache import metrics


@dataclass(slots=True)
class Entry:
    """One cached response: ``data`` serialized bytes, ``scope`` (underlying or "*", timeframe number),
    ``token`` the generation it was computed at, ``expires`` monotonic deadline."""

    data: bytes
    scope: tuple[str, int]
    token: tuple[int, int]
    expires: float


class L1Cache:
    """LRU by recency of insertion/hit. ``get`` never checks freshness (the caller compares generation and TTL):
    an entry with an old generation stays until evicted so it can be served, marked stale, when PostgreSQL is
    down."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._d: OrderedDict[Hashable, Entry] = OrderedDict()
        self.bytes = 0

    def get(self, key: Hashable) -> Entry | None:
        """The entry (fresh or not) or None."""
        return self._d.get(key)

    def touch(self, key: Hashable) -> None:
        """Mark as recently used."""
        self._d.move_to_end(key)

    def put(self, key: Hashable, entry: Entry) -> None:
        """Insert/replace, then evict least recently used entries beyond the bounds. An entry larger than
        ``max_bytes`` is not stored."""
        size = len(entry.data)
        if size > self.max_bytes:
            return
        old = self._d.pop(key, None)
        if old is not None:
            self.bytes -= len(old.data)
        self._d[key] = entry
        self.bytes += size
        while len(self._d) > self.max_entries or self.bytes > self.max_bytes:
            _, ev = self._d.popitem(last=False)
            self.bytes -= len(ev.data)
        metrics.L1_BYTES.set(self.bytes)
        metrics.L1_ENTRIES.set(len(self._d))

    def __len__(self) -> int:
        return len(self._d)

    def clear(self) -> None:
        """Drop everything."""
        self._d.clear()
        self.bytes = 0
