"""Long commands (lists import/update, export rpz, log verify/prune, stats, report) show progress on a terminal
(stderr a pseudo-terminal here): a bar with done/total, percent, time left and rate; nothing at all when stderr is
piped or with --quiet, and stdout the same either way."""

from __future__ import annotations

import os
import pty
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sinkhole.store.audit import STATS_QUERIES
from sinkhole.store.db import Store
from tests.audit.test_data_faults import event
from tests.conftest import operator_key  # noqa: F401  (a fixture)

EXE = shutil.which("sinkhole", path=str(Path(sys.executable).parent)) or "sinkhole"
BAR = re.compile(r"(?P<label>[\w: -]+?)  \[[#-]{24}\]  (?P<done>\d+)/(?P<total>\d+)\s+(?P<pct>\d+)%"
                 r"(?:  (?P<rate>[\d,]+) (?P<unit>\w+)/s(?:, (?P<eta>\d\d:\d\d:\d\d) left)?)?")


def on_terminal(db: Path, *args: str) -> tuple[list[dict], str, int]:
    """Run `sinkhole --db DB ARGS` with stderr on a pseudo-terminal and stdout on a pipe: (the bar's frames as
    they were drawn, stdout, exit code). What the terminal got is in `on_terminal.text`."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([EXE, "--db", str(db), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave, text=True)
    os.close(slave)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()))  # type: ignore[union-attr]
    reader.start()
    drawn = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the last holder of the terminal's other side is gone
            break
        if not data:
            break
        drawn += data
    os.close(master)
    code = proc.wait(120)
    reader.join(30)
    text = drawn.decode().replace("\x1b[?25l", "").replace("\x1b[?25h", "")  # click hides the cursor meanwhile
    on_terminal.text = text  # type: ignore[attr-defined]
    return [m.groupdict() for m in BAR.finditer(text)], out[0], code


def piped(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, "--db", str(db), *args], capture_output=True, text=True, timeout=120)


def stages(frames: list[dict]) -> dict[str, dict]:
    """The last frame of each stage, by label."""
    return {f["label"].strip(): f for f in frames}


def check_stage(frames: list[dict], label: str, total: int, unit: str) -> None:
    mine = [f for f in frames if f["label"].strip() == label]
    assert mine, (label, {f["label"] for f in frames})
    assert {int(f["total"]) for f in mine} == {total}
    done = [int(f["done"]) for f in mine]
    assert done == sorted(done) and done[-1] == total and mine[-1]["pct"] == "100"
    assert len(set(done)) >= 3  # it moved, more than once, before it was full
    running = [f for f in mine if 0 < int(f["done"]) < total]
    assert running and all(f["rate"] and f["unit"] == unit and f["eta"] for f in running)  # rate and time left
    assert mine[-1]["rate"] and not mine[-1]["eta"]  # done: the rate it had


@pytest.fixture
def big_list(tmp_path: Path) -> Path:
    path = tmp_path / "genai-extra.txt"
    path.write_text("".join(f"n{i}.progress-ai.test\n" for i in range(30_000)))
    return path


def test_lists_import_on_a_terminal_shows_lines_checked_and_rules_stored(db, operator_key, big_list):  # noqa: F811
    frames, out, code = on_terminal(db, "lists", "import", str(big_list), "--category", "extra")
    assert code == 0
    check_stage(frames, "format", 30_000, "lines")  # --format auto looks at every line first
    check_stage(frames, "checking", 30_000, "lines")
    check_stage(frames, "storing", 30_000, "rules")
    assert [f["label"].strip() for f in frames] == sorted((f["label"].strip() for f in frames),
                                                         key=["format", "checking", "storing"].index)
    expected = f"imported 30000 rules (domains) into category extra from {big_list}\n"
    assert out == expected
    plain = piped(db, "lists", "import", str(big_list), "--category", "extra")
    assert (plain.returncode, plain.stdout, plain.stderr) == (0, expected, "")  # piped: nothing extra


def test_a_named_format_skips_the_look_for_one(db, operator_key, big_list):  # noqa: F811
    frames, out, code = on_terminal(db, "lists", "import", str(big_list), "--category", "extra", "--format", "domains")
    assert code == 0 and out.startswith("imported 30000 rules (domains)")
    assert {f["label"].strip() for f in frames} == {"checking", "storing"}
    check_stage(frames, "checking", 30_000, "lines")


def test_quiet_draws_nothing_on_a_terminal(db, operator_key, big_list):  # noqa: F811
    _, out, code = on_terminal(db, "lists", "import", str(big_list), "--category", "extra", "--quiet")
    assert code == 0 and on_terminal.text == ""  # type: ignore[attr-defined]
    assert out.startswith("imported 30000 rules")


def test_a_rejected_list_ends_its_bar_where_it_stopped(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("".join(f"n{i}.progress-ai.test\n" for i in range(25_000)) + "not a domain!\n")
    frames, out, code = on_terminal(tmp_path / "a.db", "lists", "import", str(bad))
    assert code == 2 and out == ""
    assert frames and {f["label"].strip() for f in frames} == {"format", "checking"}
    assert frames[-1]["label"].strip() == "checking" and frames[-1]["pct"] != "100"  # not drawn as done


def test_lists_update_on_a_terminal_names_the_category(db, operator_key, big_list):  # noqa: F811
    assert piped(db, "lists", "import", str(big_list), "--category", "extra").returncode == 0
    big_list.write_text("".join(f"m{i}.progress-ai.test\n" for i in range(20_000)))
    frames, out, code = on_terminal(db, "lists", "update")
    assert code == 0
    check_stage(frames, "extra: format", 20_000, "lines")
    check_stage(frames, "extra: checking", 20_000, "lines")
    check_stage(frames, "extra: storing", 20_000, "rules")
    assert out == f"extra: updated, 20000 rules (domains), was 30000 {big_list}\n"


def test_export_rpz_on_a_terminal_writes_the_same_zone(db, operator_key, tmp_path):  # noqa: F811
    listed = tmp_path / "extra.txt"  # fewer rules than the others: an export takes ~0.2 ms a rule
    listed.write_text("".join(f"n{i}.progress-ai.test\n" for i in range(12_000)))
    assert piped(db, "lists", "import", str(listed), "--category", "extra").returncode == 0
    plain = piped(db, "export", "rpz")
    assert plain.returncode == 0 and plain.stderr == ""
    frames, out, code = on_terminal(db, "export", "rpz")
    assert code == 0 and out == plain.stdout  # the zone, byte for byte
    records = len(out.splitlines()) - 5  # less $ORIGIN, $TTL, SOA, NS and the comment line
    assert records >= 4 * 12_000  # NAME and *.NAME, each with A and AAAA
    rules = int(stages(frames)["building"]["total"])
    assert rules >= 12_000  # the list's, and the shipped ones in force
    check_stage(frames, "building", rules, "rules")
    check_stage(frames, "ordering", records, "records")
    check_stage(frames, "writing", records, "records")


def test_log_verify_and_prune_on_a_terminal(tmp_path, db, operator_key):  # noqa: F811
    from sinkhole.audit.writer import AuditLog

    audit = AuditLog(db, "node1", seed=None)
    now = time.time()
    for i in range(25_000):
        audit.submit(event(f"q{i}.example", now - 400 * 86400 + i))
    audit.start()
    audit.close()
    assert audit.written == 25_000
    args = ("log", "verify", "--key-file", str(operator_key))
    plain = piped(db, *args)
    assert plain.returncode == 0 and plain.stderr == ""
    frames, out, code = on_terminal(db, *args)
    assert code == 0 and out == plain.stdout
    check_stage(frames, "verifying", 25_000, "rows")

    plain = piped(db, "stats", "--since", "2000-01-01")
    frames, out, code = on_terminal(db, "stats", "--since", "2000-01-01")
    assert code == 0 and out == plain.stdout and "25000 blocked queries" in out
    check_stage(frames, "counting", STATS_QUERIES, "queries")

    # the report: the same counting, then the chains verified with the operator's key
    report = ("report", "--since", "2000-01-01", "--key-file", str(operator_key), "--force", "-o")
    plain = piped(db, *report, str(tmp_path / "piped.html"))
    assert plain.returncode == 0 and plain.stderr == "" and "chain: verified" in plain.stdout
    frames, out, code = on_terminal(db, *report, str(tmp_path / "drawn.html"))
    assert code == 0 and "chain: verified" in out
    check_stage(frames, "counting", STATS_QUERIES, "queries")
    check_stage(frames, "verifying", 25_000, "rows")
    assert "25000 blocked queries" in out and "25000 blocked queries" in plain.stdout
    _, out, code = on_terminal(db, *report, str(tmp_path / "quiet.html"), "--quiet")
    assert code == 0 and on_terminal.text == "" and "chain: verified" in out  # type: ignore[attr-defined]

    frames, out, code = on_terminal(db, "log", "prune", "--retention-days", "30")
    assert code == 0 and out.startswith("pruned 25000 audit rows older than ")
    check_stage(frames, "pruning", 25_000, "rows")
    frames, out, code = on_terminal(db, *args)
    assert code == 0 and "verified: " in out


def test_stats_reports_each_of_its_queries(db, operator_key):  # noqa: F811
    calls: list[int] = []
    with Store(db) as store:
        store.stats(progress=calls.append)
    assert calls == [1] * STATS_QUERIES
