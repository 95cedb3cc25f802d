"""Audit log: one row per blocked query, written off the hot path, complete after SIGTERM/SIGINT."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime

import dns.message
import dns.query
import dns.rcode
import pytest

from sinkhole.model import RuleKind
from sinkhole.store.db import Store, open_store
from tests.conftest import ask, audit_rows, wait_for


def test_blocked_query_is_one_row_with_who_what_when_why(server, db):
    before = datetime.now(UTC)
    ask(server, "Chat.DeepSeek.com", "AAAA")
    ask(server, "api.deepseek.com", "A", tcp=True)
    ask(server, "www.example.test", "A")  # forwarded: not in the default `blocked` log
    rows = wait_for(lambda: len(audit_rows(db)) >= 2 and audit_rows(db))
    assert len(rows) == 2
    first, second = rows
    assert first["qname"] == "chat.deepseek.com" and first["qtype"] == "AAAA"
    assert first["client"] == "127.0.0.1" and first["transport"] == "udp"
    assert first["action"] == "blocked" and first["rule"] == "chat.deepseek.com"
    assert first["category"] == "deepseek" and first["answer"] == "::" and first["rcode"] == "NOERROR"
    assert first["node"] == "test-node"
    store = Store(db)
    assert first["policy_version"] == store.policy_version() > 0
    store.close()
    when = datetime.fromisoformat(first["time"].replace("Z", "+00:00"))
    assert first["time"].endswith("Z") and before <= when <= datetime.now(UTC)
    assert second["transport"] == "tcp" and second["qtype"] == "A" and second["answer"] == "0.0.0.0"
    assert second["seq"] > first["seq"]


def test_log_all_mode_records_forwarded_queries_with_upstream(make_server, stub, db):
    s = make_server(upstream=(stub.address,), log_queries="all")
    ask(s, "www.example.test")
    ask(s, "chat.deepseek.com")
    rows = wait_for(lambda: len(audit_rows(db)) >= 2 and audit_rows(db))
    fwd = next(r for r in rows if r["action"] == "forwarded")
    assert fwd["upstream"] == stub.address and fwd["latency_ms"] >= 0 and fwd["rule"] is None
    assert {r["action"] for r in rows} == {"forwarded", "blocked"}


def test_log_none_mode_writes_nothing(make_server, stub, db):
    s = make_server(upstream=(stub.address,), log_queries="none")
    for _ in range(5):
        ask(s, "chat.deepseek.com")
    s.stop()
    assert audit_rows(db) == []


def test_blocked_by_allow_exception_is_not_logged_as_blocked(make_server, stub, db):
    store = open_store(db)
    store.add_rules(RuleKind.ALLOW, ["status.deepseek.com"])
    store.close()
    s = make_server(upstream=(stub.address,))
    ask(s, "status.deepseek.com")
    ask(s, "chat.deepseek.com")
    s.stop()
    assert [r["qname"] for r in audit_rows(db)] == ["chat.deepseek.com"]


def client_socket() -> socket.socket:
    """A UDP socket with room for a burst of replies that we read only after sending."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    return sock


def burst(host: str, port: int, n: int) -> int:
    """Send n blocked queries over UDP as fast as possible (bounded), return how many were answered."""
    sock = client_socket()
    sock.settimeout(3)
    answered = set()
    try:
        for i in range(n):
            q = dns.message.make_query(f"q{i}.chat.deepseek.com", "A")
            q.id = i
            sock.sendto(q.to_wire(), (host, port))
        deadline = time.monotonic() + 10
        while len(answered) < n and time.monotonic() < deadline:
            try:
                wire, _ = sock.recvfrom(4096)
            except TimeoutError:
                break
            answered.add(dns.message.from_wire(wire).id)
    finally:
        sock.close()
    return len(answered)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_flushes_every_row_and_exits_zero(server_process, stub, db, sig):
    p = server_process("--upstream", stub.address)
    n = 1000
    answered = burst(p.host, p.port, n)
    tcp_q = dns.message.make_query("tcp.chat.deepseek.com", "A")
    dns.query.tcp(tcp_q, p.host, port=p.port, timeout=5)
    code = p.terminate(sig)
    assert code == 0, "".join(p.lines)
    rows = audit_rows(db)
    assert answered == n, f"only {answered} of {n} answered"
    assert len(rows) == n + 1
    assert len({r["qname"] for r in rows}) == n + 1
    assert any("stopped" in line for line in p.lines)


