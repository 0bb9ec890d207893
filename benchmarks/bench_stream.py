"""Stream fan-out benchmark: one ``python -m services.stream`` process, subscribers ramped in several client
processes with realistic filters, while the real NIFTY day of 18 Aug 2026 is published as 1-minute BarUpdates at
60× speed (one minute of data per second, cycling the 288 minutes).

Results:
  - ``stream.subscribers_max``: the highest ramp level at which every subscriber got its snapshot, every
    subscriber received updates during the phase, no stream failed and the deliveries kept pace with the updates
    (≥ 95 % of subscribers × 1 update/s). Latency at each level is reported separately.
  - ``stream.rss_mib_at_5000``: resident memory of the stream process with 5,000 subscribers.
  - ``stream.delivered_msgs_per_s``: messages received per second by all clients at the highest level.
  - ``stream.tick_to_subscriber_p50_ms`` / ``_p99_ms`` at 2,000 subscribers: BarUpdate XADD (what ingest does
    right after its commit) → receipt by the client process (wall clock, same machine). Ingest's own tick → commit
    time is not included (the ingest benchmark measures it). Baseline: a bare grpc.aio server pushing one prebuilt
    message of the same size to as many streams (the floor of one Python gRPC process here), same clients.
  - ``stream.delta_bytes_ratio``: Σ bytes the subscribers would have received as snapshots of their own filter
    (their snapshot size per update) ÷ Σ bytes received as deltas.
  - ``stream.delta_vs_full_chain_ratio``: the predecessor's design (every strike of every expiry to every client,
    i.e. the full chain per update; measured as protobuf, smaller than its JSON) ÷ the mean delta received.
  - ``stream.tick_to_subscriber_p50_ms_2000_over_2_replicas`` / ``_p99_``: after the ramp, the same 2,000-subscriber
    mix split evenly over two stream processes on this machine (the issue's "any number of replicas"; each reads
    every BarUpdate), one C client process each; baseline: the one-process figure at 2,000 of the same run.
    ``OPTMON_BENCH_STREAM_REPLICAS=1`` skips this phase.

Subscribers are the C client of benchmarks/clients (``OPTMON_BENCH_STREAM_CLIENT=c``, default: on this 2-core machine
a grpc.aio client process costs as much CPU per message as the server, which a remote subscriber would not) or
grpc.aio clients in 3 processes (``OPTMON_BENCH_STREAM_CLIENT=python``).
  - ``stream.bytes_per_update_per_subscriber``: mean delta size, with the full chain per update as baseline.
  - ``stream.server_cpu_pct_at_<N>``: CPU of the stream process while the updates flow.

Snapshots come from an in-process QueryService stand-in (services.stream.testing) that the publisher "commits" into
before each XADD, like ingest commits to PostgreSQL.

Run alone (own Redis): ``.venv/bin/python -m benchmarks.bench_stream`` (``OPTMON_BENCH_STREAM_LEVELS=500,2000``
to change the ramp).
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import multiprocessing as mp
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks.harness import Result, format_table, percentile
from services.common.domain.moneyness import atm_strike, moneyness_level
from services.common.settings import DEFAULT_STRIKE_STEPS
from services.devstack.redis import free_port, wait_port

U = "NIFTY"
STEP = 50.0
LEVELS = [int(x) for x in os.environ.get("OPTMON_BENCH_STREAM_LEVELS", "500,1000,2000,5000").split(",")]
PHASE_S = float(os.environ.get("OPTMON_BENCH_STREAM_PHASE_S", "12"))
#: Subscribers: "c" = the C client (benchmarks/clients, the default: remote subscribers cost the server's machine
#: nothing), "python" = grpc.aio clients in CLIENT_PROCS processes on the same 2 cores.
CLIENT_KIND = os.environ.get("OPTMON_BENCH_STREAM_CLIENT", "c")
CLIENT_PROCS = 3
C_CLIENT_PROCS = 1
C_PROBE_EVERY = 10
PROBES_PER_PROC = 60
SUBS_PER_CHANNEL = 400
RAMP_CHUNK = 250
#: The replicas phase: REPLICAS_SUBS subscribers split over REPLICAS stream processes (REPLICAS=1: no such phase).
REPLICAS = int(os.environ.get("OPTMON_BENCH_STREAM_REPLICAS", "2"))
REPLICAS_SUBS = 2000
DAY_FILE = Path("nifty-oc-1min-2026-08") / "nifty_oc_1min_2026-08-18.csv.gz"


# ---------------------------------------------------------------------------------------------------------------
# the real day as per-minute bars


def load_day(path: Path) -> list[tuple[float, dict[tuple[str, float], dict[str, dict[str, float]]]]]:
    """Per minute: (spot, {(expiry, strike): {"CE"/"PE": row values}}) in time order."""
    minutes: dict[str, tuple[float, dict[tuple[str, float], dict[str, dict[str, float]]]]] = {}
    with gzip.open(path, "rt", newline="") as f:
        for row in csv.DictReader(f):
            m = minutes.setdefault(row["ts_ist"], (float(row["spot"]), defaultdict(dict)))
            m[1][(row["expiry"], float(row["strike"]))][row["option_type"]] = {
                k: float(row[k]) for k in ("ltp", "volume", "oi", "iv", "delta", "gamma", "theta", "vega")}
    return [minutes[k] for k in sorted(minutes)]


def build_minutes(day: list[Any]) -> list[tuple[float, list[tuple[str, float, float, int, Any, Any]]]]:
    """Per minute: (spot, [(expiry, strike, atm, level, ce_leg_kwargs|None, pe_leg_kwargs|None)]) with per-bar
    volume and ΔOI derived from the previous minute."""
    prev: dict[tuple[str, float, str], tuple[float, float]] = {}
    out = []
    for spot, chain in day:
        listed: dict[str, list[float]] = defaultdict(list)
        for e, s in chain:
            listed[e].append(s)
        atms = {e: atm_strike(sorted(v), spot) for e, v in listed.items()}
        rows = []
        for (e, s), sides in sorted(chain.items()):
            legs: list[Any] = []
            for side in ("CE", "PE"):
                r = sides.get(side)
                if r is None:
                    legs.append(None)
                    continue
                pv, poi = prev.get((e, s, side), (r["volume"], r["oi"]))
                prev[(e, s, side)] = (r["volume"], r["oi"])
                legs.append(dict(ltp=r["ltp"], open=r["ltp"], high=r["ltp"], low=r["ltp"], iv=r["iv"],
                                 delta=r["delta"], gamma=r["gamma"], theta=r["theta"], vega=r["vega"],
                                 oi=int(r["oi"]), oi_change=int(r["oi"] - poi),
                                 volume=int(max(0.0, r["volume"] - pv))))
            rows.append((e, s, atms[e], moneyness_level(s, atms[e], STEP), legs[0], legs[1]))
        out.append((spot, rows))
    return out


def bars_of(minute: tuple[float, list[Any]], bucket_time: int) -> list[Any]:
    from optmon.v1 import market_pb2

    spot, rows = minute
    bars = []
    for e, s, atm, lvl, ce, pe in rows:
        b = market_pb2.StrikeBar(underlying=U, expiry=e, strike=s, timeframe=1,  # type: ignore[arg-type]
                                 underlying_close=spot,
                                 moneyness_level=lvl, atm_strike=atm,
                                 call=market_pb2.OptionLeg(**ce) if ce else None,
                                 put=market_pb2.OptionLeg(**pe) if pe else None)
        b.bucket_time.seconds = bucket_time
        bars.append(b)
    return bars


# ---------------------------------------------------------------------------------------------------------------
# client processes


def realistic_requests(n: int, expiries: list[str], seed: int) -> list[bytes]:
    """``n`` SubscribeRequests: ATM±5/10/15 over 1–3 of the nearest expiries (or the default), several indicator
    sets, default rate (4/s)."""
    from optmon.v1 import stream_service_pb2

    rnd = random.Random(seed)
    exp_sets = [expiries[:1], expiries[:2], expiries[:3], expiries[1:2], []]
    ind_sets = [[1, 7, 8], [2, 7], [], [1, 2, 3, 4, 5, 6], [7, 9], [1, 2, 7, 8]]
    out = []
    for _ in range(n):
        out.append(stream_service_pb2.SubscribeRequest(
            underlying=U, expiries=rnd.choice(exp_sets), strikes_around_atm=rnd.choice([5, 10, 10, 15]),
            indicators=rnd.choice(ind_sets)).SerializeToString())  # type: ignore[arg-type]
    return out


class _Sub:
    __slots__ = ("deltas", "first_size", "probe", "snap")

    def __init__(self, probe: bool) -> None:
        self.probe = probe
        self.snap = False
        self.first_size = 0
        self.deltas = 0


async def _client_main(conn: Connection, addr: str) -> None:
    import grpc
    from optmon.v1 import stream_service_pb2

    loop = asyncio.get_running_loop()
    stopping = False
    channels: list[grpc.aio.Channel] = []
    subs: list[_Sub] = []
    tasks: list[asyncio.Task[None]] = []
    st: dict[str, Any] = {"msgs": 0, "bytes": 0, "full_equiv": 0, "delta_bytes": 0, "errors": 0, "lat": [],
                          "last_error": ""}

    def reset() -> None:
        st.update(msgs=0, bytes=0, full_equiv=0, delta_bytes=0, errors=0, lat=[])
        for s in subs:
            s.deltas = 0

    async def consume(method: Any, req: bytes, sub: _Sub) -> None:
        parse = stream_service_pb2.SubscribeResponse.FromString
        try:
            async for raw in method(req):
                now = time.time()
                n = len(raw)
                st["msgs"] += 1
                st["bytes"] += n
                if not sub.snap:
                    sub.snap = True
                    sub.first_size = n
                    continue
                if n > 40:  # deltas (heartbeats are ~20 bytes)
                    sub.deltas += 1
                    st["full_equiv"] += sub.first_size
                    st["delta_bytes"] += n
                    if sub.probe:
                        m = parse(raw)
                        if m.WhichOneof("kind") == "delta" and m.delta.conflated == 0:
                            st["lat"].append((m.delta.bucket_time.seconds, now))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED or not stopping:
                st["errors"] += 1
                st["last_error"] = f"{exc.code().name}: {exc.details()} snap={sub.snap}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported, never silent
            st["errors"] += 1
            st["last_error"] = repr(exc)

    while True:
        cmd, arg = await loop.run_in_executor(None, conn.recv)
        if cmd == "add":
            for req in arg:
                if not channels or len(subs) >= len(channels) * SUBS_PER_CHANNEL:
                    channels.append(grpc.aio.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)]))
                method = channels[-1].unary_stream("/optmon.v1.StreamService/Subscribe")
                sub = _Sub(probe=sum(1 for s in subs if s.probe) < PROBES_PER_PROC)
                subs.append(sub)
                tasks.append(asyncio.create_task(consume(method, req, sub)))
                if len(tasks) % 50 == 0:
                    await asyncio.sleep(0.01)
            conn.send(len(subs))
        elif cmd == "reset":
            reset()
            conn.send(True)
        elif cmd == "stats":
            conn.send({**st, "subs": len(subs), "snapped": sum(s.snap for s in subs),
                       "finished": sum(1 for t in tasks if t.done()),
                       "with_deltas": sum(1 for s in subs if s.deltas > 0)})
        elif cmd == "stop":
            stopping = True
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in channels:
                await c.close()
            conn.send(True)
            return


def _client_proc(conn: Connection, addr: str) -> None:
    asyncio.run(_client_main(conn, addr))


# ---------------------------------------------------------------------------------------------------------------
# driver


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_metrics(port: int) -> dict[str, float]:
    """A few figures from the stream process's Prometheus endpoint."""
    import urllib.request

    want = {"optmon_stream_send_latency_seconds_sum": "lat_sum", "optmon_stream_send_latency_seconds_count": "lat_n",
            "optmon_stream_groups": "groups", 'optmon_stream_encodings_total{kind="delta"}': "enc",
            "optmon_stream_bar_updates_total": "upd", "optmon_stream_conflated_updates_total": "conflated",
            "optmon_stream_update_seconds_sum": "upd_s_sum", "optmon_stream_update_seconds_count": "upd_s_n"}
    out = dict.fromkeys(want.values(), 0.0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in want:
            out[want[name]] = float(value)
    return out


async def _ask(conns: list[Connection], cmd: str, args: list[Any] | None = None) -> list[Any]:
    for i, c in enumerate(conns):
        c.send((cmd, args[i] if args else None))
    return [await asyncio.to_thread(c.recv) for c in conns]


class _PyPool:
    """Subscribers in ``CLIENT_PROCS`` Python processes (grpc.aio clients, :func:`_client_main`)."""

    def __init__(self, addr: str) -> None:
        mpctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(CLIENT_PROCS):
            parent_end, child_end = mpctx.Pipe()
            p = mpctx.Process(target=_client_proc, args=(child_end, addr), daemon=True)
            p.start()
            self.procs.append(p)
            self.conns.append(parent_end)

    async def add(self, reqs: list[bytes]) -> None:
        await _ask(self.conns, "add", [reqs[j::CLIENT_PROCS] for j in range(CLIENT_PROCS)])

    async def reset(self) -> None:
        await _ask(self.conns, "reset")

    async def stats(self) -> list[dict[str, Any]]:
        return await _ask(self.conns, "stats")

    async def stop(self) -> None:
        if self.conns:
            try:
                async with asyncio.timeout(30):
                    await _ask(self.conns, "stop")
            except Exception:  # a stuck client is killed below
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        self.conns, self.procs = [], []


class _CPool:
    """Subscribers in ``C_CLIENT_PROCS`` processes of the C client (benchmarks/clients/grpc_stream_client.c): they
    cost the shared cores ~10× less CPU per message than grpc.aio clients, so what is measured is the service."""

    def __init__(self, addr: str, exe: Path) -> None:
        from benchmarks.clients import StreamClient

        host, port = addr.rsplit(":", 1)
        self.clients = [StreamClient(exe, host, int(port), SUBS_PER_CHANNEL, C_PROBE_EVERY)
                        for _ in range(C_CLIENT_PROCS)]

    async def add(self, reqs: list[bytes]) -> None:
        n = len(self.clients)
        await asyncio.gather(*[asyncio.to_thread(c.add, reqs[j::n]) for j, c in enumerate(self.clients)])

    async def reset(self) -> None:
        await asyncio.gather(*[asyncio.to_thread(c.reset) for c in self.clients])

    async def stats(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*[asyncio.to_thread(c.stats) for c in self.clients]))

    async def stop(self) -> None:
        await asyncio.gather(*[asyncio.to_thread(c.close) for c in self.clients])
        self.clients = []


