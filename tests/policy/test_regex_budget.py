"""Regex rules under a budget: a list of thousands of patterns with bounded repeats (each a few hundred RE2
instructions) made every forwarded name cost milliseconds and held other clients up for seconds. Patterns and
lists past the budget are refused at `block add` and `lists import` (with the line, nothing written, the old
list in force); a policy remembers each name's regex outcome, so a name asked again costs a dict lookup."""

from __future__ import annotations

import functools
import logging
import os
import socket
import subprocess

import dns.message
import dns.query
import dns.rcode
import pytest

from sinkhole.model import RuleKind
from sinkhole.policy import decide, lists
from sinkhole.policy.decide import Policy
from sinkhole.policy.regexcost import REGEX_BUDGET, REGEX_PROGRAM_MAX, REGEX_RULES_MAX
from sinkhole.store.db import Store
from tests.dnsstub import address_for
from tests.policy.test_regex_rules import SINKHOLE, sinkhole


def heavy(i: int) -> str:
    """The reviewer's shape: 329 RE2 instructions each (the index has four digits, so that all have one size)."""
    return f"/^([a-z]{{1,30}}\\.){{1,5}}evil{i:04d}[0-9]{{1,4}}\\.example$/"


def fitting() -> int:
    """How many heavy patterns the budget holds."""
    return REGEX_BUDGET // lists.regex_size(heavy(1000))


def test_one_pattern_over_its_program_size_is_refused_at_add(db):
    big = "/^([a-z0-9]{1,60}\\.){1,16}x$/"
    assert decide.compile_regex(big[1:-1]).programsize > REGEX_PROGRAM_MAX  # valid RE2, only too large
    result = sinkhole(db, "block", "add", big)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "RE2 program has" in result.stderr
    assert not db.exists()


def test_a_list_past_the_budget_is_refused_at_its_line_and_the_old_list_stays(db, tmp_path):
    listed = tmp_path / "evil.txt"
    listed.write_text("! evil names\n/^old[0-9]+\\.example$/\n||old.example^\n")
    assert sinkhole(db, "lists", "import", str(listed), "--category", "evil").returncode == 0
    listed.write_text("! evil names\n" + "\n".join(heavy(i) for i in range(3000)) + "\n")
    result = sinkhole(db, "lists", "import", str(listed), "--category", "evil")
    assert result.returncode == 2, result.stderr
    over = fitting() + 1  # the first pattern that does not fit, on the line after the header
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert f"{listed}:{over + 1}:" in result.stderr and "budget" in result.stderr, result.stderr
    shown = sinkhole(db, "block", "list", "--format", "json", "--category", "evil").stdout
    assert "old.example" in shown and "/^old[0-9]+" in shown and "evil1" not in shown


def test_a_list_past_the_number_of_regex_rules_is_refused_at_its_line(db, tmp_path):
    listed = tmp_path / "many.txt"
    listed.write_text("\n".join(f"/^a{i}\\.example$/" for i in range(REGEX_RULES_MAX + 5)) + "\n")
    result = sinkhole(db, "lists", "import", str(listed), "--category", "many")
    assert result.returncode == 2
    assert f"{listed}:{REGEX_RULES_MAX + 1}:" in result.stderr and f"over {REGEX_RULES_MAX} regex" in result.stderr
    assert not Store(db).regex_rules()


def test_the_budget_counts_every_list_and_block_add(db, tmp_path):
    half = fitting() // 2 + 1
    for name in ("one", "two"):
        (tmp_path / f"{name}.txt").write_text("\n".join(heavy(i) for i in range(half)) + "\n")
    assert sinkhole(db, "lists", "import", str(tmp_path / "one.txt"), "--category", "one").returncode == 0
    # each list fits alone; with the other one stored they do not
    result = sinkhole(db, "lists", "import", str(tmp_path / "two.txt"), "--category", "two")
    assert result.returncode == 2 and "budget" in result.stderr, result.stderr
    # importing the same category again replaces its own patterns: they do not count twice
    assert sinkhole(db, "lists", "import", str(tmp_path / "one.txt"), "--category", "one").returncode == 0
    rest = [heavy(5000 + i) for i in range(fitting() - half + 1)]
    result = sinkhole(db, "block", "add", *rest)
    assert result.returncode == 2 and "budget" in result.stderr and len(result.stderr.splitlines()) == 1
    assert len(Store(db).regex_rules()) == half  # nothing of the refused add written
    assert sinkhole(db, "block", "add", *rest[:-1]).returncode == 0  # up to the budget it goes in


def test_a_policy_leaves_out_stored_patterns_past_the_budget_with_one_line(caplog):
    rules = [(heavy(i), "block", "old") for i in range(3000)]
    with caplog.at_level(logging.WARNING):
        policy = Policy(rules)
    assert len(policy._regexes) == fitting()
    assert sum(p.programsize for p, _, _ in policy._regexes) <= REGEX_BUDGET
    lines = [r for r in caplog.records if "over the regex budget" in r.getMessage()]
    assert len(lines) == 1 and f"{3000 - fitting()} regex rules left out" in lines[0].getMessage()


