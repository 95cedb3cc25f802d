"""Hardening over real sockets: client ACL, rate limits, RFC 8482 ANY, TC for oversize, TCP cap, upstream faults."""

from __future__ import annotations

import socket

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from sinkhole.dns.guard import Admission, Guard
from sinkhole.service.config import DEFAULT_ALLOW, DEFAULT_EXEMPT
from tests.conftest import Clock, ask, wait_for
from tests.dnsstub import StubResolver, address_for


def ask_from(server, source: str, name: str = "www.example.test", qtype: str = "A") -> dns.message.Message:
    q = dns.message.make_query(name, qtype)
    return dns.query.udp(q, server.host, port=server.port, source=source, timeout=5, raise_on_truncation=False)


# ---------------------------------------------------------------------------- who may ask


@pytest.mark.parametrize("addr,ok", [
    ("127.0.0.1", True), ("::1", True), ("10.1.2.3", True), ("172.16.9.9", True), ("172.32.0.1", False),
    ("192.168.1.5", True), ("100.64.1.1", True), ("100.128.0.1", False), ("fd00::1", True), ("fe80::1%eth0", True),
    ("169.254.3.4", True), ("203.0.113.5", False), ("2001:db8::1", False), ("::ffff:10.0.0.1", True),
    ("not-an-ip", False),
])
def test_default_allow_clients(addr, ok):
    assert (Guard(DEFAULT_ALLOW, exempt=DEFAULT_EXEMPT).check(addr, "udp") is Admission.OK) is ok


def test_client_outside_allow_list_is_refused_and_nothing_forwarded(make_server, stub, db):
    s = make_server(upstream=(stub.address,), allow_clients=("10.0.0.0/8",), log_queries="all")
    for name in ("www.example.test", "chat.deepseek.com"):
        r = ask(s, name)
        assert r.rcode() == dns.rcode.REFUSED and r.answer == []
        with pytest.raises((EOFError, ConnectionError)):  # over TCP: closed as accepted (tests/dns/test_tcp_abuse.py)
            ask(s, name, tcp=True)
    garbage = dns.message.make_query("www.example.test", "A").to_wire()[:14]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(garbage, (s.host, s.port))
        assert sock.recvfrom(512)[0][3] & 0x0F == dns.rcode.REFUSED
    assert stub.queries() == []
    assert s.server.pipeline.guard.refused == 3 and s.server.listeners[0].tcp_handler.refused == 2
    s.stop()
    import sqlite3

    actions = [r[0] for r in sqlite3.connect(db).execute("SELECT action FROM audit")]
    assert actions.count("refused") == 3
    # that the server's log says so once per interval: tests/service/test_logthrottle.py


# ---------------------------------------------------------------------------- rate limits


def test_over_the_limit_gets_tc_over_udp_and_is_served_over_tcp(make_server, stub):
    s = make_server(upstream=(stub.address,), rate_limit=5, rate_limit_burst=5, rate_limit_net=0,
                    rate_limit_exempt=())
    s.server.pipeline.guard.clock = Clock()  # no token comes back during the test, however slow the machine
    replies = [ask_from(s, "127.0.0.1", "chat.deepseek.com") for _ in range(12)]
    full = [r for r in replies if not r.flags & dns.flags.TC]
    limited = [r for r in replies if r.flags & dns.flags.TC]
    assert len(full) == 5 and len(limited) == 7
    assert all(r.answer == [] for r in limited)
    # what a real resolver client does with TC=1: ask again over TCP, and get the answer
    assert ask(s, "chat.deepseek.com", tcp=True).answer[0][0].to_text() == "0.0.0.0"
    # another client is not slowed down by the one over its limit
    r = ask_from(s, "127.0.0.2", "chat.deepseek.com")
    assert not r.flags & dns.flags.TC and r.answer[0][0].to_text() == "0.0.0.0"
    assert s.server.pipeline.counts["limited"] == len(limited)


def test_network_limit_covers_the_prefix_only(make_server, stub):
    s = make_server(upstream=(stub.address,), rate_limit=0, rate_limit_net=4, rate_limit_net_burst=4,
                    rate_limit_exempt=())
    s.server.pipeline.guard.clock = Clock()
    replies = [ask_from(s, src, "chat.deepseek.com") for src in ("127.0.0.1", "127.0.0.2") * 5]
    assert sum(1 for r in replies if r.flags & dns.flags.TC) == 6  # one /24: one bucket
    r = ask_from(s, "127.0.1.1", "chat.deepseek.com")
    assert not r.flags & dns.flags.TC


def test_refuse_action_refuses_over_tcp_too(make_server, stub):
    s = make_server(upstream=(stub.address,), rate_limit=3, rate_limit_burst=3, rate_limit_net=0,
                    rate_limit_exempt=(), rate_limit_action="refuse")
    s.server.pipeline.guard.clock = Clock()
    codes = [ask(s, "chat.deepseek.com", tcp=True).rcode() for _ in range(8)]
    assert codes == [dns.rcode.NOERROR] * 3 + [dns.rcode.REFUSED] * 5


def test_loopback_is_exempt_by_default(make_server, stub):
    s = make_server(upstream=(stub.address,), rate_limit=2, rate_limit_burst=2)
    s.server.pipeline.guard.clock = Clock()  # no refill: only the exemption can let all ten through
    assert all(not ask(s, "chat.deepseek.com").flags & dns.flags.TC for _ in range(10))


