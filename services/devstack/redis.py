"""A private redis-server on loopback, persistence off unless asked (tests) or AOF on (embedded default)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Where :func:`free_port` looks first: registered ports below Linux's default ephemeral range (32768–60999), clear
#: of the stack's default ports (8080, 9101–9103, 9901, 50051–50053, 55432, 56379).
_QUIET_PORTS = (20000, 32768)
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (inclusive)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` and it can be bound."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a server the caller starts next (tests, benchmarks).

    Taken outside the kernel's ephemeral range when it can be: a port from ``bind(0)`` lies inside it, so an outgoing
    connection made before the server binds (the stack makes dozens while it starts) could take it as its local port
    and the server would fail with "address in use" (seen in CI). Never the same port twice in one process.
    """
    lo, hi = _ephemeral_range()
    quiet = [p for p in range(*_QUIET_PORTS) if not lo <= p <= hi]
    for _ in range(100 if quiet else 0):
        port = random.choice(quiet)
        if port not in _handed_out and port_free(port):
            _handed_out.add(port)
            return port
    while True:  # no quiet ports on this machine: the kernel's choice
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` and wait up to ``timeout`` s, then SIGKILL and reap it (no-op when it already exited)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    """Block until ``host:port`` accepts TCP connections; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.05)


@dataclass
class RedisServer:
    """``redis-server`` under ``root`` on ``127.0.0.1:port``. ``appendonly`` keeps streams across restarts."""

    root: Path
    port: int
    appendonly: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        """Start and wait until the port answers. Raises FileNotFoundError when redis-server is missing."""
        exe = shutil.which("redis-server")
        if not exe:
            raise FileNotFoundError("redis-server not found (apt-get install redis-server)")
        self.root.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root), "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--protected-mode", "no",
                "--logfile", str(self.root / "redis.log"), "--pidfile", str(self.pidfile)]
        # Own session: a terminal's Ctrl-C reaches only the supervisor, which stops Redis last, in order.
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_port(self.port, timeout)

    @property
    def pidfile(self) -> Path:
        """Where redis-server writes its pid (used to stop a server left behind by a killed supervisor)."""
        return self.root / "redis.pid"

    def _stop_stale(self) -> None:
        """SIGTERM a redis-server still running from an earlier start under the same ``root`` (crashed parent)."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"redis-server" not in cmdline:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        """Terminate (SIGTERM) and wait (SIGKILL after 10 s)."""
        terminate(self.proc)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL (for failure tests)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
