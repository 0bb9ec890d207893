"""Redis restart in the middle of a replay: the stream service reconnects by itself and its subscribers resume
with a fresh snapshot (own redis-server, killed and restarted on the same port)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from optmon.v1 import stream_service_pb2

from services.devstack.redis import RedisServer, free_port
from tests.integration.test_stream_service import EXPIRIES, Reader, expected, last_bt, make_stack, metric

U = "NIFTY"


async def test_redis_restart_resumes_with_fresh_snapshot(tmp_path: Path) -> None:
    redis = RedisServer(root=tmp_path / "redis", port=free_port())
    redis.start()
    stack, qserver = await make_stack(redis.url, stream_heartbeat_s=0.5)
    try:
        await stack.publish_minute(24210.0)
        req = stream_service_pb2.SubscribeRequest(underlying=U, strikes_around_atm=4, max_updates_per_second=20)
        r = Reader(stack, req)
        await r.wait_for(lambda r: r.msgs)
        await stack.publish_minute(24260.0)
        await r.wait_bucket(last_bt(stack))
        reconnects0 = metric("optmon_stream_redis_reconnects_total")

        redis.kill()
        await asyncio.sleep(0.3)  # the consumer sees the error and starts backing off
        redis.start()
        async with asyncio.timeout(20):
            while metric("optmon_stream_redis_reconnects_total") == reconnects0:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await stack.pub.redis.aclose()
        stack.pub.redis = type(stack.pub.redis).from_url(redis.url)
        for price in (24300.0, 24150.0):
            await stack.publish_minute(price)
        await r.wait_bucket(last_bt(stack))

        kinds = [m.WhichOneof("kind") for m in r.msgs if m.WhichOneof("kind") != "heartbeat"]
        assert kinds[0] == "snapshot" and kinds.count("snapshot") == 2, kinds
        assert kinds[kinds.index("snapshot", 1) + 1:] and set(kinds[kinds.index("snapshot", 1) + 1:]) == {"delta"}
        seqs = [m.sequence for m in r.msgs if m.WhichOneof("kind") in ("snapshot", "delta")]
        assert seqs == list(range(1, len(seqs) + 1))
        assert r.client.distribution() == expected(stack, req, EXPIRIES)
        r.cancel()
    finally:
        await stack.channel.close()
        await stack.server.stream_close()  # type: ignore[attr-defined]
        await stack.server.stop(None)
        await qserver.stop(None)
        await stack.pub.close()
        redis.stop()
