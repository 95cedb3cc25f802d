"""The RPZ port under abuse, over real sockets: connections from addresses that may not transfer are closed as
accepted (no file descriptor held, one log line), one address holds at most a few, an idle one is closed."""

from __future__ import annotations

import os
import re
import socket

import dns.query
import dns.zone
import pytest

from sinkhole.errors import ConfigError
from sinkhole.service import build
from tests.conftest import free_ports, wait_for

ZONE = "rpz.sinkhole."


def connect(port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_connection_flood_from_a_refused_address_holds_no_descriptor(server_process, stub, tmp_path):
    (port,) = free_ports(1)
    p = server_process("--upstream", stub.address, "--workers", "1", "--rpz-listen", f"127.0.0.1:{port}",
                       env={"SINKHOLE_RPZ_SECONDARIES": "127.0.0.1/32", "SINKHOLE_LOG_REPEAT_INTERVAL": "600"})
    assert wait_for(lambda: any("RPZ primary" in line for line in p.lines), timeout=10)
    before = open_fds(p.proc.pid)
    flood = []
    try:
        for _ in range(300):
            flood.append(connect(port, "127.0.0.2"))
        assert all(closed_by_server(sock) for sock in flood)
        assert open_fds(p.proc.pid) < before + 10, f"{before} descriptors before, {open_fds(p.proc.pid)} now"
        # the allowed secondary still transfers the zone
        zone = dns.zone.from_xfr(dns.query.xfr("127.0.0.1", ZONE, port=port, timeout=10))
        assert zone.get_rdataset("@", "SOA") is not None
    finally:
        for sock in flood:
            sock.close()
    refusals = [line for line in p.lines if "RPZ: TCP connection from 127.0.0.2" in line]
    assert len(refusals) == 1, "one line for the whole flood while it lasts:\n" + "".join(refusals[:5])
    assert p.terminate() == 0
    summary = [line for line in p.lines if "more like this" in line and "RPZ: TCP connection" in line]
    assert summary and re.search(r"299 more like this", summary[0]), "".join(p.lines[-5:])


@pytest.mark.parametrize("per_address", [4, 2])
def test_one_address_holds_few_rpz_connections_and_an_idle_one_is_closed(make_server, stub, per_address):
    s = make_server(upstream=(stub.address,), shipped_lists=False, rpz_listen="127.0.0.1:0",
                    rpz_max_per_address=per_address, rpz_idle_timeout=1.0)
    port = s.server.rpz.endpoint.port
    held = [connect(port, "127.0.0.5") for _ in range(10)]
    try:
        over = held[per_address:]
        assert all(closed_by_server(sock) for sock in over)
        # the ones it holds are closed once idle for the deadline (rpz_idle_timeout), without a request
        assert all(closed_by_server(sock) for sock in held[:per_address])
        assert wait_for(lambda: s.server.rpz.endpoint.slots.open == 0, timeout=10)
        zone = dns.zone.from_xfr(dns.query.xfr("127.0.0.1", ZONE, port=port, timeout=10, source="127.0.0.6"))
        assert zone.get_rdataset("@", "SOA") is not None
    finally:
        for sock in held:
            sock.close()


def test_the_rpz_port_holds_at_most_rpz_max_connections_from_all_addresses(make_server, stub):
    s = make_server(upstream=(stub.address,), shipped_lists=False, rpz_listen="127.0.0.1:0", rpz_max_connections=3,
                    rpz_max_per_address=2, rpz_idle_timeout=60.0)
    port = s.server.rpz.endpoint.port
    held = [connect(port, f"127.0.0.{10 + i}") for i in range(3)]  # three addresses, one each: the cap
    try:
        assert wait_for(lambda: s.server.rpz.endpoint.slots.open == 3, timeout=10)
        late = connect(port, "127.0.0.20")
        assert closed_by_server(late)
        late.close()
        held.pop().close()  # one goes: the next is served again
        assert wait_for(lambda: s.server.rpz.endpoint.slots.open == 2, timeout=10)
        zone = dns.zone.from_xfr(dns.query.xfr("127.0.0.1", ZONE, port=port, timeout=10, source="127.0.0.21"))
        assert zone.get_rdataset("@", "SOA") is not None
    finally:
        for sock in held:
            sock.close()


@pytest.mark.parametrize("setting,value,message", [
    ("rpz_max_connections", "0", "rpz_max_connections must be from 1 to 100,000"),
    ("rpz_max_connections", "100001", "rpz_max_connections must be from 1 to 100,000"),
    ("rpz_max_per_address", "0", "rpz_max_per_address must be from 1"),
    ("rpz_max_per_address", "65", "must not be above rpz_max_connections (64)"),
    ("rpz_idle_timeout", "0", "rpz_idle_timeout must be above zero"),
    ("rpz_idle_timeout", "3601", "rpz_idle_timeout must be above zero and at most 3600"),
    ("rpz_idle_timeout", "nan", "rpz_idle_timeout must be above zero"),
])
def test_rpz_connection_settings_are_bounded(setting, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build.load(env={f"SINKHOLE_{setting.upper()}": value})


def test_rpz_connection_settings_come_from_the_file_and_reach_the_endpoint(tmp_path, db):
    f = tmp_path / "sinkhole.toml"
    f.write_text('rpz_listen = "127.0.0.1:0"\nrpz_max_connections = 9\nrpz_max_per_address = 3\n'
                 "rpz_idle_timeout = 2.5\n")
    cfg = build.load(f, env={})
    node = build.fleet(cfg, db)
    assert node is not None and node.endpoint is not None
    assert (node.endpoint.slots.total, node.endpoint.slots.per_address, node.endpoint.idle_timeout) == (
        9, 3, 2.5)
