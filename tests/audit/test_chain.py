"""Tamper evidence: every audit row is sealed into its writer's HMAC chain; `sinkhole log verify` finds
edits, deletions, insertions, reordering and (with an anchor) a cut-off tail; a stolen current key cannot
rewrite the past."""

from __future__ import annotations

import concurrent.futures
import hmac
import json
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st

from sinkhole.audit import chain
from sinkhole.cli import cli
from sinkhole.store.db import Store, open_store
from sinkhole.store.schema import SCHEMA_VERSION, iso
from tests.conftest import ask, audit_rows, select, sql, wait_for


def run(db: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--db", str(db), *args], catch_exceptions=False)


def rows(db: Path) -> list[dict]:
    return select(db, "audit", order="seq")


def verify(db: Path, key: Path, *args: str) -> Result:
    return run(db, "log", "verify", "--key-file", str(key), *args)


@pytest.fixture
def logged(make_server, stub, db, operator_key) -> list[dict]:
    """A server that blocked eight queries and stopped: the rows it wrote."""
    s = make_server(upstream=(stub.address,))
    for i in range(8):
        ask(s, f"q{i}.chat.deepseek.com")
    assert wait_for(lambda: len(rows(db)) == 8)
    s.stop()
    return rows(db)


def test_rows_carry_one_chain_and_verify(logged, db, operator_key):
    assert len({r["chain"] for r in logged}) == 1
    assert [r["link"] for r in logged] == list(range(8))
    assert all(len(r["mac"]) == 64 for r in logged)
    assert logged[0]["chain"].startswith("test-node#1#")  # generation 0 sealed the first start's journal entries
    result = verify(db, operator_key)
    assert result.exit_code == 0, result.output
    assert f"ok: chain {logged[0]['chain']}: 8 rows" in result.output
    assert "verified: 1 chains, 8 rows" in result.output


def test_key_file_is_private_and_moves_forward(logged, db, operator_key):
    key_file = Path(f"{db}.key")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    generation, current = chain.read_key(key_file)
    _, original = chain.read_key(operator_key)
    # generation 0: the journal of the first start (shipped lists); 1: the server's audit chain
    assert generation == 2 and current == chain.evolve(chain.evolve(original)) != original


def test_edited_row_is_named(logged, db, operator_key):
    victim = logged[3]
    sql(db, "UPDATE audit SET qname = 'innocent.example' WHERE seq = ?", (victim["seq"],))
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert f"seq {victim['seq']}: edited or forged (MAC mismatch)" in result.output


def test_deleted_row_is_named(logged, db, operator_key):
    sql(db, "DELETE FROM audit WHERE seq = ?", (logged[4]["seq"],))
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert f"seq {logged[5]['seq']}: deleted: links 4..4 are missing before it" in result.output


def test_inserted_row_is_named(logged, db, operator_key):
    forged = dict(logged[2], qname="someone-else.chat.deepseek.com", client="10.9.9.9", mac="ab" * 32)
    forged.pop("seq")
    cols = ", ".join(forged)
    conn = sqlite3.connect(db)
    with conn:
        seq = conn.execute(f"INSERT INTO audit ({cols}) VALUES ({', '.join('?' for _ in forged)})",
                           tuple(forged.values())).lastrowid
    conn.close()
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert f"seq {seq}: inserted or reordered" in result.output


def test_forged_row_before_the_real_one_is_called_inserted(logged, db, operator_key):
    """Make room by moving the tail up one seq, then slip a forged row with the next link in between."""
    conn = sqlite3.connect(db)
    with conn:
        for r in reversed(logged[5:]):
            conn.execute("UPDATE audit SET seq = seq + 1 WHERE seq = ?", (r["seq"],))
        forged = dict(logged[5], seq=logged[5]["seq"], qname="forged.chat.deepseek.com", mac="cd" * 32)
        conn.execute(f"INSERT INTO audit ({', '.join(forged)}) VALUES ({', '.join('?' for _ in forged)})",
                     tuple(forged.values()))
    conn.close()
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert f"seq {logged[5]['seq']}: inserted (a forged row before the real link 5)" in result.output


def test_unchained_row_after_the_chain_started_is_named(logged, db, operator_key):
    store = Store(db)
    store.insert_audit([{"time": logged[-1]["time"], "client": "10.0.0.1", "qname": "x.example",
                         "action": "blocked"}])
    store.close()
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert f"seq {logged[-1]['seq'] + 1}: inserted (a row without a chain or MAC" in result.output


def test_reordered_rows_are_named(logged, db, operator_key):
    a, b = logged[2]["seq"], logged[3]["seq"]
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE audit SET seq = -1 WHERE seq = ?", (a,))
        conn.execute("UPDATE audit SET seq = ? WHERE seq = ?", (a, b))
        conn.execute("UPDATE audit SET seq = ? WHERE seq = -1", (b,))
    conn.close()
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert f"seq {a}: reordered (link 3 comes before link 2)" in result.output


def test_truncated_tail_is_found_with_an_anchor(logged, db, operator_key, tmp_path):
    anchor = run(db, "log", "anchor")
    assert anchor.exit_code == 0
    heads = [json.loads(line) for line in anchor.output.splitlines()]
    assert heads == [{"chain": logged[-1]["chain"], "link": 7, "seq": logged[-1]["seq"], "mac": logged[-1]["mac"],
                      "time": logged[-1]["time"]}]
    saved = tmp_path / "anchor.jsonl"
    saved.write_text(anchor.output)
    sql(db, "DELETE FROM audit WHERE seq >= ?", (logged[6]["seq"],))
    plain = verify(db, operator_key)
    assert plain.exit_code == 0, "a cut-off tail looks like a shorter chain without an anchor"
    assert "without --anchor a tail cut off" in plain.output
    result = verify(db, operator_key, "--anchor", str(saved))
    assert result.exit_code == 1
    assert (f"chain {logged[0]['chain']}: truncated: it ends at link 5 (seq {logged[5]['seq']}), "
            f"the anchor has link 7") in result.output


def test_two_workers_write_two_chains_that_both_verify(server_process, stub, db, operator_key):
    import dns.message
    import dns.query

    p = server_process("--upstream", stub.address, "--workers", "2")

    def ask(name: str) -> None:
        dns.query.udp(dns.message.make_query(name, "A"), p.host, port=p.port, timeout=5)

    sent = 0
    # bursts of 20 at once from as many source ports, until both workers have written (the rows come a second or
    # so after their answers): on a loaded machine 600 queries one at a time all went to the same worker
    deadline = time.monotonic() + 60
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while sent < 6000 and time.monotonic() < deadline:
            list(pool.map(ask, [f"w{sent + i}.chat.deepseek.com" for i in range(20)]))
            sent += 20
            if sent >= 60 and len({r["chain"] for r in audit_rows(db)}) == 2:
                break
    assert p.terminate() == 0
    stored = rows(db)
    assert len(stored) == sent
    chains = {r["chain"] for r in stored}
    assert len(chains) == 2, "one chain per worker"
    for name in chains:
        assert [r["link"] for r in stored if r["chain"] == name] == list(range(sum(r["chain"] == name
                                                                                     for r in stored)))
    result = verify(db, operator_key)
    assert result.exit_code == 0, result.output
    assert f"verified: 2 chains, {sent} rows" in result.output


def reseal(db: Path, file_key: bytes, rename: str | None = None) -> None:
    """What an intruder holding `file_key` does: edit row 3 and recompute every MAC of the chain."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    stored = [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY seq")]
    name = rename or stored[0]["chain"]
    key, prev = chain.chain_key(file_key, name), chain.ZERO
    with conn:
        for r in stored:
            if r["link"] == 3:
                r["qname"] = "innocent.example"
            r["chain"] = name
            prev = hmac.digest(key, prev + chain.canonical(chain.normalized(r)), "sha256")
            conn.execute("UPDATE audit SET qname = ?, rname = ?, chain = ?, mac = ? WHERE seq = ?",
                         (r["qname"], ".".join(reversed(r["qname"].split("."))), name, prev.hex(), r["seq"]))
    conn.close()


def test_the_current_key_alone_cannot_rewrite_the_past(logged, db, operator_key):
    generation, stolen = chain.read_key(Path(f"{db}.key"))  # today's key, as on the server now
    assert generation == 2
    reseal(db, stolen)
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert f"seq {logged[0]['seq']}: edited or forged (MAC mismatch)" in result.output


def test_a_rewrite_under_the_stolen_generation_leaves_the_old_generation_missing(logged, db, operator_key):
    generation, stolen = chain.read_key(Path(f"{db}.key"))
    reseal(db, stolen, rename=f"test-node#{generation}#feedbeef")
    # every row now verifies as a chain of generation 2, but generation 1 was taken by a chain that is gone
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert f"ok: chain test-node#{generation}#feedbeef: 8 rows" in result.output
    assert "key generations 1 have no chain in the log: a chain was deleted whole" in result.output


def test_the_key_given_must_be_the_operators(logged, db, tmp_path):
    wrong = tmp_path / "wrong.key"
    chain.write_key(wrong, 0, os.urandom(32))
    result = verify(db, wrong)
    assert result.exit_code == 1
    assert "does not descend from the key given" in result.output
    assert "edited or forged (MAC mismatch)" in result.output


def test_rows_from_before_the_chain_are_reported_as_such(db, make_server, stub, operator_key):
    """A version 1 database: the migration adds the columns; its rows are older than any chain."""
    open_store(db).close()  # with the shipped lists
    conn = sqlite3.connect(db)
    for column in ("chain", "link", "mac"):  # back to the version 1 schema
        conn.execute(f"ALTER TABLE audit DROP COLUMN {column}")
    conn.execute("INSERT INTO audit (time, qname, action) VALUES ('2026-01-01T00:00:00.000000Z', 'old.example',"
                 " 'blocked')")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    s = make_server(upstream=(stub.address,))
    ask(s, "chat.deepseek.com")
    assert wait_for(lambda: len(rows(db)) == 2)
    s.stop()
    old, new = rows(db)
    assert old["mac"] is None and old["chain"] is None and new["link"] == 0
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    result = verify(db, operator_key)
    assert result.exit_code == 0, result.output
    assert "1 rows from before the chain started" in result.output


def test_gap_rows_are_chained(tmp_path):
    from sinkhole.audit.writer import AuditLog
    from tests.audit.test_data_faults import event

    db = tmp_path / "a.db"
    out = tmp_path / "op.key"
    assert run(db, "log", "anchor", "--export-key", str(out)).exit_code == 0
    audit = AuditLog(db, "n1", queue_size=3, seed=None)
    for i in range(5):
        audit.submit(event(f"q{i}.example"))
    audit.start()
    audit.close()
    stored = rows(db)
    assert stored[0]["action"] == "gap" and stored[0]["link"] == 0 and stored[0]["mac"]
    assert verify(db, out).exit_code == 0


def test_verify_usage_errors_are_one_line(db, logged, tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    result = run(db, "log", "verify", "--key-file", str(bad))
    assert result.exit_code == 2 and "is not a sinkhole audit key file" in result.output
    exists = tmp_path / "exists.key"
    exists.write_text("x")
    result = run(db, "log", "anchor", "--export-key", str(exists))
    assert result.exit_code == 2 and "the file exists; --force writes over it" in result.output


def test_a_chain_past_several_key_epochs_verifies_and_an_edit_there_is_found(tmp_path):
    from sinkhole.audit.writer import AuditLog
    from tests.audit.test_data_faults import event

    db = tmp_path / "a.db"
    out = tmp_path / "op.key"
    assert run(db, "log", "anchor", "--export-key", str(out)).exit_code == 0
    audit = AuditLog(db, "n1", seed=None)
    audit.start()
    n = 2 * chain.EPOCH_ROWS + 500
    for i in range(n):
        audit.submit(event(f"q{i}.example"))
    audit.close()
    assert audit.written == n
    result = verify(db, out)
    assert result.exit_code == 0, result.output
    assert f"verified: 1 chains, {n} rows" in result.output
    victim = rows(db)[2 * chain.EPOCH_ROWS + 10]
    sql(db, "UPDATE audit SET client = '10.0.0.1' WHERE seq = ?", (victim["seq"],))
    result = verify(db, out)
    assert result.exit_code == 1 and f"seq {victim['seq']}: edited or forged" in result.output


def test_the_mac_covers_every_stored_column_but_seq_and_mac():
    from sinkhole.store.schema import AUDIT_INSERT

    covered = [c for c, _ in chain.MAC_COLUMNS + chain.EXTRA_COLUMNS] + [chain.COUNT]
    assert sorted(covered) == sorted(c for c in AUDIT_INSERT if c not in ("mac", "rname"))
    # Chain.seal's layout: the 14 base columns, the extras, rname (derived from qname), count, then chain, link, mac
    assert AUDIT_INSERT == [c for c, _ in chain.MAC_COLUMNS[:14] + chain.EXTRA_COLUMNS] + ["rname", "count", "chain",
                                                                                           "link", "mac"]
    assert AUDIT_INSERT.index("latency_ms") == 12  # Chain.seal turns it into a float, as SQLite gives it back


def test_a_version_2_database_gains_disabled_categories(tmp_path):
    db = tmp_path / "v2.db"
    open_store(db).close()
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE disabled_categories")
    conn.execute("PRAGMA user_version=2")
    conn.commit()
    conn.close()
    store = open_store(db)
    assert store.set_enabled("genai", False) is True
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    store.close()


def test_rname_is_checked_against_qname_and_group_asked_list_are_covered(tmp_path):
    """Schema 4 columns: grp, asked and list are under the MAC; rname (the index aid) must match qname."""
    from sinkhole.store.schema import AUDIT_INSERT

    db = tmp_path / "v4.db"
    store = open_store(db)
    generation, key, _ = chain.ensure_key(chain.default_key_path(db))  # the operator's copy, taken first
    c = chain.Chain.start(chain.default_key_path(db), "n1")[0]

    def verify_db(db: Path, _key: object) -> chain.Report:
        with Store(db) as store:
            return chain.verify(store, generation, key)

    operator_key = None
    base = (iso(time.time()), "10.0.0.1", "udp", "chat.deepseek.com", "A", "blocked",
            "deepseek.com", "deepseek", "NOERROR", "0.0.0.0", 1, None, None, "n1")
    rows = [(*base, "defence", "Chat.DeepSeek.com", "blocklists/deepseek.txt", "com.deepseek.chat"),
            (*base, None, None, None, None)]
    sealed, _ = c.seal(rows)
    store.insert_audit(sealed)
    store.close()
    assert verify_db(db, operator_key).ok
    conn = sqlite3.connect(db)
    for column, value in (("grp", "default"), ("asked", "chat.deepseek.com"), ("list", "cli"),
                          ("rname", "com.example")):
        saved = conn.execute(f"SELECT {column} FROM audit WHERE seq = 1").fetchone()[0]
        conn.execute(f"UPDATE audit SET {column} = ? WHERE seq = 1", (value,))
        conn.commit()
        report = verify_db(db, operator_key)
        assert not report.ok and "seq 1: edited" in report.problems[0][1], column
        conn.execute(f"UPDATE audit SET {column} = ? WHERE seq = 1", (saved,))
        conn.commit()
    assert verify_db(db, operator_key).ok
    assert len(AUDIT_INSERT) == len(sealed[0])


@pytest.mark.parametrize("n", [1, 255, 256, 257, 300, 5000])
def test_rows_are_stored_in_order_whatever_the_batch_size(db, operator_key, n):
    """The writer stores a batch as INSERTs of 256, 128, ... 1 rows: every row once, in order, each value
    in its column, and the chain verifies."""
    from sinkhole.audit.writer import AuditLog
    from sinkhole.model import AuditEvent

    log = AuditLog(db, "n1", seed=None)
    log.start()
    t0 = time.time()
    for i in range(n):
        log.submit(AuditEvent(t0 + i * 1e-6, f"10.0.{i // 256}.{i % 256}", "udp", f"q{i}.chatgpt.com", 1,
                              "blocked", "chatgpt.com", "genai", 0, "0.0.0.0", 7, group="default", source="s"))
    log.close()
    rows = audit_rows(db)
    assert [r["qname"] for r in rows] == [f"q{i}.chatgpt.com" for i in range(n)]
    assert [r["client"] for r in rows] == [f"10.0.{i // 256}.{i % 256}" for i in range(n)]
    assert [r["seq"] for r in rows] == list(range(rows[0]["seq"], rows[0]["seq"] + n))
    assert {(r["rule"], r["category"], r["policy_version"], r["grp"], r["list"], r["node"]) for r in rows} == {
        ("chatgpt.com", "genai", 7, "default", "s", "n1")}
    assert [r["rname"] for r in rows[:2]] == ["com.chatgpt.q0", "com.chatgpt.q1"][:n]
    result = verify(db, operator_key)
    assert result.exit_code == 0, result.output


@given(st.lists(st.one_of(st.none(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                          st.text()), max_size=24))
def test_the_mac_input_is_the_compact_json_of_the_values(values):
    """The writer's encoder (CPython's C encoder, made once) gives exactly json's compact text: rows sealed
    by one Python verify under another."""
    assert chain.canonical(values) == json.dumps(values, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------- counts (schema 6)

_GOLDEN_BASE = ("2026-12-07T04:00:00.000000Z", "10.0.0.1", "udp", "chat.deepseek.com", "A", "blocked", "deepseek.com",
                "deepseek", "NOERROR", "0.0.0.0", 1, None, None, "n1")
# the MACs Chain.seal gave these two rows before audit rows had a count (commit 760529c), under key bytes(range(32))
_GOLDEN = [((*_GOLDEN_BASE, None, None, None, "com.deepseek.chat"),
            "97bb36ac4b4ade12792f0d703708fffa4b1a40fd075e93cd568ec6db3fa906bd"),
           ((*_GOLDEN_BASE, "default", "Chat.DeepSeek.com", "cli", "com.deepseek.chat"),
            "440f33c56f452f022614002a8b8b2c079a2ec1f8631bc2b0dea67a677b5130f6")]


def test_a_row_of_count_one_is_sealed_exactly_as_before_counts_and_any_other_count_is_not():
    rows = [r for r, _ in _GOLDEN]
    old_macs = [m for _, m in _GOLDEN]

    def macs(sealed: list[tuple]) -> list[str]:
        return [r[-1] for r in sealed]

    def chain_() -> chain.Chain:
        return chain.Chain("n1#0#00000000", 0, bytes(range(32)))

    assert macs(chain_().seal([(*r, 1) for r in rows])[0]) == old_macs
    assert macs(chain_().seal(rows)[0]) == old_macs  # an 18-value row (no count) stands for one answer
    sealed, _ = chain_().seal([(*r, 7) for r in rows])
    assert [r[-4] for r in sealed] == [7, 7]
    first = macs(sealed)[0]
    assert first != old_macs[0]
    assert macs(chain_().seal([(*rows[0], 8)])[0]) != [first]


def _counted_log(db: Path, window: float = 30.0) -> None:
    """A writer with a 30 s window: three names asked 3, 2 and 1 times, then closed (the rows are written at close)."""
    from sinkhole.audit.writer import AuditLog
    from sinkhole.model import AuditEvent

    log = AuditLog(db, "n1", seed=None, window=window)
    log.start()
    t0 = time.time()
    for i, name in enumerate(["a.chatgpt.com"] * 3 + ["b.chatgpt.com"] * 2 + ["c.chatgpt.com"]):
        log.submit(AuditEvent(t0 + i * 0.01, "10.0.0.7", "udp", name, 1, "blocked", "chatgpt.com", "genai", 0,
                              "0.0.0.0", 1, group="default", source="s"))
    log.close()
    assert log.written == 6 and log.rows_written == (3 if window else 6)


def test_a_changed_count_is_found_and_named(db, operator_key):
    _counted_log(db)
    stored = rows(db)
    assert [(r["qname"], r["count"]) for r in stored] == [("a.chatgpt.com", 3), ("b.chatgpt.com", 2),
                                                          ("c.chatgpt.com", 1)]
    assert verify(db, operator_key).exit_code == 0
    for victim, forged in ((stored[0], 2), (stored[0], 1), (stored[2], 5)):
        sql(db, "UPDATE audit SET count = ? WHERE seq = ?", (forged, victim["seq"]))
        result = verify(db, operator_key)
        assert result.exit_code == 1 and f"seq {victim['seq']}: edited or forged" in result.output, result.output
        sql(db, "UPDATE audit SET count = ? WHERE seq = ?", (victim["count"], victim["seq"]))
    assert verify(db, operator_key).exit_code == 0


def test_a_database_from_before_counts_migrates_and_its_rows_still_verify(db, operator_key):
    """Rows written before schema 6 (built here by writing with window 0 and dropping the column, which leaves
    exactly schema 5's table) verify after the migration, with count 1; rows written after it, with counts, too."""
    _counted_log(db, window=0)
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE audit DROP COLUMN count")
    conn.execute("PRAGMA user_version=5")
    conn.commit()
    before = conn.execute("SELECT seq, mac FROM audit ORDER BY seq").fetchall()
    conn.close()
    result = verify(db, operator_key)  # opening the store migrates it
    assert result.exit_code == 0, result.output
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
    assert [(r["seq"], r["mac"], r["count"]) for r in rows(db)] == [(seq, mac, 1) for seq, mac in before]
    _counted_log(db)
    assert [r["count"] for r in rows(db)] == [1] * 6 + [3, 2, 1]
    result = verify(db, operator_key)
    assert result.exit_code == 0, result.output
