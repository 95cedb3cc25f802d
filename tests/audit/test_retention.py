"""Retention: `sinkhole log prune` and the server's periodic prune delete old audit rows but leave checkpoint rows
(a chain of their own) so that `sinkhole log verify` still passes, and still finds what was deleted without one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from sinkhole.audit.writer import AuditLog
from sinkhole.cli import cli
from sinkhole.service import build
from sinkhole.store.db import open_store
from tests.audit.test_data_faults import event
from tests.conftest import ask, select, sql, wait_for

DAY = 86400.0


def run(db: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--db", str(db), *args], catch_exceptions=False)



def rows(db: Path, where: str = "1") -> list[dict]:
    return select(db, "audit", where, "seq")


def write(db: Path, node: str, ages_days: list[float]) -> str:
    """One writer (one chain) storing one blocked row per age, oldest first; returns the chain's name."""
    audit = AuditLog(db, node, seed=None)
    now = time.time()
    for i, age in enumerate(ages_days):
        audit.submit(event(f"q{i}.{node}.example", now - age * DAY))
    audit.start()
    audit.close()
    assert audit.written == len(ages_days)
    return audit.chains[0]


def verify(db: Path, key: Path, *args: str) -> Result:
    return run(db, "log", "verify", "--key-file", str(key), *args)


class _Clock:
    """The time module, `days` ago."""

    def __init__(self, days: float) -> None:
        self.offset = days * DAY

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def time(self) -> float:
        return time.time() - self.offset


