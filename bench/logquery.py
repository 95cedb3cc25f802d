"""How fast `sinkhole log` and `stats` answer on a large audit log (a benchmark: it measures, it asserts nothing).

Builds an audit table of --rows rows (default 10,000,000) with the real schema and indexes: --days days
(30) of blocked queries, --clients clients (5,000; a few busy, most quiet), --names names (2,000 under
~40 registered domains), mixed actions, four client groups, chained rows with MACs of real size. Then
times the filtered queries an officer asks (each run --repeat times, first and best reported), and the
insert rate of the writer's batches with the shipped indexes and with each --extra-index.

    python bench/logquery.py                     # build /tmp/sinkhole-logquery.db (1-2 min), then query
    python bench/logquery.py --reuse             # query an existing database of the right size again
    python bench/logquery.py --rows 1000000      # smaller

Writes a table to stdout and JSON to bench/results/logquery-<time>.json. Touches only files under /tmp
(or --db). A query is "fully consumed": every row fetched into Python, as `sinkhole log` does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sinkhole.policy.names import reverse_name  # noqa: E402
from sinkhole.store.db import Store  # noqa: E402
from sinkhole.store.schema import AUDIT_INSERT, iso  # noqa: E402

GENAI = ["chatgpt.com", "openai.com", "oaiusercontent.com", "claude.ai", "anthropic.com", "gemini.google.com",
         "perplexity.ai", "copilot.microsoft.com", "character.ai", "poe.com", "mistral.ai", "you.com",
         "huggingface.co", "cohere.com", "jasper.ai", "writesonic.com", "midjourney.com", "runwayml.com",
         "elevenlabs.io", "grok.com", "x.ai", "pi.ai", "phind.com", "quillbot.com", "notion.ai"]
DEEPSEEK = ["deepseek.com", "deepseek.ai"]
DOH = ["dns.google", "cloudflare-dns.com", "dns.quad9.net", "doh.opendns.com", "dns.adguard-dns.com",
       "doh.cleanbrowsing.org", "dns.nextdns.io", "mozilla.cloudflare-dns.com"]
CANARY = ["use-application-dns.net", "mask.icloud.com", "mask-h2.icloud.com", "resolver.arpa"]
SUBS = ["www", "api", "chat", "cdn", "static", "auth", "login", "files", "assets", "ws", "m", "app", "beta",
        "edge", "media", "upload", "gateway", "telemetry", "events", "img"]
GROUPS = ["staff", "finance", "legal", "it"]
# action, weight
ACTIONS = [("blocked", 80), ("forwarded", 8), ("cname-blocked", 3), ("ip-blocked", 2), ("canary", 2),
           ("cached", 3), ("servfail", 1), ("refused", 1)]


def names(count: int, rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(qname, rule, category, list) for `count` names under the registered domains above."""
    bases = ([(d, "genai") for d in GENAI] + [(d, "deepseek") for d in DEEPSEEK] + [(d, "doh-bypass") for d in DOH]
             + [(d, "canary") for d in CANARY])
    out = [(d, d, c, f"blocklists/{c}.txt") for d, c in bases]
    n = 0
    while len(out) < count:
        base, category = bases[n % len(bases)]
        sub = SUBS[(n // len(bases)) % len(SUBS)]
        deeper = n // (len(bases) * len(SUBS))
        qname = f"{sub}{deeper or ''}.{base}" if deeper < 3 else f"r{deeper}.{sub}.{base}"
        out.append((qname, base, category, f"blocklists/{category}.txt"))
        n += 1
    rng.shuffle(out)  # popularity (Zipf by position) not tied to the registered domain
    return out


def clients(count: int) -> list[tuple[str, str | None]]:
    """(address, group): four sites (/16), ten /24s each; 3% IPv6; one client in 20 in no group."""
    out = []
    per_site = max(1, count // 4)
    for i in range(count):
        site = min(i // per_site, 3)
        j = i % per_site
        address = (f"2001:db8:{site + 1}::{j:x}" if i % 33 == 0
                   else f"10.{site}.{j // 125}.{j % 125 + 10}")
        out.append((address, None if i % 20 == 7 else GROUPS[site]))
    return out


def zipf(n: int, s: float) -> list[float]:
    acc, cum = 0.0, []
    for i in range(n):
        acc += 1.0 / (i + 1) ** s
        cum.append(acc)
    return cum


def generate(rows: int, days: int, n_clients: int, n_names: int, end: datetime,
             seed: int = 42) -> Iterator[tuple]:
    """Audit rows in AUDIT_INSERT order, time ascending (as the writer stores them)."""
    rng = random.Random(seed)
    name_pool = [(q, r, c, lst, reverse_name(q)) for q, r, c, lst in names(n_names, rng)]
    client_pool = clients(n_clients)
    rng.shuffle(client_pool)  # busy clients anywhere, not all in site 0
    name_cum, client_cum = zipf(len(name_pool), 1.0), zipf(len(client_pool), 0.8)
    action_names = [a for a, _ in ACTIONS]
    action_cum = list(zip(*ACTIONS, strict=True))[1]
    macs = [os.urandom(32).hex() for _ in range(4096)]
    chains = [f"ns1#{g}#{os.urandom(8).hex()}" for g in range(4)]
    start = (end - timedelta(days=days)).timestamp()
    step = days * 86400 / rows
    chunk = 100_000
    qtypes = ["A", "AAAA", "HTTPS", "A", "A", "AAAA"]
    for base in range(0, rows, chunk):
        k = min(chunk, rows - base)
        ci = rng.choices(range(len(client_pool)), cum_weights=client_cum, k=k)
        ni = rng.choices(range(len(name_pool)), cum_weights=name_cum, k=k)
        ai = rng.choices(action_names, weights=action_cum, k=k)
        for j in range(k):
            i = base + j
            client, grp = client_pool[ci[j]]
            qname, rule, category, lst, rname = name_pool[ni[j]]
            action = ai[j]
            if category == "canary":
                action = "canary"
            elif action == "canary":
                action = "blocked"
            forwarded = action in ("forwarded", "cached", "servfail", "refused")
            yield (iso(start + i * step), client, "udp" if i % 9 else "tcp", qname, qtypes[i % 6], action,
                   None if forwarded else rule, None if forwarded else category,
                   "SERVFAIL" if action == "servfail" else "NOERROR",
                   "192.0.2.7" if forwarded else "0.0.0.0", 42, "127.0.0.1:53" if forwarded else None,
                   0.2 + (i % 50) / 10, "ns1", grp, qname, None if forwarded else lst, rname, 1,  # count
                   chains[i % 4], i // 4, macs[i & 4095])


def build(path: Path, args: argparse.Namespace, end: datetime) -> float:
    """A new database at `path` with the real schema (Store), filled in one transaction; seconds taken."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    Store(path).close()  # schema and indexes exactly as the server makes them
    conn = sqlite3.connect(str(path))
    conn.execute("PRAGMA journal_mode=OFF")  # a scratch file: no journal while filling it
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-2000000")  # 2 GB: the random-order indexes stay in memory while filling
    # the indexes are made again after the fill, from their own SQL: sorting once beats 10M random inserts
    indexes = [r[0] for r in conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit' AND sql IS NOT NULL")]
    for name, in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit'"
                              " AND sql IS NOT NULL").fetchall():
        conn.execute(f"DROP INDEX [{name}]")
    sql = f"INSERT INTO audit ({', '.join(AUDIT_INSERT)}) VALUES ({', '.join('?' for _ in AUDIT_INSERT)})"
    began = time.perf_counter()
    deadline = began + args.build_limit
    done = 0
    conn.execute("BEGIN")
    gen = generate(args.rows, args.days, args.clients, args.names, end)
    while done < args.rows:
        batch = [row for _, row in zip(range(500_000), gen, strict=False)]
        if not batch:
            break
        conn.executemany(sql, batch)
        done += len(batch)
        elapsed = time.perf_counter() - began
        print(f"  {done:>11,} rows  {elapsed:6.1f} s  {done / elapsed:9,.0f} rows/s", file=sys.stderr)
        if time.perf_counter() > deadline:
            print(f"  build limit ({args.build_limit:.0f} s) reached: stopping at {done:,} rows", file=sys.stderr)
            break
    for index_sql in indexes:
        t = time.perf_counter()
        conn.execute(index_sql)
        print(f"  {index_sql}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    conn.execute("COMMIT")
    # no ANALYZE: the server never runs it, so the planner here works from the same (no) statistics
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    return time.perf_counter() - began


def timed(fn: Callable[[], object], repeat: int) -> dict:
    runs, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - t)
    return {"first_s": runs[0], "best_s": min(runs), "median_s": statistics.median(runs), "result": result}


def insert_rate(path: Path, rows: int, extra: list[list[str]], end: datetime) -> float:
    """Rows/s of the writer's way of inserting (Store.insert_audit, batches of 500, WAL, synchronous=NORMAL)
    into a fresh database that already holds `rows` rows, with `extra` indexes on top of the shipped ones."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    store = Store(path)
    try:
        for cols in extra:
            store.db["audit"].create_index(cols, if_not_exists=True)
        data = list(generate(rows * 2, 1, 5000, 2000, end, seed=7))
        store.insert_audit(data[:rows])  # the indexes are not empty: inserts land among existing keys
        measured = data[rows:]
        began = time.perf_counter()
        for i in range(0, len(measured), 500):
            store.insert_audit(measured[i:i + 500])
        return len(measured) / (time.perf_counter() - began)
    finally:
        store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, default=Path("/tmp/sinkhole-logquery.db"))
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--clients", type=int, default=5000)
    ap.add_argument("--names", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="query --db as it is if it holds --rows rows")
    ap.add_argument("--build-limit", type=float, default=150.0, help="stop filling after this many seconds")
    ap.add_argument("--insert-rows", type=int, default=100_000, help="rows per insert-rate measurement (0: skip)")
    ap.add_argument("--extra-index", action="append", default=[], metavar="COL[,COL]",
                    help="an index to measure the insert cost of (repeatable), e.g. category,time")
    ap.add_argument("--skip-queries", action="store_true")
    args = ap.parse_args()

    end = datetime(2026, 11, 22, tzinfo=UTC)  # fixed: the same rows, the same answers, every run
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version}, "rows": args.rows, "days": args.days, "queries": {}}
    have = 0
    if args.reuse and args.db.exists():
        conn = sqlite3.connect(str(args.db))
        have = conn.execute("SELECT max(seq) FROM audit").fetchone()[0] or 0
        conn.close()
    if have != args.rows:
        print(f"building {args.rows:,} rows in {args.db} ...", file=sys.stderr)
        results["build_s"] = build(args.db, args, end)
    results["db_bytes"] = args.db.stat().st_size

    if not args.skip_queries:
        store = Store(args.db)
        day_start, day_end = iso_day(end - timedelta(days=3))
        busiest = store.conn.execute(
            "SELECT client FROM audit WHERE time >= ? AND time < ? GROUP BY client ORDER BY count(*) DESC LIMIT 1",
            (day_start, day_end)).fetchone()[0]
        typical = "10.2.3.50"
        day = {"since": day_start, "until": day_end}

        def rows(**kw: object) -> int:  # every row fetched into Python, as `sinkhole log` does
            return sum(1 for _ in store.query_log(**kw))  # type: ignore[arg-type]

        def count(**kw: object) -> int:  # the same filter, counted in SQLite: the index work alone
            return store.count_log(**kw)  # type: ignore[arg-type]

        # (label, function): full fetches where the answer is a page or a few thousand rows; counts and
        # the latest 100 where it is hundreds of thousands (fetching those is bound by Python, ~6-20 us a row)
        queries: list[tuple[str, Callable[[], object]]] = [
            ("one day: count", lambda: count(**day)),
            ("one day: latest 100", lambda: rows(**day, limit=100)),
            ("one day: every row fetched", lambda: rows(**day)),
            (f"one client ({typical}), 30 days: every row", lambda: rows(client=typical)),
            ("one client, one day: every row", lambda: rows(**day, client=typical)),
            (f"busiest client ({busiest}), 30 days: count", lambda: count(client=busiest)),
            ("busiest client, 30 days: latest 100", lambda: rows(client=busiest, limit=100)),
            ("domain deepseek.com + subdomains, 30 days: count", lambda: count(domain="deepseek.com")),
            ("domain deepseek.com, 30 days: latest 100", lambda: rows(domain="deepseek.com", limit=100)),
            ("domain deepseek.com, one day: count", lambda: count(**day, domain="deepseek.com")),
            ("domain chat.deepseek.com, one day: every row", lambda: rows(**day, domain="chat.deepseek.com")),
            ("CIDR 10.2.3.0/24, one day: every row", lambda: rows(**day, client="10.2.3.0/24")),
            ("CIDR 10.2.3.0/24, 30 days: count", lambda: count(client="10.2.3.0/24")),
            ("CIDR 10.2.0.0/16, one day: count", lambda: count(**day, client="10.2.0.0/16")),
            ("CIDR 10.2.0.0/16, one day: latest 100", lambda: rows(**day, client="10.2.0.0/16", limit=100)),
            ("category doh-bypass, 30 days: count", lambda: count(category="doh-bypass")),
            ("category doh-bypass, one day: count", lambda: count(**day, category="doh-bypass")),
            ("category doh-bypass, 30 days: latest 100", lambda: rows(category="doh-bypass", limit=100)),
            ("group legal, 30 days: count", lambda: count(group="legal")),
            ("group legal, one day: count", lambda: count(**day, group="legal")),
            ("group legal, 30 days: latest 100", lambda: rows(group="legal", limit=100)),
            ("stats, one day", lambda: store.stats(day_start, day_end)["totals"]["blocked"]),
        ]
        print(f"\n{'query':48} {'rows':>9} {'first s':>8} {'best s':>8}")
        for label, fn in queries:
            r = timed(fn, args.repeat)
            results["queries"][label] = r
            print(f"{label:48} {r['result']:>9,} {r['first_s']:8.3f} {r['best_s']:8.3f}", flush=True)
        results["plans"] = {label: plan(store, sql) for label, sql in (
            ("category", "SELECT * FROM audit WHERE category = 'doh-bypass'"),
            ("group", "SELECT * FROM audit WHERE grp = 'legal'"),
            ("cidr", "SELECT * FROM audit WHERE client >= '10.2.3.' AND client < '10.2.3/'"))}
        store.close()

    if args.insert_rows:
        ins = tmp_sibling(args.db, "-insert.db")
        results["insert_rows_per_s"] = {"shipped indexes": insert_rate(ins, args.insert_rows, [], end)}
        for spec in args.extra_index:
            results["insert_rows_per_s"][f"+ ({spec})"] = insert_rate(ins, args.insert_rows, [spec.split(",")], end)
        print(f"\n{'insert (batches of 500, WAL)':48} {'rows/s':>9}")
        for label, rate in results["insert_rows_per_s"].items():
            print(f"{label:48} {rate:>9,.0f}")

    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"logquery-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out}", file=sys.stderr)


def iso_day(when: datetime) -> tuple[str, str]:
    start = when.replace(hour=0, minute=0, second=0, microsecond=0)
    return iso(start.timestamp()), iso((start + timedelta(days=1)).timestamp())


def tmp_sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.stem + suffix)


def plan(store: Store, sql: str) -> list[str]:
    return [r[3] for r in store.conn.execute("EXPLAIN QUERY PLAN " + sql)]


if __name__ == "__main__":
    main()
