"""Readers of the shared-data option-chain formats, yielding one :class:`Snapshot` (a ``TickBatch``) per source
timestamp and underlying, in time order.

Formats (detected from the header by :func:`detect_format`; see docs/replay.md):

``nse-oc-1min``
    NSE option-chain minute snapshots (``nifty-oc-1min-2026-08``): one row per contract and minute, columns
    ``ts_ist, symbol, expiry, strike, option_type, spot, ltp, volume, oi, oi_chg, iv, delta, gamma, theta, vega, rho``.
    Volume and OI are already in contracts, IV in percent, Greeks present. ``exchange_time`` = ``ts_ist`` in UTC;
    one ``UnderlyingTick`` (``spot``) per snapshot.
``kite-oc-5min``
    Zerodha Kite quote snapshots (``nse-index-oc-5min-2026-01``): one row per strike with CE and PE side by side,
    several underlyings per file, OI and volume in **units** (divided here by the lot size), no IV, ``timestamp`` the
    collector's IST wall clock. An untraded side (LTP 0 and OI 0) yields no tick (a snapshot left without any
    tick, like the all-zero first one of 27 Jan, is skipped). ``Spot`` 0 (always for MIDCPNIFTY)
    is replaced by a put-call-parity estimate (:func:`parity_spot`).
``kite-ticks``
    Raw Kite "full" WebSocket ticks of one contract, JSON Lines (``banknifty-ticks-2021-08-20``); the contract comes
    from the file name (``BANKNIFTY21SEP35300CE_...``). Volume/OI in units, divided by the lot size of the file's
    era (``KITE_TICKS_LOT_SIZES`` by year, else the configured lot size).

Bad input: a row that cannot be turned into ticks (bad number, wrong field count, unknown option type, bad date or
time, unknown underlying, units that are not a multiple of the lot size) is reported through ``on_error`` as a
:class:`SourceError` (file, 1-based physical line, reason), counted and skipped; reading goes on. Semantic checks
(LTP > 0, strike on the grid, IV range, ...) are ingest's job: values are passed through unchanged.
"""

from __future__ import annotations

import csv
import gzip
import heapq
import io
import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import IO

import structlog
from google.protobuf.timestamp_pb2 import Timestamp
from optmon.v1 import market_pb2

from services.common.logging import get_logger
from services.common.settings import DEFAULT_LOT_SIZES


def _log() -> structlog.stdlib.BoundLogger:
    """The module's logger, built at each use so that it follows ``configure_logging`` called later."""
    return get_logger("replay.sources")


#: IST offset from UTC.
IST = timedelta(hours=5, minutes=30)
IST_TZ = timezone(IST, "IST")

NSE_OC_1MIN = "nse-oc-1min"
KITE_OC_5MIN = "kite-oc-5min"
KITE_TICKS = "kite-ticks"
#: Every format :func:`detect_format` knows.
FORMATS = (NSE_OC_1MIN, KITE_OC_5MIN, KITE_TICKS)

#: Columns each CSV format needs (others are ignored).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    NSE_OC_1MIN: ("ts_ist", "symbol", "expiry", "strike", "option_type", "ltp", "volume", "oi"),
    KITE_OC_5MIN: ("Symbol", "Expiry", "Strike", "CE_LTP", "CE_OI", "CE_Volume", "PE_LTP", "PE_OI", "PE_Volume",
                   "Spot", "timestamp"),
}

#: Risk-free rate (annual, continuous) used to discount the strike in the put-call-parity spot estimate.
PARITY_RATE = 0.065

#: Lot sizes of the past, by underlying and year, for raw tick files (NSE revises lot sizes; BANKNIFTY was 25 in 2021).
KITE_TICKS_LOT_SIZES: dict[tuple[str, int], int] = {("BANKNIFTY", 2021): 25, ("NIFTY", 2021): 50}

