"""QueryService over gRPC: proto ↔ domain translation and the cache wiring.

Every RPC is registered through a generic handler with ``request_deserializer=None`` and
``response_serializer=None``: the handler receives the raw request bytes (the L1 key, so a hit does not even parse
the request) and returns serialized response bytes straight from the cache.

The ``<Rpc>Json`` twins (gateway JSON, ``google.api.HttpBody``) are derived cache methods of the protobuf RPCs
(:meth:`Method.derived`): the JSON is printed once per cache entry (:mod:`services.query.jsonbody`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from optmon.v1 import query_service_pb2 as q_pb2

from services.common.errors import FieldViolations, NotFound, Unavailable, abort_with
from services.query import views
from services.query.cache.core import Method, ResponseCache
from services.query.cache.generations import ALL
from services.query.domain import pagetoken
from services.query.domain.requests import validate_bars, validate_chain, validate_distribution, validate_series
from services.query.jsonbody import json_renderer
from services.query.settings import QuerySettings
from services.query.store.pg import PgStore

SERVICE = "optmon.v1.QueryService"

#: Protobuf RPC → response class, for the RPCs with a JSON twin named ``<Rpc>Json`` (ListBars has none: the
#: gateway transcodes it).
JSON_TWINS: dict[str, Any] = {
    "ListUnderlyings": q_pb2.ListUnderlyingsResponse,
    "ListExpiries": q_pb2.ListExpiriesResponse,
    "GetStrikeDistribution": q_pb2.GetStrikeDistributionResponse,
    "GetMoneynessSeries": q_pb2.GetMoneynessSeriesResponse,
    "GetOptionChain": q_pb2.GetOptionChainResponse,
}


def _times(msg: Any, *fields: str) -> list[datetime | None]:
    """The request's Timestamp ``fields`` as UTC datetimes (None when unset). One FieldViolations naming every
    Timestamp outside google.protobuf.Timestamp's valid range (seconds 0001-01-01..9999-12-31, nanos
    0..999,999,999), before the other checks."""
    out: list[datetime | None] = []
    fv = FieldViolations()
    for f in fields:
        if not msg.HasField(f):
            out.append(None)
            continue
        try:
            out.append(getattr(msg, f).ToDatetime(tzinfo=UTC))
        except ValueError as e:
            fv.add(f, f"not a valid Timestamp: {e}")
            out.append(None)
    fv.raise_if_any()
    return out


def _stale_field(response_cls: Any) -> int:
    """Field number of the ``bool stale`` field of a response message (every view's response has one)."""
    f = response_cls.DESCRIPTOR.fields_by_name["stale"]
    if f.type != f.TYPE_BOOL:
        raise TypeError(f"{response_cls.DESCRIPTOR.full_name}.stale is not a bool")
    return f.number  # type: ignore[no-any-return]


def _parse(cls: Any, raw: bytes) -> Any:
    try:
        return cls.FromString(raw)
    except DecodeError:
        fv = FieldViolations()
        fv.add("request", "malformed protobuf message")
        raise fv from None


class QueryServicer:
    """Builds the cached :class:`Method` of each RPC and the generic handler serving them."""

    def __init__(self, settings: QuerySettings, store: PgStore, cache: ResponseCache):
        self.settings = settings
        self.store = store
        self.cache = cache
        self.steps = dict(settings.strike_steps)
        s, steps = settings, self.steps

        def dist_parse(raw: bytes) -> tuple[Any, tuple[str, int], bytes]:
            r = _parse(q_pb2.GetStrikeDistributionRequest, raw)
            (as_of,) = _times(r, "as_of_time")
            q = validate_distribution(r.underlying, r.timeframe, list(r.expiries), r.strikes_around_atm,
                                      list(r.indicators), as_of, steps)
            return q, (q.underlying, int(q.timeframe)), r.SerializeToString()

        async def dist_compute(q: Any) -> bytes:
            resp = await views.strike_distribution(store, q, steps[q.underlying], s.query_carry_buckets)
            return resp.SerializeToString()  # type: ignore[no-any-return]

        def series_parse(raw: bytes) -> tuple[Any, tuple[str, int], bytes]:
            r = _parse(q_pb2.GetMoneynessSeriesRequest, raw)
            start, end = _times(r, "start_time", "end_time")
            q = validate_series(r.underlying, r.timeframe, list(r.expiries), r.indicator, r.side, r.levels,
                                start, end, steps)
            return q, (q.underlying, int(q.timeframe)), r.SerializeToString()

        async def series_compute(q: Any) -> bytes:
            return (await views.moneyness_series(store, q)).SerializeToString()  # type: ignore[no-any-return]

        def chain_parse(raw: bytes) -> tuple[Any, tuple[str, int], bytes]:
            r = _parse(q_pb2.GetOptionChainRequest, raw)
            (as_of,) = _times(r, "as_of_time")
            q = validate_chain(r.underlying, r.expiry, as_of, steps)
            return q, (q.underlying, 1), r.SerializeToString()

        async def chain_compute(q: Any) -> bytes:
            resp = await views.option_chain(store, q, steps[q.underlying], s.query_carry_buckets,
                                            s.query_iv_history_days)
            return resp.SerializeToString()  # type: ignore[no-any-return]

        def bars_parse(raw: bytes) -> tuple[Any, tuple[str, int], bytes]:
            r = _parse(q_pb2.ListBarsRequest, raw)
            start, end = _times(r, "start_time", "end_time")
            q = validate_bars(r.underlying, r.timeframe, r.expiry, r.strike, r.option_type, start, end, r.page_size,
                              None, datetime.now(UTC), steps)
            fp = pagetoken.fingerprint(q.underlying, int(q.timeframe), r.expiry, r.strike, r.option_type,
                                       r.start_time.ToMicroseconds() if r.HasField("start_time") else "",
                                       r.end_time.ToMicroseconds() if r.HasField("end_time") else "")
            return (q, r.page_token, fp), (q.underlying, int(q.timeframe)), r.SerializeToString()

        async def bars_compute(a: Any) -> bytes:
            q, token, fp = a
            return (await views.list_bars(store, q, token, fp)).SerializeToString()  # type: ignore[no-any-return]

        def exp_parse(raw: bytes) -> tuple[Any, tuple[str, int], bytes]:
            r = _parse(q_pb2.ListExpiriesRequest, raw)
            q = validate_chain(r.underlying, "", None, steps)
            return q.underlying, (q.underlying, 1), r.SerializeToString()

        async def exp_compute(u: Any) -> bytes:
            return (await views.list_expiries(store, u)).SerializeToString()  # type: ignore[no-any-return]

        def und_parse(raw: bytes) -> tuple[Any, tuple[str, int], bytes]:
            r = _parse(q_pb2.ListUnderlyingsRequest, raw)
            return None, (ALL, 0), r.SerializeToString()

        async def und_compute(_: Any) -> bytes:
            return (await views.list_underlyings(store, steps)).SerializeToString()  # type: ignore[no-any-return]

        # The last argument: the response's `stale` field number (set on answers served while PostgreSQL is down).
        self.methods: dict[str, Method] = {
            "GetStrikeDistribution": Method("GetStrikeDistribution", dist_parse, dist_compute,
                                            _stale_field(q_pb2.GetStrikeDistributionResponse)),
            "GetMoneynessSeries": Method("GetMoneynessSeries", series_parse, series_compute,
                                         _stale_field(q_pb2.GetMoneynessSeriesResponse)),
            "GetOptionChain": Method("GetOptionChain", chain_parse, chain_compute,
                                     _stale_field(q_pb2.GetOptionChainResponse)),
            "ListBars": Method("ListBars", bars_parse, bars_compute, _stale_field(q_pb2.ListBarsResponse)),
            "ListExpiries": Method("ListExpiries", exp_parse, exp_compute, _stale_field(q_pb2.ListExpiriesResponse)),
            "ListUnderlyings": Method("ListUnderlyings", und_parse, und_compute,
                                      _stale_field(q_pb2.ListUnderlyingsResponse)),
        }
        for name, cls in JSON_TWINS.items():
            self.methods[name + "Json"] = Method.derived(name + "Json", self.methods[name], json_renderer(cls))

    async def serve(self, name: str, raw: bytes) -> bytes:
        """Serialized response of RPC ``name`` for raw request bytes (raises the domain errors)."""
        return await self.cache.serve(self.methods[name], raw)

    async def warm(self, name: str, raw: bytes) -> bytes:
        """As :meth:`serve`, for the warmer: never falls back to a stale answer (Unavailable instead), so an outage
        neither counts warming as stale answers served nor as warmed."""
        return await self.cache.serve(self.methods[name], raw, allow_stale=False)

    def _handler(self, m: Method) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        cache = self.cache

        async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
            try:
                return await cache.serve(m, raw)
            except (FieldViolations, NotFound, Unavailable) as e:
                await abort_with(context, e)
                raise  # unreachable: abort raises

        return handle

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """The QueryService handler (raw bytes in and out)."""
        return grpc.method_handlers_generic_handler(SERVICE, {
            name: grpc.unary_unary_rpc_method_handler(self._handler(m), request_deserializer=None,
                                                      response_serializer=None)
            for name, m in self.methods.items()
        })

    def warm_jobs(self) -> list[tuple[str, bytes]]:
        """(RPC name, raw request) of the default views of the popular underlyings (as clients send them: only the
        underlying set), protobuf first, then their JSON twins."""
        jobs: list[tuple[str, bytes]] = [("ListUnderlyings", b"")]
        for u in self.settings.query_popular_underlyings:
            if u not in self.steps:
                continue
            jobs += [
                ("GetStrikeDistribution", q_pb2.GetStrikeDistributionRequest(underlying=u).SerializeToString()),
                ("GetOptionChain", q_pb2.GetOptionChainRequest(underlying=u).SerializeToString()),
                ("GetMoneynessSeries", q_pb2.GetMoneynessSeriesRequest(underlying=u).SerializeToString()),
                ("ListExpiries", q_pb2.ListExpiriesRequest(underlying=u).SerializeToString()),
            ]
        # The gateway's JSON of the same views (rendered from the protobuf entries just warmed).
        return jobs + [(name + "Json", raw) for name, raw in jobs if name in JSON_TWINS]
