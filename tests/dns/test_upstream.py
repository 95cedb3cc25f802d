"""Forwarding over real sockets to local stub upstreams: faithful relay, RFC 5452, TC->TCP, failover."""

from __future__ import annotations

import socket
import time

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from sinkhole.dns.upstream import parse_hostport, parse_upstream, system_upstreams
from sinkhole.errors import ConfigError
from tests.conftest import ask, ede_of, wait_for
from tests.dnsstub import StubResolver, address_for

TRANSPORTS = [pytest.param(False, id="udp"), pytest.param(True, id="tcp")]


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_allowed_name_is_forwarded_and_answered(server, stub, tcp):
    r = ask(server, "www.example.test", "A", tcp=tcp)
    assert r.rcode() == dns.rcode.NOERROR
    assert r.answer[0][0].to_text() == address_for("www.example.test")
    assert len(stub.queries("www.example.test")) == 1


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_nxdomain_and_sections_relayed_faithfully(server, stub, tcp):
    r = ask(server, "nx.example.test", "A", tcp=tcp)
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert r.authority[0].rdtype == dns.rdatatype.SOA and r.authority[0].name.to_text() == "example.test."


def test_flags_and_all_sections_relayed_byte_for_byte(server, stub):
    q = dns.message.make_query("flags.example.test", "A", use_edns=False)
    wire = dns.query.udp(q, server.host, port=server.port, timeout=5).to_wire()
    seen = stub.queries("flags.example.test")[0]
    # what the upstream sent for that exact query, with the client's ID put back; the upstream was asked
    # with AD (RFC 6840 §5.7) and echoes it, but this client asked with neither AD nor DO: AD=0 for it
    expected = bytearray(stub.respond(seen.wire, "udp", ("127.0.0.1", 0))[0])
    assert seen.wire[3] & 0x20 and expected[3] & 0x20
    expected[3] &= ~0x20
    assert wire[2:] == expected[2:]
    r = dns.message.from_wire(wire)
    assert r.flags & dns.flags.AA and r.authority and r.additional


def test_upstream_query_uses_fresh_random_id_and_a_random_source_port_of_the_pool(server, stub):
    for i in range(40):
        q = dns.message.make_query(f"n{i}.example.test", "A")  # different names: no cache hit
        q.id = 4242
        dns.query.udp(q, server.host, port=server.port, timeout=5)
    seen = stub.queries()
    assert len(seen) == 40
    assert len({s.qid for s in seen}) >= 38, "upstream IDs must be random, not the client's"
    # each query on one of the pool's sockets (64 ports the kernel picked), chosen at random: 40 queries land on
    # about 30 ports (fewer than 16 has a probability below 1e-11)
    ports = [s.src[1] for s in seen]
    assert len(set(ports)) >= 16, "upstream queries must spread over the pool's random source ports"
    pool = server.server.forwarder._udp_pools[server.server.forwarder.upstreams[0]]
    assert set(pool.ports()) <= set(ports) and len(set(ports)) <= pool.opened, "each port a socket of the pool"


def test_spoofed_replies_with_wrong_id_or_question_are_ignored(server, stub):
    r = ask(server, "spoof.example.test", "A")
    assert [rr.to_text() for rrset in r.answer for rr in rrset] == [address_for("spoof.example.test")]


