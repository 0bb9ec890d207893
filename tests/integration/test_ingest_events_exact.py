"""BarUpdate events carry exactly the committed bars, whether a 1M bar was inserted (not read back: the pipeline
builds it from its input) or merged with an earlier call (the stored row is read back), including bars tried as new
that turned out to exist: the last version of every bar across all events equals the bar's row in every table."""

from __future__ import annotations

from pathlib import Path

from optmon.v1 import market_pb2

from tests.integration.ingest_inputs_support import bar_events, stored_strike_bars
from tests.integration.test_ingest_pipeline_support import pipeline, snapshots

MINUTES = 8


def _legs(batch: market_pb2.TickBatch, option_type: int) -> market_pb2.TickBatch:
    out = market_pb2.TickBatch()
    out.underlying_ticks.extend(batch.underlying_ticks)
    out.option_ticks.extend(t for t in batch.option_ticks if t.option_type == option_type)
    return out


async def test_last_event_of_every_bar_equals_its_row(pg_dsn: str, redis_url: str, nifty_1min_csv: Path) -> None:
    batches = snapshots(nifty_1min_csv, MINUTES)
    async with pipeline(pg_dsn, redis_url) as (p, _pool, r):
        # Minutes 0-3 whole, two per call: every 1M bar is a fresh insert (answered by position only).
        for i in (0, 2):
            await p.process([(batches[i], "test"), (batches[i + 1], "test")])
        # Minutes 4-7: calls first, puts of the same minutes in the next call: the 1M rows of the second call are
        # merged with the stored call legs (answered with the stored rows).
        for i in (4, 6):
            await p.process([(_legs(batches[i], market_pb2.OPTION_TYPE_CALL), "test"),
                             (_legs(batches[i + 1], market_pb2.OPTION_TYPE_CALL), "test")])
            await p.process([(_legs(batches[i], market_pb2.OPTION_TYPE_PUT), "test"),
                             (_legs(batches[i + 1], market_pb2.OPTION_TYPE_PUT), "test")])
        # The last minute again, 1 µs later and 1 ₹ higher, with the pipeline's "newest committed bucket" forgotten:
        # its rows are tried as new inserts, conflict, and must be merged like any existing bar.
        later = market_pb2.TickBatch()
        later.CopyFrom(batches[MINUTES - 1])
        for t in later.option_ticks:
            t.exchange_time.nanos += 1000
            t.ltp += 1.0
        p._newest.clear()
        res = await p.process([(later, "test")])
        assert res.bar_updates == 4
        _updates, last = await bar_events(r)
    expected = await stored_strike_bars(pg_dsn)
    assert len(expected) > 1000
    assert last.keys() == expected.keys()
    assert [k for k in expected if last[k] != expected[k]] == []
