"""The hand-written decoder: exact parts for good queries, Drop/BadQuery for everything else."""

from __future__ import annotations

import functools
import ipaddress
import struct

import dns.edns
import dns.flags
import dns.message
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sinkhole.dns import codec
from sinkhole.errors import DecodeError, SinkholeError


def test_decode_keeps_question_bytes_and_normalizes_name():
    q = dns.message.make_query("Chat.DeepSeek.COM", "HTTPS", use_edns=0, payload=4096, want_dnssec=True)
    wire = q.to_wire()
    d = codec.decode_query(wire)
    assert d.id == q.id and d.qtype == 65 and d.qclass == 1
    assert d.labels == ("chat", "deepseek", "com") and d.qname == "chat.deepseek.com"
    assert d.question == wire[12:12 + len(d.question)] and b"Chat" in d.question
    assert d.edns is not None and d.edns.udp_size == 4096 and d.edns.do and d.edns.version == 0
    assert d.max_udp == 1232, "never more than we advertise, whatever the client's buffer"


def test_odd_bytes_are_escaped_in_presentation_form():
    wire = struct.pack("!HHHHHH", 1, 0x100, 1, 0, 0, 0) + b"\x03a b\x07example\x00\x00\x01\x00\x01"
    assert codec.decode_query(wire).qname == "a\\032b.example"


def test_small_edns_buffer_counts_as_512():
    q = dns.message.make_query("a.example", "A", use_edns=0, payload=100)
    assert codec.decode_query(q.to_wire()).max_udp == 512


def test_error_reply_echoes_question_and_opt():
    q = dns.message.make_query("a.example", "A", use_edns=0)
    d = codec.decode_query(q.to_wire())
    r = dns.message.from_wire(codec.error_reply(d.id, d.flags, codec.SERVFAIL, d.question, d.edns))
    assert r.id == q.id and r.rcode() == 2 and r.question == q.question and r.edns == 0


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_else(wire):
    try:
        q = codec.decode_query(wire)
    except (codec.Drop, codec.BadQuery):
        return
    assert 1 <= len(q.question) and q.wire == wire


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_mutated_real_queries_never_raise_anything_else(data):
    q = dns.message.make_query(data.draw(st.sampled_from(["chat.deepseek.com", "a.b.example", "x"])),
                               data.draw(st.sampled_from(["A", "AAAA", "HTTPS", "TXT"])),
                               use_edns=data.draw(st.sampled_from([False, 0])))
    wire = bytearray(q.to_wire())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    try:
        d = codec.decode_query(bytes(wire[:cut]))
    except (codec.Drop, codec.BadQuery) as exc:
        if isinstance(exc, codec.BadQuery):
            reply = codec.error_reply(exc.qid, exc.flags, exc.rcode, exc.question, exc.edns)
            assert reply[:2] == bytes(wire[:2]) and reply[2] & 0x80
        return
    assert all("." not in label.replace("\\046", "") for label in d.labels)


def test_codec_errors_share_the_one_root():
    """Drop, BadQuery and Malformed are DecodeErrors, and so SinkholeErrors, like every error raised on purpose."""
    for cls in (codec.Drop, codec.BadQuery, codec.Malformed):
        assert issubclass(cls, DecodeError) and issubclass(cls, SinkholeError)
    with pytest.raises(DecodeError):
        codec.decode_query(b"\x00\x01")


@pytest.mark.parametrize("qtype,name", [(1, "A"), (65, "HTTPS"), (64999, "TYPE64999")])
def test_qtype_names(qtype, name):
    assert codec.qtype_name(qtype) == name


# ---------------------------------------------------------------------------- upstream replies

QLEN = len(b"\x03www\x07example\x04test\x00") + 4  # the question of the replies below


