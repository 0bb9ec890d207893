"""Prometheus metrics of the query cache (default registry; exposed on ``OPTMON_METRICS_PORT``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HITS = Counter("optmon_query_cache_hits_total", "Cache hits per layer and method", ["layer", "method"])
MISSES = Counter("optmon_query_cache_misses_total", "Cache misses per layer and method", ["layer", "method"])
LATENCY = Histogram(
    "optmon_query_layer_latency_seconds", "Time to answer from a layer (l1, l2, pg)", ["layer"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0))
STALE = Counter("optmon_query_stale_served_total", "Cached answers served while PostgreSQL was down", ["method"])
UNAVAILABLE = Counter("optmon_query_unavailable_total", "Requests failed with UNAVAILABLE", ["method"])
REDIS_UP = Gauge("optmon_query_redis_up", "1 when Redis answered the last call, 0 while it is considered down")
REDIS_ERRORS = Counter("optmon_query_redis_errors_total", "Redis calls that failed")
PG_UP = Gauge("optmon_query_pg_up", "1 when the last PostgreSQL call succeeded")
GENERATION_BUMPS = Counter("optmon_query_generation_bumps_total", "Generation changes by source", ["source"])
L1_BYTES = Gauge("optmon_query_l1_bytes", "Bytes of response payload held in L1")
L1_ENTRIES = Gauge("optmon_query_l1_entries", "Entries held in L1")
WARMED = Counter("optmon_query_warmed_total", "Default views recomputed by the warmer", ["method"])
