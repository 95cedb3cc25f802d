"""The audit writer in a process of its own (issue 16): `AuditProcess`, a worker's audit log, and `serve`, the
writer process's work.

In one process, the audit writer thread takes the interpreter's lock for every row it counts, formats, seals and
inserts, and its garbage is collected on the event loop's time: under load (a) (blocked names, most of them
different) a worker's answers waited up to 5 ms for the lock, and up to 100 ms for a full collection. Here the
worker keeps appends only:

- `submit(event, count)` appends the event's fields as a tuple to a list, `submit_tally` the fast path's rows
  as they come (a tag, the client, the transport, the count and two times; the child makes their events);
- every FLUSH_INTERVAL seconds while events come (a timer on the event loop), or when BATCH events wait, the
  list is pickled into one frame and written to a pipe without blocking. Frames the pipe cannot take wait in an
  outbox. Past SOFT_OUTBOX bytes waiting, a hand-over waits up to MAX_WAIT for the writer process to read
  (backpressure: the answers slow to the pace the writer keeps, as a writer thread's queue makes them); past
  MAX_OUTBOX bytes (a writer stuck, not slow) new answers are dropped and counted, and the child is told, so
  that its gap row counts them.

The writer process is forked when its worker has one thread (a worker at its start: Server.start starts the
audit log first), else started from the interpreter's file (sinkhole.service.audit_child). It runs the same
`AuditLog` a server on its own runs (`build.audit_log`: queue, counting window, batches, reopening, gap rows,
the HMAC chain, shipping) on what it reads, and reports its counters on a second pipe every STATS_INTERVAL
seconds and when it stops; a thread of the worker reads them into the attributes that `metrics` and the stop
line read. It ignores SIGTERM and SIGINT (systemd signals the whole cgroup at stop, a terminal's Ctrl-C the
process group): it stops when its worker says so (`close`), or when the pipe ends because the worker died,
after writing what it holds.

Where a thread may come back from SCHED_IDLE (root, CAP_SYS_NICE, or an RLIMIT_NICE of 20), the writer process
runs at SCHED_IDLE (`idle_if_undoable`): its bursts of writing then never hold a core that an answer is waiting
for (load (a) at 20k q/s: p99 0.44-1.07 ms against 2.6-4.4 ms at normal priority, 4 interleaved runs of
bench/versus.py). While its worker waits for it (backpressure) or stops, the worker gives its threads normal
priority again (`AuditProcess._hurry`), so that a busy machine cannot starve it for long. Elsewhere (the shipped
systemd unit: no capabilities, RLIMIT_NICE 0, and sched_setscheduler filtered) it runs at normal priority.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sinkhole.audit.writer import AuditLog
from sinkhole.model import AuditEvent

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.02  # seconds between two frames, at most, while events come
IDLE_INTERVAL = 0.2  # the same when none came since the last look
BATCH = 512  # events that make a frame at once
MAX_OUTBOX = 64 * 2**20  # bytes of frames waiting for room in the pipe; past it events are dropped and counted
# backpressure: past SOFT_OUTBOX bytes waiting, a hand-over waits (and the answers with it) while the writer process
# reads, at most MAX_WAIT seconds, and not once it has read nothing for STALL seconds (stuck: waiting is useless)
SOFT_OUTBOX = 2**20
MAX_WAIT = 1.0
STALL = 0.5
GC_THRESHOLD = 50_000  # allocations between two collections of the youngest generation, in the writer process
STATS_INTERVAL = 0.5  # seconds between two reports of the child's counters
CLOSE_TIMEOUT = 30.0  # seconds the child has to write what it holds when its pipe ends without a "close"
START_TIMEOUT = 30.0  # seconds the child has to report that its writer runs
PIPE_SIZE = 2**20  # bytes the pipe to the child holds (Linux's default limit for an unprivileged process)
_HEAD = struct.Struct("!I")
# the first statements of a writer process started from the interpreter's file, before any import (the docstring)
_BOOT = ("import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN); "
         "from sinkhole.service.audit_child import main; main()")
# the counters of AuditLog the child reports, as AuditLog names them
COUNTERS = ("written", "rows_written", "write_dropped", "failed_batches", "gaps", "lost_logged", "reopened",
            "wal_checkpoints", "pending")


def idle_if_undoable() -> bool:
    """Put the calling thread, and so the threads it starts from now on, at SCHED_IDLE: on a core only when
    no other thread wants it. Only where that can be undone (sched(7): back to SCHED_OTHER needs CAP_SYS_NICE or
    an RLIMIT_NICE of 20; tried first on a thread of its own, which ends): a writer that could not be given its
    share back would be starved by any busy process, and its worker's answers with it. True if done."""
    undoable: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            undoable.append(True)
        except (OSError, AttributeError):  # not permitted; not Linux
            pass

    prober = threading.Thread(target=probe, name="audit-sched-probe")
    prober.start()
    prober.join()
    if undoable:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    return bool(undoable)


