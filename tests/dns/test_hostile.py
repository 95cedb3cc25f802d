"""sinkhole against a hostile upstream (tests/hostile.py) and hostile clients, over UDP and TCP.

Every record type dnspython knows is relayed byte for byte; records of blocked names are removed from every
section; EDNS is hop by hop (no client option goes upstream, no upstream option reaches a client); AD is
decided per client; every unexpected exception is a SERVFAIL for the client and for every client coalesced
with it, never silence; TSIG-signed queries get NOTAUTH/BADKEY; other opcodes NOTIMP without RA.
"""

from __future__ import annotations

import logging
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

from sinkhole.dns import codec
from sinkhole.dns.pipeline import Pipeline
from sinkhole.model import RuleKind
from sinkhole.policy.decide import Policy
from sinkhole.store.db import Store
from tests.conftest import RunningServer, audit_rows, wait_for
from tests.dnsstub import address_for
from tests.hostile import SAMPLES, HostileStub, data_types, sample

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


# ---------------------------------------------------------------------------- every type, byte for byte


@pytest.mark.parametrize("tcp", TRANSPORTS)
@pytest.mark.parametrize("rdtype", data_types(), ids=lambda t: t.name)
def test_every_record_type_is_relayed_byte_for_byte(server, hostile, rdtype, tcp):
    name = f"rr.{'tcp' if tcp else 'udp'}.example.test"
    q = dns.message.make_query(name, rdtype, use_edns=0)
    wire = ask_wire(server, q.to_wire(), tcp)
    reply = dns.message.from_wire(wire)
    assert reply.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(reply.rcode())
    assert len(reply.answer) == 1 and reply.answer[0][0] == sample(rdtype)
    sent = next(s for s in reversed(hostile.sent) if dns.message.from_wire(s).question == q.question)
    # the records exactly as the upstream wrote them; only the OPT (11 bytes, last, in both) is ours
    assert wire[4:12] == sent[4:12] and wire[12:-11] == sent[12:-11]
    assert wire[-11:-8] == sent[-11:-8] == b"\x00\x00\x29"


# ---------------------------------------------------------------------------- records of blocked names


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_records_of_blocked_names_are_removed_from_every_section(server, hostile, tcp):
    name = f"leak.{'tcp' if tcp else 'udp'}.example.test"
    for attempt in ("forwarded", "cached"):
        r = ask(server, name, tcp=tcp, use_edns=0)
        assert r.rcode() == dns.rcode.NOERROR, attempt
        assert records(r.answer) == [(f"{name}.", "A", [address_for(name)])], attempt
        assert records(r.authority) == [("deepseek.com.", "NSEC", ["f.example.test. A NS SOA RRSIG NSEC"]),
                                        ("example.test.", "NS", ["ns.example.test."])], attempt
        assert records(r.additional) == [("ns.example.test.", "A", ["192.0.2.53"])], attempt
    assert len(hostile.queries(name)) == 1, "the cleaned reply was cached"


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_an_allowed_name_under_a_blocked_zone_keeps_that_zone_s_records_above_it(server, hostile, tcp):
    name = f"leak.{'tcp' if tcp else 'udp'}.status.deepseek.com"  # allow status.deepseek.com beats deepseek.com
    r = ask(server, name, tcp=tcp, use_edns=0)
    assert records(r.answer) == [(f"{name}.", "A", [address_for(name)])]
    # deepseek.com's NS and its NSEC describe the zone the allowed name is in: kept; its hosts' records: not
    assert records(r.authority) == [("deepseek.com.", "NS", ["ns1.deepseek.com."]),
                                    ("deepseek.com.", "NSEC", ["f.example.test. A NS SOA RRSIG NSEC"]),
                                    ("example.test.", "NS", ["ns.example.test."])]
    assert records(r.additional) == [("ns.example.test.", "A", ["192.0.2.53"])]


