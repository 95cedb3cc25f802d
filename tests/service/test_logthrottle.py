"""The server log under a burst: each repeatable warning once per interval per kind, and what was held back
said as "N more like this" (by the server's housekeeping, and at shutdown), never lost. Real `sinkhole serve`
processes, real sockets."""

from __future__ import annotations

import re
import socket

import dns.message
import dns.rcode

from tests.conftest import wait_for


def burst(port: int, names: list[str], source: str = "127.0.0.1") -> list[int]:
    """Send every query at once from one socket, then read the answers: their rcodes, in any order."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(10)
        for i, name in enumerate(names):
            sock.sendto(dns.message.make_query(name, "A", id=i).to_wire(), ("127.0.0.1", port))
        return [dns.message.from_wire(sock.recv(4096)).rcode() for _ in names]


def said(lines: list[str], text: str) -> int:
    """How many events of a kind the log accounts for: each line naming it once, plus each summary's N."""
    total = 0
    for line in list(lines):
        if text not in line:
            continue
        m = re.search(r"(\d+) more like this in the last", line)
        total += int(m.group(1)) if m else 1
    return total


def test_a_servfail_burst_is_one_line_then_one_summary(server_process, stub):
    p = server_process("--upstream", stub.address, "--timeout", "0.5", "--workers", "1",
                       env={"SINKHOLE_LOG_REPEAT_INTERVAL": "1"})
    rcodes = burst(p.port, [f"slow.n{i}.example.test" for i in range(60)])
    assert rcodes == [dns.rcode.SERVFAIL] * 60
    # the housekeeping says what was held back once the interval is over, with no further warning needed
    assert wait_for(lambda: said(p.lines, "SERVFAIL for slow.") == 60, timeout=10), "".join(p.lines)
    servfail_lines = [line for line in p.lines if "SERVFAIL for slow." in line]
    assert len(servfail_lines) == 2, "".join(servfail_lines)
    assert re.search(r"WARNING 59 more like this in the last \d+ s; the last: SERVFAIL for slow\.n\d+\.example\.test A",
                     servfail_lines[1])
    assert p.terminate() == 0


def test_refusals_held_back_are_said_at_shutdown_by_every_worker(server_process, stub):
    p = server_process("--upstream", stub.address, "--workers", "2",
                       env={"SINKHOLE_ALLOW_CLIENTS": "10.0.0.0/8", "SINKHOLE_LOG_REPEAT_INTERVAL": "600"})
    sent = 0
    for round_ in range(4):  # new source ports each round: the kernel spreads them over both workers
        rcodes = burst(p.port, [f"r{round_}-{i}.example.test" for i in range(40)])
        assert rcodes == [dns.rcode.REFUSED] * 40
        sent += 40
    # the lines reach us through a pipe and a reader thread: wait for the first one, then look at what came
    assert wait_for(lambda: any("not in allow_clients" in line for line in p.lines), timeout=30), "".join(p.lines)
    lines_before = [line for line in p.lines if "not in allow_clients" in line]
    assert 1 <= len(lines_before) <= 2, "one line per worker for the whole burst:\n" + "".join(lines_before)
    assert p.terminate() == 0
    # every line is in once the pipe is at its end (no process holds it any more), however long the reader
    # thread takes on a loaded machine: terminate() gives it a few seconds only
    assert wait_for(lambda: not p._drain.is_alive(), timeout=60), "stderr still open after the server exited"
    assert said(p.lines, "not in allow_clients") == sent, "".join(p.lines)
    assert any("more like this" in line for line in p.lines if "not in allow_clients" in line)
