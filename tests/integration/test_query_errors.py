"""Every bound and error code of QueryService: INVALID_ARGUMENT with field violations, NOT_FOUND with ErrorInfo."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from optmon.v1 import query_service_pb2 as q
from optmon.v1 import query_service_pb2_grpc as qg

from tests.support import query_fixtures

pytestmark = pytest.mark.integration
# fixtures (module attributes so pytest finds them)
bars_dsn = query_fixtures.bars_dsn
bars_template = query_fixtures.bars_template
query_server = query_fixtures.query_server


def _ts(req, field: str, y: int, mo: int, d: int) -> None:
    getattr(req, field).FromDatetime(datetime(y, mo, d, tzinfo=UTC))


def _series(**kw) -> q.GetMoneynessSeriesRequest:
    start, end = kw.pop("start", None), kw.pop("end", None)
    r = q.GetMoneynessSeriesRequest(underlying="NIFTY", **kw)
    if start:
        _ts(r, "start_time", *start)
    if end:
        _ts(r, "end_time", *end)
    return r


def _bars(**kw) -> q.ListBarsRequest:
    start, end = kw.pop("start", None), kw.pop("end", None)
    r = q.ListBarsRequest(underlying="NIFTY", **kw)
    if start:
        _ts(r, "start_time", *start)
    if end:
        _ts(r, "end_time", *end)
    return r


SD = q.GetStrikeDistributionRequest
INVALID = [
    ("GetStrikeDistribution", SD(underlying="NIFTY", expiries=["2026-08-18"] * 7), "expiries"),
    ("GetStrikeDistribution", SD(underlying="NIFTY", strikes_around_atm=51), "strikes_around_atm"),
    ("GetStrikeDistribution", SD(underlying="NIFTY", strikes_around_atm=-1), "strikes_around_atm"),
    ("GetStrikeDistribution", SD(underlying="NIFTY", expiries=["18-Aug-2026"]), "expiries[0]"),
    ("GetStrikeDistribution", SD(underlying="NIFTY", timeframe=9), "timeframe"),
    ("GetStrikeDistribution", SD(underlying="NIFTY", indicators=[1, 42]), "indicators[1]"),
    ("GetStrikeDistribution", SD(underlying=""), "underlying"),
    ("GetMoneynessSeries", _series(levels=51), "levels"),
    ("GetMoneynessSeries", _series(indicator=77), "indicator"),
    ("GetMoneynessSeries", _series(side=5), "side"),
    ("GetMoneynessSeries", _series(start=(2026, 6, 1), end=(2026, 8, 18)), "end_time"),
    ("GetMoneynessSeries", _series(start=(2026, 8, 19), end=(2026, 8, 18)), "start_time"),
    ("GetMoneynessSeries", _series(expiries=["2026-08-18"] * 7), "expiries"),
    ("GetOptionChain", q.GetOptionChainRequest(underlying="NIFTY", expiry="2026-13-01"), "expiry"),
    ("ListBars", _bars(page_size=20001), "page_size"),
    ("ListBars", _bars(page_size=-5), "page_size"),
    ("ListBars", _bars(start=(2025, 1, 1), end=(2026, 8, 18)), "end_time"),
    ("ListBars", _bars(expiry="2026-08-25", strike=24200), "option_type"),
    ("ListBars", _bars(expiry="2026-08-25", option_type=1), "strike"),
    ("ListBars", _bars(strike=24200, option_type=1), "expiry"),
    ("ListBars", _bars(page_token="not-a-token!"), "page_token"),
    ("ListBars", _bars(page_token="AQAAAAAAAAAAAAAAAAAAAAAAAAAA"), "page_token"),
]
NOT_FOUND = [
    ("GetStrikeDistribution", SD(underlying="SENSEX"), "UNKNOWN_UNDERLYING"),
    ("GetStrikeDistribution", SD(underlying="NIFTY", expiries=["2026-08-20"]), "UNKNOWN_EXPIRY"),
    ("GetOptionChain", q.GetOptionChainRequest(underlying="NIFTY", expiry="2027-01-01"), "UNKNOWN_EXPIRY"),
    ("GetMoneynessSeries", _series(expiries=["2026-08-21"]), "UNKNOWN_EXPIRY"),
    ("ListExpiries", q.ListExpiriesRequest(underlying="BANKNIFTY"), "NO_DATA"),
    ("ListExpiries", q.ListExpiriesRequest(underlying="XYZ"), "UNKNOWN_UNDERLYING"),
    ("ListBars", _bars(expiry="2027-01-01", strike=24200, option_type=1, start=(2026, 8, 18), end=(2026, 8, 19)),
     "UNKNOWN_EXPIRY"),
    ("GetStrikeDistribution", SD(underlying="NIFTY", as_of_time={"seconds": 1_000_000_000}), "NO_DATA"),
]


async def test_every_bound_and_error_code(query_server) -> None:
    _, addr = query_server
    async with grpc.aio.insecure_channel(addr) as ch:
        st = qg.QueryServiceStub(ch)
        for method, req, field in INVALID:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await getattr(st, method)(req)
            err = ei.value
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, field, err.details())
            status = rpc_status.from_call(err)
            bad = error_details_pb2.BadRequest()
            assert status is not None and status.details[0].Unpack(bad)
            assert field in [v.field for v in bad.field_violations], (method, field, bad)
        for method, req, reason in NOT_FOUND:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await getattr(st, method)(req)
            err = ei.value
            assert err.code() == grpc.StatusCode.NOT_FOUND, (method, reason, err.details())
            info = error_details_pb2.ErrorInfo()
            status = rpc_status.from_call(err)
            assert status is not None and status.details[0].Unpack(info)
            assert info.reason == reason, (method, info)
        # malformed request bytes (not a protobuf message) → INVALID_ARGUMENT, the server keeps serving
        raw = ch.unary_unary("/optmon.v1.QueryService/GetStrikeDistribution")
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await raw(b"\xff\xff\xff")
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (await st.ListExpiries(q.ListExpiriesRequest(underlying="NIFTY"))).expiries