# ---------------------------------------------------------------------------- EDNS hop by hop


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_edns_options_are_hop_by_hop_both_ways(server, hostile, tcp):
    name = f"opts.{'tcp' if tcp else 'udp'}.example.test"
    client_options = [dns.edns.ECSOption("10.20.30.40", 32), dns.edns.GenericOption(dns.edns.COOKIE, b"\x05" * 8),
                      dns.edns.GenericOption(dns.edns.NSID, b""), dns.edns.GenericOption(dns.edns.PADDING, b"\0" * 9),
                      dns.edns.GenericOption(65002, b"client-secret")]
    r = ask(server, name, tcp=tcp, use_edns=0, payload=4096, want_dnssec=True, options=client_options)
    sent = upstream_query(hostile, name)
    assert sent.edns == 0 and sent.payload == codec.OUR_UDP_SIZE and sent.ednsflags & dns.flags.DO
    assert sent.options == (), "no option of the client's goes upstream: not its subnet, cookie, NSID request"
    assert r.answer[0][0].to_text() == address_for(name)
    assert r.edns == 0 and r.payload == codec.OUR_UDP_SIZE and r.ednsflags & dns.flags.DO
    assert r.options == (), "the upstream's NSID, cookie, subnet, EDE, padding stay with the upstream"
    again = ask(server, name, tcp=tcp, use_edns=0, want_dnssec=True)  # a cache hit replays nothing either
    assert again.options == () and again.answer == r.answer


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_a_client_without_edns_is_asked_for_without_edns(server, hostile, tcp):
    name = f"opts.noedns.{'tcp' if tcp else 'udp'}.example.test"
    r = ask(server, name, tcp=tcp, use_edns=False)
    assert upstream_query(hostile, name).edns == -1
    assert r.edns == -1 and r.answer[0][0].to_text() == address_for(name)


# ---------------------------------------------------------------------------- AD, RFC 6840 §5.7


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_ad_is_set_only_for_clients_that_asked_with_ad_or_do(server, hostile, tcp):
    name = f"ad.{'tcp' if tcp else 'udp'}.example.test"
    plain = ask(server, name, tcp=tcp, use_edns=0)
    assert upstream_query(hostile, name).flags & dns.flags.AD, "we ask with AD: we understand it"
    assert not plain.flags & dns.flags.AD, "a client that did not ask gets no AD"
    with_ad = ask(server, name, tcp=tcp, use_edns=0, flags=dns.flags.RD | dns.flags.AD)
    assert with_ad.flags & dns.flags.AD, "the first asker does not decide for a later +adflag client"
    assert len(hostile.queries(name)) == 1, "the same cache entry: AD is not in the key"
    with_do = ask(server, name, tcp=tcp, use_edns=0, want_dnssec=True)
    assert with_do.flags & dns.flags.AD and with_do.ednsflags & dns.flags.DO
    assert not ask(server, name, tcp=tcp, use_edns=False).flags & dns.flags.AD


def test_coalesced_clients_each_get_their_own_ad(server, hostile):
    name = "ad.slowly.example.test"  # answered after 0.3 s: the three queries share one upstream query
    with_ad = dns.message.make_query(name, "A", use_edns=0, flags=dns.flags.RD | dns.flags.AD)
    plain = dns.message.make_query(name, "A", use_edns=0)
    replies = [dns.message.from_wire(r) for r in _concurrently(server, [with_ad.to_wire(), plain.to_wire(),
                                                                          with_ad.to_wire()])]
    assert [bool(r.flags & dns.flags.AD) for r in replies] == [True, False, True]
    assert len(hostile.queries(name)) == 1


