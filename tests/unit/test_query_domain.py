"""Pure query logic: analytics formulas, expiry/strike selection, page tokens, request validation, cache parts."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta

import pytest
from optmon.v1 import query_service_pb2 as q

from services.common.errors import FieldViolations, NotFound
from services.query.cache.core import Method, ResponseCache, stale_suffix
from services.query.cache.generations import ALL, Generations
from services.query.cache.l1 import Entry, L1Cache
from services.query.domain import analytics, pagetoken
from services.query.domain.requests import (
    MIN_TIME,
    validate_bars,
    validate_chain,
    validate_distribution,
    validate_series,
)
from services.query.domain.selection import nearest_expiries, order_expiries, window
from services.query.server import build_app
from services.query.settings import QuerySettings

STEPS = {"NIFTY": 50.0}


def test_max_pain_pcr_iv_rank() -> None:
    ks = [100.0, 110.0, 120.0]
    # payout at 100: puts 4·10 + 1·20 = 60; at 110: calls 5·10 + put 1·10 = 60 (tie → lower); at 120: 100
    assert analytics.max_pain(ks, [5, 0, 0], [0, 4, 1]) == 100.0
    assert analytics.max_pain(ks, [0, 0, 0], [0, 0, 3]) == 120.0
    assert analytics.pcr(30, 20) == 1.5 and analytics.pcr(3, 0) == 0.0
    assert analytics.iv_rank(15, 10, 20) == 50.0 and analytics.iv_rank(15, 15, 15) == 0.0
    assert analytics.iv_percentile(3, 4) == 75.0 and analytics.iv_percentile(0, 0) == 0.0
    assert analytics.atm_iv(10.0, None) == 10.0 and analytics.atm_iv(10.0, 12.0) == 11.0
    assert analytics.oi_change_percent(5, 0) is None and analytics.oi_change_percent(5, 50) == 10.0
    with pytest.raises(ValueError):
        analytics.max_pain([], [], [])


def test_selection() -> None:
    d = [date(2026, 8, 11), date(2026, 8, 18), date(2026, 8, 25), date(2026, 9, 1), date(2026, 9, 8)]
    assert nearest_expiries(d, date(2026, 8, 18), 3) == d[1:4]
    assert nearest_expiries(d, date(2026, 9, 5), 3) == [d[2], d[3], d[4]]
    assert order_expiries(d, date(2026, 8, 20)) == [d[2], d[3], d[4], d[1], d[0]]
    atm, win = window([100.0, 150.0, 200.0, 250.0, 300.0], 226.0, 50.0, 1)
    assert atm == 250.0 and win == [(200.0, -1), (250.0, 0), (300.0, 1)]


def test_page_token_roundtrip_and_malformed() -> None:
    tok = pagetoken.PageToken(1_787_000_000_000_000, 1_787_100_000_000_000, pagetoken.fingerprint("NIFTY", 1))
    assert pagetoken.decode(pagetoken.encode(tok)) == tok
    for bad in ("", "abc", "!!!!", pagetoken.encode(tok)[:-2]):
        with pytest.raises(ValueError):
            pagetoken.decode(bad)


def test_validation_collects_every_violation() -> None:
    with pytest.raises(FieldViolations) as ei:
        validate_distribution("NIFTY", 7, ["x"] * 7, 99, [3, 10], None, STEPS)
    fields = {f for f, _ in ei.value.violations}
    assert {"timeframe", "expiries", "expiries[0]", "strikes_around_atm", "indicators[1]"} <= fields
    with pytest.raises(NotFound):
        validate_distribution("SENSEX", 0, [], 0, [], None, STEPS)
    qd = validate_distribution("nifty", 0, [], 0, [], None, STEPS)
    assert qd.underlying == "NIFTY" and qd.n == 10 and len(qd.indicators) == 9 and qd.timeframe == 1
    qs = validate_series("NIFTY", 0, [], 0, 0, 0, None, None, STEPS)
    assert (qs.timeframe, qs.indicator, qs.side, qs.levels) == (2, 2, 1, 10)
    now = datetime(2026, 8, 18, 10, tzinfo=UTC)
    qb = validate_bars("NIFTY", 0, "", 0.0, 0, None, None, 0, None, now, STEPS)
    assert qb.start == now - timedelta(days=1) and qb.page_size == 5000 and qb.expiry is None
    # times before 1970 are violations, reported with the others; the default range is not computed from them
    year1 = datetime(1, 1, 1, tzinfo=UTC)
    with pytest.raises(FieldViolations) as ei:
        validate_bars("NIFTY", 0, "", 0.0, 0, None, year1, 30_000, None, now, STEPS)
    assert {f for f, _ in ei.value.violations} == {"end_time", "page_size"}
    with pytest.raises(FieldViolations) as ei:
        validate_series("NIFTY", 0, [], 0, 0, 60, year1, None, STEPS)
    assert {f for f, _ in ei.value.violations} == {"start_time", "levels"}
    with pytest.raises(FieldViolations):
        validate_distribution("NIFTY", 0, [], 0, [], datetime(1969, 12, 31, tzinfo=UTC), STEPS)
    assert validate_chain("NIFTY", "", MIN_TIME, STEPS).as_of == MIN_TIME


async def test_stale_suffix_overrides_field_of_every_view() -> None:
    """Every view's answer served while PostgreSQL is down carries stale=true: the servicer's method knows the
    response's `stale` field and the appended suffix sets it without touching the rest of the answer."""
    samples = {
        "GetStrikeDistribution": q.GetStrikeDistributionResponse(underlying="NIFTY", underlying_price=24150.5),
        "GetMoneynessSeries": q.GetMoneynessSeriesResponse(underlying="NIFTY", series=[q.MoneynessSeries(level=1)]),
        "GetOptionChain": q.GetOptionChainResponse(underlying="NIFTY", pcr_oi=1.25),
        "ListBars": q.ListBarsResponse(s="ok", t=[1_787_029_980], c=[101.5], next_page_token="x"),
        "ListExpiries": q.ListExpiriesResponse(underlying="NIFTY", expiries=["2026-08-25"]),
        "ListUnderlyings": q.ListUnderlyingsResponse(underlyings=[q.UnderlyingInfo(underlying="NIFTY", price=1.5)]),
    }
    app = build_app(QuerySettings(query_port=0))  # no I/O: nothing connects
    try:
        plain = {n: m for n, m in app.servicer.methods.items() if m.source is None}
        assert set(plain) == set(samples)
        for name, msg in samples.items():
            out = type(msg).FromString(msg.SerializeToString() + stale_suffix(plain[name].stale_field))
            assert out.stale, name
            out.stale = False
            assert out == msg, name
    finally:
        await app.gate.close()