def set_policy(pid: int, policy: int) -> bool:
    """Every thread of process `pid` to scheduling policy `policy` (Linux schedules threads, not processes)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setscheduler(int(tid), policy, os.sched_param(0))
            except ProcessLookupError:  # a thread that ended meanwhile
                pass
    except OSError:
        return False
    return True


def _answers(items: list[tuple]) -> tuple[int, float, float]:
    """(answers, time of the first, time of the last) of submitted items: events and tallies."""
    n, first, last = 0, float("inf"), float("-inf")
    for t in items:
        if len(t) == 2:  # (rows, new): rows of (tag, client, transport, count, first, last)
            for row in t[0]:
                n += row[3]
                first, last = min(first, row[4]), max(last, row[5])
        else:
            n += t[-1]
            first, last = min(first, t[0]), max(last, t[0])
    return n, first, last


def frame(obj: object) -> bytes:
    """`obj` pickled, after its length."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEAD.pack(len(data)) + data


def read_exactly(fd: int, n: int) -> bytes | None:
    """n bytes from fd, or None at the end of the pipe."""
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 2**20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> Any:
    """The next frame's object, or None at the end of the pipe."""
    head = read_exactly(fd, _HEAD.size)
    if head is None:
        return None
    data = read_exactly(fd, _HEAD.unpack(head)[0])
    return None if data is None else pickle.loads(data)


