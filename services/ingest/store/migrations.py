"""Schema migrations with yoyo-migrations (SQL files in ``services/ingest/migrations``, each with a
``.rollback.sql`` down step). Used by ``optmon migrate``, ``optmon up``, the Kubernetes migration Job and tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from yoyo import get_backend, read_migrations

#: Folder of the versioned SQL migrations.
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def _yoyo_url(dsn: str) -> str:
    """yoyo wants ``postgresql+psycopg://``; accept the libpq/asyncpg ``postgresql://`` form."""
    for prefix in ("postgresql://", "postgres://"):
        if dsn.startswith(prefix):
            return "postgresql+psycopg://" + dsn[len(prefix):]
    return dsn


@contextmanager
def _backend(dsn: str) -> Iterator[Any]:
    backend = get_backend(_yoyo_url(dsn))
    try:
        yield backend
    finally:
        backend.connection.close()


def apply(dsn: str) -> int:
    """Apply every pending migration under a lock; returns how many were applied."""
    with _backend(dsn) as backend, backend.lock():
        pending = backend.to_apply(read_migrations(str(MIGRATIONS_DIR)))
        backend.apply_migrations(pending)
    return len(pending)


def rollback(dsn: str, count: int = 1) -> int:
    """Roll back the ``count`` most recent migrations (their down steps); returns how many were rolled back."""
    with _backend(dsn) as backend, backend.lock():
        applied = backend.to_rollback(read_migrations(str(MIGRATIONS_DIR)))[:count]
        backend.rollback_migrations(applied)
    return len(applied)


def status(dsn: str) -> list[tuple[str, bool]]:
    """``(migration id, applied)`` for every known migration, in order."""
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with _backend(dsn) as backend:
        applied = {m.id for m in backend.to_rollback(migrations)}
    return [(m.id, m.id in applied) for m in migrations]
