"""Ingest settings (``OPTMON_*`` environment variables; see :class:`services.common.settings.CommonSettings`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.common.settings import CommonSettings


class IngestSettings(CommonSettings):
    """Ingest knobs. Environment: ``OPTMON_INGEST_PORT`` and the fields below upper-cased with ``OPTMON_``."""

    #: gRPC port of IngestService (0 = pick a free port, for tests).
    ingest_port: int = 50051

    # --- inputs, validation, back-pressure (services/ingest/inputs, domain/validation.py) ---
    #: Read the Redis Streams ``optmon:ticks:<U>`` (consumer group ``ingest``).
    ingest_streams_enabled: bool = True
    #: Subscribe to the legacy pub/sub channels ``ticker:<U>:options`` / ``ticker:<U>:underlying`` (lossy).
    ingest_pubsub_enabled: bool = True
    #: Stream entries read per XREADGROUP call (all handed to one pipeline commit).
    ingest_stream_read_count: int = Field(default=64, ge=1)
    #: XREADGROUP BLOCK timeout, milliseconds.
    ingest_stream_block_ms: int = Field(default=200, ge=1)
    #: Pending entries idle longer than this (ms) belong to a crashed consumer and are reclaimed (XAUTOCLAIM).
    ingest_claim_idle_ms: int = Field(default=30_000, ge=100)
    #: Seconds between XAUTOCLAIM / trimming passes.
    ingest_maintenance_interval_s: float = Field(default=5.0, gt=0)
    #: Approximate cap of each tick stream's length; only acknowledged entries are ever trimmed.
    ingest_stream_maxlen: int = Field(default=100_000, ge=100)
    #: Delivery cap of a stream entry (its XPENDING delivery count: the first read plus every reclaim). An entry
    #: reclaimed for a delivery beyond this is not processed again: it goes to the dead-letter stream as POISON and
    #: is acknowledged, so an entry that crashes ingest cannot crash it forever. At least 2 (one recovery).
    ingest_max_deliveries: int = Field(default=5, ge=2)
    #: Ticks held in memory awaiting a commit (all inputs together); past it PublishTicks answers UNAVAILABLE,
    #: the stream consumer stops reading and pub/sub drops (counted).
    ingest_max_pending_ticks: int = Field(default=200_000, ge=1)
    #: First and maximum back-off between commit retries while PostgreSQL is unreachable, seconds.
    ingest_retry_initial_s: float = Field(default=0.2, gt=0)
    ingest_retry_max_s: float = Field(default=5.0, gt=0)
    #: Ticks a PublishTicks stream accumulates before committing them (the response waits for every commit).
    ingest_publish_commit_ticks: int = Field(default=20_000, ge=1)
    #: Pub/sub ticks are committed every this many milliseconds (or sooner when ``ingest_publish_commit_ticks``).
    ingest_pubsub_flush_ms: int = Field(default=100, ge=1)
    #: Reject ticks whose exchange time is more than this many seconds away from now; 0 disables (replays).
    ingest_max_tick_age_s: float = Field(default=0.0, ge=0)
    #: Reject ticks whose exchange time (IST) lies outside [session_start, session_end]; "HH:MM" IST.
    ingest_session_check: bool = True
    ingest_session_start: str = Field(default="09:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    ingest_session_end: str = Field(default="15:45", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    #: Reject strikes off the underlying's strike grid (``strike_steps``).
    ingest_strike_grid_check: bool = True
    #: LTP move against the contract's previous tick above this fraction is suspicious (0.10 = 10 %).
    ingest_jump_threshold: float = Field(default=0.10, gt=0)
    #: What to do with a suspicious tick: "keep" (accept, count it) or "reject" (SUSPICIOUS_JUMP).
    ingest_jump_policy: Literal["keep", "reject"] = "keep"
    #: Exact-duplicate detection window: the last N distinct ticks of each contract.
    ingest_dedup_window: int = Field(default=16, ge=1)
    #: Contracts whose validation state (dedup window, previous LTP) is kept; least recently seen evicted first.
    ingest_state_contracts: int = Field(default=100_000, ge=1)
    #: Approximate cap of the dead-letter stream ``optmon:deadletter``.
    ingest_deadletter_maxlen: int = Field(default=100_000, ge=1)

    # --- bars, storage, events (services/ingest/pipeline.py, store/pg.py, store/events.py) ---
    #: Daily bar partitions older than this many days (UTC) are dropped; 0 keeps everything.
    ingest_retention_days: int = Field(default=30, ge=0)
    #: Seconds between retention passes (run from the pipeline).
    ingest_retention_interval_s: float = Field(default=3600.0, gt=0)
    #: Approximate cap (XADD MAXLEN ~) of each bar-event stream ``optmon:bars:<U>``.
    ingest_events_maxlen: int = Field(default=10_000, ge=100)
    #: Risk-free rate (decimal per year, 0.065 = 6.5 %; env ``OPTMON_IV_RATE``) and dividend yield of the index
    #: (``OPTMON_IV_DIVIDEND_YIELD``) used when ingest computes IV/Greeks for ticks that lack them.
    iv_rate: float = 0.065
    iv_dividend_yield: float = 0.0

    # --- fault injection (tests only; never set in production) ---
    #: The process exits at once (``os._exit(70)``, like a kill -9: no cleanup, nothing acknowledged) right after its
    #: N-th pipeline commit, before that commit's BarUpdates and dead letters are published; 0 = off. Used by
    #: ``tests/integration/test_ingest_events_crash.py`` to die between commit and publish.
    ingest_fault_exit_after_commits: int = Field(default=0, ge=0)
