"""Side-by-side benchmark: sinkhole, dnsmasq and Unbound (1 and 2 threads); loopback only, bounded.

    .venv/bin/python bench/bench.py [--seconds 8] [--rounds 2] [--quick | --million-only] [--keep]

One local Unbound is the upstream of every server under test (it answers every name under
example.test itself and never recurses). Every server blocks the same domains (the shipped
lists deepseek, genai, genai-cn) and answers them with 0.0.0.0 / ::. Loads, interleaved
(for each round: for each load: for each server), at maximum throughput:

    (a) blocked names           subdomains of listed domains, varied labels
    (b) hot cache               200 allowed names (A and AAAA), warmed by one pass first
    (c) cache misses            a unique allowed name per query
    (d) mix                     5% blocked, 80% hot, 15% unique

then (a) and (b) at a fixed 20k q/s for latency percentiles (from dnsperf -v, one line per
query), the audit check (audit rows vs the server's own count of blocked answers) and,
unless --quick, the 1M-rule case (import, load and reload time, RSS; dnsmasq for comparison).

dnsperf runs on the same (2-core) machine and competes with the server for CPU: its options
are printed with the results. The table shows the median of the rounds; the JSON under
bench/results/ has every run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ROOT,
    Dnsmasq,
    Sinkhole,
    Unbound,
    cpu_seconds,
    dnsperf_cmd,
    latencies_ms,
    machine_busy_seconds,
    need,
    parse_dnsperf,
    per_process_kb,
    percentile,
    process_tree,
    pss_kb,
    query,
    reset_peak_rss,
    status_kb,
    stop_process,
    udp_rcvbuf_errors,
    unbound_forwarder_body,
    wait_dns,
)

LISTS = ["deepseek.txt", "genai.txt", "genai-cn.txt"]
CLIENTS, THREADS, OUTSTANDING = 4, 1, 200  # dnsperf -c, -T, -q (max-throughput runs)
FIXED_QPS = 20_000  # dnsperf -Q of the latency runs
UNIQUE_PER_SECOND = 150_000  # lines of the cache-miss files per second of run: dnsperf must not wrap (-n 1)
HOT_NAMES = 200
LOADS = {
    "a": "blocked",
    "b": "hot cache",
    "c": "cache miss",
    "d": "mix 5/80/15",
}
LABELS = ["www", "api", "chat", "cdn", "static", "auth", "m", "assets", "img", "ws", "edge", "app"]
SINKHOLE_ENV = {"SINKHOLE_RATE_LIMIT": "0", "SINKHOLE_RATE_LIMIT_NET": "0"}
MILLION = 1_000_000
THOUSAND = 1_000
NO_LOG = "sinkhole log none"
PURE = "sinkhole pure"  # SINKHOLE_PURE=1: the pure-Python twin of the compiled fast path (sinkhole.dns.fast)
NO_AGGREGATION = "sinkhole window 0"  # audit_window 0: one audit row per answer (load (a) only)
THREAD_WRITER = "sinkhole thread writer"  # audit_writer thread: each worker's writer a thread (load (a) only)
A_ONLY = (NO_LOG, NO_AGGREGATION, THREAD_WRITER)
PROBE = "reload-probe.test"


# ---------------------------------------------------------------- inputs


def blocked_domains() -> list[str]:
    """The domains of the lists under test: first token of every non-comment line, in order, once."""
    seen: dict[str, None] = {}
    for name in LISTS:
        for line in (ROOT / "blocklists" / name).read_text().splitlines():
            token = line.split("#", 1)[0].split()
            if token:
                seen.setdefault(token[0].lower().rstrip("."), None)
    return list(seen)


def qtype(rnd: random.Random) -> str:
    return "A" if rnd.random() < 0.5 else "AAAA"


def blocked_name(rnd: random.Random, domains: list[str]) -> str:
    x = rnd.random()
    domain = rnd.choice(domains)
    if x < 0.1:
        return domain
    if x < 0.6:
        return f"{rnd.choice(LABELS)}.{domain}"
    return f"{rnd.choice(LABELS)}{rnd.randrange(10_000)}.{domain}"


def hot_name(rnd: random.Random) -> str:
    return f"hot{rnd.randrange(HOT_NAMES)}.example.test"


def write_lines(path: Path, n: int, line: Callable[[int], str]) -> Path:
    with path.open("w") as f:
        for start in range(0, n, 100_000):
            f.write("".join(line(i) + "\n" for i in range(start, min(n, start + 100_000))))
    return path


def write_inputs(work: Path, domains: list[str], seconds: int, rounds: int) -> dict[str, list[Path]]:
    """dnsperf input files: per load, one file per round (the unique names differ between rounds)."""
    rnd = random.Random(1)
    blocked = write_lines(work / "a-blocked.txt", 200_000, lambda i: f"{blocked_name(rnd, domains)} {qtype(rnd)}")
    hot = [f"hot{i}.example.test {t}" for i in range(HOT_NAMES) for t in ("A", "AAAA")]
    rnd.shuffle(hot)
    (work / "b-hot.txt").write_text("\n".join(hot) + "\n")
    files: dict[str, list[Path]] = {"a": [blocked] * rounds, "b": [work / "b-hot.txt"] * rounds, "c": [], "d": []}
    n = seconds * UNIQUE_PER_SECOND
    for r in range(rounds):
        token = f"{r}{rnd.randrange(16**6):06x}"
        files["c"].append(write_lines(work / f"c-unique-{r}.txt", n,
                                      lambda i, t=token: f"u{i}-{t}.example.test {qtype(rnd)}"))

        def mixed(i: int, t: str = token) -> str:
            x = rnd.random()
            if x < 0.05:
                return f"{blocked_name(rnd, domains)} {qtype(rnd)}"
            if x < 0.85:
                return f"{hot_name(rnd)} {qtype(rnd)}"
            return f"m{i}-{t}.example.test {qtype(rnd)}"

        files["d"].append(write_lines(work / f"d-mix-{r}.txt", n, mixed))
    return files


# ---------------------------------------------------------------- servers


class Servers:
    """The servers under test by name, and everything this run started, to stop in reverse order."""

    def __init__(self) -> None:
        self.by_name: dict[str, Sinkhole | Dnsmasq | Unbound] = {}
        self.stoppers: list[Callable[[], object]] = []
        self.failed: dict[str, str] = {}

    def add(self, name: str, make: Callable[[], Sinkhole | Dnsmasq | Unbound], stop: Callable | None = None) -> None:
        try:
            server = make()
        except Exception as exc:
            self.failed[name] = f"did not start: {exc}"
            print(f"  {name}: did not start: {exc}", file=sys.stderr)
            return
        self.stoppers.append(stop or server.stop)
        self.by_name[name] = server

    def stop_all(self) -> None:
        while self.stoppers:
            try:
                self.stoppers.pop()()
            except Exception as exc:
                print(f"bench: stopping: {exc}", file=sys.stderr)


def serve_help() -> str:
    exe = Path(sys.executable).parent / "sinkhole"
    return subprocess.run([str(exe), "serve", "--help"], capture_output=True, text=True, timeout=30).stdout


def sinkhole_workers_option() -> bool:
    return "--workers" in serve_help()


def start_sinkhole(work: Path, name: str, upstream: int, extra: list[str], servers: Servers,
                   env: dict[str, str] | None = None) -> None:
    """A fresh database (it seeds the shipped lists), audit log on; ready once the port answers DNS.

    --log-level info, not warning: the audit check reads the 'stopped: ... blocked N; audit rows
    written W' line, logged at info. Nothing is logged per query at info.
    """
    sink = Sinkhole(work / f"{name.replace(' ', '')}.db",
                    ["--upstream", f"127.0.0.1:{upstream}", "--log-level", "info", *extra],
                    env={**SINKHOLE_ENV, **(env or {})}, ready_line=None)

    def make() -> Sinkhole:
        try:
            return sink.start()
        except Exception:
            sink.kill()
            raise

    servers.add(name, make, sink.kill)


def check_answers(port: int, domains: list[str]) -> str | None:
    """None if the server blocks a listed name with 0.0.0.0 / :: and forwards an allowed one; else what is wrong."""
    cases = [(f"check.{domains[0]}", "A", "0.0.0.0"), (f"check.{domains[-1]}", "AAAA", "::"),
             ("check.example.test", "A", "192.0.2.1"), ("check.example.test", "AAAA", "2001:db8::1")]
    for qname, qt, want in cases:
        try:
            rcode, addresses = query(port, qname, qt, timeout=2)
        except Exception as exc:
            return f"{qname} {qt}: {exc.__class__.__name__}"
        if addresses != [want]:
            return f"{qname} {qt}: {rcode} {addresses}, expected {want}"
    return None


# ---------------------------------------------------------------- measuring


def run_dnsperf(cmd: list[str], seconds: float) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    result = parse_dnsperf(proc.stdout)
    if result["completed"] is None:
        raise RuntimeError(f"dnsperf failed: {proc.stderr.strip() or proc.stdout.strip()}"[:500])
    return result


def warm(port: int, hot: Path) -> None:
    run_dnsperf(dnsperf_cmd(port, hot, 10, clients=1, threads=1, outstanding=20, extra=["-n", "1"]), 10)


def cpu_now(server_pid: int, upstream_pid: int) -> tuple[float, ...]:
    """(server tree, upstream, dnsperf and other reaped children, this script, whole machine) CPU seconds."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    return (cpu_seconds(server_pid), cpu_seconds(upstream_pid), children.ru_utime + children.ru_stime,
            me.ru_utime + me.ru_stime, machine_busy_seconds())


