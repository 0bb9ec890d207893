"""A private PostgreSQL 15+ cluster (initdb + pg_ctl) on loopback.

PostgreSQL refuses to run as root: when the current user is root, every server command runs as the ``postgres``
user through ``runuser`` and the data directory is chowned to it.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def pg_bindir() -> Path:
    """The directory of the newest installed PostgreSQL server binaries (``initdb``, ``pg_ctl``, ``postgres``).

    Raises FileNotFoundError when no server is installed (``make up`` installs one).
    """
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if cands:
        return Path(cands[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise FileNotFoundError("no PostgreSQL server found (apt-get install postgresql)")


def postgres_can_use(path: Path) -> bool:
    """True when the server user could create and use ``path`` (always True when not root; as root, every existing
    ancestor must be searchable by ``postgres`` — e.g. not under a 0700 home directory)."""
    if os.geteuid() != 0:
        return True
    existing = Path(path).resolve()
    while not existing.exists():
        existing = existing.parent
    r = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(existing)], capture_output=True)
    return r.returncode == 0


def _as_pg_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PgCluster:
    """A cluster under ``root`` listening on ``127.0.0.1:port``, superuser ``optmon`` with trust auth, database
    ``optmon``. ``dsn`` is ready for asyncpg; ``yoyo_url`` for the migration tool."""

    root: Path
    port: int
    user: str = "optmon"
    database: str = "optmon"

    @property
    def data_dir(self) -> Path:
        return self.root / "pgdata"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(_as_pg_user(cmd), check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]

    def init(self) -> None:
        """initdb when the data directory does not exist yet (idempotent)."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self._run([str(pg_bindir() / "initdb"), "-D", str(self.data_dir), "-U", self.user, "--auth=trust",
                   "-E", "UTF8", "--no-sync"])
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as f:
            # Tuned for a 2-core dev box; durability kept (fsync on) except synchronous_commit for throughput.
            f.write("\nshared_buffers = 256MB\nmax_connections = 200\nsynchronous_commit = off\n"
                    "max_wal_size = 2GB\ncheckpoint_timeout = 15min\n")

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (no-op when it already runs) and create the database."""
        if self.running():
            return
        self._run([str(pg_bindir() / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.root / "postgres.log"),
                   "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "-w", "-t", str(int(timeout)),
                   "start"], start_new_session=True)  # own session: a terminal's Ctrl-C reaches only our supervisor
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", "postgres",
                                "-tAc", f"SELECT 1 FROM pg_database WHERE datname='{self.database}'"],
                               capture_output=True, text=True)
            if r.returncode == 0:
                if r.stdout.strip() != "1":
                    subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d",
                                    "postgres", "-c", f"CREATE DATABASE {self.database}"], check=True,
                                   capture_output=True)
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL did not answer on port {self.port}: {r.stderr}")
            time.sleep(0.2)

    def running(self) -> bool:
        """True when the cluster's postmaster runs."""
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        r = subprocess.run(_as_pg_user([str(pg_bindir() / "pg_ctl"), "-D", str(self.data_dir), "status"]),
                           capture_output=True)
        return r.returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` rolls back open transactions; ``immediate`` is a crash)."""
        if self.running():
            self._run([str(pg_bindir() / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"])
