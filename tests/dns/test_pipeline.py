"""The real Pipeline against fakes: a forwarder that returns canned replies (or raises), a recording audit sink, a
clock moved by hand. Each branch of `begin`/`forward` gives one reply and records exactly one Outcome."""

from __future__ import annotations

import asyncio
import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from sinkhole.dns.answer import AnswerConfig
from sinkhole.dns.cache import Cache
from sinkhole.dns.guard import Admission, Guard
from sinkhole.dns.pipeline import Pending, Pipeline
from sinkhole.errors import UpstreamError
from sinkhole.model import Action, AuditEvent
from sinkhole.policy.decide import Policy
from tests.conftest import Clock

CLIENT = "192.0.2.10"


class Sink:
    """An audit sink that keeps every event."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.wanted = frozenset(Action)

    def submit(self, event: AuditEvent) -> None:
        self.events.append(event)


class Upstream:
    """A forwarder: answers every question with one A record (or CNAME to `cname`), or raises UpstreamError."""

    max_inflight = 100

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.fail = False
        self.cname: str | None = None
        self.addresses = 1

    async def forward(self, query, client_tcp: bool, wire: bytes) -> tuple[bytes, str]:
        self.asked.append(query.name)
        if self.fail:
            raise UpstreamError("nobody answered")
        r = dns.message.make_response(dns.message.from_wire(wire))
        if self.cname:
            r.answer.append(dns.rrset.from_text(query.name + ".", 300, "IN", "CNAME", self.cname + "."))
        else:
            r.answer.append(dns.rrset.from_text(query.name + ".", 300, "IN", "A",
                                                *(f"192.0.2.{i}" for i in range(1, self.addresses + 1))))
        return r.to_wire(), "127.0.0.1:53"


class CountingGuard(Guard):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.checks = 0

    def check(self, client: str, proto: str) -> Admission:
        self.checks += 1
        return super().check(client, proto)


def make(rate_limit: float = 0, allow: tuple[str, ...] = ("0.0.0.0/0",), serve_stale: float = 0):
    clock = Clock()
    policy = Policy([("blocked.test", "block", "ai")], version=3)
    guard = CountingGuard(allow, rate_limit=rate_limit, rate_limit_burst=1, net_rate_limit=0, exempt=(),
                          clock=clock)
    sink, up = Sink(), Upstream()
    p = Pipeline(lambda: policy, up, sink, AnswerConfig(), guard, Cache(prefetch=True, serve_stale=serve_stale),
                 clock=clock, wallclock=lambda: 1_700_000_000.0)
    return p, sink, up, guard, clock


def query(name: str, qtype: str = "A", qid: int = 7, edns: bool = True) -> bytes:
    q = dns.message.make_query(name, qtype, use_edns=0 if edns else None)
    q.id = qid
    return q.to_wire()


def run(p: Pipeline, wire: bytes, proto: str = "udp", client: str = CLIENT) -> bytes | None:
    return asyncio.run(p.handle(wire, client, proto))


def row(e: AuditEvent) -> tuple:
    return (e.client, e.transport, e.qname, e.qtype, e.action, e.rule, e.category, e.rcode, e.answer,
            e.policy_version, e.upstream is not None, e.group, e.wire is not None)


@pytest.mark.parametrize("wire,expect", [
    (query("blocked.test"), (CLIENT, "udp", "blocked.test", 1, "blocked", "blocked.test", "ai", 0, "0.0.0.0", 3,
                             False, "default", True)),
    (query("use-application-dns.net"), (CLIENT, "udp", "use-application-dns.net", 1, "canary",
                                        "use-application-dns.net", "bypass", 3, "NXDOMAIN", 3, False, "default",
                                        True)),
    (query("open.test", "AXFR"), (CLIENT, "udp", "open.test", 252, "refused", None, None, 5, "zone transfer", 3,
                                  False, "default", True)),
    (struct.pack("!6H", 9, 0x0100, 0, 0, 0, 0), (CLIENT, "udp", "", 0, "formerr", None, None, 1,
                                                 "QDCOUNT is 0, not 1", 0, False, "default", False)),
    (query("open.test"), (CLIENT, "udp", "open.test", 1, "forwarded", None, None, 0, None, 3, True, "default",
                          True)),
])
def test_each_branch_records_one_outcome_as_before(wire, expect):
    p, sink, _, guard, _ = make()
    reply = run(p, wire)
    assert reply is not None and reply[:2] == wire[:2]
    assert [row(e) for e in sink.events] == [expect]
    assert sum(p.counts.values()) == 1 and p.counts == {expect[4]: 1}
    assert guard.checks == 1


def test_dropped_packets_get_nothing_and_spend_no_check():
    p, sink, _, guard, _ = make()
    response = bytearray(query("open.test"))
    response[2] |= 0x80  # QR: a response
    for wire in (b"\0\1\2", bytes(response)):
        assert p.begin(wire, CLIENT, "udp") is None
    assert guard.checks == 0 and sink.events == [] and p.counts == {"dropped": 2}


def test_a_repeat_of_a_blocked_packet_is_replayed_and_recorded_again():
    p, sink, _, guard, _ = make()
    first = p.begin(query("blocked.test", qid=1), CLIENT, "udp")
    again = p.begin(query("blocked.test", qid=2), CLIENT, "udp")
    assert isinstance(first, bytes) and isinstance(again, bytes)
    assert again[:2] == b"\0\2" and again[2:] == first[2:]
    assert [row(e) for e in sink.events] == [row(sink.events[0])] * 2 and guard.checks == 2
    assert p.counts == {"blocked": 2}


def test_a_client_not_admitted_is_refused_before_the_policy_decides():
    p, sink, _, _, _ = make(allow=("198.51.100.0/24",))
    reply = p.begin(query("blocked.test"), CLIENT, "udp")
    assert dns.message.from_wire(reply).rcode() == dns.rcode.REFUSED
    assert [(e.action, e.rule, e.answer, e.policy_version) for e in sink.events] == [
        ("refused", None, "client not allowed or over the limit", 0)]
    bad = p.begin(struct.pack("!6H", 9, 0x0100, 0, 0, 0, 0), CLIENT, "udp")  # a bad query: REFUSED, not FORMERR
    assert bad[3] & 0xF == dns.rcode.REFUSED and sink.events[-1].action == "refused"


def test_over_the_rate_limit_over_udp_gets_tc():
    p, sink, _, _, _ = make(rate_limit=1)
    p.begin(query("blocked.test", qid=1), CLIENT, "udp")
    limited = dns.message.from_wire(p.begin(query("blocked.test", qid=2), CLIENT, "udp"))
    assert limited.flags & dns.flags.TC and not limited.answer
    assert [e.action for e in sink.events] == ["blocked", "limited"] and sink.events[1].answer == "TC=1"


def test_cache_hit_and_a_new_policy_snapshot_clears_the_cache():
    p, sink, up, _, _ = make()
    assert run(p, query("open.test", qid=1)) is not None
    hit = p.begin(query("open.test", qid=2), CLIENT, "udp")
    assert isinstance(hit, bytes) and hit[:2] == b"\0\2" and up.asked == ["open.test"]
    assert [e.action for e in sink.events] == ["forwarded", "cached"]
    policy = Policy([("blocked.test", "block", "ai")], version=4)
    p.get_policy = lambda: policy
    assert isinstance(p.begin(query("open.test", qid=3), CLIENT, "udp"), Pending)  # the cache went


def test_a_hit_in_the_last_tenth_of_the_ttl_refreshes_once():
    p, _, up, _, clock = make()

    async def go() -> None:
        await p.handle(query("open.test", qid=1), CLIENT, "udp")
        clock.now += 271  # TTL 300: the last tenth
        assert isinstance(p.begin(query("open.test", qid=2), CLIENT, "udp"), bytes)
        assert isinstance(p.begin(query("open.test", qid=3), CLIENT, "udp"), bytes)  # asks no second refresh
        await asyncio.gather(*p._background)

    asyncio.run(go())
    assert up.asked == ["open.test", "open.test"] and p.counts["prefetched"] == 1
    clock.now += 100  # past the first entry's expiry: the refreshed one answers
    assert isinstance(p.begin(query("open.test", qid=4), CLIENT, "udp"), bytes)


def test_an_answer_leading_to_a_blocked_name_is_sinkholed():
    p, sink, up, _, _ = make()
    up.cname = "x.blocked.test"
    reply = dns.message.from_wire(run(p, query("open.test")))
    assert [str(rr) for rrset in reply.answer for rr in rrset] == ["0.0.0.0"]
    assert [(e.action, e.rule, e.upstream) for e in sink.events] == [("cname-blocked", "cname:x.blocked.test",
                                                                      "127.0.0.1:53")]


def test_no_upstream_stale_then_servfail():
    p, sink, up, _, clock = make(serve_stale=600)
    run(p, query("open.test", qid=1))
    clock.now += 400  # expired, within serve-stale
    up.fail = True
    stale = dns.message.from_wire(run(p, query("open.test", qid=2)))
    assert stale.answer[0].ttl == 30
    failed = dns.message.from_wire(run(p, query("other.test", qid=3)))
    assert failed.rcode() == dns.rcode.SERVFAIL
    assert [e.action for e in sink.events] == ["forwarded", "stale", "servfail"]
    assert all(e.latency_ms is not None and e.policy_version == 3 for e in sink.events)


def test_udp_reply_larger_than_the_client_takes_is_truncated_and_tcp_gets_it_whole():
    p, sink, up, _, _ = make()
    up.addresses = 40  # 40 A records: more than 512 bytes
    udp = dns.message.from_wire(run(p, query("open.test", edns=False)))
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = dns.message.from_wire(run(p, query("open.test", edns=False), proto="tcp"))  # from the cache
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 40
    assert [e.action for e in sink.events] == ["forwarded", "cached"]
