"""Push-based freshness of ``optmon:seq:*`` (Redis client-side caching, RESP3 ``CLIENT TRACKING ... BCAST``).

Without it, a cached answer is re-validated by reading ``optmon:seq:<U>`` (one Redis round trip) whenever the last
read is older than ``fresh_check_ms``, i.e. on nearly every request of a client that asks once a millisecond or less
often. With it, one connection subscribes to invalidations of every key with the prefix ``optmon:seq:``; Redis
pushes one when ingest's ``INCRBY`` changes a sequence, written out in the same event-loop iteration as that
command's own reply. :meth:`SeqWatch.clean` tells whether any byte arrived since the last full read of the
sequences — bytes the event loop has read (a counter bumped synchronously in ``data_received``) or not yet read
(``poll(0)`` on the socket) — and while nothing did, the values of that read are current and the round trip is
skipped. So a read that starts once the push has reached this host (on one host or a LAN: before, or microseconds
after, ingest sees its ``INCRBY`` succeed) sees the committed data, as the round trip would.

Not clean (not connected yet, reconnecting after a Redis failure, a push received, an unread byte, a sequence read
in flight): the caller falls back to reading the sequences. Only plain TCP (``redis://``) and Unix-socket
(``unix://``) URLs are watched; others (TLS) always fall back.
"""

from __future__ import annotations

import asyncio
import select
from typing import Any

import structlog
from redis.asyncio.connection import parse_url

log = structlog.get_logger("query.seqwatch")

#: Key prefix of the sequences (services.query.cache.generations.seq_key).
SEQ_PREFIX = "optmon:seq:"


class RespError(str):
    """A RESP error reply."""


class SetupRefused(Exception):
    """Redis answered the set-up (HELLO 3, CLIENT TRACKING) with an error: e.g. Redis < 6, an ACL without
    CLIENT, or LOADING right after a restart."""

#: Seconds between set-up attempts after a refusal.
REFUSED_RETRY_S = 30.0