_Pool = _PyPool | _CPool


def _new_pool(kind: str, addr: str, work_dir: Path) -> _Pool:
    if kind == "c":
        from benchmarks.clients import build_stream_client

        return _CPool(addr, build_stream_client(work_dir / "bin"))
    return _PyPool(addr)


async def _ramp(pool: _Pool, reqs: list[bytes], have: int) -> None:
    """Open ``reqs`` spread over the client processes, in chunks, waiting for each chunk's snapshots: a burst of
    thousands of new streams would wait in gRPC's accept queue longer than its 30 s limit
    (grpc.server_max_unrequested_time_in_server) on this loaded machine and be cancelled."""
    for i in range(0, len(reqs), RAMP_CHUNK):
        chunk = reqs[i:i + RAMP_CHUNK]
        await pool.add(chunk)
        deadline = time.monotonic() + 60
        while True:
            stats = await pool.stats()
            if sum(s["snapped"] for s in stats) >= have + i + len(chunk) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)


def _floor_server_proc(conn: Connection) -> None:
    """A bare grpc.aio fan-out (uvloop, like the stream service): ``("start", message_bytes)`` → port; then it
    pushes one prebuilt SubscribeResponse of about ``message_bytes`` to every open stream once a second;
    ``("cpu", None)`` → CPU seconds so far; ``("stop", None)`` → {bucket_time: publish wall time}."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional, as in the service
        pass
    asyncio.run(_floor_server_main(conn))


async def _floor_server_main(conn: Connection) -> None:
    import grpc
    from optmon.v1 import stream_service_pb2 as sp

    loop = asyncio.get_running_loop()
    state: dict[str, Any] = {"version": 0, "msg": b""}
    writing: dict[Any, bool] = {}  # open streams' contexts → a write in flight
    times: dict[int, float] = {}
    snapshot = sp.SubscribeResponse(sequence=1, snapshot=sp.Snapshot()).SerializeToString()

    async def subscribe(request: bytes, context: Any) -> None:
        # the fastest way found to push to many grpc.aio streams: the handler parks, the ticker starts one
        # context.write per stream (no generator or task waiting per stream)
        await context.write(snapshot)
        writing[context] = False
        try:
            await loop.create_future()  # until the client goes away (cancellation)
        finally:
            writing.pop(context, None)

    def write(context: Any, msg: bytes) -> None:
        if writing.get(context) is False:
            writing[context] = True

            def done(t: asyncio.Task[None]) -> None:
                if not t.cancelled():
                    t.exception()
                if context in writing:
                    writing[context] = False

            loop.create_task(context.write(msg)).add_done_callback(done)

    _, message_bytes = await loop.run_in_executor(None, conn.recv)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("optmon.v1.StreamService", {
        "Subscribe": grpc.unary_stream_rpc_method_handler(subscribe, request_deserializer=None,
                                                          response_serializer=None)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    from services.common.server import tune_gc

    tune_gc()  # as the stream service does
    pad = max(0, (message_bytes - 40) // 8)

    async def ticker() -> None:
        bt = 1_900_000_000
        next_t = time.monotonic()
        while True:
            bt += 60
            state["msg"] = sp.SubscribeResponse(sequence=2, delta=sp.Delta(
                bucket_time={"seconds": bt}, expiries=[sp.ExpiryDelta(removed_strikes=[0.5] * pad)])
            ).SerializeToString()
            times[bt] = time.time()
            state["version"] += 1
            for ctx in list(writing):
                write(ctx, state["msg"])
            next_t += 1.0
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    task = asyncio.create_task(ticker())
    conn.send(port)
    while True:
        cmd, _ = await loop.run_in_executor(None, conn.recv)
        if cmd == "cpu":
            conn.send(time.process_time())
        else:
            task.cancel()
            await server.stop(None)
            conn.send(times)
            return


async def grpc_floor(n_subs: int, message_bytes: int, phase_s: float, kind: str, work_dir: Path
                     ) -> dict[str, float]:
    """The floor of Python gRPC fan-out on this machine, measured with the same kind of clients: a bare grpc.aio
    server (its own process, :func:`_floor_server_proc`) that does nothing but push one prebuilt ``message_bytes``
    SubscribeResponse to each of ``n_subs`` streams once a second — no Redis, no filters, no deltas, no metrics.
    Returns p50/p99 publish → client receipt (ms) and the server's CPU per message (µs)."""
    mpctx = mp.get_context("spawn")
    fconn, child = mpctx.Pipe()
    fproc = mpctx.Process(target=_floor_server_proc, args=(child,), daemon=True)
    fproc.start()
    pool: _Pool | None = None
    times: dict[int, float] = {}
    try:
        fconn.send(("start", message_bytes))
        port = await asyncio.to_thread(fconn.recv)
        pool = _new_pool(kind, f"127.0.0.1:{port}", work_dir)
        await _ramp(pool, [b""] * n_subs, 0)
        await asyncio.sleep(2.0)
        await pool.reset()
        fconn.send(("cpu", None))
        cpu0 = await asyncio.to_thread(fconn.recv)
        await asyncio.sleep(phase_s)
        fconn.send(("cpu", None))
        cpu = await asyncio.to_thread(fconn.recv) - cpu0
        stats = await pool.stats()
        await pool.stop()
        pool = None
        fconn.send(("stop", None))
        times = await asyncio.to_thread(fconn.recv)
    finally:
        if pool is not None:
            await pool.stop()
        fproc.join(10)
        if fproc.is_alive():
            fproc.kill()
    lat = [(now - times[bt]) * 1000 for st in stats for bt, now in st["lat"] if bt in times]
    msgs = sum(st["msgs"] for st in stats)
    return {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "us_per_msg": 1e6 * cpu / max(1, msgs),
            "msgs_per_s": msgs / phase_s}


