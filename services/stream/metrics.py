"""Prometheus metrics of the stream service (default registry; exposed on ``OPTMON_METRICS_PORT``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SUBSCRIBERS = Gauge("optmon_stream_subscribers", "Open Subscribe streams")
GROUPS = Gauge("optmon_stream_groups", "Fan-out groups (distinct normalised filters)")
MESSAGES = Counter("optmon_stream_messages_sent_total", "Messages handed to subscribers", ["kind"])
BYTES = Counter("optmon_stream_bytes_sent_total", "Bytes handed to subscribers", ["kind"])
ENCODINGS = Counter("optmon_stream_encodings_total", "Protobuf encodings of snapshot/delta messages", ["kind"])
CONFLATED = Counter("optmon_stream_conflated_updates_total", "Updates merged into a pending message")
QUEUE_DEPTH = Gauge("optmon_stream_queue_depth", "Pending messages across subscribers (at most one per subscriber)")
SEND_LATENCY = Histogram(
    "optmon_stream_send_latency_seconds", "Ingest receive (first_receive_time) → hand-off to the subscriber",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
)
UPDATES = Counter("optmon_stream_bar_updates_total", "BarUpdates read from Redis")
BAD_UPDATES = Counter("optmon_stream_bad_updates_total", "BarUpdates that could not be decoded")
REDIS_ERRORS = Counter("optmon_stream_redis_errors_total", "Redis errors of the BarUpdate consumers")
REDIS_RECONNECTS = Counter("optmon_stream_redis_reconnects_total", "Reconnects after a Redis error")
RESYNCS = Counter("optmon_stream_resyncs_total", "Fresh snapshots sent to all subscribers of an underlying", ["reason"])