@pytest.fixture
def operator_key(operator_key: Path, db: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """conftest's, then the first start (shipped lists, journaled) 600 days ago: the chains below hold rows from
    500 days ago, which a database made today cannot (log verify says so: tests/audit/test_chain_times.py)."""
    from sinkhole.store import journal, rules

    with monkeypatch.context() as m:
        for module in (journal, rules):  # the journal entry's time, and the rules' added_at
            m.setattr(module, "time", _Clock(600))
        open_store(db).close()
    return operator_key


@pytest.fixture
def aged(db: Path, operator_key: Path) -> dict[str, str]:
    """Chain `b`: 4 rows from 500 days ago; then chain `a`: 10 rows from 400..391 days ago, then 5 from today
    (in that order, as a server that wrote them then would have taken their key generations)."""
    b = write(db, "b", [500, 500, 500, 500])
    a = write(db, "a", [400 - i for i in range(10)] + [0.001] * 5)
    assert verify(db, operator_key).exit_code == 0
    return {"a": a, "b": b}


def test_prune_leaves_checkpoints_and_verify_passes(aged, db, operator_key):
    result = run(db, "log", "prune")  # the default: 365 days
    assert result.exit_code == 0, result.output
    assert "pruned 14 audit rows older than" in result.output and "from 2 chains" in result.output
    left = rows(db, "action != 'checkpoint'")
    assert [(r["chain"], r["link"]) for r in left] == [(aged["a"], link) for link in range(10, 15)]
    checkpoints = rows(db, "action = 'checkpoint'")
    assert [r["link"] for r in checkpoints] == [0, 1, 2]
    data = {d.get("chain"): d for d in (json.loads(r["answer"]) for r in checkpoints)}
    assert data[aged["a"]]["first_link"] == 10 and data[aged["a"]]["rows"] == 10
    assert data[aged["b"]]["whole"] is True and data[None]["of"] == 3
    result = verify(db, operator_key)
    assert result.exit_code == 0, result.output
    assert f"ok: chain {aged['a']}: 5 rows, links 10..14" in result.output
    assert "(links 0..9 pruned: checkpoint seq" in result.output
    assert f"pruned: chain {aged['b']}: links 0..3 pruned whole" in result.output
    # the prune is journaled, and the checkpoint rows point at that journal entry
    entry = json.loads(run(db, "changes", "--format", "json").output.splitlines()[-1])
    assert entry["action"] == "log prune" and "pruned 14 audit rows" in entry["detail"]
    assert {r["policy_version"] for r in checkpoints} == {entry["id"]}


def test_deleting_a_row_after_the_checkpoint_is_reported(aged, db, operator_key):
    assert run(db, "log", "prune").exit_code == 0
    first = rows(db, f"chain = '{aged['a']}'")[0]
    assert first["link"] == 10
    sql(db, "DELETE FROM audit WHERE seq = ?", (first["seq"],))
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert "deleted: links 10..10 are missing before it" in result.output


def test_deleting_old_rows_without_a_checkpoint_is_reported(aged, db, operator_key):
    old = rows(db, f"chain = '{aged['a']}'")
    sql(db, "DELETE FROM audit WHERE chain = ? AND link < 3", (aged["a"],))
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert f"seq {old[3]['seq']}: deleted: links 0..2 are missing before it" in result.output
    # and a prune does not launder it: that chain is left alone, and said so
    result = run(db, "log", "prune")
    assert result.exit_code == 1 and f"chain {aged['a']} not pruned" in result.output
    assert verify(db, operator_key).exit_code == 1


def test_rows_deleted_below_an_older_checkpoint_range_are_reported(aged, db, operator_key):
    """A checkpoint at link 6 does not excuse deleting the rows it left (links 6 and 7)."""
    assert run(db, "log", "prune", "--before", "395d").exit_code == 0  # links 0..5 of chain a (400..395 days)
    assert rows(db, f"chain = '{aged['a']}'")[0]["link"] == 6
    assert verify(db, operator_key).exit_code == 0
    sql(db, "DELETE FROM audit WHERE chain = ? AND link IN (6, 7)", (aged["a"],))
    result = verify(db, operator_key)
    assert result.exit_code == 1 and "deleted: links 6..7 are missing before it" in result.output


def test_an_edited_checkpoint_is_reported(aged, db, operator_key):
    assert run(db, "log", "prune").exit_code == 0
    victim = next(r for r in rows(db, "action = 'checkpoint'") if aged["a"] in r["answer"])
    data = json.loads(victim["answer"])
    data["first_link"] = 12  # to hide a deletion of links 10 and 11
    sql(db, "DELETE FROM audit WHERE chain = ? AND link < 12", (aged["a"],))
    sql(db, "UPDATE audit SET answer = ? WHERE seq = ?", (json.dumps(data, separators=(",", ":")), victim["seq"]))
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert f"seq {victim['seq']}: edited or forged (MAC mismatch)" in result.output
    assert "deleted: links 0..11 are missing before it" in result.output, "a bad checkpoint resumes nothing"


def test_a_forged_checkpoint_chain_is_reported(aged, db, operator_key):
    """Without the key an intruder cannot make a checkpoint: one with a made-up MAC hides nothing."""
    sql(db, "DELETE FROM audit WHERE chain = ? AND link < 10", (aged["a"],))
    prev = rows(db, f"chain = '{aged['a']}'")[0]["mac"]  # any MAC will do: the forged row's own cannot be made
    answer = json.dumps({"chain": aged["a"], "first_link": 10, "prev_mac": prev, "rows": 10})
    sql(db, "INSERT INTO audit (time, action, answer, node, chain, link, mac) VALUES (?, 'checkpoint', ?, 'x', "
            "'x:prune#9#00000000', 0, ?)", ("2026-01-01T00:00:00.000000Z", answer, "ab" * 32))
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert "x:prune#9#00000000: seq" in result.output and "edited or forged" in result.output
    assert "deleted: links 0..9 are missing before it" in result.output


def test_chains_pruned_whole_still_pass_the_generation_check(aged, db, operator_key):
    assert run(db, "log", "prune").exit_code == 0
    # now everything, the first checkpoint chain included: chain b is then known only by its key generation
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
    result = run(db, "log", "prune", "--before", future)
    assert result.exit_code == 0, result.output
    assert rows(db, "action != 'checkpoint'") == []
    result = verify(db, operator_key)
    assert result.exit_code == 0, result.output
    assert "have no chain in the log" not in result.output
    generation_b = int(aged["b"].split("#")[1])
    assert f"pruned: the chains of key generations {generation_b}" in result.output
    # deleting the last checkpoint chain whole now leaves its generation (and the rest) unexplained
    last = rows(db, "action = 'checkpoint'")[0]["chain"]
    sql(db, "DELETE FROM audit WHERE chain = ?", (last,))
    result = verify(db, operator_key)
    assert result.exit_code == 1 and "have no chain in the log: a chain was deleted whole" in result.output


def test_a_pruned_anchored_row_is_not_a_truncation(aged, db, operator_key, tmp_path):
    anchor = tmp_path / "heads.jsonl"
    anchor.write_text(run(db, "log", "anchor").output)
    assert run(db, "log", "prune").exit_code == 0  # chain b, anchored at link 3, is gone whole
    result = verify(db, operator_key, "--anchor", str(anchor))
    assert result.exit_code == 0, result.output


def test_server_prunes_old_rows_periodically(make_server, stub, aged, db, operator_key):
    s = make_server(upstream=(stub.address,), retention_days=30, prune_interval=0.2)
    assert wait_for(lambda: rows(db, "action = 'checkpoint'"), timeout=10)
    assert wait_for(lambda: len(rows(db, "action = 'blocked'")) == 5)
    ask(s, "after.chat.deepseek.com")
    assert wait_for(lambda: len(rows(db, "action = 'blocked'")) == 6)
    sql(db, "UPDATE audit SET time = '2000-01-01T00:00:00.000000Z' WHERE qname = 'after.chat.deepseek.com'")
    # the next prune comes by itself; the server's own chain is pruned whole while it is still writing
    assert wait_for(lambda: len(rows(db, "action = 'blocked'")) == 5, timeout=10)
    ask(s, "later.chat.deepseek.com")
    assert wait_for(lambda: len(rows(db, "action = 'blocked'")) == 6)
    assert s.server.pruner is not None and s.server.pruner.pruned >= 15
    s.stop()
    result = verify(db, operator_key)
    assert result.exit_code == 0, result.output


def test_retention_setting(tmp_path, monkeypatch):
    from sinkhole.errors import ConfigError

    assert build.load(env={}).audit.retention_days == 365
    assert build.load(env={"SINKHOLE_RETENTION_DAYS": "0"}).audit.retention_days == 0
    f = tmp_path / "s.toml"
    f.write_text("[server]\nretention_days = 90\n")
    assert build.load(f, env={}).audit.retention_days == 90
    assert build.load(f, env={}, flags={"retention_days": 7}).audit.retention_days == 7
    with pytest.raises(ConfigError):
        build.load(env={"SINKHOLE_RETENTION_DAYS": "-1"})


def test_retention_zero_keeps_everything(make_server, stub, aged, db):
    s = make_server(upstream=(stub.address,), retention_days=0, prune_interval=0.1)
    assert s.server.pruner is None
    ask(s, "x.chat.deepseek.com")
    assert wait_for(lambda: len(rows(db)) == 20)
    assert rows(db, "action = 'checkpoint'") == []
