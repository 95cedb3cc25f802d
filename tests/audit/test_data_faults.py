"""Data faults (issue 6) and 'nothing lost' (issue 4): the database is locked, read-only, deleted or full, or
the server is SIGKILLed mid-batch. DNS keeps answering, the database stays sound (`PRAGMA integrity_check`),
the writer recovers by itself, and rows it could not keep are counted, logged once and marked by a gap row.

The faults are real: another SQLite connection holds the lock; `chattr +i` makes the files immutable (chmod
does not stop root); a tmpfs mounted by the test fills up; the database files are unlinked; SIGKILL.
"""

from __future__ import annotations

import errno
import logging
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from sinkhole.audit.writer import AuditLog
from sinkhole.model import AuditEvent
from sinkhole.store.schema import iso
from tests.conftest import ask, wait_for
from tests.conftest import audit_rows as rows

# ------------------------------------------------------------------ helpers



def qnames(db: Path) -> list[str]:
    return [r["qname"] for r in rows(db) if r["action"] != "gap"]


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def sidecars(db: Path) -> tuple[Path, Path]:
    return Path(f"{db}-wal"), Path(f"{db}-shm")


def blocked(server, qname: str) -> None:
    """One blocked query; it must be answered (the sinkhole address) within the client's 2 s timeout."""
    reply = ask(server, qname, timeout=2)
    assert reply.rcode() == dns.rcode.NOERROR
    assert [rr.to_text() for rrset in reply.answer for rr in rrset] == ["0.0.0.0"]


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def event(qname: str, when: float | None = None) -> AuditEvent:
    return AuditEvent(when or time.time(), "192.0.2.7", "udp", qname, 1, "blocked", qname, "test", 0,
                      "0.0.0.0", 1)


# ------------------------------------------------------------------ locked


def test_locked_database_dns_keeps_answering_and_every_row_arrives_after_release(make_server, stub, db, caplog):
    caplog.set_level(logging.WARNING, logger="sinkhole.audit.writer")
    s = make_server(upstream=(stub.address,))
    blocked(s, "before.chat.deepseek.com")
    assert wait_for(lambda: qnames(db) == ["before.chat.deepseek.com"])
    holder = sqlite3.connect(db, isolation_level=None, timeout=5)
    sent: list[str] = []
    try:
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        # the fault lasts ~2 s (longer than the writer's busy timeout); queries are paced through it
        while time.monotonic() - started < 2.0 and len(sent) < 100:
            name = f"locked{len(sent)}.chat.deepseek.com"
            blocked(s, name)
            sent.append(name)
            time.sleep(0.05)
        assert qnames(db) == ["before.chat.deepseek.com"], "the lock did not hold the writer back"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert wait_for(lambda: len(qnames(db)) == len(sent) + 1, timeout=10)
    assert qnames(db) == ["before.chat.deepseek.com", *sent]
    assert s.server.audit.dropped == 0 and not any(r["action"] == "gap" for r in rows(db))
    assert integrity(db) == "ok"
    assert len(lines(caplog, "cannot write")) <= 1  # once per outage, not per batch


# ------------------------------------------------------------------ read-only


def chattr(flag: str, *paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)


