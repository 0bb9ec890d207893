"""Every bound and error code of QueryService: INVALID_ARGUMENT with field violations, NOT_FOUND with ErrorInfo."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from optmon.v1 import query_service_pb2 as q
from optmon.v1 import query_service_pb2_grpc as qg

from services.devstack.redis import free_port
from services.query.servicer import JSON_TWINS
from tests.support import query_fixtures

from .gateway_support import gateway_config, http_request, start_envoy

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
    ("ListExpiries", q.ListExpiriesRequest(underlying=" "), "underlying"),
    # Timestamps outside google.protobuf.Timestamp's range, or before 1970
    ("GetStrikeDistribution", SD(underlying="NIFTY", as_of_time={"seconds": 253_402_300_800}), "as_of_time"),
    ("GetStrikeDistribution", SD(underlying="NIFTY", as_of_time={"seconds": -1}), "as_of_time"),
    ("GetOptionChain", q.GetOptionChainRequest(underlying="NIFTY", as_of_time={"seconds": 0, "nanos": -1}),
     "as_of_time"),
    ("GetMoneynessSeries", _series(end=(1, 1, 1)), "end_time"),
    ("GetMoneynessSeries", q.GetMoneynessSeriesRequest(underlying="NIFTY", start_time={"seconds": -62_135_596_801}),
     "start_time"),
    ("ListBars", _bars(end=(1, 1, 1)), "end_time"),
    ("ListBars", _bars(start=(1969, 12, 31)), "start_time"),
]
NOT_FOUND = [
    ("GetStrikeDistribution", SD(underlying="SENSEX"), "UNKNOWN_UNDERLYING"),
    ("GetMoneynessSeries", q.GetMoneynessSeriesRequest(underlying="SENSEX"), "UNKNOWN_UNDERLYING"),
    ("GetOptionChain", q.GetOptionChainRequest(underlying="SENSEX"), "UNKNOWN_UNDERLYING"),
    ("ListBars", q.ListBarsRequest(underlying="SENSEX"), "UNKNOWN_UNDERLYING"),
    ("GetStrikeDistribution", SD(underlying="NIFTY", expiries=["2026-08-20"]), "UNKNOWN_EXPIRY"),
    ("GetOptionChain", q.GetOptionChainRequest(underlying="NIFTY", expiry="2027-01-01"), "UNKNOWN_EXPIRY"),
    ("GetMoneynessSeries", _series(expiries=["2026-08-21"]), "UNKNOWN_EXPIRY"),
    ("ListExpiries", q.ListExpiriesRequest(underlying="BANKNIFTY"), "NO_DATA"),
    ("ListExpiries", q.ListExpiriesRequest(underlying="XYZ"), "UNKNOWN_UNDERLYING"),
    ("ListBars", _bars(expiry="2027-01-01", strike=24200, option_type=1, start=(2026, 8, 18), end=(2026, 8, 19)),
     "UNKNOWN_EXPIRY"),
    ("GetStrikeDistribution", SD(underlying="NIFTY", as_of_time={"seconds": 1_000_000_000}), "NO_DATA"),
]


async def _error(ch: grpc.aio.Channel, rpc: str, req: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await ch.unary_unary(f"/optmon.v1.QueryService/{rpc}")(req.SerializeToString())  # type: ignore[attr-defined]
    return ei.value


async def test_every_bound_and_error_code(query_server) -> None:
    """Each case through the protobuf RPC and, where the view has one, its JSON twin (the gateway's REST path):
    the same code, message and details."""
    _, addr = query_server
    async with grpc.aio.insecure_channel(addr) as ch:
        st = qg.QueryServiceStub(ch)
        for method, req, field in INVALID:
            for rpc in [method] + ([method + "Json"] if method in JSON_TWINS else []):
                err = await _error(ch, rpc, req)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, field, err.code(), err.details())
                status = rpc_status.from_call(err)
                bad = error_details_pb2.BadRequest()
                assert status is not None and status.details[0].Unpack(bad)
                assert field in [v.field for v in bad.field_violations], (rpc, field, bad)
        for method, req, reason in NOT_FOUND:
            for rpc in [method] + ([method + "Json"] if method in JSON_TWINS else []):
                err = await _error(ch, rpc, req)
                assert err.code() == grpc.StatusCode.NOT_FOUND, (rpc, reason, err.code(), err.details())
                info = error_details_pb2.ErrorInfo()
                status = rpc_status.from_call(err)
                assert status is not None and status.details[0].Unpack(info)
                assert info.reason == reason, (rpc, info)
        # malformed request bytes (not a protobuf message) → INVALID_ARGUMENT, the server keeps serving
        for rpc in ["GetStrikeDistribution", "GetStrikeDistributionJson", "ListBars", "ListUnderlyings"]:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await ch.unary_unary(f"/optmon.v1.QueryService/{rpc}")(b"\xff\xff\xff")
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc
        assert (await st.ListExpiries(q.ListExpiriesRequest(underlying="NIFTY"))).expiries


_7 = "&".join(["expiries=2026-08-18"] * 7)
_U = "/v1/underlyings/NIFTY"
#: (REST path, HTTP status, violated field (400) or ErrorInfo reason (404)): the issue's bounds and codes as a
#: browser meets them (JSON twins, and ListBars transcoded by Envoy).
REST = [
    (f"{_U}/strike-distribution?{_7}", 400, "expiries"),
    (f"{_U}/strike-distribution?strikes_around_atm=51", 400, "strikes_around_atm"),
    (f"{_U}/moneyness-series?{_7}", 400, "expiries"),
    (f"{_U}/moneyness-series?levels=51", 400, "levels"),
    (f"{_U}/moneyness-series?start_time=2026-06-01T00:00:00Z&end_time=2026-08-18T00:00:00Z", 400, "end_time"),
    (f"{_U}/option-chain?expiry=2026-13-01", 400, "expiry"),
    (f"{_U}/bars?page_size=20001", 400, "page_size"),
    (f"{_U}/bars?start_time=2025-01-01T00:00:00Z&end_time=2026-08-18T00:00:00Z", 400, "end_time"),
    ("/v1/underlyings/%20/expiries", 400, "underlying"),
    ("/v1/underlyings/SENSEX/strike-distribution", 404, "UNKNOWN_UNDERLYING"),
    ("/v1/underlyings/SENSEX/moneyness-series", 404, "UNKNOWN_UNDERLYING"),
    ("/v1/underlyings/SENSEX/option-chain", 404, "UNKNOWN_UNDERLYING"),
    ("/v1/underlyings/SENSEX/bars", 404, "UNKNOWN_UNDERLYING"),
    ("/v1/underlyings/SENSEX/expiries", 404, "UNKNOWN_UNDERLYING"),
    (f"{_U}/strike-distribution?expiries=2026-08-20", 404, "UNKNOWN_EXPIRY"),
    (f"{_U}/moneyness-series?expiries=2026-08-21", 404, "UNKNOWN_EXPIRY"),
    (f"{_U}/option-chain?expiry=2027-01-01", 404, "UNKNOWN_EXPIRY"),
    (f"{_U}/bars?expiry=2027-01-01&strike=24200&option_type=OPTION_TYPE_CALL&start_time=2026-08-18T00:00:00Z"
     "&end_time=2026-08-19T00:00:00Z", 404, "UNKNOWN_EXPIRY"),
]


async def test_every_bound_and_error_code_through_the_gateway(query_server, tmp_path: Path) -> None:
    """The same bounds and codes through a real Envoy: HTTP 400 with the field violation, 404 with the reason."""
    _, addr = query_server
    gw = await start_envoy(tmp_path / "envoy", gateway_config(int(addr.rsplit(":", 1)[1]), free_port()))
    try:
        for path, status, what in REST:
            r = await http_request(gw.url, path)
            assert r.status == status, (path, r.status, r.body[:300])
            detail = r.json()["details"][0]
            if status == 400:
                assert what in [v["field"] for v in detail["field_violations"]], (path, detail)
            else:
                assert detail["reason"] == what, (path, detail)
    finally:
        gw.stop()
