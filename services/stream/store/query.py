"""Snapshot source: QueryService.GetStrikeDistribution through its gRPC stub (services talk over contracts)."""

from __future__ import annotations

import grpc
from optmon.v1 import query_service_pb2, query_service_pb2_grpc

from services.stream.codec import distribution_from_pb
from services.stream.domain.window import Distribution


class SnapshotError(Exception):
    """The snapshot could not be taken. ``code`` is a gRPC status name (NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class QuerySnapshots:
    """Takes strike distributions from QueryService at ``addr`` (host:port); ``timeout_s`` per call."""

    def __init__(self, addr: str, timeout_s: float = 5.0) -> None:
        self.addr = addr
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(addr)
        self._stub = query_service_pb2_grpc.QueryServiceStub(self._channel)

    async def fetch(self, underlying: str, timeframe: int, expiries: list[str], strikes_around_atm: int
                    ) -> Distribution:
        """The latest distribution, every indicator, ATM±``strikes_around_atm`` of ``expiries`` (empty = the
        nearest ones). Raises :class:`SnapshotError`."""
        req = query_service_pb2.GetStrikeDistributionRequest(
            underlying=underlying, timeframe=timeframe, expiries=expiries,  # type: ignore[arg-type]
            strikes_around_atm=strikes_around_atm,
        )
        try:
            resp = await self._stub.GetStrikeDistribution(req, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            name = code.name if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT) else "UNAVAILABLE"
            raise SnapshotError(name, exc.details() or code.name) from exc
        return distribution_from_pb(resp)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()
