"""`sinkhole user add|passwd|remove|unlock|list`: the web console's accounts, from the CLI, on a real database;
and a console served by the supervisor of two workers (`sinkhole serve --workers 2 --web-listen`)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx

from sinkhole.store.db import Store
from tests.cli.test_cli import SINKHOLE, one_line_error, os_user, run
from tests.conftest import query, wait_for

GOOD = "a long enough password"


def run_process(*args: str, input_text: str = "") -> subprocess.CompletedProcess[str]:
    """The installed console script as a separate process, with `input_text` on its standard input."""
    assert SINKHOLE
    return subprocess.run([SINKHOLE, *args], input=input_text, capture_output=True, text=True, timeout=30)


def run_input(db: Path, *args: str, input_text: str):
    from click.testing import CliRunner

    from sinkhole.cli import cli

    return CliRunner().invoke(cli, ["--db", str(db), *args], input=input_text, catch_exceptions=False)


def test_user_add_stores_an_argon2id_hash_and_journals_it(db: Path) -> None:
    result = run_input(db, "user", "add", "Alice", "--role", "admin", "--password-stdin", input_text=GOOD + "\n")
    assert result.exit_code == 0 and result.output.strip() == "added account alice (admin)"
    row = query(db, "SELECT name, role, hash FROM web_users")[0]
    assert (row["name"], row["role"]) == ("alice", "admin")
    assert row["hash"].startswith("$argon2id$") and GOOD not in row["hash"]
    entry = query(db, "SELECT * FROM journal WHERE action = 'user add'")[0]
    assert entry["user"] == os_user() and json.loads(entry["detail"]) == {"account": "alice", "role": "admin"}
    assert entry["mac"] is not None
    listed = json.loads(run(db, "user", "list", "--format", "json").output)
    assert listed["name"] == "alice" and "hash" not in listed


def test_user_add_prompts_twice_and_bad_input_is_one_line_and_writes_nothing(db: Path) -> None:
    result = run_input(db, "user", "add", "bob", "--role", "auditor", input_text=f"{GOOD}\n{GOOD}\n")
    assert result.exit_code == 0, result.output
    mismatch = run_input(db, "user", "add", "carol", "--role", "auditor", input_text=f"{GOOD}\nother one!!\n"
                                                                                     f"{GOOD}\n{GOOD}\n")
    assert mismatch.exit_code == 0 and "do not match" in mismatch.output  # click asks again
    before = query(db, "SELECT * FROM journal")
    for args, text in ((["dave", "--role", "viewer"], "short\n"), (["bad name", "--role", "viewer"], GOOD + "\n"),
                       (["bob", "--role", "viewer"], GOOD + "\n")):
        result = run_process("--db", str(db), "user", "add", *args, "--password-stdin", input_text=text)
        assert result.returncode == 2, result.stderr
        assert one_line_error(result).startswith("sinkhole: ")
    bad_role = run_process("--db", str(db), "user", "add", "erin", "--role", "root", "--password-stdin",
                           input_text=GOOD + "\n")
    assert bad_role.returncode == 2
    assert query(db, "SELECT * FROM journal") == before
    assert [r["name"] for r in query(db, "SELECT name FROM web_users ORDER BY name")] == ["bob", "carol"]


def test_passwd_unlock_and_remove_end_sessions_and_are_journaled(db: Path) -> None:
    from sinkhole.store.accounts import Accounts, Session

    assert run_input(db, "user", "add", "bob", "--role", "viewer", "--password-stdin",
                     input_text=GOOD + "\n").exit_code == 0
    with Store(db) as store:
        accounts = Accounts(store)
        now = time.time()
        accounts.login_succeeded("bob", "10.0.0.9", Session("s1", "bob", "viewer", "c", now, now, "10.0.0.9"), False)
        for _ in range(5):
            accounts.login_failed("bob", "10.0.0.9", "wrong password", True)
    assert json.loads(run(db, "user", "list", "--format", "json").output)["locked_until"] is not None
    result = run_input(db, "user", "passwd", "bob", "--password-stdin", input_text="another password\n")
    assert result.exit_code == 0 and "1 sessions ended" in result.output
    row = json.loads(run(db, "user", "list", "--format", "json").output)
    assert row["locked_until"] is None and row["failures"] == 0 and row["sessions"] == 0
    assert run(db, "user", "unlock", "bob").output.strip() == "bob was not locked"
    assert run(db, "user", "remove", "bob").output.strip() == "removed account bob"
    missing = run_process("--db", str(db), "user", "remove", "bob")
    assert missing.returncode == 2 and "no account 'bob'" in one_line_error(missing)
    actions = [r["action"] for r in query(db, "SELECT action FROM journal WHERE action LIKE 'user %' OR action LIKE"
                                              " 'web %' ORDER BY id")]
    assert actions == ["user add", "web login", *["web login failed"] * 5, "web lockout", "user passwd",
                       "user unlock", "user remove"]


def test_account_entries_do_not_make_a_running_server_read_its_policy_whole(db: Path) -> None:
    from sinkhole.policy.decide import Policy
    from sinkhole.store.db import open_store

    with open_store(db) as store:
        policy = store.load_policy()
    assert run_input(db, "user", "add", "bob", "--role", "viewer", "--password-stdin",
                     input_text=GOOD + "\n").exit_code == 0
    with Store(db) as store:
        patched = store.patch_policy(policy)
        assert store.policy_version() == policy.version
    assert isinstance(patched, Policy) and patched.version == policy.version  # nothing re-read, no new version


def test_with_two_workers_the_supervisor_serves_the_console(server_process, db: Path) -> None:
    assert run_input(db, "user", "add", "vic", "--role", "viewer", "--password-stdin",
                     input_text=GOOD + "\n").exit_code == 0
    proc = server_process("--workers", "2", "--web-listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9")
    line = wait_for(lambda: next((x for x in proc.lines if "web console on" in x), None), 20.0)
    assert line, "".join(proc.lines)
    url = line.rsplit(" ", 1)[1].strip().rstrip("/")
    http = httpx.Client(base_url=url, timeout=30)
    assert http.post("/api/login", json={"name": "vic", "password": GOOD}).status_code == 200
    import dns.message
    import dns.query

    for _ in range(3):
        dns.query.udp(dns.message.make_query("chat.deepseek.com", "A"), "127.0.0.1", port=proc.port, timeout=5)
    d = wait_for(lambda: (d := http.get("/api/dashboard").json())["processes"] == 2 and d, 20.0)
    assert d and d["processes"] == 2 and d["audit"]["writers_up"] == 2  # both workers' snapshots, summed
    assert proc.terminate() == 0


def test_argon2_hashes_and_verifies_under_memory_deny_write_execute() -> None:
    """The unit's MemoryDenyWriteExecute=yes, as the kernel's PR_SET_MDWE gives it to one process: argon2-cffi's
    compiled bindings make no writable-and-executable memory (no ffi.callback)."""
    import sys

    code = ("import ctypes, sys\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "if libc.prctl(65, 1, 0, 0, 0) != 0:\n"  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
            "    sys.exit(77)\n"
            "from sinkhole.web import sessions\n"
            "h = sessions.hash_password('a long enough password')\n"
            "assert sessions.verify_password(h, 'a long enough password')\n"
            "assert not sessions.verify_password(h, 'another password!')\n"
            "print('ok', h[:9])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if out.returncode == 77:
        import pytest

        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 and later have it)")
    assert out.returncode == 0 and out.stdout.strip() == "ok $argon2id", out.stderr
