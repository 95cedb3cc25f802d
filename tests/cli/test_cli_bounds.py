"""Numbers out of range, through real CLI processes: one line and exit 2, never a traceback or a database
error; and `log --client` that matches an IPv4 client in its IPv4-mapped IPv6 form too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ask, sql, wait_for

SINKHOLE = shutil.which("sinkhole", path=str(Path(sys.executable).parent))
HUGE = "99999999999999999999"


def sinkhole(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "SINKHOLE_SHIPPED_LISTS": "false", **(env or {})}
    full.pop("SINKHOLE_DB", None)
    return subprocess.run([SINKHOLE, *args], capture_output=True, text=True, timeout=60, env=full)


@pytest.fixture
def made(db: Path) -> Path:
    assert sinkhole("--db", str(db), "block", "add", "x.example").returncode == 0
    return db


@pytest.mark.parametrize("args", [
    ["log", "--limit", HUGE], ["log", "--limit", "0"], ["stats", "--top", HUGE], ["stats", "--top", "-3"],
    ["report", "-o", "r.html", "--top", HUGE], ["log", "prune", "--retention-days", HUGE],
    ["log", "--follow", "--interval", "nan"], ["log", "--since", HUGE + "d"], ["changes", "--until", HUGE + "w"],
    ["requests", "approve", HUGE], ["requests", "deny", HUGE], ["reload", "--timeout", "nan"],
    ["log", "prune", "--before", ""],
], ids=lambda a: " ".join(a))
def test_a_number_out_of_range_is_one_line_and_exit_2(made, tmp_path, args):
    r = subprocess.run([SINKHOLE, "--db", str(made), *args], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "r.html").exists()


def test_settings_out_of_range_are_each_named_with_their_line(tmp_path):
    f = tmp_path / "sinkhole.toml"
    f.write_text("workers = 100000\ncache_serve_stale = nan\nrate_limit = inf\nretention_days = 9223372036854775807\n"
                 "cache_size = -1\nmax_inflight = 10000000\ntcp_max_clients = 0\n")
    r = sinkhole("config", "check", str(f))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert [line.split(":")[1] for line in lines] == ["1", "2", "3", "4", "5", "6", "7"], r.stderr
    assert "workers must be from 0 to 256" in lines[0] and "nan" in lines[1]
    r = sinkhole("serve", "--listen", "127.0.0.1:0", "--cache-serve-stale", "nan")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    r = sinkhole("serve", "--listen", "127.0.0.1:0", env={"SINKHOLE_RATE_LIMIT": "nan"})
    assert r.returncode == 2 and "rate_limit must be from" in r.stderr and len(r.stderr.splitlines()) == 1


def test_client_filter_matches_ipv4_in_its_ipv4_mapped_form_too(make_server, stub, db):
    s = make_server(upstream=(stub.address,))
    for i in range(3):
        assert ask(s, f"n{i}.chat.deepseek.com").answer
    s.stop()
    assert wait_for(lambda: len(json.loads("[" + ",".join(
        sinkhole("--db", str(db), "log", "--format", "json").stdout.splitlines()) + "]")) == 3)
    # a row as an IPv6 socket that takes IPv4 too would have stored its client
    sql(db, "UPDATE audit SET client = '::ffff:127.0.0.9' WHERE qname = 'n2.chat.deepseek.com'")

    def names(client: str) -> list[str]:
        r = sinkhole("--db", str(db), "log", "--client", client, "--format", "json")
        assert r.returncode == 0, r.stderr
        return sorted(json.loads(line)["qname"] for line in r.stdout.splitlines())

    assert names("::ffff:127.0.0.1") == names("127.0.0.1") == ["n0.chat.deepseek.com", "n1.chat.deepseek.com"]
    assert names("127.0.0.9") == names("::ffff:127.0.0.9") == ["n2.chat.deepseek.com"]
    every = ["n0.chat.deepseek.com", "n1.chat.deepseek.com", "n2.chat.deepseek.com"]
    assert names("127.0.0.0/8") == names("::ffff:127.0.0.0/104") == every
    assert names("::1") == [] and names("10.0.0.0/8") == []
