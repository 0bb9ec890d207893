"""Validator: one table row per reject reason (bad tick in → reason out), plus the stateful rules."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from optmon.v1 import market_pb2

from services.ingest.domain import validation as v
from services.ingest.settings import IngestSettings

# 18 Aug 2026 10:43 IST = 05:13 UTC
T0 = datetime(2026, 8, 18, 5, 13, tzinfo=UTC)
NOW = T0


def ts(dt: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(dt)
    return t


def good_tick(**over: Any) -> market_pb2.OptionTick:
    """A valid NIFTY call tick; ``over`` replaces fields (None clears an optional one)."""
    fields: dict[str, Any] = dict(
        underlying="NIFTY", expiry="2026-08-25", strike=24200.0, option_type=market_pb2.OPTION_TYPE_CALL,
        ltp=101.5, volume=1000, oi=5000, iv=12.5, delta=0.5, gamma=0.001, theta=-5.0, vega=10.0,
        exchange_time=ts(T0),
    )
    fields.update(over)
    return market_pb2.OptionTick(**{k: val for k, val in fields.items() if val is not None})


def validator(**over: Any) -> v.Validator:
    return v.Validator(IngestSettings(**over))


def test_good_tick_accepted() -> None:
    assert validator().check_option(good_tick(), NOW) == (None, "", False)


def test_reason_names_are_enum_names_without_prefix() -> None:
    assert v.REASON_NAMES[v.NON_POSITIVE_LTP] == "NON_POSITIVE_LTP"
    assert v.reason_name(v.MALFORMED) == "MALFORMED"
    assert v.reason_name(v.POISON) == "POISON"
    assert len(v.REASON_NAMES) == 13


CASES: list[tuple[str, dict[str, Any], int]] = [
    ("zero ltp", {"ltp": 0.0}, v.NON_POSITIVE_LTP),
    ("negative ltp", {"ltp": -1.0}, v.NON_POSITIVE_LTP),
    ("nan ltp", {"ltp": math.nan}, v.NON_POSITIVE_LTP),
    ("inf ltp", {"ltp": math.inf}, v.NON_POSITIVE_LTP),
    ("negative volume", {"volume": -1}, v.NEGATIVE_VOLUME),
    ("negative oi", {"oi": -5}, v.NEGATIVE_OI),
    ("nan iv", {"iv": math.nan}, v.NON_FINITE_GREEKS),
    ("inf delta", {"delta": math.inf}, v.NON_FINITE_GREEKS),
    ("nan gamma", {"gamma": math.nan}, v.NON_FINITE_GREEKS),
    ("-inf theta", {"theta": -math.inf}, v.NON_FINITE_GREEKS),
    ("nan vega", {"vega": math.nan}, v.NON_FINITE_GREEKS),
    ("iv zero", {"iv": 0.0}, v.IV_OUT_OF_RANGE),
    ("iv negative", {"iv": -3.0}, v.IV_OUT_OF_RANGE),
    ("iv above 500", {"iv": 500.01}, v.IV_OUT_OF_RANGE),
    ("unknown underlying", {"underlying": "SENSEX"}, v.UNKNOWN_UNDERLYING),
    ("strike zero", {"strike": 0.0}, v.BAD_STRIKE),
    ("strike negative", {"strike": -50.0}, v.BAD_STRIKE),
    ("strike nan", {"strike": math.nan}, v.BAD_STRIKE),
    ("strike off grid", {"strike": 24225.0}, v.BAD_STRIKE),
    ("strike absurd (on grid)", {"strike": 1e300}, v.BAD_STRIKE),
    ("expiry before tick date", {"expiry": "2026-08-17"}, v.BAD_EXPIRY),
    ("expiry malformed", {"expiry": "25-Aug-2026"}, v.BAD_EXPIRY),
    ("expiry empty", {"expiry": ""}, v.BAD_EXPIRY),
    ("expiry impossible date", {"expiry": "2026-02-30"}, v.BAD_EXPIRY),
    ("before session", {"exchange_time": ts(datetime(2026, 8, 18, 3, 0, tzinfo=UTC))}, v.BAD_TIME),  # 08:30 IST
    ("after session", {"exchange_time": ts(datetime(2026, 8, 18, 10, 30, tzinfo=UTC))}, v.BAD_TIME),  # 16:00 IST
    ("epoch zero time (Kite pre-open)", {"exchange_time": ts(datetime(1970, 1, 1, tzinfo=UTC)),
                                         "expiry": "1970-01-01"}, v.BAD_TIME),
    ("time a year ahead", {"exchange_time": ts(datetime(2027, 8, 18, 5, 13, tzinfo=UTC)),
                           "expiry": "2027-08-25"}, v.BAD_TIME),
    ("option type unspecified", {"option_type": market_pb2.OPTION_TYPE_UNSPECIFIED}, v.MALFORMED),
    ("underlying missing", {"underlying": ""}, v.MALFORMED),
    ("exchange time missing", {"exchange_time": None}, v.MALFORMED),
    ("underlying price nan", {"underlying_price": math.nan}, v.MALFORMED),
    ("futures price negative", {"futures_price": -1.0}, v.MALFORMED),
]


@pytest.mark.parametrize(("name", "over", "reason"), CASES, ids=[c[0] for c in CASES])
def test_option_reject_table(name: str, over: dict[str, Any], reason: int) -> None:
    got, detail, suspicious = validator().check_option(good_tick(**over), NOW)
    assert (v.reason_name(got or 0), suspicious) == (v.reason_name(reason), False), detail
    assert detail


def test_every_reason_has_a_case() -> None:
    covered = {r for _, _, r in CASES} | {v.DUPLICATE, v.SUSPICIOUS_JUMP}
    # POISON is no tick rule: the stream input's delivery cap (tests/integration/test_ingest_events_crash.py)
    assert covered | {v.POISON} == set(v.REASON_NAMES)


def test_expiry_on_tick_date_is_fine_and_iv_500_inclusive() -> None:
    val = validator()
    assert val.check_option(good_tick(expiry="2026-08-18", iv=500.0), NOW)[0] is None


def test_tick_age_check_is_off_by_default_and_configurable() -> None:
    now = datetime(2026, 11, 22, 6, 0, tzinfo=UTC)
    assert validator().check_option(good_tick(), now)[0] is None  # a replay of August data is accepted
    got = validator(ingest_max_tick_age_s=60).check_option(good_tick(), now)
    assert got[0] == v.BAD_TIME
    assert validator(ingest_max_tick_age_s=60).check_option(good_tick(), T0)[0] is None


def test_session_check_can_be_disabled() -> None:
    late = good_tick(exchange_time=ts(datetime(2026, 8, 18, 10, 30, tzinfo=UTC)))
    assert validator(ingest_session_check=False).check_option(late, NOW)[0] is None


def test_grid_check_can_be_disabled_and_steps_configurable() -> None:
    assert validator(ingest_strike_grid_check=False).check_option(good_tick(strike=24225.0), NOW)[0] is None
    assert validator(strike_steps={"NIFTY": 25}).check_option(good_tick(strike=24225.0), NOW)[0] is None


def test_exact_duplicate_rejected_but_changed_tick_is_not() -> None:
    val = validator()
    assert val.check_option(good_tick(), NOW)[0] is None
    assert val.check_option(good_tick(), NOW)[0] == v.DUPLICATE
    assert val.check_option(good_tick(oi=5001), NOW)[0] is None
    # same values for another contract: not a duplicate
    assert val.check_option(good_tick(option_type=market_pb2.OPTION_TYPE_PUT), NOW)[0] is None


def test_duplicate_window_and_state_are_bounded() -> None:
    val = validator(ingest_dedup_window=2, ingest_state_contracts=3)
    for i in range(3):
        assert val.check_option(good_tick(oi=i), NOW)[0] is None
    assert val.check_option(good_tick(oi=0), NOW)[0] is None  # fell out of the 2-tick window
    for k in range(10):
        val.check_option(good_tick(strike=20000.0 + 50 * k), NOW)
    assert val.contracts_tracked == 3


def test_jump_keep_policy_flags_suspicious() -> None:
    val = validator()
    assert val.check_option(good_tick(ltp=100.0), NOW) == (None, "", False)
    assert val.check_option(good_tick(ltp=109.0), NOW) == (None, "", False)
    reason, _, suspicious = val.check_option(good_tick(ltp=125.0), NOW)
    assert reason is None and suspicious


def test_jump_reject_policy_rejects_until_confirmed() -> None:
    val = validator(ingest_jump_policy="reject")
    assert val.check_option(good_tick(ltp=100.0), NOW)[0] is None
    reason, _, suspicious = val.check_option(good_tick(ltp=200.0), NOW)
    assert (reason, suspicious) == (v.SUSPICIOUS_JUMP, True)
    # a spike back to normal is fine against the last accepted LTP
    assert val.check_option(good_tick(ltp=102.0), NOW)[0] is None
    # a real move: rejected once, then confirmed by the next tick near the new level
    assert val.check_option(good_tick(ltp=150.0), NOW)[0] == v.SUSPICIOUS_JUMP
    reason, _, suspicious = val.check_option(good_tick(ltp=151.0), NOW)
    assert reason is None and suspicious


def test_seeded_last_ltp_judges_the_first_tick_after_a_restart() -> None:
    val = validator(ingest_jump_policy="reject", ingest_state_contracts=2)
    t0_us = int(T0.timestamp()) * 1_000_000
    later = ts(datetime(2026, 8, 18, 5, 14, tzinfo=UTC))

    def call(strike: float) -> tuple[str, str, float, int]:
        return ("NIFTY", "2026-08-25", strike, market_pb2.OPTION_TYPE_CALL)

    assert val.check_option(good_tick(ltp=90.0, strike=24300.0), NOW)[0] is None  # tracked: not overwritten
    seeds = [(call(24200.0), 100.0, t0_us), (call(24300.0), 500.0, t0_us), (call(24400.0), math.nan, t0_us),
             (call(24500.0), 100.0, t0_us)]  # the last one is over the state bound
    assert val.seed_last_ltp(seeds) == 1
    assert val.contracts_tracked == 2
    # a re-delivered tick (not newer than the committed close) is not judged against the seed
    assert val.check_option(good_tick(ltp=300.0), NOW)[0] is None
    assert val.check_option(good_tick(ltp=150.0, exchange_time=later), NOW)[0] == v.SUSPICIOUS_JUMP
    assert val.check_option(good_tick(ltp=105.0, exchange_time=later), NOW)[0] is None
    assert val.check_option(good_tick(ltp=95.0, strike=24300.0), NOW)[0] is None  # against 90, not 500


def test_rollback_undoes_state_of_a_failed_attempt() -> None:
    val = validator()
    assert val.check_option(good_tick(ltp=100.0), NOW)[0] is None
    val.begin()
    assert val.check_option(good_tick(ltp=101.0), NOW)[0] is None
    assert val.check_option(good_tick(ltp=101.0, strike=24250.0), NOW)[0] is None
    val.rollback()
    # the same ticks again: not duplicates of themselves
    val.begin()
    assert val.check_option(good_tick(ltp=101.0), NOW)[0] is None
    assert val.check_option(good_tick(ltp=101.0, strike=24250.0), NOW)[0] is None
    val.commit()
    assert val.check_option(good_tick(ltp=101.0), NOW)[0] == v.DUPLICATE
    assert val.check_option(good_tick(ltp=100.0), NOW)[0] == v.DUPLICATE  # the pre-attempt tick is still known


UNDERLYING_CASES: list[tuple[str, dict[str, Any], int]] = [
    ("zero price", {"price": 0.0}, v.NON_POSITIVE_LTP),
    ("nan price", {"price": math.nan}, v.NON_POSITIVE_LTP),
    ("unknown underlying", {"underlying": "SENSEX"}, v.UNKNOWN_UNDERLYING),
    ("missing underlying", {"underlying": ""}, v.MALFORMED),
    ("missing time", {"exchange_time": None}, v.MALFORMED),
    ("outside session", {"exchange_time": ts(datetime(2026, 8, 18, 12, 0, tzinfo=UTC))}, v.BAD_TIME),
]


@pytest.mark.parametrize(("name", "over", "reason"), UNDERLYING_CASES, ids=[c[0] for c in UNDERLYING_CASES])
def test_underlying_reject_table(name: str, over: dict[str, Any], reason: int) -> None:
    fields: dict[str, Any] = {"underlying": "NIFTY", "price": 24212.8, "exchange_time": ts(T0), **over}
    tick = market_pb2.UnderlyingTick(**{k: val for k, val in fields.items() if val is not None})
    got, detail = validator().check_underlying(tick, NOW)
    assert got == reason, detail


def test_underlying_good() -> None:
    tick = market_pb2.UnderlyingTick(underlying="NIFTY", price=24212.8, exchange_time=ts(T0))
    assert validator().check_underlying(tick, NOW) == (None, "")


def test_bad_session_setting_fails_fast() -> None:
    with pytest.raises(ValueError):
        validator(ingest_session_start="9am")