_CALL = market_pb2.OPTION_TYPE_CALL
_PUT = market_pb2.OPTION_TYPE_PUT
_OPTION_TYPES = {"CE": _CALL, "PE": _PUT, "CALL": _CALL, "PUT": _PUT, "C": _CALL, "P": _PUT}


@dataclass(frozen=True)
class Snapshot:
    """All ticks of one underlying at one source timestamp.

    ``time``: UTC, tz-aware, the source timestamp (exchange or collector time). ``underlying``: index symbol, upper
    case. ``batch``: the option ticks (prices ₹, strikes index points, volume/OI contracts, IV percent) plus, when
    known, one ``UnderlyingTick``; every tick's ``exchange_time`` equals ``time``. Treat ``batch`` as read-only.
    """

    time: datetime
    underlying: str
    batch: market_pb2.TickBatch


@dataclass(frozen=True)
class SourceError:
    """A malformed row: ``file`` (path as given), ``line`` (1-based physical line, the header is line 1; 0 for the
    whole file), ``reason`` (human-readable, names the column and the bad value)."""

    file: str
    line: int
    reason: str


class UnknownFormat(ValueError):
    """The file's header matches no known format (the message names the missing columns of the nearest format)."""


@dataclass
class ErrorLog:
    """A ready ``on_error`` callback: counts :class:`SourceError`s, logs the first ``log_limit`` of them as
    warnings and keeps the first ``keep`` for inspection."""

    log_limit: int = 50
    keep: int = 1000
    count: int = 0
    errors: list[SourceError] = field(default_factory=list)

    def __call__(self, err: SourceError) -> None:
        self.count += 1
        if len(self.errors) < self.keep:
            self.errors.append(err)
        if self.count <= self.log_limit:
            _log().warning("replay_bad_row", file=err.file, line=err.line, reason=err.reason)
        elif self.count == self.log_limit + 1:
            _log().warning("replay_bad_row_log_limit", limit=self.log_limit)


# --------------------------------------------------------------------------------------------------- helpers


def _open_text(path: Path) -> IO[str]:
    """Open ``.csv``/``.jsonl`` or their ``.gz`` as text (UTF-8, BOM tolerated, newline='' for csv)."""
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return path.open("r", encoding="utf-8-sig", newline="")


def _data_files(directory: Path) -> list[Path]:
    """The data files of a directory (``*.csv``, ``*.csv.gz``, ``*.jsonl``, ``*.jsonl.gz``), sorted by name."""
    exts = (".csv", ".csv.gz", ".jsonl", ".jsonl.gz")
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(exts))


def _first_line(path: Path) -> str:
    with _open_text(path) as f:
        return f.readline()


def detect_format(path: Path) -> str:
    """The format of a file (or of the first data file of a directory), from its header: ``"nse-oc-1min"``,
    ``"kite-oc-5min"`` or ``"kite-ticks"``.

    Raises :class:`UnknownFormat` (a ValueError) when the header matches none (naming the missing columns of the
    closest format), FileNotFoundError when the path or a directory's data files do not exist.
    """
    path = Path(path)
    if path.is_dir():
        files = _data_files(path)
        if not files:
            raise FileNotFoundError(f"{path}: no .csv/.csv.gz/.jsonl/.jsonl.gz files")
        path = files[0]
    first = _first_line(path).strip()
    if first.startswith("{"):
        try:
            obj = json.loads(first)
        except ValueError as e:
            raise UnknownFormat(f"{path}: first line is not JSON: {e}") from None
        if isinstance(obj, dict) and {"instrument_token", "last_price", "timestamp"} <= obj.keys():
            return KITE_TICKS
        raise UnknownFormat(f"{path}: JSON lines without instrument_token/last_price/timestamp")
    header = set(next(csv.reader([first]), []))
    best, best_missing = "", list[str]()
    for fmt, cols in REQUIRED_COLUMNS.items():
        missing = [c for c in cols if c not in header]
        if not missing:
            return fmt
        if not best or len(missing) < len(best_missing):
            best, best_missing = fmt, missing
    raise UnknownFormat(f"{path}: unknown format (nearest {best!r} lacks columns {', '.join(best_missing)})")


