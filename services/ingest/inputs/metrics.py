"""Prometheus metrics of the ingest inputs and back-pressure (names ``optmon_ingest_*``; the pipeline's own metrics
live in :mod:`services.ingest.metrics`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

#: 1 while PostgreSQL is unreachable and commits are being retried (health is NOT_SERVING meanwhile), else 0.
DEGRADED = Gauge("optmon_ingest_degraded", "1 while commits fail (PostgreSQL unreachable) and are retried")
#: Ticks held in memory awaiting a commit, all inputs together (bounded by OPTMON_INGEST_MAX_PENDING_TICKS).
PENDING_TICKS = Gauge("optmon_ingest_pending_ticks", "Ticks held in memory awaiting a commit")
#: Commit attempts that failed and were retried, by cause (``database``, ``redis``, ``error``).
COMMIT_RETRIES = Counter("optmon_ingest_commit_retries_total", "Failed commit attempts that were retried", ["cause"])
#: Stream entries acknowledged after their commit, by stream key.
STREAM_ACKED = Counter("optmon_ingest_stream_acked_total", "Tick stream entries acknowledged", ["stream"])
#: Pending entries of other (crashed) consumers taken over with XAUTOCLAIM.
STREAM_CLAIMED = Counter("optmon_ingest_stream_claimed_total", "Stream entries reclaimed from idle consumers")
#: Entries removed from the tick streams by trimming (all acknowledged).
STREAM_TRIMMED = Counter("optmon_ingest_stream_trimmed_total", "Acknowledged tick stream entries trimmed")
#: Legacy pub/sub ticks dropped because the in-memory bound was reached (pub/sub cannot be paused).
PUBSUB_DROPPED = Counter("optmon_ingest_pubsub_dropped_total", "Legacy pub/sub ticks dropped (memory bound)")
#: Legacy pub/sub messages received, by channel kind (``options``, ``underlying``).
PUBSUB_MESSAGES = Counter("optmon_ingest_pubsub_messages_total", "Legacy pub/sub messages received", ["kind"])
#: PublishTicks calls answered UNAVAILABLE because the in-memory bound was reached.
PUBLISH_UNAVAILABLE = Counter("optmon_ingest_publish_unavailable_total", "PublishTicks refused: memory bound")
