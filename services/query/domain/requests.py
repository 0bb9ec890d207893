"""Validated, defaulted forms of the QueryService requests. Each ``validate_*`` takes plain values (the servicer
extracts them from the proto), collects every problem into one :class:`FieldViolations` (→ INVALID_ARGUMENT) and
raises :class:`NotFound` for an underlying that is not configured. Times (UTC, tz-aware) before :data:`MIN_TIME`
are violations."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from services.common.domain.timeframes import Timeframe
from services.common.errors import FieldViolations, NotFound

MAX_EXPIRIES = 6
DEFAULT_EXPIRIES = 3
DEFAULT_STRIKES_AROUND_ATM = 10
MAX_STRIKES_AROUND_ATM = 50
DEFAULT_LEVELS = 10
MAX_LEVELS = 50
DEFAULT_SERIES_SPAN = timedelta(hours=6)
MAX_SERIES_SPAN = timedelta(days=31)
DEFAULT_BARS_SPAN = timedelta(days=1)
MAX_BARS_SPAN = timedelta(days=366)
DEFAULT_PAGE_SIZE = 5000
MAX_PAGE_SIZE = 20000
#: Earliest time a request may name (no market data before; keeps the default ranges' arithmetic in range).
MIN_TIME = datetime(1970, 1, 1, tzinfo=UTC)

#: Indicator enum numbers (optmon.v1.Indicator) → leg field name.
INDICATOR_FIELDS: dict[int, str] = {
    1: "ltp", 2: "iv", 3: "delta", 4: "gamma", 5: "theta", 6: "vega", 7: "oi", 8: "oi_change", 9: "volume",
}
#: Indicator → bar column suffix (``ce_<suffix>`` / ``pe_<suffix>``).
INDICATOR_COLUMNS: dict[int, str] = {
    1: "close", 2: "iv", 3: "delta", 4: "gamma", 5: "theta", 6: "vega", 7: "oi", 8: "oi_change", 9: "volume",
}
CALL, PUT = 1, 2


@dataclass(frozen=True)
class DistributionQuery:
    """GetStrikeDistribution: ``expiries`` empty = nearest 3; ``indicators`` = selected indicator numbers."""

    underlying: str
    timeframe: Timeframe
    expiries: tuple[date, ...]
    n: int
    indicators: frozenset[int]
    as_of: datetime | None


@dataclass(frozen=True)
class SeriesQuery:
    """GetMoneynessSeries: ``start``/``end`` None = defaults resolved against the data."""

    underlying: str
    timeframe: Timeframe
    expiries: tuple[date, ...]
    indicator: int
    side: int
    levels: int
    start: datetime | None
    end: datetime | None


@dataclass(frozen=True)
class ChainQuery:
    """GetOptionChain."""

    underlying: str
    expiry: date | None
    as_of: datetime | None


@dataclass(frozen=True)
class BarsQuery:
    """ListBars: ``expiry`` None = the underlying's own bars. Times UTC; ``after`` = keyset resume point."""

    underlying: str
    timeframe: Timeframe
    expiry: date | None
    strike: float
    side: int
    start: datetime
    end: datetime
    page_size: int
    after: datetime | None


def check_underlying(underlying: str, configured: dict[str, float], fv: FieldViolations) -> str:
    """Upper-cased symbol; a violation when empty, NotFound when not configured (raised after other checks)."""
    u = underlying.strip().upper()
    if not u:
        fv.add("underlying", "required")
    return u


def _known(u: str, configured: dict[str, float]) -> None:
    if u and u not in configured:
        raise NotFound("UNKNOWN_UNDERLYING", f"unknown underlying {u!r}", underlying=u)


def parse_expiry(text: str, field: str, fv: FieldViolations) -> date | None:
    """``YYYY-MM-DD`` → date; a violation otherwise."""
    try:
        if len(text) != 10:
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        fv.add(field, f"must be a date YYYY-MM-DD, got {text!r}")
        return None


def _expiries(values: list[str], fv: FieldViolations) -> tuple[date, ...]:
    if len(values) > MAX_EXPIRIES:
        fv.add("expiries", f"at most {MAX_EXPIRIES} expiries, got {len(values)}")
    out: list[date] = []
    for i, v in enumerate(values):
        d = parse_expiry(v, f"expiries[{i}]", fv)
        if d is not None and d not in out:
            out.append(d)
    return tuple(out)


def _check_time(field: str, t: datetime | None, fv: FieldViolations) -> bool:
    """False (and a violation) for a time before MIN_TIME."""
    if t is not None and t < MIN_TIME:
        fv.add(field, f"must be at or after {MIN_TIME.isoformat()}, got {t.isoformat()}")
        return False
    return True


def _timeframe(value: int, default: Timeframe, fv: FieldViolations) -> Timeframe:
    if value == 0:
        return default
    try:
        return Timeframe(value)
    except ValueError:
        fv.add("timeframe", f"unknown timeframe {value}")
        return default


