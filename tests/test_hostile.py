"""sinkhole against a hostile upstream (tests/hostile.py) and hostile clients, over UDP and TCP.

TSIG-signed queries get NOTAUTH/BADKEY; other opcodes NOTIMP without RA.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import pytest

from sinkhole import codec
from sinkhole.model import RuleKind
from sinkhole.store import Store
from tests.conftest import RunningServer
from tests.hostile import HostileStub

TRANSPORTS = [pytest.param(False, id="udp"), pytest.param(True, id="tcp")]


@pytest.fixture(scope="module")
def hostile():
    with HostileStub() as stub:
        yield stub


def _server(db: Path, stub: HostileStub, **settings: object) -> RunningServer:
    store = Store(db)
    store.add_rules(RuleKind.BLOCK, ["deepseek.com", "203.0.113.0/24"], category="test")
    store.add_rules(RuleKind.ALLOW, ["status.deepseek.com"], category="test")
    store.close()
    return RunningServer(db, upstream=(stub.address,), shipped_lists=False, log_queries="all", **settings).start()


@pytest.fixture(scope="module")
def server(hostile, tmp_path_factory):
    s = _server(tmp_path_factory.mktemp("hostile") / "sinkhole.db", hostile)
    yield s
    s.stop()


def ask(server: RunningServer, name: str, qtype: str = "A", tcp: bool = False, **kw: object) -> dns.message.Message:
    q = dns.message.make_query(name, qtype, **kw)  # type: ignore[arg-type]
    if tcp:
        return dns.query.tcp(q, server.host, port=server.port, timeout=5)
    return dns.query.udp(q, server.host, port=server.port, timeout=5, raise_on_truncation=False)


def ask_wire(server: RunningServer, wire: bytes, tcp: bool) -> bytes:
    """Send raw bytes, return the raw reply (nothing parsed or checked on the way)."""
    if tcp:
        with socket.create_connection((server.host, server.port), timeout=5) as sock:
            sock.sendall(struct.pack("!H", len(wire)) + wire)
            size = struct.unpack("!H", _recv(sock, 2))[0]
            return _recv(sock, size)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(wire, (server.host, server.port))
        return sock.recv(65535)


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "connection closed"
        buf += chunk
    return buf


def records(section: list) -> list[tuple[str, str, list[str]]]:
    return sorted((r.name.to_text(), dns.rdatatype.to_text(r.rdtype), sorted(x.to_text() for x in r))
                  for r in section)


def upstream_query(stub: HostileStub, name: str) -> dns.message.Message:
    seen = [s for s in stub.queries(name)]
    assert seen, f"{name} was not asked upstream"
    return dns.message.from_wire(seen[-1].wire)


# ---------------------------------------------------------------------------- protocol details


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_a_tsig_signed_query_gets_notauth_badkey_and_is_not_forwarded(server, hostile, tcp):
    keyring = dns.tsigkeyring.from_text({"agency-key.": "c2lua2hvbGUtaGFzLW5vLWtleXM="})
    name = f"signed.{'tcp' if tcp else 'udp'}.example.test"
    q = dns.message.make_query(name, "A", use_edns=0)
    q.use_tsig(keyring, "agency-key.")
    wire = ask_wire(server, q.to_wire(), tcp)
    assert codec.header_rcode(wire) == codec.NOTAUTH
    with pytest.raises(dns.tsig.PeerBadKey):  # dnspython reads the unsigned TSIG's error: BADKEY
        dns.message.from_wire(wire, keyring=keyring, request_mac=q.mac)
    assert hostile.queries(name) == []


@pytest.mark.parametrize("tcp", TRANSPORTS)
@pytest.mark.parametrize("opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, 3, dns.opcode.NOTIFY, dns.opcode.UPDATE])
def test_other_opcodes_get_notimp_without_ra(server, hostile, opcode, tcp):
    q = dns.message.make_query(f"op{opcode}.example.test", "SOA", use_edns=False)
    q.set_opcode(opcode)
    wire = ask_wire(server, q.to_wire(), tcp)
    assert codec.header_rcode(wire) == codec.NOTIMP
    flags = struct.unpack("!H", wire[2:4])[0]
    assert not flags & dns.flags.RA and (flags >> 11) & 0xF == opcode
    assert wire[12:] == q.to_wire()[12:], "the question echoed, as Unbound does"
    assert hostile.queries(f"op{opcode}.example.test") == []