def _reply(*answers: str, authority: tuple[str, ...] = (), additional: tuple[str, ...] = (), edns: bool = True,
           qname: str = "www.example.test", qtype: str = "A") -> bytes:
    q = dns.message.make_query(qname, qtype, use_edns=0 if edns else False)
    r = dns.message.make_response(q)
    for section, texts in ((r.answer, answers), (r.authority, authority), (r.additional, additional)):
        for text in texts:
            owner, ttl, rdtype, rdata = text.split(None, 3)
            section.append(dns.rrset.from_text(owner, int(ttl), "IN", rdtype, rdata))
    return r.to_wire()


def test_read_reply_reads_every_section_targets_and_addresses():
    wire = _reply("www.example.test. 300 CNAME x.Chat.DeepSeek.com.",
                  "x.chat.deepseek.com. 300 DNAME y.example.net.",
                  "x.chat.deepseek.com. 300 AAAA ::ffff:203.0.113.7",
                  "x.chat.deepseek.com. 300 HTTPS 1 svc.example.net. ipv4hint=192.0.2.1,192.0.2.2",
                  authority=("example.test. 300 NS ns.example.test.",),
                  additional=("ns.example.test. 300 A 192.0.2.53",))
    facts = codec.read_reply(wire, QLEN)
    assert [(r.section, r.owner, r.rtype) for r in facts.records] == [
        (0, "www.example.test", 5), (0, "x.chat.deepseek.com", 39), (0, "x.chat.deepseek.com", 28),
        (0, "x.chat.deepseek.com", 65), (1, "example.test", 2), (2, "ns.example.test", 1), (2, "", 41)]
    assert facts.targets == [("cname", "x.chat.deepseek.com"), ("dname", "y.example.net"),
                             ("https", "svc.example.net")]
    assert [str(ipaddress.ip_address(a)) for a in facts.addresses] == ["::ffff:cb00:7107", "192.0.2.1", "192.0.2.2"]
    assert facts.opt is facts.records[-1] and facts.end == len(wire)


@pytest.mark.parametrize("qname", ["www.example.test", "WWW.Example.TEST", "a\\255b.Example.test",
                                   "x\\032y.example.test"])
def test_read_reply_given_the_question_s_name_reads_the_same_records(qname):
    """The question's name handed in (as Query.name has it) reads every record as reading it off the wire does:
    owners that point to it, names that point into it (example.test), through the question in any case."""
    wire = _reply(f"{qname}. 300 CNAME x.{qname}.", f"x.{qname}. 300 A 192.0.2.1",
                  f"x.{qname}. 300 HTTPS 1 svc.example.test. ipv4hint=192.0.2.2",
                  authority=("example.test. 300 NS ns.example.test.",),
                  additional=(f"ns.{qname}. 300 AAAA 2001:db8::1",), qname=qname)
    query = codec.decode_query(dns.message.make_query(qname, "A").to_wire())
    facts = codec.read_reply(wire, len(query.question), query.name)
    assert facts == codec.read_reply(wire, len(query.question))
    assert facts.records[0].owner == query.name and facts.targets[0] == ("cname", "x." + query.name)


@pytest.mark.parametrize("mutate,reason", [
    (lambda w: w[:-3], "runs past the end"),
    (lambda w: w[:12 + QLEN] + b"\xc0\x30" + w[12 + QLEN + 2:], "does not point backwards"),
    (lambda w: w[:12 + QLEN] + b"\x80" + w[12 + QLEN + 1:], "extended label"),
])
def test_read_reply_refuses_what_no_client_could_read(mutate, reason):
    wire = _reply("www.example.test. 300 A 192.0.2.1", edns=False)
    assert codec.read_reply(wire, QLEN).addresses == [bytes([192, 0, 2, 1])]
    with pytest.raises(codec.Malformed, match=reason):
        codec.read_reply(mutate(wire), QLEN)


def test_a_compression_loop_ends():
    # the answer's owner points at itself through a chain that never goes back: refused, not followed forever
    head = struct.pack("!HHHHHH", 1, 0x8180, 1, 1, 0, 0)
    question = b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"
    looped = head + question + b"\x01a\xc0\x21" + struct.pack("!HHIH", 1, 1, 300, 4) + b"\xc0\x00\x02\x01"
    with pytest.raises(codec.Malformed):
        codec.read_reply(looped, len(question))