def test_read_only_database_dns_keeps_answering_and_rows_are_written_when_writable(make_server, stub, db,
                                                                                   caplog):
    """Read-only for root too: `chattr +i` on the database and its WAL (never on -shm: SQLite maps it, and a
    write to an immutable mapping is SIGBUS). A fresh connection then gets SQLITE_READONLY."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr (e2fsprogs) is not installed: cannot make the database read-only for root")
    caplog.set_level(logging.WARNING, logger="sinkhole.audit.writer")
    s = make_server(upstream=(stub.address,))
    blocked(s, "before.chat.deepseek.com")
    assert wait_for(lambda: qnames(db) == ["before.chat.deepseek.com"])
    wal, _ = sidecars(db)
    assert wal.exists()
    done = chattr("+i", db, wal)
    if done.returncode != 0:
        chattr("-i", db, wal)
        pytest.skip(f"chattr +i is not possible here: {done.stderr.strip()}")
    sent: list[str] = []
    try:
        probe = sqlite3.connect(db, timeout=0.5)
        with pytest.raises(sqlite3.OperationalError):  # the fault is real: nobody can write, root included
            probe.execute("INSERT INTO audit (qname) VALUES ('probe')")
            probe.commit()
        probe.close()
        for i in range(10):
            name = f"ro{i}.chat.deepseek.com"
            blocked(s, name)
            sent.append(name)
        assert wait_for(lambda: lines(caplog, "cannot write"), timeout=10)
        assert qnames(db) == ["before.chat.deepseek.com"]
        assert wait_for(lambda: s.server.audit.pending == len(sent))  # held in memory, not lost
    finally:
        chattr("-i", db, wal)
    assert wait_for(lambda: len(qnames(db)) == len(sent) + 1, timeout=10)
    assert qnames(db) == ["before.chat.deepseek.com", *sent]
    assert s.server.audit.dropped == 0
    # the writer commits the rows, then says so: wait for its line rather than race it
    assert wait_for(lambda: lines(caplog, "again after")) and len(lines(caplog, "cannot write")) == 1
    assert integrity(db) == "ok"


# ------------------------------------------------------------------ deleted


def test_deleted_database_is_recreated_and_new_rows_go_there(make_server, stub, db, caplog):
    caplog.set_level(logging.WARNING, logger="sinkhole.audit.writer")
    s = make_server(upstream=(stub.address,))
    blocked(s, "before.chat.deepseek.com")
    assert wait_for(lambda: qnames(db) == ["before.chat.deepseek.com"])
    # and the writer is done with it: a file deleted between its commit and its check that the file is still
    # there is taken as deleted while it wrote, and the row is written again into the new file (nothing lost)
    assert wait_for(lambda: s.server.audit.written == 1)
    for path in (db, *sidecars(db)):
        path.unlink(missing_ok=True)
    after = [f"after{i}.chat.deepseek.com" for i in range(5)]
    for name in after:
        blocked(s, name)
    assert wait_for(lambda: qnames(db) == after, timeout=10), qnames(db)
    assert s.server.audit.reopened == 1 and s.server.audit.dropped == 0
    assert lines(caplog, "deleted or replaced")
    assert integrity(db) == "ok"
    s.stop()
    # the recreated database holds the shipped lists: a restart on it still blocks
    s2 = make_server(upstream=(stub.address,))
    blocked(s2, "chat.deepseek.com")
    assert wait_for(lambda: qnames(db) == [*after, "chat.deepseek.com"])


# ------------------------------------------------------------------ disk full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs mounted for this test (root only), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full (bounded by its size); return it."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            for _ in range(4096):
                try:
                    f.write(chunk[:size])
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    return filler


def test_full_disk_dns_keeps_answering_loss_is_counted_and_a_gap_row_marks_it(small_disk, make_server, stub,
                                                                               caplog):
    caplog.set_level(logging.WARNING, logger="sinkhole.audit.writer")
    db = small_disk / "sinkhole.db"
    s = make_server(upstream=(stub.address,), db=db)
    audit = s.server.audit
    audit.max_pending = 5  # hold 5 rows while the disk is full, so that the loss shows in a short test
    audit.loss_log_interval = 60.0  # longer than this test: every loss in it must share one log line
    try:
        blocked(s, "before.chat.deepseek.com")
        assert wait_for(lambda: qnames(db) == ["before.chat.deepseek.com"])
        filler = fill(small_disk)
        blocked(s, "full0.chat.deepseek.com")
        assert wait_for(lambda: lines(caplog, "cannot write"), timeout=10)
        assert "full" in lines(caplog, "cannot write")[0]
        sent = ["full0.chat.deepseek.com"]
        for i in range(1, 20):
            sent.append(f"full{i}.chat.deepseek.com")
            blocked(s, sent[-1])
        assert wait_for(lambda: audit.dropped == 15, timeout=10), audit.dropped
        assert wait_for(lambda: lines(caplog, "rows lost"))
        assert len(lines(caplog, "rows lost")) == 1  # logged once per interval, not per batch
        assert qnames(db) == ["before.chat.deepseek.com"]
        filler.unlink()
        assert wait_for(lambda: len(rows(db)) == 7, timeout=10), rows(db)
        stored = rows(db)
        assert [r["action"] for r in stored] == ["blocked", "gap", *["blocked"] * 5]
        gap = stored[1]
        assert gap["qname"] == "" and gap["answer"].startswith("lost 15 rows from ") and "full" in gap["answer"]
        assert [r["qname"] for r in stored[2:]] == sent[:5]  # the held rows, after the gap row
        assert audit.gaps == 1 and audit.written == 6
        assert len(lines(caplog, "gap record written for 15 lost rows")) == 1
        assert integrity(db) == "ok"
        blocked(s, "later.chat.deepseek.com")
        assert wait_for(lambda: qnames(db)[-1] == "later.chat.deepseek.com")
    finally:
        s.stop()


# ------------------------------------------------------------------ SIGKILL


def test_sigkill_during_a_batch_leaves_a_sound_database_of_real_queries(server_process, stub, db):
    # one process, so that SIGKILL stops every writer at once (with --workers N, SIGKILL to the supervisor
    # leaves workers that go on writing until they notice)
    p = server_process("--upstream", stub.address, "--workers", "1")
    n = 8000
    sent = 0
    stop = threading.Event()

    def send() -> None:  # a bounded burst, paced so that it lasts a few seconds
        nonlocal sent
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for i in range(n):
                if stop.is_set():
                    return
                q = dns.message.make_query(f"k{i}.chat.deepseek.com", "A")
                try:
                    sock.sendto(q.to_wire(), (p.host, p.port))
                except OSError:
                    return
                sent = i + 1
                if i % 100 == 99:
                    stop.wait(0.03)
        finally:
            sock.close()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        assert wait_for(lambda: qnames(db), timeout=10)  # the writer has committed its first batch
        p.proc.send_signal(signal.SIGKILL)
        assert p.proc.wait(10) == -signal.SIGKILL
        killed_at = sent
    finally:
        stop.set()
        sender.join(10)
    assert killed_at < n, "the burst was over before the kill"
    assert integrity(db) == "ok"
    stored = rows(db)
    seqs = [r["seq"] for r in stored]
    assert seqs == sorted(set(seqs))
    indexes = [int(r["qname"].split(".")[0][1:]) for r in stored]
    assert all(r["qname"] == f"k{i}.chat.deepseek.com" for r, i in zip(stored, indexes, strict=True))
    assert indexes == sorted(set(indexes)) and indexes[-1] < killed_at  # real queries, in order, no repeats
    # a restart on the same database keeps logging after the last row
    p2 = server_process("--upstream", stub.address, "--workers", "1")
    query = dns.message.make_query("again.chat.deepseek.com", "A")
    assert dns.query.udp(query, p2.host, port=p2.port, timeout=2).answer
    assert p2.terminate() == 0
    last = rows(db)[-1]
    assert last["qname"] == "again.chat.deepseek.com" and last["seq"] > seqs[-1]
    assert integrity(db) == "ok"


# ------------------------------------------------------------------ the writer on its own


def test_writer_follows_a_directory_removed_and_recreated(tmp_path):
    state = tmp_path / "state"
    db = state / "sinkhole.db"
    audit = AuditLog(db, "n1", seed=None)
    audit.start()
    try:
        audit.submit(event("one.example"))
        assert wait_for(lambda: qnames(db) == ["one.example"])
        shutil.rmtree(state)
        state.mkdir()
        audit.submit(event("two.example"))
        audit.submit(event("three.example"))
        assert wait_for(lambda: qnames(db) == ["two.example", "three.example"], timeout=10), qnames(db)
    finally:
        audit.close()
    assert audit.reopened == 1 and audit.written == 3 and audit.dropped == 0
    assert integrity(db) == "ok"


@pytest.mark.timeout(20)
def test_full_queue_drops_and_counts_and_the_gap_row_says_so(tmp_path):
    db = tmp_path / "q.db"
    audit = AuditLog(db, "n1", queue_size=5, seed=None)
    t0 = time.time()
    for i in range(8):  # no writer yet: the queue fills, and a submit that waited for room would hang here
        audit.submit(event(f"q{i}.example", t0 + i))
    assert audit.dropped == 3 and audit.queue_dropped == 3
    audit.start()
    audit.close()
    stored = rows(db)
    assert [r["action"] for r in stored] == ["gap", *["blocked"] * 5]
    assert stored[0]["answer"] == f"lost 3 rows from {iso(t0 + 5)} to {iso(t0 + 7)}: audit queue full"
    assert stored[0]["time"] == iso(t0 + 5) and stored[0]["qname"] == ""
    assert [r["qname"] for r in stored[1:]] == [f"q{i}.example" for i in range(5)]
    assert audit.written == 5 and audit.gaps == 1


def test_close_is_bounded_when_the_database_stays_locked(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="sinkhole.audit.writer")
    db = tmp_path / "locked.db"
    audit = AuditLog(db, "n1", seed=None)
    audit.start()
    audit.submit(event("first.example"))
    assert wait_for(lambda: qnames(db) == ["first.example"])
    holder = sqlite3.connect(db, isolation_level=None, timeout=5)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(10):
            audit.submit(event(f"late{i}.example"))
        audit.close(timeout=30)  # gives up after audit.final_retry (3 s), said once below
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert audit.dropped == 10 and audit.written == 1
    assert len(lines(caplog, "gave up")) == 1 and not lines(caplog, "did not finish")
    assert qnames(db) == ["first.example"] and integrity(db) == "ok"


def test_a_path_that_cannot_be_opened_never_blocks_submit_and_close_gives_up(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="sinkhole.audit.writer")
    (tmp_path / "not-a-dir").write_text("a file where the directory should be")
    audit = AuditLog(tmp_path / "not-a-dir" / "x.db", "n1", seed=None)
    audit.start()
    for i in range(20):
        audit.submit(event(f"x{i}.example"))
    assert wait_for(lambda: lines(caplog, "cannot write"))
    audit.close(timeout=30)
    assert audit.dropped == 20 and audit.written == 0
    assert len(lines(caplog, "cannot write")) == 1 and len(lines(caplog, "gave up")) == 1


def test_rules_added_after_the_database_was_replaced_reach_the_server(make_server, stub, db):
    s = make_server(upstream=(stub.address,))
    assert ask(s, "www.after-replace.test").answer[0][0].to_text().startswith("192.0.2.")
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "sinkhole", "--db", str(db), "block", "add", "after-replace.test"],
                   check=True, capture_output=True)
    # in force without a restart (how soon is measured by make bench, not asserted here: it failed under load)
    assert wait_for(lambda: ask(s, "x.after-replace.test").answer[0][0].to_text() == "0.0.0.0")
    assert ask(s, "chat.deepseek.com").answer[0][0].to_text() == "0.0.0.0"  # the new file was seeded