def _ts(dt: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(dt)
    return ts


def _finite(text: str, column: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{column}: not a number {text!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{column}: not a finite number {text!r}")
    return v


def _count(text: str, column: str) -> int:
    """An integer count; accepts ``2015.0``-style integral floats."""
    try:
        return int(text)
    except ValueError:
        v = _finite(text, column)
        if not v.is_integer():
            raise ValueError(f"{column}: not an integer {text!r}") from None
        return int(v)


def _contracts(units: int, lot: int, column: str) -> int:
    """Units (shares) → contracts; the units must be a whole number of lots."""
    q, r = divmod(units, lot)
    if r:
        raise ValueError(f"{column}: {units} units is not a multiple of the lot size {lot}")
    return q


class _DateCache(dict[str, str]):
    """Validates expiry strings (``YYYY-MM-DD``) once each."""

    def __missing__(self, text: str) -> str:
        try:
            d = date.fromisoformat(text.strip())
        except ValueError:
            raise ValueError(f"expiry: not a YYYY-MM-DD date {text!r}") from None
        iso = d.isoformat()
        self[text] = iso
        return iso


@dataclass
class _Filter:
    """Row filters: underlyings (upper case) and an IST time-of-day window [start, end] (inclusive)."""

    underlyings: frozenset[str] | None = None
    start: time | None = None
    end: time | None = None

    def time_ok(self, t: datetime) -> bool:
        if self.start is None and self.end is None:
            return True
        tod = (t + IST).time().replace(tzinfo=None)
        return (self.start is None or tod >= self.start) and (self.end is None or tod <= self.end)


#: What the per-file readers yield: the snapshot and the line of its first row (for order errors).
_Located = tuple[Snapshot, int]


def _parse_ist(text: str, column: str) -> datetime:
    """An ISO 8601 date-time (``2026-08-18T10:43:00+05:30`` or ``2026-01-30 09:16:49``; no offset = IST) → UTC."""
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{column}: not a date-time {text!r}") from None
    return (dt.replace(tzinfo=IST_TZ) if dt.tzinfo is None else dt).astimezone(UTC)


@dataclass
class _Group:
    """Consecutive CSV rows of one (timestamp, underlying): ``rows`` are (line, fields)."""

    underlying: str
    time: datetime
    first_line: int
    rows: list[tuple[int, list[str]]]


def _csv_groups(reader: Iterator[list[str]], name: str, ncols: int, i_ts: int, i_sym: int, ts_column: str,
                on_error: Callable[[SourceError], None], flt: _Filter) -> Iterator[_Group]:
    """Group consecutive rows by (timestamp, underlying), applying the filters. Rows with the wrong field count or
    an unparsable timestamp are reported and skipped. ``reader`` is a ``csv.reader`` past the header."""
    times: dict[str, datetime] = {}
    key: tuple[str, str] | None = None
    group: _Group | None = None
    skip = False
    for row in reader:
        line: int = reader.line_num  # type: ignore[attr-defined]
        if len(row) != ncols:
            if row:
                on_error(SourceError(name, line, f"expected {ncols} fields, got {len(row)}"))
            continue
        k = (row[i_ts], row[i_sym])
        if k != key:
            if group is not None and group.rows:
                yield group
            key, group, skip = k, None, False
            sym = k[1].strip().upper()
            t = times.get(k[0])
            if t is None:
                try:
                    t = times[k[0]] = _parse_ist(k[0], ts_column)
                except ValueError as e:
                    on_error(SourceError(name, line, str(e)))
                    key = None  # every row of this group is reported
                    continue
            skip = (flt.underlyings is not None and sym not in flt.underlyings) or not flt.time_ok(t)
            group = _Group(sym, t, line, [])
        if not skip and group is not None:
            group.rows.append((line, row))
    if group is not None and group.rows:
        yield group


# --------------------------------------------------------------------------------------------------- nse-oc-1min


def _read_nse_1min(path: Path, on_error: Callable[[SourceError], None], flt: _Filter) -> Iterator[_Located]:
    name = str(path)
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, [])
        col = {c: i for i, c in enumerate(header)}
        i_ts, i_sym, i_exp, i_k, i_ot, i_ltp, i_vol, i_oi = (col[c] for c in REQUIRED_COLUMNS[NSE_OC_1MIN])
        i_spot = col.get("spot")
        opt = [(c, col[c]) for c in ("iv", "delta", "gamma", "theta", "vega") if c in col]
        cols = (i_exp, i_k, i_ot, i_ltp, i_vol, i_oi, i_spot)
        expiries = _DateCache()
        for g in _csv_groups(reader, name, len(header), i_ts, i_sym, "ts_ist", on_error, flt):
            sym, ts_pb = g.underlying, _ts(g.time)
            batch = market_pb2.TickBatch()
            add = batch.option_ticks.add
            spot: float | None = None
            for line, row in g.rows:
                # Fast path: plain conversions, one finiteness check for the row; any failure re-parses the row
                # column by column (_parse_1min_row) for a precise reason.
                try:
                    kw = {c: float(row[i]) for c, i in opt if row[i]}
                    row_spot = float(row[i_spot]) if i_spot is not None and row[i_spot] else 0.0
                    strike, ltp = float(row[i_k]), float(row[i_ltp])
                    if not math.isfinite(strike + ltp + row_spot + sum(kw.values())):
                        raise ValueError
                    tick = add(underlying=sym, expiry=expiries[row[i_exp]], strike=strike,
                               option_type=_OPTION_TYPES[row[i_ot]], ltp=ltp, volume=int(row[i_vol]),
                               oi=int(row[i_oi]), exchange_time=ts_pb, **kw)
                except (ValueError, KeyError):
                    try:
                        tick, row_spot = _parse_1min_row(row, sym, ts_pb, expiries, cols, opt)
                    except ValueError as e:
                        on_error(SourceError(name, line, str(e)))
                        continue
                    batch.option_ticks.append(tick)
                if row_spot > 0:
                    tick.underlying_price = row_spot
                    if spot is None:
                        spot = row_spot
            if batch.option_ticks:
                _add_underlying(batch, sym, spot, g.time)
                yield Snapshot(g.time, sym, batch), g.first_line


def _parse_1min_row(row: list[str], sym: str, ts_pb: Timestamp, expiries: _DateCache,
                    cols: tuple[int, int, int, int, int, int, int | None], opt: Sequence[tuple[str, int]]
                    ) -> tuple[market_pb2.OptionTick, float]:
    """The careful parse of one nse-oc-1min row: (tick, spot or 0); ValueError naming the column and value."""
    i_exp, i_k, i_ot, i_ltp, i_vol, i_oi, i_spot = cols
    ot = _OPTION_TYPES.get(row[i_ot].strip().upper())
    if ot is None:
        raise ValueError(f"option_type: unknown {row[i_ot]!r} (CE or PE)")
    kw = {c: _finite(row[i], c) for c, i in opt if row[i] != ""}
    row_spot = _finite(row[i_spot], "spot") if i_spot is not None and row[i_spot] != "" else 0.0
    tick = market_pb2.OptionTick(
        underlying=sym, expiry=expiries[row[i_exp]], strike=_finite(row[i_k], "strike"), option_type=ot,
        ltp=_finite(row[i_ltp], "ltp"), volume=_count(row[i_vol], "volume"), oi=_count(row[i_oi], "oi"),
        exchange_time=ts_pb, **kw)
    return tick, row_spot


def _add_underlying(batch: market_pb2.TickBatch, underlying: str, spot: float | None, t: datetime) -> None:
    if spot is not None and spot > 0:
        u = batch.underlying_ticks.add(underlying=underlying, price=spot)
        u.exchange_time.FromDatetime(t)


# --------------------------------------------------------------------------------------------------- kite-oc-5min


def parity_spot(legs: Iterable[tuple[float, float, float]], years_to_expiry: float, rate: float = PARITY_RATE,
                n: int = 3) -> float | None:
    """Underlying estimate from put-call parity, index points, or None when no strike has both sides traded.

    ``legs``: (strike, call LTP ₹, put LTP ₹) with both LTPs > 0. European parity C − P = S − K·e^(−rT) gives
    S ≈ C − P + K·e^(−rT) at each of the ``n`` strikes with the smallest |C − P| (the most liquid, nearest ATM); the
    median of those is returned. ``rate`` is annual, continuous; ``years_to_expiry`` counts to 15:30 IST on expiry
    day. (With r = 0 this is the plain K + C − P; on the January data discounting removes a bias of ≈ +200 points on
    BANKNIFTY and ≈ +13 on NIFTY against the true spot, see docs/replay.md.)
    """
    cands = sorted(legs, key=lambda x: abs(x[1] - x[2]))[:n]
    if not cands:
        return None
    disc = math.exp(-rate * max(years_to_expiry, 0.0))
    ests = sorted(c - p + k * disc for k, c, p in cands)
    m = len(ests)
    return ests[m // 2] if m % 2 else (ests[m // 2 - 1] + ests[m // 2]) / 2


_KiteRow = tuple[float, float, int, int, float, int, int, float]


def _read_kite_5min(path: Path, on_error: Callable[[SourceError], None], flt: _Filter,
                    lot_sizes: Mapping[str, int]) -> Iterator[_Located]:
    name = str(path)
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, [])
        col = {c: i for i, c in enumerate(header)}
        i_sym, i_exp, i_k, i_cl, i_co, i_cv, i_pl, i_po, i_pv, i_spot, i_ts = (
            col[c] for c in REQUIRED_COLUMNS[KITE_OC_5MIN])
        expiries = _DateCache()
        for g in _csv_groups(reader, name, len(header), i_ts, i_sym, "timestamp", on_error, flt):
            lot = lot_sizes.get(g.underlying)
            if lot is None:
                on_error(SourceError(name, g.first_line, f"Symbol: no lot size configured for {g.underlying!r}; "
                                                         f"snapshot of {len(g.rows)} rows skipped"))
                continue
            rows: list[tuple[str, _KiteRow]] = []
            for line, row in g.rows:
                try:
                    rows.append((expiries[row[i_exp]], (
                        _finite(row[i_k], "Strike"),
                        _finite(row[i_cl], "CE_LTP"),
                        _contracts(_count(row[i_co], "CE_OI"), lot, "CE_OI"),
                        _contracts(_count(row[i_cv], "CE_Volume"), lot, "CE_Volume"),
                        _finite(row[i_pl], "PE_LTP"),
                        _contracts(_count(row[i_po], "PE_OI"), lot, "PE_OI"),
                        _contracts(_count(row[i_pv], "PE_Volume"), lot, "PE_Volume"),
                        _finite(row[i_spot], "Spot"),
                    )))
                except ValueError as e:
                    on_error(SourceError(name, line, str(e)))
            if rows:
                snap = _kite_snapshot(g.underlying, g.time, rows)
                if snap.batch.option_ticks:
                    yield snap, g.first_line


def _years_to_expiry(expiry: str, t: datetime) -> float:
    exp_close = datetime.combine(date.fromisoformat(expiry), time(15, 30), IST_TZ)
    return max((exp_close - t).total_seconds(), 60.0) / (365.0 * 86400.0)


def _kite_snapshot(sym: str, t: datetime, rows: list[tuple[str, _KiteRow]]) -> Snapshot:
    """Build the TickBatch of one (underlying, timestamp) group; Spot 0 → put-call-parity estimate."""
    spot = next((r[7] for _, r in rows if r[7] > 0), None)
    if spot is None:
        # Use the nearest expiry present (the files carry one expiry per underlying).
        exp0 = min(e for e, _ in rows)
        legs = [(r[0], r[1], r[4]) for e, r in rows if e == exp0 and r[1] > 0 and r[4] > 0]
        est = parity_spot(legs, _years_to_expiry(exp0, t))
        spot = round(est, 2) if est is not None else None
    ts_pb = _ts(t)
    batch = market_pb2.TickBatch()
    add = batch.option_ticks.add
    for exp, (k, cl, co, cv, pl, po, pv, _s) in rows:
        if cl != 0 or co != 0:
            tick = add(underlying=sym, expiry=exp, strike=k, option_type=_CALL, ltp=cl, volume=cv, oi=co,
                       exchange_time=ts_pb)
            if spot is not None:
                tick.underlying_price = spot
        if pl != 0 or po != 0:
            tick = add(underlying=sym, expiry=exp, strike=k, option_type=_PUT, ltp=pl, volume=pv, oi=po,
                       exchange_time=ts_pb)
            if spot is not None:
                tick.underlying_price = spot
    if spot is not None:
        _add_underlying(batch, sym, spot, t)
    return Snapshot(t, sym, batch)


# --------------------------------------------------------------------------------------------------- kite-ticks

_MONTHS = {m: i + 1 for i, m in enumerate(("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT",
                                           "NOV", "DEC"))}
_KITE_MONTHLY = re.compile(r"^([A-Z]+?)(\d{2})([A-Z]{3})(\d+(?:\.\d+)?)(CE|PE)")


def _last_weekday(year: int, month: int, weekday: int) -> date:
    nxt = date(year + (month == 12), month % 12 + 1, 1)
    d = nxt - timedelta(days=1)
    return d - timedelta(days=(d.weekday() - weekday) % 7)


def parse_kite_monthly_symbol(text: str) -> tuple[str, str, float, int]:
    """(underlying, expiry YYYY-MM-DD, strike, option type) of a Kite monthly tradingsymbol such as
    ``BANKNIFTY21SEP35300CE``. The expiry is the month's last Thursday (the NSE rule before Sept 2025; holidays are
    not known here). Raises ValueError for other shapes."""
    m = _KITE_MONTHLY.match(text.upper())
    if not m or m.group(3) not in _MONTHS:
        raise ValueError(f"not a Kite monthly option symbol {text!r}")
    year = 2000 + int(m.group(2))
    expiry = _last_weekday(year, _MONTHS[m.group(3)], 3)
    return m.group(1), expiry.isoformat(), float(m.group(4)), _OPTION_TYPES[m.group(5)]


def _read_kite_ticks(path: Path, on_error: Callable[[SourceError], None], flt: _Filter,
                     lot_sizes: Mapping[str, int]) -> Iterator[_Located]:
    name = str(path)
    try:
        sym, expiry, strike, ot = parse_kite_monthly_symbol(path.name)
    except ValueError as e:
        on_error(SourceError(name, 0, f"file name: {e}"))
        return
    if flt.underlyings is not None and sym not in flt.underlyings:
        return
    with _open_text(path) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
                t = _parse_ist(str(obj["timestamp"]), "timestamp")
                if t.year < 2000:
                    raise ValueError("timestamp: epoch-0 pre-open record")
                lot = KITE_TICKS_LOT_SIZES.get((sym, t.year)) or lot_sizes[sym]
                ltp = _finite(str(obj["last_price"]), "last_price")
                vol = _contracts(_count(str(obj["volume"]), "volume"), lot, "volume")
                oi = _contracts(_count(str(obj["oi"]), "oi"), lot, "oi")
            except (ValueError, KeyError, TypeError) as e:
                reason = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                on_error(SourceError(name, line, reason))
                continue
            if not flt.time_ok(t):
                continue
            batch = market_pb2.TickBatch()
            batch.option_ticks.add(underlying=sym, expiry=expiry, strike=strike, option_type=ot, ltp=ltp,
                                   volume=vol, oi=oi, exchange_time=_ts(t))
            yield Snapshot(t, sym, batch), line


# --------------------------------------------------------------------------------------------------- entry point


def _read_file(path: Path, on_error: Callable[[SourceError], None], flt: _Filter,
               lot_sizes: Mapping[str, int]) -> Iterator[_Located]:
    fmt = detect_format(path)
    if fmt == NSE_OC_1MIN:
        return _read_nse_1min(path, on_error, flt)
    if fmt == KITE_OC_5MIN:
        return _read_kite_5min(path, on_error, flt, lot_sizes)
    return _read_kite_ticks(path, on_error, flt, lot_sizes)


def open_source(
    path: Path,
    on_error: Callable[[SourceError], None] | None = None,
    *,
    underlyings: Collection[str] | None = None,
    start: time | None = None,
    end: time | None = None,
    lot_sizes: Mapping[str, int] | None = None,
) -> Iterator[Snapshot]:
    """Snapshots of a file (``.csv``, ``.csv.gz``, ``.jsonl.gz``) or of every data file of a directory, in time
    order (ties keep file order; different files are merged by time).

    ``on_error`` receives each malformed row (default: an :class:`ErrorLog`, which logs); the row is skipped and the
    reading goes on. A snapshot earlier than one already yielded (a file not in time order) is reported and skipped.
    ``underlyings`` keeps only those symbols; ``start``/``end`` keep snapshots whose IST time of day lies in
    [start, end]. ``lot_sizes`` (units per contract) converts unit-based formats (default ``DEFAULT_LOT_SIZES``).

    Raises FileNotFoundError for a missing path and :class:`UnknownFormat` for a single file of unknown format (in a
    directory such a file is reported through ``on_error`` with line 0 and skipped). Reading is lazy: errors of
    later rows surface while iterating.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"replay source not found: {path}")
    report: Callable[[SourceError], None] = on_error if on_error is not None else ErrorLog()
    flt = _Filter(frozenset(u.upper() for u in underlyings) if underlyings is not None else None, start, end)
    lots = dict(lot_sizes if lot_sizes is not None else DEFAULT_LOT_SIZES)
    if path.is_dir():
        files = _data_files(path)
        if not files:
            raise FileNotFoundError(f"{path}: no .csv/.csv.gz/.jsonl/.jsonl.gz files")
        streams: list[Iterator[tuple[Snapshot, int, str]]] = []
        for p in files:
            try:
                it = _read_file(p, report, flt, lots)
            except UnknownFormat as e:
                report(SourceError(str(p), 0, str(e)))
                continue
            streams.append(((s, ln, str(p)) for s, ln in it))
        merged: Iterator[tuple[Snapshot, int, str]] = heapq.merge(*streams, key=lambda x: x[0].time)
    else:
        merged = ((s, ln, str(path)) for s, ln in _read_file(path, report, flt, lots))
    return _in_order(merged, report)


def _in_order(items: Iterator[tuple[Snapshot, int, str]],
              report: Callable[[SourceError], None]) -> Iterator[Snapshot]:
    last: datetime | None = None
    for snap, line, file in items:
        if last is not None and snap.time < last:
            report(SourceError(file, line, f"snapshot {snap.underlying} at {snap.time.isoformat()} is earlier than "
                                           f"{last.isoformat()} already replayed (file not in time order); skipped"))
            continue
        last = snap.time
        yield snap


def default_day_path(shared_data: Path | None = None) -> Path | None:
    """The real 18-Aug-2026 NIFTY minute file of the shared data (``$OPTMON_SHARED_DATA`` or ``../shared/data``
    beside the checkout), or None when it is absent (callers then fall back to the synthetic session)."""
    import os

    if shared_data is None:
        env = os.environ.get("OPTMON_SHARED_DATA")
        shared_data = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"
    p = shared_data / "nifty-oc-1min-2026-08" / "nifty_oc_1min_2026-08-18.csv.gz"
    return p if p.exists() else None
