"""The read views: validated queries (``domain.requests``) → PostgreSQL (``store.pg``) → response messages.

Strikes without a bar in the chosen bucket (strike distribution and option chain): a strike is *listed* at a bucket
when it has a bar in the last ``carry_buckets`` buckets up to and including it; it is shown with that newest bar
(its own ``bucket_time`` tells it was carried). The same rule applies to the latest bucket and to ``as_of_time``.
The ATM strike of an expiry is the listed strike nearest the underlying close of the bucket; the shown
``moneyness_level``/``atm_strike`` of every strike are relative to that ATM.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from optmon.v1 import market_pb2
from optmon.v1 import query_service_pb2 as q_pb2

from services.common.domain.moneyness import atm_strike, moneyness_label, moneyness_level
from services.common.domain.timeframes import Timeframe
from services.common.errors import FieldViolations, NotFound
from services.query.domain import analytics, pagetoken
from services.query.domain.requests import (
    DEFAULT_EXPIRIES,
    DEFAULT_SERIES_SPAN,
    INDICATOR_FIELDS,
    MAX_SERIES_SPAN,
    BarsQuery,
    ChainQuery,
    DistributionQuery,
    SeriesQuery,
)
from services.query.domain.selection import nearest_expiries, order_expiries, window
from services.query.store.pg import PgStore, ist_date, session_start

_ALL = frozenset(INDICATOR_FIELDS)


def _ts(dt: datetime) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    t = Timestamp()
    t.FromDatetime(dt)
    return t


def leg(row: Any, s: str, inds: frozenset[int]) -> market_pb2.OptionLeg | None:
    """One side (``s`` = "ce"/"pe") of a bar row as an OptionLeg with only the selected indicators; None when the
    side has no data."""
    close = row[f"{s}_close"]
    if close is None:
        return None
    kw: dict[str, Any] = {}
    if 1 in inds:
        kw.update(ltp=close, open=row[f"{s}_open"], high=row[f"{s}_high"], low=row[f"{s}_low"])
    for ind, name, col in ((2, "iv", "iv"), (3, "delta", "delta"), (4, "gamma", "gamma"), (5, "theta", "theta"),
                           (6, "vega", "vega"), (7, "oi", "oi"), (8, "oi_change", "oi_change"),
                           (9, "volume", "volume")):
        if ind in inds:
            kw[name] = row[f"{s}_{col}"]
    return market_pb2.OptionLeg(**{k: v for k, v in kw.items() if v is not None})


def _group_listed(rows: Iterable[Any]) -> dict[date, list[float]]:
    listed: dict[date, list[float]] = defaultdict(list)
    for r in rows:
        listed[r["expiry"]].append(float(r["strike"]))
    return listed


async def _check_expiries(conn: Any, u: str, wanted: Iterable[date]) -> None:
    known = set(await PgStore.expiries(conn, u))
    for e in wanted:
        if e not in known:
            raise NotFound("UNKNOWN_EXPIRY", f"no data for {u} expiry {e.isoformat()}", underlying=u,
                           expiry=e.isoformat())


async def strike_distribution(store: PgStore, q: DistributionQuery, step: float,
                              carry: int) -> q_pb2.GetStrikeDistributionResponse:
    """GetStrikeDistribution (see module doc for carried strikes). NotFound for no data / unknown expiry."""

    async def work(conn: Any) -> q_pb2.GetStrikeDistributionResponse:
        b = await store.bucket_at(conn, q.underlying, q.timeframe, q.as_of)
        if b is None:
            raise NotFound("NO_DATA", f"no {q.timeframe.label} data for {q.underlying}", underlying=q.underlying)
        bucket, price = b
        lo = bucket - timedelta(seconds=carry * q.timeframe.seconds)
        listed = _group_listed(await store.listed(conn, q.underlying, q.timeframe, lo, bucket,
                                                  list(q.expiries) or None))
        if q.expiries:
            missing = [e for e in q.expiries if e not in listed]
            if missing:
                await _check_expiries(conn, q.underlying, missing)
            expiries = list(q.expiries)
        else:
            expiries = nearest_expiries(listed, ist_date(bucket), DEFAULT_EXPIRIES)
        windows: dict[date, tuple[float, dict[float, int]]] = {}
        strikes: set[float] = set()
        for e in expiries:
            if listed.get(e):
                atm, win = window(listed[e], price, step, q.n)
                windows[e] = (atm, dict(win))
                strikes.update(s for s, _ in win)
        rows = await store.snapshot(conn, q.underlying, q.timeframe, lo, bucket, list(windows), sorted(strikes))
        by_exp: dict[date, list[Any]] = defaultdict(list)
        for r in rows:
            w = windows[r["expiry"]][1]
            if float(r["strike"]) in w:
                by_exp[r["expiry"]].append(r)
        resp = q_pb2.GetStrikeDistributionResponse(
            underlying=q.underlying, timeframe=int(q.timeframe),  # type: ignore[arg-type]
            bucket_time=_ts(bucket), underlying_price=price)
        inds = q.indicators
        for e in expiries:
            atm, w = windows.get(e, (0.0, {}))
            ed = resp.expiries.add(expiry=e.isoformat(), atm_strike=atm)
            es = e.isoformat()
            for r in by_exp.get(e, ()):
                strike = float(r["strike"])
                sb = ed.bars.add(underlying=q.underlying, expiry=es, strike=strike, timeframe=int(q.timeframe),
                                 underlying_close=r["underlying_close"] or 0.0, moneyness_level=w[strike],
                                 atm_strike=atm)
                sb.bucket_time.FromDatetime(r["bucket_time"])
                c = leg(r, "ce", inds)
                if c is not None:
                    sb.call.CopyFrom(c)
                p = leg(r, "pe", inds)
                if p is not None:
                    sb.put.CopyFrom(p)
        return resp

    return await store.run(work)


async def moneyness_series(store: PgStore, q: SeriesQuery) -> q_pb2.GetMoneynessSeriesResponse:
    """GetMoneynessSeries from the stored moneyness_level (one SQL GROUP BY). Defaults resolved against the data."""

    async def work(conn: Any) -> q_pb2.GetMoneynessSeriesResponse:
        end = q.end
        if end is None:
            end = await store.latest_bucket(conn, q.underlying, q.timeframe)
            if end is None:
                raise NotFound("NO_DATA", f"no {q.timeframe.label} data for {q.underlying}", underlying=q.underlying)
        start = q.start or end - DEFAULT_SERIES_SPAN
        if start > end or end - start > MAX_SERIES_SPAN:
            fv = FieldViolations()
            fv.add("start_time", f"must be ≤ end_time ({end.isoformat()}) and within {MAX_SERIES_SPAN.days} days")
            raise fv
        known = await store.expiries(conn, q.underlying)
        if not known:
            raise NotFound("NO_DATA", f"no data for {q.underlying}", underlying=q.underlying)
        if q.expiries:
            await _check_expiries(conn, q.underlying, q.expiries)
            expiries = list(q.expiries)
        else:
            expiries = nearest_expiries(known, ist_date(end), DEFAULT_EXPIRIES)
        rows = await store.moneyness_series(conn, q.underlying, q.timeframe, expiries, q.indicator, q.side,
                                            q.levels, start, end)
        resp = q_pb2.GetMoneynessSeriesResponse(
            underlying=q.underlying, timeframe=int(q.timeframe), indicator=q.indicator,  # type: ignore[arg-type]
            side=q.side, start_time=_ts(start), end_time=_ts(end))  # type: ignore[arg-type]
        order = {e: i for i, e in enumerate(expiries)}
        is_call = q.side == 1
        for r in sorted(rows, key=lambda r: (order[r["expiry"]], r["level"])):
            resp.series.add(expiry=r["expiry"].isoformat(), level=r["level"],
                            label=moneyness_label(r["level"], is_call), times=r["times"], values=r["vals"],
                            strikes=r["strikes"])
        return resp

    return await store.run(work)


async def option_chain(store: PgStore, q: ChainQuery, step: float, carry: int,
                       iv_days: int) -> q_pb2.GetOptionChainResponse:
    """GetOptionChain on 1-minute bars: rows, ΔOI since the session's first bar, PCR, max pain, straddle, IV rank."""

    async def work(conn: Any) -> q_pb2.GetOptionChainResponse:
        tf = Timeframe.M1
        b = await store.bucket_at(conn, q.underlying, tf, q.as_of)
        if b is None:
            raise NotFound("NO_DATA", f"no data for {q.underlying}", underlying=q.underlying)
        bucket, price = b
        lo = bucket - timedelta(seconds=carry * tf.seconds)
        if q.expiry is not None:
            expiry = q.expiry
            listed = _group_listed(await store.listed(conn, q.underlying, tf, lo, bucket, [expiry]))
            if expiry not in listed:
                await _check_expiries(conn, q.underlying, [expiry])
                raise NotFound("NO_DATA", f"no data for {q.underlying} {expiry} at {bucket.isoformat()}",
                               underlying=q.underlying, expiry=expiry.isoformat())
        else:
            listed = _group_listed(await store.listed(conn, q.underlying, tf, lo, bucket, None))
            expiry = nearest_expiries(listed, ist_date(bucket), 1)[0]
        strikes = listed[expiry]
        atm = atm_strike(strikes, price)
        rows = await store.snapshot(conn, q.underlying, tf, lo, bucket, [expiry], strikes)
        base = {float(r["strike"]): r for r in await store.first_oi(conn, q.underlying, expiry, strikes,
                                                                     session_start(bucket), bucket)}
        resp = q_pb2.GetOptionChainResponse(
            underlying=q.underlying, expiry=expiry.isoformat(), bucket_time=_ts(bucket), underlying_price=price,
            atm_strike=atm, iv_history_days=iv_days)
        ks, c_oi, p_oi = [], [], []
        c_vol = p_vol = 0
        atm_row = None
        for r in rows:
            k = float(r["strike"])
            row = resp.rows.add(strike=k, moneyness_level=moneyness_level(k, atm, step))
            for s, target, oi0 in (("ce", row.call, "ce_oi0"), ("pe", row.put, "pe_oi0")):
                if r[f"{s}_close"] is None:
                    continue
                oi = r[f"{s}_oi"]
                kw = dict(ltp=r[f"{s}_close"], open=r[f"{s}_open"], high=r[f"{s}_high"], low=r[f"{s}_low"],
                          iv=r[f"{s}_iv"], delta=r[f"{s}_delta"], gamma=r[f"{s}_gamma"], theta=r[f"{s}_theta"],
                          vega=r[f"{s}_vega"], oi=oi, volume=r[f"{s}_day_volume"])
                b0 = base.get(k)
                if oi is not None and b0 is not None and b0[oi0] is not None:
                    kw["oi_change"] = oi - b0[oi0]
                    kw["oi_change_percent"] = analytics.oi_change_percent(oi - b0[oi0], b0[oi0])
                target.CopyFrom(market_pb2.OptionLeg(**{a: v for a, v in kw.items() if v is not None}))
            ks.append(k)
            c_oi.append(r["ce_oi"] or 0)
            p_oi.append(r["pe_oi"] or 0)
            c_vol += r["ce_day_volume"] or 0
            p_vol += r["pe_day_volume"] or 0
            if k == atm:
                atm_row = r
        resp.total_call_oi = sum(c_oi)
        resp.total_put_oi = sum(p_oi)
        resp.pcr_oi = analytics.pcr(resp.total_put_oi, resp.total_call_oi)
        resp.pcr_volume = analytics.pcr(p_vol, c_vol)
        if ks:
            resp.max_pain_strike = analytics.max_pain(ks, c_oi, p_oi)
        if atm_row is not None:
            resp.atm_straddle_price = (atm_row["ce_close"] or 0.0) + (atm_row["pe_close"] or 0.0)
            iv = analytics.atm_iv(atm_row["ce_iv"], atm_row["pe_iv"])
            if iv is not None:
                resp.atm_iv = iv
                h = await store.atm_iv_history(conn, q.underlying, expiry, bucket - timedelta(days=iv_days),
                                               bucket, iv)
                if h["n"]:
                    resp.iv_rank = analytics.iv_rank(iv, h["lo"], h["hi"])
                    resp.iv_percentile = analytics.iv_percentile(h["below"], h["n"])
        return resp

    return await store.run(work)


