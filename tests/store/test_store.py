"""The store itself, method by method, on a real temporary database (the CLI and server tests go through it too).

Each topic's queries are a class of their own (schema, journal, groups, rules, requests, audit) put together
as one Store: these tests call the methods the rest of sinkhole calls, and read the tables back with sqlite3."""

from __future__ import annotations

import random
import sqlite3
import threading
from pathlib import Path

import pytest

from sinkhole.audit import chain
from sinkhole.errors import ConfigError
from sinkhole.model import RuleKind
from sinkhole.store.db import Store
from sinkhole.store.journal import Actor
from sinkhole.store.rules import NOT_POLICY, PATCHABLE
from sinkhole.store.schema import AUDIT_INSERT, DatabaseError, iso

ME = Actor(user="tester", sudo_user=None, host="h", command="pytest")


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "s.db")
    yield s
    s.close()


def journal(store: Store) -> list[dict]:
    return store.journal()


def test_add_and_remove_rules_journal_once_per_call_and_move_the_policy_version(store: Store) -> None:
    assert store.policy_version() == 0
    added, present = store.add_rules(RuleKind.BLOCK, ["a.example", "b.example", "a.example"], actor=ME)
    assert (added, present) == (["a.example", "b.example"], [])
    assert store.add_rules(RuleKind.BLOCK, ["b.example", "c.example"], actor=ME) == (["c.example"], ["b.example"])
    assert store.add_rules(RuleKind.BLOCK, ["c.example"], actor=ME) == ([], ["c.example"])  # nothing new: no entry
    removed, missing = store.remove_rules(RuleKind.BLOCK, ["a.example", "zz.example"], actor=ME)
    assert (removed, missing) == (["a.example"], ["zz.example"])
    entries = journal(store)
    assert [(e["action"], e["user"], e["domains"]) for e in entries] == [
        ("block add", "tester", '["a.example", "b.example"]'), ("block add", "tester", '["c.example"]'),
        ("block remove", "tester", '["a.example"]')]
    assert store.policy_version() == entries[-1]["id"] == 3
    assert [r["domain"] for r in store.list_rules(RuleKind.BLOCK)] == ["b.example", "c.example"]


def test_replace_category_keeps_hand_added_allow_rules(store: Store) -> None:
    store.replace_category("genai", [("x.example", ""), ("y.example", "")], "list.txt", ME,
                           allows=[("ok.x.example", "")])
    store.add_rules(RuleKind.ALLOW, ["mine.x.example"], category="genai", actor=ME)  # source 'cli'
    store.replace_category("genai", [("x.example", "")], "list.txt", ME, allows=[])
    rules = {(r["domain"], r["kind"]) for r in store.list_rules(category="genai")}
    assert rules == {("x.example", "block"), ("mine.x.example", "allow")}


def test_import_list_records_its_source_and_touch_source_only_the_validators(store: Store) -> None:
    count = store.import_list("ai", [("a.example", "")], [("ok.a.example", "")], "https://l.example/ai.txt",
                              "domains", "ab" * 32, etag='"v1"', actor=ME)
    assert count == 2
    (src,) = store.sources()
    assert (src["category"], src["location"], src["etag"], src["rules"]) == ("ai", "https://l.example/ai.txt",
                                                                            '"v1"', 2)
    version = store.policy_version()
    store.touch_source("ai", '"v2"', "Sat, 05 Dec 2026 10:00:00 GMT")
    (src,) = store.sources()
    assert (src["etag"], src["last_modified"], src["rules"], src["sha256"]) == (
        '"v2"', "Sat, 05 Dec 2026 10:00:00 GMT", 2, "ab" * 32)
    assert store.policy_version() == version  # no journal entry, no new policy


def names(policy, candidates: list[str]) -> dict[str, str]:
    return {n: policy.decide_name(n).action.value for n in candidates}


def test_a_patched_policy_equals_the_policy_read_whole_after_each_patchable_change(store: Store) -> None:
    probe = ["a.example", "www.a.example", "b.example", "ok.b.example", "c.example", "d.example"]
    store.add_rules(RuleKind.BLOCK, ["a.example", "b.example"], actor=ME)
    policy = store.load_policy(False)
    steps = [lambda: store.add_rules(RuleKind.BLOCK, ["c.example"], actor=ME),
             lambda: store.add_rules(RuleKind.ALLOW, ["ok.b.example"], actor=ME),
             lambda: store.remove_rules(RuleKind.BLOCK, ["a.example"], actor=ME),
             lambda: store.remove_rules(RuleKind.ALLOW, ["ok.b.example"], actor=ME),
             lambda: store.journal_settings({"block_ttl": "30"}, ME)]  # NOT_POLICY: patched to the same rules
    for step in steps:
        step()
        patched = store.patch_policy(policy)
        assert patched is not None and patched.version == store.policy_version()
        assert names(patched, probe) == names(store.load_policy(False), probe)
        policy = patched
    assert {"block add", "allow remove"} <= PATCHABLE and "settings reload" in NOT_POLICY
    store.set_enabled("manual", False, ME)  # neither: the policy must be read whole
    assert store.patch_policy(policy) is None


