"""Fan-out: per underlying one BarUpdate consumer, per normalised filter one group that encodes each message once,
per subscriber the group version it has seen (conflation from a short group history) and a rate limit.

Memory per subscriber is O(1): it only remembers the group version it has seen. Each group keeps its last 16 deltas;
a subscriber that fell behind (slow reader, or its rate limit) gets the missed ones merged into one Delta (latest
value per strike wins, encoded once per distinct lag and shared), or the group's snapshot when it is more than 16
behind. A slow reader only delays its own generator (gRPC flow control), never the consumer or the others.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

from services.common.domain.timeframes import Timeframe
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

_SNAPSHOT, _DELTA = 1, 2

# metric children bound once (hot path)
_QUEUE = metrics.QUEUE_DEPTH
_CONFLATED = metrics.CONFLATED
_HB_MSGS, _HB_BYTES = metrics.MESSAGES.labels("heartbeat"), metrics.BYTES.labels("heartbeat")
_SNAP_MSGS, _SNAP_BYTES = metrics.MESSAGES.labels("snapshot"), metrics.BYTES.labels("snapshot")
_DELTA_MSGS, _DELTA_BYTES = metrics.MESSAGES.labels("delta"), metrics.BYTES.labels("delta")
_ENC_SNAPSHOT, _ENC_DELTA = metrics.ENCODINGS.labels("snapshot"), metrics.ENCODINGS.labels("delta")
_ENC_CONFLATED = metrics.ENCODINGS.labels("conflated")
_LATENCY = metrics.SEND_LATENCY


class Subscriber:
    """One open Subscribe stream: what it has seen of its group (``sent_version``), a wake-up event and the
    per-subscription sequence number. O(1) memory: pending changes live in the group's short history."""

    __slots__ = ("_final", "_hb", "_wake", "closed", "group", "interval", "last_send", "need_snapshot", "pending",
                 "sent_version", "seq")

    def __init__(self, group: Group, rate: float, last_sequence: int) -> None:
        self.group = group
        self.interval = 1.0 / rate
        self.seq = last_sequence
        self.last_send = time.monotonic()
        self.sent_version = group.version
        self.need_snapshot = True
        self.pending = True
        _QUEUE.inc()
        self._final: bytes | None = None
        self._hb = False
        self._wake = asyncio.Event()
        self._wake.set()
        self.closed = False

    def notify(self) -> None:
        """The group has a new version (delta or resync)."""
        if not self.pending:
            self.pending = True
            _QUEUE.inc()
        self._wake.set()

    def offer_final(self, message: bytes) -> None:
        """An error or end message (complete, with sequence); the stream ends after it."""
        self._final = message
        self._wake.set()

    def heartbeat_due(self, now: float, heartbeat_s: float) -> None:
        """Wake an idle subscriber for a heartbeat when nothing was sent for ``heartbeat_s``."""
        if not self.pending and not self._hb and now - self.last_send >= heartbeat_s:
            self._hb = True
            self._wake.set()

    async def messages(self) -> AsyncIterator[bytes]:
        """Serialized SubscribeResponses for this subscriber until a final message (or cancellation).

        Heartbeats are triggered by the hub's heartbeat task (:meth:`heartbeat_due`), so waiting costs no timer.
        """
        g = self.group
        while True:
            if not self.pending and self._final is None:
                await self._wake.wait()
                self._wake.clear()
                if not self.pending and self._final is None:
                    if self._hb:
                        self._hb = False
                        msg = codec.heartbeat_message(self.seq)
                        _HB_MSGS.inc()
                        _HB_BYTES.inc(len(msg))
                        self.last_send = time.monotonic()
                        yield msg
                    continue
            self._hb = False
            if self._final is None:
                wait = self.last_send + self.interval - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)  # updates arriving meanwhile are conflated
            if self._final is not None:
                metrics.MESSAGES.labels("final").inc()
                yield self._final
                return
            if self.pending:
                self.pending = False
                _QUEUE.dec()
            self._wake.clear()
            version = g.version
            if self.need_snapshot or version - self.sent_version > g.history_len:
                if not self.need_snapshot:  # too far behind: the snapshot stands for the updates missed
                    _CONFLATED.inc(version - self.sent_version - 1)
                self.need_snapshot = False
                body = g.snapshot_body()
                kind = _SNAPSHOT
                receive_time = None
            elif version == self.sent_version:
                continue
            else:
                body, receive_time, merged = g.delta_since(self.sent_version)
                kind = _DELTA
                if merged:
                    _CONFLATED.inc(merged)
            self.sent_version = version
            self.seq += 1
            out = codec.sequence_prefix(self.seq) + body
            if kind == _SNAPSHOT:
                _SNAP_MSGS.inc()
                _SNAP_BYTES.inc(len(out))
            else:
                _DELTA_MSGS.inc()
                _DELTA_BYTES.inc(len(out))
                if receive_time is not None:
                    _LATENCY.observe(max(0.0, time.time() - receive_time))
            self.last_send = time.monotonic()
            yield out


