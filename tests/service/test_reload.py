"""`sinkhole reload` (the unit's ExecReload=): returns once the new settings are in force in every worker,
exit 0; refused settings exit 2 with the reason and the running ones stay; no server, exit 1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.query
import pytest

from sinkhole.service import control
from tests.conftest import wait_for
from tests.service.test_config_cli import journal_entries

EXE = shutil.which("sinkhole", path=str(Path(sys.executable).parent)) or "sinkhole"


def reload(db: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, "--db", str(db), "reload", *args], capture_output=True, text=True, timeout=timeout)


def ttls(p, n: int = 12) -> set[int]:
    """The TTL of a blocked answer, asked `n` times from new source ports (with workers, the kernel spreads them)."""
    out = set()
    for i in range(n):
        r = dns.query.udp(dns.message.make_query(f"t{i}.chat.deepseek.com", "A"), p.host, port=p.port, timeout=5)
        out.add(r.answer[0].ttl)
    return out


@pytest.mark.parametrize("workers", ["1", "2"])
def test_reload_returns_when_every_worker_applied_and_fails_when_refused(server_process, stub, db, tmp_path,
                                                                         workers):
    f = tmp_path / "sinkhole.toml"
    f.write_text(f'upstream = ["{stub.address}"]\nblock_ttl = 60\n')
    p = server_process("--config", str(f), "--workers", workers)
    assert ttls(p) == {60}
    n = int(workers)
    # each reload is in force in every worker when the command returns: no waiting after it
    for ttl in (30, 45, 5):
        f.write_text(f'upstream = ["{stub.address}"]\nblock_ttl = {ttl}\n')
        r = reload(db)
        assert (r.returncode, r.stderr) == (0, "")
        assert r.stdout == f"reloaded: applied block_ttl = {ttl} in {n} worker{'s' if n > 1 else ''}\n"
        assert ttls(p) == {ttl}
    r = reload(db)
    assert r.returncode == 0 and r.stdout.startswith("reloaded: no change to apply in ")

    f.write_text(f'upstream = ["{stub.address}"]\nblock_ttl = 5\nnode = "elsewhere"\n')
    r = reload(db)
    assert r.returncode == 0 and r.stdout.endswith("; needs a restart: node\n")

    f.write_text('block_ttl = "soon"\n')
    r = reload(db)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("sinkhole: reload refused, the running settings stay: ")
    assert str(f) in r.stderr and "block_ttl" in r.stderr and len(r.stderr.splitlines()) == 1
    assert wait_for(lambda: any("ERROR config reload refused" in x for x in p.lines))
    assert ttls(p) == {5}  # the running settings stay

    f.write_text('upstream = ["udp://[::1]:99999"]\n')  # parses as TOML, but not a usable upstream
    r = reload(db)
    assert r.returncode == 2 and "upstream" in r.stderr
    assert ttls(p) == {5}  # not the default TTL the file would have brought back: nothing of it applied
    # the second refusal within the log's repeat interval has its own line with its own reason, at once (not
    # held back as "1 more like this" until the interval ends); the deadline is far past that interval's end
    assert wait_for(lambda: any("ERROR config reload refused" in x and "99999" in x for x in p.lines), 60.0), p.lines
    assert not any("more like this" in x and "config reload refused" in x for x in p.lines)
    assert p.terminate() == 0
    entries = journal_entries(db, "settings reload")  # each applied reload is journaled once, with its cause
    assert len(entries) == 3
    assert {e["command"] for e in entries} == {"sinkhole reload: sinkhole serve read its configuration again"}


def test_reload_without_a_server_is_exit_1(tmp_path: Path) -> None:
    r = reload(tmp_path / "none.db")
    assert r.returncode == 1
    assert r.stderr == (f"sinkhole: no server is running on {tmp_path / 'none.db'} (nothing answers on "
                        f"{tmp_path / 'none.db.control'})\n")


def test_concurrent_reloads_each_get_an_answer(server_process, stub, db, tmp_path):
    f = tmp_path / "sinkhole.toml"
    f.write_text(f'upstream = ["{stub.address}"]\n')
    p = server_process("--config", str(f), "--workers", "2")
    f.write_text(f'upstream = ["{stub.address}"]\nblock_ttl = 7\n')
    procs = [subprocess.Popen([EXE, "--db", str(db), "reload"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(6)]
    outs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 6, outs
    # the first reload applied it; one that came in while it was applied was served by the next round
    assert sum("applied block_ttl = 7 in 2 workers" in out for out, _ in outs) >= 1
    assert all(out.startswith("reloaded: ") for out, _ in outs)
    assert ttls(p) == {7}


def test_control_socket_is_private_replaced_after_a_crash_and_removed_at_stop(server_process, stub, db, tmp_path):
    path = control.path_for(db)
    p = server_process("--upstream", stub.address, "--workers", "1")
    assert wait_for(path.exists)  # bound before READY=1, a moment after the "listening" line
    assert stat.S_ISSOCK(path.lstat().st_mode) and stat.S_IMODE(path.lstat().st_mode) == 0o600
    p.proc.send_signal(signal.SIGKILL)  # dies without removing it
    p.proc.wait(10)
    assert path.exists()
    r = reload(db)
    assert r.returncode == 1 and "no server is running" in r.stderr
    p2 = server_process("--upstream", stub.address, "--workers", "2")
    r = reload(db)
    assert r.returncode == 0 and r.stdout == "reloaded: no change to apply in 2 workers\n"
    assert p2.terminate() == 0
    assert not path.exists()


def test_a_second_server_on_the_same_database_leaves_the_control_socket_to_the_first(server_process, stub, db):
    p1 = server_process("--upstream", stub.address, "--workers", "1")
    assert wait_for(control.path_for(db).exists)
    p2 = server_process("--upstream", stub.address, "--workers", "1")
    assert wait_for(lambda: any("`sinkhole reload` reaches that one" in x for x in p2.lines))
    assert p2.terminate() == 0
    assert control.path_for(db).exists()  # still the first one's
    assert reload(db).returncode == 0
    assert wait_for(lambda: any("config reloaded: no change to apply" in x for x in p1.lines))


def test_reload_reaches_a_server_whose_socket_path_is_too_long_for_sun_path(server_process, stub, tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    db = deep / "sinkhole.db"
    assert len(os.fsencode(control.path_for(db))) > 108
    server_process("--upstream", stub.address, "--workers", "2", db=db)
    r = reload(db)
    assert r.returncode == 0 and r.stdout == "reloaded: no change to apply in 2 workers\n"


def test_outcome_line_round_trips() -> None:
    out = control.Outcome(applied=["block_ttl = 30"], restart=["node"], workers=3)
    assert control.Outcome.from_line(out.to_line()) == out
    assert json.loads(out.to_line())["refused"] == ""
    assert out.describe() == "applied block_ttl = 30 in 3 workers; needs a restart: node"
    assert control.Outcome(refused="bad").describe() == "refused, the running settings stay: bad"
