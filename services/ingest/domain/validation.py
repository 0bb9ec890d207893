"""Tick validation: every rule of issue 3 §2 in one pure, allocation-light class (no grpc, asyncpg or redis).

The pipeline calls :meth:`Validator.check_option` / :meth:`Validator.check_underlying` for every tick, counts each
reject by reason (``optmon_ingest_rejected_total{reason}``) and writes it to the dead-letter stream.

Reason numbers are ``optmon.v1.RejectReason`` values; their names without the ``REJECT_REASON_`` prefix
(:data:`REASON_NAMES`) are the metric labels, the dead-letter ``reason`` field and the keys of
``PublishTicksResponse.rejected_by_reason``.

Stateful rules (exact duplicates, LTP jumps) keep a small bounded state per contract. Callers that may have to
retry a batch after a failed commit wrap each attempt in :meth:`Validator.begin` / :meth:`Validator.commit` /
:meth:`Validator.rollback`, so a retried tick is neither a "duplicate" of itself nor judged against its own LTP.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable
from datetime import date, datetime
from typing import TYPE_CHECKING

from optmon.v1 import ingest_service_pb2, market_pb2

if TYPE_CHECKING:
    from services.ingest.settings import IngestSettings

RR = ingest_service_pb2.RejectReason
NON_POSITIVE_LTP = ingest_service_pb2.REJECT_REASON_NON_POSITIVE_LTP
NEGATIVE_VOLUME = ingest_service_pb2.REJECT_REASON_NEGATIVE_VOLUME
NEGATIVE_OI = ingest_service_pb2.REJECT_REASON_NEGATIVE_OI
NON_FINITE_GREEKS = ingest_service_pb2.REJECT_REASON_NON_FINITE_GREEKS
IV_OUT_OF_RANGE = ingest_service_pb2.REJECT_REASON_IV_OUT_OF_RANGE
UNKNOWN_UNDERLYING = ingest_service_pb2.REJECT_REASON_UNKNOWN_UNDERLYING
BAD_STRIKE = ingest_service_pb2.REJECT_REASON_BAD_STRIKE
BAD_EXPIRY = ingest_service_pb2.REJECT_REASON_BAD_EXPIRY
BAD_TIME = ingest_service_pb2.REJECT_REASON_BAD_TIME
DUPLICATE = ingest_service_pb2.REJECT_REASON_DUPLICATE
SUSPICIOUS_JUMP = ingest_service_pb2.REJECT_REASON_SUSPICIOUS_JUMP
MALFORMED = ingest_service_pb2.REJECT_REASON_MALFORMED
#: Not a tick rule: a stream entry that kept failing ingest (``services/ingest/inputs/streams.py``).
POISON = ingest_service_pb2.REJECT_REASON_POISON

#: RejectReason number → label without prefix, e.g. ``{1: "NON_POSITIVE_LTP", ...}`` (UNSPECIFIED excluded).
REASON_NAMES: dict[int, str] = {
    num: name.removeprefix("REJECT_REASON_") for name, num in RR.items() if num != 0
}

#: Sanity bounds that hold whatever the configuration: strikes above MAX_STRIKE index points (no index is near it;
#: a larger value would overflow the stored moneyness level) and exchange times before 2000-01-01 UTC or more than a
#: day after "now" are rejected (BAD_STRIKE / BAD_TIME).
MAX_STRIKE = 10_000_000.0
MIN_TIME_S = 946_684_800
MAX_FUTURE_S = 86_400
#: IST is UTC+05:30 (no DST), in seconds.
IST_OFFSET_S = 19_800
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_CALL = market_pb2.OPTION_TYPE_CALL
_PUT = market_pb2.OPTION_TYPE_PUT
_GREEKS = ("iv", "delta", "gamma", "theta", "vega")
_EXPIRY_CACHE_MAX = 4096

#: (underlying, expiry, strike, option_type): one contract.
ContractKey = tuple[str, str, float, int]


def reason_name(reason: int) -> str:
    """The label of a RejectReason number, e.g. ``reason_name(1) == "NON_POSITIVE_LTP"``."""
    return REASON_NAMES.get(reason, "UNSPECIFIED")


def parse_hhmm(text: str) -> int:
    """``"HH:MM"`` → seconds after midnight. Raises ValueError on anything else."""
    hh, sep, mm = text.partition(":")
    if not sep or not (hh.isdigit() and mm.isdigit()) or not (0 <= int(hh) <= 24 and 0 <= int(mm) < 60):
        raise ValueError(f"expected HH:MM, got {text!r}")
    return int(hh) * 3600 + int(mm) * 60


class _ContractState:
    """Validation memory of one contract: fingerprints of its last accepted ticks, its last accepted LTP, the
    LTP of a jump rejected since (used by the "reject" policy to accept a move confirmed by the next tick), and —
    while ``ltp`` is a seed from the committed bars rather than a tick seen — the exchange time of that close (µs)."""

    __slots__ = ("fps", "ltp", "rejected_ltp", "seed_us")

    def __init__(self, window: int) -> None:
        self.fps: deque[int] = deque(maxlen=window)
        self.ltp = 0.0
        self.rejected_ltp = 0.0
        self.seed_us = 0


class Validator:
    """Checks ticks against the configured rules.

    Rules, in order (the first failing one is the reason): option type set, underlying and exchange time present,
    and finite underlying/futures prices (MALFORMED); configured underlying (UNKNOWN_UNDERLYING); 0 < strike ≤
    MAX_STRIKE and on the grid ``settings.strike_steps[underlying]`` (BAD_STRIKE); expiry a ``YYYY-MM-DD`` date not
    before the tick's IST date (BAD_EXPIRY); 0 < LTP < ∞ (NON_POSITIVE_LTP); volume ≥ 0 (NEGATIVE_VOLUME); OI ≥ 0
    (NEGATIVE_OI); IV and Greeks finite when present (NON_FINITE_GREEKS); IV in (0, 500] % (IV_OUT_OF_RANGE);
    exchange time after 2000-01-01, at most a day ahead of ``now``, within ``ingest_max_tick_age_s`` of ``now`` (0 =
    off) and inside the IST session window (BAD_TIME); not an exact copy of one of the contract's last
    ``ingest_dedup_window`` accepted ticks (DUPLICATE); an LTP move above ``ingest_jump_threshold`` against the
    contract's previous accepted tick is suspicious, rejected as SUSPICIOUS_JUMP under policy "reject" unless the
    previous tick was such a rejected jump to within the threshold of this one (the move is then confirmed and
    accepted).

    Memory is bounded: state for at most ``ingest_state_contracts`` contracts (least recently seen evicted), each a
    deque of ``ingest_dedup_window`` 64-bit fingerprints. Not thread-safe (one event loop).
    """

    def __init__(self, settings: IngestSettings) -> None:
        self._steps = {u.upper(): float(s) for u, s in settings.strike_steps.items()}
        self._grid = settings.ingest_strike_grid_check
        self._max_age = float(settings.ingest_max_tick_age_s)
        self._session: tuple[int, int] | None = None
        if settings.ingest_session_check:
            self._session = (parse_hhmm(settings.ingest_session_start), parse_hhmm(settings.ingest_session_end))
        self._jump = float(settings.ingest_jump_threshold)
        self._reject_jumps = settings.ingest_jump_policy == "reject"
        self._window = int(settings.ingest_dedup_window)
        self._cap = int(settings.ingest_state_contracts)
        self._state: OrderedDict[ContractKey, _ContractState] = OrderedDict()
        self._expiries: dict[str, int | None] = {}
        self._now: datetime | None = None
        self._now_s = 0.0
        # Undo journal of the open attempt: contract → its state before the attempt (None: did not exist).
        self._journal: dict[ContractKey, tuple[tuple[int, ...], float, float, int] | None] | None = None

    # -- transactions --------------------------------------------------------------------------------------------
    def begin(self) -> None:
        """Start recording state changes so that :meth:`rollback` can undo them (one attempt at a time)."""
        self._journal = {}

    def commit(self) -> None:
        """Keep the state changes made since :meth:`begin`."""
        self._journal = None

    def rollback(self) -> None:
        """Undo every state change made since :meth:`begin` (the batch will be validated again)."""
        journal, self._journal = self._journal, None
        if not journal:
            return
        for key, before in journal.items():
            if before is None:
                self._state.pop(key, None)
                continue
            st = _ContractState(self._window)
            st.fps.extend(before[0])
            st.ltp, st.rejected_ltp, st.seed_us = before[1], before[2], before[3]
            self._state[key] = st

    def seed_last_ltp(self, items: Iterable[tuple[ContractKey, float, int]]) -> int:
        """Remember ``(contract, LTP ₹, exchange time µs)`` of contracts that have no state yet — the close of their
        newest committed bar, loaded by a (re)starting pipeline — so that the first newer tick after a restart is
        judged for an LTP jump as it would have been without the restart. A tick not newer than the seed (one
        committed before the restart, re-delivered) is not judged for a jump and leaves the seed in place. Contracts
        already tracked are left alone; the state bound holds. Returns how many contracts were seeded. (Duplicate
        fingerprints cannot be recovered: bars keep no ticks.)"""
        n = 0
        for key, ltp, close_us in items:
            if key in self._state or not (0.0 < ltp < math.inf) or len(self._state) >= self._cap:
                continue
            st = self._state[key] = _ContractState(self._window)
            st.ltp = ltp
            st.seed_us = close_us
            n += 1
        return n

    @property
    def contracts_tracked(self) -> int:
        """Contracts currently holding validation state (bounded by ``ingest_state_contracts``)."""
        return len(self._state)

    # -- rules ---------------------------------------------------------------------------------------------------
    def _expiry_ordinal(self, expiry: str) -> int | None:
        try:
            return self._expiries[expiry]
        except KeyError:
            pass
        ordinal: int | None
        try:
            ordinal = date.fromisoformat(expiry).toordinal() if len(expiry) == 10 else None
        except ValueError:
            ordinal = None
        if len(self._expiries) >= _EXPIRY_CACHE_MAX:
            self._expiries.clear()
        self._expiries[expiry] = ordinal
        return ordinal

    def _check_time(self, ts: int, now: datetime) -> str | None:
        if now is not self._now:
            self._now, self._now_s = now, now.timestamp()
        if ts < MIN_TIME_S or ts > self._now_s + MAX_FUTURE_S:
            return f"exchange_time {ts} s since the epoch is before 2000 or more than a day ahead of now"
        if self._max_age and abs(self._now_s - ts) > self._max_age:
            return f"exchange_time {ts} is more than {self._max_age:g} s from now"
        if self._session is not None:
            tod = (ts + IST_OFFSET_S) % 86_400
            if tod < self._session[0] or tod > self._session[1]:
                return f"exchange_time {tod // 3600:02d}:{tod // 60 % 60:02d} IST outside the session window"
        return None

    def check_option(self, tick: market_pb2.OptionTick, now: datetime) -> tuple[int | None, str, bool]:
        """Validate one option tick received at ``now`` (aware UTC datetime).

        Returns ``(reason, detail, suspicious)``: ``reason`` is a RejectReason number or None when accepted,
        ``detail`` a short human text (empty when accepted), ``suspicious`` True for an LTP jump above the threshold
        (accepted under policy "keep"). An accepted tick updates the contract's state; a rejected one does not
        (except that policy "reject" remembers the rejected jump's LTP). Never raises on any field values.
        """
        option_type = tick.option_type
        if option_type != _CALL and option_type != _PUT:
            return MALFORMED, f"option_type={option_type} unspecified", False
        underlying = tick.underlying
        if not underlying:
            return MALFORMED, "underlying missing", False
        if not tick.HasField("exchange_time"):
            return MALFORMED, "exchange_time missing", False
        step = self._steps.get(underlying)
        if step is None:
            return UNKNOWN_UNDERLYING, f"underlying={underlying!r} not configured", False
        strike = tick.strike
        if not (0.0 < strike <= MAX_STRIKE):
            return BAD_STRIKE, f"strike={strike!r}", False
        if self._grid:
            q = strike / step
            if abs(q - round(q)) > 1e-6:
                return BAD_STRIKE, f"strike={strike!r} off the {step:g}-point grid", False
        et = tick.exchange_time
        ts = et.seconds
        expiry = tick.expiry
        ordinal = self._expiry_ordinal(expiry)
        if ordinal is None:
            return BAD_EXPIRY, f"expiry={expiry!r} is not YYYY-MM-DD", False
        if ordinal < (ts + IST_OFFSET_S) // 86_400 + _EPOCH_ORDINAL:
            return BAD_EXPIRY, f"expiry={expiry} before the tick's IST date", False
        ltp = tick.ltp
        if not (0.0 < ltp < math.inf):
            return NON_POSITIVE_LTP, f"ltp={ltp!r}", False
        volume = tick.volume
        if volume < 0:
            return NEGATIVE_VOLUME, f"volume={volume}", False
        oi = tick.oi
        if oi < 0:
            return NEGATIVE_OI, f"oi={oi}", False
        # An absent optional double reads 0.0, so the values can be checked without HasField on the hot path: NaN
        # and ±∞ propagate through the sum (∞ − ∞ is NaN), and only a 0.0 needs HasField to tell "absent" apart.
        iv = tick.iv
        greeks = (iv, tick.delta, tick.gamma, tick.theta, tick.vega)
        if not math.isfinite(sum(greeks)):
            for name, value in zip(_GREEKS, greeks, strict=True):
                if not math.isfinite(value):
                    return NON_FINITE_GREEKS, f"{name}={value!r}", False
        if (iv != 0.0 and not (0.0 < iv <= 500.0)) or (iv == 0.0 and tick.HasField("iv")):
            return IV_OUT_OF_RANGE, f"iv={iv!r}", False
        spot = tick.underlying_price
        fut = tick.futures_price
        if (spot != 0.0 or fut != 0.0) and not (0.0 <= spot < math.inf and 0.0 <= fut < math.inf):
            name = "underlying_price" if not (0.0 <= spot < math.inf) else "futures_price"
            return MALFORMED, f"{name}={getattr(tick, name)!r}", False
        if spot == 0.0 and tick.HasField("underlying_price"):
            return MALFORMED, "underlying_price=0.0", False
        if fut == 0.0 and tick.HasField("futures_price"):
            return MALFORMED, "futures_price=0.0", False
        bad_time = self._check_time(ts, now)
        if bad_time is not None:
            return BAD_TIME, bad_time, False

        key = (underlying, expiry, strike, option_type)
        state = self._state
        st = state.get(key)
        journal = self._journal
        if journal is not None and key not in journal:
            journal[key] = None if st is None else (tuple(st.fps), st.ltp, st.rejected_ltp, st.seed_us)
        if st is None:
            st = state[key] = _ContractState(self._window)
            if len(state) > self._cap:
                evicted, _ = state.popitem(last=False)
                if journal is not None:
                    journal.pop(evicted, None)  # cannot be restored any more: it is simply forgotten
        else:
            state.move_to_end(key)
        # Fingerprint of every value field (the contract is the state key); an absent optional field and an explicit
        # 0.0 differ only in presence, which no accepted tick can exploit (explicit zeros are rejected above except
        # for Greeks, where 0.0 and "absent" carry the same information).
        fp = hash((ts, et.nanos, ltp, volume, oi, greeks, spot, fut))
        if fp in st.fps:
            return DUPLICATE, "exact duplicate of a recent tick of the contract", False
        if st.seed_us:
            if ts * 1_000_000 + et.nanos // 1000 <= st.seed_us:
                # Not newer than the committed close that seeded the state: a tick committed before the restart
                # (a re-delivered entry); the first processing judged it against what preceded it, unknown here.
                st.fps.append(fp)
                return None, "", False
            st.seed_us = 0
        suspicious = False
        prev = st.ltp
        if prev and abs(ltp - prev) > self._jump * prev:
            suspicious = True
            if self._reject_jumps:
                confirm = st.rejected_ltp
                if not (confirm and abs(ltp - confirm) <= self._jump * confirm):
                    st.rejected_ltp = ltp
                    return SUSPICIOUS_JUMP, f"ltp {prev:g} -> {ltp:g} (>{self._jump:.0%})", True
        st.fps.append(fp)
        st.ltp = ltp
        st.rejected_ltp = 0.0
        return None, "", suspicious

    def check_underlying(self, tick: market_pb2.UnderlyingTick, now: datetime) -> tuple[int | None, str]:
        """Validate one underlying tick: underlying present and configured, exchange time present and valid (as
        for options), 0 < price < ∞ (else NON_POSITIVE_LTP). Returns ``(reason or None, detail)``."""
        underlying = tick.underlying
        if not underlying:
            return MALFORMED, "underlying missing"
        if not tick.HasField("exchange_time"):
            return MALFORMED, "exchange_time missing"
        if underlying not in self._steps:
            return UNKNOWN_UNDERLYING, f"underlying={underlying!r} not configured"
        if not (0.0 < tick.price < math.inf):
            return NON_POSITIVE_LTP, f"price={tick.price!r}"
        bad_time = self._check_time(tick.exchange_time.seconds, now)
        if bad_time is not None:
            return BAD_TIME, bad_time
        return None, ""
