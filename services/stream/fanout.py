"""Fan-out: per underlying one BarUpdate consumer, per normalised filter one group that encodes each message once,
per subscriber the group version it has seen (conflation from a short group history) and a rate limit.

Memory per subscriber is O(1): it only remembers the group version it has seen. Each group keeps its last 16 deltas;
a subscriber that fell behind (slow reader, or its rate limit) gets the missed ones merged into one Delta (latest
value per strike wins, encoded once per distinct lag and shared), or the group's snapshot when it is more than 16
behind. A slow reader only delays its own writes (gRPC flow control), never the consumer or the others.

Sending is event-driven: a group's new version calls :meth:`Subscriber.kick` on each member, which starts one gRPC
write (``context.write``) when none is in flight and the rate limit allows; the write's completion starts the next
pending message. No task or generator waits per subscriber between messages, so a fan-out burst costs one write per
subscriber and nothing else (measured in benchmarks/bench_stream.py against a bare grpc.aio server).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from services.common.domain.timeframes import IST, Timeframe
from services.common.logging import get_logger
from services.stream import codec, metrics
from services.stream.codec import BarUpdateIn
from services.stream.domain.conflation import merge
from services.stream.domain.filters import StreamFilter
from services.stream.domain.schedule import cheapest_first
from services.stream.domain.window import Book, ChangeCache, DeltaUpdate, GroupView
from services.stream.store.bars import BarConsumer
from services.stream.store.query import QuerySnapshots, SnapshotError

log = get_logger("stream.fanout")

#: Strikes around ATM asked of QueryService when seeding a book (its maximum; windows are at most ±50).
SEED_STRIKES = 50

#: Sends one complete serialized SubscribeResponse to a subscriber (``ServicerContext.write``); raises when the
#: stream is gone.
Writer = Callable[[bytes], Coroutine[Any, Any, None]]

# metric children bound once (hot path)
_HOT = metrics.HOT
_HOT_MESSAGES, _HOT_BYTES = _HOT.messages, _HOT.bytes
_CONFLATED = metrics.CONFLATED
_ENC_SNAPSHOT, _ENC_DELTA = metrics.ENCODINGS.labels("snapshot"), metrics.ENCODINGS.labels("delta")
_ENC_CONFLATED = metrics.ENCODINGS.labels("conflated")


class Subscriber:
    """One open Subscribe stream: what it has seen of its group (``sent_version``), its sequence number, its rate
    limit, and at most one write in flight. O(1) memory: pending changes live in the group's short history.

    ``writer`` sends one message (``ServicerContext.write``). :meth:`run` sends the snapshot and returns when the
    stream is over (final message sent, or a write failed because the client went away); cancel it to stop.
    """

    __slots__ = ("_coro", "_final_sent", "_loop", "_timer", "_writer", "_writing", "closed", "done", "final", "group",
                 "interval", "last_send", "need_snapshot", "sent_version", "seq")

    def __init__(self, group: Group, rate: float, last_sequence: int, writer: Writer) -> None:
        self.group = group
        self.interval = 1.0 / rate
        self.seq = last_sequence
        self.last_send = -math.inf
        self.sent_version = group.version
        self.need_snapshot = True
        self.final: bytes | None = None
        self.closed = False
        self._writer = writer
        self._writing = False
        self._coro: Coroutine[Any, Any, None] | None = None
        self._final_sent = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()

    @property
    def pending(self) -> bool:
        """True when something is waiting to be sent (snapshot, update or final message)."""
        if self.closed or self._final_sent:
            return False
        return self.need_snapshot or self.final is not None or self.sent_version != self.group.version

    async def run(self) -> None:
        """Send the snapshot, then every update, until the stream is over."""
        self.kick()
        await self.done

    def offer_final(self, message: bytes) -> None:
        """An error or end message (complete, with sequence); the stream ends after it."""
        self.final = message
        self.kick()

    def kick(self) -> None:
        """Start the next write if one is due: the final message, else the snapshot or the newest delta (missed ones
        merged) once the rate limit allows. Called on a new group version, on resync, and when a write completes."""
        if self._writing or self.closed or self._final_sent:
            return
        if self.final is not None:
            self._final_sent = True
            self._start(self.final, "final", time.monotonic())
            return
        g = self.group
        version = g.version
        if not self.need_snapshot and version == self.sent_version:
            return
        if self._timer is not None:
            return  # a send is scheduled for when the rate limit allows; updates meanwhile are conflated
        now = time.monotonic()
        wait = self.last_send + self.interval - now
        if wait > 0:
            self._timer = self._loop.call_later(wait, self._on_timer)
            return
        receive_time = None
        if self.need_snapshot or version - self.sent_version > g.history_len:
            if not self.need_snapshot:  # too far behind: the snapshot stands for the updates missed
                _CONFLATED.inc(version - self.sent_version - 1)
            self.need_snapshot = False
            body = g.snapshot_body()
            kind = "snapshot"
        else:
            body, receive_time, merged = g.delta_since(self.sent_version)
            kind = "delta"
            if merged:
                _CONFLATED.inc(merged)
        self.sent_version = version
        self.seq += 1
        if receive_time is not None:
            _HOT.latency(max(0.0, time.time() - receive_time))
        self._start(codec.sequence_prefix(self.seq) + body, kind, now)

    def heartbeat(self, now: float, heartbeat_s: float) -> None:
        """Send a heartbeat when the stream was idle (nothing sent, nothing pending) for ``heartbeat_s``."""
        if self._writing or self.closed or self._final_sent or self.pending or now - self.last_send < heartbeat_s:
            return
        self._start(codec.heartbeat_message(self.seq), "heartbeat", now)

    def _on_timer(self) -> None:
        self._timer = None
        self.kick()

    def _start(self, message: bytes, kind: str, now: float) -> None:
        self._writing = True
        self.last_send = now
        _HOT_MESSAGES[kind] += 1
        _HOT_BYTES[kind] += len(message)
        self._coro = self._writer(message)
        self._resume()

    def _resume(self, _fut: object = None) -> None:
        """Run the write coroutine up to its next wait (the first step at once, in the caller: the write starts now,
        not on the next loop iteration); resumed by the awaited future's callback. This is what an asyncio Task
        would do, without creating one per message (≈ 2 µs of the ≈ 3 µs a send costs the hub)."""
        coro = self._coro
        assert coro is not None
        try:
            waited = coro.send(None)
        except StopIteration:
            self._coro = None
            self._written(True)
            return
        except (Exception, asyncio.CancelledError):  # the stream is gone: the write fails
            self._coro = None
            self._written(False)
            return
        add_done_callback = getattr(waited, "add_done_callback", None)
        if add_done_callback is None:  # a bare yield (sleep(0)): continue on the next iteration
            self._loop.call_soon(self._resume)
            return
        waited._asyncio_future_blocking = False
        add_done_callback(self._resume)

    def _written(self, ok: bool) -> None:
        self._writing = False
        if not ok or self._final_sent:
            self.close()
            return
        self.kick()

    def close(self) -> None:
        """The stream is over: no more writes; :meth:`run` returns."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.done.done():
            self.done.set_result(None)


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
        for m in list(self.members):
            m.kick()

    def resync(self, book: Book) -> None:
        """Rebuild the view from ``book``; every member gets a fresh snapshot next."""
        self.book = book
        self.view.rebuild(book)
        self._snapshot = None
        self._merged = {}
        self.history.clear()
        self.version += 1
        for m in list(self.members):
            m.need_snapshot = True
            m.kick()


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
        #: Bumped when subscribers join or leave and when groups are rebuilt (invalidates the sending order).
        self.changes = 0
        self._orders: dict[int, tuple[int, list[Group]]] = {}
        #: IST date (ISO) of the last expiry roll-over check that found the default expiries out of date.
        self._rolled = ""
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
            touched = book.apply_lazy(upd.lazy_bars(book.wanted_expiries()), upd.bucket_time, upd.underlying_price)
            if self._rolled_over(book):
                await self._resync("expiry_rollover")
                return
            cache: ChangeCache = {}
            # the sends of the first groups overlap the computing of the later ones (domain/schedule.py)
            for g in self._send_order(upd.timeframe):
                d = g.view.apply(book, touched, cache)
                if d is not None:
                    d.receive_time = upd.receive_time or upd.commit_time
                    g.publish(d)
                    await asyncio.sleep(0)  # let this group's subscribers send before the next group is built

    def _rolled_over(self, book: Book) -> bool:
        """True once per IST date when the book's bucket is past the nearest of the default expiries and a group
        shows the default ones: QueryService's nearest expiries (not before the bucket's IST date) have moved on,
        so those groups must switch to them (a resync; the expired expiry gets no more bars)."""
        if not book.default_expiries:
            return False
        today = (datetime.fromtimestamp(book.bucket_time, UTC) + IST).date().isoformat()
        if min(book.default_expiries) >= today or self._rolled == today:
            return False
        self._rolled = today
        return any(not g.filter.expiries for g in self.groups.values())

    def _send_order(self, timeframe: int) -> list[Group]:
        """The groups of ``timeframe`` in sending order (:func:`cheapest_first`), recomputed when a subscriber
        joined or left or a group was rebuilt since the last call."""
        hit = self._orders.get(timeframe)
        if hit is None or hit[0] != self.changes:
            groups = [g for g in self.groups.values() if g.filter.timeframe == timeframe]
            order = cheapest_first([(len(g.members), [(id(v), len(v.window)) for v in g.view.views]) for g in groups])
            hit = self._orders[timeframe] = (self.changes, [groups[i] for i in order])
        return hit[1]

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
        self.changes += 1


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
        metrics.register_queue_depth(self)

    def pending_count(self) -> int:
        """Subscribers with a message pending (``optmon_stream_queue_depth``)."""
        return sum(m.pending for st in list(self._states.values()) for g in list(st.groups.values())
                   for m in list(g.members))

    async def _heartbeats(self) -> None:
        period = max(0.02, self.heartbeat_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            hb = self.heartbeat_s
            for st in list(self._states.values()):
                for g in list(st.groups.values()):
                    for m in list(g.members):
                        m.heartbeat(now, hb)

    def group_count(self) -> int:
        """Number of groups across underlyings."""
        return sum(len(s.groups) for s in self._states.values())

    def groups(self, underlying: str) -> list[Group]:
        """The groups of an underlying (for tests and introspection)."""
        st = self._states.get(underlying)
        return list(st.groups.values()) if st else []

    async def subscribe(self, flt: StreamFilter, rate: float, last_sequence: int, writer: Writer) -> Subscriber:
        """Join (or form) the group of ``flt``; the returned subscriber sends its messages with ``writer``, the
        snapshot first (call :meth:`Subscriber.run`).

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
            sub = Subscriber(g, rate, last_sequence, writer)
            g.members[sub] = None
            st.changes += 1
            metrics.SUBSCRIBERS.inc()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Remove a subscriber at once (disconnect); drops its group and the underlying's consumer when unused."""
        sub.close()
        if sub not in sub.group.members:  # already removed
            return
        metrics.SUBSCRIBERS.dec()
        g = sub.group
        g.members.pop(sub, None)
        st = self._states.get(g.filter.underlying)
        if st is not None:
            st.changes += 1
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
