"""The fast path wired into the real server (sinkhole.dns.listener.FastUdp, sinkhole.dns.shortcut.Shortcuts): UDP
packets the pipeline answered before (blocked answers, cache hits) are answered again without Pipeline.begin, and
a client sees no difference: the same bytes but its ID, TTLs aged as the cache ages them, its rate limit and the
ACL as today, the policy in force, every answer counted once and in the audit log as a row or a count. Runs on the
compiled module when built, and on the pure twin with SINKHOLE_PURE=1 (.ci/run runs this file both ways)."""

from __future__ import annotations

import socket

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
from click.testing import CliRunner

from sinkhole.cli import cli
from sinkhole.dns import fast, shortcut
from sinkhole.service import metrics
from tests.conftest import Clock, ask, audit_rows, wait_for


def fast_answered(s) -> int:
    """UDP answers the fast path gave, on every listener of the server."""
    return sum(x.udp_fast.fast.answered for x in s.server.listeners if x.udp_fast is not None)


def raw(s, wire: bytes) -> bytes:
    """One UDP packet sent as it is, its reply as it comes."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(wire, (s.host, s.port))
        return sock.recv(65535)


def query(qname: str, qtype: str = "A", qid: int = 1) -> bytes:
    q = dns.message.make_query(qname, qtype, use_edns=0)
    q.id = qid
    return q.to_wire()


def test_the_server_runs_the_fast_path_the_build_has(server):
    assert server.server.listeners[0].udp_fast is not None
    assert server.server.pipeline.shortcuts is not None
    assert type(server.server.listeners[0].udp_fast.fast).__module__ == (
        "sinkhole.dns._fast" if fast.COMPILED else "sinkhole.dns._fastpure")


def test_a_blocked_name_asked_again_is_answered_the_fast_way_byte_for_byte(server, db):
    """The first from the Blocker (a name the table had not seen), the rest from the table: the same reply but
    the ID, counted and audited as eleven blocked answers."""
    first = raw(server, query("chat.deepseek.com", qid=1))
    assert fast_answered(server) == 1
    again = [raw(server, query("chat.deepseek.com", qid=i)) for i in range(2, 12)]
    assert fast_answered(server) == 11
    for i, reply in enumerate(again, start=2):
        assert reply[:2] == i.to_bytes(2, "big") and reply[2:] == first[2:]
    assert dns.message.from_wire(first).answer[0][0].address == "0.0.0.0"
    pipeline = server.server.pipeline
    assert pipeline.counts["blocked"] == 11
    assert pipeline.detail[("blocked", 1, "udp", "default")] == 11
    assert ["blocked", 1, "udp", "default", 11] in metrics.snapshot(server.server)["queries"]  # what /metrics shows
    rows = wait_for(lambda: sum(r["count"] for r in audit_rows(db)) == 11 and audit_rows(db), timeout=15)
    assert {(r["qname"], r["transport"], r["client"], r["asked"]) for r in rows} == {
        ("chat.deepseek.com", "udp", "127.0.0.1", "chat.deepseek.com")}


def test_a_new_blocked_name_is_answered_by_the_blocker_as_the_pipeline_would(server, db):
    """A name the tables have not seen, under a blocked suffix: the Blocker's answer (no Pipeline.begin) is the
    answer the pipeline gives over TCP, and it is audited with the name as the client wrote it."""
    before = server.server.pipeline.counts.get("blocked", 0)
    reply = dns.message.from_wire(raw(server, query("Never.Seen.Chat.DeepSeek.com", qid=7)))
    assert fast_answered(server) == 1
    slow = ask(server, "never.seen.chat.deepseek.com", tcp=True)
    assert reply.answer[0].to_text().lower() == slow.answer[0].to_text().lower()
    assert server.server.pipeline.counts["blocked"] == before + 2
    rows = wait_for(lambda: len(audit_rows(db)) == 2 and audit_rows(db), timeout=15)
    # in the order of the answers: the pipeline hands the fast path's tally over before its own row
    assert [(r["transport"], r["asked"]) for r in rows] == [
        ("udp", "Never.Seen.Chat.DeepSeek.com"), ("tcp", "never.seen.chat.deepseek.com")]
    same = ("qname", "qtype", "action", "rule", "category", "rcode", "answer", "policy_version", "grp", "list")
    udp, tcp = ({k: r[k] for k in same} for r in rows)
    assert udp == tcp
    assert rows[0]["qname"] == "never.seen.chat.deepseek.com" and rows[0]["action"] == "blocked"


def test_a_cache_hit_is_answered_the_fast_way_with_its_ttl_aged_until_it_expires(server, stub):
    clock = server.server.pipeline.clock = Clock()
    first = ask(server, "aged.example.org")
    assert first.answer and len(stub.queries("aged.example.org")) == 1
    ttl = first.answer[0].ttl
    ask(server, "aged.example.org")  # a hit through the pipeline: learnt
    clock.now += 5
    hits = server.server.pipeline.cache.hits
    later = ask(server, "aged.example.org")
    assert fast_answered(server) == 1
    # the cache's hit counter is moved after the batch is sent (FastUdp._readable): the reply may come first
    assert wait_for(lambda: server.server.pipeline.cache.hits == hits + 1)
    assert later.answer[0].ttl == ttl - 5 and later.answer[0][0] == first.answer[0][0]
    clock.now += ttl  # expired: the fast path lets it go, the upstream is asked again
    ask(server, "aged.example.org")
    assert len(stub.queries("aged.example.org")) == 2 and fast_answered(server) == 1


def test_a_client_over_its_rate_limit_gets_tc_from_the_fast_path_too(make_server, stub):
    s = make_server(upstream=(stub.address,), rate_limit=5, rate_limit_burst=5, rate_limit_net=0,
                    rate_limit_exempt=())
    s.server.pipeline.guard.clock = Clock()  # no token comes back during the test
    replies = [dns.message.from_wire(raw(s, query("chat.deepseek.com", qid=i))) for i in range(8)]
    assert [bool(r.flags & dns.flags.TC) for r in replies] == [False] * 5 + [True] * 3
    assert fast_answered(s) == 5  # the three over the limit went the slow way, which answers them as today
    assert s.server.pipeline.guard.limited == 3
    assert s.server.pipeline.counts.get("blocked") == 5


def test_a_client_outside_allow_clients_is_refused_whatever_the_tables_hold(make_server, stub):
    s = make_server(upstream=(stub.address,), allow_clients=("10.0.0.0/8",))
    reply = dns.message.from_wire(raw(s, query("chat.deepseek.com")))
    assert reply.rcode() == dns.rcode.REFUSED and not reply.answer
    reply = dns.message.from_wire(raw(s, query("chat.deepseek.com", qid=2)))
    assert reply.rcode() == dns.rcode.REFUSED and fast_answered(s) == 0


def test_a_name_unblocked_is_no_longer_answered_from_the_table(server, stub, db):
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", str(db), "block", "add", "fastpath.example.org"]).exit_code == 0
    blocked = wait_for(lambda: (r := ask(server, "fastpath.example.org")).answer
                       and r.answer[0][0].address == "0.0.0.0", timeout=5)
    assert blocked
    ask(server, "fastpath.example.org")
    assert fast_answered(server) >= 1
    assert runner.invoke(cli, ["--db", str(db), "block", "remove", "fastpath.example.org"]).exit_code == 0
    assert wait_for(lambda: ask(server, "fastpath.example.org").answer[0][0].address != "0.0.0.0", timeout=5)
    assert len(stub.queries("fastpath.example.org")) >= 1


def test_the_fast_paths_answers_are_in_the_audit_log_at_stop(make_server, stub, db):
    s = make_server(upstream=(stub.address,), audit_window=30.0)
    for i in range(50):
        raw(s, query("chatgpt.com", "AAAA", qid=i))
    assert fast_answered(s) == 50  # the first by the Blocker
    s.stop()
    rows = audit_rows(db)
    assert [(r["qname"], r["qtype"], r["count"]) for r in rows] == [("chatgpt.com", "AAAA", 50)]
    assert s.server.audit.written == 50 == s.server.pipeline.counts["blocked"]
    assert dns.rdatatype.AAAA == 28


def test_past_max_tags_the_tags_start_again_from_0_and_every_answer_keeps_its_row(make_server, stub, db, monkeypatch):
    """The audit log keeps what each tag stands for (AuditLog.submit_tally); past MAX_TAGS tags the fast path starts
    afresh, numbering from 0 again, so that table stays bounded, and a reused number stands for its new answer."""
    monkeypatch.setattr(shortcut, "MAX_TAGS", 5)
    s = make_server(upstream=(stub.address,), audit_window=0)
    names = [f"n{i}.chatgpt.com" for i in range(12)]
    for i, name in enumerate(names):
        raw(s, query(name, "A", qid=i))
    assert s.server.pipeline.shortcuts.tags.next < 5  # started again (a tag a name here)
    s.stop()
    assert sorted(r["qname"] for r in audit_rows(db) if r["action"] == "blocked") == sorted(names)