SETTLE_IDLE = 0.1  # a server is idle when its processes use less than this share of one core ...
SETTLE_STEP = 0.25  # ... over this many seconds
SETTLE_MAX = 60.0  # seconds settle waits at most


def settle(pid: int) -> float:
    """Wait until the server's processes are idle after a run (bounded: SETTLE_MAX), and return how long that
    took. The CPU a server spends after dnsperf ends (an audit writer catching up with what it was handed)
    is spent on the run's queries: it is counted in their q/CPU-s, and not left to slow the next server."""
    started = time.monotonic()
    last = cpu_seconds(pid)
    while time.monotonic() - started < SETTLE_MAX:
        time.sleep(SETTLE_STEP)
        now = cpu_seconds(pid)
        if now - last < SETTLE_IDLE * SETTLE_STEP:
            break
        last = now
    return time.monotonic() - started - SETTLE_STEP


def measure(server: Sinkhole | Dnsmasq | Unbound, upstream_pid: int, datafile: Path, seconds: int, *,
            qps: int | None = None, once: bool = False) -> dict:
    """One dnsperf run against one server: throughput, CPU of the server's process tree (until it is idle after
    the run: `settle`), peak RSS, latency.

    Also the CPU time of everything else on the machine during the run (`other_cpu_s`): other
    people's processes compete with the server and dnsperf for the same cores.
    """
    assert server.proc is not None
    pid = server.proc.pid
    extra = (["-n", "1"] if once else []) + (["-v"] if qps else [])
    cmd = dnsperf_cmd(server.port, datafile, seconds, qps=qps, clients=CLIENTS, threads=THREADS,
                      outstanding=OUTSTANDING, extra=extra)
    reset_peak_rss(pid)
    before = cpu_now(pid, upstream_pid)
    drops = udp_rcvbuf_errors()
    t0 = time.monotonic()
    r = run_dnsperf(cmd, seconds)
    wall = time.monotonic() - t0
    settled = settle(pid)
    drops = udp_rcvbuf_errors() - drops
    cpu, upstream_cpu, dnsperf_cpu, own_cpu, busy = (b - a for a, b in zip(before, cpu_now(pid, upstream_pid),
                                                                          strict=True))
    out = {k: r[k] for k in ("sent", "completed", "lost", "qps", "codes")}
    out.update(avg_ms=round(r["avg_latency_ms"], 3), max_ms=round(r["max_latency_ms"], 3), cpu_s=round(cpu, 2),
               q_per_cpu_s=round(r["completed"] / cpu) if cpu > 0 else None,
               peak_rss_kib=status_kb(pid, "VmHWM"), wall_s=round(wall, 2), upstream_cpu_s=round(upstream_cpu, 2),
               dnsperf_cpu_s=round(dnsperf_cpu, 2), udp_rcvbuf_drops=drops,
               other_cpu_s=round(max(0.0, busy - cpu - upstream_cpu - dnsperf_cpu - own_cpu), 2),
               settle_s=round(settled, 2))
    if qps:
        lat = latencies_ms(r["raw"])
        out.update(latencies=len(lat), p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99),
                   p999_ms=percentile(lat, 99.9))
    return out


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], fixed: dict | None) -> dict:
    codes: dict[str, int] = {}
    for r in runs:
        for k, v in r["codes"].items():
            codes[k] = codes.get(k, 0) + v
    return {
        "qps": median(runs, "qps"), "q_per_cpu_s": median(runs, "q_per_cpu_s"), "avg_ms": median(runs, "avg_ms"),
        "peak_rss_mib": (median(runs, "peak_rss_kib") or 0) / 1024, "lost": sum(r["lost"] or 0 for r in runs),
        "udp_rcvbuf_drops": sum(r["udp_rcvbuf_drops"] for r in runs),
        "codes": codes, "not_ok": sum(v for k, v in codes.items() if k != "NOERROR"),
        "p50_ms": fixed and fixed.get("p50_ms"), "p99_ms": fixed and fixed.get("p99_ms"),
        "fixed_lost": fixed and fixed.get("lost"),
    }


