"""The audit log: the hot path puts events on a bounded queue; one writer thread batches them into SQLite.

The writer survives an unwritable database (locked for long, read-only, disk full, file deleted) by itself:

- a batch that cannot be written stays in a bounded pending buffer and is retried with backoff (capped at
  `retry_cap`); meanwhile the writer keeps draining the queue into that buffer, and what does not fit is
  dropped and counted (`dropped`), as is what the hot path cannot put on a full queue;
- the loss is logged at most once per `loss_log_interval`, not once per batch;
- when writing works again, a `gap` row saying how many rows were lost, between which times and why is
  written first, in the same transaction as the held rows;
- a database file that was deleted or replaced (its path is missing or names another inode) is reopened,
  which creates a new database with the schema at the path;
- `close()` flushes what can be flushed, but gives up after `final_retry` seconds of failed writes (or the
  close timeout) and counts the rest as dropped.

Identical answers (the same client, name, type, action, rule, group, transport, answer and policy version)
within `window` seconds of the first are one row with a `count` (Aggregator, in the writer thread: the hot path
only queues events, as before); the row's time is its first answer's, and it is written when its window ends
(at most `window` seconds after that answer, plus the wait for the next batch) or when the log closes. With
window 0 every answer is a row of count 1. `written` and `dropped` count answers, `rows_written` rows.

Every row the writer stores, gap rows included, is sealed into the writer's chain (sinkhole.audit.chain): one chain
per writer and database file, started at the first write, so that several worker processes each keep their
own verifiable chain. If the audit key cannot be taken, rows are still written, without a MAC (verify reports
them), and a chain is tried again at most every `CHAIN_RETRY` seconds.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path

from sinkhole.audit.chain import Chain, default_key_path
from sinkhole.audit.shipping import Shipper
from sinkhole.dns import codec
from sinkhole.model import Action, AuditEvent
from sinkhole.policy import lists
from sinkhole.policy.names import client_address, reverse_name
from sinkhole.store.db import Store
from sinkhole.store.schema import AUDIT_INSERT, DatabaseError, Seed, iso

log = logging.getLogger(__name__)

MODES = ("blocked", "all", "none")
_QTYPES: dict[int, str] = {}
_BLOCKED_MODE = frozenset({Action.BLOCKED, Action.CNAME_BLOCKED, Action.IP_BLOCKED, Action.CANARY, Action.PAGE})
# log_queries -> the actions audited: blocked names, answers that led to them, bypass attempts; or all; or none
WANTED = {"blocked": _BLOCKED_MODE, "all": frozenset(Action), "none": frozenset()}
GAP = "gap"  # the action of a row that records lost rows
_WAKE = object()  # put by close() to wake a writer waiting on an empty queue


class _EventQueue:
    """The part of queue.Queue the audit log uses, without a lock on the hot path.

    deque.append and popleft are atomic under the GIL; the bound is checked before the
    append (a race can only let it run over by the number of threads). A waiting reader
    sleeps until woken by _WAKE or its timeout: rows are picked up at most that late.
    Past a tenth of the bound the writer is falling behind (it shares the interpreter
    with the event loop): each put then yields the interpreter once, which slows the
    answers a little instead of losing rows later.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.soft_limit = max(1, maxsize // 10)
        self._items: deque[object] = deque()
        self._wake = threading.Event()

    def put_nowait(self, item: object) -> None:
        n = len(self._items)
        if n >= self.soft_limit:
            if n >= self.maxsize and item is not _WAKE:
                raise queue.Full
            # falling behind: give the writer thread the interpreter for a moment rather than lose rows later
            time.sleep(0)
        self._items.append(item)
        if item is _WAKE:
            self._wake.set()

    def get_nowait(self) -> object:
        try:
            return self._items.popleft()
        except IndexError:
            raise queue.Empty from None

    def get(self, timeout: float) -> object:
        try:
            return self._items.popleft()
        except IndexError:
            pass
        self._wake.wait(timeout)
        self._wake.clear()
        return self.get_nowait()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)
