"""Timeframes and bucket arithmetic. Buckets are aligned to the UTC epoch (see ``Timeframe`` in market.proto):
for IST (UTC+05:30) that puts 1M/5M/15M boundaries on exchange-clock boundaries and 1H boundaries on hh:30 IST."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import IntEnum


class Timeframe(IntEnum):
    """Bar length; values equal ``optmon.v1.Timeframe`` enum numbers."""

    M1 = 1
    M5 = 2
    M15 = 3
    H1 = 4

    @property
    def seconds(self) -> int:
        """Bucket length in seconds."""
        return _SECONDS[self]

    @property
    def table(self) -> str:
        """The bar table of this timeframe (a whitelisted identifier, never user input)."""
        return _TABLES[self]

    @property
    def label(self) -> str:
        """Short label: 1m, 5m, 15m, 1h."""
        return _LABELS[self]


_SECONDS = {Timeframe.M1: 60, Timeframe.M5: 300, Timeframe.M15: 900, Timeframe.H1: 3600}
_TABLES = {Timeframe.M1: "bars_1m", Timeframe.M5: "bars_5m", Timeframe.M15: "bars_15m", Timeframe.H1: "bars_1h"}
_LABELS = {Timeframe.M1: "1m", Timeframe.M5: "5m", Timeframe.M15: "15m", Timeframe.H1: "1h"}

#: The timeframes rolled up from 1-minute bars.
ROLLUPS: tuple[Timeframe, ...] = (Timeframe.M5, Timeframe.M15, Timeframe.H1)

IST = timedelta(hours=5, minutes=30)


def bucket_start(ts: datetime, tf: Timeframe) -> datetime:
    """Start (UTC, tz-aware) of the bucket of ``tf`` containing ``ts`` (tz-aware)."""
    epoch = int(ts.timestamp())
    return datetime.fromtimestamp(epoch - epoch % tf.seconds, tz=UTC)


def bucket_start_epoch(epoch_s: float, tf: Timeframe) -> int:
    """Start, epoch seconds, of the bucket of ``tf`` containing ``epoch_s``."""
    e = int(epoch_s)
    return e - e % tf.seconds