def test_l1_bounds() -> None:
    c = L1Cache(max_entries=3, max_bytes=100)
    for i in range(5):
        c.put(i, Entry(b"x" * 10, ("NIFTY", 1), (0, 0), 1e18))
    assert len(c) == 3 and c.get(0) is None and c.get(4) is not None
    c.put("big", Entry(b"x" * 95, ("NIFTY", 1), (0, 0), 1e18))
    assert c.bytes <= 100 and c.get("big") is not None and len(c) == 1
    c.put("huge", Entry(b"x" * 101, ("NIFTY", 1), (0, 0), 1e18))
    assert c.get("huge") is None


def test_generations() -> None:
    g = Generations(["NIFTY", "BANKNIFTY"], None, 1.0)
    t0 = g.token(("NIFTY", 1))
    assert g.apply_update("NIFTY", 5, 1) and g.token(("NIFTY", 1)) != t0
    assert g.token(("NIFTY", 2)) == t0  # 5M untouched by a 1M update
    assert not g.apply_update("NIFTY", 4, 1)  # old
    all0 = g.token((ALL, 0))
    assert g.observe_seq("NIFTY", 7)  # newer than consumed: every timeframe bumped at once
    assert g.token(("NIFTY", 2)) != t0 and g.token((ALL, 0)) != all0
    e = g.epoch
    assert g.observe_seq("NIFTY", 1) and g.epoch == e + 1  # Redis lost its state


