"""Derived cache methods (the JSON twins) and the JSON printer, without I/O: one computation serves the protobuf
answer and its JSON, generations invalidate both, stale answers are the source's stale answer rendered."""

from __future__ import annotations

import asyncio
import json

import pytest
from google.api import httpbody_pb2
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from optmon.v1 import market_pb2
from optmon.v1 import query_service_pb2 as q

from services.common.errors import Unavailable
from services.query.cache.core import Method, ResponseCache
from services.query.cache.generations import Generations
from services.query.cache.l1 import L1Cache
from services.query.jsonbody import json_renderer, to_json


def _answer(oi: int) -> bytes:
    return q.GetStrikeDistributionResponse(  # type: ignore[no-any-return]
        underlying="NIFTY", timeframe=market_pb2.TIMEFRAME_1M, bucket_time=Timestamp(seconds=1_787_029_980),
        underlying_price=24980.5,
        expiries=[q.ExpiryDistribution(expiry="2026-08-25", atm_strike=25000, bars=[
            market_pb2.StrikeBar(strike=25000, moneyness_level=0, call=market_pb2.OptionLeg(oi=oi, iv=12.25))])],
    ).SerializeToString()


class Book:
    """compute(): the answer with the current ``oi``; raises Unavailable while ``down``."""

    def __init__(self) -> None:
        self.calls = 0
        self.oi = 1000
        self.down = False

    async def compute(self, _: object) -> bytes:
        self.calls += 1
        await asyncio.sleep(0.01)
        if self.down:
            raise Unavailable("PostgreSQL unavailable: test")
        return _answer(self.oi)


def _setup() -> tuple[ResponseCache, Generations, Method, Method, Book]:
    gens = Generations(["NIFTY"], None, 1.0)
    cache = ResponseCache(L1Cache(100, 1 << 20), None, gens, l1_ttl_s=60, l2_ttl_s=60, last_good_ttl_s=60,
                          compress_threshold=1024)
    book = Book()
    pb = Method("GetStrikeDistribution", lambda raw: (raw, ("NIFTY", 1), raw), book.compute, 6)
    js = Method.derived("GetStrikeDistributionJson", pb, json_renderer(q.GetStrikeDistributionResponse))
    return cache, gens, pb, js, book


def _json(body: bytes) -> dict[str, object]:
    hb = httpbody_pb2.HttpBody.FromString(body)
    assert hb.content_type == "application/json"
    return json.loads(hb.data)  # type: ignore[no-any-return]


async def test_one_computation_for_protobuf_and_json_misses() -> None:
    cache, gens, pb, js, book = _setup()
    out = await asyncio.gather(*[cache.serve(m, b"req") for m in [pb, js] * 10])
    assert book.calls == 1
    assert len(set(out[0::2])) == 1 and len(set(out[1::2])) == 1
    assert _json(out[1]) == json_format.MessageToDict(q.GetStrikeDistributionResponse.FromString(out[0]),
                                                      always_print_fields_with_no_presence=True,
                                                      preserving_proto_field_name=True)
    gens.apply_update("NIFTY", 1, 1)
    book.oi = 2000
    d = _json(await cache.serve(js, b"req"))
    assert book.calls == 2 and d["expiries"][0]["bars"][0]["call"]["oi"] == "2000"  # type: ignore[index]
    assert q.GetStrikeDistributionResponse.FromString(await cache.serve(pb, b"req")).expiries[0].bars[0].call.oi \
        == 2000 and book.calls == 2  # the JSON miss filled the protobuf entry


async def test_stale_json_is_the_sources_stale_answer_rendered() -> None:
    cache, gens, pb, js, book = _setup()
    await cache.serve(pb, b"req")  # only the protobuf answer is cached
    gens.apply_update("NIFTY", 1, 1)
    book.down = True
    d = _json(await cache.serve(js, b"req"))
    assert d["stale"] is True and d["underlying"] == "NIFTY"
    assert q.GetStrikeDistributionResponse.FromString(await cache.serve(pb, b"req")).stale
    with pytest.raises(Unavailable):
        await cache.serve(js, b"req", allow_stale=False)
    with pytest.raises(Unavailable):
        await cache.serve(js, b"other")  # nothing cached for that request
    book.down = False
    assert _json(await cache.serve(js, b"req"))["stale"] is False


def test_to_json_uses_the_gateways_print_options() -> None:
    msg = q.GetStrikeDistributionResponse.FromString(_answer(123_456))
    text = to_json(msg).decode()
    d = json.loads(text)
    assert d["timeframe"] == "TIMEFRAME_1M" and d["bucket_time"] == "2026-08-18T05:13:00Z"
    bar = d["expiries"][0]["bars"][0]
    assert bar["call"]["oi"] == "123456" and bar["moneyness_level"] == 0 and "put" not in bar
    assert bar["atm_strike"] == 0 and d["stale"] is False  # zero values printed, proto field names
    assert ": " not in text and ", " not in text
    assert json.loads(to_json(q.ListExpiriesResponse(underlying="ñ")).decode()) == {
        "underlying": "ñ", "expiries": [], "stale": False}
    assert "ñ" in to_json(q.ListExpiriesResponse(underlying="ñ")).decode()  # UTF-8, not \\u escapes