def _us(dt: datetime) -> int:
    return int(dt.timestamp() * 1_000_000)


def _from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC)


async def list_bars(store: PgStore, q: BarsQuery, token: str, fp: int) -> q_pb2.ListBarsResponse:
    """ListBars page. ``token`` the request's page_token ('' first page); ``fp`` the query fingerprint it must
    carry. The range end resolved on the first page travels in the token so later pages are stable."""
    end, after = q.end, None
    if token:
        try:
            tok = pagetoken.decode(token)
        except ValueError as e:
            fv = FieldViolations()
            fv.add("page_token", str(e))
            raise fv from None
        if tok.fingerprint != fp:
            fv = FieldViolations()
            fv.add("page_token", "does not belong to this query")
            raise fv
        end, after = _from_us(tok.end_us), _from_us(tok.after_us)

    async def work(conn: Any) -> q_pb2.ListBarsResponse:
        if q.expiry is not None:
            r = await store.contract_bars(conn, q.underlying, q.timeframe, q.expiry, q.strike, q.side, after,
                                          q.start, end, q.page_size + 1)
            if r["t"] is None and not token:
                await _check_expiries(conn, q.underlying, [q.expiry])
        else:
            r = await store.underlying_bars(conn, q.underlying, q.timeframe, after, q.start, end, q.page_size + 1)
        resp = q_pb2.ListBarsResponse()
        t = r["t"]
        if not t:
            resp.s = "no_data"
            return resp
        n = min(len(t), q.page_size)
        resp.s = "ok"
        resp.t.extend(t[:n])
        resp.o.extend(r["o"][:n])
        resp.h.extend(r["h"][:n])
        resp.l.extend(r["l"][:n])
        resp.c.extend(r["c"][:n])
        if q.expiry is not None:
            resp.v.extend(r["v"][:n])
            resp.oi.extend(r["oi"][:n])
            resp.iv.extend(r["iv"][:n])
        else:
            resp.v.extend([0] * n)
            resp.oi.extend([0] * n)
            resp.iv.extend([0.0] * n)
        if len(t) > q.page_size:
            resp.next_page_token = pagetoken.encode(pagetoken.PageToken(t[n - 1] * 1_000_000, _us(end), fp))
        return resp

    return await store.run(work)


