"""The audit log: the hot path puts events on a bounded queue; one writer thread batches them into SQLite."""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

from sinkhole import codec
from sinkhole.model import Action, AuditEvent
from sinkhole.store import Store, iso

log = logging.getLogger(__name__)

MODES = ("blocked", "all", "none")
_STOP = object()


class AuditLog:
    """Never blocks the caller: `submit` is a non-blocking put; a full queue drops and counts."""

    def __init__(self, db_path: str | Path, node: str, mode: str = "blocked", queue_size: int = 100_000,
                 batch_size: int = 1000, flush_interval: float = 0.2) -> None:
        self.db_path = Path(db_path)
        self.node = node
        self.mode = mode
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self.written = 0
        self.dropped = 0
        self.failed_batches = 0

    def wants(self, action: Action) -> bool:
        if self.mode == "all":
            return True
        if self.mode == "none":
            return False
        return action is Action.BLOCKED

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def submit(self, event: AuditEvent) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 30.0) -> None:
        """Write every pending row, then stop the writer."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("audit writer did not finish within %.0f s; %d rows may be lost", timeout,
                      self._queue.qsize())
        self._thread = None

    def _row(self, e: AuditEvent) -> dict:
        return {
            "time": iso(e.time), "client": e.client, "transport": e.transport, "qname": e.qname,
            "qtype": codec.qtype_name(e.qtype), "action": e.action, "rule": e.rule, "category": e.category,
            "rcode": codec.rcode_name(e.rcode), "answer": e.answer, "policy_version": e.policy_version,
            "upstream": e.upstream, "latency_ms": e.latency_ms, "node": self.node,
        }

    def _run(self) -> None:
        store = Store(self.db_path)
        stopping = False
        try:
            while not stopping:
                try:
                    first = self._queue.get(timeout=self.flush_interval)
                except queue.Empty:
                    continue
                batch: list[AuditEvent] = []
                item = first
                while True:
                    if item is _STOP:
                        stopping = True
                    else:
                        batch.append(item)  # type: ignore[arg-type]
                    if len(batch) >= self.batch_size:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    self._write(store, [self._row(e) for e in batch], final=stopping)
            # drain anything submitted after the stop marker
            rest = []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    rest.append(self._row(item))  # type: ignore[arg-type]
            if rest:
                self._write(store, rest, final=True)
        finally:
            store.close()

    def _write(self, store: Store, rows: list[dict], final: bool) -> None:
        delay = 0.05
        for attempt in range(1, 1000):
            try:
                store.insert_audit(rows)
                self.written += len(rows)
                return
            except sqlite3.Error as exc:
                self.failed_batches += 1
                if attempt == 1:
                    log.warning("audit: cannot write %d rows (%s); retrying", len(rows), exc)
                if final and attempt >= 20:
                    break
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.dropped += len(rows)
        log.error("audit: gave up on %d rows", len(rows))
