"""Retention: the server prunes audit rows older than `retention_days`, leaving checkpoints (Store.prune_audit)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sinkhole.store.db import Store
from sinkhole.store.schema import iso

log = logging.getLogger(__name__)


class Pruner(threading.Thread):
    """Prunes audit rows older than `retention_days` once at start and every `prune_interval` seconds, in small
    batches (Store.prune_audit), leaving checkpoints. A thread of its own: a long first prune does not hold up
    policy reloads."""

    def __init__(self, db: Path, node: str, retention_days: int, interval: float,
                 now: Callable[[], float] = time.time) -> None:
        super().__init__(name="audit-pruner", daemon=True)
        self.now = now  # the clock retention counts from (a test's may be days ahead)
        self.db = db
        self.node = node
        self.retention_days = retention_days
        self.interval = interval
        self.stopping = threading.Event()
        self.runs = 0  # prunes finished (with or without rows to delete)
        self.pruned = 0  # rows deleted since start

    def run(self) -> None:
        while True:
            try:
                self.prune_once()
            except Exception as exc:  # a locked database or an unreadable key must not stop the thread
                log.warning("audit prune failed (will try again in %.0f s): %s", self.interval, exc)
            if self.stopping.wait(self.interval):
                return

    def prune_once(self) -> None:
        if not self.db.exists():
            return
        before = iso(self.now() - self.retention_days * 86400)
        store = Store(self.db)
        try:
            res = store.prune_audit(before, self.node, stop=self.stopping.is_set)
        finally:
            store.close()
        self.runs += 1
        self.pruned += res.rows
        if res.rows:
            log.info("audit: pruned %d rows older than %s (%d days) from %d chains in %.1f s (%d batches, write "
                     "lock held at most %.0f ms); checkpoint chain %s", res.rows, before, self.retention_days,
                     res.chains, res.seconds, res.batches, res.max_lock_ms, res.checkpoint_chain)
