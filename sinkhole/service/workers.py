"""Several worker processes on the same sockets, for every core.

service.process binds every listen address (or takes systemd's sockets), drops privileges and
creates the database once; then the supervisor forks the workers: each runs its own event loop, cache,
policy reloader and audit writer on the inherited sockets (the kernel hands each datagram
and connection to one of them). The supervisor restarts a worker that dies, forwards
SIGTERM/SIGINT, speaks sd_notify for all of them, and adds up their counts at the end.

A reload (SIGHUP, or `sinkhole reload` on the control socket, sinkhole.service.control): the supervisor
reads the configuration once and checks it (server.plan_reload); a bad one is refused (logged,
nothing sent), a good one is kept for workers started later and sent to every worker over its
control pipe; each applies it and answers on its pipe. When every worker has answered (or died,
its replacement starting with the new settings), the waiting `sinkhole reload` commands get the
outcome. One reload at a time: requests that come in meanwhile are served by the next one, which
reads the file again. With `metrics` set, the supervisor alone serves /metrics and /healthz,
adding up the snapshots its workers send over their pipes (sinkhole.service.metrics).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import pickle
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sinkhole import logthrottle
from sinkhole.service import build, config, control, metrics, systemd
from sinkhole.service.config import Settings
from sinkhole.service.server import Bound, Front, Server, plan_reload, run_loop, serve

log = logging.getLogger(__name__)

MAX_RESTARTS_PER_MINUTE = 10


@dataclass
class Worker:
    index: int
    pid: int
    fd: int  # its lines to us: ready, beat, metrics, reloaded, the final report
    control_fd: int  # our messages to it: new settings (a length, then the pickled (why, Settings))
    buffer: bytes = b""
    ready: bool = False
    last_beat: float = field(default_factory=time.monotonic)
    report: dict | None = None


@dataclass
class Round:
    """One reload being applied by the workers."""

    waiters: list[socket.socket]  # the `sinkhole reload` connections to answer
    applied: list[str]  # "block_ttl = 30", as the supervisor planned it
    restart: list[str]
    pending: set[int]  # the workers (pids) yet to answer
    workers: int  # how many it was sent to
    refusals: list[str] = field(default_factory=list)


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Supervisor:
    def __init__(self, cfg: Settings, db: Path, count: int, bound: Bound,
                 reload: Callable[[], Settings] | None = None, front: Front | None = None, web_tls: Any = None,
                 early: Callable[[], bool] = lambda: False) -> None:
        """`bound`: every socket, bound by service.process (worker 0 serves rpz_listen's and the block page's;
        this process serves the console's, with `front` and `web_tls`); `early()`: a stop asked for already."""
        self.cfg = cfg
        self.bound = bound
        self.front = front
        self.web_tls = web_tls
        self.early = early
        self.reload = reload
        self.hup = False
        self.snapshots: Any = None  # metrics.WorkerSnapshots when metrics are on
        self.db = db
        self.count = count
        self.workers: dict[int, Worker] = {}
        self.stopping = False
        self.restarts = 0
        self.restart_times: list[float] = []
        self.reports: list[dict] = []
        self.failed = False
        self.control: control.ControlSocket | None = None  # `sinkhole reload`
        self.clients: dict[socket.socket, bytes] = {}  # connected, request not read yet
        self.waiting: list[socket.socket] = []  # asked for a reload not started yet
        self.round: Round | None = None  # the reload being applied

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: object) -> None:
        self.hup = True

    # ------------------------------------------------------------------ reloads

    def _accept(self) -> None:
        assert self.control is not None
        try:
            conn, _ = self.control.sock.accept()
        except OSError:
            return
        conn.setblocking(False)
        self.clients[conn] = b""

    def _read_client(self, conn: socket.socket) -> None:
        """The request line of a `sinkhole reload`; anything else closes the connection."""
        try:
            data = conn.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        line = self.clients[conn] + data
        if data and line == control.REQUEST:
            del self.clients[conn]
            self.waiting.append(conn)
        elif not data or not control.REQUEST.startswith(line):
            del self.clients[conn]
            conn.close()
        else:
            self.clients[conn] = line

    def _start_reload(self) -> None:
        """Read and check the configuration once, then send it to every worker."""
        why = "sinkhole reload" if self.waiting else "SIGHUP"
        waiters, self.waiting, self.hup = self.waiting, [], False
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            if self.reload is None:
                raise ValueError("this server has no configuration to read again")
            new = self.reload()
            plan = plan_reload(self.cfg, new)
        except Exception as exc:  # a bad file never reaches the workers
            log.error("config reload refused, the running settings stay: %s", exc, extra=logthrottle.ALWAYS)
            _answer(waiters, control.Outcome(refused=str(exc), workers=len(self.workers)))
            systemd.notify("READY=1")
            return
        self.cfg = plan.running  # for workers started from now on
        logging.getLogger().setLevel(self.cfg.process.log_level.upper())
        if "log_repeat_interval" in plan.applied:
            logthrottle.set_interval(self.cfg.process.log_repeat_interval)
        message = pickle.dumps((why, new))
        message = struct.pack("!I", len(message)) + message
        sent = set()
        for w in self.workers.values():
            try:
                os.write(w.control_fd, message)  # far below the pipe's buffer: one reload at a time
                sent.add(w.pid)
            except OSError:
                pass  # exiting: its replacement starts with the new settings
        applied = [f"{k} = {config.to_toml(plan.running.value(k))}" for k in plan.applied]
        self.round = Round(waiters, applied, plan.restart, sent, len(self.workers))
        self._finish_reload()

    def _worker_reloaded(self, w: Worker, outcome: control.Outcome) -> None:
        if self.round is None or w.pid not in self.round.pending:
            return
        self.round.pending.discard(w.pid)
        if not outcome.ok:
            self.round.refusals.append(f"worker {w.index}: {outcome.refused}")

    def _finish_reload(self) -> None:
        """Once every worker answered (or died): the outcome to the waiting commands, the log, systemd."""
        r = self.round
        if r is None or r.pending:
            return
        self.round = None
        if r.refusals:
            outcome = control.Outcome(refused="; ".join(r.refusals), workers=r.workers)
            log.error("config reload refused by %d of %d workers: %s", len(r.refusals), r.workers, outcome.refused,
                      extra=logthrottle.ALWAYS)
        else:
            outcome = control.Outcome(applied=r.applied, restart=r.restart, workers=r.workers)
            log.info("config reloaded by %d workers: %s%s", r.workers,
                     f"applying {', '.join(r.applied)}" if r.applied else "no change to apply",
                     f"; needs a restart: {', '.join(r.restart)}" if r.restart else "")
        _answer(r.waiters, outcome)
        systemd.notify("READY=1")

    def _close_control(self) -> None:
        """Stopping: nothing more is reloaded; whoever waits is told so."""
        gone = control.Outcome(refused="the server is stopping")
        _answer(self.waiting + (self.round.waiters if self.round else []) + list(self.clients), gone)
        self.waiting, self.clients = [], {}
        if self.round is not None:
            self.round.waiters = []
        if self.control is not None:
            self.control.close()
            self.control = None

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        self.stopping = self.stopping or self.early()  # a stop while starting is a stop
        for host, port, udp, tcp in self.bound.dns:
            kinds = "+".join(k for k, s in (("udp", udp), ("tcp", tcp)) if s is not None)
            log.info("listening on %s %s (%d workers)%s", kinds, _show(host, port), self.count,
                     " (from systemd)" if self.bound.from_systemd else "")
        self.control = control.listen(self.db)
        upstreams = ", ".join(map(str, build.upstreams(self.cfg)))
        interval = systemd.watchdog_interval()
        for index in range(self.count):
            self._spawn(index, interval)
        exporter = console = None
        address = build.metrics_address(self.cfg)
        if address is not None or self.bound.web:  # workers send snapshots for /metrics and the console
            self.snapshots = metrics.WorkerSnapshots()
            self.snapshots.expected = self.count
            if address is not None:
                exporter = self.snapshots.exporter(address)
        if self.bound.web and self.front is not None:
            try:
                console = self.front.console(self.cfg, self.db, self.bound.web, self.web_tls,
                                             self.snapshots.snapshots, self.snapshots.problems)
            except Exception as exc:  # a console that cannot start must not leave the workers running alone
                log.error("web console: %s", exc)
                self.stopping = True
                self.failed = True
        notified_ready = False
        last_ping = 0.0
        sent_stop = False
        while self.workers:
            if self.stopping and not sent_stop:
                systemd.notify("STOPPING=1")
                self._close_control()
                for pid in self.workers:
                    _kill(pid, signal.SIGTERM)
                sent_stop = True
            if (self.hup or self.waiting) and self.round is None and not self.stopping:
                self._start_reload()
            fds: list = [w.fd for w in self.workers.values()] + list(self.clients)
            if self.control is not None:
                fds.append(self.control.sock)
            try:
                readable, _, _ = select.select(fds, [], [], 0.2)
            except InterruptedError:
                readable = []
            for w in list(self.workers.values()):
                if w.fd in readable:
                    self._read(w)
            for conn in list(self.clients):
                if conn in readable:
                    self._read_client(conn)
            if self.control is not None and self.control.sock in readable:
                self._accept()
            self._reap(interval)
            self._finish_reload()
            logthrottle.flush()
            if not notified_ready and all(w.ready for w in self.workers.values()):
                notified_ready = True
                log.info("forwarding to %s with %d workers; audit log %s in %s", upstreams, self.count,
                         self.cfg.audit.log_queries, self.db)
                systemd.notify(f"READY=1\nSTATUS=serving on {', '.join(_show(h, p) for h, p, _, _ in self.bound.dns)}"
                               f" with {self.count} workers")
            now = time.monotonic()
            if interval and notified_ready and not self.stopping and now - last_ping >= interval and all(
                    now - w.last_beat < 3 * interval for w in self.workers.values()):
                systemd.notify("WATCHDOG=1")
                last_ping = now
        self._close_control()
        self.bound.close()
        if console is not None:
            console.stop()
        if exporter is not None:
            exporter.close()
        self._log_totals()
        logthrottle.flush(final=True)
        return 1 if self.failed else 0

    def _spawn(self, index: int, interval: float | None) -> None:
        r, w = os.pipe()
        control_r, control_w = os.pipe()
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(r)
            os.close(control_w)
            # held until the worker's event loop handles them: a stop during start-up is not a crash
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads come from the supervisor, over control_r
            code = 1
            try:
                _die_with(supervisor)
                # worker 0 serves rpz_listen and the block page too; the console stays here, in the supervisor
                mine = Bound(self.bound.dns, self.bound.from_systemd, *((self.bound.rpz, self.bound.blockpage)
                                                                        if index == 0 else (None, [])))
                code = worker_main(self.cfg, self.db, mine, w, index, interval, supervisor, self.reload, control_r,
                                   self.front)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                os._exit(code)
        os.close(w)
        os.close(control_r)
        self.workers[pid] = Worker(index, pid, r, control_w)

    def _read(self, w: Worker) -> None:
        try:
            data = os.read(w.fd, 65536)
        except OSError:
            data = b""
        w.buffer += data
        while b"\n" in w.buffer:
            line, w.buffer = w.buffer.split(b"\n", 1)
            if line == b"ready":
                w.ready = True
            elif line == b"beat":
                w.last_beat = time.monotonic()
            elif line.startswith(b"reloaded "):
                self._worker_reloaded(w, control.Outcome.from_line(line[9:]))
            elif line.startswith(b"metrics "):
                if self.snapshots is not None:
                    self.snapshots.update(w.pid, json.loads(line[8:]))
            elif line.startswith(b"{"):
                w.report = json.loads(line)

    def _reap(self, interval: float | None) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            self._read(w)
            os.close(w.fd)
            os.close(w.control_fd)
            if self.round is not None:  # its replacement starts with the new settings
                self.round.pending.discard(pid)
            if self.snapshots is not None:
                self.snapshots.exited(pid)  # its counters stay in the sums
            if w.report:
                self.reports.append(w.report)
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                if code != 0:
                    self.failed = True
                continue
            now = time.monotonic()
            self.restart_times = [t for t in self.restart_times if now - t < 60] + [now]
            if len(self.restart_times) > MAX_RESTARTS_PER_MINUTE:
                log.error("worker %d exited (%s); %d restarts in a minute: giving up", w.index, code,
                          len(self.restart_times))
                self.failed = True
                self.stopping = True
                continue
            self.restarts += 1
            if self.snapshots is not None:
                self.snapshots.restarts = self.restarts
            log.error("worker %d (pid %d) exited with %s; starting it again", w.index, pid, code)
            self._spawn(w.index, interval)
            self.workers[next(reversed(self.workers))].ready = True  # the others keep READY as it was

    def _log_totals(self) -> None:
        counts: dict[str, int] = {}
        written = rows = dropped = 0
        for r in self.reports:
            for k, v in r.get("counts", {}).items():
                counts[k] = counts.get(k, 0) + v
            written += r.get("written", 0)
            rows += r.get("rows", 0)
            dropped += r.get("dropped", 0)
        log.info("stopped: %s; audit answers written %d in %d rows, dropped %d (%d workers, %d restarts)",
                 ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no queries", written, rows, dropped,
                 self.count, self.restarts)