class _StreamProc:
    """One ``python -m services.stream`` process on a free port (Redis and QueryService stand-in given), with its
    Prometheus endpoint."""

    def __init__(self, ctx: Any, qport: int) -> None:
        self.port, self.mport = free_port(), free_port()
        env = {**os.environ, "OPTMON_REDIS_URL": ctx.redis_url, "OPTMON_QUERY_ADDR": f"127.0.0.1:{qport}",
               "OPTMON_STREAM_PORT": str(self.port), "OPTMON_LOG_LEVEL": "WARNING",
               "OPTMON_METRICS_PORT": str(self.mport)}
        self.proc = subprocess.Popen([sys.executable, "-m", "services.stream"], env=env, cwd=str(ctx.root))

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def ready(self) -> None:
        await asyncio.to_thread(wait_port, self.port, 30.0)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _measure(pools: list[_Pool], procs: list[_StreamProc], publish_times: dict[int, float]
                   ) -> dict[str, Any]:
    """One measuring phase (PHASE_S) over the subscribers of ``pools`` served by ``procs``: counters reset first;
    latency = publish → receipt of the probe streams' unconflated Deltas."""
    await asyncio.gather(*[p.reset() for p in pools])
    m0 = [await asyncio.to_thread(_server_metrics, sp.mport) for sp in procs]
    cpu0 = [_cpu_s(sp.proc.pid) for sp in procs]
    p_start = time.monotonic()
    await asyncio.sleep(PHASE_S)
    stats = [st for p in pools for st in await p.stats()]
    m1 = [await asyncio.to_thread(_server_metrics, sp.mport) for sp in procs]
    elapsed = time.monotonic() - p_start
    cpu_pct = sum(100 * (_cpu_s(sp.proc.pid) - c0) / elapsed for sp, c0 in zip(procs, cpu0, strict=True))

    def dm(key: str) -> float:
        return sum(b[key] - a[key] for a, b in zip(m0, m1, strict=True))

    lat = [(now - publish_times[bt]) * 1000 for s in stats for bt, now in s["lat"] if bt in publish_times]
    return {
        "snapped": sum(s["snapped"] for s in stats), "with_deltas": sum(s["with_deltas"] for s in stats),
        "msgs_per_s": sum(s["msgs"] for s in stats) / elapsed,
        "full_equiv": sum(s["full_equiv"] for s in stats), "delta_bytes": sum(s["delta_bytes"] for s in stats),
        "deltas": sum(s["msgs"] for s in stats), "errors": sum(s["errors"] for s in stats),
        "p50": percentile(lat, 50), "p99": percentile(lat, 99),
        "rss": sum(_rss_mib(sp.proc.pid) for sp in procs), "n_lat": len(lat),
        "server_handoff_mean_ms": 1000 * dm("lat_sum") / max(1.0, dm("lat_n")),
        "groups": sum(m["groups"] for m in m1),
        "update_compute_mean_ms": 1000 * dm("upd_s_sum") / max(1.0, dm("upd_s_n")),
        "encodings_per_update": dm("enc") / max(1.0, dm("upd")),
        "conflated": dm("conflated"), "cpu_pct": cpu_pct,
        "last_error": next((s["last_error"] for s in stats if s["last_error"]), ""),
        "finished": sum(s["finished"] for s in stats),
    }


