"""The body of ``optmon replay`` (also ``python -m services.replay``).

``optmon replay [PATH] [--speed X | --max-speed] [--redis-url URL] [--underlying U ...] [--start HH:MM --end HH:MM]
[--synthetic --minutes N --seed S --day YYYY-MM-DD] [--grpc ADDR] [--progress | --no-progress]``

PATH is a shared-data file or folder (format detected from the header). Without PATH and without ``--synthetic``
the real 18-Aug-2026 NIFTY day of the shared data is replayed, or the synthetic session when it is absent.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.logging import get_logger
from services.common.settings import DEFAULT_STRIKE_STEPS
from services.replay.publisher import DEFAULT_MAX_GAP_S, ReplayStats, publish, publish_grpc
from services.replay.sources import IST, ErrorLog, Snapshot, UnknownFormat, default_day_path, open_source
from services.replay.synthetic import DEFAULT_UNDERLYINGS, SESSION_OPEN_IST, synthetic_session


def _log() -> structlog.stdlib.BoundLogger:
    """The module's logger, built at each use so that it follows ``configure_logging`` called later."""
    return get_logger("replay.cli")

#: Default pacing: 60× real time plays the 288-minute 18-Aug day in ≈ 4.8 minutes.
DEFAULT_SPEED = 60.0
#: Default length of a synthetic session: the whole NSE session 09:15–15:30 IST.
DEFAULT_SYNTHETIC_MINUTES = 375


