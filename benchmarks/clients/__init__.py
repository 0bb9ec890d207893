"""Load clients for the benchmarks that are not Python: built from source here, run as child processes.

``grpc_stream_client.c`` (libnghttp2) opens StreamService.Subscribe streams and timestamps every message it receives
— see :class:`StreamClient`. It needs gcc and libnghttp2-dev (``make install`` installs both from Debian).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_SRC = Path(__file__).with_name("grpc_stream_client.c")


def build_stream_client(out_dir: Path) -> Path:
    """Compile ``grpc_stream_client.c`` into ``out_dir`` (again only when the source is newer); returns the binary.

    Raises RuntimeError when gcc or libnghttp2 is missing (``make install`` installs them)."""
    exe = out_dir / "grpc_stream_client"
    if exe.exists() and exe.stat().st_mtime >= _SRC.stat().st_mtime:
        return exe
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler: run `make install` (it installs gcc)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_suffix(f".{os.getpid()}.tmp")
    r = subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(_SRC), "-lnghttp2"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building {_SRC.name} failed (libnghttp2-dev missing? run `make install`):\n{r.stderr}")
    tmp.replace(exe)
    return exe


class StreamClient:
    """One ``grpc_stream_client`` process: Subscribe streams to ``host:port``, ``per_connection`` streams per HTTP/2
    connection, every ``probe_every``-th stream recording the receive time of each Delta.

    Blocking methods (call them from a thread when an event loop must keep running)."""

    def __init__(self, exe: Path, host: str, port: int, per_connection: int = 400, probe_every: int = 10,
                 path: str = "/optmon.v1.StreamService/Subscribe") -> None:
        self._p = subprocess.Popen([str(exe), host, str(port), path, str(per_connection), str(probe_every)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._lock = threading.Lock()

    def _cmd(self, line: str) -> list[str]:
        assert self._p.stdin is not None and self._p.stdout is not None
        with self._lock:
            self._p.stdin.write(line + "\n")
            self._p.stdin.flush()
            out: list[str] = []
            while True:
                got = self._p.stdout.readline()
                if not got:
                    raise RuntimeError(f"grpc_stream_client exited ({self._p.poll()})")
                got = got.rstrip("\n")
                if got == ".":
                    if out and out[0].startswith("error"):
                        raise RuntimeError(f"grpc_stream_client: {out[0]}")
                    return out
                out.append(got)

    def add(self, requests: Sequence[bytes]) -> int:
        """Open one stream per serialized SubscribeRequest; returns the number of streams open."""
        fd, path = tempfile.mkstemp(prefix="optmon-subs-")
        try:
            with os.fdopen(fd, "wb") as f:
                for r in requests:
                    f.write(struct.pack(">I", len(r)) + r)
            return int(self._cmd(f"add {len(requests)} {path}")[0].split()[1])
        finally:
            os.unlink(path)

    def reset(self) -> None:
        """Zero the counters and drop the latency samples."""
        self._cmd("reset")

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset: subs, snapped, with_deltas, finished, errors, msgs, bytes, full_equiv
        (Σ own snapshot size per Delta received), delta_bytes, deltas; ``lat``: [(bucket_seconds, receive_unix_s)]
        of probe streams' unconflated Deltas; ``last_error``."""
        st: dict[str, Any] = {"lat": [], "last_error": ""}
        for line in self._cmd("stats"):
            if line.startswith("stats "):
                for kv in line.split()[1:]:
                    k, v = kv.split("=")
                    st[k] = int(v)
            elif line.startswith("lat "):
                _, b, t = line.split()
                st["lat"].append((int(b), int(t) / 1e6))
            elif line.startswith("err "):
                st["last_error"] = line[4:]
        return st

    def close(self) -> None:
        """Close every stream and end the process."""
        try:
            if self._p.poll() is None:
                self._cmd("quit")
        except (RuntimeError, OSError, ValueError):
            pass
        try:
            self._p.wait(10)
        except subprocess.TimeoutExpired:
            self._p.kill()
            self._p.wait(5)
        for pipe in (self._p.stdin, self._p.stdout):
            if pipe is not None:
                pipe.close()
