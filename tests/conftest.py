"""Shared fixtures: a real PostgreSQL cluster and a real Redis, started once per test session on free loopback
ports, plus a fresh migrated database and a clean Redis database for every test that asks."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from services.devstack.pg import PgCluster
from services.devstack.redis import RedisServer, free_port
from services.ingest.store import migrations

#: Repository root and the shared real-data folder (`../shared/data` beside the checkout).
ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("OPTMON_SHARED_DATA", ROOT.parent / "shared" / "data"))
NIFTY_1MIN = SHARED_DATA / "nifty-oc-1min-2026-08" / "nifty_oc_1min_2026-08-18.csv.gz"
INDEX_5MIN_DIR = SHARED_DATA / "nse-index-oc-5min-2026-01"


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    """A session temp directory (removed at the end)."""
    d = Path(tempfile.mkdtemp(prefix="optmon-test-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster(tmp_root: Path) -> Iterator[PgCluster]:
    """A private PostgreSQL cluster with a migrated template database ``optmon_template``."""
    cluster = PgCluster(root=tmp_root / "pg", port=free_port())
    cluster.init()
    cluster.start()
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE optmon_template")
    migrations.apply(cluster.dsn.rsplit("/", 1)[0] + "/optmon_template")
    yield cluster
    cluster.stop("immediate")


_db_counter = itertools.count()


@contextmanager
def cloned_database(cluster: PgCluster, template: str, prefix: str = "t") -> Iterator[str]:
    """A new database copied from ``template`` on ``cluster``; yields its DSN and drops it afterwards."""
    name = f"{prefix}{os.getpid()}_{next(_db_counter)}"
    base = cluster.dsn.rsplit("/", 1)[0]
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh, migrated database (copied from the template) for one test; dropped afterwards."""
    with cloned_database(pg_cluster, "optmon_template") as dsn:
        yield dsn


@pytest.fixture(scope="session")
def redis_server(tmp_root: Path) -> Iterator[RedisServer]:
    """A private redis-server for the session."""
    server = RedisServer(root=tmp_root / "redis", port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session Redis, flushed before the test."""
    import redis as redis_sync

    client = redis_sync.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def nifty_1min_csv() -> Path:
    """The real 18-Aug-2026 NIFTY 1-minute chain file. Missing shared data fails loudly (never skips)."""
    assert NIFTY_1MIN.exists(), f"shared data missing: {NIFTY_1MIN}"
    return NIFTY_1MIN