WRITE_BUSY_MS = 2000  # how long one write waits for another connection's lock before it counts as failed
FINAL_BUSY_MS = 500  # the same while closing
GAP_MIN_INTERVAL = 1.0  # seconds between gap rows while the database is fine but the queue overflows
# Several writers (one per worker) that are always in a transaction keep SQLite's automatic checkpoint from
# ever starting the WAL over: under sustained load it grew past 500 MiB in 24 s. Past WAL_LIMIT bytes a
# writer runs a RESTART checkpoint (it waits, within the busy timeout, for the others' transactions), and
# journal_size_limit cuts the file back to WAL_LIMIT when the log starts over.
WAL_LIMIT = 64 * 2**20
WAL_CHECK_INTERVAL = 1.0  # seconds between two looks at the WAL's size
CHAIN_RETRY = 10.0  # seconds between two tries to start a chain while the audit key cannot be taken
_UNSEALED = [c for c in AUDIT_INSERT if c not in ("chain", "link", "mac")]  # what _row gives (count last)
assert _UNSEALED[-1] == "count" and AUDIT_INSERT[-3:] == ["chain", "link", "mac"]
_NO_MAC = (None, None, None)
MAX_WINDOW = 30.0  # seconds: a row is dated at its first answer, and verify allows 60 s back within a chain
MAX_OPEN = 20_000  # rows being counted at once; past it the oldest is closed early (many distinct names at once)
_NOT_COUNTED = frozenset({Action.PAGE.value})  # each block page view has its own reference code


def _shipped_seed() -> Iterable[Seed]:
    return lists.seed()


class Aggregator:
    """Identical answers within `window` seconds of the first, as one row with a count.

    `add` takes each event (with the writer's monotonic time); a row that is done goes to `emit(event, count)`: when
    its window has passed (`close_due`, by the monotonic clock, so that a row is written at most `window` seconds
    late whatever the events' own clock says), when an identical answer comes `window` seconds or more after its
    first (by the events' times, which the row shows), when MAX_OPEN rows are open (the oldest), or at `close_all`.
    Two answers are identical when every column but the time is the same (the name as asked is the first's). With
    window 0, or for a block page view, every event is emitted at once with count 1. Used by the writer thread only.
    """

    def __init__(self, window: float, emit: Callable[[AuditEvent, int], None], max_open: int = MAX_OPEN) -> None:
        self.window = window
        self.emit = emit
        self.max_open = max_open
        # key -> [first event, count, monotonic time its window ends], oldest first. An OrderedDict, not a dict: a
        # dict whose oldest entries are popped keeps their empty slots at the front until it resizes, and every
        # look at its first entry (close_due, the eviction at max_open) walks past them: 6.4 us a row at 20,000
        # open rows of distinct names (bench/writer.py), against O(1) here
        self._open: OrderedDict[tuple, list] = OrderedDict()

    def __len__(self) -> int:
        """Rows open."""
        return len(self._open)

    def add(self, e: AuditEvent, now: float, count: int = 1) -> None:
        """`count`: identical answers this event stands for (the fast path hands them over counted already)."""
        window = self.window
        if window <= 0 or e.action in _NOT_COUNTED:
            self.emit(e, count)
            return
        key = (e.client, e.transport, e.qname, e.qtype, e.action, e.rule, e.category, e.rcode, e.answer,
               e.policy_version, e.upstream, e.latency_ms, e.group, e.source)
        entry = self._open.get(key)
        if entry is not None:
            if e.time < entry[0].time + window:
                entry[1] += count
                return
            del self._open[key]
            self.emit(entry[0], entry[1])
        elif len(self._open) >= self.max_open:
            _, (first, counted, _) = self._open.popitem(last=False)
            self.emit(first, counted)
        self._open[key] = [e, count, now + window]

    def close_due(self, now: float) -> None:
        """Emit the rows whose window ended by `now` (they are in the order they were opened)."""
        opened = self._open
        while opened and next(iter(opened.values()))[2] <= now:
            _, (first, count, _) = opened.popitem(last=False)
            self.emit(first, count)

    def close_all(self) -> None:
        opened, self._open = self._open, OrderedDict()
        for first, count, _ in opened.values():
            self.emit(first, count)


