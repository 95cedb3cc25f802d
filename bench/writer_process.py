"""The audit writer process alone: its CPU per answer for the same stream of hand-overs, from /proc-free rusage.

    .venv/bin/python bench/writer_process.py [--answers 200000] [--repeat 1] [--window 1.0] [--names spread|ordered]
        [--db PATH]

Builds a worker's audit log as `serve` does with its defaults (build.audit_log, own_process: an AuditProcess and its
forked writer process) on a fresh database in a temporary directory, and hands it --answers blocked answers as the
fast path does (submit_tally: rows of 100 answers with their new tags, every name new, each asked --repeat times in
a row), then closes it. The names are load (a)'s kind (`spread`): a label and a number under one of the shipped
blocked domains, which an index on rname (schema 6) took in no order, a page of it changed for nearly every row,
and the domain index of schema 7 takes at the end of a run per base domain; `ordered` names (n1.chat.deepseek.com,
n2..., as before 2026-12-07) go to the end of either. --db: write into that database (and its key file, made if there
is none) instead of a fresh one, e.g. a copy of a long log, whose size the cost of an index may depend on; its rows
stay. Prints the writer process's CPU (user and kernel, getrusage of the reaped child, so this process's pickling is
not counted) per answer and per row, and the wall time. Load (a)'s worst case without dnsperf, the event loops and
their noise: for A/B runs of the writer's own cost (bench/versus.py measures the whole server). Not a test: nothing
is asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # this checkout's package
sys.path.insert(1, str(Path(__file__).resolve().parent))  # bench.py, for load (a)'s names

import argparse  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import dns.message  # noqa: E402

import bench  # noqa: E402
from sinkhole.service import build, config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=1, help="answers per name, handed over one after the other")
    ap.add_argument("--window", type=float, default=1.0)
    ap.add_argument("--names", choices=["spread", "ordered"], default="spread")
    ap.add_argument("--db", type=Path, help="an existing database to write into (a copy: its rows stay)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # not the backpressure's warnings
    with tempfile.TemporaryDirectory(prefix="sinkhole-writer-process-") as tmp:
        cfg, _ = config.read(None, env={"SINKHOLE_AUDIT_WINDOW": str(args.window)})
        audit = build.audit_log(cfg, args.db or Path(tmp) / "audit.db", own_process=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        audit.start()
        wire = dns.message.make_query("x.chat.deepseek.com", "A").to_wire()
        now, tag, sent = time.time(), 0, 0
        rnd, domains = random.Random(1), bench.blocked_domains()
        started = time.perf_counter()
        while sent < args.answers:
            rows, new = [], []
            for _ in range(100 // args.repeat or 1):
                tag += 1
                name = (f"{rnd.choice(bench.LABELS)}{tag}.{rnd.choice(domains)}" if args.names == "spread"
                        else f"n{tag}.chat.deepseek.com")
                new.append((tag, (name, 1, "blocked", "deepseek.com", "deepseek", 0, "0.0.0.0", 3, "default", name,
                                  "shipped"), wire))
                for _ in range(args.repeat):
                    t = now + sent * 2e-5
                    rows.append((tag, "127.0.0.1", "udp", 1, t, t))
                    sent += 1
            audit.submit_tally(rows, new)
        audit.close(timeout=600)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        user, kernel = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
        print(f"answers {audit.written:,} in {audit.rows_written:,} rows (window {args.window:g} s, dropped "
              f"{audit.dropped}, {args.names} names): writer process CPU {(user + kernel) * 1e6 / sent:.1f} us an "
              f"answer (user {user * 1e6 / sent:.1f}, kernel {kernel * 1e6 / sent:.1f}), "
              f"{(user + kernel) * 1e6 / max(1, audit.rows_written):.1f} us a row; wall {wall:.2f} s")


if __name__ == "__main__":
    main()
