"""StreamService end to end in-process: real Redis (fixture), a real grpc.aio QueryService stand-in serving the
bars we publish, the real stream server; BarUpdates XADDed by the test like ingest does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from optmon.v1 import query_service_pb2, stream_service_pb2, stream_service_pb2_grpc
from prometheus_client import REGISTRY

from services.common.settings import DEFAULT_STRIKE_STEPS
from services.stream.domain.model import LEG_FIELDS
from services.stream.server import create_server
from services.stream.settings import StreamSettings
from services.stream.testing import BarPublisher, ReferenceClient, StubQueryServicer, start_stub_query, synthetic_chain

U = "NIFTY"
EXPIRIES = ["2026-08-18", "2026-08-25", "2026-09-01"]
STRIKES = [23000.0 + 50 * i for i in range(61)]  # 23000..26000
T0 = 1_787_038_380  # 2026-08-18 10:43 IST in UTC epoch seconds


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@dataclass
class Stack:
    stub: StubQueryServicer
    pub: BarPublisher
    server: grpc.aio.Server
    channel: grpc.aio.Channel
    stub_client: stream_service_pb2_grpc.StreamServiceStub
    minute: int = 0
    port: int = 0

    async def publish_minute(self, price: float, tf: int = 1) -> None:
        bt = T0 + 60 * self.minute
        await self.pub.publish(U, tf, bt, price, synthetic_chain(U, EXPIRIES, STRIKES, bt, price, 50.0, tf,
                                                                 self.minute))
        self.minute += 1


async def make_stack(redis_url: str, **kw: object) -> tuple[Stack, grpc.aio.Server]:
    qserver, qport, stub = await start_stub_query(dict(DEFAULT_STRIKE_STEPS))
    settings = StreamSettings(redis_url=redis_url, query_addr=f"127.0.0.1:{qport}", stream_port=0,
                              stream_block_ms=200, **kw)  # type: ignore[arg-type]
    server, port = await create_server(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    pub = BarPublisher(redis_url, stub)
    return Stack(stub, pub, server, channel, stream_service_pb2_grpc.StreamServiceStub(channel), port=port), qserver


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[Stack]:
    s, qserver = await make_stack(redis_url, stream_heartbeat_s=0.3)
    await s.publish_minute(24210.0)
    yield s
    await s.channel.close()
    await s.server.stream_close()  # type: ignore[attr-defined]
    await s.server.stop(None)
    await qserver.stop(None)
    await s.pub.close()


class Reader:
    """Reads a subscription in the background into a ReferenceClient."""

    def __init__(self, stack: Stack, req: stream_service_pb2.SubscribeRequest) -> None:
        self.client = ReferenceClient(req.underlying, req.timeframe or 1)
        self.msgs: list[stream_service_pb2.SubscribeResponse] = []
        self.call = stack.stub_client.Subscribe(req)
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for m in self.call:
            self.msgs.append(m)
            self.client.apply(m)

    async def wait_for(self, pred) -> None:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(20):
            while not pred(self):
                if self.task.done():
                    self.task.result()
                    assert pred(self)
                await asyncio.sleep(0.02)

    async def wait_bucket(self, bt: int) -> None:
        await self.wait_for(lambda r: r.client.bucket_time >= bt)

    def cancel(self) -> None:
        self.call.cancel()


def expected(stack: Stack, req: stream_service_pb2.SubscribeRequest, expiries: list[str]
             ) -> query_service_pb2.GetStrikeDistributionResponse:
    n = req.strikes_around_atm or 10
    d = stack.stub.distribution(query_service_pb2.GetStrikeDistributionRequest(
        underlying=req.underlying, timeframe=req.timeframe, expiries=expiries, strikes_around_atm=n,
        indicators=req.indicators))
    if req.strike_max > 0:
        for e in d.expiries:
            keep = [b for b in e.bars if req.strike_min <= b.strike <= req.strike_max]
            del e.bars[:]
            e.bars.extend(keep)
    return d


def last_delta(r: Reader) -> stream_service_pb2.SubscribeResponse:
    return next(m for m in reversed(r.msgs) if m.WhichOneof("kind") == "delta")


def last_bt(stack: Stack) -> int:
    return T0 + 60 * (stack.minute - 1)


async def test_filter_exactness(stack: Stack) -> None:
    req = stream_service_pb2.SubscribeRequest(underlying=U, expiries=["2026-08-25"], strikes_around_atm=2,
                                              indicators=[7, 2], max_updates_per_second=20)  # type: ignore[list-item]
    r = Reader(stack, req)
    await r.wait_for(lambda r: r.msgs)
    snap = r.msgs[0]
    assert snap.sequence == 1 and snap.WhichOneof("kind") == "snapshot"
    d = snap.snapshot.distribution
    assert [e.expiry for e in d.expiries] == ["2026-08-25"]
    assert [b.strike for b in d.expiries[0].bars] == [24100.0, 24150.0, 24200.0, 24250.0, 24300.0]
    for b in d.expiries[0].bars:
        assert {f.name for f, _ in b.call.ListFields()} == {"iv", "oi"}
        assert {f.name for f, _ in b.put.ListFields()} == {"iv", "oi"}
    await stack.publish_minute(24212.0)
    await r.wait_bucket(last_bt(stack))
    delta = last_delta(r)
    assert delta.sequence == 2
    assert [e.expiry for e in delta.delta.expiries] == ["2026-08-25"]
    allowed = 1 | sum(1 << (bit + LEG_FIELDS.index(f)) for bit in (1, 1 + len(LEG_FIELDS)) for f in ("iv", "oi"))
    for e in delta.delta.expiries:
        for b in e.bars:
            assert 24100 <= b.strike <= 24300
            fields = {f.name for f, _ in b.call.ListFields()} | {f.name for f, _ in b.put.ListFields()}
            assert fields <= {"iv", "oi"}
        # the changed IV / OI of held strikes travel as fixed-point changes (only those fields' bits)
        assert len(e.changes.offsets) == len(e.changes.fields) > 0
        assert all(e.atm_strike + o * delta.delta.strike_step in r.client.state[e.expiry] for o in e.changes.offsets)
        assert all(m & ~allowed == 0 for m in e.changes.fields), list(e.changes.fields)
    assert r.client.distribution() == expected(stack, req, ["2026-08-25"])
    r.cancel()


async def test_window_follows_atm(stack: Stack) -> None:
    req = stream_service_pb2.SubscribeRequest(underlying=U, expiries=EXPIRIES[:2], strikes_around_atm=3,
                                              max_updates_per_second=20)
    r = Reader(stack, req)
    await r.wait_for(lambda r: r.msgs)
    assert [b.strike for b in r.msgs[0].snapshot.distribution.expiries[0].bars] == [
        24050.0, 24100.0, 24150.0, 24200.0, 24250.0, 24300.0, 24350.0]
    await stack.publish_minute(24310.0)  # ATM 24200 → 24300
    await r.wait_bucket(last_bt(stack))
    d = last_delta(r).delta
    for e in d.expiries:
        assert e.atm_strike == 24300.0
        assert sorted(e.removed_strikes) == [24050.0, 24100.0]
        entering = [b for b in e.bars if b.strike in (24400.0, 24450.0)]
        assert len(entering) == 2 and all(b.call.HasField("ltp") and b.put.HasField("oi") for b in entering)
        assert all(24150 <= b.strike <= 24450 for b in e.bars)
    assert sorted(r.client.state[EXPIRIES[0]]) == [24150.0 + 50 * i for i in range(7)]
    assert r.client.distribution() == expected(stack, req, EXPIRIES[:2])
    r.cancel()


async def test_reconstruction_default_filter_and_range(stack: Stack) -> None:
    reqs = [
        stream_service_pb2.SubscribeRequest(underlying=U, max_updates_per_second=20),
        stream_service_pb2.SubscribeRequest(underlying=U, expiries=[EXPIRIES[2]], strike_min=24000,
                                            strike_max=24400, indicators=[1, 8, 9]),  # type: ignore[list-item]
        stream_service_pb2.SubscribeRequest(underlying=U, strikes_around_atm=5, indicators=[3, 4, 5, 6],  # type: ignore[list-item]
                                            max_updates_per_second=0.5),
    ]
    readers = [Reader(stack, q) for q in reqs]
    for r in readers:
        await r.wait_for(lambda r: r.msgs)
    for i, price in enumerate([24230, 24280, 24150, 24080, 24100, 24333, 24333, 24190]):
        await stack.publish_minute(float(price))
        if i % 3 == 0:
            await asyncio.sleep(0.05)
    for r in readers:
        await r.wait_bucket(last_bt(stack))
    assert readers[0].client.distribution() == expected(stack, reqs[0], EXPIRIES)
    assert readers[1].client.distribution() == expected(stack, reqs[1], [EXPIRIES[2]])
    assert readers[2].client.distribution() == expected(stack, reqs[2], EXPIRIES)
    assert readers[2].client.conflated > 0  # 0.5 msg/s: updates were merged
    for r in readers:
        r.cancel()


async def test_slow_consumer_conflates_and_others_get_everything(stack: Stack) -> None:
    fast_req = stream_service_pb2.SubscribeRequest(underlying=U, strikes_around_atm=20, max_updates_per_second=20)
    slow_req = stream_service_pb2.SubscribeRequest(underlying=U, strikes_around_atm=20, max_updates_per_second=1)
    fast = [Reader(stack, fast_req) for _ in range(3)]
    slow_call = stack.stub_client.Subscribe(slow_req)
    slow = ReferenceClient(U)
    slow.apply(await slow_call.read())  # snapshot, then it stops reading
    for r in fast:
        await r.wait_for(lambda r: r.msgs)
    conflated0 = metric("optmon_stream_conflated_updates_total")
    n_updates = 40
    depth_max = 0.0
    for i in range(n_updates):
        await stack.publish_minute(24210.0 + 7 * (i % 9))
        depth_max = max(depth_max, metric("optmon_stream_queue_depth"))
    for r in fast:
        await r.wait_bucket(last_bt(stack))
        # every update accounted for: messages sent + updates merged into them
        deltas = [m for m in r.msgs if m.WhichOneof("kind") == "delta"]
        assert sum(1 + m.delta.conflated for m in deltas) == n_updates
    assert depth_max <= 4  # at most one pending entry per subscriber, whatever the number of updates
    assert metric("optmon_stream_conflated_updates_total") > conflated0
    # the slow reader now drains: far fewer messages, same final state
    got = 0
    async with asyncio.timeout(20):
        while slow.bucket_time < last_bt(stack):
            slow.apply(await slow_call.read())
            got += 1
    assert got < n_updates / 4
    assert set(slow.kinds[1:]) <= {"delta", "snapshot"}  # merged deltas, or the snapshot when > 16 behind
    assert slow.distribution() == fast[0].client.distribution()
    slow_call.cancel()
    for r in fast:
        r.cancel()


async def test_one_encoding_per_update_for_many_subscribers(stack: Stack) -> None:
    req = stream_service_pb2.SubscribeRequest(underlying=U, expiries=EXPIRIES[:1], strikes_around_atm=10,
                                              max_updates_per_second=20)
    snap0 = metric("optmon_stream_encodings_total", kind="snapshot")
    delta0 = metric("optmon_stream_encodings_total", kind="delta")
    readers = [Reader(stack, req) for _ in range(40)]
    for r in readers:
        await r.wait_for(lambda r: r.msgs)
    hub = stack.server.stream_hub  # type: ignore[attr-defined]
    assert len(hub.groups(U)) == 1 and len(hub.groups(U)[0].members) == 40
    assert metric("optmon_stream_encodings_total", kind="snapshot") - snap0 == 1
    for _ in range(5):
        await stack.publish_minute(24211.0 + stack.minute)
    for r in readers:
        await r.wait_bucket(last_bt(stack))
    assert metric("optmon_stream_encodings_total", kind="delta") - delta0 == 5
    assert all(r.client.distribution() == readers[0].client.distribution() for r in readers)
    for r in readers:
        r.cancel()
    async with asyncio.timeout(10):
        while hub.groups(U):  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_invalid_filter_error_message_then_status(stack: Stack) -> None:
    req = stream_service_pb2.SubscribeRequest(underlying=U, strikes_around_atm=80, indicators=[42],  # type: ignore[list-item]
                                              max_updates_per_second=100)
    call = stack.stub_client.Subscribe(req)
    msgs = []
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        async for m in call:
            msgs.append(m)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(msgs) == 1 and msgs[0].error.code == "INVALID_ARGUMENT"
    fields = {v.split(":")[0] for v in msgs[0].error.field_violations}
    assert fields == {"strikes_around_atm", "indicators", "max_updates_per_second"}
    status = await rpc_status.aio.from_call(call)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad)
    assert {v.field for v in bad.field_violations} == fields


async def test_unknown_expiry_is_not_found(stack: Stack) -> None:
    call = stack.stub_client.Subscribe(stream_service_pb2.SubscribeRequest(underlying=U, expiries=["2030-01-01"]))
    msgs = []
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        async for m in call:
            msgs.append(m)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert msgs[0].error.code == "NOT_FOUND"


async def test_resume_heartbeat_and_end(stack: Stack) -> None:
    req = stream_service_pb2.SubscribeRequest(underlying=U, last_sequence=41)
    r = Reader(stack, req)
    await r.wait_for(lambda r: any(m.WhichOneof("kind") == "heartbeat" for m in r.msgs))
    assert r.msgs[0].sequence == 42 and r.msgs[0].WhichOneof("kind") == "snapshot"
    hb = next(m for m in r.msgs if m.WhichOneof("kind") == "heartbeat")
    assert hb.sequence == 42 and hb.heartbeat.last_sequence == 42
    await stack.server.stream_close()  # type: ignore[attr-defined]
    await r.wait_for(lambda r: r.task.done())
    assert r.msgs[-1].WhichOneof("kind") == "end"


async def test_benchmark_c_client_counts_what_grpc_clients_receive(stack: Stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The stream benchmark's C subscriber (benchmarks/clients) against the real service: every stream gets its
    snapshot, one Delta per update with the update's bucket, and the same message sizes a grpc.aio client sees."""
    from benchmarks.clients import StreamClient, build_stream_client

    exe = await asyncio.to_thread(build_stream_client, tmp_path)
    req = stream_service_pb2.SubscribeRequest(underlying=U, expiries=EXPIRIES[:1], strikes_around_atm=5,
                                              max_updates_per_second=20)
    ref = Reader(stack, req)
    await ref.wait_for(lambda r: r.msgs)
    client = StreamClient(exe, "127.0.0.1", stack.port, per_connection=2, probe_every=1)
    try:
        assert await asyncio.to_thread(client.add, [req.SerializeToString()] * 3) == 3
        async with asyncio.timeout(20):
            while (await asyncio.to_thread(client.stats))["snapped"] < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        published = []
        for i in range(3):
            await asyncio.sleep(0.2)  # beyond the 20/s rate limit: no update is conflated
            await stack.publish_minute(24210.0 + 30 * i)
            published.append(last_bt(stack))
            await ref.wait_bucket(last_bt(stack))
        async with asyncio.timeout(20):
            while (st := await asyncio.to_thread(client.stats))["deltas"] < 9:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert st["subs"] == 3 and st["errors"] == 0 and st["with_deltas"] == 3
        assert sorted({b for b, _ in st["lat"]}) == published  # bucket of every Delta, parsed from the wire
        ref_deltas = [m for m in ref.msgs if m.WhichOneof("kind") == "delta"][-3:]
        # same body for every member of the group: the sizes differ from the reference reader's only by the
        # sequence number's varint
        assert abs(st["delta_bytes"] / 9 - sum(m.ByteSize() for m in ref_deltas) / 3) <= 2
    finally:
        await asyncio.to_thread(client.close)
        ref.cancel()


