"""The embedded stack as child processes: private PostgreSQL and Redis (or existing servers), migrations, the three
services (``python -m services.ingest|query|stream``), and the Envoy gateway.

Used by ``optmon up``, by the end-to-end tests (free ports, a temp state directory) and by benchmarks::

    cfg = StackConfig.from_env(state_dir=Path(".optmon"))
    async with Stack(cfg) as stack:          # start(): infra → migrate → services + Envoy → health → gateway answers
        print(stack.gateway_url)
        await stack.wait_for_exit()          # returns when a child dies unexpectedly
    # stop(): services first (SIGTERM, graceful), then Envoy, Redis, PostgreSQL

Every child runs in its own session (a terminal's Ctrl-C reaches only the supervisor, which stops the children in
order), logs to ``<state_dir>/logs/<name>.log`` and is configured only by ``OPTMON_*`` environment variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from services.devstack.pg import PgCluster, postgres_can_use
from services.devstack.redis import RedisServer, port_free

#: Repository root (the working directory of every child, so ``python -m services.<svc>`` resolves).
REPO_ROOT = Path(__file__).resolve().parents[2]

#: The three services, in start order.
SERVICES: tuple[str, ...] = ("ingest", "query", "stream")

#: Default ports of the embedded stack (docs/architecture.md).
DEFAULT_PORTS: dict[str, int] = {
    "gateway": 8080,
    "envoy_admin": 9901,
    "ingest": 50051,
    "query": 50052,
    "stream": 50053,
    "pg": 55432,
    "redis": 56379,
    "ingest_metrics": 9101,
    "query_metrics": 9102,
    "stream_metrics": 9103,
}

#: Environment variable of each configurable port.
PORT_ENV: dict[str, str] = {
    "gateway": "OPTMON_GATEWAY_PORT",
    "envoy_admin": "OPTMON_ENVOY_ADMIN_PORT",
    "ingest": "OPTMON_INGEST_PORT",
    "query": "OPTMON_QUERY_PORT",
    "stream": "OPTMON_STREAM_PORT",
    "pg": "OPTMON_PG_PORT",
    "redis": "OPTMON_REDIS_PORT",
    "ingest_metrics": "OPTMON_INGEST_METRICS_PORT",
    "query_metrics": "OPTMON_QUERY_METRICS_PORT",
    "stream_metrics": "OPTMON_STREAM_METRICS_PORT",
}


class StackError(RuntimeError):
    """The stack could not start (port taken, a child died or never became healthy, ...); the message says which
    and carries the tail of the child's log."""


class Gateway(Protocol):
    """What the supervisor needs of the Envoy launcher (services/devstack/envoy.py)."""

    def stop(self) -> None: ...


