"""CPU per answered query, split by thread (event loop / audit writer) and by user / kernel time.

    .venv/bin/python bench/threads.py [--rounds 3] [--seconds 8] [--log-queries blocked|none] [--load a|b|c|d]

Starts a local Unbound upstream and one `sinkhole serve` (2 workers unless --workers) on
127.0.0.1, then runs dnsperf with a load of bench.py (default (a), blocked names; (c) is a cache
miss per query, on names new in every round) --rounds times in a row against the same server,
so that its audit database grows from run to run. After each run it
prints the throughput, the database and WAL sizes, and the CPU time per answered query of the
workers' main threads (the event loop) and of the rest (the audit writer: the workers' other
threads, and their writer processes under audit_writer = process), as user and kernel time,
read from /proc/PID/task/TID/stat. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import need, process_tree

import bench

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(server_pid: int) -> dict[str, float]:
    """Seconds of CPU of the server's processes, by (workers' main threads | the rest: the audit writer threads
    or processes) x (user | kernel)."""
    out = {"loop user": 0.0, "loop kernel": 0.0, "writer user": 0.0, "writer kernel": 0.0}
    tree = process_tree(server_pid)
    for pid in tree:
        if pid == server_pid and len(tree) > 1:
            continue  # the supervisor: it answers nothing
        # a worker's audit writer process (audit_writer), started from audit_child or forked from its worker (a
        # child of a child of the supervisor): all its threads are the writer's
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            writer_process = (b"sinkhole.service.audit_child" in Path(f"/proc/{pid}/cmdline").read_bytes()
                              or (pid != server_pid and parent != server_pid))
        except (OSError, IndexError, ValueError):
            continue
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            role = "loop" if int(task.name) == pid and not writer_process else "writer"
            out[f"{role} user"] += int(fields[11]) / TICK
            out[f"{role} kernel"] += int(fields[12]) / TICK
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--log-queries", default="blocked", choices=["blocked", "none"])
    ap.add_argument("--load", default="a", choices=["a", "b", "c", "d"])
    args = ap.parse_args()
    need("dnsperf", "unbound")
    work = Path(tempfile.mkdtemp(prefix="sinkhole-threads-"))
    servers = bench.Servers()
    try:
        files = bench.write_inputs(work, bench.blocked_domains(), args.seconds, args.rounds)
        upstream = bench.Unbound(work, threads=1, extra='  local-data: "example.test. 300 IN AAAA 2001:db8::1"')
        servers.stoppers.append(upstream.stop)
        upstream.start()
        assert upstream.proc is not None
        bench.start_sinkhole(work, "s", upstream.port, ["--workers", str(args.workers), "--log-queries",
                                                        args.log_queries], servers)
        server = servers.by_name["s"]
        assert server.proc is not None
        print(f"sinkhole --workers {args.workers} --log-queries {args.log_queries}; load ({args.load}), "
              f"{args.seconds} s per round; microseconds of CPU per answered query")
        for r in range(args.rounds):
            before = thread_cpu(server.proc.pid)
            res = bench.measure(server, upstream.proc.pid, files[args.load][r], args.seconds)
            after = thread_cpu(server.proc.pid)
            n = max(1, res["completed"])
            sizes = {p.name.removeprefix("s.db").lstrip("-") or "db": p.stat().st_size / 2**20
                     for p in work.glob("s.db*") if p.name in ("s.db", "s.db-wal")}
            per = "  ".join(f"{k} {(after[k] - before[k]) * 1e6 / n:5.1f}" for k in after)
            total = sum(after[k] - before[k] for k in after) * 1e6 / n
            print(f"round {r + 1}: {res['qps']:>8,.0f} q/s  db {sizes.get('db', 0):4.0f} MiB, "
                  f"wal {sizes.get('wal', 0):4.0f} MiB  |  {per}  |  total {total:5.1f}  "
                  f"(lost {res['lost']}, other CPU {res['other_cpu_s']} s, busy {res['settle_s']} s after)", flush=True)
    finally:
        servers.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