async def test_default_expiries_roll_over_to_the_next_ones_on_a_new_day(stack: Stack) -> None:
    """A subscriber that asked for the default (nearest) expiries holds 18, 25 Aug and 1 Sep on 18 Aug. On the next
    IST day the 18 Aug series has expired: the subscriber gets a fresh snapshot of 25 Aug, 1 and 8 Sep (what
    GetStrikeDistribution answers now), then deltas of those, and a resync is counted."""
    before = metric("optmon_stream_resyncs_total", reason="expiry_rollover")
    req = stream_service_pb2.SubscribeRequest(underlying=U, strikes_around_atm=3)
    r = Reader(stack, req)
    await r.wait_for(lambda r: r.msgs)
    assert [e.expiry for e in r.msgs[0].snapshot.distribution.expiries] == EXPIRIES
    await stack.publish_minute(24230.0)
    await r.wait_bucket(last_bt(stack))
    next_day = T0 + 86_400
    later = [*EXPIRIES[1:], "2026-09-08"]
    await stack.pub.publish(U, 1, next_day, 24300.0, synthetic_chain(U, later, STRIKES, next_day, 24300.0, 50.0, 1, 1))
    await r.wait_bucket(next_day)
    snap = r.msgs[-1]
    assert snap.WhichOneof("kind") == "snapshot"
    assert [e.expiry for e in snap.snapshot.distribution.expiries] == later
    assert r.client.distribution() == expected(stack, req, later)
    await stack.pub.publish(U, 1, next_day + 60, 24350.0,
                            synthetic_chain(U, later, STRIKES, next_day + 60, 24350.0, 50.0, 1, 2))
    await r.wait_bucket(next_day + 60)
    assert r.msgs[-1].WhichOneof("kind") == "delta"
    assert {e.expiry for e in r.msgs[-1].delta.expiries} <= set(later)
    assert r.client.distribution() == expected(stack, req, later)
    assert metric("optmon_stream_resyncs_total", reason="expiry_rollover") == before + 1
    r.cancel()
