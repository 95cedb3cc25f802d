"""Listener behaviour over real sockets: RFC 7766 TCP framing, pipelining, idle timeout, bad packets."""

from __future__ import annotations

import socket
import struct

import dns.edns
import dns.message
import dns.rcode
import pytest
from dnslib import EDNS0, QTYPE, DNSRecord

from tests.conftest import ask
from tests.dnsstub import address_for


def tcp_connect(server) -> socket.socket:
    s = socket.create_connection((server.host, server.port), timeout=5)
    return s


def read_frame(sock: socket.socket) -> bytes:
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    (n,) = struct.unpack("!H", exact(2))
    return exact(n)


def frame(wire: bytes) -> bytes:
    return struct.pack("!H", len(wire)) + wire


def udp_exchange(server, wire: bytes, timeout: float = 2.0) -> bytes | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(wire, (server.host, server.port))
        return s.recvfrom(65535)[0]
    except TimeoutError:
        return None
    finally:
        s.close()


def test_pipelined_tcp_queries_on_one_connection(server, stub):
    names = [f"host{i}.example.test" if i % 2 else f"x{i}.chat.deepseek.com" for i in range(100)]
    queries = {}
    with tcp_connect(server) as sock:
        payload = b""
        for i, name in enumerate(names):
            q = dns.message.make_query(name, "A")
            q.id = 1000 + i
            queries[q.id] = name
            payload += frame(q.to_wire())
        sock.sendall(payload)  # all 100 before reading any answer
        answers = {}
        for _ in names:
            r = dns.message.from_wire(read_frame(sock))
            answers[r.id] = r
    assert set(answers) == set(queries)
    for qid, r in answers.items():
        name = queries[qid]
        assert r.question[0].name.to_text() == name + "."
        expected = "0.0.0.0" if "deepseek" in name else address_for(name)
        assert r.answer[0][0].to_text() == expected


def test_tcp_idle_connection_is_closed(make_server, stub):
    s = make_server(upstream=(stub.address,), tcp_idle_timeout=0.3)
    with tcp_connect(s) as sock:
        sock.settimeout(5)  # an idle timeout not applied: recv raises TimeoutError after 5 s
        assert sock.recv(10) == b""  # the server closed it


def test_tcp_zero_length_closes_and_server_keeps_serving(server):
    with tcp_connect(server) as sock:
        sock.sendall(b"\x00\x00")
        sock.settimeout(5)
        assert sock.recv(10) == b""
    assert ask(server, "chat.deepseek.com", tcp=True).answer[0][0].to_text() == "0.0.0.0"


def test_tcp_slow_writer_does_not_block_others(make_server, stub):
    s = make_server(upstream=(stub.address,), tcp_idle_timeout=2)
    with tcp_connect(s) as slow:
        slow.sendall(b"\x00\x30\x12")  # a length and one byte, then nothing
        for tcp in (False, True):
            assert ask(s, "chat.deepseek.com", tcp=tcp).answer[0][0].to_text() == "0.0.0.0"