def audit_check(name: str, sink: Sinkhole) -> dict:
    """Stop the server (it reports its counts at SIGTERM) and compare them with the audit table."""
    code = sink.stop()
    counts = sink.counts()
    conn = sqlite3.connect(sink.db)
    try:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(audit)")}
        # a row with a count stands for that many identical answers (audit_window): completeness is the sum
        what = "coalesce(sum(coalesce(count, 1)), 0)" if "count" in columns else "count(*)"
        rows = conn.execute(f"SELECT {what} FROM audit WHERE action = 'blocked'").fetchone()[0]
        stored = conn.execute("SELECT count(*) FROM audit WHERE action = 'blocked'").fetchone()[0]
    finally:
        conn.close()
    stopped_lines = sum("stopped:" in line for line in sink.lines)
    blocked = counts.get("blocked")
    return {"server": name, "exit_code": code, "blocked_answers": blocked, "audit_rows_blocked": rows,
            "audit_rows_stored": stored,
            "audit_written": counts.get("audit_written"), "audit_dropped": counts.get("audit_dropped"),
            "equal": blocked == rows, "stopped_lines": stopped_lines, "server_counts": counts}


# ---------------------------------------------------------------- 1M rules


def million_rules(work: Path, upstream: int, upstream_pid: int) -> dict:
    """1M synthetic rules: sinkhole import, load and reload time and RSS; dnsmasq start time and RSS."""
    out: dict = {"rules": MILLION}
    last = f"r{MILLION - 1}.bench-rules.test"
    db = work / "bench-1m.db"
    code = textwrap.dedent(f"""
        import sys, time
        from sinkhole.store.db import Store
        domains = [f"r{{i}}.bench-rules.test" for i in range({MILLION})]
        t0 = time.perf_counter()
        store = Store(sys.argv[1])
        store.replace_category("bench-1m", [(d, "") for d in domains], "bench")
        store.close()
        print(time.perf_counter() - t0)
    """)
    print("1M rules: importing into a fresh sinkhole database ...", file=sys.stderr)
    proc = subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, text=True, timeout=900)
    if proc.returncode:
        return {**out, "error": f"import failed: {proc.stderr.strip()[-500:]}"}
    out["sinkhole_import_s"] = round(float(proc.stdout.split()[-1]), 2)
    out["sinkhole_db_mib"] = round(db.stat().st_size / 2**20, 1)

    rnd = random.Random(3)
    blocked = write_lines(work / "1m-blocked.txt", 200_000,
                          lambda i: f"{rnd.choice(LABELS)}.r{rnd.randrange(MILLION)}.bench-rules.test {qtype(rnd)}")
    # lookup cost: the same load shape against 1k and 1M rules (names spread over all the rules in force)
    blocked_1k = write_lines(work / "1k-blocked.txt", 200_000,
                             lambda i: f"{rnd.choice(LABELS)}.r{rnd.randrange(THOUSAND)}.bench-rules.test {qtype(rnd)}")
    db_1k = work / "bench-1k.db"
    subprocess.run([sys.executable, "-c", code.replace(str(MILLION), str(THOUSAND)), str(db_1k)], check=True,
                   capture_output=True, text=True, timeout=300)
    out["lookup"] = {}
    sink = Sinkhole(db, ["--upstream", f"127.0.0.1:{upstream}", "--log-level", "info"], env=SINKHOLE_ENV,
                    ready_line=None)
    t0 = time.monotonic()
    try:
        sink.start()  # returns once the port answers
        wait_dns(sink.port, last, timeout=120, proc=sink.proc, want="0.0.0.0")
        out["sinkhole_load_s"] = round(time.monotonic() - t0, 2)
        assert sink.proc is not None
        out["after_load"] = memory(sink.proc.pid)
        out["reload"] = reload_under_load(sink, blocked)
        out["after_reload"] = memory(sink.proc.pid)
        # a change that is not a named rule: the whole list imported again (one name more), read whole
        full = write_lines(work / "1m-plus-probe.txt", MILLION + 1,
                           lambda i: "full-probe.test" if i == MILLION else f"r{i}.bench-rules.test")
        out["full_reload"] = reload_under_load(sink, blocked, seconds=60, command=[
            "lists", "import", str(full), "--category", "bench-1m"], probe="full-probe.test")
        out["after_full_reload"] = memory(sink.proc.pid)
        out["lookup"]["sinkhole 1M"] = lookup_run(sink, upstream_pid, blocked)  # last: full speed grows queues
    finally:
        sink.kill()
    out["sinkhole_policy_log"] = [line.strip() for line in sink.lines if "policy version" in line]

    small = Sinkhole(db_1k, ["--upstream", f"127.0.0.1:{upstream}", "--log-level", "info"], env=SINKHOLE_ENV,
                     ready_line=None)
    try:
        small.start()
        wait_dns(small.port, "r999.bench-rules.test", timeout=60, proc=small.proc, want="0.0.0.0")
        out["lookup"]["sinkhole 1k"] = lookup_run(small, upstream_pid, blocked_1k)
    finally:
        small.kill()
    dm_small = Dnsmasq(work, upstream, [f"r{i}.bench-rules.test" for i in range(THOUSAND)])
    try:
        dm_small.start(wait=False)
        wait_dns(dm_small.port, "r999.bench-rules.test", timeout=60, proc=dm_small.proc, want="0.0.0.0")
        out["lookup"]["dnsmasq 1k"] = lookup_run(dm_small, upstream_pid, blocked_1k)
    finally:
        dm_small.stop()

    # dnsmasq has one address= line per answer type: 1M domains are 2M lines (0.0.0.0 and ::), as in the runs above
    print("1M rules: dnsmasq ...", file=sys.stderr)
    dm = Dnsmasq(work, upstream, [f"r{i}.bench-rules.test" for i in range(MILLION)])
    t0 = time.monotonic()
    try:
        dm.start(wait=False)
        wait_dns(dm.port, last, timeout=300, proc=dm.proc, want="0.0.0.0")
        out["dnsmasq_address_lines"] = 2 * MILLION
        out["dnsmasq_start_s"] = round(time.monotonic() - t0, 2)
        assert dm.proc is not None
        out["dnsmasq_rss_mib"] = mib(status_kb(dm.proc.pid, "VmRSS"))
        out["lookup"]["dnsmasq 1M"] = lookup_run(dm, upstream_pid, blocked)
    except Exception as exc:
        out["dnsmasq_error"] = str(exc)
    finally:
        dm.stop()
    return out


