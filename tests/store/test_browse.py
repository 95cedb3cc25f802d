"""browse.log_page on a real database: every way a page is found gives the rows `query_log` gives, newest first,
page after page, without gaps or repeats; a scan stopped by its budget says how far it looked and goes on."""

from __future__ import annotations

from pathlib import Path

import pytest

from sinkhole.service.operations import LogFilter
from sinkhole.store import browse
from sinkhole.store.db import Store
from sinkhole.store.schema import AUDIT_INSERT, iso


def rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        client = f"10.{i % 3}.{i % 5}.{i % 7 + 1}"
        qname = f"h{i % 11}.{'deepseek.com' if i % 4 else 'chatgpt.com'}"
        out.append({c: None for c in AUDIT_INSERT} | {
            "time": iso(1_790_000_000 + i // 3),  # three rows share each second: the cursor's seq matters
            "client": client, "transport": "udp", "qname": qname, "qtype": "A", "action": "blocked",
            "rule": qname.split(".", 1)[1], "category": "deepseek" if i % 4 else "genai", "grp": f"g{i % 2}",
            "rname": ".".join(reversed(qname.split(".")))})
    return out


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "log.db") as s:
        s.insert_audit(rows(600))
        yield s


def all_pages(store: Store, f: LogFilter, **kw: object) -> tuple[list[int], set[str]]:
    seen: list[int] = []
    plans: set[str] = set()
    before = None
    for _ in range(10_000):
        page = browse.log_page(store, f, before, size=7, **kw)  # type: ignore[arg-type]
        seen += [r["seq"] for r in page.rows]
        plans.add(page.plan.split(":")[0] + (" partial" if page.searched_to else ""))
        if page.next is None:
            return seen, plans
        before = page.next
    raise AssertionError("the pages never ended")


@pytest.mark.parametrize("filters", [
    {}, {"client": "10.1.2.3"}, {"client": "10.1.0.0/16"}, {"domain": "chatgpt.com"}, {"domain": "h3.deepseek.com"},
    {"category": "genai"}, {"group": "g1", "client": "10.2.0.0/16"}, {"since": "2026-09-21T14:14:00Z"},
])
def test_every_plan_pages_through_exactly_the_rows_query_log_gives(store: Store, filters: dict,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    f = LogFilter.parse(**filters)
    want = [r["seq"] for r in store.query_log(**f.kwargs())][::-1]
    assert want, filters
    seen, _ = all_pages(store, f)
    assert seen == want
    monkeypatch.setattr(browse, "NARROW", 0)  # no index of its own: windows of the ordered index
    monkeypatch.setattr(browse, "WINDOW", 5)
    monkeypatch.setattr(browse, "WINDOW_MAX", 20)
    seen, plans = all_pages(store, f)
    assert seen == want and all("rname" not in p for p in plans)


def test_a_scan_out_of_budget_shows_what_it_found_and_the_next_page_goes_on(store: Store,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browse, "WINDOW", 10)
    monkeypatch.setattr(browse, "WINDOW_MAX", 10)
    f = LogFilter.parse(category="genai")
    first = browse.log_page(store, f, size=50, budget=0.0)  # one window, then the budget is spent
    assert first.searched_to is not None and first.next == (first.searched_to, 0)
    assert len(first.rows) < 50 and all(r["time"] >= first.searched_to for r in first.rows)
    seen, plans = all_pages(store, f, budget=0.0)
    assert seen == [r["seq"] for r in store.query_log(category="genai")][::-1]
    assert "idx_audit_time partial" in plans


def test_a_row_with_its_rule_journal_entry_and_chain_position(tmp_path: Path) -> None:
    from sinkhole.model import RuleKind

    with Store(tmp_path / "one.db") as s:
        s.add_rules(RuleKind.BLOCK, ["deepseek.com"], note="ticket 7")
        version = s.policy_version()
        s.insert_audit([{c: None for c in AUDIT_INSERT} | {"time": iso(1_790_000_000), "client": "10.0.0.1",
                        "qname": "chat.deepseek.com", "action": "blocked", "rule": "deepseek.com",
                        "category": "manual", "policy_version": version, "chain": "n#4#abcd", "link": 1234,
                        "mac": "00" * 32}])
        one = browse.log_row(s, 1)
        assert one is not None and browse.log_row(s, 2) is None
    assert one["rule"]["note"] == "ticket 7" and one["rule"]["kind"] == "block"
    assert one["journal"]["id"] == version and one["journal"]["action"] == "block add"
    assert one["chain"] == {"chain": "n#4#abcd", "link": 1234, "epoch": 1, "generation": 4, "mac": "00" * 32}


def test_journal_page_filters_by_time_user_sudo_user_and_action_and_pages_below_an_id(tmp_path: Path) -> None:
    from sinkhole.model import RuleKind
    from sinkhole.store.journal import Actor

    alice, bob = Actor(user="alice", sudo_user=None), Actor(user="root", sudo_user="bob")
    with Store(tmp_path / "j.db") as s:
        s.add_rules(RuleKind.BLOCK, ["a.example"], actor=alice)
        s.add_rules(RuleKind.ALLOW, ["b.example"], actor=bob)
        s.add_rules(RuleKind.BLOCK, ["c.example"], actor=bob)
        every, _ = browse.journal_page(s)
        assert [e["action"] for e in every] == ["block add", "allow add", "block add"]  # newest first

        def actions(**kw: object) -> list[str]:
            return [e["action"] for e in browse.journal_page(s, **kw)[0]]

        assert actions(user="alice") == ["block add"]
        assert actions(user="bob") == ["block add", "allow add"]  # the sudo user counts
        assert actions(user="root", action="allow") == ["allow add"]
        assert actions(since="2999-01-01") == [] and actions(until="2000-01-01") == []
        assert len(actions(since="2000-01-01", until="2999-01-01")) == 3
        page, more = browse.journal_page(s, size=2)
        assert len(page) == 2 and more == page[-1]["id"]
        assert actions(before=more) == ["block add"]
        assert s.journal(user="bob") == sorted(browse.journal_page(s, user="bob")[0], key=lambda e: e["id"])
