"""Legacy pub/sub JSON → protobuf ticks (docs/ingest.md schema); structural errors become MALFORMED items."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from optmon.v1 import market_pb2

from services.ingest.inputs.legacy_json import parse_message, parse_time


def test_option_object_full() -> None:
    msg = {"expiry": "2026-08-25", "strike": 24200, "option_type": "CE", "ltp": 101.5, "volume": 10, "oi": 20,
           "iv": 12.5, "delta": 0.5, "exchange_time": "2026-08-18T10:43:00+05:30", "underlying": "nifty"}
    batch, errors = parse_message(json.dumps(msg).encode(), "NIFTY", "options")
    assert errors == []
    (t,) = batch.option_ticks
    assert (t.underlying, t.expiry, t.strike, t.option_type, t.ltp, t.volume, t.oi) == (
        "NIFTY", "2026-08-25", 24200.0, market_pb2.OPTION_TYPE_CALL, 101.5, 10, 20)
    assert t.HasField("iv") and not t.HasField("gamma")
    assert t.exchange_time.ToDatetime(tzinfo=UTC) == datetime(2026, 8, 18, 5, 13, tzinfo=UTC)


def test_array_aliases_and_time_forms() -> None:
    msgs = [
        {"expiry": "2026-08-25", "strike": "24200", "type": "pe", "last_price": 5, "timestamp": "2026-08-18 10:43:00"},
        {"expiry": "2026-08-25", "strike": 24250, "option_type": "P", "ltp": 6, "ts": 1787029980},
        {"expiry": "2026-08-25", "strike": 24300, "option_type": 2, "ltp": 7, "ts": 1787029980000, "iv": None},
    ]
    batch, errors = parse_message(json.dumps({"ticks": msgs}).encode(), "NIFTY", "options")
    assert errors == []
    assert [t.option_type for t in batch.option_ticks] == [market_pb2.OPTION_TYPE_PUT] * 3
    times = {t.exchange_time.seconds for t in batch.option_ticks}
    assert times == {1787029980}  # naive ISO = IST; seconds and milliseconds since the epoch
    assert not batch.option_ticks[2].HasField("iv")


@pytest.mark.parametrize(("obj", "fragment"), [
    ({"strike": 24200, "option_type": "CE", "ltp": 1, "ts": 1}, "expiry"),
    ({"expiry": "2026-08-25", "option_type": "CE", "ltp": 1, "ts": 1}, "strike"),
    ({"expiry": "2026-08-25", "strike": 24200, "option_type": "XX", "ltp": 1, "ts": 1}, "option_type"),
    ({"expiry": "2026-08-25", "strike": 24200, "option_type": "CE", "ltp": "abc", "ts": 1}, "ltp"),
    ({"expiry": "2026-08-25", "strike": 24200, "option_type": "CE", "ltp": 1}, "exchange_time"),
    ({"expiry": "2026-08-25", "strike": 24200, "option_type": "CE", "ltp": 1, "ts": 1, "volume": 1.5}, "volume"),
    ({"expiry": "2026-08-25", "strike": 24200, "option_type": "CE", "ltp": 1, "ts": 1, "underlying": "BANKNIFTY"},
     "underlying"),
    ([1, 2], "JSON object"),
])
def test_structural_errors_are_reported(obj: object, fragment: str) -> None:
    batch, errors = parse_message(json.dumps(obj).encode(), "NIFTY", "options")
    assert len(batch.option_ticks) == 0
    assert errors and fragment in errors[0].detail and errors[0].raw


def test_not_json_is_one_error_with_raw_bytes() -> None:
    batch, errors = parse_message(b"\xff{not json", "NIFTY", "options")
    assert len(batch.option_ticks) == 0
    assert len(errors) == 1 and errors[0].raw == b"\xff{not json"


def test_values_are_passed_through_for_the_validator() -> None:
    msg = {"expiry": "2026-08-25", "strike": 24200, "option_type": "CE", "ltp": -1, "ts": 1787029980, "oi": -3}
    batch, errors = parse_message(json.dumps(msg).encode(), "NIFTY", "options")
    assert errors == [] and batch.option_ticks[0].ltp == -1 and batch.option_ticks[0].oi == -3


def test_underlying_message() -> None:
    batch, errors = parse_message(b'{"price": 24212.8, "exchange_time": "2026-08-18T10:43:00+05:30"}', "NIFTY",
                                  "underlying")
    assert errors == [] and batch.underlying_ticks[0].price == 24212.8
    batch, errors = parse_message(b'{"exchange_time": 1}', "NIFTY", "underlying")
    assert len(errors) == 1 and "price" in errors[0].detail


def test_parse_time_rejects_garbage() -> None:
    for bad in ("yesterday", True, None, [1]):
        with pytest.raises(ValueError):
            parse_time(bad)
