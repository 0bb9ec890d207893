"""``python -m services.replay [PATH] [--speed X | --max-speed] ...`` — the same as ``optmon replay``."""

from __future__ import annotations

import argparse
import asyncio

from services.common.logging import configure_logging
from services.common.settings import CommonSettings
from services.replay import cli


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, replay, print the stats; exit code 0, or 1 with a message on stderr."""
    parser = argparse.ArgumentParser(prog="python -m services.replay", description=cli.__doc__.split("\n\n")[0])
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    settings = CommonSettings()
    configure_logging(settings.log_level, settings.log_json)
    stats = asyncio.run(cli.run(args, settings))
    print(f"replay: {stats.rows} rows, {stats.snapshots} snapshots, {stats.errors} errors in {stats.elapsed:.2f} s "
          f"({stats.rows_per_s:,.0f} rows/s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
