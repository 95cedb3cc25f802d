"""The reply cache over real sockets: hits without the upstream, aged TTLs, negative caching, coalescing."""

from __future__ import annotations

import concurrent.futures
import gc
import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rrset
import pytest

from sinkhole.dns import codec
from sinkhole.dns.cache import Cache, key_of
from tests.conftest import Clock, ask, audit_rows, ede_of, wait_for
from tests.dnsstub import address_for


def test_second_query_is_a_hit_with_client_id_and_case(server, stub):
    first = ask(server, "www.example.test")
    q = dns.message.make_query("WWW.Example.TEST", "A", use_edns=0)
    r = dns.query.udp(q, server.host, port=server.port, timeout=5)
    assert r.id == q.id and r.question[0].name.to_text() == "WWW.Example.TEST."
    assert r.answer[0][0].to_text() == first.answer[0][0].to_text() == address_for("www.example.test")
    assert len(stub.queries("www.example.test")) == 1
    assert server.server.pipeline.counts.get("cached") == 1


def test_hit_over_tcp_and_keys_separate_types_and_edns(server, stub):
    ask(server, "www.example.test", "A")
    ask(server, "www.example.test", "A", tcp=True)
    assert len(stub.queries("www.example.test")) == 1
    ask(server, "www.example.test", "AAAA")
    ask(server, "www.example.test", "A", edns=False)  # a reply with OPT must not go to a client without EDNS
    r = ask(server, "www.example.test", "A", edns=False)
    assert r.edns == -1
    assert len(stub.queries("www.example.test")) == 3


def test_ttl_decreases_while_cached(server, stub):
    clock = server.server.pipeline.clock = Clock()  # the seconds the cache ages by, moved by hand
    assert ask(server, "ttl.example.test").answer[0].ttl == 300
    clock.now += 1.1
    assert ask(server, "ttl.example.test").answer[0].ttl == 299
    clock.now += 150
    assert ask(server, "ttl.example.test").answer[0].ttl == 149
    assert len(stub.queries("ttl.example.test")) == 1


def test_negative_answer_cached_for_soa_minimum(server, stub):
    for _ in range(3):
        r = ask(server, "nx.example.test")
        assert r.rcode() == dns.rcode.NXDOMAIN and r.authority
    assert len(stub.queries("nx.example.test")) == 1


def test_servfail_is_not_cached(make_server):
    from tests.dnsstub import StubResolver

    with StubResolver(silent=True) as dead:
        s = make_server(upstream=(dead.address,), timeout=0.5)
        assert ask(s, "www.example.test").rcode() == dns.rcode.SERVFAIL
        assert ask(s, "www.example.test").rcode() == dns.rcode.SERVFAIL
        assert len(dead.queries("www.example.test")) == 2  # (and a probe at the root, after the first timeout)


def test_identical_queries_in_flight_are_coalesced(server, stub):
    def one(i: int) -> dns.message.Message:
        q = dns.message.make_query("delay.example.test", "A")
        return dns.query.udp(q, server.host, port=server.port, timeout=5)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(8)))
    assert all(r.answer[0][0].to_text() == address_for("delay.example.test") for r in replies)
    assert len(stub.queries("delay.example.test")) == 1


def test_cache_disabled(make_server, stub):
    s = make_server(upstream=(stub.address,), cache_size=0)
    ask(s, "www.example.test")
    ask(s, "www.example.test")
    assert len(stub.queries("www.example.test")) == 2


# ---------------------------------------------------------------------------- unit


def reply_for(name: str, ttl: int = 60, rcode: int = 0, soa: tuple[int, int] | None = None,
              tc: bool = False) -> tuple[codec.Query, bytes]:
    q = dns.message.make_query(name, "A")
    query = codec.decode_query(q.to_wire())
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if rcode == 0 and soa is None:
        r.answer.append(dns.rrset.from_text(name + ".", ttl, "IN", "A", "192.0.2.1"))
    if soa is not None:
        r.authority.append(dns.rrset.from_text("example.test.", soa[0], "IN", "SOA",
                                               f"ns.example.test. host.example.test. 1 2 3 4 {soa[1]}"))
    if tc:
        r.flags |= dns.flags.TC
    return query, r.to_wire()


def test_lru_eviction_and_clamps():
    c = Cache(max_entries=2, max_ttl=100)
    now = 1000.0
    for name in ("a.example.test", "b.example.test", "c.example.test"):
        query, wire = reply_for(name, ttl=5000)
        c.put(key_of(query), query, wire, now)
    assert len(c) == 2
    qa, _ = reply_for("a.example.test")
    assert c.lookup(key_of(qa), qa, now) is None  # evicted, least recently used
    qc, _ = reply_for("c.example.test")
    assert c.lookup(key_of(qc), qc, now + 99) is not None
    assert c.lookup(key_of(qc), qc, now + 100) is None  # clamped to max_ttl


