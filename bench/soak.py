"""Soak: mixed load at a high fraction of capacity while faults are injected; loopback only, bounded.

    .venv/bin/python bench/soak.py [--seconds 120] [--qps 4000] [--abuse-seconds 30]

Faults, on a fixed schedule (fractions of the run): the upstream is killed and restored,
the database is locked by another process, then made read-only (chattr +i) and restored,
garbage datagrams arrive, a TCP flood from 40 addresses holds more connections than the cap.
Reports queries sent and answered, SERVFAILs, audit rows vs blocked answers, and RSS over time.

Then the abuse phase (bench/abuse.py): slow-reading TCP clients, a connection flood from a refused
address, a pipelined flood of names no upstream answers from one client, and a flood of the RPZ
port, while a second, well-behaved client reports its answers, SERVFAILs and p99 latency, and the
server's file descriptors and RSS are sampled. Writes everything as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import abuse
from common import ROOT, RssSampler, Sinkhole, Unbound, dnsperf, free_port, need


def write_queries(path: Path, n: int = 20000, seed: int = 1) -> None:
    """5% blocked, 80% a hot set of 200 names, 15% unique names (all under example.test or blocked)."""
    rnd = random.Random(seed)
    lines = []
    for i in range(n):
        x = rnd.random()
        if x < 0.05:
            lines.append(f"{rnd.choice(['chat', 'api', 'cdn', f'h{i}'])}.deepseek.com A")
        elif x < 0.85:
            lines.append(f"hot{rnd.randrange(200)}.example.test {rnd.choice(['A', 'AAAA'])}")
        else:
            lines.append(f"u{i}-{rnd.randrange(10**9)}.example.test A")
    path.write_text("\n".join(lines) + "\n")


def lock_db(db: Path, seconds: float) -> None:
    conn = sqlite3.connect(db, timeout=30)
    conn.execute("BEGIN EXCLUSIVE")
    time.sleep(seconds)
    conn.rollback()
    conn.close()


def read_only(db: Path, seconds: float) -> str:
    """Make the database files immutable (chattr +i: chmod does not stop root), then restore them.

    Never the -shm file: SQLite maps it into memory, and a write to an immutable mapping is SIGBUS."""
    files = [str(f) for f in (db, db.with_name(db.name + "-wal")) if f.exists()]
    if subprocess.run(["chattr", "+i", *files], capture_output=True).returncode != 0:
        return "chattr not available here: skipped"
    try:
        time.sleep(seconds)
    finally:
        subprocess.run(["chattr", "-i", *files], capture_output=True)
    return f"{len(files)} files read-only for {seconds:.0f} s, restored"


def garbage(port: int, count: int, seconds: float) -> None:
    rnd = random.Random(7)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(count):
            s.sendto(bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 60))), ("127.0.0.1", port))
            time.sleep(seconds / count)


def tcp_flood(port: int, connections: int, hold: float) -> int:
    """`connections` from 40 addresses (127.0.0.21..60, so that tcp_max_per_client does not stop them first)."""
    socks = []
    for i in range(connections):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=2,
                                                  source_address=(f"127.0.0.{21 + i % 40}", 0)))
        except OSError:
            break
    time.sleep(hold)
    for s in socks:
        s.close()
    return len(socks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=120)
    ap.add_argument("--qps", type=int, default=4000)
    ap.add_argument("--abuse-seconds", type=int, default=30, help="the abuse phase after the soak (0: none)")
    ap.add_argument("--abuse-qps", type=int, default=200, help="the well-behaved client's rate in it")
    args = ap.parse_args()
    need("dnsperf", "unbound")
    work = Path(tempfile.mkdtemp(prefix="sinkhole-soak-"))
    queries = work / "queries.txt"
    write_queries(queries)
    upstream = Unbound(work).start()
    db = work / "soak.db"
    silent = abuse.tarpit()  # the upstream of zone slow.test: never answers
    rpz_port = free_port()
    sink = Sinkhole(db, ["--upstream", f"127.0.0.1:{upstream.port}"],
                    # the load generators (dnsperf, the well-behaved client) are 127.0.0.1, exempt from rate limits as
                    # loopback is by default; the abusers get the limits a workstation would
                    env={"SINKHOLE_TCP_MAX_CLIENTS": "500", "SINKHOLE_ALLOW_CLIENTS": "127.0.0.0/26",
                         "SINKHOLE_RATE_LIMIT_EXEMPT": "127.0.0.1/32",
                         "SINKHOLE_FORWARD_ZONES": f"slow.test=127.0.0.1:{silent.getsockname()[1]}",
                         "SINKHOLE_RPZ_LISTEN": f"127.0.0.1:{rpz_port}", "SINKHOLE_RPZ_SECONDARIES": "127.0.0.1/32"},
                    ).start()
    assert sink.proc is not None
    rss = RssSampler(sink.proc.pid)
    rss.start()
    events: list[tuple[float, str]] = []
    t0 = time.monotonic()

    def at(fraction: float, what: str, fn, *a) -> threading.Thread:
        def run() -> None:
            time.sleep(max(0.0, args.seconds * fraction - (time.monotonic() - t0)))
            events.append((round(time.monotonic() - t0, 1), what))
            result = fn(*a)
            if result is not None:
                events.append((round(time.monotonic() - t0, 1), f"{what}: {result}"))

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    faults = [
        at(0.10, "upstream killed", upstream.stop),
        at(0.20, "upstream restored", lambda: upstream.start() and None),
        at(0.30, "database locked by another process for 5 s", lock_db, db, 5.0),
        at(0.42, "database made read-only", read_only, db, 5.0),
        at(0.55, "5000 garbage datagrams over 2 s", garbage, sink.port, 5000, 2.0),
        at(0.65, "TCP flood: 600 connections held 5 s (cap 500)", tcp_flood, sink.port, 600, 5.0),
    ]
    perf = dnsperf(sink.port, queries, args.seconds, qps=args.qps)
    for f in faults:
        f.join(30)
    phase = (abuse.run(sink.proc.pid, sink.port, rpz_port, "slow.test", args.abuse_seconds, args.abuse_qps, sink.lines)
             if args.abuse_seconds > 0 else None)
    code = sink.stop()
    silent.close()
    rss.stopping.set()
    upstream.stop()
    counts = sink.counts()
    m = re.search(r"\((\d+) workers, (\d+) restarts\)", "".join(sink.lines))
    restarts = int(m.group(2)) if m else 0  # one process (no supervisor): nothing to restart
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT count(*) FROM audit WHERE action = 'blocked'").fetchone()[0]
    integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    conn.close()
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "seconds": args.seconds, "target_qps": args.qps,
        "sent": perf["sent"], "answered": perf["completed"], "lost": perf["lost"], "qps": perf["qps"],
        "avg_latency_ms": round(perf["avg_latency_ms"], 3), "response_codes": perf["codes"],
        "blocked_answers": counts.get("blocked"), "audit_rows_blocked": rows,
        "audit_dropped": counts.get("audit_dropped"), "server_counts": counts, "exit_code": code,
        "integrity_check": integrity, "worker_restarts": restarts, "events": events,
        "rss_kb": rss.samples, "rss_kb_max": max((k for _, k in rss.samples), default=0),
        "abuse": phase, "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
        "server_errors": [line.rstrip() for line in sink.lines if " ERROR " in line or " CRITICAL " in line],
    }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"soak-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"soak {args.seconds} s at {args.qps} q/s target, loopback")
    for t, e in events:
        print(f"  t={t:6.1f}s  {e}")
    print(f"queries sent {report['sent']}, answered {report['answered']}, lost {report['lost']}, "
          f"{report['qps']} q/s, avg latency {report['avg_latency_ms']} ms")
    print(f"response codes {report['response_codes']}")
    print(f"blocked answers {report['blocked_answers']}, audit rows {rows}, audit dropped "
          f"{report['audit_dropped']}; integrity_check {integrity}; exit code {code}; worker restarts {restarts}")
    samples = rss.samples
    step = max(1, len(samples) // 10)
    print("RSS (s, KiB): " + ", ".join(f"{t:.0f}:{k}" for t, k in samples[::step]))
    if phase is not None:
        good = phase["well_behaved"]
        print(f"abuse phase, {phase['seconds']} s: the well-behaved client sent {good['sent']}, answered "
              f"{good['answered']}, unanswered {good['unanswered']}, rcodes {good['rcodes']}, "
              f"p50 {good['p50_ms']} ms, p99 {good['p99_ms']} ms, max {good['max_ms']} ms")
        print(f"  server fds {phase['server_fds']}, RSS KiB {phase['server_rss_kb']}, log lines "
              f"{phase['server_log_lines']} ({phase['server_warning_lines']} warnings)")
        for k, v in phase["abusers"].items():
            print(f"  {k}: {v}")
        print("  the server's warnings in the phase (the lines it wrote stand for these):")
        for k, v in phase["server_warnings_by_kind"].items():
            print(f"    {v:7d}  {k}")
    for line in report["server_errors"][:20]:
        print(f"server error: {line}")
    print(f"load average at the end {os.getloadavg()} on {os.cpu_count()} CPUs (the machine may be shared)")
    print(f"written {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
