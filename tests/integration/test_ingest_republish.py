"""Republish mode covers every bar a commit changed: a call ``C`` is committed (its BarUpdates are then treated as
lost, as when ingest dies between commit and publish), and the same ticks processed again with
``Pipeline.process(..., republish=True)`` — by a restarted process or by a replica that was running all along — must
publish every bar ``C`` changed, in every timeframe, with its stored value, and change no row.

Scenarios on the real 18-Aug NIFTY data: an in-order minute; a late minute (its session's later bars get new volume
and ΔOI from the SQL recompute); an index tick alone that moves the ATM strike (every bar of its buckets, of every
expiry, is re-stamped with a new moneyness). The same ticks processed again without republish publish nothing —
the gap republish closes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from optmon.v1 import market_pb2

from services.common.domain.timeframes import Timeframe
from tests.integration.ingest_inputs_support import BarKey, bar_events, last_event_id, stored_strike_bars
from tests.integration.test_ingest_pipeline_support import pipeline, snapshots

MINUTES = 7  # 10:43 .. 10:49 IST


def _scenario(name: str, snaps: list[market_pb2.TickBatch]) -> tuple[list[market_pb2.TickBatch],
                                                                     list[market_pb2.TickBatch]]:
    """(history committed first, the ticks of the commit whose events get lost)."""
    if name == "in_order":
        return snaps[:5], snaps[5:]
    if name == "late_minute":
        return snaps[:3] + snaps[4:], [snaps[3]]
    assert name == "atm_move"
    last = snaps[-1].underlying_ticks[0]
    moved = market_pb2.UnderlyingTick(underlying=last.underlying, price=last.price + 400.0)
    moved.exchange_time.FromSeconds(last.exchange_time.seconds + 30)
    return snaps, [market_pb2.TickBatch(underlying_ticks=[moved])]


def _check_scenario(name: str, changed: dict[BarKey, market_pb2.StrikeBar], crashed: list[market_pb2.TickBatch],
                    before: dict[BarKey, market_pb2.StrikeBar]) -> None:
    """The scenario really exercises what it is named after."""
    tfs = {k[0] for k in changed}
    assert tfs == {int(tf) for tf in Timeframe}, tfs
    if name == "late_minute":
        minute = crashed[0].underlying_ticks[0].exchange_time.seconds // 60 * 60
        recomputed = [k for k in changed if k[0] == Timeframe.M1 and k[3] > minute]
        assert recomputed, "the late minute changed no later 1M bar (no session recompute)"
    if name == "atm_move":
        restamped = [k for k, b in changed.items() if before[k].moneyness_level != b.moneyness_level]
        assert len(restamped) > 100, "the index tick re-stamped no moneyness"


@pytest.mark.parametrize("by", ["restarted", "replica"])
@pytest.mark.parametrize("name", ["in_order", "late_minute", "atm_move"])
async def test_republish_publishes_every_bar_the_lost_commit_changed(pg_dsn: str, redis_url: str,
                                                                      nifty_1min_csv: Path, name: str,
                                                                      by: str) -> None:
    history, crashed = _scenario(name, snapshots(nifty_1min_csv, MINUTES))
    async with pipeline(pg_dsn, redis_url) as (first, _pool, _r):
        for b in history:
            await first.process([(b, "history")])
        before = await stored_strike_bars(pg_dsn)
        async with pipeline(pg_dsn, redis_url) as (replica, _pool2, r):
            # "replica" has been running since before the lost commit: it notices another writer and reloads its state
            # under the lock; "restarted" starts after it, from the database.
            await first.process([(b, "lost") for b in crashed])
            after = await stored_strike_bars(pg_dsn)
            changed = {k: v for k, v in after.items() if before.get(k) != v}
            _check_scenario(name, changed, crashed, before)
            if by == "restarted":
                async with pipeline(pg_dsn, redis_url) as (restarted, _pool3, _r3):
                    mark = await last_event_id(r)
                    again = await restarted.process([(b, "again") for b in crashed])
                    assert again.bar_updates == 0, "ticks already committed changed bars"
                    res = await restarted.process([(b, "redelivered") for b in crashed], republish=True)
            else:
                mark = await last_event_id(r)
                again = await replica.process([(b, "again") for b in crashed])
                assert again.bar_updates == 0, "ticks already committed changed bars"
                res = await replica.process([(b, "redelivered") for b in crashed], republish=True)
            _updates, republished = await bar_events(r, mark)
    assert await stored_strike_bars(pg_dsn) == after, "processing the ticks again changed stored bars"
    assert res.republished_bars >= len(changed)
    missing = sorted(k for k in changed if k not in republished)
    assert not missing, f"{len(missing)} of {len(changed)} changed bars not republished, e.g. {missing[:5]}"
    wrong = sorted(k for k, b in republished.items() if after.get(k) != b)
    assert not wrong, f"republished bars differ from the stored ones, e.g. {wrong[:5]}"
