"""Files holding personal data, through real CLI processes: explicit modes whatever the umask, outputs that
never write over a file by accident (and never over the database or its key), database paths checked before
anything is made, and read-only commands that never make a database."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SINKHOLE = shutil.which("sinkhole", path=str(Path(sys.executable).parent))


def sinkhole(*args: str, cwd: Path | None = None, env: dict | None = None,
             umask: int = 0o002) -> subprocess.CompletedProcess[str]:
    """The console script in a process of its own, with a permissive umask (explicit modes must not care)."""
    full = {**os.environ, "SINKHOLE_SHIPPED_LISTS": "false", **(env or {})}
    full.pop("SINKHOLE_DB", None)
    return subprocess.run([SINKHOLE, *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=full,
                          umask=umask)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_database_key_and_report_are_0600_in_0700_directories_whatever_the_umask(tmp_path):
    state = tmp_path / "state"
    r = sinkhole("block", "add", "x.example", env={"XDG_STATE_HOME": str(state)})  # the default state directory
    assert r.returncode == 0, r.stderr
    db = state / "sinkhole" / "sinkhole.db"
    assert mode(state) == 0o700 and mode(state / "sinkhole") == 0o700
    made = [p for p in (db, db.with_name("sinkhole.db-wal"), db.with_name("sinkhole.db-shm"),
                        db.with_name("sinkhole.db.key"), db.with_name("sinkhole.db.key.lock")) if p.exists()]
    assert db in made and db.with_name("sinkhole.db.key") in made
    assert {p.name: oct(mode(p)) for p in made} == {p.name: oct(0o600) for p in made}
    out = tmp_path / "report.html"
    assert sinkhole("--db", str(db), "report", "-o", str(out)).returncode == 0
    assert mode(out) == 0o600
    key = tmp_path / "offline" / "audit.key"
    assert sinkhole("--db", str(db), "log", "anchor", "--export-key", str(key)).returncode == 0
    assert mode(key) == 0o600 and mode(key.parent) == 0o700


@pytest.fixture
def db(tmp_path: Path) -> Path:
    db = tmp_path / "s.db"
    assert sinkhole("--db", str(db), "block", "add", "x.example").returncode == 0
    return db


def test_report_never_writes_over_a_file_without_force_nor_ever_over_the_database_or_its_key(db, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("an earlier report\n")
    r = sinkhole("--db", str(db), "report", "-o", str(out))
    assert r.returncode == 2 and "--force" in one_line(r)
    assert out.read_text() == "an earlier report\n"
    assert sinkhole("--db", str(db), "report", "-o", str(out), "--force").returncode == 0
    assert "<html" in out.read_text() and mode(out) == 0o600
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name.startswith("s.db")}
    for target in ("s.db", "s.db.key", "s.db-wal", "s.db-shm"):
        r = sinkhole("--db", str(db), "report", "-o", str(tmp_path / target), "--force")
        assert r.returncode == 2 and "never written over" in one_line(r)
    link = tmp_path / "innocent.html"
    link.symlink_to(db)
    r = sinkhole("--db", str(db), "report", "-o", str(link), "--force")
    assert r.returncode == 2 and "never written over" in one_line(r)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name.startswith("s.db")}
    assert after["s.db"] == before["s.db"] and after["s.db.key"] == before["s.db.key"]


def test_export_key_never_writes_over_a_file_without_force_nor_ever_over_the_key(db, tmp_path):
    copy = tmp_path / "copy.key"
    copy.write_text("something else\n")
    r = sinkhole("--db", str(db), "log", "anchor", "--export-key", str(copy))
    assert r.returncode == 2 and "--force" in one_line(r)
    assert copy.read_text() == "something else\n"
    copy.unlink()
    assert sinkhole("--db", str(db), "log", "anchor", "--export-key", str(copy)).returncode == 0
    assert copy.read_text().startswith("sinkhole-audit-key ")
    # an earlier export of this database's key is written over with --force
    assert sinkhole("--db", str(db), "log", "anchor", "--export-key", str(copy), "--force").returncode == 0
    key = db.with_name("s.db.key")
    held = key.read_bytes()
    for target in (key, db):
        r = sinkhole("--db", str(db), "log", "anchor", "--export-key", str(target), "--force")
        assert r.returncode == 2 and "never written over" in one_line(r)
    assert key.read_bytes() == held


def test_ca_export_never_writes_over_the_database_or_the_keys(db, tmp_path):
    assert sinkhole("--db", str(db), "ca", "init").returncode == 0
    held = {p: p.read_bytes() for p in (db, db.with_name("s.db.key"), tmp_path / "ca" / "ca.key")}
    for target in held:
        r = sinkhole("--db", str(db), "ca", "export", "-o", str(target), "--force")
        assert r.returncode == 2 and "never written over" in one_line(r)
    assert {p: p.read_bytes() for p in held} == held
    assert sinkhole("--db", str(db), "ca", "export", "-o", str(tmp_path / "ca.crt")).returncode == 0


def test_an_unknown_category_or_group_makes_no_database(tmp_path):
    for args, says in ((["lists", "enable", "no-such-list"], "no category"), (["group", "remove", "g"], "no group"),
                       (["block", "add", "x.example", "--group", "g"], "no group")):
        r = sinkhole("--db", str(tmp_path / "new.db"), *args)
        assert r.returncode == 2 and says in one_line(r), args
    assert tree(tmp_path) == set()


@pytest.mark.parametrize("path", ["/dev/null", "file:s.db?mode=rwc", "file:sub/s.db", "DIR", "FILE/s.db"])
def test_a_db_that_is_no_regular_file_path_is_one_line_exit_2_and_nothing_is_made(tmp_path, path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "DIR").mkdir()
    (work / "FILE").write_text("x\n")
    before = tree(work)
    key_there = Path("/dev/null.key").exists()
    for args in (["block", "add", "x.example"], ["block", "list"], ["log", "anchor", "--export-key", "k"],
                 ["serve", "--listen", "127.0.0.1:0"]):
        r = sinkhole("--db", path, *args, cwd=work)
        assert r.returncode == 2, (args, r.stderr)
        one_line(r)
    assert tree(work) == before
    assert Path("/dev/null.key").exists() == key_there  # the old way to get there: `--db /dev/null`


READ_ONLY = [
    ["block", "list"], ["allow", "list"], ["group", "list"], ["group", "show", "default"], ["lists", "show"],
    ["export", "rpz"], ["check", "chat.deepseek.com"], ["log"], ["log", "anchor"], ["stats"], ["changes"],
    ["report", "-o", "r.html"], ["block", "remove", "x.example"], ["allow", "remove", "x.example"],
    ["lists", "disable", "genai"], ["lists", "update"], ["requests", "list"],
    ["requests", "approve", "1"], ["requests", "deny", "1"],
]


@pytest.mark.parametrize("args", READ_ONLY, ids=[" ".join(a) for a in READ_ONLY])
def test_commands_that_read_or_remove_never_make_a_database(tmp_path, args):
    work = tmp_path / "work"
    work.mkdir()
    r = sinkhole("--db", str(work / "typo.db"), *args, cwd=work)
    assert r.returncode == 1 and "no database at" in one_line(r)
    assert tree(work) == set()


def test_export_key_with_force_writes_over_only_an_export_of_this_databases_key(db, tmp_path):
    """--force is not enough to write over another database's exported key (or any file that is not an export
    of this database's key): the operator would lose the only copy that verifies the other one's chains."""
    other = tmp_path / "other" / "o.db"
    other.parent.mkdir()
    theirs = tmp_path / "theirs.key"
    assert sinkhole("--db", str(other), "log", "anchor", "--export-key", str(theirs)).returncode == 0
    held = theirs.read_bytes()
    plain = tmp_path / "notes.txt"
    plain.write_text("not a key\n")
    for target in (theirs, plain):
        r = sinkhole("--db", str(db), "log", "anchor", "--export-key", str(target), "--force")
        assert r.returncode == 2 and "not an export of this database's audit key" in one_line(r), r.stderr
    assert theirs.read_bytes() == held and plain.read_text() == "not a key\n"
    mine = tmp_path / "mine.key"
    assert sinkhole("--db", str(db), "log", "anchor", "--export-key", str(mine)).returncode == 0
    # the server key moves on a generation (a new chain); the older export is still this database's
    assert sinkhole("--db", str(db), "block", "add", "x.example").returncode == 0
    assert sinkhole("--db", str(db), "log", "anchor", "--export-key", str(mine), "--force").returncode == 0


def test_report_into_a_missing_directory_is_a_one_line_error_and_nothing_is_made(db, tmp_path):
    assert sinkhole("--db", str(db), "block", "add", "x.example").returncode == 0
    target = tmp_path / "missing" / "x.html"
    r = sinkhole("--db", str(db), "report", "-o", str(target))
    assert r.returncode == 2 and "no directory" in one_line(r), r.stderr
    assert not target.parent.exists()


def test_private_files_are_written_through_an_unpredictable_new_file(tmp_path, monkeypatch):
    """A link planted at a temporary name the writer could predict (.NAME.PID.tmp) is never followed: the file
    it points at keeps its content and mode."""
    from sinkhole import files
    from sinkhole.audit import chain

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    for name, write in (("report.html", lambda p: files.write_private(p, b"<html>")),
                        ("audit.key", lambda p: chain.write_key(p, 3, b"k" * 32))):
        target = tmp_path / name
        (tmp_path / f".{name}.{os.getpid()}.tmp").symlink_to(victim)
        write(target)
        assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o644
        assert stat.S_IMODE(target.stat().st_mode) == 0o600 and not target.is_symlink()
    assert chain.read_key(tmp_path / "audit.key") == (3, b"k" * 32)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [
        f".audit.key.{os.getpid()}.tmp", f".report.html.{os.getpid()}.tmp"]  # the planted links, and no more
