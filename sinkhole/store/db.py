"""The store: one class over every table (`Store`), and the database a server or a command opens."""

from __future__ import annotations

import logging
from pathlib import Path

from sinkhole.policy import lists
from sinkhole.store.audit import AuditQueries
from sinkhole.store.requests import RequestQueries

log = logging.getLogger(__name__)


class Store(RequestQueries, AuditQueries):
    """The database shared by the server and the CLI: rules, groups, the change journal, access requests, the
    audit log. Each topic's queries are a class of its own (store.rules, store.audit, ...), all over the one
    connection of store.schema.Database."""


def open_store(db: str | Path, shipped_lists: bool = True) -> Store:
    """The database, with the shipped default lists loaded if it is new."""
    seed = lists.seed() if shipped_lists else None
    if shipped_lists and not seed and not Path(db).exists():
        log.warning("no shipped lists found (blocklists/, or $SINKHOLE_BLOCKLISTS): the new database at %s "
                    "starts with no rules, and nothing is blocked until rules are added", db)
    return Store(db, seed=seed)
