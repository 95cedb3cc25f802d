"""The audit writer in a process of its own (audit_writer = process, and `auto` in a server with workers): every
blocked answer, over UDP (the fast path's tallies) and TCP (the pipeline's events), reaches the database through
a real pipe to a real child process; what cannot reach it is counted and marked by a gap row, never lost unsaid."""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

import pytest

from sinkhole.service import audit_process
from sinkhole.service.audit_process import AuditProcess
from tests.audit.test_writer import burst
from tests.conftest import ask, audit_rows, wait_for
from tests.service.test_metrics import get, scrape, value
from tests.service.test_reload import reload
from tests.service.test_workers import children


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def blocked_sum(db: Path) -> int:
    return sum(r["count"] for r in audit_rows(db) if r["action"] == "blocked")


def test_every_blocked_answer_is_a_row_the_child_writes(make_server, stub, db):
    s = make_server(upstream=(stub.address,), audit_writer="process")
    audit = s.server.audit
    assert isinstance(audit, AuditProcess) and audit.writer_alive
    assert audit.writer_store is None  # no writer thread, no database connection of the log's in this process
    assert audit._proc.pid != os.getpid() and alive(audit._proc.pid)
    # this test process has other threads: not forked but started from the interpreter's file
    assert b"sinkhole.service.audit_child" in Path(f"/proc/{audit._proc.pid}/cmdline").read_bytes()
    n = 600
    assert burst(s.host, s.port, n) == n  # UDP: the fast path's tally rows
    for i in range(5):  # TCP: the pipeline's events
        assert ask(s, f"t{i}.chat.deepseek.com", tcp=True).answer
    # the counters come back from the child (its report every STATS_INTERVAL)
    assert wait_for(lambda: audit.written == n + 5, 10), audit.written
    assert blocked_sum(db) == n + 5
    assert {r["transport"] for r in audit_rows(db)} == {"udp", "tcp"}
    assert {r["chain"] for r in audit_rows(db)} == set(audit.chains) and len(audit.chains) == 1
    # a mode change is a message to the child; what waits for the pipe is counted to the byte (the backpressure's
    # measure): nothing once it is all written
    s.loop.call_soon_threadsafe(setattr, audit, "mode", "all")
    assert wait_for(lambda: audit.wanted is not None and audit.mode == "all" and not audit._outbox)
    assert audit._outbox_bytes == 0
    child = audit._proc.pid
    s.stop()
    assert not alive(child) and audit.dropped == 0


def test_a_killed_writer_process_is_reported_and_what_it_misses_is_counted(make_server, stub, caplog):
    s = make_server(upstream=(stub.address,), audit_writer="process", metrics="127.0.0.1:0")
    port, audit = s.server.exporter.port, s.server.audit
    assert get(port, "/healthz") == (200, "ok\n")
    os.kill(audit._proc.pid, signal.SIGKILL)
    assert wait_for(lambda: not audit.writer_alive)
    status, body = get(port, "/healthz")
    assert status == 503 and "audit writer not running" in body
    for i in range(10):  # DNS keeps answering, UDP and TCP
        assert ask(s, f"k{i}.chat.deepseek.com", tcp=i % 2 == 1, timeout=2).answer[0][0].to_text() == "0.0.0.0"
    assert wait_for(lambda: audit.dropped == 10), audit.dropped  # at the next hand-over (FLUSH_INTERVAL)
    assert value(scrape(port), "sinkhole_audit_rows_dropped_total", reason="queue_full") == 10
    assert "could not be handed to the writer process (it is gone)" in caplog.text