@pytest.mark.parametrize("workers", ["1", "2"])  # 2: each worker's writer is a process of its own (audit_writer)
def test_signal_during_a_burst_loses_no_answered_row(server_process, stub, db, workers):
    """SIGTERM while datagrams are still queued: every query that got an answer has its row."""
    p = server_process("--upstream", stub.address, "--workers", workers).serving()
    sock = client_socket()
    sock.settimeout(2)
    n = 2000
    for i in range(n):
        q = dns.message.make_query(f"b{i}.chat.deepseek.com", "A")
        q.id = i % 65536
        sock.sendto(q.to_wire(), (p.host, p.port))
    p.proc.send_signal(signal.SIGTERM)
    answered = set()
    try:
        while True:
            answered.add(dns.message.from_wire(sock.recvfrom(4096)[0]).question[0].name.to_text())
    except TimeoutError:
        pass
    finally:
        sock.close()
    assert p.proc.wait(20) == 0
    logged = {r["qname"] + "." for r in audit_rows(db)}
    assert answered and answered <= logged
    assert len(logged) == len(answered)
    assert any(f"blocked {len(answered)}" in line for line in p.lines), "".join(p.lines[-3:])


def test_cli_log_reads_what_the_server_wrote(server_process, stub, db):
    p = server_process("--upstream", stub.address)
    for name in ("chat.deepseek.com", "chatgpt.com", "claude.ai"):
        dns.query.udp(dns.message.make_query(name, "A"), p.host, port=p.port, timeout=5)
    assert p.terminate() == 0
    out = subprocess.run([sys.executable, "-m", "sinkhole", "--db", str(db), "log", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["qname"] for r in rows] == ["chat.deepseek.com", "chatgpt.com", "claude.ai"]
    for r in rows:
        assert {"time", "client", "qname", "qtype", "action", "rule"} <= set(r)
        assert r["action"] == "blocked" and r["client"] == "127.0.0.1" and r["qtype"] == "A"
    assert [r["rule"] for r in rows] == ["chat.deepseek.com", "chatgpt.com", "claude.ai"]


def test_odd_bytes_in_a_name_are_escaped_in_the_log_and_never_a_false_match(server, stub, db):
    import dns.name

    odd = dns.name.from_text(r"a\032b\059.chat.deepseek.com")  # a space and a ';' in the first label
    r = dns.query.udp(dns.message.make_query(odd, "A"), server.host, port=server.port, timeout=5)
    assert r.answer[0][0].to_text() == "0.0.0.0"
    # one label "deepseek.com" (a literal dot) is FORMERR, never a match for the rule deepseek.com
    dotted = dns.name.Name([b"deepseek.com", b""])
    r = dns.query.udp(dns.message.make_query(dotted, "A"), server.host, port=server.port, timeout=5)
    assert r.rcode() == dns.rcode.FORMERR
    rows = wait_for(lambda: audit_rows(db))
    assert [row["qname"] for row in rows] == [r"a\032b\059.chat.deepseek.com"]



def test_two_busy_writers_keep_the_wal_bounded(db, monkeypatch):
    """Two workers' writers, always in a transaction, starve SQLite's automatic checkpoint: the WAL only
    grew. Past wal_limit a writer runs a RESTART checkpoint and the file is cut back; here the WAL stays
    well under the 16 MiB that the automatic checkpoint alone lets it reach before it even tries."""
    import threading

    from sinkhole.audit import writer as audit_mod
    from sinkhole.audit.writer import AuditLog
    from sinkhole.model import AuditEvent

    monkeypatch.setattr(audit_mod, "WAL_CHECK_INTERVAL", 0.05)
    logs = [AuditLog(db, f"n{i}", seed=None, batch_size=2000) for i in range(2)]
    for log in logs:
        log.wal_limit = 1 << 20
        log.start()
    wal = db.parent / (db.name + "-wal")
    biggest = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal biggest
        while not done.is_set():
            biggest = max(biggest, wal.stat().st_size if wal.exists() else 0)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.time()
    try:
        for i in range(60_000):
            logs[i % 2].submit(AuditEvent(t0 + i * 1e-6, f"10.1.{i % 200}.{i % 250}", "udp",
                                          f"w{i}.chatgpt.com", 1, "blocked", "chatgpt.com", "genai", 0,
                                          "0.0.0.0", 1))
            if i % 2000 == 0:
                time.sleep(0.01)  # as a server would: the writers take batches while rows keep coming
        for log in logs:
            log.close()
    finally:
        done.set()
        watcher.join()
    assert sum(log.written for log in logs) == 60_000
    assert biggest < 12 * 2**20, f"the WAL reached {biggest / 2**20:.1f} MiB"
    assert sum(log.wal_checkpoints for log in logs) >= 1
    assert len(audit_rows(db)) == 60_000
