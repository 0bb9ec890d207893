"""Pytest fixtures for query tests (import them into a test module): a database holding the real 18-Aug day's
bars, loaded once per session into a template and copied per test, and an in-process QueryService on port 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from services.devstack.pg import PgCluster
from services.query.server import create_server, stop_server
from services.query.settings import QuerySettings
from tests.conftest import cloned_database
from tests.support.load_bars import load_nifty_day

_TEMPLATE = "optmon_query_bars_tpl"
#: Clusters whose template was built in this process (the fixture is re-bound per test module, the load is not).
_built: set[str] = set()


@pytest.fixture(scope="session")
def bars_template(pg_cluster: PgCluster, nifty_1min_csv: Path) -> str:
    """Name of a template database (migrated + the whole 18-Aug day loaded), built once per session."""
    base = pg_cluster.dsn.rsplit("/", 1)[0]
    if pg_cluster.dsn in _built:
        return _TEMPLATE
    with psycopg.connect(pg_cluster.dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {_TEMPLATE}")
        conn.execute(f"CREATE DATABASE {_TEMPLATE} TEMPLATE optmon_template")
    # A private loop: the session loop may not be running in a sync session fixture.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(load_nifty_day(f"{base}/{_TEMPLATE}", nifty_1min_csv))
    finally:
        loop.close()
    _built.add(pg_cluster.dsn)
    return _TEMPLATE


@pytest.fixture
def bars_dsn(pg_cluster: PgCluster, bars_template: str) -> Iterator[str]:
    """A fresh database with the 18-Aug bars (copy of the template) for one test."""
    with cloned_database(pg_cluster, bars_template, prefix="q") as dsn:
        yield dsn


def query_settings(pg_dsn: str, redis_url: str, **kw: object) -> QuerySettings:
    """Settings for an in-process test server on a free port."""
    return QuerySettings(pg_dsn=pg_dsn, redis_url=redis_url, query_port=0, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def query_server(bars_dsn: str, redis_url: str) -> AsyncIterator[tuple[object, str]]:
    """(server, "127.0.0.1:port") of a QueryService over the 18-Aug bars."""
    server, port = await create_server(query_settings(bars_dsn, redis_url))
    yield server, f"127.0.0.1:{port}"
    await stop_server(server)