def test_names_are_measured_on_the_wire_through_pointers():
    # a 250-octet owner of binary labels (written \DDD, four characters an octet), then a record whose owner
    # points to it: both read; one more label in front of the pointer would make 257 octets: refused
    long = b"".join(bytes([62]) + bytes([0xFF]) * 62 for _ in range(4)) + b"\x01\x01\x00"  # 4*63 + 2 + 1 = 255
    head = struct.pack("!HHHHHH", 1, 0x8180, 1, 2, 0, 0)
    question = b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"
    first = long + struct.pack("!HHIH", 1, 1, 300, 4) + b"\xc0\x00\x02\x01"
    again = b"\xc0\x22" + struct.pack("!HHIH", 1, 1, 300, 4) + b"\xc0\x00\x02\x02"
    facts = codec.read_reply(head + question + first + again, len(question))
    assert facts.records[0].owner == facts.records[1].owner and len(facts.records[0].owner) > 255
    longer = b"\x01a\xc0\x22" + struct.pack("!HHIH", 1, 1, 300, 4) + b"\xc0\x00\x02\x02"
    with pytest.raises(codec.Malformed, match="longer than 255"):
        codec.read_reply(head + question + first + longer, len(question))


def test_relayed_replaces_the_upstream_opt_with_ours_and_keeps_the_rest_byte_for_byte():
    q = dns.message.make_query("www.example.test", "A", use_edns=0, want_dnssec=True)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("www.example.test.", 300, "IN", "A", "192.0.2.1"))
    r.use_edns(0, payload=4096, options=[dns.edns.GenericOption(dns.edns.NSID, b"upstream")])
    wire = r.to_wire()
    query = codec.decode_query(q.to_wire())
    out = codec.relayed(wire, codec.read_reply(wire, len(query.question)), query.edns)
    facts = codec.read_reply(wire, len(query.question))
    assert out[:facts.opt.start] == wire[:facts.opt.start]
    parsed = dns.message.from_wire(out)
    assert parsed.options == () and parsed.payload == codec.OUR_UDP_SIZE and parsed.ednsflags & dns.flags.DO
    no_edns = codec.relayed(wire, facts, None)
    assert dns.message.from_wire(no_edns).edns == -1 and no_edns == wire[:facts.opt.start][:10] + b"\x00\x00" \
        + wire[12:facts.opt.start]


def test_relayed_drops_records_of_the_names_given_but_not_denials():
    wire = _reply("www.example.test. 300 A 192.0.2.1", "chat.deepseek.com. 300 A 192.0.2.66",
                  authority=("deepseek.com. 300 NSEC z.example.test. A", "deepseek.com. 300 NS ns.deepseek.com."),
                  additional=("chat.deepseek.com. 300 AAAA 2001:db8::66",))
    facts = codec.read_reply(wire, QLEN)
    drop = {(r.section, r.owner) for r in facts.records if r.owner.endswith("deepseek.com")}
    out = dns.message.from_wire(codec.relayed(wire, facts, codec.decode_query(
        dns.message.make_query("www.example.test", "A", use_edns=0).to_wire()).edns, drop))
    assert [r.to_text() for r in out.answer] == ["www.example.test. 300 IN A 192.0.2.1"]
    assert [r.to_text() for r in out.authority] == ["deepseek.com. 300 IN NSEC z.example.test. A"]
    assert out.additional == [] and out.edns == 0 and out.options == ()


def test_upstream_query_carries_the_question_rd_cd_ad_and_our_own_opt():
    q = dns.message.make_query("WwW.example.test", "A", use_edns=0, payload=4096, want_dnssec=True,
                               options=[dns.edns.ECSOption("10.1.2.3", 32), dns.edns.GenericOption(10, b"c" * 8)])
    q.flags |= dns.flags.CD
    query = codec.decode_query(q.to_wire())
    assert query.edns.ecs == dns.edns.ECSOption("10.1.2.3", 32).to_wire()
    out = dns.message.from_wire(codec.upstream_query(query))
    assert out.question == q.question and b"WwW" in codec.upstream_query(query)
    assert out.flags & dns.flags.RD and out.flags & dns.flags.CD and out.flags & dns.flags.AD
    assert out.payload == codec.OUR_UDP_SIZE and out.ednsflags & dns.flags.DO and out.options == ()
    plain = codec.decode_query(dns.message.make_query("www.example.test", "A", use_edns=False).to_wire())
    assert dns.message.from_wire(codec.upstream_query(plain)).edns == -1


