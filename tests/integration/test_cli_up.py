"""``optmon up`` argument handling: which replay it starts (the real day, a given file, or the synthetic session when
the shared data is absent), checked against the real ``optmon replay`` parser. The running stack itself is covered by
tests/integration/test_cli_supervisor.py and tests/e2e/test_stack.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import main as cli


def _plan(argv: list[str]) -> tuple[list[str], str] | None:
    return cli._replay_argv(cli.build_parser().parse_args(argv))


def _replay_args(argv: list[str]) -> object:
    i = argv.index("replay")
    return cli.build_parser().parse_args(argv[i:])


def test_default_replays_the_real_day_in_about_five_minutes(nifty_1min_csv: Path) -> None:
    plan = _plan(["up"])
    assert plan is not None
    argv, what = plan
    args = _replay_args(argv)
    assert Path(args.path).resolve() == nifty_1min_csv.resolve()  # type: ignore[attr-defined]
    speed = args.speed  # type: ignore[attr-defined]
    assert 4 * 60 <= 288 * 60 / speed <= 6 * 60  # 288 source minutes in 4–6 wall minutes
    assert "2026-08-18" in what


def test_synthetic_session_when_shared_data_is_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPTMON_SHARED_DATA", str(tmp_path / "nowhere"))
    plan = _plan(["up"])
    assert plan is not None
    args = _replay_args(plan[0])
    assert args.synthetic and args.path is None  # type: ignore[attr-defined]
    assert 4 * 60 <= args.minutes * 60 / args.speed <= 6 * 60  # type: ignore[attr-defined]
    assert "shared data not found" in capsys.readouterr().out


def test_no_replay_and_explicit_file(tmp_path: Path) -> None:
    assert _plan(["up", "--no-replay"]) is None
    f = tmp_path / "x.csv.gz"
    argv, _ = _plan(["up", "--replay", str(f), "--speed", "10"]) or ([], "")
    args = _replay_args(argv)
    assert Path(args.path) == f and args.speed == 10  # type: ignore[attr-defined]


def test_bad_speed_is_a_usage_error() -> None:
    assert cli.main(["up", "--speed", "0"]) == 2


@pytest.mark.parametrize("after", ["PostgreSQL", "migrations"])
def test_sigterm_during_start_up_stops_what_was_started(tmp_root: Path, after: str) -> None:
    """SIGTERM while Redis starts (after the PostgreSQL line) or while the services start (after the migrations
    line): `optmon up` stops everything it had started and exits 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from services.devstack.redis import free_port
    from services.devstack.supervisor import port_free

    names = ("GATEWAY", "ENVOY_ADMIN", "INGEST", "QUERY", "STREAM", "PG", "REDIS")
    ports = {n: free_port() for n in names}
    env = {**os.environ, **{f"OPTMON_{n}_PORT": str(p) for n, p in ports.items()},
           "OPTMON_INGEST_METRICS_PORT": "0", "OPTMON_QUERY_METRICS_PORT": "0", "OPTMON_STREAM_METRICS_PORT": "0"}
    env.pop("OPTMON_PG_DSN", None)
    env.pop("OPTMON_REDIS_URL", None)
    state = tmp_root / f"sigterm-{ports['GATEWAY']}"
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--no-replay", "--state-dir", str(state)],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(after):
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out
    assert "stopped during start-up" in out or "stopped (" in out, out
    deadline = time.monotonic() + 10  # the children are gone: every port is free again
    while not all(port_free(p) for p in ports.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(port_free(p) for p in ports.values()), out
    assert not list((state / "run").glob("*.pid")), out
