"""Fixtures: a local stub upstream, the real server in-process or as a subprocess, DNS clients."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import pytest

from sinkhole.service import build, process
from sinkhole.service.server import Server
from sinkhole.web.front import Front
from tests.dnsstub import StubResolver

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def stub() -> Iterator[StubResolver]:
    with StubResolver() as s:
        yield s


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sinkhole.db"


class RunningServer:
    """The real Server on its own event loop in a thread, on an ephemeral loopback port."""

    def __init__(self, db: Path, **settings: object) -> None:
        settings.setdefault("listen", ("127.0.0.1:0",))
        settings.setdefault("reload_interval", 0.1)
        settings.setdefault("node", "test-node")
        self.cfg = build.load(env={}, flags=settings)
        self.db = db
        self.server: Server | None = None
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            try:
                front = Front()  # the block page and the console, as `serve` runs them
                tls = front.console_tls(self.cfg, self.db)
                self.server = Server(self.cfg, self.db, process.bind(self.cfg), front=front, web_tls=tls)
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                raise
            self._ready.set()
            await self.server.wait()

        try:
            self.loop.run_until_complete(main())
        except BaseException:
            pass

    def start(self) -> RunningServer:
        self.thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        assert self.server is not None
        return self

    def stop(self) -> None:
        if self.server is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.server.request_stop)
        self.thread.join(15)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.listeners[0].port

    @property
    def host(self) -> str:
        assert self.server is not None
        return self.server.listeners[0].host


@pytest.fixture
def operator_key(db: Path, tmp_path: Path) -> Path:
    """The operator's copy of the audit key, exported before the server or a command first writes."""
    from click.testing import CliRunner

    from sinkhole.cli import cli

    out = tmp_path / "offline" / "audit.key"
    out.parent.mkdir()
    result = CliRunner().invoke(cli, ["--db", str(db), "log", "anchor", "--export-key", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "exported audit key generation 0" in result.output
    return out


@pytest.fixture
def make_server(db: Path) -> Iterator:
    started: list[RunningServer] = []

    def make(**settings: object) -> RunningServer:
        s = RunningServer(settings.pop("db", db), **settings).start()  # type: ignore[arg-type]
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def server(make_server, stub: StubResolver) -> RunningServer:
    return make_server(upstream=(stub.address,))


def ask(server: RunningServer, qname: str, qtype: str = "A", tcp: bool = False, edns: bool = True,
        timeout: float = 5.0, **kw: object) -> dns.message.Message:
    """Send one real query with dnspython (a client nobody here wrote) and return the reply."""
    q = dns.message.make_query(qname, qtype, use_edns=0 if edns else False, **kw)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(q, server.host, port=server.port, timeout=timeout)


def audit_rows(db: Path) -> list[dict]:
    """The audit rows, read without creating the file if it is missing."""
    if not db.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return []
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY seq")]
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def ede_of(reply: dns.message.Message) -> list[tuple[int, str]]:
    return [(o.code, o.text or "") for o in reply.options if isinstance(o, dns.edns.EDEOption)]


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports free for both TCP and UDP right now (Unbound binds both on each)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    while len(ports) < n:
        t = socket.socket()
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind(("127.0.0.1", port))
        except OSError:
            t.close()
            u.close()
            continue
        socks += [t, u]
        ports.append(port)
    for sock in socks:
        sock.close()
    return ports


class Clock:
    """A clock moved by hand (`clock.now += seconds`), for code that takes one: Pipeline(clock=), Guard(clock=),
    or a running server's `server.pipeline.clock` set before its first query. Time passes without a sleep."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    """Poll `predicate` until it returns something true; return it, or the last value on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class ServerProcess:
    """`sinkhole serve` as a separate process, for signals and the console script."""

    LISTENING = re.compile(r"listening on udp\+tcp (\S+):(\d+)")

    def __init__(self, db: Path, *args: str, env: dict | None = None) -> None:
        exe = shutil.which("sinkhole", path=str(Path(sys.executable).parent)) or "sinkhole"
        self.cmd = [exe, "--db", str(db), "serve", "--listen", "127.0.0.1:0", *args]
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=full_env)
        self._start()

    def _start(self) -> None:
        """Read stderr up to the line that names the port; then a thread reads the rest into `lines`."""
        self.lines: list[str] = []
        self.port = 0
        self.host = "127.0.0.1"
        deadline = time.monotonic() + 20
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            m = self.LISTENING.search(line)
            if m:
                self.port = int(m.group(2))
                break
        if not self.port:
            self.proc.kill()
            raise RuntimeError("server did not start: " + "".join(self.lines))
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _read_rest(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def serving(self) -> ServerProcess:
        """Wait for the line that says every worker serves (a worker starts its audit writer process before it
        reads the shared sockets; till then the other workers answer what it would)."""
        assert wait_for(lambda: any("forwarding to" in line for line in self.lines)), "".join(self.lines)
        return self

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._drain.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def server_process(db: Path) -> Iterator:
    procs: list[ServerProcess] = []

    def start(*args: str, **kw: object) -> ServerProcess:
        p = ServerProcess(kw.pop("db", db), *args, **kw)  # type: ignore[arg-type]
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()


__all__ = ["Clock", "RunningServer", "ServerProcess", "ask", "dns", "ede_of", "wait_for"]


def query(db: Path, sql: str, args: tuple = ()) -> list[dict]:
    """The rows of one SELECT on the database, as dicts."""
    conn = sqlite3.connect(str(db))
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def select(db: Path, table: str, where: str = "1", order: str = "rowid") -> list[dict]:
    """Rows of a table of the database as dicts (tests that tamper with the log read it this way)."""
    return query(db, f"SELECT * FROM {table} WHERE {where} ORDER BY {order}")


def sql(db: Path, statement: str, args: tuple = ()) -> None:
    """One statement on the database, committed: how the tests play the intruder."""
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute(statement, args)
    finally:
        conn.close()