@dataclass
class StackConfig:
    """Where and on which ports the stack runs.

    ``ports`` maps the names of :data:`DEFAULT_PORTS` to TCP ports on ``host`` (metrics ports may be 0 = off).
    ``pg_dsn`` / ``redis_url`` set: use those servers instead of starting private ones under ``state_dir``.
    ``commands`` overrides a service's argv (tests); ``env`` adds environment variables for every child.
    """

    state_dir: Path
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    pg_dsn: str | None = None
    redis_url: str | None = None
    services: tuple[str, ...] = SERVICES
    gateway: bool = True
    commands: dict[str, list[str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    #: Seconds each service gets to answer gRPC health SERVING after its start.
    health_timeout_s: float = 60.0
    #: Seconds a service gets after SIGTERM before SIGKILL.
    stop_timeout_s: float = 20.0

    @classmethod
    def from_env(cls, state_dir: Path, environ: Mapping[str, str] | None = None, **overrides: Any) -> StackConfig:
        """The configuration from ``OPTMON_*`` variables (:data:`PORT_ENV`, ``OPTMON_PG_DSN``, ``OPTMON_REDIS_URL``,
        ``OPTMON_HOST``); ValueError for a non-integer port."""
        env = os.environ if environ is None else environ
        ports = dict(DEFAULT_PORTS)
        for name, var in PORT_ENV.items():
            if env.get(var):
                try:
                    ports[name] = int(env[var])
                except ValueError:
                    raise ValueError(f"{var} must be an integer port, got {env[var]!r}") from None
        return cls(state_dir=Path(state_dir), host=env.get("OPTMON_HOST", "127.0.0.1"), ports=ports,
                   pg_dsn=env.get("OPTMON_PG_DSN") or None, redis_url=env.get("OPTMON_REDIS_URL") or None,
                   **overrides)


@dataclass
class Child:
    """One supervised child process, logging to ``log_path``, its pid recorded in ``pid_path``."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    pid_path: Path
    port: int | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        """Spawn the process in its own session, stdout+stderr appended to the log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_path.write_text(str(self.proc.pid))

    @property
    def exited(self) -> bool:
        """True when the process was started and has exited."""
        return self.proc is not None and self.proc.poll() is not None

    def signal(self, sig: int) -> None:
        """Send ``sig`` if the process still runs."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self, grace_s: float) -> int | None:
        """SIGTERM, wait up to ``grace_s`` seconds, then SIGKILL. Returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        self.pid_path.unlink(missing_ok=True)
        return self.proc.returncode

    def log_tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the log (empty when there is none)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def stop_stale_children(run_dir: Path) -> list[int]:
    """SIGTERM children recorded in ``run_dir/*.pid`` by an earlier supervisor that was killed (only processes whose
    command line is a Python ``services.*`` module are touched). Returns their pids."""
    stopped: list[int] = []
    for pid_file in run_dir.glob("*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            pid_file.unlink(missing_ok=True)
            continue
        if b"services." in cmdline or b"envoy" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        pid_file.unlink(missing_ok=True)
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{p}").exists() for p in stopped) and time.monotonic() < deadline:
        time.sleep(0.05)
    return stopped


def _alive(pid_file: Path, name: bytes) -> bool:
    """True when ``pid_file`` names a running process whose command line contains ``name``."""
    try:
        pid = int(pid_file.read_text().strip())
        return name in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


async def wait_grpc_healthy(port: int, child: Child | None, timeout_s: float, host: str = "127.0.0.1") -> None:
    """Block until ``host:port`` answers grpc.health.v1 Check("") with SERVING.

    Raises StackError when ``child`` exits first or ``timeout_s`` seconds pass (with the child's log tail).
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if child is not None and child.exited:
                raise StackError(f"{child.name} exited with code {child.proc.returncode if child.proc else '?'} "
                                 f"before it was healthy; log {child.log_path}:\n{child.log_tail()}")
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                name = child.name if child else f"port {port}"
                tail = f"; log {child.log_path}:\n{child.log_tail()}" if child else ""
                raise StackError(f"{name} did not answer gRPC health SERVING within {timeout_s:.0f} s{tail}")
            await asyncio.sleep(0.1)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url``; returns (status, body) also for HTTP error statuses; raises OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


async def wait_http_ok(url: str, timeout_s: float, is_alive: Callable[[], bool] = lambda: True) -> None:
    """Block until GET ``url`` answers HTTP 200; StackError after ``timeout_s`` or when ``is_alive()`` turns False."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            status, body = await asyncio.to_thread(http_get, url, 2.0)
            if status == 200:
                return
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as e:
            last = str(e)
        if not is_alive():
            raise StackError(f"gateway stopped before {url} answered ({last})")
        if time.monotonic() > deadline:
            raise StackError(f"{url} did not answer 200 within {timeout_s:.0f} s (last: {last})")
        await asyncio.sleep(0.1)


def start_gateway(cfg: StackConfig, run_dir: Path) -> Gateway:
    """Render the Envoy config for the stack's ports (services/devstack/envoy.py; other gateway knobs from
    ``OPTMON_GATEWAY_*``) and start Envoy under ``<state_dir>/envoy``. Returns a handle with ``stop()``; raises
    StackError when Envoy does not become ready."""
    from services.devstack.envoy import EnvoyProcess, GatewayConfig

    env = {**os.environ, **cfg.env}
    gw_cfg = GatewayConfig.from_env(env, listen_address=cfg.host, listen_port=cfg.ports["gateway"],
                                    admin_port=cfg.ports["envoy_admin"],
                                    query_addr=f"{cfg.host}:{cfg.ports['query']}",
                                    stream_addr=f"{cfg.host}:{cfg.ports['stream']}")
    proc = EnvoyProcess(root=cfg.state_dir / "envoy", cfg=gw_cfg)
    try:
        proc.start()
    except RuntimeError as e:
        raise StackError(f"Envoy did not start: {e}") from None
    if proc.proc is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "envoy.pid").write_text(str(proc.proc.pid))
    return proc


@dataclass
class StartReport:
    """Seconds from the call of :meth:`Stack.start` to each milestone."""

    infra_s: float = 0.0
    migrated_s: float = 0.0
    healthy_s: float = 0.0
    first_answer_s: float = 0.0
    migrations_applied: int = 0


class Stack:
    """The running embedded stack (see the module docstring). ``out`` receives one-line progress messages."""

    def __init__(self, cfg: StackConfig, out: Callable[[str], None] = lambda _msg: None) -> None:
        self.cfg = cfg
        self.out = out
        self.pg: PgCluster | None = None
        self.redis: RedisServer | None = None
        self.children: dict[str, Child] = {}
        self.gateway: Gateway | None = None
        self.report = StartReport()
        self._stopped = False

    # --- addresses -------------------------------------------------------------------------------------------
    @property
    def pg_dsn(self) -> str:
        """DSN of the database the services use."""
        if self.cfg.pg_dsn:
            return self.cfg.pg_dsn
        assert self.pg is not None, "stack not started"
        return self.pg.dsn

    @property
    def redis_url(self) -> str:
        """URL of the Redis the services use."""
        if self.cfg.redis_url:
            return self.cfg.redis_url
        assert self.redis is not None, "stack not started"
        return self.redis.url

    @property
    def gateway_url(self) -> str:
        """Base URL of the Envoy gateway, e.g. ``http://127.0.0.1:8080``."""
        return f"http://{self.cfg.host}:{self.cfg.ports['gateway']}"

    def grpc_addr(self, service: str) -> str:
        """``host:port`` of a service's gRPC server."""
        return f"{self.cfg.host}:{self.cfg.ports[service]}"

    @property
    def log_dir(self) -> Path:
        """Folder of the children's logs."""
        return self.cfg.state_dir / "logs"

    def child_env(self, service: str) -> dict[str, str]:
        """The environment of one service: the supervisor's own, plus every ``OPTMON_*`` address and port."""
        p = self.cfg.ports
        env = dict(os.environ)
        env.update({
            "OPTMON_PG_DSN": self.pg_dsn,
            "OPTMON_REDIS_URL": self.redis_url,
            "OPTMON_HOST": self.cfg.host,
            "OPTMON_INGEST_PORT": str(p["ingest"]),
            "OPTMON_QUERY_PORT": str(p["query"]),
            "OPTMON_STREAM_PORT": str(p["stream"]),
            "OPTMON_QUERY_ADDR": self.grpc_addr("query"),
            "OPTMON_METRICS_PORT": str(p.get(f"{service}_metrics", 0)),
            "OPTMON_LOG_JSON": env.get("OPTMON_LOG_JSON", "true"),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.cfg.env)
        return env

    # --- lifecycle -------------------------------------------------------------------------------------------
    def _check_ports(self) -> None:
        wanted = [*self.cfg.services]
        if self.cfg.gateway:
            wanted += ["gateway", "envoy_admin"]
        state = self.cfg.state_dir
        # our own PostgreSQL / Redis left running by a killed supervisor are reused / restarted, not refused
        if not self.cfg.pg_dsn and not PgCluster(root=state / "pg", port=self.cfg.ports["pg"]).running():
            wanted.append("pg")
        if not self.cfg.redis_url and not _alive(state / "redis" / "redis.pid", b"redis-server"):
            wanted.append("redis")
        wanted += [f"{s}_metrics" for s in self.cfg.services]
        taken = [f"{name} {self.cfg.ports[name]} ({PORT_ENV.get(name, '')})" for name in wanted
                 if self.cfg.ports.get(name) and not port_free(self.cfg.ports[name], self.cfg.host)]
        if taken:
            raise StackError("ports already in use: " + ", ".join(taken)
                             + " — is another `optmon up` running? Stop it, or set the variables to other ports.")

    def _start_infra(self) -> None:
        state = self.cfg.state_dir
        if not self.cfg.pg_dsn:
            pg_root = state / "pg"
            if not postgres_can_use(pg_root):
                raise StackError(f"the postgres user cannot reach {pg_root} (a parent folder is not searchable, "
                                 "e.g. a 0700 home); put the checkout elsewhere or set OPTMON_PG_DSN")
            self.pg = PgCluster(root=pg_root, port=self.cfg.ports["pg"])
            self.pg.init()
            self.pg.start()
            self.out(f"PostgreSQL  {self.pg.dsn}  (data {self.pg.data_dir})")
        else:
            self.out(f"PostgreSQL  {self.cfg.pg_dsn}  (existing server, OPTMON_PG_DSN)")
        if not self.cfg.redis_url:
            self.redis = RedisServer(root=state / "redis", port=self.cfg.ports["redis"], appendonly=True)
            self.redis.start()
            self.out(f"Redis       {self.redis.url}  (AOF under {self.redis.root})")
        else:
            self.out(f"Redis       {self.cfg.redis_url}  (existing server, OPTMON_REDIS_URL)")

    async def _finish(self, fn: Callable[..., Any], *args: Any, on_late: Callable[[Any], None] | None = None) -> Any:
        """Run a blocking start step in a thread. When the start is cancelled (Ctrl-C) meanwhile, wait for the step to
        finish before re-raising, so :meth:`stop` sees — and stops — whatever the step started (``on_late`` gets the
        step's result then)."""
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                result = await fut
                if on_late is not None:
                    on_late(result)
            raise

    def _set_gateway(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def start(self) -> StartReport:
        """Start everything and wait until the gateway answers ``GET /v1/underlyings`` (or, without a gateway,
        until every service is healthy). Raises StackError (after stopping what was started) on failure."""
        t0 = time.monotonic()
        try:
            self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
            stale = await self._finish(stop_stale_children, self.cfg.state_dir / "run")
            if stale:
                self.out(f"stopped {len(stale)} process(es) left over by an earlier run: {stale}")
            self._check_ports()
            try:
                await self._finish(self._start_infra)
            except (OSError, TimeoutError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", "") or ""
                raise StackError(f"PostgreSQL/Redis did not start: {e} {detail}".strip()) from None
            self.report.infra_s = time.monotonic() - t0

            from services.ingest.store import migrations

            try:
                self.report.migrations_applied = await self._finish(migrations.apply, self.pg_dsn)
            except Exception as e:  # unreachable server, bad credentials, failing SQL
                where = self.pg_dsn.split("@")[-1]  # no credentials in the message
                raise StackError(f"migrations failed on {where}: {type(e).__name__}: {e}") from None
            self.report.migrated_s = time.monotonic() - t0
            self.out(f"migrations  {self.report.migrations_applied} applied")

            for name in self.cfg.services:
                child = Child(name=name,
                              argv=self.cfg.commands.get(name, [sys.executable, "-m", f"services.{name}"]),
                              env=self.child_env(name), log_path=self.log_dir / f"{name}.log",
                              pid_path=self.cfg.state_dir / "run" / f"{name}.pid", port=self.cfg.ports[name])
                child.start()
                self.children[name] = child
            if self.cfg.gateway:
                self.gateway = await self._finish(start_gateway, self.cfg, self.cfg.state_dir / "run",
                                                  on_late=self._set_gateway)
            await asyncio.gather(*(wait_grpc_healthy(c.port or 0, c, self.cfg.health_timeout_s, self.cfg.host)
                                   for c in self.children.values()))
            self.report.healthy_s = time.monotonic() - t0
            self.out("services    " + ", ".join(f"{n} {self.grpc_addr(n)}" for n in self.children) + " healthy")
            if self.cfg.gateway:
                await wait_http_ok(f"{self.gateway_url}/v1/underlyings", 30.0,
                                   lambda: not any(c.exited for c in self.children.values()))
            self.report.first_answer_s = time.monotonic() - t0
        except BaseException:
            await self.stop()
            raise
        return self.report

    async def wait_for_exit(self) -> str:
        """Return the name of the first service that exits (an unexpected death while the stack runs)."""
        while True:
            for name, child in self.children.items():
                if child.exited:
                    return name
            await asyncio.sleep(0.2)

    async def stop(self) -> dict[str, int | None]:
        """Stop services (SIGTERM, all at once, graceful), then Envoy, Redis, PostgreSQL. Idempotent.

        Returns each service's exit code (0 = clean)."""
        if self._stopped:
            return {}
        self._stopped = True
        codes: dict[str, int | None] = {}
        if self.children:
            results = await asyncio.gather(*(c.stop(self.cfg.stop_timeout_s) for c in self.children.values()))
            codes = dict(zip(self.children, results, strict=True))
        steps: list[tuple[str, Callable[[], object]]] = []
        if self.gateway is not None:
            steps.append(("Envoy", self.gateway.stop))
        if self.redis is not None:
            steps.append(("Redis", self.redis.stop))
        if self.pg is not None:
            pg = self.pg
            steps.append(("PostgreSQL", lambda: pg.stop("fast")))
        for what, step in steps:  # one failing step must not leave the next server running
            try:
                await asyncio.to_thread(step)
            except Exception as e:
                self.out(f"stopping {what} failed: {type(e).__name__}: {e}")
        (self.cfg.state_dir / "run" / "envoy.pid").unlink(missing_ok=True)
        return codes

    async def __aenter__(self) -> Stack:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
