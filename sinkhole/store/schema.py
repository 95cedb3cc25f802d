"""The database file: connection, WAL, the schema and its migrations, and the forms times and rows take in it.

`Database` is the base of every query class of this package (journal, groups, rules, requests, audit), which
`sinkhole.store.db.Store` puts together: one connection, one file, SQLite in WAL mode shared by the server's
processes and the CLI.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import sqlite_utils

from sinkhole import files
from sinkhole.audit import chain
from sinkhole.policy.names import reverse_name

DatabaseError = sqlite3.Error  # what any store method raises when SQLite fails (locked, read-only, full, corrupt)
SCHEMA_VERSION = 7
# 2: audit rows carry chain, link and mac (sinkhole.audit.chain); 3: disabled categories;
# 4: audit grp/asked/list, client groups, list sources, journal link/mac;
# 5: rules.expires_at (rules in force until then), access_requests (from the block page);
# 6: audit.count (identical answers within the audit window are one row; rows before it stand for one answer)
# 7: the audit log's domain index is idx_audit_rbase (RBASE, time, rname), not idx_audit_rname
Seed = tuple[str, list[tuple[str, str]], str]  # (category, [(domain, note)], source)
# The first two labels of a row's rname ('com.deepseek' of 'com.deepseek.chat', 'com' of 'com'; NULL for none), in
# SQL: the leading column of the audit log's domain index, idx_audit_rbase (RBASE, time, rname). Every name under a
# domain of two labels or more has that domain's RBASE, so a domain filter is a range of the index (sinkhole.store.
# audit.domain_where); and within one RBASE rows come in time order, so the writer's inserts go to the end of a few
# runs, one for each base domain being asked, not anywhere in the whole log as an index on rname alone takes them
# (load (a)'s names on a log of 1.2 million rows: 31.7-33.6 us of writer CPU a row with idx_audit_rname, 22.2 with
# this index; an index on rname costs more the larger the log: a page of it written for nearly every row). A query
# must write the expression as it is here for SQLite to use the index.
RBASE = ("substr(rname || '.', 1, instr(rname || '.', '.')"
         " + instr(substr(rname || '.', instr(rname || '.', '.') + 1), '.') - 1)")
BUSY_TIMEOUT_S = 10.0
log = logging.getLogger(__name__)

AUDIT_COLUMNS = {
    "seq": int,
    "time": str,  # ISO 8601 UTC with microseconds, sortable as text
    "client": str,
    "transport": str,
    "qname": str,
    "qtype": str,
    "action": str,
    "rule": str,
    "category": str,
    "rcode": str,
    "answer": str,
    "policy_version": int,
    "upstream": str,
    "latency_ms": float,
    "node": str,
    "grp": str,  # the client group whose policy decided (version 4)
    "asked": str,  # the name as the client asked it: case kept, escaped like qname (version 4)
    "list": str,  # where the deciding rule came from: a list file or URL, or "cli" (version 4)
    "rname": str,  # qname with its labels reversed ("com.deepseek.chat"): indexed, for domain filters (4)
    "chain": str,  # the writer's chain (sinkhole.audit.chain); NULL on rows written before version 2
    "link": int,  # the row's place in its chain: 0, 1, 2, ...
    "mac": str,  # hex HMAC-SHA256 over the previous row's mac and this row
    # how many identical answers the row stands for, the first at `time`, the others within the audit window
    # after it (version 6; NOT NULL DEFAULT 1: older rows stand for one). Last, as ALTER TABLE adds it.
    "count": int,
}


# the order rows are given to Store.insert_audit in: what the writer formats, then what Chain.seal adds
_SEALS = ("chain", "link", "mac")
AUDIT_INSERT = [c for c in AUDIT_COLUMNS if c != "seq" and c not in _SEALS] + list(_SEALS)


_iso_second: list = [None, ""]  # the last whole second formatted, and its text


def iso(ts: float) -> str:
    """Seconds since the epoch -> '2026-11-22T18:03:04.123456Z' (the whole-second part formatted once)."""
    sec = int(ts)
    if ts < 0 or ts >= 253402300800:  # outside years 1970..9999: no fast path
        return iso_dt(datetime.fromtimestamp(ts, UTC))
    cached = _iso_second
    if cached[0] != sec:
        cached[1] = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        cached[0] = sec
    return f"{cached[1]}.{int((ts - sec) * 1_000_000):06d}Z"


def iso_dt(when: datetime) -> str:
    """An aware datetime -> the sortable text form the log stores (four-digit year, UTC, microseconds)."""
    return when.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def file_identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(device, inode) of the file at path, None when there is none: tells a replaced file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def preload() -> None:
    """Load now what the store loads on first use (sqlite-utils' plugins, through importlib.metadata), for a
    process that is about to become a user who may not read the installation."""
    sqlite_utils.Database(memory=True).close()


def default_db_path() -> Path:
    """$SINKHOLE_DB, else the user's state directory (XDG), as the CLI contract says."""
    env = os.environ.get("SINKHOLE_DB")
    if env:
        return Path(env)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "sinkhole" / "sinkhole.db"


def _in_cidr(address: str | None, network: str) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(network, strict=False)
    except ValueError:
        return False


class Database:
    """One connection to the database at `path`, made (0600, with the schema) if there is none."""

    def __init__(self, path: str | os.PathLike[str], *, seed: Iterable[Seed] | None = None,
                 synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        files.create_private(self.path)  # 0600 (and so its WAL and SHM), in a 0700 directory if it makes one
        self.key_path = chain.default_key_path(self.path)  # the journal is sealed under the audit key
        self._journal_key: tuple[int, bytes] | None = None  # (generation, journal key), taken at the first entry
        self.journal_unsealed: str | None = None  # why entries of this store went unsealed, if they did
        conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        self.closed = False
        self.db = sqlite_utils.Database(conn)
        self.conn = conn
        with self.db.ensure_autocommit_on():
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.create_function("in_cidr", 2, _in_cidr, deterministic=True)
        self._migrate(seed)
        self.identity = file_identity(self.path)

    def replaced(self) -> bool:
        """The file at our path is another one now (deleted and made again, or swapped)."""
        now = file_identity(self.path)
        return now is not None and now != self.identity

    def close(self) -> None:
        """Close the connection (again: nothing); a transaction left open (a write that failed half-way) is rolled
        back first."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.conn.in_transaction:
                self.conn.rollback()
        finally:
            self.conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ schema

    @contextlib.contextmanager
    def _immediate(self) -> Iterator[None]:
        """A write transaction that takes the write lock at BEGIN, waiting (busy timeout) for it: a deferred one
        that reads first fails at once with "database is locked" when another connection writes in between
        (two processes creating the same new database)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    def _migrate(self, seed: Iterable[Seed] | None) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            return
        with self._immediate():
            # re-read inside the write transaction: another process may have won the race
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version >= SCHEMA_VERSION:
                return
            if version == 1:  # 1 -> 2: the rows already there keep NULL: written before the chain started
                have = {r[1] for r in self.conn.execute("PRAGMA table_info(audit)")}
                for column, kind in (("chain", "TEXT"), ("link", "INTEGER"), ("mac", "TEXT")):
                    if column not in have:  # another process may be migrating too
                        self.conn.execute(f"ALTER TABLE audit ADD COLUMN [{column}] {kind}")
            if version in (1, 2):  # 2 -> 3
                self._create_disabled_categories()
            if version in (1, 2, 3):  # 3 -> 4: old rows keep NULL in the new columns (their MACs do not cover them)
                for table, columns in (("audit", ("grp", "asked", "list", "rname")), ("journal", ("link", "mac"))):
                    have = {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}
                    for column in columns:
                        if column not in have:
                            kind = "INTEGER" if column == "link" else "TEXT"
                            self.conn.execute(f"ALTER TABLE {table} ADD COLUMN [{column}] {kind}")
                self._create_v4_tables()
            if version in (1, 2, 3, 4):  # 4 -> 5
                self._create_v5_tables()
            if version in (1, 2, 3, 4, 5):  # 5 -> 6: every row there stands for one answer (its MAC is unchanged)
                self._add_audit_count()
            if version in (1, 2, 3, 4, 5, 6):  # 6 -> 7: reads every row once, to index it (a few seconds a million)
                self._index_audit_by_base()
                self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                return
            db = self.db
            db["rules"].create(
                {"id": int, "domain": str, "kind": str, "category": str, "source": str,
                 "added_at": str, "added_by": str, "note": str},
                pk="id", not_null={"domain", "kind", "category"}, if_not_exists=True)
            db["rules"].create_index(["domain", "kind", "category"], unique=True, if_not_exists=True)
            db["rules"].create_index(["category"], if_not_exists=True)
            db["journal"].create(
                {"id": int, "time": str, "user": str, "sudo_user": str, "host": str, "command": str,
                 "action": str, "kind": str, "category": str, "domains": str, "detail": str,
                 "link": int, "mac": str},
                pk="id", if_not_exists=True)
            db["audit"].create(AUDIT_COLUMNS, pk="seq", not_null={"count"}, defaults={"count": 1},
                               if_not_exists=True)
            # every index costs each insert a B-tree write: two keep the writer near 100k rows/s
            for cols in (["time"], ["client", "time"]):
                db["audit"].create_index(cols, if_not_exists=True)
            self._create_disabled_categories()
            self._create_v4_tables()
            self._create_v5_tables()
            self._index_audit_by_base()
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            if seed is not None:
                self._seed(seed)

    def _create_disabled_categories(self) -> None:
        self.db["disabled_categories"].create({"category": str, "since": str, "by": str}, pk="category",
                                              if_not_exists=True)

    def _create_v4_tables(self) -> None:
        db = self.db
        # client groups: `categories` is a JSON list of the categories in force for the group, NULL = the
        # categories in force for everyone (those not disabled); a network belongs to one group
        db["groups"].create({"name": str, "categories": str, "note": str, "created_at": str, "created_by": str},
                            pk="name", if_not_exists=True)
        db["group_networks"].create({"network": str, "grp": str}, pk="network", if_not_exists=True)
        # where each imported category came from, for `lists update` (conditional requests)
        db["sources"].create({"category": str, "location": str, "format": str, "etag": str, "last_modified": str,
                              "sha256": str, "fetched_at": str, "rules": int}, pk="category", if_not_exists=True)

    def _index_audit_by_base(self) -> None:
        """Schema 7. Rows written before schema 4 get their rname (verify checks it against the qname; the MAC does
        not cover it), so that every row with a name is in the index under its base and a domain filter needs no
        second branch for rows without one, which would keep SQLite from reading the index in time order."""
        after = 0
        while True:
            rows = self.conn.execute("SELECT seq, qname FROM audit WHERE seq > ? AND rname IS NULL AND qname != ''"
                                     " ORDER BY seq LIMIT 10000", (after,)).fetchall()
            if not rows:
                break
            self.conn.executemany("UPDATE audit SET rname = ? WHERE seq = ?",
                                  [(reverse_name(str(qname)), seq) for seq, qname in rows])
            after = rows[-1][0]
        self.conn.execute("DROP INDEX IF EXISTS idx_audit_rname")  # schema 4 to 6
        self.conn.execute(f"CREATE INDEX IF NOT EXISTS idx_audit_rbase ON audit({RBASE}, time, rname)")

    def _add_audit_count(self) -> None:
        if "count" not in {r[1] for r in self.conn.execute("PRAGMA table_info(audit)")}:  # another process may
            self.conn.execute("ALTER TABLE audit ADD COLUMN [count] INTEGER NOT NULL DEFAULT 1")  # have added it

    def _create_v5_tables(self) -> None:
        if "expires_at" not in {r[1] for r in self.conn.execute("PRAGMA table_info(rules)")}:
            self.conn.execute("ALTER TABLE rules ADD COLUMN expires_at TEXT")  # ISO UTC; NULL: no end
        self.conn.execute("CREATE INDEX IF NOT EXISTS rules_expires ON rules(expires_at) WHERE expires_at IS NOT NULL")
        # access requests filed on the block page: pending until `sinkhole requests approve|deny`
        self.db["access_requests"].create(
            {"id": int, "time": str, "client": str, "grp": str, "host": str, "rule": str, "category": str,
             "name": str, "reason": str, "ref": str, "status": str, "decided_at": str, "decided_by": str,
             "allow_rule": str, "expires_at": str},
            pk="id", not_null={"time", "client", "host", "status"}, if_not_exists=True)
        self.db["access_requests"].create_index(["status", "time"], if_not_exists=True)

    # ------------------------------------------------------------------ the rows chains are verified over

    def _dicts(self, sql: str, args: tuple = ()) -> Iterator[dict]:
        cur = self.conn.execute(sql, args)
        names = [d[0] for d in cur.description]
        for tup in cur:
            yield dict(zip(names, tup, strict=True))

    def synchronous(self) -> int:
        """SQLite's synchronous level of this connection (0 off, 1 normal, 2 full, 3 extra)."""
        return int(self.conn.execute("PRAGMA synchronous").fetchone()[0])

    def set_busy_timeout(self, ms: int) -> None:
        """How long a statement waits for another connection's lock before it fails (DatabaseError)."""
        self.conn.execute(f"PRAGMA busy_timeout={int(ms)}")

    def interrupt_when(self, due: Callable[[], bool]) -> None:
        """A statement running when `due()` turns true is interrupted (DatabaseError: interrupted); looked at every
        20,000 SQLite instructions."""
        self.conn.set_progress_handler(lambda: int(bool(due())), 20000)


    def _seed(self, seed: Iterable[Seed]) -> None:
        """Load the shipped lists into a new database, in _migrate's transaction (RuleQueries does)."""
        raise NotImplementedError
