"""gRPC ``optmon.v1.IngestService``: proto ↔ committer only.

``PublishTicks`` (client streaming) accumulates the request batches up to ``ingest_publish_commit_ticks`` ticks,
commits them through the shared :class:`~services.ingest.inputs.committer.Committer` (which validates, writes bars
and dead letters, and retries while PostgreSQL is down), and after the stream closes answers the totals. Every
accepted tick is committed before the response is sent.

Errors: INVALID_ARGUMENT (field ``batch``) for a request without a batch; UNAVAILABLE when ingest is still starting,
shutting down, or the in-memory bound ``ingest_max_pending_ticks`` is reached while commits wait for the database.
Batches committed before an error stay committed; resending them is harmless (bars are idempotent, exact duplicates
are rejected as DUPLICATE). Batches sent with ``resend`` set are committed in republish mode (every bar they touch is
published, see ``Pipeline.process``): a failed call may have committed them without publishing their BarUpdates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog
from optmon.v1 import ingest_service_pb2, ingest_service_pb2_grpc, market_pb2

from services.common.errors import FieldViolations, Unavailable, abort_with
from services.ingest.inputs import metrics
from services.ingest.inputs.committer import Committer, CommitterClosed, count_ticks

log = structlog.get_logger("ingest.servicer")

#: Source label of ticks received over gRPC (dead letters, logs).
GRPC_SOURCE = "grpc"


class IngestServicer(ingest_service_pb2_grpc.IngestServiceServicer):
    """``committer`` returns the live Committer, or None while ingest is starting (the server wires it)."""

    def __init__(self, committer: Callable[[], Committer | None], commit_ticks: int) -> None:
        self._committer = committer
        self._commit_ticks = commit_ticks

    async def PublishTicks(
        self,
        request_iterator: AsyncIterator[ingest_service_pb2.PublishTicksRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ingest_service_pb2.PublishTicksResponse:
        """Validate and commit every batch of the stream; answer accepted / rejected-by-reason / suspicious."""
        accepted = suspicious = 0
        rejected: Counter[str] = Counter()
        pending: list[tuple[market_pb2.TickBatch, str]] = []
        held = 0
        resend = False  # the flag of the batches in ``pending``
        committer: Committer | None = None

        async def flush() -> None:
            nonlocal accepted, suspicious, held, pending
            if not pending:
                return
            assert committer is not None
            try:
                result = await committer.commit(pending, republish=resend)
            except CommitterClosed:
                raise Unavailable("ingest is shutting down; uncommitted batches of this call were not stored") from None
            finally:
                await committer.release(held)
                pending, held = [], 0
            accepted += int(result.accepted)
            suspicious += int(result.suspicious)
            rejected.update({k: int(v) for k, v in result.rejected.items()})

        try:
            committer = self._committer()
            if committer is None:
                raise Unavailable("ingest is starting: not connected to PostgreSQL/Redis yet")
            async for req in request_iterator:
                if not req.HasField("batch"):
                    bad = FieldViolations()
                    bad.add("batch", "required: each PublishTicksRequest carries one TickBatch")
                    raise bad
                n = count_ticks(req.batch)
                if n == 0:
                    continue
                if pending and req.resend != resend:
                    await flush()  # one commit never mixes first sends and resends
                resend = req.resend
                if not committer.try_reserve(n):
                    metrics.PUBLISH_UNAVAILABLE.inc()
                    raise Unavailable(
                        f"ingest holds {committer.held} ticks awaiting commit (bound "
                        f"{committer.max_pending_ticks}); PostgreSQL is slow or down: batches of this call after "
                        f"the first {accepted + sum(rejected.values())} ticks were not stored, retry them later")
                pending.append((req.batch, GRPC_SOURCE))
                held += n
                if held >= self._commit_ticks:
                    await flush()
            await flush()
        except (FieldViolations, Unavailable) as exc:
            if committer is not None and held:
                await committer.release(held)
                held = 0
            log.info("ingest.publish_refused", error=str(exc), accepted=accepted)
            await abort_with(context, exc)
        return ingest_service_pb2.PublishTicksResponse(
            accepted=accepted,
            rejected=sum(rejected.values()),
            rejected_by_reason=dict(rejected),
            suspicious=suspicious,
        )
