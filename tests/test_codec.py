"""The hand-written decoder: exact parts for good queries, Drop/BadQuery for everything else."""

from __future__ import annotations

import struct

import dns.message
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sinkhole import codec


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


@pytest.mark.parametrize("qtype,name", [(1, "A"), (65, "HTTPS"), (64999, "TYPE64999")])
def test_qtype_names(qtype, name):
    assert codec.qtype_name(qtype) == name