class Group:
    """Subscribers of one normalised filter, sharing one view and one encoding per message.

    ``version`` counts the deltas published; the last ``history_len`` of them are kept so that a subscriber that fell
    behind gets them merged into one Delta (encoded once per distinct lag, shared by every subscriber with that lag);
    one further behind gets the group's snapshot (encoded once per version).
    """

    def __init__(self, flt: StreamFilter, view: GroupView, book: Book, history_len: int = 16) -> None:
        self.filter = flt
        self.view = view
        self.book = book
        self.members: dict[Subscriber, None] = {}
        self.version = 0
        self.history_len = history_len
        self.history: deque[tuple[DeltaUpdate, bytes]] = deque(maxlen=history_len)
        self._snapshot: bytes | None = None
        self._merged: dict[int, tuple[bytes, float | None, int]] = {}

    def snapshot_body(self) -> bytes:
        """The encoded snapshot of the current view (cached until the view changes)."""
        if self._snapshot is None:
            self._snapshot = codec.snapshot_body(self.view.snapshot(self.book, self.filter.underlying))
            _ENC_SNAPSHOT.inc()
        return self._snapshot

    def delta_since(self, version: int) -> tuple[bytes, float | None, int]:
        """(body, earliest receive time, updates merged) bringing a subscriber at ``version`` to the current one."""
        lag = self.version - version
        if lag == 1:
            d, body = self.history[-1]
            return body, d.receive_time, 0
        hit = self._merged.get(version)
        if hit is None:
            items = list(self.history)[-lag:]
            merged = items[0][0]
            for d, _ in items[1:]:
                merged = merge(merged, d)
            hit = self._merged[version] = (codec.delta_body(merged, shared=False), merged.receive_time, lag - 1)
            _ENC_CONFLATED.inc()
        return hit

    def publish(self, delta: DeltaUpdate) -> None:
        """Encode ``delta`` once, make it the new version and wake every member."""
        self._snapshot = None
        self._merged = {}
        body = codec.delta_body(delta)
        _ENC_DELTA.inc()
        self.history.append((delta, body))
        self.version += 1
        for m in self.members:
            m.notify()

    def resync(self, book: Book) -> None:
        """Rebuild the view from ``book``; every member gets a fresh snapshot next."""
        self.book = book
        self.view.rebuild(book)
        self._snapshot = None
        self._merged = {}
        self.history.clear()
        self.version += 1
        for m in self.members:
            m.need_snapshot = True
            m.notify()


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
        book = self.books.get(tf)
        if book is None:
            book = self.books[tf] = Book(self.step, self.hub.carry_buckets * Timeframe(tf).seconds)
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
            g.resync(self.books[g.filter.timeframe])


class Hub:
    """All subscriptions of one stream process.

    ``strike_steps``: underlying → strike step (index points); ``snapshots``: the QueryService client;
    ``heartbeat_s``: heartbeat interval; ``block_ms``: XREAD block time; ``carry_buckets``: a strike stays listed
    this many buckets after its last bar (QueryService's rule, ``OPTMON_QUERY_CARRY_BUCKETS``).
    """

    def __init__(self, redis_url: str, snapshots: QuerySnapshots, strike_steps: dict[str, float],
                 heartbeat_s: float = 5.0, block_ms: int = 1000, redis_wait_s: float = 5.0,
                 carry_buckets: int = 5) -> None:
        self.redis_url = redis_url
        self.snapshots = snapshots
        self.strike_steps = strike_steps
        self.heartbeat_s = heartbeat_s
        self.block_ms = block_ms
        self.redis_wait_s = redis_wait_s
        self.carry_buckets = carry_buckets
        self._states: dict[str, _Underlying] = {}
        self.closing = False
        self._hb_task: asyncio.Task[None] | None = None

    async def _heartbeats(self) -> None:
        period = max(0.02, self.heartbeat_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            hb = self.heartbeat_s
            for st in list(self._states.values()):
                for g in list(st.groups.values()):
                    for m in list(g.members):
                        m.heartbeat_due(now, hb)

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
        if self._hb_task is None:
            self._hb_task = asyncio.create_task(self._heartbeats(), name="stream-heartbeats")
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
                view = GroupView(flt, expiries)
                view.rebuild(book)
                g = st.groups[flt] = Group(flt, view, book)
                metrics.GROUPS.inc()
            sub = Subscriber(g, rate, last_sequence)
            g.members[sub] = None
            metrics.SUBSCRIBERS.inc()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Remove a subscriber at once (disconnect); drops its group and the underlying's consumer when unused."""
        if sub.closed:
            return
        sub.closed = True
        metrics.SUBSCRIBERS.dec()
        if sub.pending:
            _QUEUE.dec()
            sub.pending = False
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
        if self._hb_task is not None:
            self._hb_task.cancel()
            await asyncio.gather(self._hb_task, return_exceptions=True)
            self._hb_task = None
        for st in list(self._states.values()):
            await st.consumer.stop()
