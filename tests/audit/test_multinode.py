"""Several nodes, one audit: `log --db A --db B` reads their databases as one log ordered by time, and
`log verify --db A --db B` checks each node's chains with that node's key."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from click.testing import CliRunner, Result

from sinkhole.cli import cli
from tests.conftest import ask, audit_rows, wait_for


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def node(make_server, stub, tmp_path: Path, name: str, queries: list[str]) -> tuple[Path, Path]:
    db = tmp_path / name / "sinkhole.db"
    db.parent.mkdir()
    key = tmp_path / f"{name}-operator.key"
    assert run("--db", str(db), "log", "anchor", "--export-key", str(key)).exit_code == 0
    s = make_server(db=db, node=name, upstream=(stub.address,))
    for q in queries:
        ask(s, q)
    assert wait_for(lambda: len(audit_rows(db)) == len(queries))
    s.stop()
    return db, key


def test_two_nodes_read_as_one_log_and_verify_each(make_server, stub, tmp_path):
    a, key_a = node(make_server, stub, tmp_path, "site-a", ["a1.chat.deepseek.com", "a2.chat.deepseek.com"])
    b, key_b = node(make_server, stub, tmp_path, "site-b", ["b1.chat.deepseek.com"])
    out = run("log", "--db", str(a), "--db", str(b), "--format", "json")
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.output.splitlines()]
    assert [(r["node"], r["qname"]) for r in rows] == [
        ("site-a", "a1.chat.deepseek.com"), ("site-a", "a2.chat.deepseek.com"), ("site-b", "b1.chat.deepseek.com")]
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    latest = run("log", "--db", str(a), "--db", str(b), "--format", "json", "--limit", "2")
    assert [json.loads(x)["qname"] for x in latest.output.splitlines()] == ["a2.chat.deepseek.com",
                                                                            "b1.chat.deepseek.com"]
    table = run("log", "--db", str(a), "--db", str(b), "--domain", "b1.chat.deepseek.com")
    assert "site-b" in table.output and "site-a" not in table.output

    ok = run("log", "verify", "--db", str(a), "--db", str(b), "--key-file", str(key_a), "--key-file", str(key_b))
    assert ok.exit_code == 0, ok.output
    assert ok.output.count("verified: 1 chains") == 2 and f"== {b}" in ok.output

    with sqlite3.connect(b) as conn:
        conn.execute("UPDATE audit SET client = '10.9.9.9'")
    bad = run("log", "verify", "--db", str(a), "--db", str(b), "--key-file", str(key_a), "--key-file", str(key_b))
    assert bad.exit_code == 1
    assert "verification failed for 1 of 2 databases" in bad.output
    assert bad.output.index("BAD:") > bad.output.index(f"== {b}")  # the problem is reported under node b


def test_multi_database_usage_errors(tmp_path):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    follow = run("log", "--db", str(a), "--db", str(b), "--follow")
    assert follow.exit_code == 2 and "--follow reads one database" in follow.output
    keys = run("log", "verify", "--db", str(a), "--db", str(b), "--db", str(a), "--key-file", "k1", "--key-file", "k2")
    assert keys.exit_code == 2 and "2 --key-file for 3 databases" in keys.output
    missing = run("log", "--db", str(tmp_path / "nope.db"))
    assert missing.exit_code == 1 and "no database at" in missing.output
