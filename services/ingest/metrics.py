"""Prometheus metrics of ingest (prometheus-client, default registry; served on ``OPTMON_METRICS_PORT``).

Every name starts with ``optmon_ingest_``. Counters are process totals; labels are bounded sets (reject reasons,
timeframe labels ``1m``/``5m``/``15m``/``1h``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

#: Option and underlying ticks accepted and committed.
ACCEPTED = Counter("optmon_ingest_ticks_accepted_total", "Ticks (option + underlying) accepted and committed")
#: Ticks rejected, by reason name without prefix (e.g. ``NON_POSITIVE_LTP``). Incremented by the validator's caller.
REJECTED = Counter("optmon_ingest_rejected_total", "Ticks rejected, by reason", ["reason"])
#: Accepted ticks flagged as suspicious (LTP jump over the threshold).
SUSPICIOUS = Counter("optmon_ingest_suspicious_total", "Accepted ticks flagged as suspicious")
#: Seconds from the start of a pipeline commit (one transaction) to its COMMIT.
COMMIT_SECONDS = Histogram(
    "optmon_ingest_commit_seconds",
    "Latency of one pipeline transaction (all bar writes of a process() call), seconds",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
#: Bar rows inserted or changed, by timeframe label.
BARS_WRITTEN = Counter("optmon_ingest_bars_written_total", "Bar rows inserted or changed", ["timeframe"])
#: BarUpdate messages published on ``optmon:bars:<U>``.
EVENTS_PUBLISHED = Counter("optmon_ingest_events_published_total", "BarUpdate messages published")
#: Stored bars published again for re-delivered stream entries (``Pipeline.process(..., republish=True)``).
REPUBLISHED_BARS = Counter("optmon_ingest_republished_bars_total",
                           "Bars read back and published again for re-delivered stream entries (at-least-once events)")
#: BarUpdates committed but not yet published (Redis unreachable); retried on the next call.
EVENTS_PENDING = Gauge("optmon_ingest_events_pending", "BarUpdates committed but not yet published")
#: process() calls that failed because PostgreSQL was unreachable.
DB_UNAVAILABLE = Counter("optmon_ingest_db_unavailable_total", "Pipeline calls failed: PostgreSQL unreachable")
#: Ticks whose IV/Greeks were computed by ingest (feed had none).
GREEKS_COMPUTED = Counter("optmon_ingest_greeks_computed_total", "Option ticks whose IV/Greeks ingest computed")
#: Bar partitions dropped by the retention job.
PARTITIONS_DROPPED = Counter("optmon_ingest_partitions_dropped_total", "Daily bar partitions dropped (retention)")