def _served(agg: dict[str, Any], n_subs: int) -> bool:
    """A phase served its ``n_subs`` subscribers: every one got its snapshot and kept receiving updates, no stream
    failed, and the deliveries kept pace with the updates (>= 95 % of subscribers x 1 update/s)."""
    return (agg["snapped"] >= n_subs and agg["with_deltas"] >= n_subs and not agg["errors"]
            and agg["msgs_per_s"] >= 0.95 * n_subs)


async def _replicas_phase(ctx: Any, qport: int, n_subs: int, expiries: list[str],
                          publish_times: dict[int, float]) -> dict[str, Any]:
    """``n_subs`` subscribers (the same realistic mix) split evenly over REPLICAS stream processes on this machine,
    each reading the same BarUpdates (the issue's "any number of replicas"); one C client process per replica."""
    procs = [_StreamProc(ctx, qport) for _ in range(REPLICAS)]
    pools: list[_Pool] = []
    try:
        await asyncio.gather(*[sp.ready() for sp in procs])
        pools = [_new_pool(CLIENT_KIND, sp.addr, Path(ctx.work_dir)) for sp in procs]
        reqs = realistic_requests(n_subs, expiries, seed=n_subs)
        await asyncio.gather(*[_ramp(pool, reqs[i::REPLICAS], 0) for i, pool in enumerate(pools)])
        await asyncio.sleep(2.0)
        return await _measure(pools, procs, publish_times)
    finally:
        for pool in pools:
            await pool.stop()
        await asyncio.gather(*[asyncio.to_thread(sp.stop) for sp in procs])