def lookup_run(server: Sinkhole | Dnsmasq, upstream_pid: int, datafile: Path, seconds: int = 6) -> dict:
    """Blocked names at full speed: queries/s and per server CPU-second (the lookup's share of the work)."""
    res = measure(server, upstream_pid, datafile, seconds)
    return {k: res[k] for k in ("qps", "q_per_cpu_s", "avg_ms", "lost", "cpu_s")}


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


def memory(pid: int) -> dict:
    """RSS of each process (supervisor first, then workers), their sum, PSS (shared pages once) and peak."""
    return {"rss_mib_per_process": [mib(k) for k in per_process_kb(pid)], "rss_mib_sum": mib(status_kb(pid)),
            "pss_mib_sum": mib(pss_kb(pid)), "peak_rss_mib_per_process": [mib(k) for k in per_process_kb(pid, "VmHWM")]}


def reload_under_load(sink: Sinkhole, blocked: Path, seconds: int = 30, qps: int = 5000, lead: float = 3.0,
                      command: list[str] | None = None, probe: str = "") -> dict:
    """Add one rule with the CLI (or run `command`) while dnsperf sends `qps` blocked names; time until the
    rule (`probe`) is in force.

    The load starts `lead` seconds before the change and runs `seconds` in all (bounded by -l), long
    enough to cover a reload of 1M rules; `covered` says whether it did.
    """
    cmd = dnsperf_cmd(sink.port, blocked, seconds, qps=qps, clients=CLIENTS, threads=THREADS, outstanding=OUTSTANDING)
    load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(lead)
        exe = Path(sys.executable).parent / "sinkhole"
        t0 = time.monotonic()
        probe = probe or PROBE
        cli = subprocess.run([str(exe), "--db", str(sink.db), *(command or ["block", "add", PROBE])],
                             capture_output=True, text=True, timeout=300)
        cli_s = time.monotonic() - t0
        result: dict = {"cli_exit": cli.returncode, "cli_s": round(cli_s, 2)}
        if cli.returncode:
            result["cli_error"] = cli.stderr.strip()[-300:]
        else:
            try:
                wait_dns(sink.port, probe, timeout=seconds, proc=sink.proc, want="0.0.0.0")
                reload_s = time.monotonic() - t0
                result.update(reload_s=round(reload_s, 2), covered=lead + reload_s < seconds)
            except RuntimeError as exc:
                result["reload_error"] = str(exc)
        stdout, _ = load.communicate(timeout=seconds + 60)
    finally:
        stop_process(load, signal.SIGINT)
    perf = parse_dnsperf(stdout)
    result.update(dnsperf_seconds=seconds, dnsperf_qps_limit=qps, expected=seconds * qps, sent=perf["sent"],
                  completed=perf["completed"], lost=perf["lost"], codes=perf["codes"],
                  avg_ms=round(perf["avg_latency_ms"], 3), max_ms=round(perf["max_latency_ms"], 1))
    return result


