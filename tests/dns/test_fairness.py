"""One client's flood of unanswerable names, over real sockets: it holds at most its share of the forwards in
flight and only it is refused beyond that; the upstream that answers everyone else is not judged down."""

from __future__ import annotations

import socket
import struct

import dns.message
import dns.query
import dns.rcode

from tests.conftest import wait_for
from tests.dnsstub import StubResolver, address_for


def ask_from(server, source: str, name: str) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, "A"), server.host, port=server.port, source=source, timeout=5)


def test_one_clients_unanswerable_names_do_not_starve_the_others(make_server, stub):
    with StubResolver(misbehave=False) as second:
        # stub (first) never answers slow.*; the second answers everything
        s = make_server(upstream=(stub.address, second.address), max_inflight=50, timeout=1.5)
        flood = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        flood.bind(("127.0.0.2", 0))
        flood.settimeout(10)
        flood.connect((s.host, s.port))
        try:
            wires = [dns.message.make_query(f"slow.f{i}.example.test", "A", id=i).to_wire() for i in range(300)]
            flood.sendall(b"".join(struct.pack("!H", len(w)) + w for w in wires))  # pipelined, all at once
            assert wait_for(lambda: len(stub.queries()) >= 5, timeout=10)
            # meanwhile another client's new names are forwarded and answered at once
            for i in range(20):
                r = ask_from(s, "127.0.0.1", f"y{i}.example.test")
                assert r.rcode() == dns.rcode.NOERROR, f"y{i}: {dns.rcode.to_text(r.rcode())}"
                assert r.answer[0][0].to_text() == address_for(f"y{i}.example.test")
            rcodes = [dns.query.receive_tcp(flood)[0].rcode() for _ in wires]
        finally:
            flood.close()
        # the flooding client held its share (10% of 50) and got REFUSED beyond it, at once
        assert rcodes.count(dns.rcode.REFUSED) >= 290, {dns.rcode.to_text(c): rcodes.count(c) for c in set(rcodes)}
        assert len({q.qname for q in stub.queries() if q.qname.startswith("slow.")}) <= 10
        # its timeouts at the first upstream, which answered the other client meanwhile, did not mark it down:
        # the next name still goes to the first upstream alone
        assert ask_from(s, "127.0.0.1", "late.example.test").rcode() == dns.rcode.NOERROR
        assert stub.queries("late.example.test") and not second.queries("late.example.test")
        assert all(not second.queries(f"y{i}.example.test") for i in range(20))


def test_a_networks_share_bounds_many_addresses_of_it(make_server, stub):
    s = make_server(upstream=(stub.address,), max_inflight=40, timeout=1.5, max_inflight_client_share=0.5,
                    max_inflight_network_share=0.25)
    socks = []
    try:
        for i in range(4):  # four addresses of one /24, each under its own share, together over the network's
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((f"127.0.0.{10 + i}", 0))
            sock.settimeout(10)
            for j in range(10):
                sock.sendto(dns.message.make_query(f"slow.n{i}-{j}.example.test", "A").to_wire(), (s.host, s.port))
            socks.append(sock)
        rcodes = [dns.message.from_wire(sock.recv(512)).rcode() for sock in socks for _ in range(10)]
    finally:
        for sock in socks:
            sock.close()
    assert rcodes.count(dns.rcode.SERVFAIL) == 10 and rcodes.count(dns.rcode.REFUSED) == 30, rcodes
    # another network is not held back by it
    r = ask_from(s, "127.0.1.1", "www.example.test")
    assert r.rcode() == dns.rcode.NOERROR


def test_an_upstream_that_answers_others_is_not_judged_down_by_one_clients_slow_names(make_server, stub):
    with StubResolver(misbehave=False) as second:
        s = make_server(upstream=(stub.address, second.address), timeout=1.0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
            flood.bind(("127.0.0.2", 0))
            flood.settimeout(10)
            for i in range(5):
                flood.sendto(dns.message.make_query(f"slow.h{i}.example.test", "A").to_wire(), (s.host, s.port))
            assert wait_for(lambda: len(stub.queries()) >= 5, timeout=10)
            assert ask_from(s, "127.0.0.1", "during.example.test").rcode() == dns.rcode.NOERROR
            for _ in range(5):  # answered by the second upstream once the first's share of the time is up
                assert dns.message.from_wire(flood.recv(512)).rcode() == dns.rcode.NOERROR
        assert len(second.queries()) == 5
        assert ask_from(s, "127.0.0.1", "after.example.test").rcode() == dns.rcode.NOERROR
        assert stub.queries("after.example.test") and not second.queries("after.example.test")
        assert s.server.forwarder.failures[s.server.forwarder.upstreams[0]] == 5  # still counted, for metrics


def test_on_a_quiet_network_one_clients_unanswered_name_does_not_mark_the_upstream_down(make_server, stub):
    """Nobody else asks anything: the only query the first upstream had timed out, for that one client's name
    alone (the stub never answers slow.*). A probe (`. NS`) gets an answer, so the upstream stays first for
    everyone; before, that one timeout sent the next client's names to the second upstream for 5 s."""
    with StubResolver(misbehave=False) as second:
        s = make_server(upstream=(stub.address, second.address), timeout=1.0)
        r = ask_from(s, "127.0.0.2", "slow.q1.example.test")
        assert r.rcode() == dns.rcode.NOERROR and second.queries("slow.q1.example.test")  # the second, in time
        assert wait_for(lambda: stub.queries(""), timeout=10)  # the probe, at the root
        forwarder = s.server.forwarder
        assert wait_for(lambda: not forwarder.probing(forwarder.upstreams[0]), timeout=10)  # answered
        assert not forwarder.is_down(forwarder.upstreams[0])
        for i in range(3):
            assert ask_from(s, "127.0.0.1", f"next{i}.example.test").rcode() == dns.rcode.NOERROR
            assert stub.queries(f"next{i}.example.test") and not second.queries(f"next{i}.example.test")


def test_a_silent_upstream_is_marked_down_when_its_probe_is_not_answered_either(make_server, stub):
    with StubResolver(silent=True) as dead:
        s = make_server(upstream=(dead.address, stub.address), timeout=1.0)
        assert ask_from(s, "127.0.0.1", "first.example.test").rcode() == dns.rcode.NOERROR
        assert dead.queries("first.example.test")
        forwarder = s.server.forwarder
        assert wait_for(lambda: forwarder.is_down(forwarder.upstreams[0]), timeout=10)
        assert dead.queries("")  # the probe went unanswered
        assert ask_from(s, "127.0.0.1", "later.example.test").rcode() == dns.rcode.NOERROR
        assert stub.queries("later.example.test") and not dead.queries("later.example.test")
