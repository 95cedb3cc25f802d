"""Asking the audit log questions: `log --group/--category/--rule`, CIDR through the client index,
`log --follow` as a live tail across writers, and `stats` with groups, categories and an hourly histogram."""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from sinkhole.cli import cli
from sinkhole.cli.stats import histogram
from sinkhole.policy.names import reverse_name
from sinkhole.store.audit import client_prefix
from sinkhole.store.db import Store
from sinkhole.store.schema import iso
from tests.conftest import ROOT, ask, audit_rows, wait_for


def run(db: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, ["--db", str(db), *args], catch_exceptions=False, env=env)


def row(when: str, client: str, qname: str, action: str = "blocked", rule: str | None = None,
        category: str | None = "genai", grp: str | None = None) -> dict:
    blocked = action != "forwarded"
    return {"time": when, "client": client, "transport": "udp", "qname": qname, "qtype": "A", "action": action,
            "rule": (rule or qname) if blocked else None, "category": category if blocked else None,
            "rcode": "NOERROR", "answer": "0.0.0.0", "policy_version": 1, "upstream": None, "latency_ms": 0.1,
            "node": "ns1", "grp": grp, "asked": qname, "list": "cli", "rname": reverse_name(qname)}


BASE = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
# label, minutes after BASE, client, qname, action, rule, category, group
ROWS = [
    ("a", 0, "10.1.2.3", "chat.deepseek.com", "blocked", "deepseek.com", "deepseek", "staff"),
    ("b", 10, "10.1.20.9", "chatgpt.com", "blocked", "chatgpt.com", "genai", "staff"),
    ("c", 20, "10.1.31.7", "dns.google", "blocked", "dns.google", "doh-bypass", "finance"),
    ("d", 70, "10.2.0.5", "use-application-dns.net", "canary", "use-application-dns.net", "canary", "finance"),
    ("e", 80, "2001:db8:0:5::9", "api.deepseek.com", "blocked", "deepseek.com", "deepseek", None),
    ("f", 130, "2001:db8:1::1", "claude.ai", "blocked", "claude.ai", "genai", "legal"),
    ("g", 140, "10.1.2.3", "example.org", "forwarded", None, None, "staff"),
]


@pytest.fixture
def logdb(db: Path) -> dict[str, str]:
    """ROWS in the audit log; returns label -> time."""
    times = {label: iso((BASE + timedelta(minutes=m)).timestamp()) for label, m, *_ in ROWS}
    store = Store(db)
    try:
        store.insert_audit([row(times[label], client, qname, action, rule, category, grp)
                            for label, _, client, qname, action, rule, category, grp in ROWS])
    finally:
        store.close()
    return times


def labels(db: Path, times: dict[str, str], *args: str) -> list[str]:
    result = run(db, "log", *args, "--format", "json")
    assert result.exit_code == 0, result.output
    by_time = {t: label for label, t in times.items()}
    return [by_time[json.loads(line)["time"]] for line in result.stdout.splitlines()]


# ---------------------------------------------------------------------------- filters


@pytest.mark.parametrize(("args", "expected"), [
    (("--group", "staff"), ["a", "b", "g"]),
    (("--group", "finance"), ["c", "d"]),
    (("--group", "nobody"), []),
    (("--category", "deepseek"), ["a", "e"]),
    (("--category", "doh-bypass"), ["c"]),
    (("--rule", "deepseek.com"), ["a", "e"]),
    (("--rule", "chat.deepseek.com"), []),  # the rule as stored, not a name under it
    (("--group", "staff", "--category", "genai"), ["b"]),
    (("--group", "staff", "--action", "forwarded"), ["g"]),
    (("--category", "deepseek", "--client", "2001:db8::/32"), ["e"]),
    (("--rule", "deepseek.com", "--domain", "api.deepseek.com"), ["e"]),
    (("--group", "staff", "--limit", "1"), ["g"]),
])
def test_group_category_rule_filters_combine(db, logdb, args, expected):
    assert labels(db, logdb, *args) == expected


def test_time_window_with_new_filters(db, logdb):
    assert labels(db, logdb, "--since", logdb["b"], "--until", logdb["f"], "--group", "finance") == ["c", "d"]
    assert labels(db, logdb, "--since", logdb["d"], "--category", "genai") == ["f"]


