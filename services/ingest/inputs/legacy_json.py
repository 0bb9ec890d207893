"""The predecessor's JSON tick format (pub/sub ``ticker:<U>:options`` / ``ticker:<U>:underlying``) → protobuf ticks.

Pure conversion (no I/O). The accepted schema is documented in docs/ingest.md. A message is one JSON object, a JSON
array of objects, or ``{"ticks": [...]}``. Structural problems (not JSON, a missing or unconvertible field, an
underlying that contradicts the channel) make that object a MALFORMED dead letter; value checks (LTP > 0, strike on
the grid, ...) are the validator's, exactly as for every other input.

Option object fields: ``expiry`` ("YYYY-MM-DD"), ``strike`` (index points), ``option_type`` ("CE"/"PE", also
"CALL"/"PUT"/"C"/"P"; alias ``type``), ``ltp`` ₹ (alias ``last_price``), ``volume`` (cumulative day volume,
contracts; default 0), ``oi`` (contracts; default 0), optional ``iv`` (percent), ``delta``, ``gamma``, ``theta``,
``vega``, ``underlying_price``, ``futures_price``, ``exchange_time`` (alias ``timestamp``, ``ts``): ISO 8601 with
an offset, ISO 8601 without offset = IST, or a number of seconds (or milliseconds when > 1e11) since the Unix
epoch. ``underlying`` (alias ``symbol``) is optional and must equal the channel's. ``null`` = absent.
Underlying object fields: ``price`` (alias ``ltp``, ``last_price``), ``exchange_time`` as above.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from optmon.v1 import market_pb2

IST = timezone(timedelta(hours=5, minutes=30))
_TYPES = {"CE": market_pb2.OPTION_TYPE_CALL, "CALL": market_pb2.OPTION_TYPE_CALL, "C": market_pb2.OPTION_TYPE_CALL,
          "PE": market_pb2.OPTION_TYPE_PUT, "PUT": market_pb2.OPTION_TYPE_PUT, "P": market_pb2.OPTION_TYPE_PUT}
_OPTIONAL = ("iv", "delta", "gamma", "theta", "vega", "underlying_price", "futures_price")


class JsonTickError(ValueError):
    """One object could not be converted; ``raw`` is its JSON text."""

    def __init__(self, detail: str, raw: bytes) -> None:
        super().__init__(detail)
        self.detail = detail
        self.raw = raw


def _first(obj: dict[str, Any], *names: str) -> Any:
    for n in names:
        v = obj.get(n)
        if v is not None:
            return v
    return None


def _number(obj: dict[str, Any], *names: str, required: bool = True, default: float | None = None) -> float | None:
    v = _first(obj, *names)
    if v is None:
        if required and default is None:
            raise ValueError(f"{names[0]} missing")
        return default
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ValueError(f"{names[0]}={v!r} is not a number")
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"{names[0]}={v!r} is not a number") from None


def _integer(obj: dict[str, Any], name: str) -> int:
    f = _number(obj, name, default=0.0)
    assert f is not None
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"{name}={f!r} is not an integer")
    i = int(f)
    if not -(2**63) <= i < 2**63:
        raise ValueError(f"{name}={i} out of range")
    return i


def parse_time(v: Any) -> Timestamp:
    """An ``exchange_time`` value → Timestamp (UTC). Raises ValueError."""
    if isinstance(v, bool) or v is None:
        raise ValueError("exchange_time missing")
    if isinstance(v, int | float):
        secs = float(v) / 1000.0 if abs(v) > 1e11 else float(v)
        if not math.isfinite(secs):
            raise ValueError(f"exchange_time={v!r}")
        dt = datetime.fromtimestamp(secs, UTC)
    elif isinstance(v, str):
        dt = datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=IST)
    else:
        raise ValueError(f"exchange_time={v!r}")
    ts = Timestamp()
    ts.FromDatetime(dt.astimezone(UTC))
    return ts


def _objects(data: bytes) -> list[tuple[Any, bytes]]:
    """Split a message into (object, its raw JSON) pairs. Raises JsonTickError when the message is not JSON."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise JsonTickError(f"not JSON: {e}", data) from None
    if isinstance(doc, dict) and isinstance(doc.get("ticks"), list):
        doc = doc["ticks"]
    items = doc if isinstance(doc, list) else [doc]
    if len(items) == 1:
        return [(items[0], data)]
    return [(o, json.dumps(o, default=str).encode()) for o in items]


def _check_underlying(obj: dict[str, Any], underlying: str) -> None:
    u = _first(obj, "underlying", "symbol")
    if u is not None and str(u).upper() != underlying:
        raise ValueError(f"underlying={u!r} on the channel of {underlying}")


def option_tick_from_json(obj: Any, underlying: str) -> market_pb2.OptionTick:
    """One JSON object → OptionTick of ``underlying``. Raises ValueError naming the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    _check_underlying(obj, underlying)
    raw_type = _first(obj, "option_type", "type")
    if isinstance(raw_type, str) and raw_type.upper() in _TYPES:
        otype: int = _TYPES[raw_type.upper()]
    elif isinstance(raw_type, int | float) and not isinstance(raw_type, bool) and raw_type in (1, 2):
        otype = int(raw_type)
    else:
        raise ValueError(f"option_type={raw_type!r} (CE or PE)")
    expiry = obj.get("expiry")
    if not isinstance(expiry, str):
        raise ValueError(f"expiry={expiry!r} (YYYY-MM-DD)")
    tick = market_pb2.OptionTick(
        underlying=underlying,
        expiry=expiry.strip()[:10] if "T" in expiry else expiry.strip(),
        strike=_number(obj, "strike"),
        option_type=otype,  # type: ignore[arg-type]
        ltp=_number(obj, "ltp", "last_price"),
        volume=_integer(obj, "volume"),
        oi=_integer(obj, "oi"),
        exchange_time=parse_time(_first(obj, "exchange_time", "timestamp", "ts")),
    )
    for name in _OPTIONAL:
        v = _number(obj, name, required=False)
        if v is not None:
            setattr(tick, name, v)
    return tick


def underlying_tick_from_json(obj: Any, underlying: str) -> market_pb2.UnderlyingTick:
    """One JSON object → UnderlyingTick of ``underlying``. Raises ValueError naming the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    _check_underlying(obj, underlying)
    return market_pb2.UnderlyingTick(
        underlying=underlying,
        price=_number(obj, "price", "ltp", "last_price"),
        exchange_time=parse_time(_first(obj, "exchange_time", "timestamp", "ts")),
    )


def parse_message(
    data: bytes, underlying: str, kind: str
) -> tuple[market_pb2.TickBatch, list[JsonTickError]]:
    """A pub/sub message of ``kind`` ``"options"`` or ``"underlying"`` → (batch of the good ticks, errors).

    Never raises on input: every unusable object (or the whole message when it is not JSON) is one JsonTickError.
    """
    batch = market_pb2.TickBatch()
    errors: list[JsonTickError] = []
    try:
        objects = _objects(data)
    except JsonTickError as e:
        return batch, [e]
    for obj, raw in objects:
        try:
            if kind == "options":
                batch.option_ticks.append(option_tick_from_json(obj, underlying))
            else:
                batch.underlying_ticks.append(underlying_tick_from_json(obj, underlying))
        except (ValueError, TypeError, OverflowError) as e:
            errors.append(JsonTickError(str(e), raw))
    return batch, errors
