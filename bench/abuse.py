"""The abuse phase of `make soak`: hostile clients on loopback against a running sinkhole, while a second,
well-behaved client measures what it gets. Every loop is bounded in count and in time; every address is in
127.0.0.0/8.

    well-behaved   127.0.0.1    UDP at a fixed rate: blocked names, hot names, names never asked before
    slow readers   127.0.0.10+  TCP connections that pipeline queries and never read a reply
    refused flood  127.0.0.66   TCP connections from an address outside allow_clients, as fast as it can
    unanswerable   127.0.0.20   one TCP connection pipelining names only a silent upstream could answer
    RPZ flood      127.0.0.67   TCP connections to rpz_listen from an address not in rpz_secondaries,
                                and AXFR requests over UDP

Addresses outside allow_clients and rpz_secondaries are the caller's to configure (see soak.py).
"""

from __future__ import annotations

import errno
import os
import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import dns.message
import dns.rcode
from common import percentile, process_tree, status_kb

WELL_BEHAVED = "127.0.0.1"
SLOW_READERS = [f"127.0.0.{10 + i}" for i in range(4)]
UNANSWERABLE = "127.0.0.20"
REFUSED = "127.0.0.66"  # outside allow_clients = 127.0.0.0/26
RPZ_REFUSED = "127.0.0.67"  # outside rpz_secondaries


def frame(wire: bytes) -> bytes:
    return struct.pack("!H", len(wire)) + wire


