"""The ``optmon`` command.

- ``optmon up [--no-replay] [--replay PATH] [--speed X]`` — the embedded stack (services/devstack/supervisor.py):
  private PostgreSQL/Redis under ``.optmon/`` (or ``OPTMON_PG_DSN`` / ``OPTMON_REDIS_URL``), migrations, ingest,
  query, stream and Envoy; then replays the 18-Aug-2026 NIFTY day in about 5 minutes. Ctrl-C / SIGTERM stops it all.
- ``optmon migrate [--status | --rollback N]`` — schema migrations on ``OPTMON_PG_DSN``.
- ``optmon replay PATH [--speed X | --max-speed] ...`` — publish a shared-data file's ticks (services/replay/cli.py).

Exit codes: 0 success / clean stop, 1 failure (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.devstack.supervisor import REPO_ROOT, Stack, StackConfig, StackError

#: Process start, for "time from `optmon up` to the first answer".
_T0 = time.monotonic()

#: The 18-Aug-2026 NIFTY day, relative to the shared-data folder.
DEFAULT_REPLAY_FILE = Path("nifty-oc-1min-2026-08") / "nifty_oc_1min_2026-08-18.csv.gz"
#: 288 source minutes at 60× ≈ 4.8 minutes of wall time.
DEFAULT_REPLAY_SPEED = 60.0
#: The synthetic fallback: a full 375-minute session at 75× ≈ 5 minutes.
SYNTHETIC_MINUTES = 375
SYNTHETIC_SPEED = 75.0


def shared_data_dir() -> Path:
    """``OPTMON_SHARED_DATA``, else ``../shared/data`` beside the checkout."""
    env = os.environ.get("OPTMON_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def state_dir_default() -> Path:
    """``OPTMON_STATE_DIR``, else ``<repo>/.optmon``."""
    env = os.environ.get("OPTMON_STATE_DIR")
    return Path(env) if env else REPO_ROOT / ".optmon"


# --- optmon up ------------------------------------------------------------------------------------------------------
def _replay_argv(args: argparse.Namespace) -> tuple[list[str], str] | None:
    """The argv of the replay child and a description, or None for --no-replay."""
    if args.no_replay:
        return None
    base = [sys.executable, "-m", "services.cli", "replay"]
    if args.replay:
        speed = args.speed or DEFAULT_REPLAY_SPEED
        return [*base, str(args.replay), "--speed", str(speed)], f"{args.replay} at {speed:g}x"
    path = shared_data_dir() / DEFAULT_REPLAY_FILE
    if path.exists():
        speed = args.speed or DEFAULT_REPLAY_SPEED
        return [*base, str(path), "--speed", str(speed)], f"the real NIFTY day 2026-08-18 ({path}) at {speed:g}x"
    speed = args.speed or SYNTHETIC_SPEED
    print(f"shared data not found at {path}: replaying the synthetic session instead", flush=True)
    return ([*base, "--synthetic", "--minutes", str(SYNTHETIC_MINUTES), "--speed", str(speed)],
            f"a synthetic {SYNTHETIC_MINUTES}-minute session at {speed:g}x")


def _banner(stack: Stack) -> str:
    gw = stack.gateway_url
    q = stack.grpc_addr("query")
    grpcurl = REPO_ROOT / ".venv" / "bin" / "grpcurl"
    grpcurl_cmd = str(grpcurl) if grpcurl.exists() else "grpcurl"
    return "\n".join([
        "",
        f"  dashboard   {gw}/",
        f"  JSON        curl '{gw}/v1/underlyings/NIFTY/strike-distribution?strikes_around_atm=5'",
        f"  SSE         curl -N '{gw}/v1/underlyings/NIFTY/subscribe'",
        f"  gRPC        {grpcurl_cmd} -plaintext {q} list",
        f"              {grpcurl_cmd} -plaintext -d '{{\"underlying\":\"NIFTY\"}}' {q} "
        "optmon.v1.QueryService/GetStrikeDistribution",
        f"  logs        {stack.log_dir}/*.log",
        "  stop        Ctrl-C",
        "",
    ])


async def _up(args: argparse.Namespace) -> int:
    cfg = StackConfig.from_env(state_dir=Path(args.state_dir), gateway=not args.no_gateway)
    stack = Stack(cfg, out=lambda m: print(m, flush=True))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    starting = asyncio.create_task(stack.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # signalled during start-up: start() stops what it started when cancelled
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, StackError):
            await starting
        print("stopped during start-up", flush=True)
        return 0
    try:
        report = starting.result()
    except StackError as e:
        stopping.cancel()
        print(f"optmon up failed: {e}", file=sys.stderr, flush=True)
        return 1
    first = time.monotonic() - _T0
    print(f"stack up: first answer {first:.1f} s after `optmon up` (infra {report.infra_s:.1f} s, "
          f"services healthy {report.healthy_s:.1f} s)", flush=True)
    print(_banner(stack), flush=True)

    replay: subprocess.Popen[bytes] | None = None
    plan = _replay_argv(args)
    env = {**stack.child_env("replay"), "OPTMON_LOG_JSON": "false"}  # a person reads this one: console lines
    if plan:
        argv, what = plan
        print(f"replaying {what}", flush=True)
        # Own session (Ctrl-C goes to us); stdout/stderr inherited so the progress bar shows in this terminal.
        replay = subprocess.Popen(  # noqa: ASYNC220 (spawning is quick)
            argv, env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, start_new_session=True
        )

    died: asyncio.Task[str] = asyncio.create_task(stack.wait_for_exit())
    code = 0
    while True:
        await asyncio.wait({stopping, died}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
        if replay is not None and replay.poll() is not None:
            rc = replay.returncode
            print(f"replay finished (exit {rc}); the stack keeps running — Ctrl-C to stop", flush=True)
            replay = None
        if died.done():
            name = died.result()
            child = stack.children[name]
            print(f"{name} exited unexpectedly (code {child.proc.returncode if child.proc else '?'}); "
                  f"stopping the stack. Log {child.log_path}:\n{child.log_tail()}", file=sys.stderr, flush=True)
            code = 1
            break
        if stopping.done():
            break
    died.cancel()
    stopping.cancel()
    print("stopping: services, Envoy, Redis, PostgreSQL ...", flush=True)
    if replay is not None and replay.poll() is None:
        replay.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(replay.wait, 10)
        if replay.poll() is None:
            replay.kill()
    codes = await stack.stop()
    print("stopped (" + ", ".join(f"{n} exit {c}" for n, c in codes.items()) + ")", flush=True)
    return code


# --- optmon migrate -------------------------------------------------------------------------------------------------
def _dsn(args: argparse.Namespace) -> str:
    if getattr(args, "dsn", None):
        return str(args.dsn)
    from services.common.settings import CommonSettings

    return CommonSettings().pg_dsn


def _migrate(args: argparse.Namespace) -> int:
    from services.ingest.store import migrations

    dsn = _dsn(args)
    try:
        if args.status:
            rows = migrations.status(dsn)
            for mid, applied in rows:
                print(f"{'applied' if applied else 'pending':8} {mid}")
            print(f"{sum(a for _, a in rows)} of {len(rows)} applied")
        elif args.rollback is not None:
            n = migrations.rollback(dsn, args.rollback)
            print(f"rolled back {n} migration(s)")
        else:
            n = migrations.apply(dsn)
            print(f"applied {n} migration(s)")
    except Exception as e:  # connection refused, bad DSN, SQL error: one clear line, exit 1
        print(f"optmon migrate failed on {_redact(dsn)}: {type(e).__name__}: {e}".rstrip(), file=sys.stderr)
        return 1
    return 0


def _redact(dsn: str) -> str:
    """The DSN without its password."""
    if "@" in dsn and "://" in dsn:
        scheme, rest = dsn.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}@{host}"
    return dsn


# --- optmon replay --------------------------------------------------------------------------------------------------
def _add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        from services.replay import cli as replay_cli
    except ImportError as e:  # the replay part is not there yet
        parser.set_defaults(_replay_import_error=str(e))
        parser.add_argument("rest", nargs=argparse.REMAINDER)
        return
    replay_cli.add_arguments(parser)


def _replay(args: argparse.Namespace) -> int:
    if getattr(args, "_replay_import_error", None):
        print(f"optmon replay unavailable: {args._replay_import_error}", file=sys.stderr)
        return 1
    from services.common.logging import configure_logging
    from services.common.settings import CommonSettings
    from services.replay import cli as replay_cli

    settings = CommonSettings()
    configure_logging(settings.log_level, settings.log_json)
    stats = asyncio.run(replay_cli.run(args, settings))
    print(f"replay: {stats.rows} rows, {stats.snapshots} snapshots, {stats.errors} errors in {stats.elapsed:.2f} s "
          f"({stats.rows_per_s:,.0f} rows/s)", flush=True)
    return 0


# --- entry point ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of ``optmon``."""
    parser = argparse.ArgumentParser(prog="optmon", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the embedded stack (and replay the 18-Aug day)")
    up.add_argument("--no-replay", action="store_true", help="start the stack without a replay")
    up.add_argument("--replay", metavar="PATH", help="replay this file or folder instead of the 18-Aug day")
    up.add_argument("--speed", type=float, help=f"replay speed, × real time (default {DEFAULT_REPLAY_SPEED:g})")
    up.add_argument("--state-dir", default=str(state_dir_default()),
                    help="data, logs and pid files (default OPTMON_STATE_DIR or <repo>/.optmon)")
    up.add_argument("--no-gateway", action="store_true", help="do not start Envoy")

    mig = sub.add_parser("migrate", help="apply schema migrations (OPTMON_PG_DSN)")
    grp = mig.add_mutually_exclusive_group()
    grp.add_argument("--status", action="store_true", help="list migrations and whether each is applied")
    grp.add_argument("--rollback", type=int, metavar="N", help="roll back the N most recent migrations")
    mig.add_argument("--dsn", help="PostgreSQL DSN (default OPTMON_PG_DSN or the embedded stack's)")

    rep = sub.add_parser("replay", help="publish a shared-data file's ticks to ingest")
    _add_replay_arguments(rep)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``optmon`` entry point; returns (and, as a console script, exits with) the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "up":
        if args.speed is not None and args.speed <= 0:
            print("--speed must be > 0", file=sys.stderr)
            return 2
        return asyncio.run(_up(args))
    if args.command == "migrate":
        if args.rollback is not None and args.rollback < 1:
            print("--rollback N needs N ≥ 1", file=sys.stderr)
            return 2
        return _migrate(args)
    return _replay(args)
