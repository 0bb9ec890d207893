"""Dead-letter stream writer: every rejected tick goes to the Redis Stream ``optmon:deadletter`` with its reason.

Entry fields: ``pb`` = serialized ``optmon.v1.DeadLetter``, ``reason`` = the reason label (e.g. ``NON_POSITIVE_LTP``),
``source`` = where the tick came from (``grpc``, ``stream:<key>``, ``pubsub:<channel>``, ``replay:<file>:<line>``).
The stream is capped with approximate trimming (``MAXLEN ~``, default 100,000 entries).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis
from optmon.v1 import ingest_service_pb2

from services.ingest.domain.validation import reason_name

#: The dead-letter stream key.
DEADLETTER_STREAM = "optmon:deadletter"
#: Default approximate cap of the stream (entries).
DEFAULT_MAXLEN = 100_000
# Entries per round trip when many ticks are rejected at once.
_CHUNK = 1000


async def write_dead_letters(
    redis: aioredis.Redis,
    items: Sequence[ingest_service_pb2.DeadLetter],
    maxlen: int = DEFAULT_MAXLEN,
) -> None:
    """XADD every item to ``optmon:deadletter`` (pipelined, non-transactional, in order).

    Raises the redis-py ConnectionError/TimeoutError when Redis is unreachable: the caller must not acknowledge the
    rejected ticks' source in that case (they would otherwise vanish silently).
    """
    for start in range(0, len(items), _CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for item in items[start : start + _CHUNK]:
                pipe.xadd(
                    DEADLETTER_STREAM,
                    {"pb": item.SerializeToString(), "reason": reason_name(item.reason), "source": item.source},
                    maxlen=maxlen,
                    approximate=True,
                )
            await pipe.execute()
