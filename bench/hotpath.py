"""Nanoseconds per Pipeline.begin() for the shapes of the hot path, in one process, no sockets.

For the commits that touch the query path (pipeline, codec, answer, cache, guard): run before and after and
compare the medians, interleaving runs of both trees (the machine is shared); `--instructions` counts the
CPU instructions per begin() under valgrind's callgrind instead (two runs of N and 2N calls, the difference
divided by N: start-up cancels out), which does not depend on the load. `make bench` measures the whole
server. Measures, asserts nothing.
    .venv/bin/python bench/hotpath.py [--rounds 7] [--n 200000] [--only SHAPE]
    .venv/bin/python bench/hotpath.py --instructions [--n 5000] [--only SHAPE]
With --audit the audit log is on (mode "blocked", as `serve` runs by default): blocked shapes then also pay for
their audit event and its queueing; the writer thread is not started and the queue is emptied between rounds.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dns.message
import dns.rrset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sinkhole.audit.writer import AuditLog
from sinkhole.dns.cache import key_of
from sinkhole.dns.codec import decode_query
from sinkhole.dns.upstream import Forwarder, Upstream
from sinkhole.model import RuleKind
from sinkhole.policy.decide import Policy
from sinkhole.service import build


def wire(name: str, qid: int = 1) -> bytes:
    """An A query with RD and an OPT record (1232 bytes, no DO), as dig sends it."""
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return (struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1) + qname + struct.pack("!HH", 1, 1)
            + b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0))


SHAPES = {
    "blocked, memo hit": lambda hit: [wire("r7.example", qid=i) for i in range(64)],
    "blocked, new names": lambda hit: [wire(f"x{i}.r{i % 1000}.example", qid=i) for i in range(20_000)],
    "cache hit": lambda hit: [bytes([i >> 8, i & 255]) + hit[2:] for i in range(64)],
    "bad query (QDCOUNT 0)": lambda hit: [bytes([0, i, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]) for i in range(64)],
}


def pipeline(tmp: str, audited: int = 0):
    """A pipeline as `serve` builds it (rate limits off: the bench is one client), over 1,000 block rules; with
    `audited`, the audit log on and room in its queue for that many rows (below a tenth of it: no slow-down)."""
    cfg = build.load(env={}, flags={"upstream": ("127.0.0.1:9",), "rate_limit": 0, "rate_limit_net": 0})
    policy = Policy([(f"r{i}.example", RuleKind.BLOCK.value, "bench") for i in range(1000)], version=1)
    # not started: nothing is written
    audit = AuditLog(Path(tmp) / "a.db", "bench", "blocked" if audited else "none", queue_size=11 * audited or 100,
                     seed=None)
    return build.pipeline(cfg, lambda: policy, Forwarder([Upstream("127.0.0.1", 9)]), audit)


def cache_hit(p) -> bytes:
    """Stores an answer for cached.example and returns its query."""
    q = wire("cached.example")
    r = dns.message.make_response(dns.message.from_wire(q))
    r.answer.append(dns.rrset.from_text("cached.example.", 3600, "IN", "A", "192.0.2.1"))
    query = decode_query(q)
    p.cache.put(key_of(query), query, r.to_wire(), time.monotonic())
    return q


def instructions(args: argparse.Namespace) -> None:
    """Instructions per begin() under callgrind: the runs of n and 2n calls differ by n calls and nothing else."""
    print(f"{'shape':24} instructions/begin (callgrind, {args.n} calls)")
    for name in SHAPES:
        if args.only and not name.startswith(args.only):
            continue
        counts = []
        for n in (args.n, 2 * args.n):
            run = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                                  __file__, "--rounds", "1", "--n", str(n), "--only", name,
                                  *(["--audit"] if args.audit else [])],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONHASHSEED": "0"})  # the same dict layouts every run
            counts.append(int(re.search(r"Collected : (\d+)", run.stderr).group(1)))
        print(f"{name:24} {(counts[1] - counts[0]) / args.n:8.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=None, help="calls per round [200000; 5000 with --instructions]")
    ap.add_argument("--only", default=None, help="one shape (a prefix of its name)")
    ap.add_argument("--instructions", action="store_true", help="count instructions with valgrind's callgrind")
    ap.add_argument("--audit", action="store_true", help="with the audit log on (mode blocked)")
    args = ap.parse_args()
    if args.instructions:
        args.n = args.n or 5000
        instructions(args)
        return
    args.n = args.n or 200_000
    with tempfile.TemporaryDirectory() as tmp:
        p = pipeline(tmp, args.n if args.audit else 0)
        hit_q = cache_hit(p)
        print(f"{'shape':24} median ns/begin over {args.rounds} rounds of {args.n}, audit log "
              f"{'on' if args.audit else 'off'}")
        for name, make in SHAPES.items():
            if args.only and not name.startswith(args.only):
                continue
            packets = make(hit_q)
            begin, k = p.begin, len(packets)
            results = []
            for _ in range(args.rounds):
                if name == "blocked, new names":
                    p.set_answers(p.answers)  # the memos start empty each round
                t = time.perf_counter_ns()
                for i in range(args.n):
                    begin(packets[i % k], "127.0.0.1", "udp")
                results.append((time.perf_counter_ns() - t) / args.n)
                p.audit._queue._items.clear()  # what the writer would take, outside the timing (no writer here)
            print(f"{name:24} {statistics.median(results):8.0f}  (min {min(results):.0f})")


if __name__ == "__main__":
    main()