def test_forged_replies_on_a_shared_pool_socket_answer_no_query_in_flight(server, stub):
    """Every query on one pooled socket at once: the stub sends, before each real reply, one with the query's ID
    + 1 (likely another query's in flight there, for another question) and one with its ID for another name. None
    is taken, not even by the query whose ID it carries: each client gets its own name's address."""
    forwarder = server.server.forwarder
    forwarder.udp_sockets = 1
    names = [f"spoof.n{i}.example.test" for i in range(30)]
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in names]
    try:
        for sock, name in zip(socks, names, strict=True):
            sock.settimeout(5)
            sock.sendto(dns.message.make_query(name, "A").to_wire(), (server.host, server.port))
        replies = [dns.message.from_wire(sock.recv(65535)) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert [[rr.to_text() for rrset in r.answer for rr in rrset] for r in replies] == [[address_for(n)] for n in
                                                                                       names]
    pool = forwarder._udp_pools[forwarder.upstreams[0]]
    assert len({s.src[1] for s in stub.queries()}) == pool.opened == 1
    assert pool.ignored >= 2 * len(names)


def test_truncated_udp_reply_is_retried_over_tcp(server, stub):
    r = ask(server, "big.example.test", "TXT", tcp=True)
    assert len(r.answer[0]) == 40
    protos = [s.proto for s in stub.queries("big.example.test")]
    assert protos == ["udp", "tcp"]


def test_large_reply_for_udp_client_is_truncated_even_with_a_large_buffer(server, stub):
    # 40 TXT records (about 4 KB): over UDP never more than the 1232 bytes we advertise, whatever the
    # client's buffer (no 100-fold amplification of a small query); over TCP whole
    for payload in (1232, 8192):
        q = dns.message.make_query("big.example.test", "TXT", use_edns=0, payload=payload)
        r = dns.query.udp(q, server.host, port=server.port, timeout=5, raise_on_truncation=False)
        assert r.flags & dns.flags.TC and not r.answer
    r = dns.query.tcp(q, server.host, port=server.port, timeout=5)
    assert len(r.answer[0]) == 40


def test_a_cached_large_answer_to_a_small_udp_query_is_capped(server, stub):
    q = dns.message.make_query("big.example.test", "TXT", use_edns=0, payload=65535)
    assert len(dns.query.tcp(q, server.host, port=server.port, timeout=5).answer[0]) == 40  # now cached
    asked = len(stub.queries("big.example.test"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(q.to_wire(), (server.host, server.port))
        reply = sock.recv(65535)
    assert len(reply) <= 1232 and dns.message.from_wire(reply).flags & dns.flags.TC
    assert len(stub.queries("big.example.test")) == asked, "the UDP client was answered from the cache"


def test_failover_to_second_upstream_when_first_is_silent(make_server):
    with StubResolver(silent=True) as dead, StubResolver() as live:
        s = make_server(upstream=(dead.address, live.address), timeout=2.0)
        r = ask(s, "www.example.test")
        assert r.answer[0][0].to_text() == address_for("www.example.test")
        assert dead.queries() and live.queries()  # the silent one first, then, within the 2 s, the live one
        # once a probe (`. NS`) has gone unanswered too, the dead upstream is tried last: the next query goes
        # straight to the live one
        forwarder = s.server.forwarder
        assert wait_for(lambda: forwarder.is_down(forwarder.upstreams[0]), timeout=10)
        assert dead.queries("") and not live.queries("")
        before = len(dead.queries())
        ask(s, "two.example.test")
        assert len(dead.queries()) == before


def test_failover_when_first_upstream_refuses_connection(make_server, stub):
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: ICMP port unreachable
    s = make_server(upstream=(f"127.0.0.1:{port}", stub.address))
    r = ask(s, "www.example.test")
    assert r.answer[0][0].to_text() == address_for("www.example.test")


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_all_upstreams_down_gives_servfail_within_timeout(make_server, tcp):
    with StubResolver(silent=True) as dead1, StubResolver(silent=True) as dead2:
        s = make_server(upstream=(dead1.address, dead2.address), timeout=1.0)
        r = ask(s, "www.example.test", tcp=tcp, timeout=5)  # a bound not kept: no answer within the client's 5 s
        assert r.rcode() == dns.rcode.SERVFAIL
        assert ede_of(r) and ede_of(r)[0][0] == 22  # No Reachable Authority
        # the second was asked too: the bound was shared between them, not spent on the first
        assert dead1.queries("www.example.test") and dead2.queries("www.example.test")


def test_default_servfail_bound_is_two_seconds(make_server):
    with StubResolver(silent=True) as dead:
        s = make_server(upstream=(dead.address,))
        assert s.cfg.upstreams.timeout == 2.0 and s.server.forwarder.timeout == 2.0
        r = ask(s, "slow.example.test", timeout=6)
        assert r.rcode() == dns.rcode.SERVFAIL and ede_of(r)[0][0] == 22


def test_ipv6_listener_and_upstream(make_server):
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with StubResolver(host="::1") as stub6:
        s = make_server(listen=("[::1]:0",), upstream=(stub6.address,))
        for tcp in (False, True):
            q = dns.message.make_query("www.example.test", "A")
            send = dns.query.tcp if tcp else dns.query.udp
            r = send(q, "::1", port=s.port, timeout=5)
            assert r.answer[0][0].to_text() == address_for("www.example.test")
            q = dns.message.make_query("chat.deepseek.com", "A")
            assert send(q, "::1", port=s.port, timeout=5).answer[0][0].to_text() == "0.0.0.0"


def test_several_listen_addresses(make_server, stub):
    s = make_server(listen=("127.0.0.1:0", "127.0.0.2:0"), upstream=(stub.address,))
    ports = [(x.host, x.port) for x in s.server.listeners]
    assert [h for h, _ in ports] == ["127.0.0.1", "127.0.0.2"]
    for host, port in ports:
        q = dns.message.make_query("chat.deepseek.com", "A")
        assert dns.query.udp(q, host, port=port, timeout=5).answer[0][0].to_text() == "0.0.0.0"
        assert dns.query.tcp(q, host, port=port, timeout=5).answer[0][0].to_text() == "0.0.0.0"


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1", ("127.0.0.1", 53)), ("127.0.0.1:5300", ("127.0.0.1", 5300)),
    ("::1", ("::1", 53)), ("[::1]:5300", ("::1", 5300)), ("[fe80::1]", ("fe80::1", 53)),
])
def test_parse_hostport(text, expected):
    assert parse_hostport(text, 53) == expected


@pytest.mark.parametrize("text", ["dns.example.test", "127.0.0.1:99999", "[::1", "1.2.3.4:x", "127.0.0.1:0"])
def test_bad_upstream_is_a_config_error(text):
    with pytest.raises(ConfigError):
        parse_upstream(text)


def test_system_upstreams_read_from_resolv_conf(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nnameserver 127.0.0.53\nnameserver ::1\noptions edns0\n")
    ups = system_upstreams(str(conf))
    assert [str(u) for u in ups] == ["127.0.0.53:53", "[::1]:53"]
    empty = tmp_path / "empty.conf"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError):
        system_upstreams(str(empty))


def test_forwards_in_flight_are_bounded(make_server):
    with StubResolver(silent=True) as dead:
        s = make_server(upstream=(dead.address,), timeout=1.5, max_inflight=1)
        import concurrent.futures

        def one(name: str, source: str) -> tuple[int, float]:
            started = time.monotonic()
            r = dns.query.udp(dns.message.make_query(name, "A"), s.host, port=s.port, source=source, timeout=5)
            return r.rcode(), time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(one, "a.example.test", "127.0.0.1")
            time.sleep(0.2)  # the first is waiting on the dead upstream now
            # another network's client, under its own share (one client's share: tests/dns/test_fairness.py)
            second = pool.submit(one, "b.example.test", "127.0.1.2")
            (c1, t1), (c2, t2) = first.result(), second.result()
        assert c1 == c2 == dns.rcode.SERVFAIL
        assert t2 < 0.5 < t1, "over the cap: SERVFAIL at once, without holding another socket"
        # and the probe after the timeout (`. NS`, one at a time per upstream, outside the cap)
        assert [q.qname for q in dead.queries() if q.qname] == ["a.example.test"]


def test_tcp_connection_to_the_upstream_is_reused(server, stub):
    for i in range(4):
        r = ask(server, f"big.n{i}.example.test", "TXT", tcp=True)  # TC over UDP, then TCP upstream
        assert len(r.answer[0]) == 40
    tcp = [s for s in stub.queries() if s.proto == "tcp"]
    assert len(tcp) == 4
    assert len({s.src for s in tcp}) == 1, "one pooled connection for every TCP retry"


def test_a_closed_pooled_connection_is_replaced(make_server):
    with StubResolver() as stub:
        s = make_server(upstream=(stub.address,))
        assert len(ask(s, "big.a.example.test", "TXT", tcp=True).answer[0]) == 40
        for conn in s.server.forwarder._tcp_pool.values():
            conn.writer.close()  # as when the upstream closes an idle connection
        assert len(ask(s, "big.b.example.test", "TXT", tcp=True).answer[0]) == 40
        assert len({q.src for q in stub.queries() if q.proto == "tcp"}) == 2