def _concurrently(server: RunningServer, wires: list[bytes]) -> list[bytes]:
    """Send every packet from its own UDP socket at once; the replies in the same order."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in wires]
    try:
        for sock, wire in zip(socks, wires, strict=True):
            sock.settimeout(5)
            sock.sendto(wire, (server.host, server.port))
        return [sock.recv(65535) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


# ---------------------------------------------------------------------------- inspection


@pytest.mark.parametrize("tcp", TRANSPORTS)
@pytest.mark.parametrize("first,qtype,rule", [
    ("mapped", "AAAA", "ip:203.0.113.7 in 203.0.113.0/24"),
    ("nat64", "AAAA", "ip:203.0.113.8 in 203.0.113.0/24"),
    ("svcbhint", "SVCB", "ip:203.0.113.9 in 203.0.113.0/24"),
    ("svcbto", "SVCB", "svcb:chat.deepseek.com"),
    ("dname", "A", "dname:chat.deepseek.com"),
])
def test_answers_leading_to_blocked_names_or_networks_are_sinkholed(server, hostile, first, qtype, rule, tcp):
    name = f"{first}.{'tcp' if tcp else 'udp'}.example.test"
    r = ask(server, name, qtype, tcp=tcp, use_edns=0)
    assert r.rcode() == dns.rcode.NOERROR
    assert [rr.to_text() for rrset in r.answer for rr in rrset] == (["::"] if qtype == "AAAA" else
                                                                   ["0.0.0.0"] if qtype == "A" else [])
    assert wait_for(lambda: [row for row in audit_rows(server.db) if row["qname"] == name
                             and row["action"] in ("ip-blocked", "cname-blocked")], timeout=5)
    row = next(row for row in audit_rows(server.db) if row["qname"] == name)
    assert row["rule"] == rule


# ---------------------------------------------------------------------------- never silence


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_a_dname_answer_is_relayed(server, hostile, tcp):
    name = f"dnameok.{'tcp' if tcp else 'udp'}.example.test"
    r = ask(server, name, tcp=tcp, use_edns=0)
    assert records(r.answer) == [(f"{name}.", "DNAME", ["elsewhere.test."]),
                                 (f"www.{name}.", "CNAME", ["www.elsewhere.test."])]


def test_a_dname_answer_reaches_every_coalesced_client(server, hostile):
    name = "dnameok.slowly.example.test"
    wires = []
    for i in range(5):
        q = dns.message.make_query(name, "A", use_edns=0)
        q.id = 1000 + i
        wires.append(q.to_wire())
    replies = [dns.message.from_wire(w) for w in _concurrently(server, wires)]
    assert [r.id for r in replies] == [1000 + i for i in range(5)]
    assert all(records(r.answer)[0][1:] == ("DNAME", ["elsewhere.test."]) for r in replies)
    assert len(hostile.queries(name)) == 1


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_a_malformed_upstream_reply_is_servfail_not_relayed(server, hostile, tcp):
    r = ask(server, f"cut.{'tcp' if tcp else 'udp'}.example.test", tcp=tcp, use_edns=0)
    assert r.rcode() == dns.rcode.SERVFAIL and not r.answer


@pytest.fixture
def broken_inspection(server, monkeypatch):
    """Inspection of upstream replies raises, as a bug of ours would: on the server's own pipeline."""
    def boom(self, pending, reply):
        raise RuntimeError("a bug nobody foresaw")

    monkeypatch.setattr(Pipeline, "_inspect", boom)


def test_an_unexpected_exception_is_servfail_for_every_coalesced_client(server, hostile, broken_inspection,
                                                                        caplog):
    name = "boom.slowly.example.test"
    wires = []
    for i in range(4):
        q = dns.message.make_query(name, "A", use_edns=0)
        q.id = 2000 + i
        wires.append(q.to_wire())
    with caplog.at_level(logging.ERROR, logger="sinkhole.dns.pipeline"):
        replies = [dns.message.from_wire(w) for w in _concurrently(server, wires)]
    assert [(r.id, r.rcode()) for r in replies] == [(2000 + i, dns.rcode.SERVFAIL) for i in range(4)]
    assert len(hostile.queries(name)) == 1, "they were coalesced into one upstream query"
    lines = [r for r in caplog.records if r.msg.startswith("unexpected error answering a query")]
    assert lines and all(r.msg == lines[0].msg for r in lines), "one constant format: one kind for the log filter"
    assert "a bug nobody foresaw" in lines[0].getMessage()
    def servfails() -> list[dict]:
        return [r for r in audit_rows(server.db) if r["qname"] == name and r["action"] == "servfail"]

    # four answers: identical ones within the audit window are one row with a count
    assert wait_for(lambda: sum(r["count"] for r in servfails()) >= 4, timeout=10)
    rows = servfails()
    assert sum(r["count"] for r in rows) == 4 and {r["answer"] for r in rows} == {"internal error: RuntimeError"}


def test_an_unexpected_exception_over_tcp_is_servfail_and_the_connection_stays(server, hostile, broken_inspection):
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        for i in range(2):
            q = dns.message.make_query(f"boom{i}.tcp.example.test", "A", use_edns=0)
            dns.query.send_tcp(sock, q)
            r, _ = dns.query.receive_tcp(sock, expiration=None)
            assert r.id == q.id and r.rcode() == dns.rcode.SERVFAIL


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_an_exception_before_forwarding_is_servfail(server, hostile, monkeypatch, tcp):
    def boom(self, name, group=None):
        raise RuntimeError("policy bug")

    monkeypatch.setattr(Policy, "decide_name", boom)
    q = dns.message.make_query(f"early.{'tcp' if tcp else 'udp'}.example.test", "A", use_edns=0)
    r = dns.message.from_wire(ask_wire(server, q.to_wire(), tcp))
    assert r.id == q.id and r.rcode() == dns.rcode.SERVFAIL and r.question == q.question


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