def test_groups_refuse_a_network_of_another_group_and_networks_for_default(store: Store) -> None:
    assert store.save_group("lab", ["10.1.0.0/16"], None, actor=ME) == (True, ["10.1.0.0/16"])
    with pytest.raises(ConfigError, match="already belongs to group lab"):
        store.save_group("ops", ["10.1.0.0/16"], None, actor=ME)
    assert "ops" not in {g["name"] for g in store.groups()}  # nothing written
    with pytest.raises(ConfigError, match="default group"):
        store.save_group("default", ["10.9.0.0/16"], None, actor=ME)
    with pytest.raises(ConfigError, match="not in group lab"):
        store.remove_group("lab", ["10.2.0.0/16"], actor=ME)
    assert store.remove_group("lab", actor=ME) == ["10.1.0.0/16"]
    with pytest.raises(ConfigError, match="no group 'lab'"):
        store.remove_group("lab", actor=ME)


def test_set_enabled_rules_in_force_and_rule_note(store: Store) -> None:
    store.add_rules(RuleKind.BLOCK, ["x.example"], category="genai", source="list.txt", note="T-1", actor=ME)
    store.add_rules(RuleKind.BLOCK, ["y.example"], actor=ME)
    assert store.rule_note("x.example", RuleKind.BLOCK, "genai") == ("list.txt", "T-1")
    assert store.rule_note("x.example", RuleKind.ALLOW, "genai") is None
    version, rules = store.rules_in_force("default")
    assert version == store.policy_version() and sorted(rules) == [("x.example", "block", "genai"),
                                                                   ("y.example", "block", "manual")]
    assert store.set_enabled("genai", False, ME) is True
    assert store.set_enabled("genai", False, ME) is False  # out of force already: nothing changed, no entry
    assert store.rules_in_force("default")[1] == [("y.example", "block", "manual")]
    with pytest.raises(ConfigError, match="no group 'lab'"):
        store.rules_in_force("lab")


def audit_row(i: int, when: str) -> tuple:
    values = {c: None for c in AUDIT_INSERT}
    values.update(time=when, client=f"10.0.{i // 256}.{i % 256}", transport="udp", qname=f"n{i}.example",
                  qtype="A", action="blocked", rcode="NOERROR", policy_version=0, node="n1", count=1)
    return tuple(values[c] for c in AUDIT_INSERT)


@pytest.mark.parametrize("n", [1, 255, 256, 257, 300, 5000])
def test_insert_audit_stores_a_batch_whole_and_returns_its_last_seq(store: Store, n: int) -> None:
    store.insert_audit([audit_row(0, iso(0))])
    last = store.insert_audit([audit_row(i, iso(1)) for i in range(n)])
    assert last == n + 1 == store.last_seq()
    assert store.count_log() == n + 1
    assert store.audit_row(last)["qname"] == f"n{n - 1}.example"
    assert store.insert_audit([]) is None


def _write_calls() -> int:
    """The write system calls this process made so far (Linux's /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("syscw")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts write system calls in /proc/self/io (Linux)")
def test_the_writers_batches_of_names_in_no_order_cost_few_write_calls(store: Store) -> None:
    """tune_for_writer keeps the statement journals of insert_audit's multi-row INSERTs in memory: in a file,
    each page a statement changes was a write call, and the domain index takes these names in no order (each, of
    two labels, is a base domain of its own), a page a row: 11,500 calls for these 5,000 rows, against 1,574 for
    the WAL's own writes (6,686 and 926 with schema 6's index on rname)."""
    rnd = random.Random(1)
    store.tune_for_writer(64 * 2**20)
    store.insert_audit(_spread_rows(rnd, 0, 20_000, ["example"]))  # a domain index of some size
    before = _write_calls()
    store.insert_audit(_spread_rows(rnd, 20_000, 5000, ["example"]))
    assert _write_calls() - before < 2500
    assert store.count_log() == 25_000


def _spread_rows(rnd: random.Random, start: int, n: int, bases: list[str]) -> list[tuple]:
    """Load (a)'s kind of rows: a random label under one of `bases`, a millisecond apart."""
    qname, rname = AUDIT_INSERT.index("qname"), AUDIT_INSERT.index("rname")
    out = []
    for i in range(start, start + n):
        row = list(audit_row(i, iso(1_790_000_000 + i / 1000)))
        name = f"h{rnd.randrange(10**9)}.{rnd.choice(bases)}"
        row[qname], row[rname] = name, ".".join(reversed(name.split(".")))
        out.append(tuple(row))
    return out