def _command(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def parse_resp3(buf: bytes, pos: int = 0) -> tuple[Any, int] | None:
    """One RESP3 value of ``buf`` at ``pos``: ``(value, next position)``, or None when incomplete. Errors come back
    as :class:`RespError` values; aggregates as lists (maps flattened, attributes skipped)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, line, nxt = buf[pos:pos + 1], buf[pos + 1:end], end + 2
    if kind in (b"+", b"(", b",", b"#", b"_"):
        return line.decode(), nxt
    if kind == b"-":
        return RespError(line.decode()), nxt
    if kind == b":":
        return int(line), nxt
    if kind in (b"$", b"=", b"!"):
        n = int(line)
        if n < 0:
            return None, nxt
        if len(buf) < nxt + n + 2:
            return None
        data = buf[nxt:nxt + n].decode(errors="replace")
        return (RespError(data) if kind == b"!" else data), nxt + n + 2
    if kind in (b"*", b"~", b">", b"%", b"|"):
        n = int(line)
        if n < 0:
            return None, nxt
        count = n * 2 if kind in (b"%", b"|") else n
        items = []
        for _ in range(count):
            r = parse_resp3(buf, nxt)
            if r is None:
                return None
            items.append(r[0])
            nxt = r[1]
        if kind == b"|":  # an attribute precedes the value it describes
            return parse_resp3(buf, nxt)
        return items, nxt
    raise ValueError(f"not RESP3: {bytes(buf[pos:pos + 16])!r}")


class _Protocol(asyncio.Protocol):
    """Counts every received byte as activity; during set-up also collects the replies."""

    def __init__(self, watch: SeqWatch, replies: int):
        self.watch = watch
        self.want = replies
        self.buf = bytearray()
        self.setup: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.watch.activity += 1  # first, synchronously: a later clean() must not pass
        if self.setup.done():
            return
        self.buf += data
        out: list[Any] = []
        pos = 0
        try:
            while len(out) < self.want:
                r = parse_resp3(bytes(self.buf), pos)
                if r is None:
                    return
                out.append(r[0])
                pos = r[1]
        except ValueError as e:
            self.setup.set_exception(e)
            return
        self.setup.set_result(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.watch._lost()
        if not self.setup.done():
            self.setup.set_exception(ConnectionError(f"connection lost during set-up: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)


class SeqWatch:
    """Watches ``optmon:seq:*`` for changes. ``activity`` counts received bytes, connects and losses;
    ``synced`` is the ``activity`` snapshot taken before the newest complete read of every sequence
    (:meth:`mark_synced`)."""

    def __init__(self, url: str, retry_s: float = 1.0, connect_timeout_s: float = 0.5):
        self.url = url
        self.retry_s = retry_s
        self.connect_timeout_s = connect_timeout_s
        self.activity = 0
        self.synced = -1
        self.ready = False
        self.enabled = url.startswith(("redis://", "unix://"))
        self._transport: asyncio.Transport | None = None
        self._poll: Any = None
        self.connected = asyncio.Event()

    def clean(self) -> bool:
        """True when the sequences read last (snapshot ``synced``) are still current: tracking is on, nothing was
        received since that snapshot and nothing waits unread on the socket."""
        if not self.ready or self.synced != self.activity:
            return False
        t = self._transport
        return t is not None and not t.is_closing() and not self._poll.poll(0)

    def mark_synced(self, snapshot: int) -> None:
        """Every sequence was read by a request sent after ``activity`` was ``snapshot``."""
        if snapshot > self.synced:
            self.synced = snapshot

    def _lost(self) -> None:
        self.ready = False
        self.activity += 1
        self._transport = None
        self._poll = None
        self.connected.clear()

    async def _connect(self) -> _Protocol:
        kw = parse_url(self.url)
        loop = asyncio.get_running_loop()
        hello = ["HELLO", "3"]
        if kw.get("password") is not None:
            hello += ["AUTH", kw.get("username") or "default", kw["password"]]
        cmds = [hello, ["CLIENT", "SETNAME", "optmon-query-seqwatch"],
                ["CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", SEQ_PREFIX]]
        proto = _Protocol(self, len(cmds))
        if "path" in kw:
            coro = loop.create_unix_connection(lambda: proto, kw["path"])
        else:
            coro = loop.create_connection(lambda: proto, kw.get("host", "localhost"), kw.get("port", 6379))
        transport, _ = await asyncio.wait_for(coro, self.connect_timeout_s)
        try:
            transport.write(b"".join(_command(*c) for c in cmds))
            replies = await asyncio.wait_for(asyncio.shield(proto.setup), self.connect_timeout_s)
            errors = [r for r in replies if isinstance(r, RespError)]
            if errors:
                raise SetupRefused("; ".join(errors))
        except BaseException:
            transport.close()
            raise
        sock = transport.get_extra_info("socket")
        poll = select.poll()
        poll.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        self._transport, self._poll = transport, poll  # type: ignore[assignment]
        self.activity += 1  # sequences changed before tracking was on are unknown: the next read re-syncs
        self.ready = True
        self.connected.set()
        return proto

    async def run(self) -> None:
        """Keep the tracking connection up until cancelled (reconnect after ``retry_s``)."""
        if not self.enabled:
            log.info("seqwatch.disabled", reason="only redis:// and unix:// URLs are watched")
            return
        down_logged = False
        while True:
            pause = self.retry_s
            try:
                proto = await self._connect()
                if down_logged:
                    log.info("seqwatch.recovered")
                    down_logged = False
                await proto.lost
                log.warning("seqwatch.down", error="connection lost", retry_s=self.retry_s)
                down_logged = True
            except asyncio.CancelledError:
                raise
            except SetupRefused as e:  # meanwhile: an optmon:seq read per cached answer, as without the watch
                pause = max(self.retry_s, REFUSED_RETRY_S)
                if not down_logged:
                    log.warning("seqwatch.refused", error=str(e), retry_s=pause,
                                degraded="optmon:seq read per cached answer")
                    down_logged = True
            except (OSError, ConnectionError, TimeoutError, ValueError) as e:
                if not down_logged:
                    log.warning("seqwatch.down", error=f"{type(e).__name__}: {e}", retry_s=self.retry_s)
                    down_logged = True
            await asyncio.sleep(pause)

    def close(self) -> None:
        """Close the connection (the :meth:`run` task is cancelled by its owner)."""
        if self._transport is not None:
            self._transport.close()
