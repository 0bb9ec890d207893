"""Cache generations per (underlying, timeframe), driven by ingest's BarUpdate sequence numbers.

- The stream consumer applies each BarUpdate: ``gen[(U, tf)] = sequence``.
- Between ingest's XADD/INCR and the consumer seeing the entry there is a window. To close it, a read of a cached
  answer first makes sure ``optmon:seq:<U>`` was read less than ``fresh_check_ms`` ago; when that sequence is newer
  than the last one known, every timeframe of U is bumped to it at once (over-invalidation, never staleness).
- With a :class:`~services.query.cache.seqwatch.SeqWatch` (``watch``), the read is skipped while Redis has pushed no
  change of any ``optmon:seq:*`` key since the last read of *every* sequence (each read then covers all underlyings,
  so one read re-syncs the watch).
- A sequence going *down* means Redis lost its data (restart without persistence): the local epoch is bumped so
  every L1 entry becomes unreachable; L2 lived in the same Redis and is gone too.

A token ``(epoch, generation)`` is stored with each cached entry; the L2 key carries the generation.
"""

from __future__ import annotations

import asyncio
import time

from services.query.cache import metrics
from services.query.cache.redis_gate import RedisDown, RedisGate
from services.query.cache.seqwatch import SeqWatch

#: Scope of views spanning every underlying (ListUnderlyings).
ALL = "*"


def seq_key(u: str) -> str:
    """Redis key of the last published BarUpdate sequence of ``u``."""
    return f"optmon:seq:{u}"


class Generations:
    """Generation bookkeeping; ``underlyings`` are the configured symbols, ``timeframes`` the enum numbers."""

    def __init__(self, underlyings: list[str], gate: RedisGate | None, fresh_check_ms: float,
                 timeframes: tuple[int, ...] = (1, 2, 3, 4), watch: SeqWatch | None = None):
        self.underlyings = sorted(underlyings)
        self.watch = watch
        self.timeframes = timeframes
        self.gate = gate
        self.interval = fresh_check_ms / 1000.0
        self.epoch = 0
        self.known: dict[str, int] = {u: 0 for u in self.underlyings}
        self.gen: dict[tuple[str, int], int] = {}
        self._checked: dict[str, float] = {}
        self._inflight: dict[str, tuple[float, asyncio.Future[None]]] = {}
        self.listeners: list[asyncio.Event] = []

    def token(self, scope: tuple[str, int]) -> tuple[int, int]:
        """(epoch, generation) of a scope; for ``(ALL, 0)`` the sum of the known sequences."""
        if scope[0] == ALL:
            return self.epoch, sum(self.known.values())
        return self.epoch, self.gen.get(scope, 0)

    def _notify(self) -> None:
        for ev in self.listeners:
            ev.set()

    def apply_update(self, u: str, sequence: int, tf: int) -> bool:
        """A consumed BarUpdate. Returns True when a generation changed."""
        if u not in self.known:
            self.known[u] = 0
        if sequence > self.gen.get((u, tf), 0):
            self.gen[(u, tf)] = sequence
            self.known[u] = max(self.known[u], sequence)
            metrics.GENERATION_BUMPS.labels("stream").inc()
            self._notify()
            return True
        return False

    def observe_seq(self, u: str, seq: int) -> bool:
        """A value read from ``optmon:seq:<U>``. Returns True when generations changed."""
        known = self.known.get(u, 0)
        if seq > known:
            for tf in self.timeframes:
                self.gen[(u, tf)] = max(self.gen.get((u, tf), 0), seq)
            self.known[u] = seq
            metrics.GENERATION_BUMPS.labels("seq_check").inc()
            self._notify()
            return True
        if seq < known:  # Redis lost its state: start over under a new epoch
            self.epoch += 1
            self.known[u] = seq
            for tf in self.timeframes:
                self.gen[(u, tf)] = seq
            metrics.GENERATION_BUMPS.labels("reset").inc()
            self._notify()
            return True
        return False

    async def ensure_fresh(self, u: str) -> None:
        """Make sure ``optmon:seq`` of ``u`` (every underlying for ALL, or with a watch) was read within the check
        interval — or, with a watch, that no sequence changed since the last read. Concurrent callers share a read
        started within the interval. No-op while Redis is down."""
        w = self.watch
        if w is not None and w.clean():
            return
        now = time.monotonic()
        if now - self._checked.get(u, -1e9) <= self.interval or self.gate is None or not self.gate.usable:
            return
        inflight = self._inflight.get(u)
        if inflight is not None and now - inflight[0] <= self.interval:
            await asyncio.shield(inflight[1])
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[u] = (now, fut)
        try:
            if u == ALL or w is not None:
                names = self.underlyings if u == ALL or u in self.underlyings else [*self.underlyings, u]
            else:
                names = [u]
            snapshot = w.activity if w is not None else 0  # before the read is sent
            try:
                vals = await self.gate.call(lambda c: c.mget([seq_key(n) for n in names]))
            except RedisDown:
                return
            for n, v in zip(names, vals, strict=True):
                if v is not None:  # no key yet: nothing published (or Redis flushed; the stream says more)
                    self.observe_seq(n, int(v))
                self._checked[n] = now
            self._checked[u] = now
            if w is not None:
                w.mark_synced(snapshot)
        finally:
            fut.set_result(None)
            if self._inflight.get(u, (0, None))[1] is fut:
                del self._inflight[u]