@pytest.mark.parametrize("asked,do,stored_ad,seen", [
    (False, False, True, False), (True, False, True, True), (False, True, True, True), (True, True, False, False)])
def test_for_client_sets_ad_only_when_asked_and_validated(asked, do, stored_ad, seen):
    q = dns.message.make_query("www.example.test", "A", use_edns=0, want_dnssec=do)
    if asked:
        q.flags |= dns.flags.AD
    query = codec.decode_query(q.to_wire())
    shared = bytearray(_reply("www.example.test. 300 A 192.0.2.1"))
    shared[3] = shared[3] | 0x20 if stored_ad else shared[3] & ~0x20
    out = codec.for_client(bytes(shared), len(query.question), query)
    assert bool(out[3] & 0x20) is seen and out[:2] == q.to_wire()[:2]


@pytest.mark.parametrize("data,good", [
    (struct.pack("!HBB", 1, 24, 0) + b"\x0a\x01\x02", True),
    (struct.pack("!HBB", 1, 0, 0), True),
    (struct.pack("!HBB", 1, 24, 0) + b"\x0a\x01\x02\x03", False),  # an octet more than /24 needs
    (struct.pack("!HBB", 1, 23, 0) + b"\x0a\x01\x03", False),  # a bit set beyond the prefix
    (struct.pack("!HBB", 1, 33, 0) + b"\x0a\x01\x02\x03\x04", False),
    (struct.pack("!HBB", 3, 8, 0) + b"\x0a", False),
    (struct.pack("!HBB", 2, 56, 8) + b"\x20\x01\x0d\xb8\x00\x00\x00", False),  # a scope in a query
])
def test_client_subnet_options_are_checked(data, good):
    q = dns.message.make_query("www.example.test", "A", use_edns=0,
                               options=[dns.edns.GenericOption(dns.edns.ECS, data)])
    if good:
        assert codec.decode_query(q.to_wire()).edns.ecs == data
    else:
        with pytest.raises(codec.BadQuery) as bad:
            codec.decode_query(q.to_wire())
        assert bad.value.rcode == codec.FORMERR


@functools.cache
def _mutable_replies() -> list[bytes]:
    return [_reply("www.example.test. 300 CNAME a.example.test.", "a.example.test. 300 A 192.0.2.1"),
            _reply("www.example.test. 300 HTTPS 1 . alpn=h2 ipv6hint=2001:db8::1", qtype="HTTPS"),
            _reply(authority=("example.test. 300 SOA ns.example.test. h.example.test. 1 2 3 4 5",
                              "example.test. 300 RRSIG SOA 13 2 300 20400101000000 20200101000000 1 example.test. "
                              "AAAA"))]


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_mutated_replies_are_read_or_refused_never_anything_else(data):
    wire = bytearray(data.draw(st.sampled_from(_mutable_replies())))
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(12 + QLEN, len(wire) - 1))] = data.draw(st.integers(0, 255))
    wire = bytes(wire[:data.draw(st.integers(12 + QLEN, len(wire)))])
    try:
        facts = codec.read_reply(wire, QLEN)
    except codec.Malformed:
        return
    try:
        codec.relayed(wire, facts, None, {(1, "example.test")})
    except codec.Malformed:
        pass


# ---------------------------------------------------------------------------- wire helpers (pinned to the bytes and
# values of the functions they replaced: cache.scan, upstream._matches, rpz._error, Cache.stale's OPT splice)


