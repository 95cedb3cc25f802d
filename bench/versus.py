"""This checkout's `sinkhole serve` against another checkout's, interleaved, on make bench's loads (a)-(d).

    .venv/bin/python bench/versus.py --other /path/to/other/.venv/bin/sinkhole [--rounds 3] [--seconds 6]
        [--loads a,b,c,d] [--workers 1] [--log-queries blocked|none] [--env-this K=V ...] [--fixed]

One local Unbound upstream; each server with a fresh database (the shipped lists), audit log on (blocked),
rate limits off, `--workers N` (1 unless told); dnsperf as bench.py runs it (loopback only, bounded by -l). For
each round, for each load, for each server: one run; the table shows the median q/s and q/CPU-s (the server's
process tree) of the rounds and the 1-minute load average at each run (the machine may be shared). Loads (c) and
(d) get new unique names in every round, the same for both servers. At the end each
server is stopped and its audit check printed (blocked answers = the sum of the audit rows' counts). Measures,
asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Sinkhole, Unbound, need

import bench


@dataclass
class Other(Sinkhole):
    """A Sinkhole started from another checkout's console script."""

    exe: str = ""

    def start(self) -> Other:
        real = sys.executable
        try:
            sys.executable = str(Path(self.exe).parent / "python")  # Sinkhole.start runs the `sinkhole` beside it
            super().start()
        finally:
            sys.executable = real
        return self


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--other", required=True, help="the other checkout's .venv/bin/sinkhole")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--loads", default="a,b")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--log-queries", default="blocked", choices=["blocked", "none"])
    ap.add_argument("--env-this", action="append", default=[], help="K=V for this checkout's server (SINKHOLE_PURE=1)")
    ap.add_argument("--fixed", action="store_true",
                    help=f"then one run per load and server at {bench.FIXED_QPS} q/s: p50 and p99 latency")
    args = ap.parse_args()
    need("dnsperf", "unbound")
    work = Path(tempfile.mkdtemp(prefix="sinkhole-versus-"))
    domains = bench.blocked_domains()
    files = bench.write_inputs(work, domains, args.seconds, max(1, args.rounds))  # (c), (d): new names each round
    upstream = Unbound(work, threads=1, extra='  local-data: "example.test. 300 IN AAAA 2001:db8::1"')
    upstream.start()
    assert upstream.proc is not None
    common_args = ["--upstream", f"127.0.0.1:{upstream.port}", "--log-level", "info", "--workers", str(args.workers),
                   "--log-queries", args.log_queries]
    this_env = {**bench.SINKHOLE_ENV, **dict(kv.split("=", 1) for kv in args.env_this)}
    servers: dict[str, Sinkhole] = {
        "other": Other(work / "other.db", common_args, env=dict(bench.SINKHOLE_ENV), ready_line=None, exe=args.other),
        "this": Sinkhole(work / "this.db", common_args, env=this_env, ready_line=None),
    }
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        for s in servers.values():
            s.start()
        for round_ in range(args.rounds):
            for load in args.loads.split(","):
                for name, s in servers.items():
                    if load in "bd":
                        bench.warm(s.port, files["b"][0])
                    res = bench.measure(s, upstream.proc.pid, files[load][round_], args.seconds, once=load in "cd")
                    res["loadavg"] = bench.os.getloadavg()[0]
                    results.setdefault((load, name), []).append(res)
                    print(f"  ({load}) {name:6} {res['qps']:>9,.0f} q/s {res['q_per_cpu_s'] or 0:>9,} q/CPU-s "
                          f"lost {res['lost']} load {res['loadavg']:.2f}", file=sys.stderr, flush=True)
        fixed = {}
        for load in args.loads.split(",") if args.fixed else []:
            for name, s in servers.items():
                res = bench.measure(s, upstream.proc.pid, files[load][0], args.seconds, qps=bench.FIXED_QPS)
                fixed[(load, name)] = res
                print(f"  fixed {bench.FIXED_QPS} q/s ({load}) {name:6} p50 {res['p50_ms']} ms, "
                      f"p99 {res['p99_ms']} ms, lost {res['lost']} load {bench.os.getloadavg()[0]:.2f}",
                      file=sys.stderr, flush=True)
        print(f"\n{'load':6}{'server':8}{'q/s':>10}{'q/CPU-s':>10}{'us CPU/q':>10}{'lost':>8}   "
              f"(median of {args.rounds} rounds of {args.seconds} s, --workers {args.workers}; 1-min load at each run)")
        for (load, name), runs in sorted(results.items()):
            qps = statistics.median(r["qps"] for r in runs)
            qcpu = statistics.median(r["q_per_cpu_s"] or 0 for r in runs)
            loads = ", ".join(f"{r['loadavg']:.2f}" for r in runs)
            print(f"({load})   {name:8}{qps:>10,.0f}{qcpu:>10,.0f}{1e6 / qcpu if qcpu else 0:>10.1f}"
                  f"{sum(r['lost'] or 0 for r in runs):>8}   load {loads}")
        for (load, name), res in sorted(fixed.items()):
            print(f"({load})   {name:8}at {bench.FIXED_QPS} q/s: p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, "
                  f"p99.9 {res['p999_ms']} ms, lost {res['lost']}")
    finally:
        for name, s in servers.items():
            if s.proc is not None:
                check = bench.audit_check(name, s)
                print(f"{name}: blocked answers {check['blocked_answers']}, audit sum of counts "
                      f"{check['audit_rows_blocked']} in {check['audit_rows_stored']} rows, equal {check['equal']}")
                for line in s.lines:
                    if "stopped:" in line:
                        print(f"  {name}: {line.strip()}")
        upstream.stop()


if __name__ == "__main__":
    main()
