"""services.devstack.redis.free_port: the ports tests and benchmarks give the servers they start."""

from __future__ import annotations

import socket

import pytest

from services.devstack import redis as devredis


def test_ports_are_outside_the_ephemeral_range_distinct_and_free() -> None:
    """An outgoing connection can never take these as its local port (the CI failure: query could not bind a port
    from bind(0) because a connection made while the stack started had taken it)."""
    lo, hi = devredis._ephemeral_range()
    ports = [devredis.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(not lo <= p <= hi for p in ports)
    assert all(devredis._QUIET_PORTS[0] <= p < devredis._QUIET_PORTS[1] for p in ports)
    assert all(devredis.port_free(p) for p in ports)


def test_a_port_in_use_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        busy = held.getsockname()[1]
        held.listen()
        monkeypatch.setattr(devredis, "_QUIET_PORTS", (busy, busy + 1))
        monkeypatch.setattr(devredis, "_ephemeral_range", lambda: (busy + 10, busy + 20))
        port = devredis.free_port()  # the only quiet port is busy: the kernel's choice instead
    assert port != busy and port > 0


def test_without_quiet_ports_the_kernel_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devredis, "_ephemeral_range", lambda: (1024, 65535))
    ports = [devredis.free_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(devredis.port_free(p) for p in ports)


def test_a_range_covering_part_of_the_quiet_ports_leaves_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devredis, "_ephemeral_range", lambda: (1024, 25000))
    ports = [devredis.free_port() for _ in range(50)]
    assert all(25000 < p < devredis._QUIET_PORTS[1] for p in ports)
