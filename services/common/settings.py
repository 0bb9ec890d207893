"""Typed configuration shared by every optmon service, read once from ``OPTMON_*`` environment variables.

Each service subclasses :class:`CommonSettings` in its own ``settings.py`` and adds its port and tuning knobs.
Missing or malformed values fail fast at start-up with pydantic's validation message.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Strike grid per underlying, index points (NSE contract specifications for the weekly/monthly index options).
DEFAULT_STRIKE_STEPS: dict[str, float] = {"NIFTY": 50.0, "BANKNIFTY": 100.0, "FINNIFTY": 50.0, "MIDCPNIFTY": 25.0}

#: Contracts per lot, for converting feeds that report OI/volume in units (shares) into contracts.
DEFAULT_LOT_SIZES: dict[str, int] = {"NIFTY": 65, "BANKNIFTY": 30, "FINNIFTY": 60, "MIDCPNIFTY": 120}


class CommonSettings(BaseSettings):
    """Settings every service reads.

    Environment: ``OPTMON_PG_DSN``, ``OPTMON_REDIS_URL``, ``OPTMON_LOG_LEVEL``, ``OPTMON_LOG_JSON``,
    ``OPTMON_STRIKE_STEPS`` (JSON object, e.g. ``{"NIFTY": 50}``), ``OPTMON_LOT_SIZES``, ``OPTMON_HOST``,
    ``OPTMON_METRICS_PORT`` (0 disables the Prometheus endpoint), ``OPTMON_SHUTDOWN_GRACE_S``.
    """

    model_config = SettingsConfigDict(env_prefix="OPTMON_", extra="ignore", frozen=True)

    #: PostgreSQL DSN (libpq URL form), e.g. ``postgresql://optmon@127.0.0.1:55432/optmon``.
    pg_dsn: str = "postgresql://optmon:optmon@127.0.0.1:55432/optmon"
    #: Redis URL, e.g. ``redis://127.0.0.1:56379/0``.
    redis_url: str = "redis://127.0.0.1:56379/0"
    #: Interface the gRPC server binds.
    host: str = "127.0.0.1"
    #: Log level name.
    log_level: str = "INFO"
    #: JSON log lines (True) or console-friendly lines (False).
    log_json: bool = True
    #: Strike step per underlying, index points; the keys are the configured underlyings.
    strike_steps: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_STRIKE_STEPS))
    #: Lot size per underlying, units per contract.
    lot_sizes: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_LOT_SIZES))
    #: Port of the Prometheus metrics HTTP endpoint; 0 disables it.
    metrics_port: int = 0
    #: Seconds in-flight RPCs get to finish after SIGTERM.
    shutdown_grace_s: float = 5.0

    @property
    def underlyings(self) -> list[str]:
        """The configured underlyings, sorted."""
        return sorted(self.strike_steps)