def test_entries_are_left_alone_by_the_garbage_collector():
    """A full cache is most of a worker's long-lived heap: plain tuples, which the collector stops tracking (and
    walking) once it has seen them, even after a prefetch marked one (a new tuple)."""
    c = Cache(prefetch=True)
    keys = []
    for name in ("a.example.test", "b.example.test"):
        query, wire = reply_for(name, ttl=100)
        c.put(key_of(query), query, wire, 0.0)
        keys.append((key_of(query), query))
    key, query = keys[0]
    assert c.lookup(key, query, 95.0)[1] is True  # due: marked, not refreshed again
    assert c.lookup(key, query, 96.0)[1] is False
    gc.collect()
    gc.collect()  # a tuple holding tuples is untracked at the collection after its members were
    for key, _ in keys:
        entry = c.entry(key)
        assert type(entry) is tuple and not gc.is_tracked(entry), entry


@pytest.mark.parametrize("kwargs,cached", [
    ({"rcode": 2}, False), ({"tc": True}, False), ({"rcode": 3}, False),
    ({"rcode": 3, "soa": (300, 30)}, True), ({"rcode": 0, "soa": (10, 600)}, True), ({"ttl": 0}, False),
])
def test_what_is_cached(kwargs, cached):
    c = Cache()
    query, wire = reply_for("x.example.test", **kwargs)
    c.put(key_of(query), query, wire, 0.0)
    assert (len(c) == 1) is cached


def test_negative_ttl_is_min_of_soa_ttl_and_minimum():
    c = Cache()
    query, wire = reply_for("x.example.test", rcode=3, soa=(300, 30))
    c.put(key_of(query), query, wire, 0.0)
    assert c.lookup(key_of(query), query, 29.0) is not None
    assert c.lookup(key_of(query), query, 30.0) is None


def test_aged_ttls_never_touch_opt():
    q = dns.message.make_query("x.example.test", "A", use_edns=0, want_dnssec=True)
    query = codec.decode_query(q.to_wire())
    r = dns.message.make_response(q)
    r.use_edns(0, ednsflags=dns.flags.DO, payload=1232)
    r.answer.append(dns.rrset.from_text("x.example.test.", 60, "IN", "A", "192.0.2.1"))
    wire = r.to_wire()
    c = Cache()
    c.put(key_of(query), query, wire, 0.0)
    out = dns.message.from_wire(c.lookup(key_of(query), query, 10.5)[0])
    assert out.answer[0].ttl == 50 and out.edns == 0 and out.flags & dns.flags.QR
    assert out.ednsflags & dns.flags.DO
    assert struct.unpack("!H", c.lookup(key_of(query), query, 11.0)[0][:2])[0] == q.id


def test_names_differing_only_in_case_share_a_key():
    q1 = codec.decode_query(dns.message.make_query("A.Example.TEST", "A").to_wire())
    q2 = codec.decode_query(dns.message.make_query("a.example.test", "A").to_wire())
    assert key_of(q1) == key_of(q2)
    assert dns.name.from_text("a.example.test")  # keep the import used


def test_prefetch_refreshes_a_popular_name_before_it_expires(make_server, stub):
    s = make_server(upstream=(stub.address,), cache_max_ttl=2, cache_prefetch=True)
    clock = s.server.pipeline.clock = Clock()
    s.server.pipeline.cache.prefetch_fraction = 0.5  # refresh in the second half of the 2 s TTL
    assert ask(s, "popular.example.test").answer
    assert len(stub.queries("popular.example.test")) == 1
    assert ask(s, "popular.example.test").answer  # early hit: no refresh
    clock.now += 1.2
    s.server.pipeline.cache.prefetch_fraction = 0.01  # the refreshed entry is not due again within this test
    assert ask(s, "popular.example.test").answer  # a hit in the last half: served, and refreshed behind it
    # the refresh is counted once its reply is in the cache (the stub seeing its query is before that)
    assert wait_for(lambda: s.server.pipeline.counts.get("prefetched"), timeout=10)
    assert len(stub.queries("popular.example.test")) == 2
    clock.now += 1.0  # past the first entry's expiry: the refreshed entry answers
    assert ask(s, "popular.example.test").answer
    assert len(stub.queries("popular.example.test")) == 2
    counts = s.server.pipeline.counts
    assert counts["prefetched"] == 1 and counts["cached"] == 3 and counts["forwarded"] == 1


def test_without_prefetch_an_expired_entry_is_fetched_again(make_server, stub):
    s = make_server(upstream=(stub.address,), cache_max_ttl=1)
    clock = s.server.pipeline.clock = Clock()
    assert ask(s, "plain.example.test").answer
    clock.now += 0.7
    assert ask(s, "plain.example.test").answer
    clock.now += 0.5
    assert ask(s, "plain.example.test").answer
    assert len(stub.queries("plain.example.test")) == 2
    assert "prefetched" not in s.server.pipeline.counts


# ---------------------------------------------------------------------------- serve-stale (RFC 8767)


