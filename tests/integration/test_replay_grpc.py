"""``optmon replay --grpc``: real-day and 5-minute snapshots through a real in-process ingest (PublishTicks, real
PostgreSQL and Redis); every published tick is answered as accepted or rejected."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from datetime import date, time
from pathlib import Path

import grpc
import pytest

from services.ingest.server import app_of, create_server
from services.ingest.settings import IngestSettings
from services.replay import cli
from services.replay.publisher import publish_grpc
from services.replay.sources import open_source
from services.replay.synthetic import synthetic_session
from tests.conftest import INDEX_5MIN_DIR


@pytest.fixture
async def ingest_addr(pg_dsn: str, redis_url: str) -> AsyncIterator[str]:
    settings = IngestSettings(pg_dsn=pg_dsn, redis_url=redis_url, ingest_port=0, metrics_port=0,
                              ingest_streams_enabled=False, ingest_pubsub_enabled=False)
    server, port = await create_server(settings)
    app = app_of(server)
    await app.wait_ready(30)
    yield f"127.0.0.1:{port}"
    await app.stop()


async def test_publish_grpc_real_minutes(ingest_addr: str, nifty_1min_csv: Path) -> None:
    async with grpc.aio.insecure_channel(ingest_addr) as channel:
        snaps = open_source(nifty_1min_csv, start=time(10, 43), end=time(10, 44))
        stats = await publish_grpc(snaps, channel, max_speed=True)
    assert stats.snapshots == 2
    assert stats.accepted is not None and stats.rejected is not None
    assert stats.accepted + stats.rejected == stats.rows + stats.underlying_ticks
    assert stats.accepted > 0.9 * stats.rows


async def test_cli_grpc_5min_parity_spot(ingest_addr: str) -> None:
    """MIDCPNIFTY (Spot 0 in the file) goes through with its parity-derived underlying."""
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([str(INDEX_5MIN_DIR / "index_oc_2026-01-30.csv.gz"), "--max-speed", "--grpc", ingest_addr,
                              "--underlying", "MIDCPNIFTY", "--start", "09:15", "--end", "09:30"])
    stats = await cli.run(args, IngestSettings())
    assert stats.snapshots == 3 and stats.underlying_ticks == 3
    assert stats.accepted is not None and stats.rejected is not None
    assert stats.accepted + stats.rejected == stats.rows + stats.underlying_ticks
    assert stats.accepted > 0.9 * stats.rows, stats.rejected_by_reason


async def test_synthetic_session_fully_accepted_by_ingest(ingest_addr: str) -> None:
    """Every synthetic tick passes ingest's validation (grid, expiry, IV range, finite Greeks, session time)."""
    snaps = synthetic_session(["NIFTY", "BANKNIFTY", "FINNIFTY", "MIDCPNIFTY"], day=date(2026, 8, 17), minutes=2,
                              seed=5)
    async with grpc.aio.insecure_channel(ingest_addr) as channel:
        stats = await publish_grpc(snaps, channel, max_speed=True)
    assert stats.snapshots == 8
    assert (stats.accepted, stats.rejected) == (stats.rows + stats.underlying_ticks, 0), stats.rejected_by_reason
