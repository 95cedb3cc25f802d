"""Several worker processes on one port: shared sockets, policy reloads in each, restarts, one total."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.query

from tests.audit.test_writer import burst
from tests.conftest import wait_for
from tests.dnsstub import address_for


def children(pid: int) -> list[int]:
    out = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(x) for x in out]


def answer(port: int, name: str, tcp: bool = False) -> str:
    send = dns.query.tcp if tcp else dns.query.udp
    r = send(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=5)
    return r.answer[0][0].to_text() if r.answer else ""


def test_workers_serve_one_port_and_add_up_their_counts(server_process, stub, db):
    p = server_process("--upstream", stub.address, "--workers", "2").serving()
    assert any("(2 workers)" in line for line in p.lines)
    workers = wait_for(lambda: len(children(p.proc.pid)) == 2 and children(p.proc.pid))
    assert len(workers) == 2
    n = 1000
    assert burst(p.host, p.port, n) == n
    assert answer(p.port, "www.example.test", tcp=True) == address_for("www.example.test")
    assert p.terminate() == 0
    total = [line for line in p.lines if re.search(r"INFO stopped: ", line)]
    assert len(total) == 1 and f"blocked {n}," in total[0] and "(2 workers, 0 restarts)" in total[0]
    per_worker = [int(m.group(1)) for line in p.lines if (m := re.search(r"worker \d stopped: blocked (\d+)", line))]
    assert len(per_worker) == 2 and sum(per_worker) == n
    assert all(k > 0 for k in per_worker), "the kernel hands queries to both workers"
    rows = sqlite3.connect(db).execute("SELECT count(*) FROM audit WHERE action = 'blocked'").fetchone()[0]
    assert rows == n


def test_a_policy_change_reaches_every_worker(server_process, stub, db):
    p = server_process("--upstream", stub.address, "--workers", "2")
    assert answer(p.port, "www.new-rule.test") == address_for("www.new-rule.test")
    subprocess.run([sys.executable, "-m", "sinkhole", "--db", str(db), "block", "add", "new-rule.test"],
                   check=True, capture_output=True)

    def all_blocked() -> bool:
        # 20 queries from 20 source ports: both workers get some
        return all(answer(p.port, f"h{i}.new-rule.test") == "0.0.0.0" for i in range(20))

    assert wait_for(all_blocked)  # how soon: make bench's reload runs, not a clock here


def test_a_dead_worker_is_replaced(server_process, stub):
    p = server_process("--upstream", stub.address, "--workers", "2")
    first = wait_for(lambda: len(children(p.proc.pid)) == 2 and children(p.proc.pid))
    os.kill(first[0], signal.SIGKILL)
    replaced = wait_for(lambda: (c := children(p.proc.pid)) and len(c) == 2 and first[0] not in c and c)
    assert replaced and first[1] in replaced
    for i in range(20):
        assert answer(p.port, f"x{i}.chat.deepseek.com") == "0.0.0.0"
    assert p.terminate() == 0
    assert any("starting it again" in line for line in p.lines)
    assert any("(2 workers, 1 restarts)" in line for line in p.lines)


def test_workers_exit_when_the_supervisor_is_killed(server_process, stub):
    p = server_process("--upstream", stub.address, "--workers", "2")
    workers = wait_for(lambda: len(children(p.proc.pid)) == 2 and children(p.proc.pid))
    p.proc.kill()
    p.proc.wait(5)

    def gone() -> bool:
        return not any(Path(f"/proc/{w}").exists() and "Z" not in _state(w) for w in workers)

    assert wait_for(gone, timeout=5), "orphaned workers must not keep the port"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", p.port))  # free again


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "Z"