async def list_expiries(store: PgStore, u: str) -> q_pb2.ListExpiriesResponse:
    """Expiries with data, nearest first (live ascending, then expired newest first). NotFound without data."""

    async def work(conn: Any) -> q_pb2.ListExpiriesResponse:
        exps = await store.expiries(conn, u)
        if not exps:
            raise NotFound("NO_DATA", f"no data for {u}", underlying=u)
        latest = await store.latest_bucket(conn, u, Timeframe.M1)
        today = ist_date(latest) if latest else datetime.now(UTC).date()
        return q_pb2.ListExpiriesResponse(underlying=u, expiries=[e.isoformat() for e in order_expiries(exps, today)])

    return await store.run(work)


async def list_underlyings(store: PgStore, steps: dict[str, float]) -> q_pb2.ListUnderlyingsResponse:
    """Configured underlyings that have data, alphabetical, with the latest 1M bucket and price."""

    async def work(conn: Any) -> q_pb2.ListUnderlyingsResponse:
        rows = await store.underlyings(conn, sorted(steps))
        resp = q_pb2.ListUnderlyingsResponse()
        for r in rows:
            resp.underlyings.add(underlying=r["underlying"], price=r["price"] or 0.0, bucket_time=_ts(r["bucket_time"]),
                                 strike_step=steps[r["underlying"]])
        return resp

    return await store.run(work)