def _pages_written_by(store: Store, rows: list[tuple]) -> int:
    """The WAL frames (pages) one insert_audit of `rows` writes: the WAL emptied before it, no automatic checkpoint."""
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.insert_audit(rows)
    return int(store.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])


def test_a_batch_of_names_under_a_few_domains_writes_no_more_pages_as_the_log_grows(store: Store) -> None:
    """The domain index, idx_audit_rbase (base domain, time, rname), takes a batch of names under a few base domains
    at the end of a run for each: the pages a batch writes stay the same however long the log. The index on rname
    it replaces (schema 6) took each name anywhere in the log, a page for nearly every row once the log is long:
    538 pages for 5000 such rows after 20,000, 1,274 after 100,000, 3,330 after 400,000 (853, 946 and 1,057 here)."""
    rnd = random.Random(1)
    bases = [f"site{i}.example" for i in range(150)]
    store.tune_for_writer(64 * 2**20)
    store.conn.execute("PRAGMA wal_autocheckpoint=0")
    store.insert_audit(_spread_rows(rnd, 0, 20_000, bases))
    short = _pages_written_by(store, _spread_rows(rnd, 20_000, 5000, bases))
    store.insert_audit(_spread_rows(rnd, 25_000, 75_000, bases))
    long = _pages_written_by(store, _spread_rows(rnd, 100_000, 5000, bases))
    assert long < short * 1.3, (short, long)
    assert store.count_log() == 105_000


def test_a_domain_filter_is_a_range_of_the_domain_index(store: Store) -> None:
    """query_log's and count_log's domain filter: the name and its subdomains, found through idx_audit_rbase (SQLite
    uses it only when the query writes schema.RBASE as the index does), for names of one, two and more labels."""
    names = ["deepseek.com", "chat.deepseek.com", "a.chat.deepseek.com", "notdeepseek.com", "deepseek.com.cn",
             "com", "com-x.net", "chat.deepseek.co", "cn", "x.cn"]
    rows = []
    for i, name in enumerate(names):
        row = dict(zip(AUDIT_INSERT, audit_row(i, iso(i)), strict=True))
        rows.append(row | {"qname": name, "rname": ".".join(reversed(name.split(".")))})
    store.insert_audit(rows)
    for domain, want in (("deepseek.com", {"deepseek.com", "chat.deepseek.com", "a.chat.deepseek.com"}),
                         ("chat.deepseek.com", {"chat.deepseek.com", "a.chat.deepseek.com"}),
                         ("com", {"deepseek.com", "chat.deepseek.com", "a.chat.deepseek.com", "notdeepseek.com",
                                  "com"}),
                         ("cn", {"deepseek.com.cn", "cn", "x.cn"}), ("example", set())):
        assert {r["qname"] for r in store.query_log(domain=domain)} == want, domain
        assert store.count_log(domain=domain) == len(want)
        where, args = store._log_where(None, None, None, domain, None)
        plan = " ".join(r[3] for r in store.conn.execute(f"EXPLAIN QUERY PLAN SELECT * FROM audit{where}", args))
        assert "USING INDEX idx_audit_rbase" in plan and "SCAN audit" not in plan, plan