class _Forked:
    """A forked child, as much of subprocess.Popen as AuditProcess uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by another thread's poll meanwhile: gone, as Popen.poll takes it
                if self.returncode is None:
                    self.returncode = 0
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


def _fork(events_fd: int, reports_fd: int, make_log: Callable[[Any, Path], AuditLog]) -> _Forked:
    """The writer process, forked from a process with one thread (a worker starting: workers.worker_main), not
    started from the interpreter's file: no second import of everything, and it works where this process may no
    longer run that file (`user` dropped root, and the interpreter lives under /root)."""
    pid = os.fork()
    if pid:
        return _Forked(pid)
    code = 1
    try:
        # what the worker had made stays as it is: not traversed by this process's collections (nor copied by
        # their reference counting)
        gc.freeze()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as _BOOT: the worker says when to stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        signal.set_wakeup_fd(-1)
        keep = sorted((events_fd, reports_fd))  # and 0, 1, 2: no socket of the worker's stays open here
        os.closerange(3, keep[0])
        os.closerange(keep[0] + 1, keep[1])
        os.closerange(keep[1] + 1, os.sysconf("SC_OPEN_MAX"))
        serve(events_fd, reports_fd, make_log)
        code = 0
    except BaseException:
        log.exception("the audit writer process failed")
    finally:
        os._exit(code)


class AuditProcess(AuditLog):
    """The audit log of a worker whose writer runs in a child process; to the rest of the worker it is an AuditLog
    (submit, mode and wanted, stored_client, close, the counters), built with the same arguments but no shipper
    (the child ships). `spec` is what the child builds its own log from: (settings, database path)."""

    def __init__(self, spec: tuple[Any, Path], make_log: Callable[[Any, Path], AuditLog], *args: Any,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.make_log = make_log
        self._events: list[tuple] = []
        self._outbox: list[list] = []  # [frame, the items in it (None: a message)], oldest first
        self._outbox_bytes = 0
        self._lock = threading.Lock()  # the event loop's flushes against close() in the executor's thread
        self._proc: subprocess.Popen | _Forked | None = None
        self._to_child = -1
        self._from_child = -1
        self._reader: threading.Thread | None = None
        self._final = threading.Event()  # the child's last report arrived (or its pipe ended)
        self._started = threading.Event()
        self._timer: Any = None
        self._closing = False
        self._broken = False  # the pipe to the child broke: what is submitted from now on is lost, and counted
        self.lost_here = 0  # answers dropped in this process (the outbox was full, or the child was gone)
        self.waited = 0.0  # seconds hand-overs waited for the writer process (backpressure, SOFT_OUTBOX)
        self._stalled = False  # the writer process read nothing during the last wait
        self.child_queue_dropped = 0
        self.child_queue = 0
        self._idle = False  # the child runs at SCHED_IDLE (idle_if_undoable), so _hurry may lift it
        self._hurried = False  # ... and it is lifted now

    # ---------------------------------------------------------------- the worker's side

    def start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            fcntl.fcntl(to_child_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # a lower limit (fs.pipe-max-size): the outbox holds what the pipe cannot
            pass
        forked = threading.active_count() == 1
        if forked:
            self._proc = _fork(to_child_r, from_child_w, self.make_log)
        else:
            # a fork would copy the locks the other threads may hold (SQLite's, logging's) as they are
            self._proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(to_child_r), str(from_child_w)],
                                          pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL)
        # stdout and stderr are the worker's: the JSON log (json_log) and the log lines
        log.debug("audit writer process %d %s", self._proc.pid, "forked" if forked else "started")
        os.close(to_child_r)
        os.close(from_child_w)
        self._to_child, self._from_child = to_child_w, from_child_r
        os.write(to_child_w, frame(("start", self.spec, self.mode)))
        os.set_blocking(to_child_w, False)
        self._reader = threading.Thread(target=self._read_reports, name="audit-reports", daemon=True)
        self._reader.start()
        if not self._started.wait(START_TIMEOUT):
            raise RuntimeError(f"the audit writer process did not start within {START_TIMEOUT:.0f} s")
        if self._final.is_set():
            raise RuntimeError("the audit writer process ended at its start; its log lines say why")
        try:
            self._idle = os.sched_getscheduler(self._proc.pid) == os.SCHED_IDLE
        except (OSError, AttributeError):
            self._idle = False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self._timer = loop.call_later(FLUSH_INTERVAL, self._tick, loop)

    def _tick(self, loop: Any) -> None:
        busy = bool(self._events or self._outbox)
        self.flush()
        if not self._closing:
            self._timer = loop.call_later(FLUSH_INTERVAL if busy else IDLE_INTERVAL, self._tick, loop)

    def submit(self, event: AuditEvent, count: int = 1) -> None:
        e = event
        self._events.append((e.time, e.client, e.transport, e.qname, e.qtype, e.action, e.rule, e.category, e.rcode,
                             e.answer, e.policy_version, e.upstream, e.latency_ms, e.group, e.wire, e.source, count))
        if len(self._events) >= BATCH and not self._closing:
            self.flush()

    def submit_tally(self, rows: list[tuple], new: list[tuple]) -> None:
        """The fast path's rows as they are (the child makes their events): a few small tuples a row."""
        self._events.append((rows, new))
        if not self._closing:
            self.flush()

    def flush(self) -> None:
        """Hand what was submitted to the child (what the pipe cannot take now waits in the outbox)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        items, self._events = self._events, []
        if items:
            if self._outbox_bytes >= MAX_OUTBOX or self._broken:
                self._lose(items)
            else:
                self._enqueue(frame(("events", items)), items)
        self._drain()
        if self._outbox_bytes > SOFT_OUTBOX and not self._closing and not self._stalled:
            self._wait_for_writer()

    def _wait_for_writer(self) -> None:
        """Backpressure, as the writer thread's queue gives it (AuditLog): answers slow down to the pace the
        writer process keeps, rather than answers be handed over faster than it can ever write them (then
        dropped, past MAX_OUTBOX). The wait is on the event loop's thread: every answer of this worker waits."""
        started = time.monotonic()
        self._hurry(True)
        self._drain_until(SOFT_OUTBOX, MAX_WAIT, STALL)
        waited = time.monotonic() - started
        self.waited += waited
        log.warning("audit: the writer process is behind (%d KiB waiting): answers waited %.1f ms for it",
                    self._outbox_bytes // 1024, waited * 1000)

    def _hurry(self, hurried: bool) -> None:
        """The child at normal priority while its worker waits for it (hurried), back at SCHED_IDLE once its pipe
        has taken all that waited: a process at SCHED_IDLE gets a core only when nothing else wants one."""
        if not self._idle or hurried == self._hurried:
            return
        if set_policy(self._proc.pid, os.SCHED_OTHER if hurried else os.SCHED_IDLE):
            self._hurried = hurried
        elif hurried:  # not permitted after all: it stays as it is, and is not tried again
            self._idle = False
            log.warning("audit: the writer process could not be given normal priority; it stays at SCHED_IDLE")

    def _enqueue(self, data: bytes, items: list[tuple] | None = None) -> None:
        """A frame into the outbox, counted in its bytes; `items`: the submitted items in it, None for a message."""
        self._outbox.append([data, items])
        self._outbox_bytes += len(data)

    def _drain_until(self, at_most: int, seconds: float, stall: float) -> bool:
        """Write to the child as it reads, until at most `at_most` bytes wait (True), `seconds` have passed, or
        it has read nothing for `stall` seconds (then `_stalled`: stuck, not slow; no more waits till it reads)."""
        deadline = time.monotonic() + seconds
        while self._outbox_bytes > at_most and not self._broken:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not select.select([], [self._to_child], [], min(left, stall))[1]:
                self._stalled = True
                return False
            self._drain()
        return True

    def _drain(self) -> None:
        box = self._outbox
        while box and not self._broken:
            try:
                n = os.write(self._to_child, box[0][0])
            except BlockingIOError:
                return
            except OSError:  # the child is gone: what waits can never be written
                self._broken = True
                for _, items in box:
                    if items:
                        self._count_lost(*_answers(items))
                self._outbox, self._outbox_bytes = [], 0
                return
            self._outbox_bytes -= n
            self._stalled = False
            if n == len(box[0][0]):
                box.pop(0)
                if not box and self._hurried and not self._closing:
                    self._hurry(False)
            else:
                box[0][0] = box[0][0][n:]
                return

    def _lose(self, items: list[tuple]) -> None:
        """Items that cannot be handed over: counted here, and the child is told (its next gap row counts them);
        what new tags stand for is still handed over, for the rows that will use them."""
        answers, first, last = _answers(items)
        self._count_lost(answers, first, last)
        if not self._broken:
            tags = [([], t[1]) for t in items if len(t) == 2 and t[1]]
            self._enqueue((frame(("events", tags)) if tags else b"") + frame(("lost", answers, first, last)))

    def _count_lost(self, answers: int, first: float, last: float) -> None:
        self.lost_here += answers
        self.queue_dropped = self.child_queue_dropped + self.lost_here
        log.error("audit: %d answers could not be handed to the writer process (%s)", answers,
                  "it is gone" if self._broken else "it is behind")

    @property
    def writer_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and not self._final.is_set()

    @property
    def queue_depth(self) -> int:
        return self.child_queue + len(self._events)

    @property
    def writer_store(self) -> None:
        return None  # in the child

    @AuditLog.mode.setter  # type: ignore[attr-defined]
    def mode(self, mode: str) -> None:
        AuditLog.mode.fset(self, mode)  # type: ignore[attr-defined]
        if getattr(self, "_proc", None) is not None:
            with self._lock:
                self._enqueue(frame(("mode", mode)))
                self._drain()

    def close(self, timeout: float = 30.0) -> None:
        """Hand over what is left, let the child write it within `timeout` seconds, and wait for its last report.
        Called from a thread of the executor while the event loop may still run the timer (hence the lock)."""
        if self._proc is None:
            return
        started = time.monotonic()
        with self._lock:
            self._closing = True
            self._hurry(True)  # what it holds is written at normal priority, whatever else runs
            if self._timer is not None:
                self._timer.cancel()  # a timer already running finds _closing set
            self._flush_locked()
            if not self._broken:
                self._enqueue(frame(("close", max(0.5, timeout - 1.0))))
                if not self._drain_until(0, timeout / 2, timeout / 2) and not self._broken:
                    log.error("the audit writer process did not read what was left within %.0f s", timeout / 2)
        if not self._final.wait(max(0.5, timeout - (time.monotonic() - started))):
            log.error("the audit writer process did not finish within %.0f s; %d rows may be lost", timeout,
                      self.queue_depth + self.pending)
        os.close(self._to_child)
        try:
            self._proc.wait(max(0.5, timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def _read_reports(self) -> None:
        """The reader thread: the child's counters into this log's attributes, until its last report."""
        try:
            while True:
                report = read_frame(self._from_child)
                if report is None:
                    break
                for name in COUNTERS:
                    setattr(self, name, report[name])
                self.child_queue_dropped = report["queue_dropped"] - report["told"]  # told: counted in lost_here
                self.child_queue = report["queue"]
                self.queue_dropped = self.child_queue_dropped + self.lost_here
                self.chains = report["chains"]
                self._started.set()
                if report["final"]:
                    break
        finally:
            os.close(self._from_child)
            self._final.set()
            self._started.set()


# ------------------------------------------------------------------------------------------- the child


def report(fd: int, audit: AuditLog, told: list[int], final: bool = False) -> None:
    """The log's counters, one frame on the reports pipe; `told`: [the answers the worker said it lost], which
    queue_dropped counts too (their gap row) and the worker counted already."""
    counters = {name: getattr(audit, name) for name in COUNTERS}
    counters.update(queue_dropped=audit.queue_dropped, told=told[0], queue=audit.queue_depth,
                    chains=list(audit.chains), final=final)
    os.write(fd, frame(counters))


def serve(events_fd: int, reports_fd: int, make_log: Callable[[Any, Path], AuditLog]) -> None:
    """The writer process's work: write what arrives on events_fd into the log `make_log(settings, database)`
    builds (build.audit_log, as a server on its own has it); report on reports_fd."""
    idle_if_undoable()  # before the threads start: they inherit it
    first = read_frame(events_fd)
    if first is None:
        return
    _, (cfg, db), mode = first
    logging.getLogger().setLevel(cfg.process.log_level.upper())  # the worker's (a forked child has it already)
    audit = make_log(cfg, db)
    audit.mode = mode
    # this process only writes: its reading thread need not yield to the writer thread, and its garbage (an
    # event, a key, a row and its MAC input for every answer, hardly any of it in cycles) need not be collected
    # every 700 allocations. The two together: 26.1 against 29.0 us of CPU an answer, median 25.4 against 28.2
    # (bench/writer_process.py, 13 interleaved pairs, 12 of them lower)
    audit.without_yield()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    audit.start()
    lock = threading.Lock()  # one writer of the reports pipe at a time
    stop = threading.Event()
    told = [0]

    def report_every_interval() -> None:
        while not stop.wait(STATS_INTERVAL):
            with lock:
                report(reports_fd, audit, told)

    with lock:
        report(reports_fd, audit, told)  # the first: the writer runs
    threading.Thread(target=report_every_interval, name="audit-reports", daemon=True).start()
    submit, submit_tally, event = audit.submit, audit.submit_tally, AuditEvent
    timeout = CLOSE_TIMEOUT
    high = max(1, audit.queue_size // 5)  # events queued here past which the pipe is left to fill (backpressure)
    while True:
        while audit.queue_depth > high and audit.writer_alive:
            time.sleep(0.002)
        msg = read_frame(events_fd)
        if msg is None:  # the worker is gone: write what is held, as a stop would
            break
        kind = msg[0]
        if kind == "events":
            for item in msg[1]:
                if len(item) == 2:  # (rows, new) of submit_tally
                    submit_tally(*item)
                else:  # an event's fields, then its count
                    submit(event(*item[:-1]), item[-1])
        elif kind == "lost":  # (answers, first, last) the worker dropped: the next gap row counts them
            with lock:
                told[0] += msg[1]
                audit.note_dropped(*msg[1:])
        elif kind == "mode":
            audit.mode = msg[1]
        elif kind == "close":
            timeout = msg[1]
            break
    audit.close(timeout)
    stop.set()
    with lock:
        report(reports_fd, audit, told, final=True)
