"""Pure stream logic: filter normalisation, the window following ATM, deltas and conflation."""

from __future__ import annotations

import random

import pytest
from optmon.v1 import stream_service_pb2

from services.common.settings import DEFAULT_STRIKE_STEPS
from services.stream import codec
from services.stream.domain.conflation import merge
from services.stream.domain.filters import InvalidFilter, normalize
from services.stream.domain.model import Bar
from services.stream.domain.window import Book, GroupView
from services.stream.testing import ReferenceClient, synthetic_chain

STEPS = dict(DEFAULT_STRIKE_STEPS)
STRIKES = [24000.0 + 50 * i for i in range(21)]
E = "2026-08-25"


def _norm(**kw):  # type: ignore[no-untyped-def]
    args = dict(underlying="nifty", timeframe=0, expiries=[], strikes_around_atm=0, strike_min=0.0, strike_max=0.0,
                indicators=[], max_updates_per_second=0.0, last_sequence=0, strike_steps=STEPS)
    args.update(kw)
    return normalize(**args)


def test_normalize_defaults_and_group_key() -> None:
    f, rate = _norm()
    assert (f.underlying, f.timeframe, f.strikes_around_atm, rate) == ("NIFTY", 1, 10, 4.0)
    assert f.indicators == tuple(range(1, 10)) and not f.explicit_range
    g, _ = _norm(indicators=[0, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9], max_updates_per_second=10)
    assert f == g  # same group whatever the order / duplicates / rate
    r, _ = _norm(strike_min=24000, strike_max=24500, strikes_around_atm=7)
    assert r.explicit_range and r.strikes_around_atm == 0


def test_normalize_reports_every_bad_field() -> None:
    with pytest.raises(InvalidFilter) as ei:
        _norm(underlying="SENSEX", timeframe=9, expiries=["2026-13-01"] + [f"2026-09-0{i}" for i in range(1, 8)],
              strikes_around_atm=51, indicators=[10], max_updates_per_second=50, last_sequence=-1)
    fields = [f for f, _ in ei.value.violations]
    assert set(fields) == {"underlying", "timeframe", "expiries", "strikes_around_atm", "indicators",
                           "max_updates_per_second", "last_sequence"}
    with pytest.raises(InvalidFilter) as ei:
        _norm(strike_min=25000, strike_max=24000)
    assert [f for f, _ in ei.value.violations] == ["strike_min"]


def _book_at(price: float, minute: int) -> tuple[Book, dict[str, set[float]]]:
    book = Book(50.0, 300)
    bars = [codec.bar_from_pb(b) for b in synthetic_chain("NIFTY", [E], STRIKES, 1000 + 60 * minute, price, 50.0,
                                                          minute=minute)]
    touched = book.apply(bars, 1000 + 60 * minute, price)
    return book, touched


def test_window_follows_atm() -> None:
    f, _ = _norm(strikes_around_atm=2, expiries=[E])
    book, _ = _book_at(24510.0, 0)
    view = GroupView(f, [E])
    view.rebuild(book)
    assert view.windows[E] == [24400.0, 24450.0, 24500.0, 24550.0, 24600.0]
    bars = [codec.bar_from_pb(b) for b in synthetic_chain("NIFTY", [E], STRIKES, 1060, 24590.0, 50.0, minute=1)]
    touched = book.apply(bars, 1060, 24590.0)
    d = view.apply(book, touched)
    assert d is not None
    (ch,) = d.expiries
    assert ch.atm_strike == 24600.0 and ch.removed == {24400.0, 24450.0}
    assert {s for s, c in ch.bars.items() if c.full} == {24650.0, 24700.0}
    assert view.windows[E] == [24500.0, 24550.0, 24600.0, 24650.0, 24700.0]
    again = view.apply(book, touched)  # once per update: one change for every group sharing the view
    assert again is not None and again.expiries[0] is ch
    assert view.apply(book, book.apply([], 1060, 24590.0)) is None  # nothing changed: nothing sent


def test_delta_carries_only_changed_fields() -> None:
    b = Bar(24500.0, 60, 24510.0, 0, 24500.0, (1.0,) * 13, None)
    f, _ = _norm(strikes_around_atm=1, expiries=[E])
    book = Book(50.0, 300)
    book.apply([(E, b)], 60, 24510.0)
    view = GroupView(f, [E])
    view.rebuild(book)
    leg = list(b.call or ())
    leg[9] = 7  # OI
    touched = book.apply([(E, Bar(24500.0, 60, 24510.0, 0, 24500.0, tuple(leg), None))], 60, 24510.0)
    d = view.apply(book, touched)
    assert d is not None
    msg = codec.delta_to_pb(d)
    (e,) = msg.expiries
    assert not e.bars  # nothing as doubles: the OI change travels in fixed point
    assert list(e.changes.offsets) == [0] and list(e.changes.fields) == [1 << (1 + 9)] and list(e.changes.values) == [6]
    leg[4] = 1 / 3  # an IV off the 0.01 % grid: a double in a StrikeBar with only that field
    touched = book.apply([(E, Bar(24500.0, 60, 24510.0, 0, 24500.0, tuple(leg), None))], 60, 24510.0)
    d = view.apply(book, touched)
    assert d is not None
    (e,) = codec.delta_to_pb(d).expiries
    assert [f.name for f, _ in e.bars[0].ListFields()] == ["strike", "call"]
    assert [f.name for f, _ in e.bars[0].call.ListFields()] == ["iv"]
    assert not e.HasField("changes")


def _resp(seq: int, body: bytes) -> stream_service_pb2.SubscribeResponse:
    return stream_service_pb2.SubscribeResponse.FromString(codec.sequence_prefix(seq) + body)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_conflation_equals_applying_one_by_one(seed: int) -> None:
    rnd = random.Random(seed)
    f, _ = _norm(strikes_around_atm=3, expiries=[E], indicators=[1, 2, 7])
    book, _ = _book_at(24500.0, 0)
    view = GroupView(f, [E])
    view.rebuild(book)
    one, merged = ReferenceClient("NIFTY"), ReferenceClient("NIFTY")
    snap = codec.snapshot_body(view.snapshot(book, "NIFTY"))
    one.apply(_resp(1, snap))
    merged.apply(_resp(1, snap))
    pending = None
    seq = 1
    for minute in range(1, 30):
        price = 24500.0 + rnd.choice([-120, -60, -20, 0, 10, 40, 90])
        bars = [codec.bar_from_pb(b) for b in synthetic_chain("NIFTY", [E], STRIKES, 1000 + 60 * (minute // 2),
                                                              price, 50.0, minute=minute)]
        if rnd.random() < 0.3:  # a leg disappears: the strike is replaced, not merged
            e, bar = bars[rnd.randrange(len(bars))]
            bars.append((e, Bar(bar.strike, bar.bucket_time, bar.underlying_close, bar.moneyness_level,
                                bar.atm_strike, None, bar.put)))
        d = view.apply(book, book.apply(bars, 1000 + 60 * (minute // 2), price))
        if d is None:
            continue
        seq += 1
        body = codec.delta_body(d)
        assert _resp(seq, body) == _resp(seq, codec.delta_body(d, shared=False)).__class__.FromString(
            codec.sequence_prefix(seq) + body)
        one.apply(_resp(seq, body))
        pending = d if pending is None else merge(pending, d)
    assert pending is not None and pending.conflated > 0
    merged.apply(_resp(2, codec.delta_body(pending, shared=False)))
    assert merged.distribution() == one.distribution()
    assert one.distribution() == codec.distribution_to_pb(view.snapshot(book, "NIFTY"))
