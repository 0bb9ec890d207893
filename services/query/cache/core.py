"""The response cache in front of the views.

Read path of one request (raw request bytes in, serialized response bytes out, nothing re-encoded on a hit):
  1. L1 by (method, raw request bytes): served when its generation token equals the current one (after the
     ``optmon:seq`` freshness check) and its TTL has not passed.
  2. Otherwise parse + validate, and under single-flight by L2 key ``optmon:qc:<method>:<U>:<tf>:<gen>:<hash>``:
     L2 (Redis, lz4 above a threshold), else compute from PostgreSQL, store in L1 and (in the background) L2,
     plus a "last good" copy ``optmon:qc:last:<method>:<hash>`` for outages. ``<hash>`` is of the *canonical*
     request bytes (the parsed request re-serialized): one request encoded differently — Envoy's transcoder
     writes fields in query-parameter order and Timestamps with ``nanos: 0`` — shares L2, single-flight and the
     last-good copy with a protobuf client's.
  3. PostgreSQL down: the newest L1 entry of any generation (raw, else canonical bytes), else the L2 last-good
     copy, served with the response's ``stale`` field set (by appending the field's bytes: protobuf's
     last-one-wins); else UNAVAILABLE.
     The stale fallback runs per caller, outside the single-flight, so a caller that must not get a stale answer
     (``allow_stale=False``) never receives one computed for another caller.

Derived variants (:meth:`Method.derived`, e.g. the JSON ``HttpBody`` twins of the views): another rendering of a
source method's answer under its own key (L1 ``(name, raw)``, L2 ``optmon:qc:<name>:...``), with the same parse,
scope, generations, TTLs, single-flight, compression and warming. A miss serves the source (its L1/L2, or PostgreSQL
once) and renders it once; a stale answer is the source's stale answer rendered. No last-good copy of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import lz4.frame
import structlog

from services.common.errors import Unavailable
from services.common.wire import varint
from services.query.cache import metrics
from services.query.cache.generations import Generations
from services.query.cache.l1 import Entry, L1Cache
from services.query.cache.redis_gate import RedisDown, RedisGate
from services.query.cache.singleflight import SingleFlight

log = structlog.get_logger("query.cache")

_RAW, _LZ4 = b"\x00", b"\x01"


def stale_suffix(field_number: int) -> bytes:
    """Wire bytes of ``bool <field_number> = true`` (appended to a serialized message it overrides the field)."""
    return varint(field_number << 3) + b"\x01"


async def _no_compute(query: Any) -> bytes:
    raise AssertionError("a derived method is computed from its source")  # pragma: no cover


@dataclass(frozen=True)
class Method:
    """A cached RPC: ``parse(raw) -> (query, scope, canonical)`` validates (raising FieldViolations / NotFound)
    and returns the canonical request bytes (equal requests → equal bytes, whatever their encoding);
    ``compute(query) -> bytes`` reads PostgreSQL (raising Unavailable when it is down); ``stale_field`` is the
    response's ``stale`` field number (0 when it has none). A derived method (``source`` set) is
    ``render(source's bytes)`` instead (see :meth:`derived`)."""

    name: str
    parse: Callable[[bytes], tuple[Any, tuple[str, int], bytes]]
    compute: Callable[[Any], Awaitable[bytes]]
    stale_field: int = 0
    source: Method | None = None
    render: Callable[[bytes], bytes] | None = None

    @classmethod
    def derived(cls, name: str, source: Method, render: Callable[[bytes], bytes]) -> Method:
        """Method ``name`` answering ``render(bytes of source for the same raw request)``: same request, parse and
        invalidation scope as ``source``, cached under its own key. ``render`` must be pure (bytes → bytes) and
        raise nothing for any answer of ``source`` (stale-marked ones included)."""
        return cls(name, source.parse, _no_compute, 0, source, render)


class ResponseCache:
    """L1 + L2 + single-flight + stale serving. ``gate`` None disables L2."""

    def __init__(self, l1: L1Cache, gate: RedisGate | None, gens: Generations, *, l1_ttl_s: float,
                 l2_ttl_s: float, last_good_ttl_s: float, compress_threshold: int):
        self.l1 = l1
        self.gate = gate
        self.gens = gens
        self.l1_ttl = l1_ttl_s
        self.l2_ttl = int(max(1, l2_ttl_s))
        self.last_ttl = int(max(1, last_good_ttl_s))
        self.threshold = compress_threshold
        self.flights: SingleFlight[bytes] = SingleFlight()
        self._bg: set[asyncio.Task[Any]] = set()
        self._hit: dict[tuple[str, str, str], Any] = {}  # method -> prometheus child (cached lookups)
        self._lat_l1 = metrics.LATENCY.labels("l1")
        self._lat_l2 = metrics.LATENCY.labels("l2")
        self._lat_pg = metrics.LATENCY.labels("pg")
        self._pg_up = True

    def _count(self, kind: str, layer: str, method: str) -> None:
        key = (kind, layer, method)
        c = self._hit.get(key)
        if c is None:
            c = self._hit[key] = (metrics.HITS if kind == "hit" else metrics.MISSES).labels(layer, method)
        c.inc()

    async def serve(self, m: Method, raw: bytes, *, allow_stale: bool = True) -> bytes:
        """Serialized response bytes for the raw request of method ``m`` (see module doc). Raises the errors of
        ``m.parse``; ``Unavailable`` when PostgreSQL is down and no cached answer exists (or ``allow_stale`` is
        False)."""
        t0 = time.perf_counter()
        key = (m.name, raw)
        e = self.l1.get(key)
        if e is not None:
            await self.gens.ensure_fresh(e.scope[0])
            if e.token == self.gens.token(e.scope) and e.expires > time.monotonic():
                self.l1.touch(key)
                self._count("hit", "l1", m.name)
                self._lat_l1.observe(time.perf_counter() - t0)
                return e.data
        self._count("miss", "l1", m.name)
        query, scope, canonical = m.parse(raw)
        await self.gens.ensure_fresh(scope[0])
        token = self.gens.token(scope)
        h = hashlib.blake2b(canonical, digest_size=12).hexdigest()
        l2key = f"optmon:qc:{m.name}:{scope[0]}:{scope[1]}:{token[1]}:{h}"
        try:
            return await self.flights.do(l2key, lambda: self._fill(m, key, raw, query, scope, token, l2key, h))
        except Unavailable as e:
            if not allow_stale:
                raise
            stale = await self._stale(m, raw, canonical, h)
            if stale is None:
                metrics.UNAVAILABLE.labels(m.name).inc()
                raise Unavailable(f"{e}; no cached answer for this request") from e
            metrics.STALE.labels(m.name).inc()
            return stale

    async def _compute(self, m: Method, raw: bytes, query: Any) -> bytes:
        if m.source is None:
            return await m.compute(query)
        assert m.render is not None
        return m.render(await self.serve(m.source, raw, allow_stale=False))

    async def _fill(self, m: Method, key: tuple[str, bytes], raw: bytes, query: Any, scope: tuple[str, int],
                    token: tuple[int, int], l2key: str, h: str) -> bytes:
        t0 = time.perf_counter()
        data = await self._l2_get(l2key)
        if data is not None:
            self._count("hit", "l2", m.name)
            self._lat_l2.observe(time.perf_counter() - t0)
            self.l1.put(key, Entry(data, scope, token, time.monotonic() + self.l1_ttl))
            return data
        self._count("miss", "l2", m.name)
        t1 = time.perf_counter()
        try:
            data = await self._compute(m, raw, query)
        except Unavailable as e:
            self._pg_state(False, e)
            raise
        if m.source is None:
            self._pg_state(True)
            self._lat_pg.observe(time.perf_counter() - t1)
        self.l1.put(key, Entry(data, scope, token, time.monotonic() + self.l1_ttl))
        if self.gate is not None and self.gate.usable:
            last = None if m.source is not None else (f"optmon:qc:last:{m.name}:{h}", self.last_ttl)
            self._spawn(self._l2_set(l2key, self._pack(data), self.l2_ttl, last))
        return data

    def _pg_state(self, up: bool, err: Unavailable | None = None) -> None:
        """``optmon_query_pg_up``, and one log line per transition (``pg.down`` with the cause, ``pg.recovered``)."""
        if up != self._pg_up:
            self._pg_up = up
            if up:
                log.info("pg.recovered")
            else:
                cause = err.__cause__ if err is not None and err.__cause__ is not None else err
                log.warning("pg.down", error=f"{type(cause).__name__}: {cause}",
                            degraded="cached answers served stale, others UNAVAILABLE")
        metrics.PG_UP.set(1 if up else 0)

    async def _stale(self, m: Method, raw: bytes, canonical: bytes, h: str) -> bytes | None:
        """A cached answer of any generation, marked stale (derived: the source's, rendered); None when none.
        ``h`` is the hash of ``canonical`` (the last-good copy's key)."""
        if m.source is not None:
            assert m.render is not None
            src = await self._stale(m.source, raw, canonical, h)
            return None if src is None else m.render(src)
        e = self.l1.get((m.name, raw)) or self.l1.get((m.name, canonical))
        if e is not None:
            data: bytes | None = e.data
        else:
            data = await self._l2_get(f"optmon:qc:last:{m.name}:{h}")
        if data is None:
            return None
        return data + stale_suffix(m.stale_field) if m.stale_field else data

    def _pack(self, data: bytes) -> bytes:
        if len(data) >= self.threshold:
            return _LZ4 + lz4.frame.compress(data)
        return _RAW + data

    @staticmethod
    def _unpack(blob: bytes) -> bytes:
        if blob[:1] == _LZ4:
            return lz4.frame.decompress(blob[1:])  # type: ignore[no-any-return]
        return blob[1:]

    async def _l2_get(self, k: str) -> bytes | None:
        if self.gate is None or not self.gate.usable:
            return None
        try:
            blob = await self.gate.call(lambda c: c.get(k))
        except RedisDown:
            return None
        return self._unpack(blob) if blob else None  # type: ignore[arg-type]

    async def _l2_set(self, k: str, blob: bytes, ttl: int, last: tuple[str, int] | None) -> None:
        assert self.gate is not None

        async def write(c: Any) -> None:
            async with c.pipeline(transaction=False) as p:
                p.set(k, blob, ex=ttl)
                if last is not None:
                    p.set(last[0], blob, ex=last[1])
                await p.execute()

        try:
            await self.gate.call(write)
        except RedisDown:
            pass

    def _spawn(self, coro: Awaitable[Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait for background L2 writes (tests, shutdown), at most ``timeout_s``; cancel what is left after it."""
        deadline = time.monotonic() + timeout_s
        while self._bg:
            left = deadline - time.monotonic()
            if left <= 0:
                for t in list(self._bg):
                    t.cancel()
                await asyncio.gather(*list(self._bg), return_exceptions=True)
                return
            await asyncio.wait(list(self._bg), timeout=left)