def test_a_name_asked_again_costs_no_regex_search_and_a_new_policy_forgets(monkeypatch):
    searches: list[str] = []
    search = Policy._search_regexes

    def counted(self, name, allowed):
        searches.append(name)
        return search(self, name, allowed)

    monkeypatch.setattr(Policy, "_search_regexes", counted)
    policy = Policy([(heavy(i), "block", "evil") for i in range(40)] + [("plain.example", "block", "evil")])
    for _ in range(50):
        assert policy.decide_name("aa.bb.evil00171234.example").rule.domain == heavy(17)
        assert policy.decide_name("www.example.org").rule is None
    assert searches == ["aa.bb.evil00171234.example", "www.example.org"]
    patched = policy.patched({"plain.example"}, [], policy.version + 1)  # a changed policy asks again
    assert patched is not None and patched.decide_name("www.example.org").rule is None
    assert searches[-1] == "www.example.org" and len(searches) == 3


def test_the_memo_is_bounded(monkeypatch):
    monkeypatch.setattr(decide, "_REGEX_MEMO_MAX", 100)
    policy = Policy([("/^x[0-9]+\\.example$/", "block", "evil"), ("/^y[0-9]+\\.example$/", "block", "evil")])
    for i in range(1000):
        policy.decide_name(f"n{i}.example")
    assert len(policy._regex_memo) == 100
    assert ("n999.example", policy.default.allowed) in policy._regex_memo  # the most recent kept


def test_another_clients_answers_wait_for_at_most_one_search_per_distinct_name(db, tmp_path, make_server, stub,
                                                                                monkeypatch):
    """Client A repeats a few names that go through a budget-full list of heavy patterns, many times; client B
    asks meanwhile. Every query is answered, and the regex work done is one search per distinct name: what B can
    wait behind is bounded by A's distinct names times the cost of a program within the budget."""
    listed = tmp_path / "evil.txt"
    listed.write_text("\n".join(heavy(i) for i in range(fitting())) + "\n")
    assert sinkhole(db, "lists", "import", str(listed), "--category", "evil").returncode == 0
    searches: list[str] = []
    search = Policy._search_regexes

    def counted(self, name, allowed):
        searches.append(name)
        return search(self, name, allowed)

    monkeypatch.setattr(Policy, "_search_regexes", counted)
    s = make_server(upstream=(stub.address,), shipped_lists=False, workers=1)
    assert sum(p.programsize for p, _, _ in s.server.policy._regexes) <= REGEX_BUDGET
    names = [".".join(["abcdefghijklmnopqrstuvwxyzabc"] * 5) + f".n{i}.example.test" for i in range(10)]
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
        a.bind(("127.0.0.2", 0))
        a.settimeout(10)
        for round_ in range(10):  # 100 datagrams in all: within the socket buffer of the server
            for i, name in enumerate(names):
                a.sendto(dns.message.make_query(name, "A", id=round_ * 100 + i).to_wire(), (s.host, s.port))
                sent += 1
        for i in range(10):
            b = dns.query.udp(dns.message.make_query(f"b{i}.example.test", "A"), s.host, port=s.port,
                              source="127.0.0.1", timeout=10)
            assert b.rcode() == dns.rcode.NOERROR and b.answer[0][0].to_text() == address_for(f"b{i}.example.test")
        replies = [dns.message.from_wire(a.recv(4096)) for _ in range(sent)]
    assert all(r.rcode() == dns.rcode.NOERROR for r in replies)
    asked = set(names) | {f"b{i}.example.test" for i in range(10)}
    assert len(searches) == len(set(searches)) and set(searches) <= asked, len(searches)


@pytest.mark.parametrize("kind", [RuleKind.BLOCK, RuleKind.ALLOW])
def test_the_console_path_shares_the_budget(db, kind):
    """The web console and API add rules through operations.add_rules, as `block add` does."""
    from sinkhole.errors import DomainError
    from sinkhole.service.operations import add_rules

    store = Store(db)
    with pytest.raises(DomainError, match="budget"):
        add_rules(store, kind, [heavy(i) for i in range(fitting() + 1)])
    assert not store.regex_rules()
    store.close()


def test_measure_helper_matches_policy():
    assert lists.regex_size(heavy(1)) == decide.compile_regex(heavy(1)[1:-1]).programsize


def test_a_shipped_list_past_the_budget_with_the_stored_rules_is_refused_at_enable(db, tmp_path):
    half = fitting() // 2 + 1  # each half fits alone, the two together do not
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "base.txt").write_text("# sinkhole blocklist\n# category: base\nbase.example\n")
    (shipped / "heavy.txt").write_text("# sinkhole blocklist\n# category: heavy\n# default: off\n"
                                       + "\n".join(heavy(i) for i in range(half)) + "\n")
    env = {**os.environ, "SINKHOLE_BLOCKLISTS": str(shipped)}
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=60, env=env)
    added = run([SINKHOLE, "--db", str(db), "block", "add", *(heavy(5000 + i) for i in range(half))])
    assert added.returncode == 0, added.stderr
    result = run([SINKHOLE, "--db", str(db), "lists", "enable", "heavy"])
    assert result.returncode == 2, result.stderr
    over = fitting() - half + 1  # the first of the list's patterns that does not fit, after three header lines
    assert len(result.stderr.splitlines()) == 1 and f"heavy.txt:{over + 3}:" in result.stderr, result.stderr
    assert len(Store(db).regex_rules()) == half  # nothing of the list loaded
    shown = run([SINKHOLE, "--db", str(db), "lists", "show", "--format", "json"]).stdout
    assert '"enabled": "no"' in next(line for line in shown.splitlines() if '"heavy"' in line)