async def run(ctx: Any) -> list[Result]:
    """Ramp subscribers against one stream process while the real day flows at 60×; see the module doc."""
    from services.stream.testing import BarPublisher, start_stub_query

    minutes = build_minutes(load_day(ctx.shared_data / DAY_FILE))
    expiries = sorted({r[0] for r in minutes[0][1]})
    qserver, qport, stub = await start_stub_query(dict(DEFAULT_STRIKE_STEPS))
    pub = BarPublisher(ctx.redis_url, stub)
    t0 = 1_787_038_380
    k = 0
    publish_times: dict[int, float] = {}

    async def publish_one() -> None:
        nonlocal k
        bt = t0 + 60 * k
        m = minutes[k % len(minutes)]
        upd = pub.build(U, 1, bt, m[0], bars_of(m, bt))
        stub.commit(upd)
        publish_times[bt] = time.time()
        await pub.redis.xadd(f"optmon:bars:{U}", {"pb": upd.SerializeToString()}, maxlen=10000, approximate=True)
        k += 1

    await publish_one()
    full_chain_bytes = len(pub.build(U, 1, t0, minutes[0][0], bars_of(minutes[0], t0)).SerializeToString())

    sproc = _StreamProc(ctx, qport)
    results: list[Result] = []
    pool: _Pool | None = None
    running = True

    async def ticker() -> None:
        next_t = time.monotonic()
        while running:
            await publish_one()
            next_t += 1.0  # 60× real time: one 1-minute bucket per second
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    tick_task: asyncio.Task[None] | None = None
    replicas: dict[str, Any] | None = None
    try:
        await sproc.ready()
        pool = _new_pool(CLIENT_KIND, sproc.addr, Path(ctx.work_dir))
        tick_task = asyncio.create_task(ticker())
        level_stats: dict[int, dict[str, Any]] = {}
        have = 0
        for level in LEVELS:
            await _ramp(pool, realistic_requests(level - have, expiries[:3], seed=level), have)
            have = level
            await asyncio.sleep(2.0)
            agg = level_stats[level] = await _measure([pool], [sproc], publish_times)
            print(f"   stream level {level}: {agg}", flush=True)
        await pool.stop()
        pool = None
        await asyncio.to_thread(sproc.stop)  # the ticker keeps publishing for the replicas phase
        if REPLICAS > 1:
            replicas = await _replicas_phase(ctx, qport, REPLICAS_SUBS, expiries[:3], publish_times)
            print(f"   stream {REPLICAS} replicas, {REPLICAS_SUBS} subscribers: {replicas}", flush=True)
        ok = [lv for lv, a in level_stats.items() if _served(a, lv)]
        top = max(level_stats)
        results.append(Result("stream.subscribers_max", float(max(ok) if ok else 0), "subs", goal=">= 5000",
                              note=f"ramp {LEVELS}: all subscribed, all receiving, deliveries >= 95% of "
                                   "subscribers x update rate; 1 process, 1M BarUpdates at 60x"))
        if 5000 in level_stats:
            results.append(Result("stream.rss_mib_at_5000", level_stats[5000]["rss"], "MiB", goal="<= 1024"))
        results.append(Result("stream.delivered_msgs_per_s", level_stats[top]["msgs_per_s"], "msg/s",
                              note=f"at {top} subscribers"))
        for lv, st in level_stats.items():
            if lv != 2000:
                results.append(Result(f"stream.tick_to_subscriber_p50_ms_at_{lv}", st["p50"], "ms"))
                results.append(Result(f"stream.tick_to_subscriber_p99_ms_at_{lv}", st["p99"], "ms"))
        at = 2000 if 2000 in level_stats else top
        fe = sum(a["full_equiv"] for a in level_stats.values())
        db = sum(a["delta_bytes"] for a in level_stats.values())
        mean_delta = db / max(1, sum(a["deltas"] for a in level_stats.values()))
        results.append(Result("stream.delta_bytes_ratio", fe / db if db else float("nan"), "x", goal=">= 5",
                              note="snapshot of the subscriber's own filter per update / delta received"))
        results.append(Result("stream.delta_vs_full_chain_ratio", full_chain_bytes / mean_delta, "x",
                              note=f"predecessor full snapshot per update ({full_chain_bytes} B, every strike of "
                                   f"every expiry) / mean delta ({mean_delta:.0f} B)"))
        results.append(Result("stream.bytes_per_update_per_subscriber", mean_delta, "bytes",
                              baseline=float(full_chain_bytes),
                              note="baseline: full chain (every strike of every expiry) per update, protobuf"))
        for lv, st in level_stats.items():
            results.append(Result(f"stream.server_cpu_pct_at_{lv}", st["cpu_pct"], "%",
                                  note="stream process CPU (one core = 100) while updates flow"))
    finally:
        running = False
        if tick_task is not None:
            await asyncio.gather(tick_task, return_exceptions=True)
        if pool is not None:
            await pool.stop()
        sproc.stop()
        await qserver.stop(None)
        await pub.close()
    # the same clients against a bare grpc.aio fan-out (the floor), after the stream processes are gone
    a = level_stats[at]
    floor = await grpc_floor(at, int(mean_delta), PHASE_S, CLIENT_KIND, Path(ctx.work_dir))
    print(f"   grpc floor at {at}: {floor}", flush=True)
    fnote = (f"baseline: bare grpc.aio server pushing one prebuilt {mean_delta:.0f} B message to {at} streams "
             "(same clients, same run) — the floor of one Python gRPC process on this machine")
    results.append(Result("stream.tick_to_subscriber_p50_ms", a["p50"], "ms", baseline=floor["p50"], goal="<= 20",
                          note=f"BarUpdate XADD -> client receipt, {at} subscribers; {fnote}"))
    results.append(Result("stream.tick_to_subscriber_p99_ms", a["p99"], "ms", baseline=floor["p99"], goal="<= 100",
                          note=f"BarUpdate XADD -> client receipt, {at} subscribers; same baseline"))
    results.append(Result(f"stream.server_cpu_us_per_msg_at_{at}", 1e4 * a["cpu_pct"] / max(1.0, a["msgs_per_s"]),
                          "us", baseline=floor["us_per_msg"],
                          note="stream process CPU per delivered message; baseline: the bare grpc.aio floor"))
    if replicas is not None:
        rnote = (f"{REPLICAS_SUBS} subscribers split over {REPLICAS} stream processes on this 2-core machine "
                 f"({REPLICAS_SUBS // REPLICAS} each, same mix); baseline: one process with {at}")
        if not _served(replicas, REPLICAS_SUBS):
            rnote += (f"; NOT ALL SERVED: {replicas['snapped']} snapshots, {replicas['with_deltas']} receiving, "
                      f"{replicas['errors']} errors, {replicas['msgs_per_s']:.0f} msg/s ({replicas['last_error']})")
        results.append(Result(f"stream.tick_to_subscriber_p50_ms_{REPLICAS_SUBS}_over_{REPLICAS}_replicas",
                              replicas["p50"], "ms", baseline=a["p50"] if at == REPLICAS_SUBS else None,
                              note=rnote))
        results.append(Result(f"stream.tick_to_subscriber_p99_ms_{REPLICAS_SUBS}_over_{REPLICAS}_replicas",
                              replicas["p99"], "ms", baseline=a["p99"] if at == REPLICAS_SUBS else None,
                              note=rnote))
    return results


if __name__ == "__main__":
    from benchmarks.run import standalone

    rows = asyncio.run(standalone(run, "bench_stream"))
    del rows
    _ = format_table