def test_a_database_of_schema_6_gets_the_domain_index_and_its_rows_without_rname_get_one(tmp_path: Path) -> None:
    """The migration to schema 7 drops idx_audit_rname (which every insert paid for), gives the rows written before
    schema 4 (no rname) their qname's, and makes idx_audit_rbase over the rows there: a domain filter finds them all,
    with one range of the index read in time order (the latest rows of a domain without sorting the rest)."""
    path = tmp_path / "old.db"
    with Store(path) as s:
        s.insert_audit([audit_row(i, iso(i)) for i in range(3)]  # n0.example .. n2.example, as tuples: rname NULL
                       + _spread_rows(random.Random(2), 3, 200, ["deepseek.com", "openai.com"]))
        names = {r["seq"]: r["qname"] for r in s.query_log()}
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX idx_audit_rbase")
    conn.execute("CREATE INDEX idx_audit_rname ON audit(rname)")
    conn.execute("PRAGMA user_version=6")
    conn.commit()
    assert conn.execute("SELECT count(*) FROM audit WHERE rname IS NULL").fetchone()[0] == 3
    conn.close()
    with Store(path) as s:
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == 7
        indexes = {r[1] for r in s.conn.execute("PRAGMA index_list(audit)")}
        assert "idx_audit_rbase" in indexes and "idx_audit_rname" not in indexes
        assert s.conn.execute("SELECT rname FROM audit WHERE seq = 2").fetchone()[0] == "example.n1"
        for domain in ("deepseek.com", "n1.example", "example", "com"):
            want = sorted(seq for seq, q in names.items() if q == domain or q.endswith("." + domain))
            assert sorted(r["seq"] for r in s.query_log(domain=domain)) == want and want, domain
        where, args = s._log_where(None, None, None, "deepseek.com", None)
        plan = " ".join(r[3] for r in s.conn.execute(
            f"EXPLAIN QUERY PLAN SELECT * FROM audit{where} ORDER BY time DESC, seq DESC LIMIT 10", args))
        assert "USING INDEX idx_audit_rbase" in plan and "RIGHT PART OF ORDER BY" in plan, plan


def test_a_row_given_as_a_dict_without_rname_gets_its_qnames(store: Store) -> None:
    store.insert_audit([{"time": iso(0), "qname": "chat.deepseek.com", "action": "blocked"},
                        {"time": iso(1), "qname": "", "action": "gap"}])
    assert [(r["rname"], r["count"]) for r in store.query_log()] == [("com.deepseek.chat", 1), (None, 1)]
    assert [r["seq"] for r in store.query_log(domain="deepseek.com")] == [1]


def test_the_chains_rows_come_from_the_store(store: Store, tmp_path: Path) -> None:
    """What audit.chain walks (it runs no SQL of its own): sealed rows, their heads, the journal."""
    generation, key, _ = chain.ensure_key(store.key_path)
    ch, _, _ = chain.Chain.start(store.key_path, "n1")
    sealed, state = ch.seal([audit_row(i, iso(10 + i))[:-3] for i in range(3)])
    store.insert_audit(sealed)
    ch.commit(state)
    store.add_rules(RuleKind.BLOCK, ["z.example"], actor=ME)
    rows = list(store.chained_rows())
    assert [(r["chain"], r["link"]) for r in rows] == [(ch.name, 0), (ch.name, 1), (ch.name, 2)]
    assert set(chain.ROW_COLUMNS) | {"seq", "mac"} == set(rows[0])
    assert store.chain_heads() == [{"chain": ch.name, "link": 2, "seq": 3, "mac": rows[2]["mac"],
                                    "time": rows[2]["time"]}]
    assert [e["action"] for e in store.journal_rows()] == ["block add"]
    assert list(store.checkpoint_rows()) == []
    assert set(store.journal_generations()) == {generation + 1}  # the chain took `generation`, the journal the next
    report = chain.verify(store, generation, key)
    assert report.ok and report.chains[ch.name].rows == 3


def test_close_rolls_back_an_open_transaction_and_a_second_close_does_nothing(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    s = Store(db)
    s.conn.execute("BEGIN IMMEDIATE")
    s.conn.execute("INSERT INTO rules (domain, kind, category) VALUES ('half.example', 'block', 'manual')")
    s.close()
    s.close()
    assert sqlite3.connect(db).execute("SELECT count(*) FROM rules").fetchone()[0] == 0
    with Store(db) as again:  # and the file is not locked
        again.add_rules(RuleKind.BLOCK, ["whole.example"], actor=ME)


def test_a_locked_database_is_a_database_error_after_the_busy_timeout(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    Store(db).close()
    holder = sqlite3.connect(db)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with Store(db) as s:
            s.set_busy_timeout(1)
            with pytest.raises(DatabaseError, match="locked"):
                s.add_rules(RuleKind.BLOCK, ["x.example"], actor=ME)
    finally:
        holder.rollback()
        holder.close()


def test_a_query_past_its_deadline_is_interrupted(store: Store) -> None:
    store.insert_audit([audit_row(i, iso(i)) for i in range(2000)])
    stop = threading.Event()
    store.interrupt_when(stop.is_set)
    assert store.count_log() == 2000
    stop.set()
    with pytest.raises(DatabaseError, match="interrupted"):
        store.conn.execute("WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT max(i) FROM r")
