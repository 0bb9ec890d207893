"""``make bench``: run every ``benchmarks/bench_*.py`` against one shared private PostgreSQL and Redis.

Each module exposes ``async def run(ctx: BenchContext) -> list[Result]``. Every module gets a fresh migrated database
(``ctx.pg_dsn``) and a flushed Redis (``ctx.redis_url``); a module that raises is reported and the others still run.
The table (value, baseline, ratio, goal) is printed and the rows are merged into ``.bench/results.json``.

Usage::

    python -m benchmarks.run                 # all modules
    python -m benchmarks.run query stream    # modules whose name contains one of the words
    python -m benchmarks.run --list

A module can also run alone with its own servers: ``asyncio.run(benchmarks.run.standalone(run))``.
Exit code 0 when every module succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import itertools
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import Result, format_table, write_results
from services.devstack.pg import PgCluster
from services.devstack.redis import RedisServer, free_port

#: Repository root; ``../shared/data`` beside it holds the real data (``OPTMON_SHARED_DATA`` overrides).
ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("OPTMON_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / ".bench" / "results.json"

_db_counter = itertools.count()


@dataclass
class BenchContext:
    """What a benchmark gets.

    ``pg_dsn``: a fresh database with every migration applied (asyncpg/psycopg DSN); ``redis_url``: a flushed Redis;
    ``pg_cluster`` / ``redis_server``: the servers themselves (e.g. to stop PostgreSQL in a failure benchmark; the
    runner restarts them for the next module); ``work_dir``: a private temp folder; ``shared_data``: the real data
    folder; ``root``: the repository. ``new_database()`` makes another fresh migrated database.
    """

    pg_dsn: str
    redis_url: str
    pg_cluster: PgCluster
    redis_server: RedisServer
    work_dir: Path
    shared_data: Path = SHARED_DATA
    root: Path = ROOT
    extra_databases: list[str] = field(default_factory=list)

    def new_database(self) -> str:
        """A fresh database copied from the migrated template; returns its DSN."""
        dsn = _create_db(self.pg_cluster)
        self.extra_databases.append(dsn)
        return dsn


def _admin(cluster: PgCluster) -> str:
    return cluster.dsn


def _create_db(cluster: PgCluster) -> str:
    import psycopg

    name = f"bench_{os.getpid()}_{next(_db_counter)}"
    with psycopg.connect(_admin(cluster), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE optmon_template")
    return cluster.dsn.rsplit("/", 1)[0] + "/" + name


def _drop_db(cluster: PgCluster, dsn: str) -> None:
    import psycopg

    name = dsn.rsplit("/", 1)[1]
    with psycopg.connect(_admin(cluster), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@asynccontextmanager
async def servers() -> AsyncIterator[tuple[PgCluster, RedisServer, Path]]:
    """A private PostgreSQL (with a migrated ``optmon_template`` database) and Redis on free ports in a temp dir."""
    import psycopg

    from services.ingest.store import migrations

    tmp = Path(tempfile.mkdtemp(prefix="optmon-bench-"))
    os.chmod(tmp, 0o755)
    cluster = PgCluster(root=tmp / "pg", port=free_port())
    redis = RedisServer(root=tmp / "redis", port=free_port())
    try:
        await asyncio.to_thread(cluster.init)
        await asyncio.to_thread(cluster.start)
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE optmon_template")
        await asyncio.to_thread(migrations.apply, cluster.dsn.rsplit("/", 1)[0] + "/optmon_template")
        await asyncio.to_thread(redis.start)
        yield cluster, redis, tmp
    finally:
        redis.stop()
        await asyncio.to_thread(cluster.stop, "immediate")
        shutil.rmtree(tmp, ignore_errors=True)


async def _run_one(
    name: str, fn: Callable[[BenchContext], Awaitable[list[Result]]], cluster: PgCluster, redis: RedisServer,
    tmp: Path,
) -> list[Result]:
    import redis as redis_sync

    # a previous module may have stopped a server on purpose
    if not cluster.running():
        await asyncio.to_thread(cluster.start)
    if redis.proc is None or redis.proc.poll() is not None:
        await asyncio.to_thread(redis.start)
    client = redis_sync.Redis.from_url(redis.url)
    client.flushall()
    client.close()
    dsn = await asyncio.to_thread(_create_db, cluster)
    work = tmp / f"work-{name}"
    work.mkdir(parents=True, exist_ok=True)
    ctx = BenchContext(pg_dsn=dsn, redis_url=redis.url, pg_cluster=cluster, redis_server=redis, work_dir=work)
    try:
        return list(await fn(ctx))
    finally:
        if not cluster.running():
            await asyncio.to_thread(cluster.start)
        for d in [dsn, *ctx.extra_databases]:
            await asyncio.to_thread(_drop_db, cluster, d)


async def standalone(fn: Callable[[BenchContext], Awaitable[list[Result]]], name: str = "standalone") -> list[Result]:
    """Run one benchmark function with its own private servers; prints its table and returns the rows."""
    async with servers() as (cluster, redis, tmp):
        results = await _run_one(name, fn, cluster, redis, tmp)
    print(format_table(results))
    return results


def discover(words: Sequence[str] = ()) -> list[str]:
    """Module names ``benchmarks.bench_*`` (sorted), filtered to those containing one of ``words``."""
    names = sorted(f"benchmarks.{p.stem}" for p in (ROOT / "benchmarks").glob("bench_*.py"))
    return [n for n in names if not words or any(w in n for w in words)]


async def run_all(modules: Sequence[str], results_path: Path = RESULTS) -> tuple[list[Result], list[str]]:
    """Run ``modules``; returns every Result and the names of the modules that failed. Writes ``results_path``."""
    results: list[Result] = []
    failed: list[str] = []
    async with servers() as (cluster, redis, tmp):
        for mod_name in modules:
            short = mod_name.rsplit(".", 1)[1]
            t0 = time.monotonic()
            print(f"== {short} ...", flush=True)
            try:
                module = importlib.import_module(mod_name)
                rows = await _run_one(short, module.run, cluster, redis, tmp)
            except Exception:
                failed.append(short)
                print(f"!! {short} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                continue
            results.extend(rows)
            print(format_table(rows), flush=True)
            print(f"   ({time.monotonic() - t0:.1f} s)", flush=True)
    if results:
        write_results(results, results_path)
    return results, failed


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run")
    ap.add_argument("words", nargs="*", help="run only modules whose name contains one of these")
    ap.add_argument("--list", action="store_true", help="list the modules and exit")
    ap.add_argument("--results", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = ap.parse_args(argv)
    modules = discover(args.words)
    if args.list:
        print("\n".join(modules))
        return 0
    if not modules:
        print("no benchmark modules found (benchmarks/bench_*.py)", file=sys.stderr)
        return 1
    results, failed = asyncio.run(run_all(modules, args.results))
    print("\n" + format_table(results))
    print(f"\n{len(results)} results from {len(modules) - len(failed)} of {len(modules)} modules"
          f"{'; FAILED: ' + ', '.join(failed) if failed else ''} → {args.results}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