# ---------------------------------------------------------------- report


def version(cmd: list[str], pattern: str) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    m = re.search(pattern, p.stdout + p.stderr)
    return m.group(1) if m else "?"


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                         text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
        "dnsmasq": version(["dnsmasq", "--version"], r"Dnsmasq version (\S+)"),
        "unbound": version(["unbound", "-V"], r"Version (\S+)"),
        "dnsperf": version(["dnsperf", "-h"], r"Version (\S+)"),
        "sinkhole": version([str(Path(sys.executable).parent / "sinkhole"), "--version"], r"(\d[\w.+-]*)"),
        "git": git, "loadavg_at_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def noise(all_runs: list[dict], loadavg: str) -> str:
    """How much CPU processes other than the server, its upstream, dnsperf and this script took during the runs."""
    shares = sorted(r["other_cpu_s"] / r["wall_s"] for r in all_runs if r.get("wall_s"))
    if not shares:
        return ""
    worst = max(all_runs, key=lambda r: r["other_cpu_s"] / r["wall_s"] if r.get("wall_s") else 0)
    text = (f"other processes on the machine during the runs: median {statistics.median(shares):.0%} of one core, "
            f"max {shares[-1]:.0%} (({worst['load']}) {worst['server']}); load average at start {loadavg}")
    if statistics.median(shares) > 0.1:
        text += "\nWARNING: the machine was busy with other work; the numbers above are noisy, run again when idle"
    return text


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(summary: dict[str, dict[str, dict]]) -> str:
    head = (f"{'load':<16}{'server':<22}{'qps':>9}{'q/CPU-s':>9}{'avg ms':>8}{'p50 ms':>8}{'p99 ms':>8}"
            f"{'RSS MiB':>9}{'lost':>7}{'not OK':>8}{'/dnsmasq':>10}{'/unbound-2t':>12}{'CPU /dnsmasq':>14}"
            f"{'CPU /unb-2t':>13}")
    lines = [head, "-" * len(head)]
    for load, label in LOADS.items():
        rows = summary.get(load, {})
        base = {k: (rows.get(k) or {}).get("qps") for k in ("dnsmasq", "unbound-2t")}
        cpu = {k: (rows.get(k) or {}).get("q_per_cpu_s") for k in ("dnsmasq", "unbound-2t")}
        for name, s in rows.items():
            ratios = ""
            if name.startswith("sinkhole"):
                ratios = "".join(f"{s['qps'] / b:>{w}.2f}x" if b and s["qps"] else f"{'-':>{w + 1}}"
                                 for b, w in ((base["dnsmasq"], 9), (base["unbound-2t"], 11)))
                # the same ratios in queries per CPU-second of the server's processes (its audit writer included)
                ratios += "".join(f"{s['q_per_cpu_s'] / b:>{w}.2f}x" if b and s["q_per_cpu_s"] else f"{'-':>{w + 1}}"
                                  for b, w in ((cpu["dnsmasq"], 13), (cpu["unbound-2t"], 12)))
            lines.append(f"{f'({load}) {label}':<16}{name:<22}"
                         f"{fmt(s['qps'], ',.0f'):>9}{fmt(s['q_per_cpu_s'], ',.0f'):>9}"
                         f"{fmt(s['avg_ms'], '.2f'):>8}{fmt(s['p50_ms'], '.2f'):>8}{fmt(s['p99_ms'], '.2f'):>8}"
                         f"{s['peak_rss_mib']:>9.1f}{s['lost']:>7}{s['not_ok']:>8}{ratios}")
    return "\n".join(lines)