def _hhmm(text: str) -> time:
    try:
        return time.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an HH:MM time: {text!r}") from None


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``optmon replay`` arguments to ``parser`` (see the module docstring)."""
    parser.add_argument("path", nargs="?", type=Path, metavar="PATH",
                        help="shared-data file (.csv/.csv.gz/.jsonl.gz) or folder; default: the 18-Aug-2026 NIFTY "
                             "day of ../shared/data, else the synthetic session")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=_positive, metavar="X",
                      help=f"play X× real time by source timestamps (default {DEFAULT_SPEED:g})")
    pace.add_argument("--max-speed", action="store_true", help="no pacing: publish as fast as possible")
    parser.add_argument("--redis-url", help="Redis URL (default OPTMON_REDIS_URL)")
    parser.add_argument("--underlying", action="append", metavar="U",
                        help="replay only this underlying (repeatable, or comma-separated)")
    parser.add_argument("--start", type=_hhmm, metavar="HH:MM", help="first snapshot time of day, IST (inclusive)")
    parser.add_argument("--end", type=_hhmm, metavar="HH:MM", help="last snapshot time of day, IST (inclusive)")
    parser.add_argument("--synthetic", action="store_true", help="replay a synthetic session instead of a file")
    parser.add_argument("--minutes", type=int, default=None, metavar="N",
                        help=f"synthetic session length, minutes (default {DEFAULT_SYNTHETIC_MINUTES})")
    parser.add_argument("--seed", type=int, default=0, help="synthetic session random seed (default 0)")
    parser.add_argument("--day", type=_day, default=None, metavar="YYYY-MM-DD",
                        help="synthetic session date (default today, UTC)")
    parser.add_argument("--grpc", metavar="ADDR",
                        help="send to IngestService.PublishTicks at ADDR (host:port) instead of Redis")
    parser.add_argument("--max-gap", type=_positive, default=DEFAULT_MAX_GAP_S, metavar="S",
                        help=f"cap source-time gaps at S seconds when pacing (default {DEFAULT_MAX_GAP_S:g})")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")


def _underlyings(args: argparse.Namespace) -> list[str] | None:
    if not getattr(args, "underlying", None):
        return None
    return [u.strip().upper() for item in args.underlying for u in item.split(",") if u.strip()]


def snapshots_for(args: argparse.Namespace, settings: Any, errors: ErrorLog) -> tuple[Iterator[Snapshot], str]:
    """The snapshot iterator the arguments describe and a description of it.

    Raises SystemExit with a message for unusable arguments or a missing/unknown source.
    """
    unds = _underlyings(args)
    start, end = getattr(args, "start", None), getattr(args, "end", None)
    if start and end and end < start:
        raise SystemExit(f"optmon replay: --end {end:%H:%M} is before --start {start:%H:%M}")
    path: Path | None = getattr(args, "path", None)
    synthetic = bool(getattr(args, "synthetic", False))
    if path is not None and synthetic:
        raise SystemExit("optmon replay: give either PATH or --synthetic, not both")
    if path is None and not synthetic:
        path = default_day_path()
        if path is None:
            _log().warning("replay_shared_data_absent", fallback="synthetic")
            synthetic = True
    if synthetic:
        minutes = args.minutes if getattr(args, "minutes", None) is not None else DEFAULT_SYNTHETIC_MINUTES
        if minutes < 0:
            raise SystemExit(f"optmon replay: --minutes must be ≥ 0, got {minutes}")
        steps = dict(getattr(settings, "strike_steps", None) or DEFAULT_STRIKE_STEPS)
        names = unds or [u for u in DEFAULT_UNDERLYINGS if u in steps] or sorted(steps)
        day = getattr(args, "day", None) or datetime.now(UTC).date()
        snaps = synthetic_session(names, day=day, minutes=minutes, seed=getattr(args, "seed", 0),
                                  strike_steps=steps, start=start or SESSION_OPEN_IST)
        if end is not None:
            snaps = (s for s in snaps if (s.time + IST).time() <= end)
        return snaps, f"synthetic session {day} ({minutes} min, seed {getattr(args, 'seed', 0)})"
    assert path is not None
    try:
        snaps = open_source(path, errors, underlyings=unds, start=start, end=end,
                            lot_sizes=getattr(settings, "lot_sizes", None))
    except (FileNotFoundError, UnknownFormat) as e:
        raise SystemExit(f"optmon replay: {e}") from None
    return snaps, str(path)


async def run(args: argparse.Namespace, settings: Any) -> ReplayStats:
    """Run ``optmon replay``: publish the chosen source to ``optmon:ticks:<U>`` on Redis (``--redis-url`` or
    ``settings.redis_url``) or, with ``--grpc``, to ``IngestService.PublishTicks``.

    ``settings``: a ``CommonSettings`` (``redis_url``, ``lot_sizes``, ``strike_steps``). Returns the
    :class:`ReplayStats` (malformed rows counted in ``errors``). Raises SystemExit with a message (exit code 1) for
    bad arguments, an unreadable source, an unreachable Redis or a failed PublishTicks call.
    """
    errors = ErrorLog()
    snaps, what = snapshots_for(args, settings, errors)
    max_speed = bool(getattr(args, "max_speed", False))
    speed = getattr(args, "speed", None) or DEFAULT_SPEED
    progress = getattr(args, "progress", None)
    if progress is None:
        progress = sys.stderr.isatty()
    max_gap = getattr(args, "max_gap", DEFAULT_MAX_GAP_S)
    _log().info("replay_start", source=what, speed=None if max_speed else speed, max_speed=max_speed,
             target=getattr(args, "grpc", None) or "redis")
    grpc_addr = getattr(args, "grpc", None)
    if grpc_addr:
        async with grpc.aio.insecure_channel(grpc_addr) as channel:
            try:
                return await publish_grpc(snaps, channel, speed=speed, max_speed=max_speed, progress=progress,
                                          errors=lambda: errors.count, max_gap_s=max_gap)
            except grpc.aio.AioRpcError as e:
                raise SystemExit(f"optmon replay: PublishTicks at {grpc_addr} failed: {e.code().name} "
                                 f"{e.details()}") from None
    url = getattr(args, "redis_url", None) or settings.redis_url
    client = aioredis.Redis.from_url(url)
    try:
        return await publish(snaps, client, speed=speed, max_speed=max_speed, progress=progress,
                             errors=lambda: errors.count, max_gap_s=max_gap)
    except (RedisConnectionError, RedisTimeoutError) as e:
        raise SystemExit(f"optmon replay: Redis at {url} unreachable: {e}") from None
    finally:
        await client.aclose()