@pytest.mark.parametrize(("network", "expected"), [
    ("10.0.0.0/8", ["a", "b", "c", "d", "g"]),
    ("10.1.0.0/16", ["a", "b", "c", "g"]),
    ("10.1.16.0/20", ["b", "c"]),  # 10.1.16.0 - 10.1.31.255: not on an octet boundary
    ("10.1.24.0/21", ["c"]),
    ("10.1.2.0/24", ["a", "g"]),
    ("10.1.2.3/32", ["a", "g"]),
    ("0.0.0.0/0", ["a", "b", "c", "d", "g"]),
    ("2001:db8::/32", ["e", "f"]),
    ("2001:db8::/48", ["e"]),  # a zero hextet in the prefix: '::' may swallow it in the stored text
    ("2001:db8:1::/48", ["f"]),
    ("::/0", ["e", "f"]),
])
def test_cidr_matches_exactly(db, logdb, network, expected):
    assert labels(db, logdb, "--client", network) == expected


@pytest.mark.parametrize(("network", "prefix"), [
    ("10.0.0.0/8", "10."), ("10.1.0.0/16", "10.1."), ("10.1.2.0/24", "10.1.2."), ("10.1.16.0/20", "10.1."),
    ("8.0.0.0/7", None), ("2001:db8::/32", "2001:db8:"), ("2001:db8::/64", "2001:db8:"),
    ("2001:db8:1:2::/64", "2001:db8:1:2:"), ("::/0", None), ("::ffff:0:0/96", None),
])
def test_client_prefix_is_the_text_every_address_starts_with(network, prefix):
    assert client_prefix(network) == prefix


@pytest.mark.parametrize("network", ["10.1.0.0/16", "10.1.2.0/24", "10.0.0.0/8", "2001:db8::/32"])
def test_cidr_query_is_a_range_of_the_client_index(db, logdb, network):
    store = Store(db)
    try:
        where, args = store._log_where(None, None, network, None, None)
        plan = " ".join(r[3] for r in store.conn.execute(f"EXPLAIN QUERY PLAN SELECT * FROM audit{where}", args))
    finally:
        store.close()
    assert "idx_audit_client_time (client>? AND client<?)" in plan, plan


def _latest_steps(db: Path, client: str, rows: int) -> tuple[list[str], int]:
    """`rows` rows of `client` (then one of another client) in the log; the latest 3 of `client` as query_log gives
    them, and the SQLite VM instructions that took, in thousands (a progress handler called every 1,000)."""
    start = BASE.timestamp()
    store = Store(db)
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    try:
        store.insert_audit([row(iso(start + i), client, f"n{i}.chat.deepseek.com") for i in range(rows)]
                           + [row(iso(start + rows), "10.9.9.9", "last.chat.deepseek.com")])
        store.conn.set_progress_handler(count, 1000)
        names = [r["qname"] for r in store.query_log(client="10.0.0.1", limit=3)]
    finally:
        store.close()
    return names, steps[0]


@pytest.mark.parametrize("stored", ["10.0.0.1", "::ffff:10.0.0.1", "::ffff:a00:1"])
def test_a_clients_latest_rows_are_read_from_the_end_of_its_index_not_sorted(tmp_path, stored):
    """An IPv4 address, however its rows store it, is read back in time from the (client, time) index: its latest
    rows cost the same for a client of 200 rows or of 20,000. With the range of every mapped address its rows were
    sorted whole: the busiest client's latest 100 of a 10-million-row log took 1.36-1.52 s."""
    few, few_steps = _latest_steps(tmp_path / "few.db", stored, 200)
    many, many_steps = _latest_steps(tmp_path / "many.db", stored, 20_000)
    assert few == [f"n{i}.chat.deepseek.com" for i in (197, 198, 199)]
    assert many == [f"n{i}.chat.deepseek.com" for i in (19_997, 19_998, 19_999)]
    assert many_steps < few_steps + 5, (few_steps, many_steps)


def test_follow_with_until_is_a_usage_error(db, logdb):
    result = run(db, "log", "--follow", "--until", "1h")
    assert result.exit_code == 2
    assert "--until" in result.stderr and "Traceback" not in result.output


# ---------------------------------------------------------------------------- --follow