def test_token_bucket_refills():
    clock = Clock()
    g = Guard(allow_clients=("0.0.0.0/0",), rate_limit=50, rate_limit_burst=2, net_rate_limit=0, exempt=(),
              clock=clock)
    assert [g.check("192.0.2.1", "udp") for _ in range(3)] == [Admission.OK, Admission.OK, Admission.LIMITED]
    clock.now += 0.01  # half a token at 50 a second
    assert g.check("192.0.2.1", "udp") is Admission.LIMITED
    clock.now += 0.02  # a whole one more
    assert [g.check("192.0.2.1", "udp") for _ in range(2)] == [Admission.OK, Admission.LIMITED]


# ---------------------------------------------------------------------------- answers


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_any_is_answered_minimally_and_nxdomain_when_the_name_does_not_exist(server, stub, tcp):
    r = ask(server, "www.example.test", "ANY", tcp=tcp)
    assert r.rcode() == dns.rcode.NOERROR
    assert len(r.answer) == 1 and r.answer[0].rdtype == dns.rdatatype.HINFO
    assert r.answer[0][0].cpu == b"RFC8482"
    assert [s.qtype for s in stub.queries()] == ["ANY"], "asked upstream once, to learn whether the name exists"
    r = ask(server, "nx.example.test", "ANY", tcp=tcp)
    assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer
    assert r.authority[0].rdtype == dns.rdatatype.SOA, "the upstream's denial, as it came"


def test_oversize_upstream_reply_is_truncated_for_udp_client(server, stub):
    q = dns.message.make_query("huge.example.test", "TXT", use_edns=False)
    r = dns.query.udp(q, server.host, port=server.port, timeout=5, raise_on_truncation=False)
    assert r.flags & dns.flags.TC and r.answer == [] and r.question == q.question
    r = dns.query.tcp(q, server.host, port=server.port, timeout=5)
    assert len(r.answer[0]) == 20


def test_tcp_connection_cap(make_server, stub):
    s = make_server(upstream=(stub.address,), tcp_max_clients=3, tcp_idle_timeout=5)
    held = [socket.create_connection((s.host, s.port), timeout=5) for _ in range(3)]
    try:
        wait_for(lambda: len(s.server.listeners[0].tcp_handler.writers) == 3)
        extra = socket.create_connection((s.host, s.port), timeout=5)
        extra.settimeout(5)
        assert extra.recv(10) == b"", "a connection over the cap is closed at once"
        extra.close()
        assert ask(s, "chat.deepseek.com").answer[0][0].to_text() == "0.0.0.0"  # UDP unaffected
    finally:
        for h in held:
            h.close()
    assert wait_for(lambda: ask(s, "chat.deepseek.com", tcp=True).answer, timeout=5)


# ---------------------------------------------------------------------------- upstream faults


@pytest.mark.parametrize("name", ["garbage.example.test", "qr0.example.test", "header.example.test"])
def test_broken_upstream_replies_are_ignored_then_servfail(make_server, stub, name):
    s = make_server(upstream=(stub.address,), timeout=1.0)
    forwarder = s.server.forwarder
    r = ask(s, name)
    assert r.rcode() == dns.rcode.SERVFAIL
    # the broken reply was not taken for an answer, nor for a refusal: the server waited for a real one until its
    # own timeout, asked once (no retry storm), counted one timeout for the upstream, and goes on answering
    assert len(stub.queries(name)) == 1
    assert forwarder.failures[forwarder.upstreams[0]] == 1
    assert ask(s, "fine.example.test").answer[0][0].to_text() == address_for("fine.example.test")


def test_broken_reply_from_first_upstream_then_second_answers(make_server, stub):
    with StubResolver(misbehave=False) as second:
        s = make_server(upstream=(stub.address, second.address), timeout=2.0)
        # the first stub answers garbage; the second one is asked after the first's share of the timeout
        r = ask(s, "garbage.example.test")
        assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].to_text() == address_for("garbage.example.test")


def test_forged_reply_from_another_port_is_ignored(server, stub):
    r = ask(server, "spoofport.example.test")
    assert [rr.to_text() for rrset in r.answer for rr in rrset] == [address_for("spoofport.example.test")]
    assert ask(server, "spoofport.example.test").answer[0][0].to_text() != "203.0.113.99"


def test_upstream_that_accepts_tcp_and_never_answers(make_server, stub):
    s = make_server(upstream=(stub.address,), timeout=1.0)
    forwarder = s.server.forwarder
    r = ask(s, "tcphang.example.test", tcp=True, timeout=5)
    assert r.rcode() == dns.rcode.SERVFAIL
    assert forwarder.failures[forwarder.upstreams[0]] == 1  # ended by the server's own timeout, counted once
    # a UDP client gets the truncated reply relayed and may retry over TCP itself
    q = dns.message.make_query("tcphang.example.test", "A")
    r = dns.query.udp(q, s.host, port=s.port, timeout=5, raise_on_truncation=False)
    assert r.flags & dns.flags.TC


def test_spoofed_reply_is_never_cached(server, stub):
    for _ in range(2):  # the second answer comes from the cache
        r = ask(server, "spoof.example.test")
        assert [rr.to_text() for rrset in r.answer for rr in rrset] == [address_for("spoof.example.test")]
    assert len(stub.queries("spoof.example.test")) == 1


@pytest.mark.parametrize("payload", [0, 100, 511])
def test_edns_buffer_below_512_counts_as_512(server, stub, payload):
    q = dns.message.make_query("big.example.test", "TXT", use_edns=0, payload=payload)
    wire = q.to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(wire, (server.host, server.port))
        reply = sock.recvfrom(65535)[0]
    assert len(reply) <= 512
    r = dns.message.from_wire(reply)
    assert r.flags & dns.flags.TC and r.id == q.id