def open_fds(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return total


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n


def well_behaved(port: int, stop: float, qps: int, out: dict) -> None:
    """UDP from 127.0.0.1 at `qps`: a third blocked, a third hot, a third new names; latency of every answer."""
    rnd = random.Random(3)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((WELL_BEHAVED, 0))
    sock.settimeout(0.05)
    sent: dict[int, float] = {}
    latencies: list[float] = []
    rcodes: dict[str, int] = {}
    n = 0
    next_at = time.monotonic()
    try:
        while time.monotonic() < stop and n < qps * 600:
            now = time.monotonic()
            if now >= next_at:
                kind = n % 3
                name = (f"w{n}.chat.deepseek.com" if kind == 0 else f"hot{rnd.randrange(50)}.example.test"
                        if kind == 1 else f"new{n}-{rnd.randrange(10**9)}.example.test")
                qid = n % 65536
                sock.sendto(dns.message.make_query(name, "A", id=qid).to_wire(), ("127.0.0.1", port))
                sent[qid] = now
                n += 1
                next_at += 1.0 / qps
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            got = time.monotonic()
            reply = dns.message.from_wire(data)
            started = sent.pop(reply.id, None)
            if started is not None:
                latencies.append((got - started) * 1000)
                code = dns.rcode.to_text(reply.rcode())
                rcodes[code] = rcodes.get(code, 0) + 1
        drain_until = time.monotonic() + 3  # answers still on their way
        while sent and time.monotonic() < drain_until:
            try:
                reply = dns.message.from_wire(sock.recv(4096))
            except TimeoutError:
                continue
            started = sent.pop(reply.id, None)
            if started is not None:
                latencies.append((time.monotonic() - started) * 1000)
                code = dns.rcode.to_text(reply.rcode())
                rcodes[code] = rcodes.get(code, 0) + 1
    finally:
        sock.close()
    latencies.sort()
    out.update(sent=n, answered=len(latencies), unanswered=len(sent), rcodes=rcodes,
               p50_ms=round(percentile(latencies, 50) or 0, 2), p99_ms=round(percentile(latencies, 99) or 0, 2),
               max_ms=round(latencies[-1], 1) if latencies else None)


def slow_readers(port: int, stop: float, tally: Tally) -> None:
    """20 connections from each of 4 addresses (16 allowed each), pipelining blocked names, never reading."""
    wire = frame(dns.message.make_query("chat.deepseek.com", "A").to_wire())
    socks = []
    for source in SLOW_READERS:
        for _ in range(20):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.bind((source, 0))
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                s.close()
                tally.add("slow: connect failed")
                continue
            s.setblocking(False)
            socks.append(s)
            tally.add("slow: connected")
    alive = set(socks)
    while alive and time.monotonic() < stop:
        for s in list(alive):
            try:
                for _ in range(200):  # bounded per pass; the server stops reading when we do not
                    s.send(wire)
                    tally.add("slow: queries sent")
            except BlockingIOError:
                pass
            except OSError as exc:  # reset by the server
                tally.add(f"slow: closed by server ({errno.errorcode.get(exc.errno or 0, exc)})")
                alive.discard(s)
        time.sleep(0.2)
    tally.add("slow: still open at the end", len(alive))
    for s in socks:
        s.close()


def refused_flood(port: int, stop: float, tally: Tally, limit: int = 3000) -> None:
    """TCP connections from an address outside allow_clients, one after another (bounded)."""
    for _ in range(limit):
        if time.monotonic() >= stop:
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((REFUSED, 0))
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            tally.add("refused: connected")
            closed = s.recv(1) == b""
            tally.add("refused: closed by server" if closed else "refused: got data")
        except ConnectionResetError:
            tally.add("refused: closed by server")
        except OSError:
            tally.add("refused: timeout or error")
        finally:
            s.close()


def unanswerable(port: int, stop: float, tally: Tally, zone: str, rounds: int = 20, per_round: int = 1500) -> None:
    """One TCP connection pipelining names under `zone` (whose upstream never answers), reading the replies."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((UNANSWERABLE, 0))
    s.settimeout(15)
    s.connect(("127.0.0.1", port))
    n = 0
    try:
        for r in range(rounds):
            if time.monotonic() >= stop:
                break
            batch = b"".join(frame(dns.message.make_query(f"q{r}-{i}.{zone}", "A", id=i).to_wire())
                             for i in range(per_round))
            s.sendall(batch)
            n += per_round
            tally.add("unanswerable: sent", per_round)
            for _ in range(per_round):
                (length,) = struct.unpack("!H", _exact(s, 2))
                reply = dns.message.from_wire(_exact(s, length))
                tally.add(f"unanswerable: {dns.rcode.to_text(reply.rcode())}")
    except (OSError, EOFError) as exc:
        tally.add(f"unanswerable: connection ended ({exc.__class__.__name__})")
    finally:
        s.close()


def _exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def rpz_flood(rpz_port: int, stop: float, tally: Tally, connections: int = 1500, axfrs: int = 300) -> None:
    """TCP connections and UDP AXFR requests to rpz_listen from an address that may not transfer."""
    held = []
    for _ in range(connections):
        if time.monotonic() >= stop:
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((RPZ_REFUSED, 0))
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", rpz_port))
            held.append(s)
            tally.add("rpz: connected")
        except OSError:
            s.close()
            tally.add("rpz: connect failed")
    for s in held:
        try:
            closed = s.recv(1) == b""
        except ConnectionResetError:
            closed = True
        except OSError:
            closed = False
        tally.add("rpz: closed by server" if closed else "rpz: held open")
        s.close()
    q = dns.message.make_query("rpz.sinkhole.", "AXFR").to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind((RPZ_REFUSED, 0))
        u.settimeout(2)
        for _ in range(axfrs):
            u.sendto(q, ("127.0.0.1", rpz_port))
            try:
                tally.add(f"rpz: AXFR over UDP {dns.rcode.to_text(dns.message.from_wire(u.recv(512)).rcode())}")
            except OSError:
                tally.add("rpz: AXFR over UDP unanswered")


def log_kinds(lines: list[str]) -> dict[str, int]:
    """The server's warnings by kind (addresses and numbers made N), each line counted with the lines its
    "N more like this" summary stands for."""
    out: dict[str, int] = {}
    for line in lines:
        _, sep, message = line.rstrip().partition(" WARNING ")
        if not sep:
            continue
        m = re.match(r"(\d+) more like this in the last \d+ s; the last: (.*)", message)
        n, message = (int(m.group(1)), m.group(2)) if m else (1, message)
        kind = re.sub(r"[0-9a-f]*\d[0-9a-f.:-]*", "N", message)[:90]
        out[kind] = out.get(kind, 0) + n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def tarpit() -> socket.socket:
    """A UDP socket on 127.0.0.1 that never answers: the upstream of the unanswerable names."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def run(pid: int, port: int, rpz_port: int, zone: str, seconds: float, qps: int, lines: list[str]) -> dict:
    """The phase: abusers and the well-behaved client at once for `seconds`; fds and RSS sampled every 0.5 s."""
    before_fds, before_rss = open_fds(pid), status_kb(pid)
    first_line = len(lines)
    stop = time.monotonic() + seconds
    tally = Tally()
    good: dict = {}
    threads = [threading.Thread(target=well_behaved, args=(port, stop, qps, good), daemon=True),
               threading.Thread(target=slow_readers, args=(port, stop, tally), daemon=True),
               threading.Thread(target=refused_flood, args=(port, stop, tally), daemon=True),
               threading.Thread(target=unanswerable, args=(port, stop, tally, zone), daemon=True),
               threading.Thread(target=rpz_flood, args=(rpz_port, stop, tally), daemon=True)]
    for t in threads:
        t.start()
    fds, rss = [], []
    while time.monotonic() < stop:
        fds.append(open_fds(pid))
        rss.append(status_kb(pid))
        time.sleep(0.5)
    for t in threads:
        t.join(30)
    log = lines[first_line:]
    return {
        "seconds": seconds, "well_behaved": good, "abusers": dict(sorted(tally.counts.items())),
        "server_fds": {"before": before_fds, "max": max(fds, default=before_fds), "after": open_fds(pid)},
        "server_rss_kb": {"before": before_rss, "max": max(rss, default=before_rss), "after": status_kb(pid)},
        "server_log_lines": len(log), "server_warning_lines": sum(" WARNING " in line for line in log),
        "server_warnings_by_kind": log_kinds(log), "log_excerpt": [line.rstrip() for line in log[:12]],
    }