def _exchange(name: str, qtype: str, answers=(), authority=(), rcode: int = 0,
              edns: bool = True) -> tuple[bytes, bytes]:
    q = dns.message.make_query(name, qtype, use_edns=0 if edns else False)
    q.id = 4660
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    for a in answers:
        r.answer.append(dns.rrset.from_text(*a))
    for a in authority:
        r.authority.append(dns.rrset.from_text(*a))
    return q.to_wire(), r.to_wire()


ANSWER = _exchange("Chat.Example", "A", [("chat.example.", 300, "IN", "A", "192.0.2.1")])
NEGATIVE = _exchange("nx.example", "AAAA", rcode=3,
                     authority=[("example.", 900, "IN", "SOA", "ns.example. h.example. 1 2 3 4 120")])
PLAIN = _exchange("x.example", "TXT", [("x.example.", 60, "IN", "TXT", '"hi"')], edns=False)


@pytest.mark.parametrize("case,expected", [
    (ANSWER, ([36], [300], None, True, 46)),  # the A's TTL at 36; OPT last, at 46
    (NEGATIVE, ([34], [900], 120, False, 69)),  # negative TTL: the SOA's MINIMUM (120) under its TTL (900)
    (PLAIN, ([33], [60], None, True, -1)),  # no OPT
])
def test_scan_records_finds_ttls_negative_ttl_and_the_opt(case, expected):
    query, reply = case
    assert codec.scan_records(reply, len(codec.decode_query(query).question)) == expected
    with pytest.raises(codec.Malformed):
        codec.scan_records(reply[:-3], len(codec.decode_query(query).question))


def test_matches_wants_our_id_qr_and_the_question_in_any_case():
    query, reply = ANSWER
    question = codec.decode_query(query).question
    assert codec.matches(reply, 4660, question)
    assert codec.matches(reply[:12] + reply[12:].upper(), 4660, question)  # 0x20: case may differ
    assert not codec.matches(reply, 4661, question)  # another ID
    assert not codec.matches(query, 4660, question)  # QR not set
    assert not codec.matches(reply[:12 + len(question) - 4] + b"\x00\x1c\x00\x01", 4660, question)  # another type


def test_bare_error_is_a_header_only_and_never_answers_a_response():
    query, reply = ANSWER
    assert codec.bare_error(query, 9).hex() == "123481090000000000000000"  # QR, RD, NOTAUTH; no RA, no question
    assert codec.bare_error(reply, 1) == b""
    assert codec.bare_error(query[:11], 1) == b""


def test_frame_is_the_two_byte_length_then_the_message():
    assert codec.frame(b"abc") == b"\x00\x03abc"
    assert codec.frame_length(codec.frame(b"x" * 300)[:2]) == 300


@pytest.mark.parametrize("case,hexed", [
    (ANSWER, "1234810000010001000000010443686174074578616d706c650000010001c00c000100010000001e0004c000020100002904d000"
             "0000000028000f002400037374616c6520616e737765723a206e6f20757073747265616d20616e737765726564"),
    (PLAIN, "1234810000010001000000000178076578616d706c650000100001c00c001000010000001e0003026869"),
])
def test_a_stale_answer_has_ttl_30_and_our_opt_with_ede_3(case, hexed):
    """Cache.stale through codec.set_ttls and with_own_opt: every TTL 30 s; for an EDNS client the upstream's OPT
    replaced by ours with EDE 3 (Stale Answer); for one without EDNS no OPT at all."""
    from sinkhole.dns.cache import Cache, key_of

    query, reply = case
    q = codec.decode_query(query)
    cache = Cache(serve_stale=3600)
    cache.put(key_of(q), q, reply, 1000.0)
    assert cache.stale(key_of(q), q, 2000.0).hex() == hexed


def test_asked_name_keeps_the_case_the_client_wrote():
    query, _ = ANSWER
    assert codec.asked_name(query) == "Chat.Example"
    assert codec.asked_name(query, "chat.example") == "Chat.Example"  # capitals: read from the packet
    lower, _ = PLAIN
    assert codec.asked_name(lower, "x.example") == "x.example"  # none: the decoded name as it is