# ---------------------------------------------------------------------------- Client Subnet forwarded, cut


@pytest.fixture(scope="module")
def ecs_server(hostile, tmp_path_factory):
    s = _server(tmp_path_factory.mktemp("ecs") / "sinkhole.db", hostile, ecs="24/56")
    yield s
    s.stop()


def _sent_ecs(stub: HostileStub, name: str) -> list[tuple[str, int]]:
    out = []
    for seen in stub.queries(name):
        options = [o for o in dns.message.from_wire(seen.wire).options if isinstance(o, dns.edns.ECSOption)]
        out.append((options[0].address, options[0].srclen) if options else ("", 0))
    return out


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_ecs_prefix_mode_sends_networks_never_addresses_and_caches_per_network(ecs_server, hostile, tcp):
    name = f"ecs.{'tcp' if tcp else 'udp'}.example.test"
    r = ask(ecs_server, name, tcp=tcp, use_edns=0)  # no option: the client's own address, cut to /24
    assert r.options == ()
    r = ask(ecs_server, name, tcp=tcp, use_edns=0, options=[dns.edns.ECSOption("10.20.30.40", 32)])
    echoed = [o for o in r.options if isinstance(o, dns.edns.ECSOption)]
    assert [(o.address, o.srclen, o.scopelen) for o in echoed] == [("10.20.30.40", 32, 24)]
    ask(ecs_server, name, tcp=tcp, use_edns=0, options=[dns.edns.ECSOption("10.20.30.99", 32)])  # same /24: cached
    ask(ecs_server, name, tcp=tcp, use_edns=0, options=[dns.edns.ECSOption("10.20.31.1", 32)])
    ask(ecs_server, name, tcp=tcp, use_edns=0, options=[dns.edns.ECSOption("0.0.0.0", 0)])  # "none, please"
    assert _sent_ecs(hostile, name) == [("127.0.0.0", 24), ("10.20.30.0", 24), ("10.20.31.0", 24), ("", 0)]


def test_ecs_strip_is_the_default(server, hostile):
    name = "ecs.strip.example.test"
    ask(server, name, use_edns=0, options=[dns.edns.ECSOption("10.20.30.40", 32)])
    assert _sent_ecs(hostile, name) == [("", 0)]


def test_a_malformed_client_subnet_option_is_formerr(server, hostile):
    bad = dns.edns.GenericOption(dns.edns.ECS, struct.pack("!HBB", 1, 24, 0) + b"\x0a\x14\x1e\x28")  # 4 octets for /24
    r = ask(server, "ecs.bad.example.test", use_edns=0, options=[bad])
    assert r.rcode() == dns.rcode.FORMERR and hostile.queries("ecs.bad.example.test") == []



@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_the_ds_of_a_blocked_apex_relays_its_proof_and_nothing_else_the_apex_owns(server, hostile, tcp):
    """DS deepseek.com is forwarded on purpose (the parent's proof that the blocked zone is unsigned); records
    the blocked apex owns below the cut (A, TXT, AAAA, an RRSIG over its A), put beside it by a hostile
    upstream, are not relayed; the DS, its RRSIG, the NSEC and the parent's SOA are."""
    for attempt in ("forwarded", "cached"):
        r = ask(server, "deepseek.com", "DS", tcp=tcp, use_edns=0, want_dnssec=True)
        assert r.rcode() == dns.rcode.NOERROR, attempt
        assert [(n, t) for n, t, _ in records(r.answer)] == [("deepseek.com.", "DS"), ("deepseek.com.", "RRSIG")]
        assert r.answer[1][0].type_covered == dns.rdatatype.DS
        assert records(r.authority) == [("com.", "SOA", [SAMPLES["SOA"]]),
                                        ("deepseek.com.", "NSEC", ["z.example.test. NS DS RRSIG NSEC"])], attempt
        assert records(r.additional) == [], attempt