class AuditLog:
    """Never blocks the caller: `submit` is a non-blocking put; a full queue drops and counts."""

    def __init__(self, db_path: str | Path, node: str, mode: str = "blocked", queue_size: int = 100_000,
                 batch_size: int = 5000, flush_interval: float = 0.2,
                 seed: Callable[[], Iterable[Seed]] | None = _shipped_seed,
                 key_path: str | Path | None = None, synchronous: str = "NORMAL",
                 client_prefix: tuple[int, int] | None = None, shipper: Shipper | None = None,
                 window: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.db_path = Path(db_path)
        if not 0 <= window <= MAX_WINDOW:  # NaN too
            raise ValueError(f"audit window must be from 0 to {MAX_WINDOW:g} seconds, not {window!r}")
        self.window = window  # seconds within which identical answers are one row (Aggregator); 0: a row each
        self.clock = clock  # the writer's clock for the windows' ends
        self.shipper = shipper  # gets every batch right after it is committed (sinkhole.audit.shipping)
        self.synchronous = synchronous.upper()
        # privacy: store each client as its network (e.g. /24 and /56), never its address
        self.client_prefix = client_prefix
        self._clients: dict[str, str] = {}
        self._rnames: dict[str, str] = {}  # qname -> reversed name (the indexed rname column)
        self._described: dict[int, tuple] = {}  # the fast path's audit tags: tag -> (description, query packet)
        self._writer: _Writer | None = None
        self.key_path = Path(key_path) if key_path is not None else default_key_path(self.db_path)
        self.chains: list[str] = []  # the chains this log started, oldest first
        self.node = node
        self.mode = mode
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        # what a database recreated at db_path (after the file was deleted) is seeded with: without the
        # shipped lists, the next start would find a database with no rules and block nothing
        self.seed = seed
        self.queue_size = queue_size  # events queued for the writer, at most
        self.max_pending = queue_size  # rows held while the database cannot be written
        self.retry_cap = 1.0  # seconds between retries, at most
        self.loss_log_interval = 10.0  # seconds between two log lines about lost rows
        self.final_retry = 3.0  # seconds close() keeps retrying a database that cannot be written
        self._queue = _EventQueue(queue_size)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._deadline = float("inf")
        self.written = 0  # answers stored (the sum of the rows' counts), gap rows not included
        self.rows_written = 0  # rows stored, gap rows not included
        self.queue_dropped = 0  # rows the hot path could not queue (only the hot path writes this)
        self.write_dropped = 0  # answers the writer could not store (only the writer writes this)
        self.failed_batches = 0  # failed write attempts
        self.gaps = 0  # gap rows written
        self.lost_logged = 0  # lost rows that a log line has reported
        self.reopened = 0  # times the database was reopened
        self.wal_limit = WAL_LIMIT
        self.wal_checkpoints = 0  # RESTART checkpoints run because the WAL had grown past wal_limit
        self.pending = 0  # rows held by the writer (being counted, or waiting to be written)
        # the times of the rows the hot path dropped since the last gap row (approximate under races)
        self._drop_first: float | None = None
        self._drop_last: float | None = None

    @property
    def dropped(self) -> int:
        """Answers that will never be stored: queue full, or the database could not be written in time."""
        return self.queue_dropped + self.write_dropped

    @property
    def writer_alive(self) -> bool:
        """The writer thread is running (started, not stopped, not died)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        """Events submitted and not yet taken by the writer."""
        return self._queue.qsize()

    @property
    def writer_store(self) -> Store | None:
        """The store the writer thread writes through (None before its first write, or between two files)."""
        return self._writer.store if self._writer is not None else None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self._mode = mode
        self.wanted = WANTED[mode]  # what the query path reads for every query (a set, not a call)

    def wants(self, action: Action) -> bool:
        return action in self.wanted

    def start(self) -> None:
        if self.shipper is not None:
            self.shipper.start()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def without_yield(self) -> None:
        """`submit` no longer yields the interpreter to the writer thread when the queue is past a tenth of its
        bound (_EventQueue): for a writer process's reading thread (sinkhole.service.audit_process), where no
        answer waits on the put, and a yield for every event only costs both threads a switch."""
        self._queue.soft_limit = self._queue.maxsize

    def submit(self, event: AuditEvent, count: int = 1) -> None:
        """`count`: identical answers `event` stands for (sinkhole.dns.shortcut tallies the fast path's)."""
        try:
            self._queue.put_nowait(event if count == 1 else (event, count))
        except queue.Full:
            self.note_dropped(count, event.time, event.time)

    def submit_tally(self, rows: list[tuple], new: list[tuple]) -> None:
        """The answers the fast path tallied (sinkhole.dns.shortcut): `new` says what the tags first handed over
        now stand for, as (tag, description in shortcut.DESCRIPTION's order, a query packet), then each of `rows`,
        (tag, client, transport, count, first, last), is submitted as `count` answers dated at the first."""
        described = self._described
        for tag, d, wire in new:
            described[tag] = (d, wire)
        submit = self.submit
        for tag, client, transport, count, first, last in rows:
            got = described.get(tag)
            if got is None:  # never described (lost on its way from another process): counted as lost
                self.note_dropped(count, first, last)
                continue
            d, wire = got
            submit(AuditEvent(first, client, transport, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], None, None,
                              d[8], wire, d[10]), count)

    def note_dropped(self, count: int, first: float, last: float) -> None:
        """`count` answers from `first` to `last` (their times) that were never queued: the next gap row counts them."""
        self.queue_dropped += count
        if self._drop_first is None:
            self._drop_first = first
        self._drop_last = last

    def close(self, timeout: float = 30.0) -> None:
        """Write every pending row that can be written within `timeout` seconds, then stop the writer."""
        if self._thread is None:
            return
        started = time.monotonic()
        self._deadline = started + max(timeout - 0.5, 0.0)
        self._stop.set()
        try:
            self._queue.put_nowait(_WAKE)
        except queue.Full:
            pass  # a full queue means the writer is not waiting on it
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("audit writer did not finish within %.0f s; %d rows may be lost", timeout,
                      self._queue.qsize() + self.pending)
        self._thread = None
        if self.shipper is not None:  # what the writer stored last, then the chains' heads
            self.shipper.close(max(0.5, min(3.0, started + timeout - time.monotonic())))

    # ------------------------------------------------------------------ writer thread

    def _row(self, e: AuditEvent, count: int = 1) -> tuple:
        """The row in store.AUDIT_INSERT order, without chain, link and mac (Chain.seal adds them): count last."""
        qtype = _QTYPES.get(e.qtype)
        if qtype is None:  # a str (an HTTP method) stands for itself
            qtype = _QTYPES.setdefault(e.qtype, e.qtype if isinstance(e.qtype, str) else codec.qtype_name(e.qtype))
        asked = None if e.wire is None else codec.asked_name(e.wire, e.qname)
        client = e.client
        if self.client_prefix is not None:
            client = self._truncated(client)
        rname = self._rnames.get(e.qname)  # blocked names repeat: each is reversed once
        if rname is None and e.qname:
            if len(self._rnames) >= 65536:
                self._rnames.clear()
            rname = self._rnames[e.qname] = reverse_name(e.qname)
        return (iso(e.time), client, e.transport, e.qname, qtype, e.action, e.rule, e.category,
                e.rcode if isinstance(e.rcode, str) else codec.rcode_name(e.rcode), e.answer, e.policy_version,
                e.upstream, e.latency_ms, self.node,
                e.group, asked, e.source, rname, count)

    def stored_client(self, client: str) -> str:
        """The client as its rows store it (its network, with log_client_prefix)."""
        return self._truncated(client) if self.client_prefix is not None else client

    def _truncated(self, client: str) -> str:
        done = self._clients.get(client)
        if done is None:
            address = client_address(client)  # a v4-mapped address (dual-stack socket) as its IPv4 one
            if address is None:
                return client
            assert self.client_prefix is not None
            bits = self.client_prefix[0] if address.version == 4 else self.client_prefix[1]
            done = str(ipaddress.ip_network(f"{address}/{bits}", strict=False))
            if len(self._clients) >= 65536:
                self._clients.clear()
            self._clients[client] = done
        return done

    def _run(self) -> None:
        w = self._writer = _Writer(self)
        try:
            w.run()
        except Exception:  # never die silently: the hot path would fill the queue and drop everything
            log.exception("audit writer failed; rows submitted from now on are dropped")
        finally:
            w.close_store()


class _Writer:
    """The state of the writer thread; one instance per AuditLog.start()."""

    def __init__(self, audit: AuditLog) -> None:
        self.wal_checked = time.monotonic()
        self.a = audit
        self.store: Store | None = None
        self.ident: tuple[int, int] | None = None
        self.opened_at = 0.0
        self.suspect = False  # the last write failed: reopen before the next try
        self.reopen_pending = False  # the file was replaced and the new one is not open yet
        self.busy_ms = 0
        self.pending: deque[tuple[AuditEvent, int]] = deque()  # (first answer, count) of the rows to write
        self.counting = Aggregator(audit.window, self.hold)
        self.failing_since: float | None = None
        self.error = ""  # the last write error, for log lines and gap rows
        self.delay = 0.05
        self.last_loss_log = float("-inf")
        self.last_fail_log = float("-inf")
        self.gap_base = 0  # `dropped` when the last gap row was written
        self.last_gap = float("-inf")
        self.lost_first: float | None = None  # times of the rows the writer dropped since then
        self.lost_last: float | None = None
        self.final_give_up: float | None = None
        self.chain: Chain | None = None
        self.chain_ident: tuple[int, int] | None = None  # the database file the chain lives in
        self.chain_retry = float("-inf")

    # ---------------------------------------------------------------- main loop

    def run(self) -> None:
        a = self.a
        while True:
            stopping = a._stop.is_set()
            self.fill(block=not self.pending and not stopping)
            if stopping:
                self.counting.close_all()
            else:
                self.counting.close_due(a.clock())
            a.pending = len(self.pending) + len(self.counting)
            now = time.monotonic()
            if not self.pending:
                self.log_loss(now)
                if stopping and a._queue.empty():
                    self.log_loss(now, force=True)
                    return
                continue
            if stopping and now >= a._deadline:
                self.give_up("the close timeout passed")
                return
            batch = list(islice(self.pending, a.batch_size))
            try:
                gap = self.write(batch, stopping)
            except Exception as exc:  # DatabaseError, OSError; anything else is retried the same way
                self.failed(exc, stopping)
                if stopping and self.final_give_up is not None and time.monotonic() >= self.final_give_up:
                    self.give_up(self.error)
                    return
                self.log_loss(time.monotonic())
                self.backoff(stopping)
                continue
            for _ in batch:
                self.pending.popleft()
            a.pending = len(self.pending) + len(self.counting)
            now = time.monotonic()
            if now - self.wal_checked >= WAL_CHECK_INTERVAL:
                self.wal_checked = now
                self.bound_wal()
            if self.failing_since is not None:
                log.warning("audit: writing to %s again after %.1f s; %s; %d held rows to write", a.db_path,
                            now - self.failing_since,
                            f"gap record written for {gap} lost rows" if gap else "no rows lost", len(self.pending))
                if gap:  # this line reports the loss
                    a.lost_logged = max(a.lost_logged, self.gap_base)
                    self.last_loss_log = now
                self.failing_since = None
                self.delay = 0.05
                self.final_give_up = None
            self.log_loss(now)

    def fill(self, block: bool) -> None:
        """Move queued events into the rows being counted and the pending buffer (a batch when healthy, all
        that fits when failing)."""
        a = self.a
        failing = self.failing_since is not None
        timeout: float | None = a.flush_interval if block else None
        add, clock = self.counting.add, a.clock
        for _ in range(a._queue.maxsize or 1_000_000):  # bounded even while the hot path keeps adding
            if not failing and len(self.pending) >= a.batch_size:
                break
            try:
                item = a._queue.get(timeout=timeout) if timeout else a._queue.get_nowait()
            except queue.Empty:
                break
            timeout = None
            if isinstance(item, AuditEvent):
                add(item, clock())
            elif isinstance(item, tuple):  # (event, count): answers the fast path tallied
                add(item[0], clock(), item[1])
            # else _WAKE
        a.pending = len(self.pending) + len(self.counting)

    def hold(self, first: AuditEvent, count: int) -> None:
        """A row is done counting: to the pending buffer, or lost when the database is failing and it is full."""
        if self.failing_since is not None and len(self.pending) >= self.a.max_pending:
            self.lose(first.time, count)
        else:
            self.pending.append((first, count))

    def backoff(self, stopping: bool) -> None:
        a = self.a
        if stopping:
            time.sleep(max(0.0, min(self.delay, a._deadline - time.monotonic())))
        else:
            a._stop.wait(self.delay)  # close() cuts the wait short
        self.delay = min(self.delay * 2, a.retry_cap)

    # ---------------------------------------------------------------- writing

    def write(self, batch: list[tuple[AuditEvent, int]], stopping: bool) -> int:
        """Store the batch in one transaction in the file at db_path, after a gap row if rows were lost since
        the last one; returns how many lost rows that gap row counts (0: none written).

        Gap rows for a queue that overflows while the database is fine are written at most once a second;
        each one counts every row lost since the previous one."""
        a = self.a
        for _ in range(2):
            store = self.open()
            dropped = a.dropped
            lost = dropped - self.gap_base
            due = (self.failing_since is not None or stopping
                   or time.monotonic() - self.last_gap >= GAP_MIN_INTERVAL)
            gap = self.gap_row(lost) if lost > 0 and due else None
            rows = [a._row(e, n) for e, n in batch]
            if gap is not None:
                rows.insert(0, tuple(gap.get(c) for c in _UNSEALED))
            chain = self.chain_for_file()
            if chain is not None:
                rows, state = chain.seal(rows)
            else:
                rows = [r + _NO_MAC for r in rows]
            last_seq = store.insert_audit(rows)
            if self.identity_changed():
                # deleted or replaced while we wrote: the rows went to a file nobody can read; write them again
                continue
            if chain is not None:
                chain.commit(state)
            a.written += sum(n for _, n in batch)
            a.rows_written += len(batch)
            if a.shipper is not None:
                a.shipper.ship(rows, last_seq)  # queues and returns: never waits for a collector
            if gap is None:
                return 0
            a.gaps += 1
            self.gap_base = dropped
            self.last_gap = time.monotonic()
            self.lost_first = self.lost_last = None
            a._drop_first = a._drop_last = None  # a drop racing with this is counted, its time may be lost
            return lost
        raise OSError(f"{a.db_path} keeps being replaced")

    def bound_wal(self) -> None:
        """A RESTART checkpoint when the WAL file has grown past wal_limit (see WAL_LIMIT)."""
        a = self.a
        try:
            if os.stat(f"{a.db_path}-wal").st_size <= a.wal_limit or self.store is None:
                return
            done = self.store.restart_wal()
        except (OSError, DatabaseError) as exc:
            log.debug("audit: WAL checkpoint of %s: %s", a.db_path, exc)
            return
        if done:
            a.wal_checkpoints += 1

    def chain_for_file(self) -> Chain | None:
        """The chain of the open database file: started at the first write to each file (a file made anew
        after a deletion gets a new chain); None, for now, while the audit key cannot be taken."""
        a = self.a
        if self.chain is not None and self.chain_ident == self.ident:
            return self.chain
        now = time.monotonic()
        if now - self.chain_retry < CHAIN_RETRY:
            return None
        try:
            chain, created, print_ = Chain.start(a.key_path, a.node)
        except Exception as exc:  # OSError, a malformed key file
            self.chain_retry = now
            self.chain = None
            log.error("audit: cannot take the audit key %s (%s); rows are written without a MAC until it "
                      "works (sinkhole log verify will name them)", a.key_path, exc)
            return None
        if created:
            log.warning("audit: there was no audit key, made one at %s: chain %s cannot be verified by anyone; "
                        "copy the key off this host now (sinkhole log anchor --export-key FILE) so that the "
                        "chains started from now on can be", a.key_path, chain.name)
        log.info("audit: chain %s started in %s (key generation %d, fingerprint %s)", chain.name, a.db_path,
                 chain.generation, print_)
        self.chain, self.chain_ident = chain, self.ident
        a.chains.append(chain.name)
        return chain

    def gap_row(self, lost: int) -> dict | None:
        if lost <= 0:
            return None
        a = self.a
        times = [t for t in (self.lost_first, self.lost_last, a._drop_first, a._drop_last) if t is not None]
        first, last = (min(times), max(times)) if times else (time.time(), time.time())
        reason = self.error if self.lost_first is not None else "audit queue full"
        return {
            "time": iso(first), "client": "", "transport": "", "qname": "", "qtype": "", "action": GAP,
            "rule": None, "category": None, "rcode": "",
            "answer": f"lost {lost} rows from {iso(first)} to {iso(last)}: {reason}",
            "policy_version": 0, "upstream": None, "latency_ms": None, "node": a.node, "count": 1,
        }

    def open(self) -> Store:
        """The store for db_path, reopened if the file went away or was replaced, or after a failed write."""
        a = self.a
        replaced = self.store is not None and self.identity_changed()
        reopen = replaced or (self.suspect and time.monotonic() - self.opened_at >= min(a.retry_cap, 1.0))
        if self.store is not None and not reopen:
            if a._stop.is_set() and self.busy_ms != FINAL_BUSY_MS:
                self.set_busy(self.store, FINAL_BUSY_MS)
            return self.store
        if replaced:
            log.warning("audit: %s was deleted or replaced; writing to a new database there", a.db_path)
            self.reopen_pending = True  # counted once the new one is open (opening it may fail and be retried)
        self.close_store()
        seed = a.seed() if a.seed is not None and not a.db_path.exists() else None
        self.opened_at = time.monotonic()
        store = Store(a.db_path, seed=seed, synchronous=a.synchronous)
        try:
            self.set_busy(store, FINAL_BUSY_MS if a._stop.is_set() else WRITE_BUSY_MS)
            store.tune_for_writer(a.wal_limit)
            st = os.stat(a.db_path)
        except BaseException:
            store.close()
            raise
        self.store, self.ident = store, (st.st_dev, st.st_ino)
        self.suspect = False
        if self.reopen_pending:
            a.reopened += 1
            self.reopen_pending = False
        return store

    def set_busy(self, store: Store, ms: int) -> None:
        store.set_busy_timeout(ms)
        self.busy_ms = ms

    def identity_changed(self) -> bool:
        try:
            st = os.stat(self.a.db_path)
        except FileNotFoundError:
            return True
        except OSError:
            return False  # cannot tell (e.g. permissions): keep the open connection
        return (st.st_dev, st.st_ino) != self.ident

    def close_store(self) -> None:
        if self.store is None:
            return
        store, self.store = self.store, None
        try:
            store.close()  # rolls back a transaction a failed write left open
        except DatabaseError:
            pass

    # ---------------------------------------------------------------- failure and loss

    def failed(self, exc: BaseException, stopping: bool) -> None:
        a = self.a
        a.failed_batches += 1
        self.suspect = True
        self.error = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
            self.last_fail_log = now
            log.warning("audit: cannot write to %s (%s); holding up to %d rows in memory and retrying",
                        a.db_path, self.error, a.max_pending)
        elif now - self.last_fail_log >= a.loss_log_interval:
            self.last_fail_log = now
            log.warning("audit: still cannot write to %s after %.0f s (%s); %d rows held", a.db_path,
                        now - self.failing_since, self.error, len(self.pending))
        if stopping and self.final_give_up is None:
            self.final_give_up = min(now + a.final_retry, a._deadline)

    def lose(self, when: float, count: int = 1) -> None:
        a = self.a
        a.write_dropped += count
        if self.lost_first is None or when < self.lost_first:
            self.lost_first = when
        if self.lost_last is None or when > self.lost_last:
            self.lost_last = when

    def log_loss(self, now: float, force: bool = False) -> None:
        a = self.a
        dropped = a.dropped
        unlogged = dropped - a.lost_logged
        if unlogged <= 0 or (not force and now - self.last_loss_log < a.loss_log_interval):
            return
        reason = self.error if self.failing_since is not None else "audit queue full"
        log.error("audit: %d rows lost (%d since start): %s; %d rows held", unlogged, dropped, reason,
                  len(self.pending))
        a.lost_logged = dropped
        self.last_loss_log = now

    def give_up(self, reason: str) -> None:
        """Closing and the database still cannot be written: count what is left as dropped, say so once."""
        a = self.a
        self.counting.close_all()
        for e, n in self.pending:
            self.lose(e.time, n)
        self.pending.clear()
        while True:
            try:
                item = a._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, AuditEvent):
                self.lose(item.time)
            elif isinstance(item, tuple):  # (event, count): answers the fast path tallied
                self.lose(item[0].time, item[1])
        a.pending = 0
        unlogged = a.dropped - a.lost_logged
        log.error("audit: gave up writing to %s at shutdown (%s); %d rows lost (%d since start)", a.db_path,
                  reason, unlogged, a.dropped)
        a.lost_logged = a.dropped
