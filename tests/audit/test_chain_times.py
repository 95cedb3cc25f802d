"""What a holder of the current audit key can forge, and what `log verify` still tells from the rows' times: a new
chain of rows dated in the past is found by its key generation (newer than chains and journal entries written
later than its rows say) and by an anchor (it is not in it, yet dated before it); times that run backwards
within a chain are found too. Rows come from a real server over real sockets; verify is a real CLI process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sinkhole.audit import chain
from sinkhole.store.db import Store
from sinkhole.store.schema import AUDIT_INSERT, iso
from tests.conftest import ask, audit_rows, wait_for

SINKHOLE = shutil.which("sinkhole", path=str(Path(sys.executable).parent))
DAY = 86400.0


def sinkhole(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SINKHOLE, "--db", str(db), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SINKHOLE_SHIPPED_LISTS": "false"})


def forge(db: Path, times: list[float], node: str = "test-node") -> str:
    """The intruder with the service account: the key file, a chain of its own, rows dated as it likes."""
    c, _, _ = chain.Chain.start(chain.default_key_path(db), node)
    rows = []
    for i, t in enumerate(times):
        values = {"time": iso(t), "client": "10.9.9.9", "transport": "udp", "qname": f"f{i}.chat.deepseek.com",
                  "qtype": "A", "action": "blocked", "rule": "deepseek.com", "category": "deepseek",
                  "rcode": "NOERROR", "answer": "0.0.0.0", "policy_version": 1, "node": node,
                  "rname": ".".join(reversed(f"f{i}.chat.deepseek.com".split(".")))}
        rows.append(tuple(values.get(col) for col in AUDIT_INSERT if col not in ("chain", "link", "mac")))
    sealed, state = c.seal(rows)
    store = Store(db)
    try:
        store.insert_audit(sealed)
    finally:
        store.close()
    c.commit(state)
    return c.name


def served(make_server, stub, db: Path, n: int = 5) -> None:
    s = make_server(upstream=(stub.address,))
    for i in range(n):
        assert ask(s, f"r{i}.chat.deepseek.com").answer[0][0].to_text() == "0.0.0.0"
    s.stop()
    assert wait_for(lambda: len(audit_rows(db)) >= n)


def test_a_new_chain_of_rows_dated_30_days_ago_is_found(make_server, stub, db, operator_key, tmp_path):
    served(make_server, stub, db)
    assert sinkhole(db, "block", "add", "later.example").returncode == 0  # a journal entry, today
    anchor = tmp_path / "heads.jsonl"
    anchor.write_text(sinkhole(db, "log", "anchor").stdout)
    good = sinkhole(db, "log", "verify", "--key-file", str(operator_key), "--anchor", str(anchor))
    assert good.returncode == 0, good.stdout
    now = time.time()
    forged = forge(db, [now - 30 * DAY + i * 60 for i in range(20)])
    r = sinkhole(db, "log", "verify", "--key-file", str(operator_key))
    assert r.returncode == 1, r.stdout
    assert f"BAD: chain {forged}: seq " in r.stdout and "before the chain began" in r.stdout
    r = sinkhole(db, "log", "verify", "--key-file", str(operator_key), "--anchor", str(anchor))
    assert r.returncode == 1 and f"chain {forged}: not in the anchor, so begun after it" in r.stdout, r.stdout


def test_a_chain_whose_times_run_backwards_is_found(make_server, stub, db, operator_key):
    served(make_server, stub, db)
    now = time.time()
    forged = forge(db, [now, now + 1, now - 2 * 3600, now + 2])
    r = sinkhole(db, "log", "verify", "--key-file", str(operator_key))
    assert r.returncode == 1
    assert f"BAD: chain {forged}: times run backwards: seq " in r.stdout and "120 minutes before" in r.stdout


def test_rows_a_queue_held_for_seconds_are_not_a_forgery(make_server, stub, db, operator_key):
    served(make_server, stub, db)
    assert sinkhole(db, "block", "add", "later.example").returncode == 0
    now = time.time()
    forge(db, [now - 20, now - 25, now - 10])  # within a minute: the audit queue, a clock step
    r = sinkhole(db, "log", "verify", "--key-file", str(operator_key))
    assert r.returncode == 0, r.stdout
