"""Audit aggregation: identical answers within `audit_window` seconds of the first are one row with a count, and
completeness is "the sum of counts = the blocked answers"."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import dns.message
import dns.query
import pytest

from sinkhole.audit.writer import Aggregator, AuditLog, _Writer
from sinkhole.model import AuditEvent
from tests.audit.test_writer import client_socket
from tests.conftest import Clock, ask, audit_rows, wait_for


def event(t: float, qname: str = "chat.deepseek.com", client: str = "10.0.0.7", qtype: int = 1,
          transport: str = "udp", action: str = "blocked", answer: str = "0.0.0.0") -> AuditEvent:
    return AuditEvent(t, client, transport, qname, qtype, action, "deepseek.com", "deepseek", 0, answer, 3,
                      group="default")


class Emitted(list):
    def __call__(self, first: AuditEvent, count: int) -> None:
        self.append((first.qname, first.time, count))


# ---------------------------------------------------------------------------- the aggregator alone


def test_answers_within_the_window_of_the_first_are_one_row_dated_at_the_first():
    out = Emitted()
    agg = Aggregator(1.0, out)
    for t in (100.0, 100.3, 100.99):
        agg.add(event(t), now=5.0)
    assert out == [] and len(agg) == 1
    agg.add(event(101.0), now=5.5)  # a window after the first: the row closes, a new one opens
    assert out == [("chat.deepseek.com", 100.0, 3)]
    agg.close_all()
    assert out[1:] == [("chat.deepseek.com", 101.0, 1)] and len(agg) == 0


def test_a_row_closes_when_its_window_ends_on_the_writers_clock():
    out = Emitted()
    agg = Aggregator(1.0, out)
    agg.add(event(100.0, "a.deepseek.com"), now=10.0)
    agg.add(event(100.5, "b.deepseek.com"), now=10.5)
    agg.add(event(100.6, "a.deepseek.com"), now=10.6)
    agg.close_due(10.99)
    assert out == []
    agg.close_due(11.0)
    assert out == [("a.deepseek.com", 100.0, 2)]
    agg.close_due(11.5)
    assert out == [("a.deepseek.com", 100.0, 2), ("b.deepseek.com", 100.5, 1)]


def test_answers_that_differ_in_anything_but_time_are_rows_of_their_own():
    out = Emitted()
    agg = Aggregator(5.0, out)
    variants = [event(100.0), event(100.1, client="10.0.0.8"), event(100.2, qtype=28, answer="::"),
                event(100.3, transport="tcp"), event(100.4, qname="x.deepseek.com"), event(100.5, action="canary")]
    for e in variants:
        agg.add(e, now=1.0)
    agg.add(event(100.6), now=1.0)
    agg.close_all()
    assert sorted(c for *_, c in out) == [1, 1, 1, 1, 1, 2] and len(out) == len(variants)


def test_window_zero_and_block_page_views_are_a_row_each():
    out = Emitted()
    agg = Aggregator(0.0, out)
    agg.add(event(100.0), now=1.0)
    agg.add(event(100.0), now=1.0)
    assert [c for *_, c in out] == [1, 1] and len(agg) == 0
    out.clear()
    agg = Aggregator(1.0, out)
    for _ in range(2):
        agg.add(event(100.0, transport="https", action="page", answer="ref X; dns seq 1"), now=1.0)
    assert [c for *_, c in out] == [1, 1] and len(agg) == 0


def test_past_max_open_rows_the_oldest_is_closed_early():
    out = Emitted()
    agg = Aggregator(10.0, out, max_open=3)
    for i in range(5):
        agg.add(event(100.0 + i, f"n{i}.deepseek.com"), now=1.0)
    assert out == [("n0.deepseek.com", 100.0, 1), ("n1.deepseek.com", 101.0, 1)] and len(agg) == 3


def test_past_max_open_a_counted_event_keeps_its_own_count():
    """The row closed early keeps its count, and the new one opens with the count it came with (it took the
    closed row's: a load of many names over MAX_OPEN wrote 137,177 answers for 108,665 handed over)."""
    out = Emitted()
    agg = Aggregator(10.0, out, max_open=2)
    agg.add(event(100.0, "a.deepseek.com"), now=1.0, count=5)
    agg.add(event(100.1, "b.deepseek.com"), now=1.0, count=7)
    agg.add(event(100.2, "c.deepseek.com"), now=1.0, count=2)
    agg.close_all()
    assert sorted(out) == [("a.deepseek.com", 100.0, 5), ("b.deepseek.com", 100.1, 7), ("c.deepseek.com", 100.2, 2)]


@pytest.mark.parametrize("window", [float("nan"), -1.0, 30.5])
def test_a_window_out_of_range_is_refused(tmp_path, window):
    with pytest.raises(ValueError, match="audit window"):
        AuditLog(tmp_path / "a.db", "n1", window=window)


# ---------------------------------------------------------------------------- the writer thread


def test_the_writer_writes_a_row_once_its_window_ends_and_the_rest_at_close(db):
    clock = Clock(50.0)
    log = AuditLog(db, "n1", seed=None, window=1.0, clock=clock, flush_interval=0.02)
    log.start()
    try:
        for i in range(5):
            log.submit(event(1000.0 + i * 0.1, "a.deepseek.com"))
        log.submit(event(1000.0, "b.deepseek.com"))
        assert wait_for(lambda: log.pending == 2)  # two rows being counted
        assert audit_rows(db) == []
        clock.now += 1.0
        rows = wait_for(lambda: audit_rows(db))
        assert [(r["qname"], r["count"]) for r in rows] == [("a.deepseek.com", 5), ("b.deepseek.com", 1)]
        assert rows[0]["time"].startswith("1970-01-01T00:16:40.000")  # the first answer's time
        log.submit(event(1002.0, "a.deepseek.com"))
        log.submit(event(1002.5, "a.deepseek.com"))
        assert wait_for(lambda: log.pending == 1)
    finally:
        log.close()
    assert [(r["qname"], r["count"]) for r in audit_rows(db)][2:] == [("a.deepseek.com", 2)]
    assert log.written == 8 and log.rows_written == 3 and log.dropped == 0


def test_an_event_submitted_with_a_count_stands_for_that_many_answers(db):
    """What the fast path hands over (sinkhole.dns.shortcut): one event per client and answer with its count, added
    to the row being counted like as many events; with window 0 it is a row of that count."""
    out = Emitted()
    agg = Aggregator(1.0, out)
    agg.add(event(100.0), now=5.0, count=7)
    agg.add(event(100.5), now=5.5)
    agg.add(event(100.9), now=5.9, count=3)
    agg.close_all()
    assert out == [("chat.deepseek.com", 100.0, 11)]
    log = AuditLog(db, "n1", seed=None, window=0, flush_interval=0.02)
    log.start()
    try:
        log.submit(event(1000.0, "a.deepseek.com"), 40)
        log.submit(event(1000.1, "b.deepseek.com"))
    finally:
        log.close()
    assert [(r["qname"], r["count"]) for r in audit_rows(db)] == [("a.deepseek.com", 40), ("b.deepseek.com", 1)]
    assert log.written == 41 and log.rows_written == 2


def test_the_fast_paths_tally_rows_are_counted_events_and_an_undescribed_tag_is_counted_as_lost(db):
    """submit_tally (sinkhole.dns.shortcut's hand-over, also through a writer process): a tag described once
    stands for its answer in every later row; a row whose tag was never described (its description lost on the
    way) is not guessed at but counted as lost, and its gap row says so."""
    d = ("a.deepseek.com", 1, "blocked", "deepseek.com", "deepseek", 0, "0.0.0.0", 3, "default", "A.DeepSeek.com",
         "shipped.txt")
    wire = dns.message.make_query("A.DeepSeek.com", "A").to_wire()
    log = AuditLog(db, "n1", seed=None, window=0, flush_interval=0.02)
    log.start()
    try:
        log.submit_tally([(1, "10.0.0.7", "udp", 4, 1000.0, 1000.5)], [(1, d, wire)])
        log.submit_tally([(1, "10.0.0.8", "udp", 2, 1001.0, 1001.1), (2, "10.0.0.9", "udp", 3, 1001.0, 1001.2)], [])
    finally:
        log.close()
    rows = audit_rows(db)
    stored = [(r["client"], r["qname"], r["asked"], r["count"], r["list"]) for r in rows if r["action"] == "blocked"]
    assert stored == [("10.0.0.7", "a.deepseek.com", "A.DeepSeek.com", 4, "shipped.txt"),
                      ("10.0.0.8", "a.deepseek.com", "A.DeepSeek.com", 2, "shipped.txt")]
    assert [r["answer"][:12] for r in rows if r["action"] == "gap"] == ["lost 3 rows "]
    assert log.written == 6 and log.dropped == 3


def test_rows_being_counted_when_the_database_cannot_be_written_are_counted_as_lost_at_close(tmp_path):
    (tmp_path / "a-file").write_text("")
    log = AuditLog(tmp_path / "a-file" / "a.db", "n1", seed=None, window=10.0)  # its directory is a file
    log.final_retry = 0.2
    log.start()
    for i in range(7):
        log.submit(event(1000.0 + i * 0.1))
    log.close(timeout=2)
    assert log.written == 0 and log.write_dropped == 7


def test_answers_still_queued_when_the_writer_gives_up_are_counted_as_lost_with_their_counts(tmp_path):
    """give_up (closing, the database still unwritable) counts what is left in the queue: an event stands for one
    answer, a tallied one (event, count) for its count; before, the tallied ones went uncounted."""
    log = AuditLog(tmp_path / "a.db", "n1", seed=None, window=1.0)
    log.submit(event(1000.0))
    log.submit(event(1000.5), 5)
    writer = _Writer(log)
    writer.give_up("test")
    assert log.write_dropped == 6 and log.queue_depth == 0


@pytest.mark.parametrize("yields", [True, False])
def test_a_put_past_a_tenth_of_the_queue_yields_to_the_writer_unless_told_not_to(tmp_path, monkeypatch, yields):
    """The hot path's put yields the interpreter once (time.sleep(0)) past a tenth of the queue's bound, so that the
    writer thread catches up; a writer process's reading thread does not (AuditLog.without_yield). Either way the
    bound holds: past it, answers are dropped and counted."""
    slept = []
    monkeypatch.setattr("sinkhole.audit.writer.time.sleep", slept.append)
    log = AuditLog(tmp_path / "a.db", "n1", seed=None, queue_size=100)
    if not yields:
        log.without_yield()
    for i in range(110):
        log.submit(event(1000.0 + i))
    assert slept == ([0] * 90 if yields else [])
    assert log.queue_depth == 100 and log.queue_dropped == 10


# ---------------------------------------------------------------------------- the real server


def blocked_answers(server) -> int:
    return server.server.pipeline.counts.get("blocked", 0)


NAMES = ["chat.deepseek.com", "api.deepseek.com", "chatgpt.com"]


def ask_many(server, per_name: int) -> int:
    """Each name asked `per_name` times for A over UDP and for A over TCP, and once for AAAA over UDP: the number
    of queries sent (every one is answered and blocked)."""
    sent = 0
    for name in NAMES:
        for _ in range(per_name):
            assert ask(server, name).answer
            assert ask(server, name, tcp=True).answer
            sent += 2
        ask(server, name, "AAAA")
        sent += 1
    return sent


def test_the_sum_of_counts_is_the_number_of_blocked_answers_in_rows_per_name_type_and_transport(make_server, stub,
                                                                                                db):
    """A 30 s window holds every answer of the test: one row per (name, qtype, transport), exactly, written at
    stop; the sum of their counts is what was sent and what the server counted as blocked."""
    s = make_server(upstream=(stub.address,), audit_window=30.0)
    n = ask_many(s, per_name=20)
    assert wait_for(lambda: blocked_answers(s) == n, timeout=10)
    assert audit_rows(db) == []  # still being counted
    s.stop()
    rows = audit_rows(db)
    assert sum(r["count"] for r in rows) == n == blocked_answers(s)
    got = {(r["qname"], r["qtype"], r["transport"]): r["count"] for r in rows}
    assert got == {**{(q, "A", "udp"): 20 for q in NAMES}, **{(q, "A", "tcp"): 20 for q in NAMES},
                   **{(q, "AAAA", "udp"): 1 for q in NAMES}}
    assert len(rows) == 9
    assert s.server.audit.written == n and s.server.audit.rows_written == 9


def test_with_window_zero_every_blocked_answer_is_a_row(make_server, stub, db):
    s = make_server(upstream=(stub.address,), audit_window=0)
    n = ask_many(s, per_name=4)
    rows = wait_for(lambda: len(audit_rows(db)) >= n and audit_rows(db), timeout=10)
    assert len(rows) == n == blocked_answers(s)
    assert {r["count"] for r in rows} == {1}


def test_with_the_default_window_rows_are_written_while_it_runs_and_sum_up(make_server, stub, db):
    """The default window (1 s): rows come within about a second, without a stop, far fewer than the answers."""
    s = make_server(upstream=(stub.address,))
    assert s.server.audit.window == 1.0
    n = ask_many(s, per_name=10)
    assert wait_for(lambda: sum(r["count"] for r in audit_rows(db)) == n, timeout=15)
    assert len(audit_rows(db)) < n
    assert blocked_answers(s) == n


def test_sigterm_writes_the_rows_being_counted(server_process, stub, db):
    """A server process stopped while its rows are still being counted (30 s window) writes them all: each of its
    two workers' writers one row per name (each counts what its worker answered)."""
    p = server_process("--upstream", stub.address, "--audit-window", "30", "--workers", "2")
    sock = client_socket()
    sock.settimeout(5)
    n = 300
    try:
        for i in range(n):
            q = dns.message.make_query(NAMES[i % 3], "A")
            q.id = i
            sock.sendto(q.to_wire(), (p.host, p.port))
            sock.recvfrom(4096)
    finally:
        sock.close()
    assert p.terminate() == 0, "".join(p.lines)
    rows = audit_rows(db)
    per_name = {q: sum(r["count"] for r in rows if r["qname"] == q) for q in NAMES}
    assert per_name == {q: n // 3 for q in NAMES}
    # one row per name from each worker that answered it (the kernel may move the client to the other worker
    # while both start up), never more
    rows_per_name = collections.Counter(r["qname"] for r in rows)
    assert set(rows_per_name) == set(NAMES) and max(rows_per_name.values()) <= 2, rows_per_name
    assert any(f"blocked {n};" in line for line in p.lines), "".join(p.lines[-3:])
    out = subprocess.run([sys.executable, "-m", "sinkhole", "--db", str(db), "log", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    assert sorted((r["qname"], r["count"]) for r in map(json.loads, out.splitlines())) == sorted(
        (r["qname"], r["count"]) for r in rows)


def test_serve_refuses_a_bad_audit_window_in_one_line(db):
    for bad in ("-1", "abc", "nan", "31"):
        r = subprocess.run([sys.executable, "-m", "sinkhole", "--db", str(db), "serve", "--audit-window", bad],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (bad, r.stderr)
        assert "--audit-window" in r.stderr and "Traceback" not in r.stderr
    assert not db.exists()
