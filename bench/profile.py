"""Where a sinkhole worker's time goes under load: py-spy samples one worker while dnsperf sends.

    .venv/bin/python bench/profile.py [--load blocked|hot|unique] [--seconds 8] [--log-queries blocked|none]

Starts a local Unbound upstream and one sinkhole process (--workers 1, audit log as asked) on
127.0.0.1, runs dnsperf for --seconds, samples every thread of the server with py-spy (all in
the same run), and prints the functions with the most samples (own and inclusive), split into
the event loop thread and the audit writer thread. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import collections
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import Sinkhole, Unbound, dnsperf, need

from bench import blocked_domains, blocked_name, qtype


def names(load: str, n: int = 100_000) -> list[str]:
    rnd = random.Random(5)
    if load == "blocked":  # make bench's load (a): the shipped lists' names, most of them new to the answer memos
        domains = blocked_domains()
        return [f"{blocked_name(rnd, domains)} {qtype(rnd)}" for _ in range(n)]
    if load == "hot":
        return [f"h{rnd.randrange(200)}.example.test A" for _ in range(n)]
    return [f"u{i}.example.test A" for i in range(n)]


def summarize(raw: str, top: int) -> str:
    """py-spy --format raw: 'thread;frame;frame;... count' per line (frames outermost first)."""
    own: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = "audit writer" if any("audit/writer.py" in f and "_run" in f for f in frames) else (
            "shipping" if any("shipping.py" in f for f in frames) else "event loop / other")
        n = int(count)
        total[thread] += n
        own[thread][frames[-1]] += n
        for f in set(frames[1:]):
            incl[thread][f] += n
    out = []
    grand = sum(total.values()) or 1
    for thread, n in total.most_common():
        out.append(f"\n== {thread}: {n} samples ({100 * n / grand:.0f}% of all)")
        out.append("  own time:")
        for f, c in own[thread].most_common(top):
            out.append(f"    {100 * c / n:5.1f}%  {f}")
        out.append("  inclusive:")
        for f, c in incl[thread].most_common(top):
            out.append(f"    {100 * c / n:5.1f}%  {f}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", choices=["blocked", "hot", "unique"], default="blocked")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--log-queries", choices=["blocked", "all", "none"], default="blocked")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    need("dnsperf", "unbound")
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        sys.exit("bench: py-spy is missing: .venv/bin/pip install py-spy")
    work = Path(tempfile.mkdtemp(prefix="sinkhole-profile-"))
    upstream = Unbound(work)
    sink = Sinkhole(work / "p.db", ["--workers", "1", "--log-queries", args.log_queries, "--log-level", "info"],
                    ready_line=None)
    try:
        upstream.start()
        sink.args[:0] = ["--upstream", f"127.0.0.1:{upstream.port}"]
        sink.start()
        data = work / "q.txt"
        data.write_text("\n".join(names(args.load)) + "\n")
        if args.load == "hot":
            dnsperf(sink.port, data, 2)  # fill the cache first
        assert sink.proc is not None
        raw = work / "spy.txt"
        spy_proc = subprocess.Popen([spy, "record", "--pid", str(sink.proc.pid), "--duration", str(args.seconds),
                                     "--rate", "250", "--format", "raw", "--threads", "--output", str(raw),
                                     "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(dnsperf(sink.port, data, args.seconds)))
        t.start()
        t.join()
        spy_proc.wait(args.seconds + 30)
        print(f"load {args.load}, audit log {args.log_queries}, 1 worker: {result.get('qps') or 0:,.0f} q/s "
              f"(dnsperf on the same cores; sampling slows the server a little)")
        print(summarize(raw.read_text() if raw.exists() else "", args.top))
    finally:
        sink.kill()
        upstream.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