def header(qid=0x1234, flags=0x0100, qd=1, an=0, ns=0, ar=0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


QUESTION = b"\x04chat\x08deepseek\x03com\x00\x00\x01\x00\x01"


@pytest.mark.parametrize("wire,why", [
    (b"", "empty"), (b"\x12\x34\x01", "shorter than a header"), (header()[:11], "11 bytes"),
    (header(flags=0x8100) + QUESTION, "QR set (a response)"),
])
def test_packets_that_are_dropped(server, wire, why):
    assert udp_exchange(server, wire, timeout=0.5) is None, why
    assert ask(server, "chat.deepseek.com").answer[0][0].to_text() == "0.0.0.0"


@pytest.mark.parametrize("wire,rcode,why", [
    (header(qd=0), dns.rcode.FORMERR, "no question"),
    (header(qd=2) + QUESTION + QUESTION, dns.rcode.FORMERR, "two questions"),
    (header() + b"\x04chat\x08deep", dns.rcode.FORMERR, "name cut short"),
    (header() + b"\x04chat\x00", dns.rcode.FORMERR, "no type and class"),
    (header() + b"\xc0\x0c\x00\x01\x00\x01", dns.rcode.FORMERR, "compression pointer loop in question"),
    (header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", dns.rcode.FORMERR, "label over 63"),
    (header() + b"\x3fa" + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", dns.rcode.FORMERR, "name over 255"),
    (header() + b"\x0cdeepseek.com\x00\x00\x01\x00\x01", dns.rcode.FORMERR, "literal dot in a label"),
    (header() + b"\x05ch\x00at\x08deepseek\x03com\x00\x00\x01\x00\x01", dns.rcode.FORMERR, "NUL in a label"),
    (header(flags=0x0300) + QUESTION, dns.rcode.FORMERR, "TC set in a query"),
    (header(an=1) + QUESTION + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x01\x02\x03\x04",
     dns.rcode.FORMERR, "answer record in a query"),
    (header() + b"\x04chat\x08deepseek\x03com\x00\x00\xfa\x00\x01", dns.rcode.FORMERR, "TSIG as qtype"),
    (header(ar=2) + QUESTION + (b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00") * 2, dns.rcode.FORMERR,
     "two OPT records"),
    (header(flags=0x2900) + QUESTION, dns.rcode.NOTIMP, "opcode UPDATE"),
    (header(flags=0x1100) + QUESTION, dns.rcode.NOTIMP, "opcode STATUS"),
])
def test_malformed_queries_get_an_error_rcode(server, stub, wire, rcode, why):
    reply = udp_exchange(server, wire)
    assert reply is not None, why
    assert reply[:2] == b"\x12\x34", "the reply echoes the ID"
    assert reply[2] & 0x80, "QR set"
    assert reply[3] & 0x0F == rcode, why
    assert stub.queries() == [], "nothing malformed is forwarded"
    assert ask(server, "chat.deepseek.com").answer[0][0].to_text() == "0.0.0.0"


def test_malformed_query_over_tcp(server):
    with tcp_connect(server) as sock:
        sock.sendall(frame(header(qd=0)))
        reply = read_frame(sock)
        assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == dns.rcode.FORMERR
        q = dns.message.make_query("chat.deepseek.com", "A")
        sock.sendall(frame(q.to_wire()))
        assert dns.message.from_wire(read_frame(sock)).answer[0][0].to_text() == "0.0.0.0"


def test_edns_version_1_gets_badvers(server, stub):
    q = DNSRecord.question("chat.deepseek.com", "A")
    q.add_ar(EDNS0(udp_len=1232, version=1))
    reply = udp_exchange(server, q.pack())
    r = DNSRecord.parse(reply)
    opt = [rr for rr in r.ar if rr.rtype == QTYPE.OPT]
    assert len(opt) == 1
    # BADVERS = 16: header rcode 0, extended rcode 1 in the OPT TTL's top byte
    assert r.header.rcode == 0 and (opt[0].ttl >> 24) == 1
    assert r.rr == []


def test_zone_transfer_is_refused(server, stub):
    q = dns.message.make_query("example.test", "AXFR")
    r = dns.query.tcp(q, server.host, port=server.port, timeout=5)
    assert r.rcode() == dns.rcode.REFUSED
    assert stub.queries() == []


def test_many_garbage_datagrams_then_still_serving(server):
    import random

    rnd = random.Random(7)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(500):
            s.sendto(bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 80))), (server.host, server.port))
    finally:
        s.close()
    assert ask(server, "chat.deepseek.com").answer[0][0].to_text() == "0.0.0.0"
    assert ask(server, "chat.deepseek.com", tcp=True).answer[0][0].to_text() == "0.0.0.0"


def test_big_packets_are_not_memoized(make_server, stub):
    from sinkhole.dns import codec

    s = make_server(upstream=(stub.address,), allow_clients=("10.0.0.0/8",))
    q = dns.message.make_query("chat.deepseek.com", "A", use_edns=0, payload=4096,
                               options=[dns.edns.GenericOption(65001, b"x" * 3000)])
    before = len(codec._MEMO)
    for i in range(20):
        q.id = i
        r = dns.message.from_wire(udp_exchange(s, q.to_wire()))
        assert r.rcode() == dns.rcode.REFUSED
    assert len(codec._MEMO) == before
