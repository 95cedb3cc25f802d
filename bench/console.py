"""How fast the web console answers on a large audit log (a benchmark: it measures, it asserts nothing).

Uses the database `bench/logquery.py` builds (`make bench-log`: 10,000,000 rows over 30 days ending
2026-11-22), adds an admin account to it, serves the console on 127.0.0.1 (an ephemeral port, plain HTTP) in
this process, on its own thread and event loop as the server runs it, with its clock set to the log's last day
(so that "the last 24 hours" holds rows), and times pages and API calls with an HTTP client over loopback:
the first call and the median of --repeat more. Every time includes HTTP, the session check and rendering.

    python bench/console.py                 # after `make bench-log`
    python bench/console.py --db /tmp/other.db --repeat 5

Writes a table to stdout and JSON to bench/results/console-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from sinkhole.service import build  # noqa: E402
from sinkhole.service.process import bind_tcp as bind  # noqa: E402
from sinkhole.store.accounts import Accounts  # noqa: E402
from sinkhole.store.db import Store  # noqa: E402
from sinkhole.store.journal import Actor  # noqa: E402
from sinkhole.web import console, sessions  # noqa: E402
from sinkhole.web.limits import Service  # noqa: E402

LOG_END = datetime(2026, 11, 22, tzinfo=UTC)  # bench/logquery.py's fixed end: the same rows every run
PASSWORD = "bench password 123"


class ShiftedClock:
    """The `time` module as the console sees it, with the wall clock moved back to the log's end."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() - self.offset

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def timed(fn, repeat: int) -> dict:
    t = time.perf_counter()
    first = fn()
    runs = [time.perf_counter() - t]
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return {"first_s": runs[0], "median_s": statistics.median(runs[1:]) if repeat else runs[0],
            "max_s": max(runs[1:]) if repeat else runs[0], "status": getattr(first, "status_code", None),
            "bytes": len(getattr(first, "content", b""))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, default=Path("/tmp/sinkhole-logquery.db"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if not args.db.exists():
        sys.exit(f"no database at {args.db}: run `make bench-log` first")
    conn = sqlite3.connect(str(args.db))
    rows = conn.execute("SELECT max(seq) FROM audit").fetchone()[0] or 0
    conn.close()

    with Store(args.db) as store:
        accounts = Accounts(store)
        if accounts.user("bench") is None:
            accounts.add_user("bench", "admin", sessions.hash_password(PASSWORD), Actor(command="bench/console.py"))
    console.time = ShiftedClock(time.time() - LOG_END.timestamp() + 3600)  # type: ignore[attr-defined]
    cfg = build.load(env={}, flags={"web_listen": ("127.0.0.1:0",), "node": "bench"})
    sockets = bind([("127.0.0.1", 0)], "bench-web")
    port = sockets[0].getsockname()[1]
    app = console.Console(cfg, args.db)
    service = Service(app, sockets, "web-console")
    service.start()
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "rows": rows, "repeat": args.repeat,
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version(), "sqlite": sqlite3.sqlite_version},
                     "calls": {}}
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
        t = time.perf_counter()
        r = http.post("/api/login", json={"name": "bench", "password": PASSWORD})
        results["calls"]["POST /api/login (argon2id)"] = {"first_s": time.perf_counter() - t, "status": r.status_code}
        day = {"since": "2026-11-19T00:00:00Z", "until": "2026-11-20T00:00:00Z"}
        filters = [
            ("no filter", {}), ("one day", day), ("client 10.2.3.50", {"client": "10.2.3.50"}),
            ("client 10.2.3.0/24", {"client": "10.2.3.0/24"}), ("client 10.2.0.0/16", {"client": "10.2.0.0/16"}),
            ("deepseek.com and subdomains", {"domain": "deepseek.com"}),
            ("chat.deepseek.com", {"domain": "chat.deepseek.com"}), ("category doh-bypass", {"category": "doh-bypass"}),
            ("group legal, one day", {"group": "legal", **day}), ("action servfail", {"action": "servfail"}),
            ("rule deepseek.com", {"rule": "deepseek.com"}), ("a category no row has", {"category": "none-such"}),
        ]
        calls: list[tuple[str, object]] = [
            ("GET / (dashboard, 24 h: first computes the figures)", lambda: http.get("/")),
            ("GET /api/dashboard (figures cached)", lambda: http.get("/api/dashboard")),
        ]
        for label, params in filters:
            calls.append((f"GET /log: {label}", lambda p=params: http.get("/log", params=p)))
            calls.append((f"GET /api/log: {label}", lambda p=params: http.get("/api/log", params=p)))

            def next_page(p: dict = params, cursor: list = []) -> httpx.Response:  # noqa: B006 (the cursor, once)
                if not cursor:
                    cursor.append(http.get("/api/log", params=p).json()["next"])
                return http.get("/api/log", params={**p, "before": cursor[0]}) if cursor[0] else httpx.Response(204)

            next_page()  # the cursor of the second page: only the second page is timed
            calls.append((f"GET /api/log, next page: {label}", next_page))
        seq = rows // 2
        calls += [
            (f"GET /log/{seq} (a row, its rule and chain position)", lambda: http.get(f"/log/{seq}")),
            ("GET /changes", lambda: http.get("/changes")),
            ("GET /rules", lambda: http.get("/rules")),
            ("GET /lists", lambda: http.get("/lists")),
            ("GET /groups", lambda: http.get("/groups")),
            ("GET /check?name=chat.deepseek.com", lambda: http.get("/check", params={"name": "chat.deepseek.com"})),
            ("GET /requests", lambda: http.get("/requests")),
            ("GET /users", lambda: http.get("/users")),
        ]
        print(f"{'call':66} {'status':>6} {'first s':>8} {'median s':>9} {'max s':>7}", flush=True)
        for label, fn in calls:
            r = timed(fn, args.repeat)
            results["calls"][label] = r
            print(f"{label:66} {r['status']!s:>6} {r['first_s']:8.3f} {r['median_s']:9.3f} {r['max_s']:7.3f}",
                  flush=True)
        for label, params in (("export CSV: client 10.2.3.0/24, 30 days", {"client": "10.2.3.0/24"}),
                              ("export CSV: one day", day), ("export JSON Lines: one day", {**day, "format": "json"})):
            t = time.perf_counter()
            r = http.get("/api/log/export", params={"format": "csv", **params})
            took = time.perf_counter() - t
            lines = r.text.count("\n") - (1 if params.get("format", "csv") == "csv" else 0)
            results["calls"][label] = {"first_s": took, "rows": lines, "rows_per_s": lines / took,
                                       "bytes": len(r.content), "status": r.status_code}
            print(f"{label:66} {r.status_code:>6} {took:8.3f}  {lines:,} rows, {lines / took:,.0f} rows/s", flush=True)
        t = time.perf_counter()
        r = http.get("/api/report", params=day)
        results["calls"]["GET /api/report (one day)"] = {"first_s": time.perf_counter() - t, "status": r.status_code}
        print(f"{'GET /api/report (one day)':66} {r.status_code:>6} {time.perf_counter() - t:8.3f}")
    finally:
        service.stop()
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"console-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
