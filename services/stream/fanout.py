"""Fan-out: per underlying one BarUpdate consumer, per normalised filter one group that encodes each message once,
per subscriber one pending slot with conflation and a rate limit.

Memory per subscriber is bounded: at most one pending message, whose delta merges later updates (latest value per
strike wins) and is therefore never larger than the window. A slow reader only delays its own generator (gRPC flow
control), never the consumer or the other subscribers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.common.logging import get_logger
from services.stream import codec, metrics
from services.stream.codec import BarUpdateIn
from services.stream.domain.conflation import merge
from services.stream.domain.filters import StreamFilter
from services.stream.domain.window import Book, DeltaUpdate, GroupView
from services.stream.store.bars import BarConsumer
from services.stream.store.query import QuerySnapshots, SnapshotError

log = get_logger("stream.fanout")

#: Strikes around ATM asked of QueryService when seeding a book (its maximum; windows are at most ±50).
SEED_STRIKES = 50

_SNAPSHOT, _DELTA, _FINAL = 1, 2, 3


class Subscriber:
    """One open Subscribe stream: a pending slot, a wake-up event and the per-subscription sequence number."""

    __slots__ = ("_kind", "_wake", "body", "closed", "delta", "group", "interval", "last_send", "seq")

    def __init__(self, group: Group, rate: float, last_sequence: int) -> None:
        self.group = group
        self.interval = 1.0 / rate
        self.seq = last_sequence
        self.last_send = 0.0
        self._kind = 0
        self.body: bytes | None = None
        self.delta: DeltaUpdate | None = None
        self._wake = asyncio.Event()
        self.closed = False

    def _set(self, kind: int, body: bytes | None, delta: DeltaUpdate | None) -> None:
        if self._kind == 0:
            metrics.QUEUE_DEPTH.inc()
        self._kind, self.body, self.delta = kind, body, delta
        self._wake.set()

    def offer_snapshot(self, body: bytes) -> None:
        """A fresh snapshot replaces anything pending (except a final message)."""
        if self._kind != _FINAL:
            self._set(_SNAPSHOT, body, None)

    def offer_delta(self, body: bytes, delta: DeltaUpdate) -> None:
        """A group delta: shared bytes when nothing is pending, else merged into the pending delta."""
        if self._kind == 0:
            self._set(_DELTA, body, delta)
        elif self._kind == _DELTA:
            assert self.delta is not None
            self.delta = merge(self.delta, delta)
            self.body = None
            metrics.CONFLATED.inc()
        # a pending snapshot is built from the group's view after this delta was applied: it already holds it

    def offer_final(self, message: bytes) -> None:
        """An error or end message (complete, with sequence); the stream ends after it."""
        self._set(_FINAL, message, None)

    def _take(self) -> tuple[int, bytes | None, DeltaUpdate | None]:
        kind, body, delta = self._kind, self.body, self.delta
        if kind:
            metrics.QUEUE_DEPTH.dec()
        self._kind, self.body, self.delta = 0, None, None
        self._wake.clear()
        return kind, body, delta

    async def messages(self, heartbeat_s: float) -> AsyncIterator[bytes]:
        """Serialized SubscribeResponses for this subscriber until a final message (or cancellation)."""
        while True:
            if not self._kind:
                try:
                    async with asyncio.timeout(heartbeat_s):
                        await self._wake.wait()
                except TimeoutError:
                    msg = codec.heartbeat_message(self.seq)
                    metrics.MESSAGES.labels("heartbeat").inc()
                    metrics.BYTES.labels("heartbeat").inc(len(msg))
                    yield msg
                    continue
            if self._kind != _FINAL:
                wait = self.last_send + self.interval - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)  # updates arriving meanwhile are conflated into the pending one
            kind, body, delta = self._take()
            if kind == _FINAL:
                assert body is not None
                metrics.MESSAGES.labels("final").inc()
                yield body
                return
            if kind == _DELTA and body is None:
                assert delta is not None
                body = codec.delta_body(delta, shared=False)
                metrics.ENCODINGS.labels("conflated").inc()
            assert body is not None
            self.seq += 1
            out = codec.sequence_prefix(self.seq) + body
            label = "snapshot" if kind == _SNAPSHOT else "delta"
            metrics.MESSAGES.labels(label).inc()
            metrics.BYTES.labels(label).inc(len(out))
            if delta is not None and delta.receive_time is not None:
                metrics.SEND_LATENCY.observe(max(0.0, time.time() - delta.receive_time))
            self.last_send = time.monotonic()
            yield out


@dataclass(eq=False)
class Group:
    """Subscribers of one normalised filter, sharing one view and one encoding per message."""

    filter: StreamFilter
    view: GroupView
    members: dict[Subscriber, None] = field(default_factory=dict)
    _snapshot: bytes | None = None

    def snapshot_body(self, book: Book) -> bytes:
        """The encoded snapshot of the current view (cached until the view changes)."""
        if self._snapshot is None:
            self._snapshot = codec.snapshot_body(self.view.snapshot(book, self.filter.underlying))
            metrics.ENCODINGS.labels("snapshot").inc()
        return self._snapshot

    def publish(self, delta: DeltaUpdate) -> None:
        """Encode ``delta`` once and offer it to every member."""
        self._snapshot = None
        body = codec.delta_body(delta)
        metrics.ENCODINGS.labels("delta").inc()
        for m in self.members:
            m.offer_delta(body, delta)


class _Underlying:
    """Per-underlying state: consumer, books per timeframe, groups, last BarUpdate sequence."""

    def __init__(self, hub: Hub, underlying: str) -> None:
        self.hub = hub
        self.underlying = underlying
        self.step = hub.strike_steps[underlying]
        self.lock = asyncio.Lock()
        self.books: dict[int, Book] = {}
        self.groups: dict[StreamFilter, Group] = {}
        self.last_seq = 0
        self.consumer = BarConsumer(hub.redis_url, underlying, self.on_update, self.on_reset,
                                    block_ms=hub.block_ms)

    async def seed(self, tf: int, expiries: list[str]) -> tuple[Book, list[str]]:
        """Ensure the book of ``tf`` holds ``expiries`` (empty = the nearest ones); returns it and the resolved
        expiries. Caller holds the lock. Raises SnapshotError."""
        book = self.books.setdefault(tf, Book())
        want = [e for e in expiries if e not in book.seeded] if expiries else ([] if "" in book.seeded else None)
        if want is None or want:
            dist = await self.hub.snapshots.fetch(self.underlying, tf, want or [], SEED_STRIKES)
            book.seed(dist, want or [""])
            if not expiries:
                book.default_expiries = [e.expiry for e in dist.expiries]
        resolved = list(expiries) if expiries else list(book.default_expiries)
        return book, resolved

    async def on_update(self, upd: BarUpdateIn) -> None:
        metrics.UPDATES.inc()
        async with self.lock:
            gap = self.last_seq and upd.sequence != self.last_seq + 1
            self.last_seq = upd.sequence
            if gap:
                log.warning("bar_update.sequence_gap", underlying=self.underlying, sequence=upd.sequence)
                await self._resync("sequence_gap")
                return
            book = self.books.get(upd.timeframe)
            if book is None:
                return
            touched = book.apply(upd.bars, upd.bucket_time, upd.underlying_price)
            cache: dict = {}  # type: ignore[type-arg]
            for g in list(self.groups.values()):
                if g.filter.timeframe != upd.timeframe:
                    continue
                d = g.view.apply(book, touched, cache)
                if d is not None:
                    d.receive_time = upd.receive_time or upd.commit_time
                    g.publish(d)
                    await asyncio.sleep(0)  # let this group's subscribers send before the next group is built

    async def on_reset(self, reason: str) -> None:
        async with self.lock:
            self.last_seq = 0
            await self._resync(reason)

    async def _resync(self, reason: str) -> None:
        """Reload every book from QueryService and send every subscriber a fresh snapshot (lock held)."""
        metrics.RESYNCS.labels(reason).inc()
        log.warning("stream.resync", underlying=self.underlying, reason=reason, groups=len(self.groups))
        old = self.books
        self.books = {}
        for attempt in range(5):
            try:
                for g in self.groups.values():
                    tf = g.filter.timeframe
                    book, _ = await self.seed(tf, list(g.filter.expiries))
                    if not g.filter.expiries:
                        g.view.expiries = list(book.default_expiries)
                break
            except SnapshotError as exc:
                log.warning("stream.resync_failed", underlying=self.underlying, error=str(exc), attempt=attempt)
                self.books = {}
                await asyncio.sleep(0.2 * 2**attempt)
        else:
            self.books = old
            msg = codec.error_message(0, "UNAVAILABLE", "snapshot source unavailable after resync; reconnect")
            for g in self.groups.values():
                for m in g.members:
                    m.offer_final(msg)
            return
        for g in self.groups.values():
            book = self.books[g.filter.timeframe]
            g.view.rebuild(book)
            g._snapshot = None
            body = g.snapshot_body(book)
            for m in g.members:
                m.offer_snapshot(body)


class Hub:
    """All subscriptions of one stream process.

    ``strike_steps``: underlying → strike step (index points); ``snapshots``: the QueryService client;
    ``heartbeat_s``: heartbeat interval; ``block_ms``: XREAD block time.
    """

    def __init__(self, redis_url: str, snapshots: QuerySnapshots, strike_steps: dict[str, float],
                 heartbeat_s: float = 5.0, block_ms: int = 1000, redis_wait_s: float = 5.0) -> None:
        self.redis_url = redis_url
        self.snapshots = snapshots
        self.strike_steps = strike_steps
        self.heartbeat_s = heartbeat_s
        self.block_ms = block_ms
        self.redis_wait_s = redis_wait_s
        self._states: dict[str, _Underlying] = {}
        self.closing = False

    def group_count(self) -> int:
        """Number of groups across underlyings."""
        return sum(len(s.groups) for s in self._states.values())

    def groups(self, underlying: str) -> list[Group]:
        """The groups of an underlying (for tests and introspection)."""
        st = self._states.get(underlying)
        return list(st.groups.values()) if st else []

    async def subscribe(self, flt: StreamFilter, rate: float, last_sequence: int) -> Subscriber:
        """Join (or form) the group of ``flt``; the returned subscriber's first message is the snapshot.

        Raises SnapshotError (NOT_FOUND for unknown expiries, UNAVAILABLE when Redis or QueryService is down).
        """
        if self.closing:
            raise SnapshotError("UNAVAILABLE", "server is shutting down")
        st = self._states.get(flt.underlying)
        if st is None:
            st = self._states[flt.underlying] = _Underlying(self, flt.underlying)
            st.consumer.start()
        try:
            async with asyncio.timeout(self.redis_wait_s):
                await st.consumer.ready.wait()
        except TimeoutError:
            await self._drop_if_idle(st)
            raise SnapshotError("UNAVAILABLE", "Redis unavailable") from None
        async with st.lock:
            g = st.groups.get(flt)
            if g is None:
                try:
                    book, expiries = await st.seed(flt.timeframe, list(flt.expiries))
                except SnapshotError:
                    await self._drop_if_idle(st, locked=True)
                    raise
                missing = [e for e in expiries if e not in book.bars]
                if missing:
                    await self._drop_if_idle(st, locked=True)
                    raise SnapshotError("NOT_FOUND", f"no data for expiries {', '.join(missing)}")
                view = GroupView(flt, expiries, st.step)
                view.rebuild(book)
                g = st.groups[flt] = Group(flt, view)
                metrics.GROUPS.inc()
            sub = Subscriber(g, rate, last_sequence)
            sub.offer_snapshot(g.snapshot_body(st.books[flt.timeframe]))
            g.members[sub] = None
            metrics.SUBSCRIBERS.inc()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Remove a subscriber at once (disconnect); drops its group and the underlying's consumer when unused."""
        if sub.closed:
            return
        sub.closed = True
        metrics.SUBSCRIBERS.dec()
        if sub._kind:
            metrics.QUEUE_DEPTH.dec()
            sub._kind = 0
        g = sub.group
        g.members.pop(sub, None)
        st = self._states.get(g.filter.underlying)
        if st is None or g.members:
            return
        if st.groups.get(g.filter) is g:
            del st.groups[g.filter]
            metrics.GROUPS.dec()
            if not any(x.filter.timeframe == g.filter.timeframe for x in st.groups.values()):
                st.books.pop(g.filter.timeframe, None)
        if not st.groups:
            asyncio.get_running_loop().create_task(self._drop_if_idle(st))

    async def _drop_if_idle(self, st: _Underlying, locked: bool = False) -> None:
        if st.groups or self._states.get(st.underlying) is not st:
            return
        if not locked and st.lock.locked():
            return
        del self._states[st.underlying]
        await st.consumer.stop()

    async def close(self, reason: str = "server shutting down") -> None:
        """Send EndOfStream to every subscriber and stop the consumers."""
        self.closing = True
        for st in list(self._states.values()):
            for g in st.groups.values():
                for m in g.members:
                    m.offer_final(codec.end_message(m.seq, reason))
        await asyncio.sleep(0)
        for st in list(self._states.values()):
            await st.consumer.stop()
