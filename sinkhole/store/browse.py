"""Paged reads for the web console: a page of the audit log, one row and where it sits, pages of rules and of
the change journal. SQL over Store's tables (it moves into the store package with them).

A page of the log is the newest `size` rows matching a filter (service.operations.LogFilter), older than a cursor (the
(time, seq) of the last row shown): keyset paging on the indexes the log has, `time` and `(client, time)`,
never OFFSET. How the rows are found depends on the filter, so that a page costs well under a second on a log of
ten million rows whatever it asks:

- a client address: the (client, time) index, newest first; otherwise the time index, newest first;
- a name (and subdomains) or a network that matches few rows (at most NARROW, counted on the domain index,
  `(RBASE, time, rname)`, or the `(client, time)` index, with a cap): those rows, sorted;
- otherwise the ordered index is read back from the cursor in windows of rows (WINDOW, doubling while nothing
  matches), the filter checked on each row, until the page is full, the range ends, or `budget` seconds are
  spent. Then the page says how far back it looked (`searched_to`), and the next page goes on from there: a
  filter that matches one row in a million shows what it found so far instead of holding the page for the
  time a whole scan takes.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from typing import Protocol

from sinkhole.audit import chain as chains
from sinkhole.store.audit import client_prefix, domain_where
from sinkhole.store.db import Store
from sinkhole.store.journal import journal_filter

NARROW = 20_000  # rows a name or network may match to be fetched through its own index and sorted
WINDOW = 20_000  # rows of the ordered index per window of a scan, to start with
WINDOW_MAX = 80_000
PAGE_MAX = 500


class LogFilter(Protocol):
    """The checked filters of a log query (sinkhole.service.operations.LogFilter parses what a person typed):
    the fields read here, and all of them as Store.query_log takes them."""

    since: str | None
    until: str | None
    client: str | None
    domain: str | None

    def kwargs(self) -> dict: ...


@dataclass
class LogPage:
    rows: list[dict] = field(default_factory=list)
    next: tuple[str, int] | None = None  # the cursor for the next (older) page; None: nothing older
    searched_to: str | None = None  # a scan stopped by its budget: it looked back to this time
    plan: str = ""  # how the rows were found (shown to the curious, measured by the benchmark)


def _indexes(store: Store) -> set[str]:
    return {r[1] for r in store.conn.execute("PRAGMA index_list(audit)")}


def log_page(store: Store, f: LogFilter, before: tuple[str, int] | None = None, size: int = 50,
             budget: float = 0.4) -> LogPage:
    """The newest `size` rows matching `f` that come before `before` (time, seq), newest first."""
    size = max(1, min(size, PAGE_MAX))
    where, args = store._log_where(**f.kwargs())
    conds = [where[len(" WHERE "):]] if where else []
    if before is not None:  # `time <= ` bounds the index range; the rest decides within the cursor's time
        conds.append("time <= :b_time AND (time < :b_time OR seq < :b_seq)")
        args["b_time"], args["b_seq"] = before
    have = _indexes(store)
    exact_client = f.client is not None and "/" not in f.client
    if not exact_client:
        narrow = _narrow(store, f, conds, args, have)
        if narrow is not None:
            index, probe = narrow
            rows = _fetch(store, index, conds, args, size + 1)
            return _finish(rows, size, None, f"{index}: {probe} rows, sorted")
    index = "idx_audit_client_time" if exact_client else "idx_audit_time"
    if index not in have:
        index = ""
    return _scan(store, index, conds, args, f, before, size, budget)


def _narrow(store: Store, f: LogFilter, conds: list[str], args: dict, have: set[str]) -> tuple[str, int] | None:
    """(index, rows) when a name or network filter matches at most NARROW rows through its own index."""
    candidates: list[tuple[str, str, dict]] = []
    if f.domain and "idx_audit_rbase" in have:
        extra: dict = {}
        candidates.append(("idx_audit_rbase", domain_where(f.domain, extra, "n_"), extra))
    if f.client and "/" in f.client and "idx_audit_client_time" in have:
        prefix = client_prefix(f.client)
        if prefix is not None:
            candidates.append(("idx_audit_client_time", "(client >= :n_lo AND client < :n_hi)",
                               {"n_lo": prefix, "n_hi": prefix[:-1] + chr(ord(prefix[-1]) + 1)}))
    best: tuple[str, int] | None = None
    for index, cond, extra in candidates:
        # the index alone (no table row read): how many rows it holds for the name or network, capped
        count = store.conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM audit INDEXED BY {index} WHERE {cond}"
                                   f" LIMIT {NARROW + 1})", extra).fetchone()[0]
        if count <= NARROW and (best is None or count < best[1]):
            best = (index, count)
    return best


def _fetch(store: Store, index: str, conds: list[str], args: dict, limit: int, lo: str | None = None,
           hi: str | None = None) -> list[dict]:
    hint = f" INDEXED BY {index}" if index else ""
    where = list(conds)
    if lo is not None:
        where.append("time >= :w_lo")
    if hi is not None:
        where.append("time < :w_hi")
    sql = (f"SELECT * FROM audit{hint}" + (" WHERE " + " AND ".join(where) if where else "")
           + f" ORDER BY time DESC, seq DESC LIMIT {int(limit)}")
    cur = store.conn.execute(sql, {**args, "w_lo": lo, "w_hi": hi})
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur]


def _finish(rows: list[dict], size: int, searched_to: str | None, plan: str) -> LogPage:
    page = LogPage(rows[:size], plan=plan, searched_to=searched_to)
    if len(rows) > size or searched_to is not None:
        last = rows[size - 1] if len(rows) > size else None
        if last is not None:
            page.next = (last["time"], last["seq"])
        elif searched_to is not None:  # go on from where the scan stopped
            page.next = (searched_to, 0)
    return page


def _scan(store: Store, index: str, conds: list[str], args: dict, f: LogFilter, before: tuple[str, int] | None,
          size: int, budget: float) -> LogPage:
    """Windows of the ordered index, newest first, until the page is full or the budget is spent."""
    started = time.monotonic()
    bound = ["client = :client"] if index == "idx_audit_client_time" else []
    # the first window ends at the cursor (the keyset condition in `conds`), each next one where the last began
    hi: str | None = None
    first_edge = ["time <= :b_time"] if before is not None else (["time < :until"] if f.until else [])
    found: list[dict] = []
    window = WINDOW
    hint = f" INDEXED BY {index}" if index else ""
    windows = 0
    while True:
        # where this window starts: `window` entries back in the index from its end (the index alone is read)
        edge = bound + (["time < :w_hi"] if hi is not None else first_edge) + (["time >= :since"] if f.since else [])
        row = store.conn.execute(
            f"SELECT time FROM audit{hint}" + (" WHERE " + " AND ".join(edge) if edge else "")
            + f" ORDER BY time DESC LIMIT 1 OFFSET {window}", {**args, "w_hi": hi}).fetchone()
        lo = row[0] if row is not None else None
        found += _fetch(store, index, conds, args, size + 1 - len(found), lo, hi)
        windows += 1
        plan = f"{index or 'table'}: {windows} windows back from the cursor"
        if len(found) > size or lo is None:
            return _finish(found, size, None, plan)
        hi = lo
        if time.monotonic() - started > budget:
            return _finish(found, size, lo, plan + " (budget spent)")
        if len(found) == 0:
            window = min(window * 2, WINDOW_MAX)


def log_row(store: Store, seq: int) -> dict | None:
    """One audit row with what explains it: the rule as it stands now (source, note, who added it and when),
    the journal entry in force when it was written, and its place in its chain (chain, link, key epoch)."""
    cur = store.conn.execute("SELECT * FROM audit WHERE seq = ?", (seq,))
    names = [d[0] for d in cur.description]
    tup = cur.fetchone()
    if tup is None:
        return None
    row = dict(zip(names, tup, strict=True))
    rule = None
    if row.get("rule"):
        target = row["rule"].removeprefix("cname:")
        hit = store.conn.execute(
            "SELECT domain, kind, category, source, note, added_at, added_by, expires_at FROM rules"
            " WHERE domain = ? ORDER BY category = ? DESC LIMIT 1", (target, row.get("category"))).fetchone()
        if hit is not None:
            rule = dict(zip(("domain", "kind", "category", "source", "note", "added_at", "added_by", "expires_at"),
                            hit, strict=True))
    journal = None
    if row.get("policy_version"):
        j = store.conn.execute("SELECT id, time, user, action, category, detail FROM journal WHERE id = ?",
                               (row["policy_version"],)).fetchone()
        if j is not None:
            journal = dict(zip(("id", "time", "user", "action", "category", "detail"), j, strict=True))
    position = None
    if row.get("chain") is not None and row.get("link") is not None:
        position = {"chain": row["chain"], "link": row["link"], "epoch": row["link"] // chains.EPOCH_ROWS,
                    "generation": chains.chain_generation(row["chain"]), "mac": row["mac"]}
    neighbours = store.conn.execute("SELECT (SELECT max(seq) FROM audit WHERE seq < ?),"
                                    " (SELECT min(seq) FROM audit WHERE seq > ?)", (seq, seq)).fetchone()
    return {"row": row, "rule": rule, "journal": journal, "chain": position,
            "previous_seq": neighbours[0], "next_seq": neighbours[1]}


def rules_page(store: Store, kind: str | None = None, category: str | None = None, search: str | None = None,
               after: tuple[str, str] | None = None, size: int = 100) -> tuple[list[dict], tuple[str, str] | None]:
    """Rules by (category, domain), `size` at a time after the cursor; `search`: names containing it."""
    where, args = [], []
    if kind:
        where.append("kind = ?")
        args.append(kind)
    if category:
        where.append("category = ?")
        args.append(category)
    if search:
        where.append("instr(domain, ?) > 0")
        args.append(search.lower())
    if after is not None:
        where.append("(category > ? OR (category = ? AND domain > ?))")
        args += [after[0], after[0], after[1]]
    size = max(1, min(size, PAGE_MAX))
    cur = store.conn.execute(
        "SELECT id, domain, kind, category, source, added_at, added_by, expires_at, note FROM rules"
        + (" WHERE " + " AND ".join(where) if where else "") + f" ORDER BY category, domain LIMIT {size + 1}", args)
    names = [d[0] for d in cur.description]
    rows = [dict(zip(names, r, strict=True)) for r in cur]
    more = (rows[size - 1]["category"], rows[size - 1]["domain"]) if len(rows) > size else None
    return rows[:size], more


def journal_page(store: Store, since: str | None = None, until: str | None = None, user: str | None = None,
                 action: str | None = None, before: int | None = None,
                 size: int = 100) -> tuple[list[dict], int | None]:
    """Journal entries newest first, `size` at a time below id `before`; `user` matches the user or sudo user
    (`web:NAME` for the console's accounts), `action` the start of the action (`web`, `block add`)."""
    where, args = journal_filter(since, until, user)
    if action:
        where.append("(action = ? OR action LIKE ? ESCAPE '\\')")
        args += [action, action.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + " %"]
    if before is not None:
        where.append("id < ?")
        args.append(before)
    size = max(1, min(size, PAGE_MAX))
    try:
        cur = store.conn.execute("SELECT * FROM journal" + (" WHERE " + " AND ".join(where) if where else "")
                                 + f" ORDER BY id DESC LIMIT {size + 1}", args)
    except sqlite3.OperationalError:
        return [], None
    names = [d[0] for d in cur.description]
    rows = [dict(zip(names, r, strict=True)) for r in cur]
    return rows[:size], (rows[size - 1]["id"] if len(rows) > size else None)
