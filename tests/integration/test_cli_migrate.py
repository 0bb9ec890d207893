"""``optmon migrate`` against a real PostgreSQL database (fixture ``pg_dsn``: fresh, already migrated)."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from services.cli.main import main
from services.devstack.redis import free_port


def _tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'")}


def test_status_rollback_and_apply(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    from services.ingest.store import migrations

    n = len(migrations.status(pg_dsn))
    assert main(["migrate", "--status", "--dsn", pg_dsn]) == 0
    out = capsys.readouterr().out
    assert "applied  0001_bars" in out and "pending" not in out and f"{n} of {n} applied" in out

    assert main(["migrate", "--rollback", str(n), "--dsn", pg_dsn]) == 0
    assert f"rolled back {n} migration(s)" in capsys.readouterr().out
    assert "bars_1m" not in _tables(pg_dsn)
    assert main(["migrate", "--status", "--dsn", pg_dsn]) == 0
    out = capsys.readouterr().out
    assert "pending  0001_bars" in out and f"0 of {n} applied" in out

    assert main(["migrate", "--dsn", pg_dsn]) == 0
    assert f"applied {n} migration(s)" in capsys.readouterr().out
    assert {"bars_1m", "bars_5m", "bars_15m", "bars_1h", "bars_latest"} <= _tables(pg_dsn)
    assert main(["migrate", "--dsn", pg_dsn]) == 0  # idempotent
    assert "applied 0 migration(s)" in capsys.readouterr().out


def test_bad_usage_and_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--rollback", "0"]) == 2
    dsn = f"postgresql://optmon:secret@127.0.0.1:{free_port()}/optmon"
    assert main(["migrate", "--status", "--dsn", dsn]) == 1
    err = capsys.readouterr().err
    assert "optmon migrate failed" in err and "secret" not in err


def test_console_script_reads_optmon_pg_dsn(pg_dsn: str) -> None:
    optmon = os.path.join(os.path.dirname(sys.executable), "optmon")
    r = subprocess.run([optmon, "migrate", "--status"], env={**os.environ, "OPTMON_PG_DSN": pg_dsn},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "applied  0001_bars" in r.stdout