def test_stale_entry_answers_only_within_its_window_with_ttl_30_and_ede_3():
    q = dns.message.make_query("s.example.test", "A", use_edns=0)
    query = codec.decode_query(q.to_wire())
    r = dns.message.make_response(q)
    r.use_edns(0, payload=1232)
    r.answer.append(dns.rrset.from_text("s.example.test.", 60, "IN", "A", "192.0.2.7"))
    c = Cache(serve_stale=100)
    key = key_of(query)
    c.put(key, query, r.to_wire(), 0.0)
    assert c.lookup(key, query, 61.0) is None  # expired: a miss, so the upstream is asked first
    out = dns.message.from_wire(c.stale(key, query, 61.0))
    assert out.answer[0].ttl == 30 and out.answer[0][0].address == "192.0.2.7" and out.id == q.id
    assert [(o.code, o.text) for o in out.options if isinstance(o, dns.edns.EDEOption)] == [
        (3, "stale answer: no upstream answered")]
    assert len(out.additional) == 0 and out.edns == 0  # one OPT: ours replaced the upstream's
    assert c.stale(key, query, 160.0) is None  # past expiry + 100 s
    assert c.lookup(key, query, 160.0) is None and len(c) == 0  # and gone
    assert c.stale_served == 1


def test_stale_answer_to_a_client_without_edns_has_no_opt():
    query, wire = reply_for("plain.example.test", ttl=5)
    c = Cache(serve_stale=10)
    c.put(key_of(query), query, wire, 0.0)
    out = dns.message.from_wire(c.stale(key_of(query), query, 7.0))
    assert out.edns == -1 and out.answer[0].ttl == 30


def test_without_serve_stale_an_expired_entry_is_dropped():
    query, wire = reply_for("gone.example.test", ttl=5)
    c = Cache()
    c.put(key_of(query), query, wire, 0.0)
    assert c.lookup(key_of(query), query, 5.0) is None and len(c) == 0
    assert c.stale(key_of(query), query, 5.0) is None
    c.put(key_of(query), query, wire, 10.0)
    assert c.stale(key_of(query), query, 11.0) is None, "off: an upstream failure is a SERVFAIL, cache or not"


def test_serve_stale_keeps_a_name_resolving_while_the_upstream_is_down(make_server, stub, db):
    s = make_server(upstream=(stub.address,), cache_max_ttl=1, cache_serve_stale=60, timeout=0.5,
                    log_queries="all")
    clock = s.server.pipeline.clock = Clock()
    first = ask(s, "kept.example.test")
    assert first.answer[0][0].to_text() == address_for("kept.example.test")
    clock.now += 1.1  # expired
    stub.silent = True
    r = ask(s, "kept.example.test")
    assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].to_text() == address_for("kept.example.test")
    assert r.answer[0].ttl == 30 and ede_of(r) == [(3, "stale answer: no upstream answered")]
    assert ask(s, "kept.example.test", tcp=True).answer[0].ttl == 30
    assert ask(s, "never.example.test").rcode() == dns.rcode.SERVFAIL  # nothing to fall back on
    assert len(stub.queries("kept.example.test")) == 3, "the upstream is asked first every time"
    stub.silent = False
    fresh = ask(s, "kept.example.test")
    assert fresh.answer[0].ttl == first.answer[0].ttl != 30 and not ede_of(fresh)  # the upstream's answer again
    s.stop()
    actions = [(row["qname"], row["transport"], row["action"]) for row in audit_rows(db)
               if row["qname"] in ("kept.example.test", "never.example.test")]
    assert actions == [("kept.example.test", "udp", "forwarded"), ("kept.example.test", "udp", "stale"),
                       ("kept.example.test", "tcp", "stale"), ("never.example.test", "udp", "servfail"),
                       ("kept.example.test", "udp", "forwarded")]


def test_without_serve_stale_an_outage_gives_servfail_for_expired_names(make_server, stub):
    s = make_server(upstream=(stub.address,), cache_max_ttl=1, timeout=0.5)
    clock = s.server.pipeline.clock = Clock()
    assert ask(s, "lost.example.test").answer
    clock.now += 1.1
    stub.silent = True
    assert ask(s, "lost.example.test").rcode() == dns.rcode.SERVFAIL


def test_the_cache_key_holds_cd_do_edns_and_rd_and_not_the_case_or_id():
    """CD decides whether the upstream validated (a bogus RRset is SERVFAIL without CD and data with it), DO
    whether signatures come along: an answer to one must never be served to the other."""

    def key(name: str = "www.example.test", *, cd: bool = False, do: bool = False, edns: bool = True,
            rd: bool = True, qid: int = 1) -> bytes:
        q = dns.message.make_query(name, "A", use_edns=0 if edns else False, want_dnssec=do, id=qid)
        q.flags = (dns.flags.RD if rd else 0) | (dns.flags.CD if cd else 0)
        return key_of(codec.decode_query(q.to_wire()))

    plain = key()
    variants = [key(cd=True), key(do=True), key(cd=True, do=True), key(edns=False), key(rd=False)]
    assert len({plain, *variants}) == 1 + len(variants)
    assert key("WWW.Example.TEST", qid=7) == plain