def million_text(m: dict) -> str:
    if "error" in m:
        return f"1M rules: {m['error']}"
    r = m.get("reload", {})

    def mem(d: dict) -> str:
        return (f"RSS per process {d.get('rss_mib_per_process')} MiB (sum {d.get('rss_mib_sum')}, PSS sum "
                f"{d.get('pss_mib_sum')})")

    lines = [
        f"1M rules, sinkhole: import {m.get('sinkhole_import_s')} s (db {m.get('sinkhole_db_mib')} MiB); "
        f"start until a listed name is blocked {m.get('sinkhole_load_s')} s",
        f"  after load: {mem(m.get('after_load', {}))}",
        f"  after reload: {mem(m.get('after_reload', {}))}; peak RSS per process "
        f"{m.get('after_reload', {}).get('peak_rss_mib_per_process')} MiB",
        f"  reload under load (dnsperf -Q {r.get('dnsperf_qps_limit')} -l {r.get('dnsperf_seconds')}, blocked names): "
        f"`block add` took {r.get('cli_s')} s; {PROBE} blocked "
        f"{r.get('reload_s', r.get('reload_error') or r.get('cli_error'))} s after the command started "
        f"({'within' if r.get('covered') else 'NOT within'} the load); dnsperf sent {r.get('sent')} of "
        f"{r.get('expected')}, completed {r.get('completed')}, lost {r.get('lost')}, max latency {r.get('max_ms')} ms",
    ]
    f = m.get("full_reload", {})
    if f:
        took = round(f["reload_s"] - f["cli_s"], 2) if "reload_s" in f else "?"
        when = f.get("reload_s", f.get("reload_error") or f.get("cli_error"))
        lines.append(
            f"  full reload under load (`lists import` of the 1M list plus one name, read whole): import took "
            f"{f.get('cli_s')} s; the new name blocked {when} s after the command started, so the reload took "
            f"{took} s; dnsperf sent {f.get('sent')} of {f.get('expected')}, completed {f.get('completed')}, "
            f"lost {f.get('lost')}, max latency {f.get('max_ms')} ms")
        lines.append(f"  after the full reload: {mem(m.get('after_full_reload', {}))}; peak RSS per process "
                     f"{m.get('after_full_reload', {}).get('peak_rss_mib_per_process')} MiB")
    for line in m.get("sinkhole_policy_log", []):
        lines.append(f"  server: {line.split(' - ')[-1]}")
    look = m.get("lookup", {})
    if look:
        lines.append("lookup cost, blocked names at full speed (dnsperf, 6 s each; sinkhole with its audit log):")
        for name in ("sinkhole 1k", "sinkhole 1M", "dnsmasq 1k", "dnsmasq 1M"):
            x = look.get(name)
            if x:
                lines.append(f"  {name:<12} {fmt(x['qps'], ',.0f'):>9} q/s {fmt(x['q_per_cpu_s'], ',.0f'):>9} q/CPU-s"
                             f"  avg {fmt(x['avg_ms'], '.2f')} ms  lost {x['lost']}")
        for who in ("sinkhole", "dnsmasq"):
            a, b = look.get(f"{who} 1k", {}).get("qps"), look.get(f"{who} 1M", {}).get("qps")
            if a and b:
                lines.append(f"  {who}: 1M rules answer at {b / a:.2f}x the rate of 1k rules")
    if "dnsmasq_error" in m:
        lines.append(f"1M rules, dnsmasq: {m['dnsmasq_error']}")
    else:
        lines.append(f"1M rules, dnsmasq ({m.get('dnsmasq_address_lines'):,} address= lines): start until a listed "
                     f"name is blocked {m.get('dnsmasq_start_s')} s; RSS {m.get('dnsmasq_rss_mib')} MiB")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=8, help="length of every dnsperf run [8]")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the max-throughput runs [2]")
    ap.add_argument("--quick", action="store_true", help="skip the 1M-rule case")
    ap.add_argument("--million-only", action="store_true", help="only the 1M-rule case (and its lookup cost)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, databases, inputs)")
    args = ap.parse_args()
    need("dnsperf", "unbound", "dnsmasq")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: KeyboardInterrupt, even if started with & in sh
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks below on SIGTERM too
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="sinkhole-bench-"))
    servers = Servers()
    try:
        report = run(args, work, servers)
    except RuntimeError as exc:  # a server or dnsperf failed in a way that voids the run
        sys.exit(f"bench: {exc}")
    except KeyboardInterrupt:
        print("bench: interrupted; stopping what it started", file=sys.stderr)
        sys.exit(130)
    finally:
        servers.stop_all()
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["duration_s"] = round(time.monotonic() - started)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"bench-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"written {out.relative_to(ROOT)} (run took {report['duration_s']} s)")


