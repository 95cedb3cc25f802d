"""Regex rules under abuse: matched with RE2 in time linear in the name, so a pathological pattern can neither
make its own query slow nor hold up anyone else's; patterns RE2 cannot take are refused at `block add` and at
import (with the line), through real CLI processes against a real `sinkhole serve`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.rcode

from sinkhole.model import RuleKind
from sinkhole.store.db import Store
from tests.conftest import ask, audit_rows
from tests.dnsstub import address_for

SINKHOLE = shutil.which("sinkhole", path=str(Path(sys.executable).parent))


def sinkhole(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SINKHOLE, "--db", str(db), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SINKHOLE_SHIPPED_LISTS": "false"})


def test_a_catastrophic_pattern_costs_neither_its_query_nor_the_next_one(server_process, stub, db):
    assert sinkhole(db, "block", "add", "/(x+x+)+y/").returncode == 0
    p = server_process("--upstream", stub.address, "--workers", "1")
    evil = "x" * 40 + ".example.test"  # Python's re: 2^40 steps of backtracking before it gives up
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
        a.settimeout(10)
        b.settimeout(10)
        a.sendto(dns.message.make_query(evil, "A").to_wire(), (p.host, p.port))
        b.sendto(dns.message.make_query("chat.deepseek.com", "A").to_wire(), (p.host, p.port))
        first = dns.message.from_wire(a.recv(4096))
        second = dns.message.from_wire(b.recv(4096))
    assert first.rcode() == dns.rcode.NOERROR and first.answer[0][0].to_text() == address_for(evil)
    assert second.answer[0][0].to_text() == "0.0.0.0"
    blocked = dns.message.from_wire(_ask_udp(p, "x" * 40 + "y.example.test"))
    assert blocked.answer[0][0].to_text() == "0.0.0.0"
    assert p.terminate() == 0
    assert any(r["rule"] == "/(x+x+)+y/" for r in audit_rows(db))


def _ask_udp(p, name: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(dns.message.make_query(name, "A").to_wire(), (p.host, p.port))
        return s.recv(4096)


def test_patterns_outside_re2_are_refused_at_add_with_nothing_written(db):
    for pattern in (r"/(a)\1/", "/(?=chat)chat/", "/(?<!x)y/", "/" + "(a{1000}){1000}" + "/"):
        result = sinkhole(db, "block", "add", pattern)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
        assert "invalid regex rule" in result.stderr
    assert not db.exists()


def test_a_list_with_a_pattern_outside_re2_is_refused_whole_with_its_line(db, tmp_path):
    assert sinkhole(db, "block", "add", "kept.example").returncode == 0
    text = "! adblock list\n||ai-one.example^\n/^chat[0-9]+\\.ai\\.example$/\n/(chat)\\1/\n||ai-two.example^\n"
    (tmp_path / "ai.txt").write_text(text)
    result = sinkhole(db, "lists", "import", str(tmp_path / "ai.txt"), "--category", "ai")
    assert result.returncode == 2
    assert f"{tmp_path / 'ai.txt'}:4:" in result.stderr and "invalid regex rule" in result.stderr
    shown = sinkhole(db, "block", "list", "--format", "json").stdout
    assert "kept.example" in shown and "ai-one.example" not in shown


def test_a_stored_pattern_re2_cannot_take_is_left_out_and_the_rest_serves(make_server, stub, db, caplog):
    store = Store(db)  # as a database written before RE2 checked patterns would hold it
    store.add_rules(RuleKind.BLOCK, [r"/(a)\1x/", "/^ai[0-9]+\\.example\\.test$/", "evil-ai.test"], category="old")
    store.close()
    s = make_server(upstream=(stub.address,), shipped_lists=False)
    assert ask(s, "ai7.example.test").answer[0][0].to_text() == "0.0.0.0"
    assert ask(s, "evil-ai.test").answer[0][0].to_text() == "0.0.0.0"
    assert ask(s, "aax.example.test").answer[0][0].to_text() == address_for("aax.example.test")
    assert any("left out of the policy" in r.getMessage() and r"(a)\1x" in r.getMessage() for r in caplog.records)


def test_a_thousand_patterns_in_one_program_decide_as_each_one_does(tmp_path, db, make_server, stub):
    """All regex rules are also compiled into one RE2 program that rules names out in one pass: imported from a
    list, served, they must decide exactly as trying each pattern does."""
    from sinkhole.policy.decide import Policy

    lines = [f"/^h{i}[0-9]+\\.ai{i % 7}\\.example$/" for i in range(1000)] + ["@@/^h5[0-9]+\\.ai5\\.example$/"]
    (tmp_path / "many.txt").write_text("\n".join(lines) + "\n")
    assert sinkhole(db, "lists", "import", str(tmp_path / "many.txt"), "--category", "many").returncode == 0
    s = make_server(upstream=(stub.address,), shipped_lists=False)
    policy = s.server.policy
    assert policy._regex_any is not None
    names = [f"h{i}{i}.ai{i % 7}.example" for i in range(0, 1000, 37)] + ["h5123.ai5.example", "h12.ai6.example",
                                                                          "x.example", "h9.ai2.example"]
    each = object.__new__(Policy)
    for slot in Policy.__slots__:
        setattr(each, slot, getattr(policy, slot))
    each._regex_any = None  # try every pattern
    each._regex_memo = type(policy._regex_memo)()  # and remember nothing the combined program decided
    assert [policy.decide_name(n) for n in names] == [each.decide_name(n) for n in names]
    assert ask(s, "h7007.ai0.example").answer[0][0].to_text() == "0.0.0.0"
    assert ask(s, "h5123.ai5.example").answer[0][0].to_text() == address_for("h5123.ai5.example")  # allowed
    assert ask(s, "h12.ai6.example").answer[0][0].to_text() == address_for("h12.ai6.example")  # no pattern