def _answer(conns: list[socket.socket], outcome: control.Outcome) -> None:
    """Write the outcome to each waiting `sinkhole reload` and close its connection (one that left is skipped)."""
    line = outcome.to_line()
    for conn in conns:
        try:
            conn.setblocking(True)
            conn.settimeout(1.0)
            conn.sendall(line)
        except OSError:
            pass
        finally:
            conn.close()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _die_with(supervisor: int) -> None:
    """Linux: SIGTERM this process when the supervisor dies (checked again after, for the race)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the worker's own poll of getppid() does it
    if os.getppid() != supervisor:
        os._exit(0)


def worker_main(cfg: Settings, db: Path, bound: Bound, fd: int, index: int, interval: float | None, parent: int,
                reload: Callable[[], Settings] | None = None, control_fd: int | None = None,
                front: Front | None = None) -> int:
    """One worker: a server on the inherited sockets (server.serve) until SIGTERM/SIGINT; it tells the supervisor
    over `fd` when it is ready, beats, sends its metrics snapshots and its final counts; new settings come over
    `control_fd` and are answered on `fd` ("reloaded" and the outcome)."""
    link = _SupervisorLink(fd, parent, interval, control_fd, metrics_on=(build.metrics_address(cfg) is not None
                                                                          or bool(cfg.web.web_listen)))
    server = Server(cfg, db, bound, worker=index, reload=reload, front=front)
    run_loop(lambda: serve(server, after_start=link.started, after_stop=link.stopped))
    return 0


class _SupervisorLink:
    """A worker's side of its pipes to the supervisor."""

    def __init__(self, fd: int, parent: int, interval: float | None, control_fd: int | None,
                 metrics_on: bool) -> None:
        self.fd = fd
        self.parent = parent
        self.interval = interval
        self.control_fd = control_fd
        self.metrics_on = metrics_on  # the supervisor serves /metrics or the console: it needs our counters
        self.tasks: list[asyncio.Task[None]] = []

    def say(self, line: str) -> None:
        try:
            os.write(self.fd, line.encode() + b"\n")
        except OSError:
            pass

    async def started(self, server: Server) -> None:
        loop = asyncio.get_running_loop()
        if self.control_fd is not None:
            pending = bytearray()
            control_fd = self.control_fd

            def on_control() -> None:
                """A length, then the pickled (why, Settings) the supervisor read: apply it and answer."""
                try:
                    data = os.read(control_fd, 65536)
                except BlockingIOError:
                    return
                if not data:  # the supervisor is gone; beat() stops us
                    loop.remove_reader(control_fd)
                    return
                pending.extend(data)
                while len(pending) >= 4 and len(pending) >= 4 + struct.unpack("!I", pending[:4])[0]:
                    size = struct.unpack("!I", pending[:4])[0]
                    why, new = pickle.loads(bytes(pending[4:4 + size]))
                    del pending[:4 + size]
                    self.say("reloaded " + server.reload_config(new, why).to_line().decode().rstrip("\n"))

            os.set_blocking(control_fd, False)
            loop.add_reader(control_fd, on_control)
        self.say("ready")
        self.tasks.append(loop.create_task(self._beat(server)))
        if self.metrics_on:
            self.tasks.append(loop.create_task(self._report(server)))

    async def _beat(self, server: Server) -> None:
        while True:
            if os.getppid() != self.parent:  # the supervisor is gone: do not keep the port alone
                server.request_stop()
                return
            if self.interval:
                self.say("beat")
            await asyncio.sleep(min(self.interval or 1.0, 1.0))

    async def _report(self, server: Server) -> None:  # counters for the supervisor's /metrics and console
        while True:
            self.say("metrics " + json.dumps(metrics.snapshot(server)))
            await asyncio.sleep(metrics.SNAPSHOT_INTERVAL)

    async def stopped(self, server: Server) -> None:
        for task in self.tasks:
            task.cancel()
        if self.metrics_on:
            self.say("metrics " + json.dumps(metrics.snapshot(server)))  # the last counters, after the drain
        self.say(json.dumps({"counts": server.pipeline.counts, "written": server.audit.written,
                             "rows": server.audit.rows_written, "dropped": server.audit.dropped}))
