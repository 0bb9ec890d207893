"""StreamService servicer: SubscribeRequest → domain filter → hub, which writes pre-serialized SubscribeResponses.

Registered through a generic handler with ``response_serializer=None`` so the shared, already encoded bytes of a
group go out as they are (``context.write``, driven by the hub: no generator per stream). Errors: a StreamError
message first (visible to SSE clients), then the matching gRPC status (INVALID_ARGUMENT with BadRequest field
violations, NOT_FOUND, UNAVAILABLE) for gRPC clients.
"""

from __future__ import annotations

import grpc
from optmon.v1 import stream_service_pb2

from services.common.errors import NotFound, invalid_argument_status, not_found_status, unavailable_status
from services.stream import codec
from services.stream.domain.filters import InvalidFilter, normalize
from services.stream.fanout import Hub
from services.stream.store.query import SnapshotError

SERVICE_NAME = "optmon.v1.StreamService"


class StreamServicer:
    """``Subscribe`` over a :class:`Hub`; ``strike_steps`` are the configured underlyings."""

    def __init__(self, hub: Hub, strike_steps: dict[str, float], heartbeat_s: float) -> None:
        self.hub = hub
        self.strike_steps = strike_steps
        self.heartbeat_s = heartbeat_s

    async def subscribe(
        self, request: stream_service_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Server-streaming Subscribe; see stream_service.proto."""
        try:
            flt, rate = normalize(
                underlying=request.underlying, timeframe=request.timeframe, expiries=list(request.expiries),
                strikes_around_atm=request.strikes_around_atm, strike_min=request.strike_min,
                strike_max=request.strike_max, indicators=list(request.indicators),
                max_updates_per_second=request.max_updates_per_second, last_sequence=request.last_sequence,
                strike_steps=self.strike_steps,
            )
        except InvalidFilter as exc:
            await context.write(codec.error_message(0, "INVALID_ARGUMENT", "invalid subscription", exc.violations))
            await context.abort_with_status(invalid_argument_status(exc.violations, "invalid subscription"))
            return
        try:
            sub = await self.hub.subscribe(flt, rate, request.last_sequence, context.write)
        except SnapshotError as exc:
            await context.write(codec.error_message(request.last_sequence, exc.code, exc.message))
            if exc.code == "NOT_FOUND":
                status = not_found_status(NotFound("UNKNOWN_EXPIRY", exc.message, underlying=flt.underlying))
            elif exc.code == "INVALID_ARGUMENT":
                status = invalid_argument_status([("expiries", exc.message)])
            else:
                status = unavailable_status(exc.message)
            await context.abort_with_status(status)
            return
        try:
            await sub.run()
        finally:
            self.hub.unsubscribe(sub)

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to a server (responses are bytes, serializer None)."""
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                self.subscribe,  # type: ignore[arg-type]
                request_deserializer=stream_service_pb2.SubscribeRequest.FromString,
                response_serializer=None,
            ),
        })