def validate_distribution(underlying: str, timeframe: int, expiries: list[str], n: int, indicators: list[int],
                          as_of: datetime | None, configured: dict[str, float]) -> DistributionQuery:
    """Defaults: 1M, nearest 3 expiries, N = 10 (1..50), every indicator, latest bucket."""
    fv = FieldViolations()
    u = check_underlying(underlying, configured, fv)
    tf = _timeframe(timeframe, Timeframe.M1, fv)
    exps = _expiries(expiries, fv)
    if n == 0:
        n = DEFAULT_STRIKES_AROUND_ATM
    elif not 1 <= n <= MAX_STRIKES_AROUND_ATM:
        fv.add("strikes_around_atm", f"must be in 1..{MAX_STRIKES_AROUND_ATM}, got {n}")
    inds: set[int] = set()
    for i, ind in enumerate(indicators):
        if ind == 0:
            continue
        if ind not in INDICATOR_FIELDS:
            fv.add(f"indicators[{i}]", f"unknown indicator {ind}")
        inds.add(ind)
    _check_time("as_of_time", as_of, fv)
    fv.raise_if_any()
    _known(u, configured)
    return DistributionQuery(u, tf, exps, n, frozenset(inds or INDICATOR_FIELDS), as_of)


def validate_series(underlying: str, timeframe: int, expiries: list[str], indicator: int, side: int, levels: int,
                    start: datetime | None, end: datetime | None, configured: dict[str, float]) -> SeriesQuery:
    """Defaults: 5M, nearest 3 expiries, IV, call, levels 10 (1..50; 0 = the default), end = latest bucket,
    start = end − 6 h. The range may not exceed 31 days, start must not be after end, times at or after
    MIN_TIME."""
    fv = FieldViolations()
    u = check_underlying(underlying, configured, fv)
    tf = _timeframe(timeframe, Timeframe.M5, fv)
    exps = _expiries(expiries, fv)
    if indicator == 0:
        indicator = 2
    elif indicator not in INDICATOR_FIELDS:
        fv.add("indicator", f"unknown indicator {indicator}")
    if side == 0:
        side = CALL
    elif side not in (CALL, PUT):
        fv.add("side", f"unknown option type {side}")
    if not 0 <= levels <= MAX_LEVELS:
        fv.add("levels", f"must be in 0..{MAX_LEVELS}, got {levels}")
    # proto3 cannot tell 0 from unset: 0 means "default 10"; use levels=0 ... only via the default.
    lv = levels or DEFAULT_LEVELS
    _check_time("start_time", start, fv)
    _check_time("end_time", end, fv)
    if start is not None and end is not None:
        if start > end:
            fv.add("start_time", "must not be after end_time")
        elif end - start > MAX_SERIES_SPAN:
            fv.add("end_time", f"range longer than {MAX_SERIES_SPAN.days} days")
    fv.raise_if_any()
    _known(u, configured)
    return SeriesQuery(u, tf, exps, indicator, side, lv, start, end)


def validate_chain(underlying: str, expiry: str, as_of: datetime | None,
                   configured: dict[str, float]) -> ChainQuery:
    """Default expiry: nearest with data (resolved against the data)."""
    fv = FieldViolations()
    u = check_underlying(underlying, configured, fv)
    exp = parse_expiry(expiry, "expiry", fv) if expiry else None
    _check_time("as_of_time", as_of, fv)
    fv.raise_if_any()
    _known(u, configured)
    return ChainQuery(u, exp, as_of)


def validate_bars(underlying: str, timeframe: int, expiry: str, strike: float, side: int,
                  start: datetime | None, end: datetime | None, page_size: int, after: datetime | None,
                  now: datetime, configured: dict[str, float]) -> BarsQuery:
    """Defaults: 1M, end = now, start = end − 1 day (≤ 366 days), page size 5000 (1..20000); times at or after
    MIN_TIME. A contract needs expiry, a strike > 0 and a side (a strike without bars answers ``no_data``); the
    underlying's own bars need none of them."""
    fv = FieldViolations()
    u = check_underlying(underlying, configured, fv)
    tf = _timeframe(timeframe, Timeframe.M1, fv)
    exp = parse_expiry(expiry, "expiry", fv) if expiry else None
    if exp is not None or expiry:
        if side not in (CALL, PUT):
            fv.add("option_type", "OPTION_TYPE_CALL or OPTION_TYPE_PUT required with expiry")
        if not strike > 0:
            fv.add("strike", "must be > 0 with expiry")
    elif side not in (0,) or strike:
        fv.add("expiry", "required with strike / option_type")
    if page_size == 0:
        page_size = DEFAULT_PAGE_SIZE
    elif not 1 <= page_size <= MAX_PAGE_SIZE:
        fv.add("page_size", f"must be in 1..{MAX_PAGE_SIZE}, got {page_size}")
    start_ok = _check_time("start_time", start, fv)
    end_ok = _check_time("end_time", end, fv)
    end_t = end or now
    start_t = start or end_t
    if start_ok and end_ok:  # (the default start's arithmetic needs end_t in range)
        start_t = start or end_t - DEFAULT_BARS_SPAN
        if start_t > end_t:
            fv.add("start_time", "must not be after end_time")
        elif end_t - start_t > MAX_BARS_SPAN:
            fv.add("end_time", f"range longer than {MAX_BARS_SPAN.days} days")
    fv.raise_if_any()
    _known(u, configured)
    return BarsQuery(u, tf, exp, float(strike), side, start_t, end_t, page_size, after)
