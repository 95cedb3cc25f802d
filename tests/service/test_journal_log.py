"""Log lines carry their priority into the journal (sd-daemon(3) `<N>` prefixes) when systemd connected
stderr to it, and stay plain lines with a time stamp elsewhere.

systemd sets JOURNAL_STREAM=DEVICE:INODE of the stream it connected; here a pipe stands in for journald's
socket, and its device and inode go into JOURNAL_STREAM the same way. Reading a real journal is in
tests/service/test_systemd_container.py (`make systemd-test`).
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sinkhole.service import systemd
from tests.conftest import ServerProcess, wait_for

EXE = shutil.which("sinkhole", path=str(Path(sys.executable).parent)) or "sinkhole"


def stream_id(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def test_is_journal_only_for_the_stream_journal_stream_names(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    other_r, other_w = os.pipe()
    with os.fdopen(w, "w") as stream, os.fdopen(other_w, "w") as other:
        monkeypatch.setenv("JOURNAL_STREAM", stream_id(w))
        assert systemd.is_journal(stream)
        assert not systemd.is_journal(other)  # e.g. stderr redirected to a file by the service's command
        assert systemd.journal_prefix(systemd.ERR, stream) == "<3>"
        assert systemd.journal_prefix(systemd.ERR, other) == ""
        for bad in ("", "12", "a:b", "1:2:3"):
            monkeypatch.setenv("JOURNAL_STREAM", bad)
            assert not systemd.is_journal(stream)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not systemd.is_journal(stream)
        assert not systemd.is_journal(io.StringIO())  # no file descriptor at all
    os.close(r)
    os.close(other_r)


@pytest.mark.parametrize(("level", "prio"), [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4),
                                             (logging.ERROR, 3), (logging.CRITICAL, 2), (logging.INFO + 5, 6),
                                             (logging.WARNING + 5, 4)])
def test_priority_of_each_level(level: int, prio: int) -> None:
    assert systemd.priority(level) == prio


def _records(handler: logging.Handler) -> None:
    log = logging.getLogger("sinkhole.test-journal")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        log.debug("a debug line")
        log.info("policy version %d in force", 3)
        log.warning("a warning")
        log.error("config reload refused: %s", "bad")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("worker 0 failed")
    finally:
        log.removeHandler(handler)


def test_handler_on_the_journal_prefixes_every_line_with_its_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    monkeypatch.setenv("JOURNAL_STREAM", stream_id(w))
    with os.fdopen(w, "w") as stream:
        _records(systemd.log_handler(stream))
    with os.fdopen(r) as f:
        lines = f.read().splitlines()
    assert lines[:4] == ["<7>DEBUG a debug line", "<6>INFO policy version 3 in force", "<4>WARNING a warning",
                         "<3>ERROR config reload refused: bad"]
    # a traceback is several journal entries: each keeps the error's priority
    assert lines[4] == "<3>ERROR worker 0 failed"
    assert lines[5] == "<3>Traceback (most recent call last):" and lines[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in lines[4:])


def test_handler_elsewhere_writes_plain_lines_with_the_time(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    other_r, other_w = os.pipe()
    monkeypatch.setenv("JOURNAL_STREAM", stream_id(other_w))  # systemd's stream, but stderr went elsewhere
    with os.fdopen(w, "w") as stream:
        _records(systemd.log_handler(stream))
    os.close(other_r)
    os.close(other_w)
    with os.fdopen(r) as f:
        lines = f.read().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} sinkhole INFO policy version 3 in force", lines[1])
    assert lines[3].endswith(" sinkhole ERROR config reload refused: bad")
    assert not any(line.startswith("<") for line in lines)


class JournalServer(ServerProcess):
    """`sinkhole serve` with stderr on a pipe that JOURNAL_STREAM names, as systemd's StandardError=journal."""

    LISTENING = re.compile(r"^<6>INFO listening on udp\+tcp (\S+):(\d+)")

    def __init__(self, db: Path, *args: str) -> None:
        r, w = os.pipe()
        env = {**os.environ, "JOURNAL_STREAM": stream_id(w)}
        self.cmd = [EXE, "--db", str(db), "serve", "--listen", "127.0.0.1:0", *args]
        self.proc = subprocess.Popen(self.cmd, stderr=w, stdout=subprocess.DEVNULL, env=env)
        os.close(w)
        self.proc.stderr = os.fdopen(r)  # read as ServerProcess reads its pipe
        self._start()


def test_server_on_the_journal_logs_errors_as_errors(tmp_path: Path, stub, db: Path) -> None:
    f = tmp_path / "sinkhole.toml"
    f.write_text(f'upstream = ["{stub.address}"]\n')
    p = JournalServer(db, "--config", str(f), "--workers", "1")
    try:
        f.write_text('block_ttl = "soon"\n')
        p.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: any("config reload refused" in x for x in p.lines), timeout=20)
        refused = next(x for x in p.lines if "config reload refused" in x)
        assert refused.startswith("<3>ERROR config reload refused, the running settings stay: ")
        assert p.terminate() == 0
    finally:
        p.kill()
    assert any(x.startswith("<4>WARNING there was no audit key") for x in p.lines)  # a new database's warning
    assert any(x.startswith("<6>INFO stopped: ") for x in p.lines)
    assert all(re.match(r"<[2-7]>", x) for x in p.lines), p.lines  # every line has its priority


def test_cli_errors_on_the_journal_carry_priority_3(tmp_path: Path) -> None:
    r, w = os.pipe()
    env = {**os.environ, "JOURNAL_STREAM": stream_id(w)}
    proc = subprocess.run([EXE, "--db", str(tmp_path / "a.db"), "block", "add", "bad..name"], stderr=w,
                          stdout=subprocess.DEVNULL, env=env, timeout=30)
    os.close(w)
    with os.fdopen(r) as f:
        assert f.read() == "<3>sinkhole: invalid domain 'bad..name': empty label\n"
    assert proc.returncode == 2
    plain = subprocess.run([EXE, "--db", str(tmp_path / "a.db"), "block", "add", "bad..name"],
                           capture_output=True, text=True, env=env, timeout=30)
    assert plain.stderr == "sinkhole: invalid domain 'bad..name': empty label\n"  # not the journal: as before
