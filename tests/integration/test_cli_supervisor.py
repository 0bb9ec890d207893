"""The supervisor of the embedded stack (services/devstack/supervisor.py) with stand-in services: real private
PostgreSQL and Redis, real Envoy, real child processes; each stand-in is a real grpc.aio server (common lifecycle:
health, graceful SIGTERM) whose QueryService.ListUnderlyings answers an empty list. The real services are driven by
tests/e2e/test_stack.py."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import uuid
from pathlib import Path

import psycopg
import pytest

from services.devstack.redis import free_port
from services.devstack.supervisor import SERVICES, Stack, StackConfig, StackError, http_get, port_free

STAND_IN = textwrap.dedent('''
    """A stand-in service: health + an empty QueryService.ListUnderlyings and its JSON twin (the REST path);
    exits with 3 once the file argv[2] (if given) exists."""
    import asyncio, os, sys
    import grpc
    from services.common.server import bind, new_server, serve_until_signalled

    async def list_underlyings(request: bytes, context) -> bytes:
        return b""  # an empty ListUnderlyingsResponse

    async def list_underlyings_json(request: bytes, context) -> bytes:
        from google.api import httpbody_pb2
        return httpbody_pb2.HttpBody(content_type="application/json", data=b'{"underlyings":[]}').SerializeToString()

    async def main() -> None:
        port = int(os.environ[sys.argv[1]])
        server, health = new_server(["optmon.v1.QueryService"])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("optmon.v1.QueryService", {
            "ListUnderlyings": grpc.unary_unary_rpc_method_handler(list_underlyings),
            "ListUnderlyingsJson": grpc.unary_unary_rpc_method_handler(list_underlyings_json)}),))
        await bind(server, health, "127.0.0.1", port)
        print("stand-in up", os.environ["OPTMON_PG_DSN"], os.environ["OPTMON_REDIS_URL"], flush=True)
        if len(sys.argv) > 2:
            while not os.path.exists(sys.argv[2]):
                await asyncio.sleep(0.05)
            os._exit(3)
        await serve_until_signalled(server, health, 1.0)

    asyncio.run(main())
''')


def _ports() -> dict[str, int]:
    ports = {name: free_port() for name in ("gateway", "envoy_admin", *SERVICES, "pg", "redis")}
    ports.update({f"{s}_metrics": 0 for s in SERVICES})
    return ports


@pytest.fixture
def stand_in(tmp_root: Path) -> Path:
    path = tmp_root / "stand_in_service.py"
    path.write_text(STAND_IN)
    return path


def _commands(stand_in: Path, crash: dict[str, Path] | None = None) -> dict[str, list[str]]:
    crash = crash or {}
    return {s: [sys.executable, str(stand_in), f"OPTMON_{s.upper()}_PORT",
                *([str(crash[s])] if s in crash else [])] for s in SERVICES}


async def test_private_stack_starts_migrates_answers_and_stops_in_order(tmp_root: Path, stand_in: Path) -> None:
    state = tmp_root / f"stack-{uuid.uuid4().hex[:8]}"
    cfg = StackConfig(state_dir=state, ports=_ports(), commands=_commands(stand_in), health_timeout_s=60)
    messages: list[str] = []
    stack = Stack(cfg, out=messages.append)
    report = await stack.start()
    try:
        # private PostgreSQL, migrated
        assert stack.pg is not None and stack.pg.running()
        with psycopg.connect(stack.pg_dsn) as conn:
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        assert {"bars_1m", "bars_latest"} <= tables
        assert report.migrations_applied >= 1
        # private Redis with AOF
        assert stack.redis is not None
        import redis as redis_sync

        r = redis_sync.Redis.from_url(stack.redis_url)
        assert r.config_get("appendonly")["appendonly"] == "yes"
        r.close()
        # the gateway answers through Envoy → the stand-in query service
        status, body = http_get(f"{stack.gateway_url}/v1/underlyings")
        assert status == 200 and json.loads(body or b"{}").get("underlyings", []) == []
        # every child got the addresses through OPTMON_* and logs to its file
        for name in SERVICES:
            log = (state / "logs" / f"{name}.log").read_text()
            assert f"stand-in up {stack.pg_dsn} {stack.redis_url}" in log
            assert (state / "run" / f"{name}.pid").exists()
        assert 0 < report.infra_s <= report.migrated_s <= report.healthy_s <= report.first_answer_s
        assert any(m.startswith("PostgreSQL") for m in messages)
    finally:
        codes = await stack.stop()
    assert codes == {name: 0 for name in SERVICES}  # graceful SIGTERM, not SIGKILL
    assert not stack.pg.running()
    for name in ("gateway", "redis", "pg", *SERVICES):
        assert port_free(cfg.ports[name]), name
    assert not list((state / "run").glob("*.pid"))
    assert await stack.stop() == {}  # idempotent


async def test_existing_servers_are_used_and_left_running(
    tmp_root: Path, stand_in: Path, pg_dsn: str, redis_url: str
) -> None:
    cfg = StackConfig(state_dir=tmp_root / f"ext-{uuid.uuid4().hex[:8]}", ports=_ports(), pg_dsn=pg_dsn,
                      redis_url=redis_url, commands=_commands(stand_in), gateway=False)
    async with Stack(cfg) as stack:
        assert stack.pg is None and stack.redis is None
        assert stack.child_env("query")["OPTMON_PG_DSN"] == pg_dsn
        assert stack.child_env("stream")["OPTMON_QUERY_ADDR"] == f"127.0.0.1:{cfg.ports['query']}"
    with psycopg.connect(pg_dsn) as conn:  # still up
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_a_service_dying_later_is_reported(tmp_root: Path, stand_in: Path, pg_dsn: str, redis_url: str) -> None:
    state = tmp_root / f"die-{uuid.uuid4().hex[:8]}"
    trigger = state / "crash-stream-now"
    cfg = StackConfig(state_dir=state, ports=_ports(), pg_dsn=pg_dsn, redis_url=redis_url,
                      commands=_commands(stand_in, crash={"stream": trigger}), gateway=False)
    async with Stack(cfg) as stack:
        trigger.touch()  # every service is healthy now; make one die
        assert await stack.wait_for_exit() == "stream"
        child = stack.children["stream"]
        assert child.proc is not None and child.proc.returncode == 3


async def test_a_service_dying_at_start_fails_with_its_log_and_cleans_up(
    tmp_root: Path, stand_in: Path, pg_dsn: str, redis_url: str
) -> None:
    commands = _commands(stand_in)
    commands["query"] = [sys.executable, "-c", "import sys; print('query: bad config'); sys.exit(4)"]
    cfg = StackConfig(state_dir=tmp_root / f"bad-{uuid.uuid4().hex[:8]}", ports=_ports(), pg_dsn=pg_dsn,
                      redis_url=redis_url, commands=commands, gateway=False)
    stack = Stack(cfg)
    with pytest.raises(StackError, match=r"(?s)query exited with code 4.*query: bad config"):
        await stack.start()
    assert all(c.exited for c in stack.children.values())  # the healthy ones were stopped too


async def test_a_taken_port_is_refused_before_anything_starts(tmp_root: Path, pg_dsn: str, redis_url: str) -> None:
    ports = _ports()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        ports["query"] = s.getsockname()[1]
        cfg = StackConfig(state_dir=tmp_root / f"taken-{uuid.uuid4().hex[:8]}", ports=ports, pg_dsn=pg_dsn,
                          redis_url=redis_url, gateway=False)
        stack = Stack(cfg)
        with pytest.raises(StackError, match=f"ports already in use: query {ports['query']} .OPTMON_QUERY_PORT."):
            await stack.start()
        assert stack.children == {}


def test_config_from_env() -> None:
    env = {"OPTMON_GATEWAY_PORT": "18080", "OPTMON_QUERY_PORT": "15052", "OPTMON_PG_DSN": "postgresql://x@h/db"}
    cfg = StackConfig.from_env(Path("/tmp/x"), env)
    assert cfg.ports["gateway"] == 18080 and cfg.ports["query"] == 15052 and cfg.ports["ingest"] == 50051
    assert cfg.pg_dsn == "postgresql://x@h/db" and cfg.redis_url is None
    with pytest.raises(ValueError, match="OPTMON_STREAM_PORT"):
        StackConfig.from_env(Path("/tmp/x"), {"OPTMON_STREAM_PORT": "abc"})


async def test_an_unreachable_existing_database_is_a_clear_error(tmp_root: Path, redis_url: str) -> None:
    dsn = f"postgresql://optmon:secret@127.0.0.1:{free_port()}/optmon"
    cfg = StackConfig(state_dir=tmp_root / f"nodb-{uuid.uuid4().hex[:8]}", ports=_ports(), pg_dsn=dsn,
                      redis_url=redis_url, gateway=False)
    with pytest.raises(StackError, match=r"migrations failed on 127\.0\.0\.1") as err:
        await Stack(cfg).start()
    assert "secret" not in str(err.value)