async def test_single_flight_one_computation_for_concurrent_misses() -> None:
    calls = 0

    async def compute(_: object) -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return b"answer"

    gens = Generations(["NIFTY"], None, 1.0)
    cache = ResponseCache(L1Cache(10, 1000), None, gens, l1_ttl_s=60, l2_ttl_s=60, last_good_ttl_s=60,
                          compress_threshold=10)
    m = Method("M", lambda raw: (raw, ("NIFTY", 1), raw), compute)
    out = await asyncio.gather(*[cache.serve(m, b"req") for _ in range(20)])
    assert out == [b"answer"] * 20 and calls == 1
    await cache.serve(m, b"req")
    assert calls == 1  # L1
    gens.apply_update("NIFTY", 1, 1)
    await cache.serve(m, b"req")
    assert calls == 2  # new generation


def test_sql_is_parameterized_and_identifiers_come_from_whitelists() -> None:
    """Every statement of the query store: values travel as $n parameters; the only text spliced into SQL is a bar
    table (``Timeframe.table``), the fixed column list ``BAR_SELECT`` or a leg column from the fixed maps."""
    import ast
    import re
    from pathlib import Path

    from services.common.domain.timeframes import Timeframe
    from services.query.store import pg

    tree = ast.parse(Path(pg.__file__).read_text())
    spliced: set[str] = set()
    statements = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "fetch", "fetchrow", "fetchval", "execute"):
            statements += 1
            sql = node.args[0]
            assert isinstance(sql, ast.Constant | ast.JoinedStr), ast.unparse(sql)
            if isinstance(sql, ast.JoinedStr):
                spliced |= {ast.unparse(v.value) for v in sql.values if isinstance(v, ast.FormattedValue)}
    assert statements >= 12
    assert spliced <= {"tf.table", "BAR_SELECT", "col", "s"}, spliced
    # where `col` / `s` come from: the fixed maps only
    sources = {ast.unparse(n.targets[0]): ast.unparse(n.value) for n in ast.walk(tree)
               if isinstance(n, ast.Assign) and len(n.targets) == 1 and ast.unparse(n.targets[0]) in ("col", "s")}
    assert sources == {"col": "f'{_SIDE[side]}_{_VALUE_COLS[indicator]}'", "s": "_SIDE[side]"}, sources
    ident = re.compile(r"^[a-z][a-z0-9_]*$")
    assert {tf.table for tf in Timeframe} == {"bars_1m", "bars_5m", "bars_15m", "bars_1h"}
    assert all(ident.match(v) for v in [*pg._SIDE.values(), *pg._VALUE_COLS.values(), *pg.LEG_COLUMNS])
    assert all(ident.match(c.strip()) for c in pg.BAR_SELECT.split(","))


def test_resp3_parser_of_the_seq_watch_set_up() -> None:
    from services.query.cache.seqwatch import RespError, parse_resp3

    hello = (b"%3\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n$7\r\nmodules\r\n*0\r\n")
    assert parse_resp3(hello) == (["server", "redis", "proto", 3, "modules", []], len(hello))
    for cut in range(len(hello)):
        assert parse_resp3(hello[:cut]) is None  # incomplete
    err = parse_resp3(b"-ERR unknown command 'HELLO'\r\n")
    assert err is not None and isinstance(err[0], RespError)
    push = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$16\r\noptmon:seq:NIFTY\r\n"
    assert parse_resp3(b"+OK\r\n" + push, 5) == (["invalidate", ["optmon:seq:NIFTY"]], len(push) + 5)
    assert parse_resp3(b"_\r\n#t\r\n,1.5\r\n|1\r\n+a\r\n+b\r\n:7\r\n", 3)[0] == "t"  # type: ignore[index]
    assert parse_resp3(b"|1\r\n+a\r\n+b\r\n:7\r\n") == (7, 16)  # an attribute is skipped
    with pytest.raises(ValueError):
        parse_resp3(b"?what\r\n")
