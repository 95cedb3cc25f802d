"""`sinkhole report`: one self-contained HTML file whose numbers are the database's, whose names are
escaped (a query name is chosen by whoever sends the query), and which says whether the chains verify."""

from __future__ import annotations

import sqlite3
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from sinkhole.cli import cli
from sinkhole.policy.names import reverse_name
from sinkhole.store.db import Store
from sinkhole.store.schema import iso
from tests.conftest import ask, audit_rows, wait_for

HOSTILE = "<script>alert(1)</script>.evil.example"


def run(db: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--db", str(db), *args], catch_exceptions=False)


class Page(HTMLParser):
    """The parts of the page the tests look at: tags, attributes, and the text inside each element with an id."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.by_id: dict[str, str] = {}
        self.text: list[str] = []
        self._open: list[tuple[str, str | None]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend(attrs)
        self._open.append((tag, dict(attrs).get("id")))
        if dict(attrs).get("id"):
            self.by_id[str(dict(attrs)["id"])] = ""

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            t, _ = self._open.pop()
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for _, ident in self._open:
            if ident:
                self.by_id[ident] += data


def report(db: Path, tmp_path: Path, *args: str) -> tuple[Page, str, Result]:
    out = tmp_path / "report.html"
    result = run(db, "report", "--since", "7d", "--output", str(out), *args)
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    return Page(text), text, result


def assert_self_contained(page: Page, text: str) -> None:
    assert "script" not in page.tags, "no script element"
    names = {name for name, _ in page.attrs}
    assert not names & {"src", "href", "srcset", "action", "data"}, names
    assert "url(" not in text and "@import" not in text and "http://" not in text and "https://" not in text


@pytest.fixture
def served(make_server, stub, db, operator_key) -> list[dict]:
    """A real server blocked names from this client; its rows are chained with the exported key."""
    s = make_server(upstream=(stub.address,))
    for i in range(5):
        ask(s, f"q{i}.chat.deepseek.com")
    ask(s, "use-application-dns.net")  # the Firefox DoH canary: a bypass attempt
    assert wait_for(lambda: len(audit_rows(db)) == 6)
    s.stop()
    return audit_rows(db)


def test_report_counts_are_the_databases_and_the_chain_verifies(served, db, tmp_path, operator_key):
    page, text, result = report(db, tmp_path, "--key-file", str(operator_key))
    assert_self_contained(page, text)
    blocked = sum(r["action"] == "blocked" for r in served)
    bypass = sum(r["action"] == "canary" or r["category"] == "doh-bypass" for r in served)
    assert (blocked, bypass) == (5, 1)
    totals = page.by_id["totals"]
    assert f"{blocked}blocked queries" in totals and "1clients blocked" in totals
    assert page.by_id["bypass-total"] == "1"
    assert page.by_id["chain"].startswith("verified: 1 chains, 6 rows"), page.by_id["chain"]
    assert "127.0.0.1" in " ".join(page.text)  # the client, in top clients
    assert "chat.deepseek.com" in text or "deepseek.com" in text
    assert "verified: 1 chains" in result.stdout


def test_report_counts_answers_of_rows_with_a_count(make_server, stub, db, tmp_path, operator_key):
    """audit_window: four identical answers are one row of count 4; the report counts answers, and says rows too."""
    s = make_server(upstream=(stub.address,), audit_window=30.0)
    for _ in range(4):
        ask(s, "chatgpt.com")
    ask(s, "claude.ai")
    s.stop()
    assert sorted(r["count"] for r in audit_rows(db)) == [1, 4]
    page, _, _ = report(db, tmp_path, "--key-file", str(operator_key))
    totals = page.by_id["totals"]
    assert "5blocked queries" in totals and "5answers in the log" in totals and "2rows in the log" in totals
    assert page.by_id["chain"].startswith("verified: 1 chains, 2 rows"), page.by_id["chain"]


def test_report_shows_failure_after_tampering(served, db, tmp_path, operator_key):
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE audit SET client = '10.66.66.66' WHERE seq = ?", (served[2]["seq"],))
    conn.close()
    page, _, _ = report(db, tmp_path, "--key-file", str(operator_key))
    assert page.by_id["chain"].startswith("verification FAILED: 1 problems"), page.by_id["chain"]
    assert f"seq {served[2]['seq']}: edited or forged (MAC mismatch)" in page.by_id["chain-problems"]


def test_report_without_key_says_not_verified(served, db, tmp_path):
    page, _, _ = report(db, tmp_path)
    assert page.by_id["chain"] == "not verified: no operator key given (--key-file)"


def test_hostile_names_are_escaped(db, tmp_path):
    now = iso(time.time() - 60)
    store = Store(db)
    try:
        store.insert_audit([{"time": now, "client": "10.6.6.6", "transport": "udp", "qname": HOSTILE, "qtype": "A",
                             "action": "blocked", "rule": "evil.example", "category": "<b>cat</b>",
                             "grp": "\"><img src=x onerror=alert(2)>", "rname": reverse_name(HOSTILE)},
                            {"time": now, "client": "10.6.6.7", "transport": "udp", "qname": HOSTILE, "qtype": "A",
                             "action": "canary", "rule": HOSTILE, "category": "canary"}])
    finally:
        store.close()
    page, text, _ = report(db, tmp_path)
    assert_self_contained(page, text)
    assert "<script>" not in text and "<img" not in text and "<b>cat" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    shown = "".join(page.text)
    assert "<script>alert(1)</script>" in shown, "the name is shown, as text"
    assert "<b>cat</b>" in shown and '"><img src=x onerror=alert(2)>' in shown
    assert page.by_id["bypass-total"] == "1"


def test_an_empty_period_still_makes_a_page(db, tmp_path):
    Store(db).close()
    page, text, _ = report(db, tmp_path)
    assert_self_contained(page, text)
    assert "0blocked queries" in page.by_id["totals"]


@pytest.mark.parametrize(("args", "option"), [
    (("--since", "last week", "--output", "r.html"), "--since"),
    (("--since", "", "--output", "r.html"), "--since"),
    (("--since", " ", "--output", "r.html"), "--since"),
    (("--output", "r.html", "--key-file", "/nonexistent/key"), "--key-file"),
    (("--since", "7d"), "--output"),
])
def test_bad_arguments_are_one_line_usage_errors(db, tmp_path, args, option):
    Store(db).close()
    args = tuple(str(tmp_path / a) if a == "r.html" else a for a in args)
    result = run(db, "report", *args)
    assert result.exit_code == 2
    assert option in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "r.html").exists()