def run_million_only(work: Path, servers: Servers) -> dict:
    upstream = Unbound(work, threads=1, extra='  local-data: "example.test. 300 IN AAAA 2001:db8::1"')
    servers.stoppers.append(upstream.stop)
    upstream.start()
    assert upstream.proc is not None
    million = million_rules(work, upstream.port, upstream.proc.pid)
    print(million_text(million))
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), "million_rules": million}


def run(args: argparse.Namespace, work: Path, servers: Servers) -> dict:
    if args.million_only:
        return run_million_only(work, servers)
    domains = blocked_domains()
    facts = machine()
    print(f"inputs: {len(domains)} blocked domains; generating dnsperf files ...", file=sys.stderr)
    files = write_inputs(work, domains, args.seconds, args.rounds)
    hot = work / "b-hot.txt"

    upstream = Unbound(work, threads=1, extra='  local-data: "example.test. 300 IN AAAA 2001:db8::1"')
    servers.stoppers.append(upstream.stop)  # before start: a start that fails half-way is stopped too
    upstream.start()
    up = upstream.port
    assert upstream.proc is not None
    upstream_pid = upstream.proc.pid
    workers = sinkhole_workers_option()
    start_sinkhole(work, "sinkhole", up, [], servers)
    # the audit log's cost: the same server with no audit log, measured on load (a) only
    start_sinkhole(work, NO_LOG, up, ["--log-queries", "none"], servers)
    if workers:
        start_sinkhole(work, "sinkhole --workers 1", up, ["--workers", "1"], servers)
    if importlib.util.find_spec("sinkhole.dns.fast") is not None:  # a build without the fast path: no twin to run
        start_sinkhole(work, PURE, up, [], servers, env={"SINKHOLE_PURE": "1"})
    if "--audit-window" in serve_help():  # aggregation off: one row per answer, measured on load (a) only
        start_sinkhole(work, NO_AGGREGATION, up, ["--audit-window", "0"], servers)
    if workers and "--audit-writer" in serve_help():  # the writer a thread in each worker, as before issue 16
        start_sinkhole(work, THREAD_WRITER, up, ["--audit-writer", "thread"], servers)
    servers.add("dnsmasq", lambda: Dnsmasq(work, up, domains).start())
    for threads in (1, 2):
        body = unbound_forwarder_body(up, domains)
        servers.add(f"unbound-{threads}t", lambda t=threads, b=body: Unbound(work, threads=t, body=b).start())
    for name, server in list(servers.by_name.items()):
        problem = check_answers(server.port, domains)
        if problem:
            servers.failed[name] = f"wrong answer: {problem}"
            print(f"  {name}: excluded: {problem}", file=sys.stderr)
            del servers.by_name[name]
    names = list(servers.by_name)
    processes = {n: len(process_tree(s.proc.pid)) for n, s in servers.by_name.items() if s.proc is not None}
    print(f"servers: {', '.join(f'{n} :{s.port}' for n, s in servers.by_name.items())}; upstream :{up}",
          file=sys.stderr)

    def alive(name: str) -> bool:
        """False (and the server is no longer measured) once a server has exited; the upstream must not."""
        if upstream.proc is None or upstream.proc.poll() is not None:
            raise RuntimeError("the upstream Unbound exited: no result is meaningful")
        proc = servers.by_name[name].proc
        if proc is not None and proc.poll() is None:
            return True
        if name not in servers.failed:
            servers.failed[name] = f"exited with code {proc and proc.returncode} during the runs"
            print(f"  {name}: {servers.failed[name]}", file=sys.stderr)
        return False

    runs: list[dict] = []
    for r in range(args.rounds):
        for load in LOADS:
            for name in names:
                server = servers.by_name[name]
                if name in A_ONLY and load != "a":
                    continue
                if not alive(name):
                    continue
                if load in "bd":
                    warm(server.port, hot)
                res = measure(server, upstream_pid, files[load][r], args.seconds, once=load in "cd")
                if not alive(name):  # died during the run: the run does not count
                    continue
                runs.append({"round": r + 1, "load": load, "server": name, **res})
                print(f"  round {r + 1} ({load}) {name:<20} {res['qps'] or 0:>9,.0f} q/s  "
                      f"{res['q_per_cpu_s'] or 0:>8,} q/CPU-s  lost {res['lost']}  (CPU-s: server {res['cpu_s']}, "
                      f"dnsperf {res['dnsperf_cpu_s']}, upstream {res['upstream_cpu_s']}, other processes "
                      f"{res['other_cpu_s']}; busy {res['settle_s']} s after the run)", file=sys.stderr)
    fixed: list[dict] = []
    for load in "ab":
        for name in names:
            server = servers.by_name[name]
            if (name in A_ONLY and not (name == THREAD_WRITER and load == "a")) or not alive(name):
                continue
            if load == "b":
                warm(server.port, hot)
            res = measure(server, upstream_pid, files[load][0], args.seconds, qps=FIXED_QPS)
            if not alive(name):
                continue
            fixed.append({"load": load, "server": name, "qps_limit": FIXED_QPS, **res})
            print(f"  fixed {FIXED_QPS} q/s ({load}) {name:<20} p50 {fmt(res['p50_ms'], '.3f')} ms, "
                  f"p99 {fmt(res['p99_ms'], '.3f')} ms, lost {res['lost']}  (CPU-s of other processes "
                  f"{res['other_cpu_s']})", file=sys.stderr)

    summary: dict[str, dict[str, dict]] = {}
    for load in LOADS:
        for name in names:
            mine = [x for x in runs if x["load"] == load and x["server"] == name]
            if not mine:
                continue
            fx = next((x for x in fixed if x["load"] == load and x["server"] == name), None)
            summary.setdefault(load, {})[name] = summarize(mine, fx)

    audits = [audit_check(name, s) for name, s in servers.by_name.items()
              if isinstance(s, Sinkhole) and name != NO_LOG and alive(name)]
    million = None if args.quick else million_rules(work, up, upstream_pid)

    settings = (f"dnsperf -c {CLIENTS} -T {THREADS} -q {OUTSTANDING} -t 3 -l {args.seconds} on the same machine; "
                f"median of {args.rounds} round(s); p50/p99 from a {args.seconds} s run at -Q {FIXED_QPS} "
                f"(dnsperf -v); "
                f"RSS = peak (VmHWM) during the run, summed over the server's processes")
    print()
    print(f"sinkhole side-by-side benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
          f"{facts['nproc']} x {facts['cpu']}, "
          f"Linux {facts['kernel']}; sinkhole {facts['sinkhole']} ({facts['git']}), dnsmasq {facts['dnsmasq']}, "
          f"unbound {facts['unbound']}, dnsperf {facts['dnsperf']}, python {facts['python']}")
    print(settings)
    print(f"{len(domains)} blocked domains in every server; upstream: local Unbound, 1 thread; sinkhole: audit log on "
          f"(blocked), rate limits off, default workers = {processes.get('sinkhole', '?')} processes in all"
          f"{'' if workers else '; no --workers option in this build'}")
    print(table(summary))
    drops = sum(r["udp_rcvbuf_drops"] for r in runs)
    print(f"lost: no answer within 3 s (all rounds; the kernel dropped {drops} datagrams on full UDP receive buffers "
          f"during these runs); not OK: answers other than NOERROR (all rounds)")
    print(noise(runs + fixed, facts["loadavg_at_start"]))
    for x in fixed:
        if x["lost"]:
            print(f"fixed-rate run ({x['load']}) {x['server']}: {x['lost']} of {x['sent']} queries lost "
                  f"(not in its p50/p99)")
    for name, why in servers.failed.items():
        print(f"NOT MEASURED {name}: {why}")
    for a in audits:
        print(f"audit check {a['server']}: blocked answers {a['blocked_answers']}, answers in the audit log (sum of "
              f"counts) {a['audit_rows_blocked']} in {a['audit_rows_stored']} rows (written {a['audit_written']}, "
              f"dropped {a['audit_dropped']}): "
              f"{'EQUAL' if a['equal'] else 'NOT EQUAL'}; exit code {a['exit_code']}")
    for key, unit in (("qps", "q/s"), ("q_per_cpu_s", "q/CPU-s")):
        on, off, zero = (summary.get("a", {}).get(n, {}).get(key) for n in ("sinkhole", NO_LOG, NO_AGGREGATION))
        if on and off:
            print(f"audit log cost, load (a): {on:,.0f} {unit} with the audit log, {off:,.0f} without "
                  f"({100 * (1 - on / off):.0f}% fewer with it)"
                  + (f"; {zero:,.0f} with one row per answer (audit_window 0)" if zero else ""))
    if million is not None:
        print(million_text(million))
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": facts, "settings": settings,
        "args": vars(args), "dnsperf": {"clients": CLIENTS, "threads": THREADS, "outstanding": OUTSTANDING,
                                        "timeout_s": 3, "fixed_qps": FIXED_QPS},
        "blocked_domains": len(domains), "lists": LISTS, "servers": {n: s.port for n, s in servers.by_name.items()},
        "processes": processes,
        "failed": servers.failed, "summary": summary, "runs": runs, "fixed_rate_runs": fixed, "audit": audits,
        "million_rules": million,
    }


if __name__ == "__main__":
    main()
