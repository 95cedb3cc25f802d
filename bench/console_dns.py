"""Does a busy web console slow DNS? (a benchmark: it measures, it asserts nothing)

Runs `sinkhole serve` on the 10M-row database of `make bench-log` with the console on, and dnsperf at a fixed
rate of blocked names (answered by sinkhole itself; --log-queries none, so the bench database gets no rows),
twice: with the console idle, then with --clients threads signed in and asking, as fast as it answers, for the
heaviest log pages (a category no row has: a 0.4 s scan of the time index), a name's page and the dashboard.
With --workers 1 the console shares the DNS process (its own thread and loop); with 2, the supervisor's.

    python bench/console_dns.py --workers 1
    python bench/console_dns.py --workers 2 --qps 20000 --seconds 10

Loopback only; every load is bounded (dnsperf -l and -Q; the console clients stop when dnsperf does).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from common import Sinkhole, dnsperf, free_port, need, wait_port  # noqa: E402

from sinkhole.model import RuleKind  # noqa: E402
from sinkhole.store.accounts import Accounts  # noqa: E402
from sinkhole.store.db import Store  # noqa: E402
from sinkhole.store.journal import Actor  # noqa: E402
from sinkhole.web import sessions  # noqa: E402

PASSWORD = "bench password 123"


def console_load(url: str, stop: threading.Event, done: list[int], latencies: list[float]) -> None:
    http = httpx.Client(base_url=url, timeout=60)
    http.post("/api/login", json={"name": "bench", "password": PASSWORD}).raise_for_status()
    paths = [("/api/log", {"category": "none-such"}), ("/log", {"domain": "deepseek.com"}), ("/", {}),
             ("/api/log", {"client": "10.2.0.0/16"})]
    i = 0
    while not stop.is_set():
        path, params = paths[i % len(paths)]
        t = time.perf_counter()
        http.get(path, params=params)
        latencies.append(time.perf_counter() - t)
        done.append(1)
        i += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, default=Path("/tmp/sinkhole-logquery.db"))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--qps", type=int, default=10000)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=4, help="console clients asking at once")
    args = ap.parse_args()
    need("dnsperf")
    if not args.db.exists():
        sys.exit(f"no database at {args.db}: run `make bench-log` first")
    with Store(args.db) as store:
        accounts = Accounts(store)
        if accounts.user("bench") is None:
            accounts.add_user("bench", "admin", sessions.hash_password(PASSWORD), Actor(command="bench"))
        store.add_rules(RuleKind.BLOCK, ["deepseek.com"], actor=Actor(command="bench/console_dns.py"))
    data = Path("/tmp/sinkhole-console-dns.txt")
    data.write_text("".join(f"{p}.deepseek.com A\n" for p in ("chat", "api", "www", "cdn")))
    web = free_port()
    server = Sinkhole(args.db, ["--workers", str(args.workers), "--log-queries", "none", "--upstream", "127.0.0.1:9",
                                "--web-listen", f"127.0.0.1:{web}"]).start()
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "workers": args.workers,
                     "qps": args.qps, "seconds": args.seconds, "clients": args.clients}
    try:
        wait_port(web)
        time.sleep(2.0)  # the dashboard's first figures, computed at start, out of the way
        results["idle"] = {k: v for k, v in dnsperf(server.port, data, args.seconds, args.qps).items() if k != "raw"}
        stop, done, latencies = threading.Event(), [], []
        threads = [threading.Thread(target=console_load, args=(f"http://127.0.0.1:{web}", stop, done, latencies))
                   for _ in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        busy = dnsperf(server.port, data, args.seconds, args.qps)
        stop.set()
        for t in threads:
            t.join(120)
        results["busy"] = {k: v for k, v in busy.items() if k != "raw"}
        lat = sorted(latencies)
        results["console"] = {"requests": len(done), "median_s": lat[len(lat) // 2] if lat else None,
                              "max_s": lat[-1] if lat else None}
    finally:
        server.stop()
    for phase in ("idle", "busy"):
        r = results[phase]
        print(f"{phase:5} console: {r['qps']:>9,.0f} q/s answered of {args.qps:,}/s, lost {r['lost']}, latency avg "
              f"{r['avg_latency_ms']:.2f} ms (stddev {r['latency_stddev_ms']:.2f}, max {r['max_latency_ms']:.1f})")
    c = results["console"]
    print(f"console meanwhile: {c['requests']} requests from {args.clients} clients, median {c['median_s']:.3f} s, "
          f"max {c['max_s']:.3f} s")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"console-dns-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
