"""Who changed the policy: every journal entry is sealed into the journal chain, `sinkhole log verify` finds an
edited, deleted or unsealed entry, and `sinkhole changes` shows who changed what, filtered."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from sinkhole.cli import cli
from sinkhole.store.journal import _safe_user
from tests.conftest import ask, audit_rows, select, sql, wait_for


def run(db: Path, *args: str, env: dict | None = None) -> Result:
    return CliRunner().invoke(cli, ["--db", str(db), *args], catch_exceptions=False, env=env)



def journal(db: Path) -> list[dict]:
    return select(db, "journal", order="id")


@pytest.fixture
def changed(db: Path, operator_key: Path) -> list[dict]:
    """A few changes through the CLI, one of them as if through sudo."""
    assert run(db, "block", "add", "one.example", "two.example", "--note", "TICKET-1").exit_code == 0
    assert run(db, "allow", "add", "ok.example", env={"SUDO_USER": "alice"}).exit_code == 0
    assert run(db, "lists", "disable", "doh-bypass").exit_code == 0
    assert run(db, "block", "remove", "two.example").exit_code == 0
    return journal(db)


def verify(db: Path, key: Path) -> Result:
    return run(db, "log", "verify", "--key-file", str(key))


def test_every_entry_is_sealed_and_verifies(changed, db, operator_key):
    assert all(e["mac"] and e["link"] is not None for e in changed)
    # one key generation per writer: the first command made the database (lists load) and added in one go;
    # each later command takes its own
    first = [e for e in changed if e["action"] in ("lists load", "block add")]
    assert len({e["link"] for e in first}) == 1
    assert len({e["link"] for e in changed}) == 4
    result = verify(db, operator_key)
    assert result.exit_code == 0, result.output
    assert f"ok: journal: {len(changed)} entries (ids 1..{len(changed)}), {len(changed)} sealed" in result.output


def test_an_edited_entry_is_reported(changed, db, operator_key):
    victim = next(e for e in changed if e["action"] == "block add")
    sql(db, "UPDATE journal SET user = 'someone-else' WHERE id = ?", (victim["id"],))
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert f"BAD: journal entry id {victim['id']}: edited, forged or inserted (MAC mismatch)" in result.output


def test_a_deleted_entry_is_reported(changed, db, operator_key):
    victim = next(e for e in changed if e["action"] == "allow add")
    sql(db, "DELETE FROM journal WHERE id = ?", (victim["id"],))
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert (f"journal entry id {victim['id'] + 1}: deleted: entries {victim['id']}..{victim['id']} are missing"
            in result.output)


def test_a_renumbered_or_inserted_entry_is_reported(changed, db, operator_key):
    last = changed[-1]
    forged = dict(last, id=last["id"] + 1, domains='["evil.example"]', action="allow add", kind="allow")
    sql(db, f"INSERT INTO journal ({', '.join(forged)}) VALUES ({', '.join('?' for _ in forged)})",
        tuple(forged.values()))
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert f"journal entry id {last['id'] + 1}: edited, forged or inserted" in result.output


def test_the_newest_entries_deleted_show_against_the_audit_rows(make_server, stub, changed, db, operator_key):
    """Audit rows carry the id of the journal entry in force (their policy version): cutting the journal's tail
    leaves rows pointing past its end."""
    s = make_server(upstream=(stub.address,))
    ask(s, "one.example")
    assert wait_for(lambda: audit_rows(db))
    s.stop()
    assert audit_rows(db)[0]["policy_version"] == changed[-1]["id"]
    sql(db, "DELETE FROM journal WHERE id = ?", (changed[-1]["id"],))
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert (f"audit rows say policy version {changed[-1]['id']} was in force, but the journal ends at id "
            f"{changed[-1]['id'] - 1}") in result.output


def test_without_the_key_the_change_is_made_unsealed_and_verify_names_it(changed, db, operator_key, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    result = run(db, "block", "add", "three.example", env={"SINKHOLE_AUDIT_KEY": str(blocker / "key")})
    assert result.exit_code == 0, "the change itself is not refused"
    assert "blocked: three.example" in result.output
    last = journal(db)[-1]
    assert last["mac"] is None and json.loads(last["domains"]) == ["three.example"]
    result = verify(db, operator_key)
    assert result.exit_code == 1
    assert f"journal entry id {last['id']}: written without a MAC after the journal chain started" in result.output


# ---------------------------------------------------------------------------- sinkhole changes


def changes(db: Path, *args: str) -> list[dict]:
    result = run(db, "changes", "--format", "json", *args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


def test_changes_show_who_and_what(changed, db):
    got = changes(db)
    assert [c["id"] for c in got] == [e["id"] for e in changed]
    add = next(c for c in got if c["action"] == "block add")
    assert add["user"] == _safe_user() and add["sudo_user"] is None and add["host"]
    assert add["command"].startswith("sinkhole")  # under CliRunner, sys.argv is pytest's
    assert add["domains"] == ["one.example", "two.example"] and add["count"] == 2
    assert add["what"] == "2 names: one.example, two.example; TICKET-1" and add["sealed"] is True
    allow = next(c for c in got if c["action"] == "allow add")
    assert allow["sudo_user"] == "alice"
    disable = next(c for c in got if c["action"] == "lists disable")
    assert disable["category"] == "doh-bypass"
    load = next(c for c in got if c["action"] == "lists load")
    assert "rules from" in load["what"]


def test_changes_filters(changed, db):
    assert [c["action"] for c in changes(db, "--user", "alice")] == ["allow add"]
    assert changes(db, "--user", "nobody-at-all") == []
    assert changes(db, "--since", "2999-01-01") == []
    assert len(changes(db, "--since", "1h")) == len(changed)
    assert changes(db, "--until", "2000-01-01") == []
    result = run(db, "changes", "--since", "yesterday-ish")
    assert result.exit_code == 2 and "--since" in result.output


def test_changes_table_and_csv(changed, db):
    table = run(db, "changes").output.splitlines()
    assert table[0].split() == ["time", "id", "user", "sudo_user", "host", "action", "category", "what", "command"]
    assert any("alice" in line and "allow add" in line for line in table[1:])
    parsed = list(csv.DictReader(io.StringIO(run(db, "changes", "--format", "csv").output)))
    remove = next(r for r in parsed if r["action"] == "block remove")
    assert remove["domains"] == "two.example" and remove["count"] == "1" and remove["id"]


def test_changes_on_a_missing_database_is_one_line(tmp_path):
    result = run(tmp_path / "nope.db", "changes")
    assert result.exit_code == 1 and "no database at" in result.output