def test_a_writer_process_that_falls_behind_costs_counted_answers_and_a_gap_row(make_server, stub, db,
                                                                               monkeypatch):
    """The child stopped (SIGSTOP): the pipe fills, then the outbox, then answers are dropped and counted; when
    it goes on, its gap row says how many. Nothing is lost unsaid: rows + the gap row's count = the answers."""
    monkeypatch.setattr(audit_process, "PIPE_SIZE", 4096)  # the smallest pipe, and a small outbox
    monkeypatch.setattr(audit_process, "MAX_OUTBOX", 4096)
    s = make_server(upstream=(stub.address,), audit_writer="process", audit_window=0)
    audit = s.server.audit
    os.kill(audit._proc.pid, signal.SIGSTOP)
    try:
        n = 800
        for round_ in range(4):  # distinct names: rows that do not fold into one
            assert burst(s.host, s.port, n // 4) == n // 4
            for i in range(3):
                assert ask(s, f"r{round_}-{i}.chat.deepseek.com", tcp=True).answer
        assert wait_for(lambda: audit.lost_here > 0), "the outbox never filled"
    finally:
        os.kill(audit._proc.pid, signal.SIGCONT)
    s.stop()
    rows = audit_rows(db)
    gaps = [int(re.match(r"lost (\d+) rows from ", r["answer"]).group(1)) for r in rows if r["action"] == "gap"]
    assert gaps and sum(gaps) == audit.lost_here
    assert blocked_sum(db) + sum(gaps) == n + 12
    assert audit.dropped == audit.lost_here


def test_worker_writer_processes_write_what_they_hold_when_their_worker_dies(server_process, stub, db):
    """With workers, `auto` gives each its writer process; a worker SIGKILLed leaves no writer behind, and the
    one that replaces it starts its own."""
    p = server_process("--upstream", stub.address, "--workers", "2").serving()
    workers = children(p.proc.pid)
    writers = {w: children(w) for w in workers}
    assert all(len(c) == 1 for c in writers.values()), writers
    for w, (writer,) in writers.items():  # forked by the worker at its start, when it had one thread
        assert Path(f"/proc/{writer}/cmdline").read_bytes() == Path(f"/proc/{w}/cmdline").read_bytes()
    assert burst(p.host, p.port, 200) == 200
    os.kill(workers[0], signal.SIGKILL)
    orphan = writers[workers[0]][0]
    assert wait_for(lambda: not alive(orphan), 10), "the writer of a dead worker ended"
    replaced = wait_for(lambda: (c := children(p.proc.pid)) and len(c) == 2 and workers[0] not in c and c)
    new = next(w for w in replaced if w != workers[0])
    assert wait_for(lambda: len(children(new)) == 1 and children(new))
    assert p.terminate() == 0
    assert not any(alive(c[0]) for c in writers.values())
    assert blocked_sum(db) >= 1  # what the dead worker had handed over is written; how much of 200 depends on when


def test_a_reload_of_log_queries_reaches_every_writer_process(server_process, stub, db, tmp_path):
    f = tmp_path / "sinkhole.toml"
    f.write_text(f'upstream = ["{stub.address}"]\nlog_queries = "blocked"\n')
    p = server_process("--config", str(f), "--workers", "2").serving()
    f.write_text(f'upstream = ["{stub.address}"]\nlog_queries = "all"\n')
    r = reload(db)
    assert r.returncode == 0, r.stderr
    names = [f"www{i}.example.test" for i in range(20)]  # forwarded; 20 source ports reach both workers
    for name in names:
        ask_port(p, name)
    assert p.terminate() == 0
    logged = {r["qname"] for r in audit_rows(db) if r["action"] == "forwarded"}
    assert logged == set(names)


def ask_port(p, name: str) -> None:
    import dns.message
    import dns.query
    assert dns.query.udp(dns.message.make_query(name, "A"), p.host, port=p.port, timeout=5).answer


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_the_stop_line_counts_what_the_writer_wrote(server_process, stub, writer):
    p = server_process("--upstream", stub.address, "--audit-writer", writer)
    assert burst(p.host, p.port, 100) == 100
    assert p.terminate() == 0
    assert any("stopped: blocked 100; audit answers written 100 in " in line for line in p.lines), p.lines[-3:]


def test_a_writer_process_behind_slows_the_hand_over_and_loses_nothing(make_server, stub, db, monkeypatch,
                                                                        caplog):
    """Backpressure: past SOFT_OUTBOX bytes waiting (here: anything), a hand-over waits while the writer process
    reads, as a writer thread's full queue makes the hot path yield: the answers slow down, no row is lost."""
    monkeypatch.setattr(audit_process, "PIPE_SIZE", 4096)
    monkeypatch.setattr(audit_process, "SOFT_OUTBOX", 0)
    s = make_server(upstream=(stub.address,), audit_writer="process", audit_window=0)
    audit = s.server.audit
    n = 3000
    for round_ in range(3):
        assert burst(s.host, s.port, n // 3) == n // 3
        for i in range(4):
            assert ask(s, f"w{round_}-{i}.chat.deepseek.com", tcp=True).answer
    s.stop()
    assert audit.waited > 0 and audit.dropped == 0 and audit.lost_here == 0
    assert blocked_sum(db) == n + 12
    assert "audit: the writer process is behind" in caplog.text


def policies(pid: int) -> set[int]:
    """The scheduling policies of the threads of process `pid`."""
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def in_a_thread(fn):
    """fn() in a thread of its own, which then ends (a policy set there leaves this test's threads as they are):
    its result and that thread's policy afterwards."""
    out = []
    t = threading.Thread(target=lambda: out.append((fn(), os.sched_getscheduler(0))))
    t.start()
    t.join()
    return out[0]


def test_the_writer_process_idles_unless_its_worker_waits_for_it(make_server, stub, db, monkeypatch):
    """The writer process runs at SCHED_IDLE, all its threads, so that its bursts of writing never hold a core an
    answer waits for; while its worker waits for it (backpressure: here as soon as anything waits) its threads
    have normal priority, and once the pipe has taken all that waited they idle again. Nothing is lost."""
    if not in_a_thread(audit_process.idle_if_undoable)[0]:
        pytest.skip("this machine does not let a thread come back from SCHED_IDLE (no CAP_SYS_NICE, RLIMIT_NICE 0)")
    monkeypatch.setattr(audit_process, "PIPE_SIZE", 4096)
    monkeypatch.setattr(audit_process, "SOFT_OUTBOX", 0)
    s = make_server(upstream=(stub.address,), audit_writer="process", audit_window=0)
    audit = s.server.audit
    child = audit._proc.pid
    assert audit._idle and policies(child) == {os.SCHED_IDLE}  # the reading, writing and reporting threads
    os.kill(child, signal.SIGSTOP)  # it reads nothing: the worker waits for it, and lifts it first
    try:
        assert burst(s.host, s.port, 300) == 300
        assert wait_for(lambda: audit.waited > 0, 5) and audit._outbox_bytes > 0  # the fast path hands over later
        assert audit._hurried and policies(child) == {os.SCHED_OTHER}
    finally:
        os.kill(child, signal.SIGCONT)
    assert wait_for(lambda: not audit._outbox and policies(child) == {os.SCHED_IDLE}), policies(child)
    assert not audit._hurried
    s.stop()
    assert audit.dropped == 0 and blocked_sum(db) == 300


def test_where_idling_could_not_be_undone_the_writer_keeps_normal_priority(monkeypatch):
    """Back from SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE (a service's user has neither unless given): where
    it is refused, a writer at SCHED_IDLE could be starved by any busy process and never be hurried, so it is not
    put there at all."""
    real = os.sched_setscheduler

    def refuse_normal(pid: int, policy: int, param: os.sched_param) -> None:
        if policy == os.SCHED_OTHER:
            raise PermissionError(1, "Operation not permitted")
        real(pid, policy, param)

    monkeypatch.setattr(os, "sched_setscheduler", refuse_normal)
    assert in_a_thread(audit_process.idle_if_undoable) == (False, os.SCHED_OTHER)
    monkeypatch.setattr(os, "sched_setscheduler", real)
    done, policy = in_a_thread(audit_process.idle_if_undoable)
    assert policy == (os.SCHED_IDLE if done else os.SCHED_OTHER)