class Tail:
    """`python -m sinkhole log --follow ...` as a separate process; its stdout lines on a queue."""

    def __init__(self, db: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sinkhole", "--db", str(db), "log", "--follow", "--interval", "0.1", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def take(self, n: int, timeout: float = 10.0) -> list[str]:
        out, deadline = [], time.monotonic() + timeout
        while len(out) < n:
            try:
                out.append(self.lines.get(timeout=max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                break
        return out

    def nothing_more(self, wait: float = 0.6) -> bool:
        try:
            extra = self.lines.get(timeout=wait)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected line: {extra!r}")

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        code = self.proc.wait(10)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


@pytest.fixture
def tails() -> list[Tail]:
    started: list[Tail] = []
    yield started
    for t in started:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait(5)


def test_follow_prints_rows_from_several_writers_once_each_in_order_then_exits_0_on_sigterm(db, logdb, tails):
    tail = Tail(db, "--format", "json", "--limit", "2")
    tails.append(tail)
    first = [json.loads(x) for x in tail.take(2)]
    assert [r["qname"] for r in first] == ["claude.ai", "example.org"], "starts with the latest --limit rows"
    # two writers, each its own connection (as two worker processes have), committing in turn
    writers = [Store(db), Store(db)]
    try:
        now = iso(time.time())
        for i in range(6):
            writers[i % 2].insert_audit([row(now, f"10.9.0.{i}", f"n{i}.chatgpt.com")])
        got = [json.loads(x) for x in tail.take(6)]
        assert [r["qname"] for r in got] == [f"n{i}.chatgpt.com" for i in range(6)]
        seqs = [r["seq"] for r in first + got]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert tail.nothing_more()
        writers[0].insert_audit([row(now, "10.9.0.99", "late.chatgpt.com")])
        assert [json.loads(x)["qname"] for x in tail.take(1)] == ["late.chatgpt.com"]
    finally:
        for w in writers:
            w.close()
    code, err = tail.stop(signal.SIGTERM)
    assert code == 0 and "Traceback" not in err, err


def test_follow_applies_filters_and_ctrl_c_exits_0(db, logdb, tails):
    tail = Tail(db, "--format", "json", "--category", "deepseek", "--since", logdb["a"])
    tails.append(tail)
    assert [json.loads(x)["qname"] for x in tail.take(2)] == ["chat.deepseek.com", "api.deepseek.com"]
    store = Store(db)
    try:
        now = iso(time.time())
        store.insert_audit([row(now, "10.9.1.1", "chatgpt.com", category="genai"),
                            row(now, "10.9.1.2", "x.deepseek.com", rule="deepseek.com", category="deepseek"),
                            row(now, "10.9.1.3", "claude.ai", category="genai")])
    finally:
        store.close()
    assert [json.loads(x)["client"] for x in tail.take(1)] == ["10.9.1.2"]
    assert tail.nothing_more()
    code, err = tail.stop(signal.SIGINT)
    assert code == 0 and "Traceback" not in err, err


def test_follow_tails_a_running_server(make_server, stub, db, tails):
    s = make_server(upstream=(stub.address,))
    ask(s, "first.chat.deepseek.com")
    assert wait_for(lambda: len(audit_rows(db)) == 1)
    tail = Tail(db, "--format", "csv", "--domain", "deepseek.com")
    tails.append(tail)
    header, first = tail.take(2)
    assert header.startswith("seq,time,client") and "first.chat.deepseek.com" in first
    for i in range(3):
        ask(s, f"live{i}.chat.deepseek.com")
    ask(s, "chatgpt.com")  # blocked too, but not under --domain
    lines = tail.take(3)
    assert [line.split(",")[4] for line in lines] == [f"live{i}.chat.deepseek.com" for i in range(3)]
    assert tail.nothing_more()
    assert tail.stop()[0] == 0


def test_follow_table_prints_one_header(db, logdb, tails):
    tail = Tail(db, "--limit", "1")
    tails.append(tail)
    header, line = tail.take(2)
    assert header.split()[:3] == ["time", "client", "transport"]
    assert "example.org" in line
    store = Store(db)
    try:
        store.insert_audit([row(iso(time.time()), "10.9.2.2", "new.claude.ai")])
    finally:
        store.close()
    (new,) = tail.take(1)
    assert "new.claude.ai" in new and "time" not in new
    assert tail.stop()[0] == 0


# ---------------------------------------------------------------------------- stats


def test_stats_json_has_groups_categories_and_every_hour(db, logdb):
    result = run(db, "stats", "--since", "2026-11-20T08:30:00Z", "--until", "2026-11-20T12:00:00Z",
                 "--format", "json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["hourly"] == [{"hour": "2026-11-20T08:00:00Z", "blocked": 0},
                           {"hour": "2026-11-20T09:00:00Z", "blocked": 3},
                           {"hour": "2026-11-20T10:00:00Z", "blocked": 1},
                           {"hour": "2026-11-20T11:00:00Z", "blocked": 1}]
    assert s["by_group"] == [{"group": "staff", "blocked": 2, "clients": 2},
                             {"group": None, "blocked": 1, "clients": 1},
                             {"group": "finance", "blocked": 1, "clients": 1},
                             {"group": "legal", "blocked": 1, "clients": 1}]
    assert s["by_category"] == [{"category": "deepseek", "blocked": 2, "clients": 2},
                                {"category": "genai", "blocked": 2, "clients": 2},
                                {"category": "doh-bypass", "blocked": 1, "clients": 1}]
    # the keys stats had before stay as they were (and "rows": as many as the answers, each row counting one)
    assert s["totals"] == {"queries_logged": 7, "rows": 7, "blocked": 5, "clients": 5, "domains": 5,
                           "bypass_attempts": 2, "page_views": 0, "page_clients": 0}
    assert {"top_rules", "top_names", "top_clients", "bypass_clients", "since"} <= set(s)


def test_stats_table_draws_the_hourly_histogram_within_the_terminal(db, logdb):
    result = run(db, "stats", "--since", "2026-11-19T00:00:00Z", "--until", "2026-11-21T00:00:00Z",
                 env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "blocked by client group:" in text and "blocked by category:" in text
    chart = text[text.index("blocked per hour (UTC):"):].splitlines()[1:]
    bars = [line for line in chart if "┤" in line]
    assert len(bars) == 8
    assert all(len(line) <= 40 for line in chart), chart
    assert "█" in bars[-1] and bars[0].lstrip().startswith("3 ┤"), "the peak (3 an hour... a column) labelled"
    assert "one column = 2 hours" in text  # 48 hours in at most 28 columns


def test_histogram_cells_are_eighths_of_the_peak():
    hours = [{"hour": f"2026-11-20T{h:02d}:00:00Z", "blocked": b} for h, b in enumerate([0, 8, 4, 1])]
    lines = histogram(hours, width=10, height=1)
    assert lines[0] == "8 ┤ █▄▁"
    assert "2026-11-20 00h" in lines[1] and "2026-11-20 03h" in lines[1]


def test_stats_histogram_of_a_window_with_no_rows_is_zeros(db, logdb):
    s = json.loads(run(db, "stats", "--since", "2026-11-21T00:00:00Z", "--until", "2026-11-21T03:00:00Z",
                       "--format", "json").stdout)
    assert [h["blocked"] for h in s["hourly"]] == [0, 0, 0]


def test_stats_since_far_back_starts_the_histogram_at_the_first_row(db, logdb):
    s = json.loads(run(db, "stats", "--since", "1999-01-01", "--until", "2026-11-20T12:00:00Z",
                       "--format", "json").stdout)
    assert s["hourly"][0]["hour"] <= "2026-11-20T09:00:00Z" < s["hourly"][-1]["hour"]
    assert sum(h["blocked"] for h in s["hourly"]) == 5
    assert len(s["hourly"]) <= 24 * 400


def test_stats_on_a_database_without_the_group_column_values(db):
    """Rows from before schema 4 (grp NULL) count under the null group."""
    store = Store(db)
    try:
        store.insert_audit([row(iso(time.time() - 60), "10.0.0.1", "chatgpt.com")])
    finally:
        store.close()
    s = json.loads(run(db, "stats", "--format", "json").stdout)
    assert s["by_group"] == [{"group": None, "blocked": 1, "clients": 1}]
    assert sum(h["blocked"] for h in s["hourly"]) == 1
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM audit").fetchone()[0] == 1
    conn.close()
