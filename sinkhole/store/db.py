"""The one SQLite database (WAL) shared by the server and the CLI: rules, change journal, audit log."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import json
import logging
import os
import pwd
import shlex
import socket
import sqlite3
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlite_utils

from sinkhole import files
from sinkhole.audit import chain
from sinkhole.errors import ConfigError
from sinkhole.model import RuleKind
from sinkhole.policy.decide import DEFAULT_GROUP, EVERYWHERE, GROUP_PREFIX, GroupSpec, Policy
from sinkhole.policy.names import reverse_name

DatabaseError = sqlite3.Error  # what any store method raises when SQLite fails (locked, read-only, full, corrupt)
SCHEMA_VERSION = 5
# 2: audit rows carry chain, link and mac (sinkhole.audit.chain); 3: disabled categories;
# 4: audit grp/asked/list, client groups, list sources, journal link/mac;
# 5: rules.expires_at (rules in force until then), access_requests (from the block page)
Seed = tuple[str, list[tuple[str, str]], str]  # (category, [(domain, note)], source)
BUSY_TIMEOUT_S = 10.0
# journal actions a running server applies by patching its policy (they add or remove the names they list),
# and those that change nothing in the policy; any other action makes it read the policy whole
PATCHABLE = frozenset({"block add", "block remove", "allow add", "allow remove", "block expire", "allow expire"})
NOT_POLICY = frozenset({"settings reload", "log prune",
                        # the web console's accounts and logins (sinkhole.store.accounts)
                        "user add", "user passwd", "user role", "user remove", "user unlock",
                        "web login", "web logout", "web login failed", "web lockout"})
PATCH_MAX = 50_000  # names: beyond this, reading the policy whole is as quick
PROGRESS_ROWS = 10_000  # rows stored between two progress reports of a list import
MAX_RETENTION_DAYS = 36500  # a hundred years: beyond, the cut-off date is out of datetime's range
PRUNE_BATCH = 2000  # rows deleted in one write transaction by a prune
PRUNE_PAUSE = 0.02  # seconds between two of them, so that the audit writer gets the lock in between
JOURNAL_FIELDS = ["id", "time", "user", "sudo_user", "host", "command", "action", "kind", "category", "domains",
                  "detail", "link", "mac"]
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
}


AUDIT_INSERT = [c for c in AUDIT_COLUMNS if c != "seq"]
_CHUNK = 256  # audit rows per INSERT statement (x 21 columns: well under SQLite's 32766 variables)


@functools.lru_cache(maxsize=16)
def _chunk_sql(rows: int) -> str:
    """INSERT of `rows` audit rows (AUDIT_INSERT columns, in order)."""
    one = f"({', '.join('?' for _ in AUDIT_INSERT)})"
    return f"INSERT INTO audit ({', '.join(AUDIT_INSERT)}) VALUES {', '.join([one] * rows)}"


_AUDIT_INSERT_SQL = _chunk_sql(1)


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


@dataclass(frozen=True)
class Actor:
    """Who made a change, for the journal."""

    user: str = field(default_factory=lambda: _safe_user())
    sudo_user: str | None = field(default_factory=lambda: os.environ.get("SUDO_USER"))
    host: str = field(default_factory=socket.gethostname)
    command: str = field(default_factory=lambda: shlex.join(["sinkhole", *sys.argv[1:]]))


@dataclass
class PruneResult:
    before: str
    rows: int = 0  # rows deleted
    chains: int = 0  # chains that lost rows (each has a checkpoint)
    unchained: int = 0  # rows without a chain deleted (from before version 2, or written without a key)
    first_time: str | None = None
    last_time: str | None = None
    checkpoint_chain: str | None = None
    journal_id: int | None = None
    skipped: list[str] = field(default_factory=list)  # chains with rows missing and no checkpoint: left alone
    batches: int = 0
    max_lock_ms: float = 0.0  # the longest the write lock was held by one transaction of the prune
    seconds: float = 0.0
    stopped: bool = False  # stopped between batches: the rest goes at the next prune


def _safe_user() -> str:
    """The account of the effective UID: not $USER or $LOGNAME, which anyone can set."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _in_cidr(address: str | None, network: str) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(network, strict=False)
    except ValueError:
        return False


def client_prefix(network: str) -> str | None:
    """The text every client address of `network` starts with, as the log stores addresses (dotted quad;
    IPv6 in lower case, no leading zeros, '::' anywhere): for 10.1.16.0/20 '10.1.', the whole octets of the
    prefix. A superset, for a range of the (client, time) index; `in_cidr` then decides exactly.
    None when no text prefix holds: a prefix shorter than one octet (IPv4) or one hextet (IPv6), or an
    IPv6 prefix that starts with a zero hextet, which '::' may swallow."""
    net = ipaddress.ip_network(network, strict=False)
    if net.version == 4:
        sep, parts = ".", str(net.network_address).split(".")[:net.prefixlen // 8]
    else:
        sep, parts = ":", [format(int(h, 16), "x") for h in net.network_address.exploded.split(":")]
        parts = parts[:net.prefixlen // 16]
        if "0" in parts:  # '::' may swallow a zero hextet and what follows: keep the hextets before it
            parts = parts[:parts.index("0")]
    return sep.join(parts) + sep if parts else None


def _cidr_where(network: str, args: dict) -> str:
    """The condition for `client` in `network`, using the (client, time) index where the text allows."""
    net = ipaddress.ip_network(network, strict=False)
    if net.prefixlen == net.max_prefixlen:
        args["client"] = str(net.network_address)
        return "client = :client"
    args["network"] = str(net)
    prefix = client_prefix(network)
    if prefix is None:
        return "in_cidr(client, :network)"
    # '.' + 1 = '/' and ':' + 1 = ';': [prefix, next) holds exactly the texts starting with prefix
    args["client_lo"], args["client_hi"] = prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)
    whole = prefix.count(".") * 8 if net.version == 4 else prefix.count(":") * 16
    if whole == net.prefixlen:  # /8, /16, /24 (IPv6 /16, /32, ...): the prefix is the network, exactly
        return "(client >= :client_lo AND client < :client_hi)"
    return "(client >= :client_lo AND client < :client_hi AND in_cidr(client, :network))"


def _client_where(client: str, args: dict) -> str:
    """The condition for a client address or network as the log may hold it: an IPv4 client is stored as
    '10.0.0.1', or as '::ffff:10.0.0.1' when it reached an IPv6 socket that takes IPv4 too; either form given
    (address or CIDR) matches both."""
    net = ipaddress.ip_network(client, strict=False)
    if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
        net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    if net.version == 6:
        return _cidr_where(str(net), args)
    args["mapped"] = f"::ffff:{net.network_address}/{96 + net.prefixlen}"
    # the text of a mapped address varies ('::ffff:10.0.0.1', '::ffff:a00:1'): in_cidr reads it as an address
    return (f"({_cidr_where(str(net), args)} OR (client >= '::ffff:' AND client < '::ffff;'"
            " AND in_cidr(client, :mapped)))")


class Store:
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

    def __enter__(self) -> Store:
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
            db["audit"].create(AUDIT_COLUMNS, pk="seq", if_not_exists=True)
            # every index costs each insert a B-tree write: two keep the writer near 100k rows/s
            for cols in (["time"], ["client", "time"]):
                db["audit"].create_index(cols, if_not_exists=True)
            self._create_disabled_categories()
            self._create_v4_tables()
            self._create_v5_tables()
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            if seed is not None:
                actor = Actor(command="first start: load shipped lists")
                for category, entries, source in seed:
                    self._replace_category(category, entries, source, actor, action="lists load")

    def _create_disabled_categories(self) -> None:
        self.db["disabled_categories"].create({"category": str, "since": str, "by": str}, pk="category",
                                              if_not_exists=True)

    def _create_v4_tables(self) -> None:
        db = self.db
        db["audit"].create_index(["rname"], if_not_exists=True)
        # client groups: `categories` is a JSON list of the categories in force for the group, NULL = the
        # categories in force for everyone (those not disabled); a network belongs to one group
        db["groups"].create({"name": str, "categories": str, "note": str, "created_at": str, "created_by": str},
                            pk="name", if_not_exists=True)
        db["group_networks"].create({"network": str, "grp": str}, pk="network", if_not_exists=True)
        # where each imported category came from, for `lists update` (conditional requests)
        db["sources"].create({"category": str, "location": str, "format": str, "etag": str, "last_modified": str,
                              "sha256": str, "fetched_at": str, "rules": int}, pk="category", if_not_exists=True)

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

    # ------------------------------------------------------------------ rules

    def _journal(self, actor: Actor, action: str, kind: str | None, category: str | None,
                 domains: list[str], detail: str = "") -> int:
        """One journal entry, sealed into the journal chain (sinkhole.audit.chain) in the caller's transaction."""
        cur = self.conn.execute(
            "INSERT INTO journal (time, user, sudo_user, host, command, action, kind, category, domains, detail)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)",
            (iso(time.time()), actor.user, actor.sudo_user, actor.host, actor.command, action, kind,
             category, json.dumps(domains), detail))
        ident = int(cur.lastrowid or 0)
        self._seal_journal(ident)
        return ident

    def _seal_journal(self, ident: int) -> None:
        """link = the key generation this store took (one per store, at its first entry), mac chained to the
        sealed entry before. Called with the write lock held, so entries are sealed in id order. When the key
        cannot be taken (e.g. the CLI user cannot write the server's key file), the entry stays unsealed, a
        warning says so, and `log verify` reports it: the change itself is not refused."""
        if self._journal_key is None:
            if self.journal_unsealed is not None:
                return
            try:
                generation, file_key, created = chain.take_key(self.key_path)
            except (OSError, ConfigError) as exc:
                self.journal_unsealed = f"cannot take the audit key {self.key_path}: {exc}"
                log.warning("the change is journaled without a MAC (%s); `sinkhole log verify` will report "
                            "journal entry %d", self.journal_unsealed, ident)
                return
            if created:
                log.warning("there was no audit key: made one at %s; export it now (sinkhole log anchor "
                            "--export-key FILE)", self.key_path)
            self._journal_key = (generation, chain.journal_key(file_key))
        generation, key = self._journal_key
        conn = self.conn
        before = conn.execute("SELECT mac FROM journal WHERE id < ? AND mac IS NOT NULL ORDER BY id DESC LIMIT 1",
                              (ident,)).fetchone()
        try:
            prev = bytes.fromhex(before[0]) if before else chain.ZERO
        except ValueError:
            prev = chain.ZERO  # a damaged MAC before: verify reports that entry
        cur = conn.execute(f"SELECT {', '.join(JOURNAL_FIELDS[:-2])} FROM journal WHERE id = ?", (ident,))
        entry = dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=True), link=generation)
        conn.execute("UPDATE journal SET link = ?, mac = ? WHERE id = ?",
                     (generation, chain.journal_mac(key, prev, entry).hex(), ident))

    def add_rules(self, kind: RuleKind, domains: list[str], category: str = "manual", source: str = "cli",
                  note: str | None = None, actor: Actor | None = None,
                  expires: str | None = None) -> tuple[list[str], list[str]]:
        """Add rules; returns (added, already_present). One journal entry for the whole call.
        `expires` (ISO UTC): the rules are in force until then; a running server removes them at that time,
        journaled as `<kind> expire`."""
        actor = actor or Actor()
        now = iso(time.time())
        added, present = [], []
        with self.db.atomic():
            for domain in dict.fromkeys(domains):
                cur = self.conn.execute(
                    "INSERT OR IGNORE INTO rules (domain, kind, category, source, added_at, added_by, note, expires_at)"
                    " VALUES (?,?,?,?,?,?,?,?)", (domain, kind.value, category, source, now, actor.user, note, expires))
                (added if cur.rowcount else present).append(domain)
            if added:
                detail = (note or "") + (f"{'; ' if note else ''}expires {expires}" if expires else "")
                self._journal(actor, f"{kind.value} add", kind.value, category, added, detail)
        return added, present

    def next_expiry(self) -> str | None:
        """The earliest `expires_at` of the rules (ISO UTC), None when no rule expires."""
        return self.conn.execute("SELECT min(expires_at) FROM rules WHERE expires_at IS NOT NULL").fetchone()[0]

    def expire_rules(self, now: str, actor: Actor) -> list[tuple[str, str, str]]:
        """Remove the rules whose `expires_at` has passed, one journal entry per kind and category
        (`allow expire`, `block expire`); returns the (kind, category, domain) removed."""
        with self._immediate():  # reads, then writes: the write lock from the start
            gone = self.conn.execute("SELECT kind, category, domain FROM rules WHERE expires_at <= ? ORDER BY kind,"
                                     " category, domain", (now,)).fetchall()
            self.conn.execute("DELETE FROM rules WHERE expires_at <= ?", (now,))
            for (kind, category), rows in itertools.groupby(gone, key=lambda r: (r[0], r[1])):
                self._journal(actor, f"{kind} expire", kind, category, [r[2] for r in rows], f"expired by {now}")
        return [tuple(r) for r in gone]

    def remove_rules(self, kind: RuleKind, domains: list[str], category: str | None = None,
                     actor: Actor | None = None) -> tuple[list[str], list[str]]:
        """Remove rules (of every category unless one is named); returns (removed, missing)."""
        actor = actor or Actor()
        removed, missing = [], []
        with self.db.atomic():
            for domain in dict.fromkeys(domains):
                sql = "DELETE FROM rules WHERE domain = ? AND kind = ?"
                args: list[str] = [domain, kind.value]
                if category is not None:
                    sql += " AND category = ?"
                    args.append(category)
                cur = self.conn.execute(sql, args)
                (removed if cur.rowcount else missing).append(domain)
            if removed:
                self._journal(actor, f"{kind.value} remove", kind.value, category, removed)
        return removed, missing

    def _replace_category(self, category: str, entries: list[tuple[str, str]], source: str, actor: Actor,
                          action: str, allows: list[tuple[str, str]] | None = None,
                          progress: Callable[[int], None] | None = None) -> int:
        """The category's block rules become `entries`; with `allows` (a list that has exceptions), its
        allow rules from lists become those (allow rules added by hand, source 'cli', stay). `progress` is
        called with the number of rules stored since its last call."""
        now = iso(time.time())
        self.conn.execute("DELETE FROM rules WHERE category = ? AND kind = 'block'", (category,))
        self.conn.execute("DELETE FROM rules WHERE category = ? AND kind = 'allow' AND source IS NOT 'cli'",
                          (category,))
        for kind, rows in (("block", entries), ("allow", allows or [])):
            for start in range(0, len(rows), PROGRESS_ROWS):
                chunk = rows[start:start + PROGRESS_ROWS]
                self.conn.executemany(
                    "INSERT OR IGNORE INTO rules (domain, kind, category, source, added_at, added_by, note)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(d, kind, category, source, now, actor.user, note) for d, note in chunk])
                if progress is not None:
                    progress(len(chunk))
        detail = f"{len(entries)} rules from {source}" if not allows else (
            f"{len(entries)} block and {len(allows)} allow rules from {source}")
        self._journal(actor, action, "block" if not allows else None, category, [], detail)
        return len(entries) + len(allows or [])

    def replace_category(self, category: str, entries: list[tuple[str, str]], source: str,
                         actor: Actor | None = None, allows: list[tuple[str, str]] | None = None) -> int:
        """Make `category` hold exactly `entries` (domain, note) as block rules and `allows` as allow
        rules, in one transaction with one journal entry; returns the number of rules."""
        with self.db.atomic():
            return self._replace_category(category, entries, source, actor or Actor(), "lists import", allows)

    # ------------------------------------------------------------------ list sources (lists import / update)

    def import_list(self, category: str, entries: list[tuple[str, str]], allows: list[tuple[str, str]],
                    location: str, fmt: str, sha256: str, etag: str | None = None,
                    last_modified: str | None = None, actor: Actor | None = None,
                    action: str = "lists import", rule_source: str | None = None,
                    progress: Callable[[int], None] | None = None) -> int:
        """Replace the category's rules with a list's and record where it came from (`location`, for
        `lists update`), in one transaction with one journal entry; returns the number of rules.
        The rules' `source` is `rule_source` (e.g. the path as the operator typed it), else `location`.
        `progress` is called with the number of rules stored since its last call."""
        with self.db.atomic():
            count = self._replace_category(category, entries, rule_source or location, actor or Actor(), action,
                                           allows, progress)
            self.conn.execute(
                "INSERT OR REPLACE INTO sources (category, location, format, etag, last_modified, sha256,"
                " fetched_at, rules) VALUES (?,?,?,?,?,?,?,?)",
                (category, location, fmt, etag, last_modified, sha256, iso(time.time()), count))
        return count

    def sources(self, categories: Iterable[str] | None = None) -> list[dict]:
        """The recorded list sources (every one, or those of `categories`), by category."""
        rows = [dict(r) for r in self.db.query("SELECT * FROM sources ORDER BY category")]
        if categories is not None:
            wanted = set(categories)
            rows = [r for r in rows if r["category"] in wanted]
        return rows

    def touch_source(self, category: str, etag: str | None, last_modified: str | None) -> None:
        """A source checked and found unchanged: new validators and check time; no rule and no journal entry."""
        with self.db.atomic():
            self.conn.execute("UPDATE sources SET etag = ?, last_modified = ?, fetched_at = ? WHERE category = ?",
                              (etag, last_modified, iso(time.time()), category))

    def rule_shapes(self) -> dict[str, dict]:
        """Per category: how many of its rules are regular expressions (`/pattern/`) and networks (CIDR)."""
        return {r["category"]: r for r in self.db.query(
            "SELECT category, sum(domain LIKE '/%/') AS regex,"
            " sum(domain LIKE '%/%' AND NOT domain LIKE '/%/') AS networks FROM rules GROUP BY category")}

    def list_rules(self, kind: RuleKind | None = None, category: str | None = None) -> list[dict]:
        where, args = [], []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind.value)
        if category is not None:
            where.append("category = ?")
            args.append(category)
        return list(self.db["rules"].rows_where(" AND ".join(where) or None, args,
                                                order_by="category, domain"))

    def policy_version(self) -> int:
        row = self.conn.execute("SELECT max(id) FROM journal").fetchone()
        return int(row[0] or 0)

    def load_policy(self, canaries: bool = True) -> Policy:
        """The policy in force, from one snapshot: every rule of a category in force for some group,
        streamed from the cursor (a million rules never sit in a list), the groups and the disabled
        categories."""
        conn = self.conn

        now = iso(time.time())  # rules past their expiry are out of force, removed or not yet

        def names(key: tuple) -> list[str]:
            text = conn.execute("SELECT group_concat(domain, char(10)) FROM rules WHERE kind = ? AND category = ?"
                                " AND source IS ? AND instr(domain, '/') = 0"
                                " AND (expires_at IS NULL OR expires_at > ?)", (*key, now)).fetchone()[0]
            return text.split("\n") if text else []

        with self.db.atomic():
            version = self.policy_version()
            disabled = [r[0] for r in conn.execute("SELECT category FROM disabled_categories")]
            specs = self.group_specs()
            keys = conn.execute("SELECT DISTINCT kind, category, source FROM rules").fetchall()
            # plain names in bulk, a list per (kind, category, source) as one string split in C; the few
            # regexes and networks a row at a time
            return Policy(conn.execute("SELECT domain, kind, category, source FROM rules WHERE instr(domain, '/') > 0"
                                       " AND (expires_at IS NULL OR expires_at > ?)", (now,)),
                          version, canaries, specs, disabled, bulk=[(k, functools.partial(names, k)) for k in keys])

    def patch_policy(self, policy: Policy) -> Policy | None:
        """`policy` brought to the current version by patching, when every journal entry since it only added
        or removed named rules (or changed nothing in the policy); None when a full load is needed."""
        with self.db.atomic():
            version = self.policy_version()
            if version < policy.version:
                return None  # an older or other database: read it whole
            touched: set[str] = set()
            for action, domains in self.conn.execute(
                    "SELECT action, domains FROM journal WHERE id > ? ORDER BY id", (policy.version,)):
                if action in PATCHABLE:
                    touched.update(json.loads(domains or "[]"))
                elif action not in NOT_POLICY:
                    return None
                if len(touched) > PATCH_MAX:
                    return None
            rows: list[tuple] = []
            names = sorted(touched)
            for i in range(0, len(names), 500):
                chunk = names[i:i + 500]
                rows += self.conn.execute(
                    f"SELECT domain, kind, category, source FROM rules WHERE domain IN ({','.join('?' * len(chunk))})"
                    " AND (expires_at IS NULL OR expires_at > ?)", [*chunk, iso(time.time())]).fetchall()
            return policy.patched(touched, rows, version)

    def categories(self) -> list[dict]:
        """Every category with its rule counts, where its rules came from, and whether it is in force."""
        return [dict(r) for r in self.db.query(
            "SELECT r.category, sum(r.kind = 'block') AS block, sum(r.kind = 'allow') AS allow,"
            " group_concat(DISTINCT r.source) AS source, d.category IS NULL AS enabled, d.since AS disabled_since"
            " FROM rules r LEFT JOIN disabled_categories d ON d.category = r.category"
            " GROUP BY r.category ORDER BY r.category")]

    def rules_in_force(self, group: str) -> tuple[int, list[tuple[str, str, str]]]:
        """(policy version, [(domain, kind, category)]) in force for client group `group`, read in one snapshot
        (what `export rpz` and an RPZ primary serve); ConfigError for a group that is not there."""
        conn = self.conn
        with self.db.atomic():
            version = self.policy_version()
            categories = [r[0] for r in conn.execute("SELECT DISTINCT category FROM rules")]
            disabled = [r[0] for r in conn.execute("SELECT category FROM disabled_categories")]
            # which categories are in force for which group is the Policy's rule: ask it, with one rule a category
            policy = Policy([("invalid", "block", c) for c in categories], version, groups=self.group_specs(),
                            disabled=disabled)
            if group not in policy.groups:
                raise ConfigError(f"no group {group!r}: see `sinkhole group list`")
            allowed = policy.groups[group].allowed
            rows = [(d, k, c) for d, k, c in conn.execute("SELECT domain, kind, category FROM rules") if c in allowed]
        return version, rows

    def rule_note(self, domain: str, kind: RuleKind, category: str) -> tuple[str | None, str | None] | None:
        """(source, note) of one rule, None when it is not stored (any more)."""
        row = self.conn.execute("SELECT source, note FROM rules WHERE domain = ? AND kind = ? AND category = ? LIMIT 1",
                                (domain, kind.value, category)).fetchone()
        return None if row is None else (row[0], row[1])

    def set_enabled(self, category: str, enabled: bool, actor: Actor | None = None) -> bool:
        """Put a category's rules in force or out of it (they stay stored); False when nothing changed."""
        actor = actor or Actor()
        with self.db.atomic():
            if enabled:
                changed = self.conn.execute("DELETE FROM disabled_categories WHERE category = ?", (category,)).rowcount
            else:
                changed = self.conn.execute(
                    "INSERT OR IGNORE INTO disabled_categories (category, since, by) VALUES (?, ?, ?)",
                    (category, iso(time.time()), actor.user)).rowcount
            if changed:
                self._journal(actor, "lists enable" if enabled else "lists disable", None, category, [])
        return bool(changed)

    def journal_settings(self, values: dict[str, str], actor: Actor | None = None) -> int:
        """A configuration reload that changed settings: one journal entry naming each new value."""
        with self.db.atomic():
            return self._journal(actor or Actor(), "settings reload", None, None, sorted(values),
                                 json.dumps(values, sort_keys=True))

    # ------------------------------------------------------------------ groups

    def group_specs(self) -> list[GroupSpec]:
        nets: dict[str, list[str]] = {}
        for network, grp in self.conn.execute("SELECT network, grp FROM group_networks ORDER BY network"):
            nets.setdefault(grp, []).append(network)
        return [GroupSpec(name, tuple(nets.get(name, ())), None if cats is None else tuple(json.loads(cats)))
                for name, cats in self.conn.execute("SELECT name, categories FROM groups ORDER BY name")]

    def groups(self) -> list[dict]:
        """Every group with its networks, categories (None: those in force for everyone) and rule counts;
        `default` first, stored or not."""
        rows = {r["name"]: dict(r) for r in self.db.query("SELECT name, categories, note, created_at, created_by"
                                                          " FROM groups ORDER BY name")}
        nets: dict[str, list[str]] = {}
        for network, grp in self.conn.execute("SELECT network, grp FROM group_networks ORDER BY network"):
            nets.setdefault(grp, []).append(network)
        counts = dict(self.conn.execute("SELECT category, count(*) FROM rules WHERE category LIKE 'group:%'"
                                        " GROUP BY category").fetchall())
        out = []
        for name in [DEFAULT_GROUP, *sorted(n for n in rows if n != DEFAULT_GROUP)]:
            row = rows.get(name, {"name": name, "categories": None, "note": None, "created_at": None,
                                  "created_by": None})
            row["categories"] = None if row["categories"] is None else json.loads(row["categories"])
            row["networks"] = nets.get(name, [])
            row["rules"] = counts.get(GROUP_PREFIX + name, 0)
            out.append(row)
        return out

    def save_group(self, name: str, networks: list[str], categories: list[str] | None, note: str | None = None,
                   actor: Actor | None = None) -> tuple[bool, list[str]]:
        """Create group `name` or add networks to it; `categories` (when not None) replaces its categories
        (an empty list: none but the operator's own `manual` rules and its extra rules). Returns (created,
        networks added). A network that already belongs to another group is an error: nothing is written."""
        actor = actor or Actor()
        with self._immediate():  # reads, then writes: the write lock from the start
            have = self.conn.execute("SELECT categories FROM groups WHERE name = ?", (name,)).fetchone()
            if name == DEFAULT_GROUP and networks:
                raise ConfigError("the default group holds every client no other group holds: it takes no networks")
            added = []
            for network in dict.fromkeys(networks):
                owner = self.conn.execute("SELECT grp FROM group_networks WHERE network = ?", (network,)).fetchone()
                if owner is not None and owner[0] != name:
                    raise ConfigError(f"network {network} already belongs to group {owner[0]}")
                if owner is None:
                    added.append(network)
            cats = None if categories is None else json.dumps(sorted(dict.fromkeys(categories)))
            if have is None:
                self.conn.execute("INSERT INTO groups (name, categories, note, created_at, created_by)"
                                  " VALUES (?,?,?,?,?)", (name, cats, note, iso(time.time()), actor.user))
            elif categories is not None or note is not None:
                self.conn.execute("UPDATE groups SET categories = coalesce(?, categories), note = coalesce(?, note)"
                                  " WHERE name = ?", (cats, note, name))
            self.conn.executemany("INSERT INTO group_networks (network, grp) VALUES (?, ?)",
                                  [(n, name) for n in added])
            changed = have is None or added or categories is not None or note is not None
            if changed:
                detail = json.dumps({"networks": added, "categories": None if categories is None
                                     else sorted(dict.fromkeys(categories)), "note": note})
                self._journal(actor, "group add" if have is None else "group change", None, None, added, detail)
        return have is None, added

    def remove_group(self, name: str, networks: list[str] | None = None, actor: Actor | None = None) -> list[str]:
        """Remove some networks of a group, or (networks None) the whole group, its networks and extra rules.
        Returns what was removed; raises ConfigError for a group or network that is not there."""
        actor = actor or Actor()
        with self._immediate():  # reads, then writes: the write lock from the start
            exists = self.conn.execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone()
            if networks is None:
                if name == DEFAULT_GROUP:
                    raise ConfigError("the default group cannot be removed (its categories can be changed)")
                if not exists:
                    raise ConfigError(f"no group {name!r}: see `sinkhole group list`")
                gone = [r[0] for r in self.conn.execute("SELECT network FROM group_networks WHERE grp = ?", (name,))]
                self.conn.execute("DELETE FROM group_networks WHERE grp = ?", (name,))
                self.conn.execute("DELETE FROM groups WHERE name = ?", (name,))
                rules = self.conn.execute("DELETE FROM rules WHERE category = ?", (GROUP_PREFIX + name,)).rowcount
                self._journal(actor, "group remove", None, None, gone, f"group {name} and its {rules} extra rules")
                return gone
            gone = []
            for network in dict.fromkeys(networks):
                if self.conn.execute("DELETE FROM group_networks WHERE network = ? AND grp = ?",
                                     (network, name)).rowcount:
                    gone.append(network)
                else:
                    raise ConfigError(f"network {network} is not in group {name}")
            self._journal(actor, "group change", None, None, gone, json.dumps({"removed networks": gone}))
            return gone

    def journal(self, since: str | None = None, until: str | None = None, user: str | None = None) -> list[dict]:
        """Journal entries in id order; `user` matches the OS user or the sudo user."""
        where, args = [], []
        if since:
            where.append("time >= ?")
            args.append(since)
        if until:
            where.append("time < ?")
            args.append(until)
        if user:
            where.append("(user = ? OR sudo_user = ?)")
            args += [user, user]
        return list(self.db["journal"].rows_where(" AND ".join(where) or None, args, order_by="id"))

    # ------------------------------------------------------------------ access requests (the block page)

    def add_request(self, client: str, group: str, host: str, rule: str | None, category: str | None, name: str,
                    reason: str, ref: str, max_pending: int = 10_000) -> tuple[int, bool]:
        """File a pending access request; returns (id, new). A pending request of the same client for the
        same host is returned instead of a second one; past `max_pending` pending requests, ConfigError."""
        with self._immediate():
            have = self.conn.execute("SELECT id FROM access_requests WHERE status = 'pending' AND client = ? AND"
                                     " host = ?", (client, host)).fetchone()
            if have is not None:
                return int(have[0]), False
            pending = self.conn.execute("SELECT count(*) FROM access_requests WHERE status = 'pending'").fetchone()[0]
            if pending >= max_pending:
                raise ConfigError(f"{pending} access requests are pending already")
            cur = self.conn.execute(
                "INSERT INTO access_requests (time, client, grp, host, rule, category, name, reason, ref, status)"
                " VALUES (?,?,?,?,?,?,?,?,?, 'pending')",
                (iso(time.time()), client, group, host, rule, category, name, reason, ref))
            return int(cur.lastrowid or 0), True

    def requests(self, status: str | None = None) -> list[dict]:
        where, args = ("status = ?", [status]) if status else (None, [])
        return list(self.db["access_requests"].rows_where(where, args, order_by="id"))

    def request(self, ident: int) -> dict:
        row = self.conn.execute("SELECT * FROM access_requests WHERE id = ?", (ident,)).fetchone()
        if row is None:
            raise ConfigError(f"no access request {ident} (sinkhole requests list)")
        cur = self.conn.execute("SELECT * FROM access_requests LIMIT 0")
        return dict(zip([d[0] for d in cur.description], row, strict=True))

    def decide_request(self, ident: int, approve: bool, actor: Actor | None = None, group: str | None = None,
                       domain: str | None = None, expires: str | None = None) -> dict:
        """Approve (an allow rule for `domain` in group `group`'s own rules, until `expires`) or deny a pending
        request, in one transaction with the rule's journal entry; returns the request as decided."""
        actor = actor or Actor()
        with self._immediate():  # reads, then writes: the write lock from the start
            req = self.request(ident)
            if req["status"] != "pending":
                raise ConfigError(f"access request {ident} was {req['status']} already ({req['decided_at']})")
            allow_rule = None
            if approve:
                assert group is not None and domain is not None
                category = EVERYWHERE if group == DEFAULT_GROUP else GROUP_PREFIX + group
                if group != DEFAULT_GROUP and not self.conn.execute("SELECT 1 FROM groups WHERE name = ?",
                                                                    (group,)).fetchone():
                    raise ConfigError(f"no group {group!r}: see `sinkhole group list`")
                self.add_rules(RuleKind.ALLOW, [domain], category=category, note=f"access request {ident}",
                               actor=actor, expires=expires)
                allow_rule = f"{domain} ({category})"
            self.conn.execute("UPDATE access_requests SET status = ?, decided_at = ?, decided_by = ?, allow_rule = ?,"
                              " expires_at = ? WHERE id = ?", ("approved" if approve else "denied", iso(time.time()),
                                                               actor.sudo_user or actor.user, allow_rule,
                                                               expires if approve else None, ident))
            return self.request(ident)

    def find_dns_row(self, client: str, qname: str, since: str, until: str) -> int | None:
        """The seq of the latest DNS audit row of `client` for `qname` between the two times (ISO UTC), if any:
        the query a block page view follows."""
        row = self.conn.execute(
            "SELECT seq FROM audit WHERE client = ? AND time >= ? AND time <= ? AND qname = ? AND action != 'page'"
            " ORDER BY time DESC LIMIT 1", (client, since, until, qname)).fetchone()
        return None if row is None else int(row[0])

    # ------------------------------------------------------------------ retention

    def prune_audit(self, before: str, node: str, actor: Actor | None = None, batch: int = PRUNE_BATCH,
                    pause: float = PRUNE_PAUSE, stop: Callable[[], bool] | None = None,
                    planned: Callable[[int], Callable[[int], None] | None] | None = None) -> PruneResult:
        """Delete audit rows older than `before` (ISO UTC), leaving checkpoints so that every chain verifies.

        Per chain, a prefix of links goes (links 0..F-1; a row newer than `before` ends it). First, in one short
        transaction, a new chain of checkpoint rows (sinkhole.audit.chain.checkpoint_rows; a key generation of its own)
        records for each chain cut: F, the MAC of link F-1, how many rows and which times; checkpoints still needed
        from checkpoint rows being pruned are carried over, and the key generations of chains gone whole are
        summed up. Then the rows are deleted in transactions of `batch` rows, newest link first, with `pause`
        seconds between: the audit writer waits at most one batch, and whatever state a crash (or `stop()` turning
        true, checked between batches) leaves verifies; the next prune finishes the job.
        The audit key must be takeable: no row is deleted without its checkpoint (AuditKeyError otherwise).
        `planned` is told how many rows will go; what it returns is called with each batch's number of rows."""
        started = time.perf_counter()
        res = PruneResult(before=before)
        conn = self.conn
        with self.db.atomic():  # checkpoint rows found without a scan; costs other inserts nothing
            conn.execute("CREATE INDEX IF NOT EXISTS audit_checkpoint ON audit(seq) WHERE action = 'checkpoint'")
        conn.execute("BEGIN")  # one snapshot for the plan; readers do not hold up the writer (WAL)
        try:
            plan, entries, gone = self._prune_plan(before, res)
        finally:
            conn.rollback()
        if not plan:
            res.seconds = time.perf_counter() - started
            return res
        ch, _, _ = chain.Chain.start(self.key_path, f"{node}:prune")
        res.checkpoint_chain = ch.name
        detail = (f"pruned {res.rows} audit rows older than {before} ({res.first_time} .. {res.last_time}) "
                  f"from {res.chains} chains; checkpoint chain {ch.name}")
        t0 = time.perf_counter()
        with self.db.atomic():
            version = self._journal(actor, "log prune", None, None, [], detail) if actor else self.policy_version()
            res.journal_id = version if actor else None
            summary = {"summary": True, "before": before, "rows": res.rows, "chains": res.chains,
                       "unchained": res.unchained, "gone_generations": gone}
            rows, state = ch.seal(chain.checkpoint_rows(summary, entries, iso(time.time()), node, version))
            conn.executemany(_AUDIT_INSERT_SQL, rows)
            res.max_lock_ms = (time.perf_counter() - t0) * 1000
        ch.commit(state)
        progress = planned(sum(map(len, plan.values()))) if planned is not None else None
        for seqs in plan.values():
            for end in range(len(seqs), 0, -batch):  # the newest links first: a prefix of each chain stays whole
                if stop is not None and stop():
                    res.stopped = True
                    res.seconds = time.perf_counter() - started
                    return res
                chunk = seqs[max(0, end - batch):end]
                conn.execute("BEGIN IMMEDIATE")
                t0 = time.perf_counter()
                try:
                    conn.executemany("DELETE FROM audit WHERE seq = ?", ((s,) for s in chunk))
                    conn.commit()
                except BaseException:
                    conn.rollback()
                    raise
                res.max_lock_ms = max(res.max_lock_ms, (time.perf_counter() - t0) * 1000)
                res.batches += 1
                if progress is not None:
                    progress(len(chunk))
                if pause:
                    time.sleep(pause)
        res.seconds = time.perf_counter() - started
        return res

    def _prune_plan(self, before: str, res: PruneResult) -> tuple[dict[str | None, array], list[dict],
                                                                   list[list[int]]]:
        conn = self.conn
        cps = chain.read_checkpoints(self)  # the pruner's side: it trusts its own database
        spans = {c: (lo, hi) for c, lo, hi in conn.execute(
            "SELECT chain, min(link), max(link) FROM audit WHERE chain IS NOT NULL GROUP BY chain")}
        plan: dict[str | None, array] = {}
        entries: list[dict] = []
        times: list[str] = []
        cur = conn.execute("SELECT chain, link, seq, mac, time FROM audit WHERE time < ? ORDER BY chain, link",
                           (before,))
        for name, group in itertools.groupby(cur, key=lambda r: r[0]):
            seqs = array("q")
            if name is None:  # rows from before the chains (or written without a key): nothing to resume
                for _, _, seq, _, when in group:
                    seqs.append(seq)
                    times.append(when)
                res.unchained = len(seqs)
                plan[None] = seqs
                continue
            lo, hi = spans[name]
            start = max(cps.resume.get(name, {}), default=0)  # links below were pruned before
            if lo > start:  # rows missing at the start of the chain with no checkpoint: not ours to hide
                log.warning("audit: chain %s starts at link %d, but no checkpoint says links %d..%d were pruned: "
                            "not pruning it (run sinkhole log verify)", name, lo, start, lo - 1)
                res.skipped.append(name)
                continue
            expected, last_mac, first, last = start, None, None, None
            for _, link, seq, mac, when in group:
                if link < start:  # left by a prune that stopped midway: its checkpoint covers them
                    seqs.append(seq)
                    continue
                if link != expected:
                    break  # a newer row (or a hole) ends the prefix
                seqs.append(seq)
                expected, last_mac = link + 1, mac
                first = when if first is None else min(first, when)
                last = when if last is None else max(last, when)
            if not seqs:
                continue
            plan[name] = seqs
            if last_mac is not None:
                entries.append({"chain": name, "first_link": expected, "prev_mac": last_mac,
                                "rows": expected - start, "first_time": first, "last_time": last,
                                **({"whole": True} if expected > hi else {})})
                times += [first, last]
        cut = {e["chain"] for e in entries}
        gone = list(cps.gone)
        carried: set[tuple[str, int]] = set()
        for e in cps.entries:  # checkpoints being pruned: carry over what the verifier still needs
            name, first_link = e.get("chain"), e.get("first_link")
            if e.get("checkpoint_chain") not in plan or not isinstance(name, str) or name in cut:
                continue
            if name not in spans:  # gone whole: its key generation is all the verifier still needs
                g = chain.chain_generation(name)
                if g is not None:
                    gone.append([g, g])
            elif first_link == max(cps.resume[name]) and (name, first_link) not in carried:
                carried.add((name, first_link))
                entries.append({k: v for k, v in e.items() if k not in ("checkpoint_seq", "checkpoint_chain")}
                               | {"carried_from": e["checkpoint_seq"]})
        res.rows = sum(len(s) for s in plan.values())
        res.chains = len(cut)
        if times:
            res.first_time, res.last_time = min(times), max(times)
        return plan, entries, chain.merge_ranges(gone)

    # ------------------------------------------------------------------ the rows chains are verified over

    def _dicts(self, sql: str, args: tuple = ()) -> Iterator[dict]:
        cur = self.conn.execute(sql, args)
        names = [d[0] for d in cur.description]
        for tup in cur:
            yield dict(zip(names, tup, strict=True))

    def chained_rows(self) -> Iterator[dict]:
        """Every audit row (seq, mac and what the chain covers) in seq order: sinkhole.audit.chain.verify's walk."""
        return self._dicts(f"SELECT seq, mac, {', '.join(chain.ROW_COLUMNS)} FROM audit ORDER BY seq")

    def checkpoint_rows(self) -> Iterator[dict]:
        """The checkpoint rows a prune left, as chained_rows gives them."""
        return self._dicts(f"SELECT seq, mac, {', '.join(chain.ROW_COLUMNS)} FROM audit WHERE action = ?"
                           " ORDER BY seq", (chain.CHECKPOINT,))

    def journal_rows(self) -> Iterator[dict]:
        """Every journal entry with its MAC, in id order: sinkhole.audit.chain.verify_journal's walk."""
        return self._dicts(f"SELECT {', '.join(c for c, _ in chain.JOURNAL_COLUMNS)}, mac FROM journal ORDER BY id")

    def journal_generations(self) -> dict[int, str]:
        """Key generation -> the time of the first journal entry sealed with it ({} without a journal table: not a
        sinkhole database, or a very old one)."""
        try:
            return {int(g): str(when) for g, when in self.conn.execute(
                "SELECT link, min(time) FROM journal WHERE mac IS NOT NULL AND link IS NOT NULL GROUP BY link")}
        except sqlite3.OperationalError:
            return {}

    def chain_heads(self) -> list[dict]:
        """The last row of every chain (chain, link, seq, mac, time): what `sinkhole log anchor` prints."""
        sql = ("SELECT a.chain, a.link, a.seq, a.mac, a.time FROM audit a JOIN "
               "(SELECT chain, max(link) AS link FROM audit WHERE chain IS NOT NULL GROUP BY chain) h "
               "ON a.chain = h.chain AND a.link = h.link ORDER BY a.chain, a.seq")
        out: dict[str, dict] = {}
        for name, link, seq, mac, when in self.conn.execute(sql):
            out.setdefault(name, {"chain": name, "link": link, "seq": seq, "mac": mac, "time": when})
        return list(out.values())

    # ------------------------------------------------------------------ audit

    def insert_audit(self, rows: list[dict] | list[tuple]) -> int | None:
        """Rows as dicts with the columns of AUDIT_INSERT, or as tuples in that order (faster), in one
        transaction; returns the seq of the last row (one transaction holds the write lock, so the rows got
        consecutive seqs ending there), None for no rows."""
        if rows and isinstance(rows[0], dict):
            rows = [tuple(r.get(c) for c in AUDIT_INSERT) for r in rows]  # type: ignore[union-attr]
        last = None
        with self.db.atomic():
            # many rows per statement: one sqlite3_step (one release of the GIL) for each chunk, where
            # executemany steps, and so hands the GIL to the event loop and back, once per row
            # chunks of 256, then 128, 64, ... 1 for the rest: nine statement texts, each prepared once
            i, n, size = 0, len(rows), _CHUNK
            while i < n:
                while n - i < size:
                    size >>= 1
                last = self.conn.execute(_chunk_sql(size), [v for r in rows[i:i + size] for v in r]).lastrowid
                i += size
        return last

    def audit_row(self, seq: int) -> dict | None:
        """One audit row by its seq."""
        return next(self._dicts("SELECT * FROM audit WHERE seq = ?", (seq,)), None)

    # ------------------------------------------------------------------ the audit writer's connection

    def tune_for_writer(self, wal_limit: int) -> None:
        """The audit writer's settings (measured on the writer alone, 2 cores: 31.7k rows/s with SQLite's
        defaults, 42k with these): a 16 MiB page cache (the indexes' pages stay in memory) and a checkpoint every
        4000 WAL pages instead of 1000 (a hot index page is copied into the database once per checkpoint, not
        four times); the WAL file cut back to `wal_limit` bytes when the log starts over."""
        self.conn.execute("PRAGMA cache_size=-16384")
        self.conn.execute("PRAGMA wal_autocheckpoint=4000")
        self.conn.execute(f"PRAGMA journal_size_limit={int(wal_limit)}")

    def set_busy_timeout(self, ms: int) -> None:
        """How long a statement waits for another connection's lock before it fails (DatabaseError)."""
        self.conn.execute(f"PRAGMA busy_timeout={int(ms)}")

    def restart_wal(self) -> bool:
        """A RESTART checkpoint (it waits, within the busy timeout, for the other connections' transactions):
        True when it ran through and the WAL starts over."""
        return not self.conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0]

    def interrupt_when(self, due: Callable[[], bool]) -> None:
        """A statement running when `due()` turns true is interrupted (DatabaseError: interrupted); looked at every
        20,000 SQLite instructions."""
        self.conn.set_progress_handler(lambda: int(bool(due())), 20000)

    def _log_where(self, since: str | None, until: str | None, client: str | None, domain: str | None,
                   action: str | None, *, group: str | None = None, category: str | None = None,
                   rule: str | None = None) -> tuple[str, dict]:
        where, args = [], {}
        if since:
            where.append("time >= :since")
            args["since"] = since
        if until:
            where.append("time < :until")
            args["until"] = until
        if client:
            where.append(_client_where(client, args))
        if domain:  # the name and its subdomains: a range of the reversed-name index
            rdomain = reverse_name(domain)
            where.append("(rname = :rdomain OR (rname > :rdomain || '.' AND rname < :rdomain || '/')"
                         " OR (rname IS NULL AND (qname = :domain"  # rows from before schema 4
                         " OR substr(qname, -length(:domain) - 1) = '.' || :domain)))")
            args["domain"] = domain
            args["rdomain"] = rdomain
        for column, value in (("action", action), ("grp", group), ("category", category), ("rule", rule)):
            if value:
                where.append(f"{column} = :{column}")
                args[column] = value
        return (" WHERE " + " AND ".join(where)) if where else "", args

    def query_log(self, since: str | None = None, until: str | None = None, client: str | None = None,
                  domain: str | None = None, action: str | None = None,
                  limit: int | None = None, *, group: str | None = None, category: str | None = None,
                  rule: str | None = None, through_seq: int | None = None) -> Iterator[dict]:
        """Matching rows oldest first; with `limit`, the latest `limit` of them; with `through_seq`, only
        rows with seq <= it (the snapshot `follow_log` then continues from)."""
        where, args = self._log_where(since, until, client, domain, action, group=group, category=category,
                                      rule=rule)
        if through_seq is not None:
            where += (" AND " if where else " WHERE ") + "seq <= :through"
            args["through"] = through_seq
        if not limit:  # oldest first, streamed from the cursor
            return iter(self.db.query(f"SELECT * FROM audit{where} ORDER BY time, seq", args))
        sql = f"SELECT * FROM audit{where} ORDER BY time DESC, seq DESC LIMIT :limit"  # workers commit out of order
        args["limit"] = limit
        rows = list(self.db.query(sql, args))
        return iter(reversed(rows))

    def count_log(self, since: str | None = None, until: str | None = None, client: str | None = None,
                  domain: str | None = None, action: str | None = None, *, group: str | None = None,
                  category: str | None = None, rule: str | None = None) -> int:
        """How many rows query_log would return (without a limit)."""
        where, args = self._log_where(since, until, client, domain, action, group=group, category=category,
                                      rule=rule)
        return int(self.conn.execute(f"SELECT count(*) FROM audit{where}", args).fetchone()[0])

    def last_seq(self) -> int:
        """The highest seq committed (0 for an empty log)."""
        return int(self.conn.execute("SELECT max(seq) FROM audit").fetchone()[0] or 0)

    def log_after(self, after_seq: int, through_seq: int, since: str | None = None, until: str | None = None,
                  client: str | None = None, domain: str | None = None, action: str | None = None, *,
                  group: str | None = None, category: str | None = None, rule: str | None = None,
                  batch: int = 5000) -> list[dict]:
        """Matching rows with after_seq < seq <= through_seq, in seq order (the first `batch`): the live tail.

        Commit order is seq order: seq is the INTEGER PRIMARY KEY, assigned as max(seq) + 1 when a writer
        inserts, inside its write transaction, and SQLite lets one write transaction run at a time; so
        once seq n is visible to a reader, no row with a lower seq can appear later (save rows inserted
        after the newest rows were deleted, which reuses their seqs). Reading `seq > last seen` misses
        nothing, whatever the number of writer processes. NOT INDEXED: the rowid range, never a filter's
        index (which would rescan a whole client's or domain's rows at every poll)."""
        where, args = self._log_where(since, until, client, domain, action, group=group, category=category,
                                      rule=rule)
        where += (" AND " if where else " WHERE ") + "seq > :after AND seq <= :through"
        args["after"], args["through"] = after_seq, through_seq
        return [dict(r) for r in self.db.query(
            f"SELECT * FROM audit NOT INDEXED{where} ORDER BY seq LIMIT {int(batch)}", args)]

    def stats(self, since: str | None = None, until: str | None = None, top: int = 10,
              progress: Callable[[int], None] | None = None) -> dict:
        """What `sinkhole stats` shows; `progress` is called with 1 after each of its STATS_QUERIES queries."""
        where, args = self._log_where(since, until, None, None, None)
        blocked = where + (" AND " if where else " WHERE ") + "action = 'blocked'"

        def rows(sql: str) -> list:
            out = self.conn.execute(sql, args).fetchall()
            if progress is not None:
                progress(1)
            return out

        def dicts(sql: str) -> list[dict]:
            out = [dict(r) for r in self.db.query(sql, args)]
            if progress is not None:
                progress(1)
            return out

        totals = {
            "queries_logged": rows(f"SELECT count(*) FROM audit{where}")[0][0],
            "blocked": rows(f"SELECT count(*) FROM audit{blocked}")[0][0],
            "clients": rows(f"SELECT count(DISTINCT client) FROM audit{blocked}")[0][0],
            "domains": rows(f"SELECT count(DISTINCT qname) FROM audit{blocked}")[0][0],
        }
        top_domains = dicts(
            f"SELECT rule, category, count(*) AS queries, count(DISTINCT client) AS clients FROM audit{blocked}"
            f" GROUP BY rule, category ORDER BY queries DESC, rule LIMIT {int(top)}")
        top_names = dicts(
            f"SELECT qname, count(*) AS queries FROM audit{blocked}"
            f" GROUP BY qname ORDER BY queries DESC, qname LIMIT {int(top)}")
        top_clients = dicts(
            f"SELECT client, count(*) AS queries, count(DISTINCT qname) AS names FROM audit{blocked}"
            f" GROUP BY client ORDER BY queries DESC, client LIMIT {int(top)}")
        # a bypass attempt: a canary, or a lookup of a public encrypted-DNS resolver (the doh-bypass list)
        bypass = where + (" AND " if where else " WHERE ") + "(action = 'canary' OR category = 'doh-bypass')"
        totals["bypass_attempts"] = rows(f"SELECT count(*) FROM audit{bypass}")[0][0]
        page = where + (" AND " if where else " WHERE ") + "action = 'page'"
        totals["page_views"], totals["page_clients"] = rows(
            f"SELECT count(*), count(DISTINCT client) FROM audit{page}")[0]
        bypass_clients = dicts(
            f"SELECT client, count(*) AS attempts, group_concat(DISTINCT qname) AS canaries FROM audit{bypass}"
            f" GROUP BY client ORDER BY attempts DESC, client LIMIT {int(top)}")
        by_group = dicts(
            f"SELECT grp AS [group], count(*) AS blocked, count(DISTINCT client) AS clients FROM audit{blocked}"
            f" GROUP BY grp ORDER BY blocked DESC, grp")
        by_category = dicts(
            f"SELECT category, count(*) AS blocked, count(DISTINCT client) AS clients FROM audit{blocked}"
            f" GROUP BY category ORDER BY blocked DESC, category")
        per_hour = dict(rows(f"SELECT substr(time, 1, 13) AS hour, count(*) FROM audit{blocked} GROUP BY hour"))
        return {"totals": totals, "top_rules": top_domains, "top_names": top_names, "top_clients": top_clients,
                "bypass_clients": bypass_clients, "by_group": by_group, "by_category": by_category,
                "hourly": hourly(per_hour, since, until)}


STATS_QUERIES = 13  # the queries of Store.stats (the total of its progress)


MAX_HOURS = 24 * 400  # a histogram longer than this starts at the first hour with a blocked row


def hourly(per_hour: dict[str, int], since: str | None, until: str | None,
           now: datetime | None = None) -> list[dict]:
    """{'2026-11-22T18': 3, ...} -> [{'hour': '2026-11-22T18:00:00Z', 'blocked': 3}, ...] for every hour
    from `since` (or the first hour with rows, when since is missing or far back) to `until` (or now),
    the hours without a row as 0."""
    def parse(text: str) -> datetime:
        return datetime.fromisoformat(text[:13].replace("Z", "") + ":00:00+00:00")

    end = parse(until) if until else (now or datetime.now(UTC)).replace(minute=0, second=0, microsecond=0)
    if until and until[13:] not in ("", ":00:00.000000Z"):  # an end inside an hour: that hour is drawn
        end += timedelta(hours=1)
    else:
        end += timedelta(hours=0 if until else 1)
    seen = sorted(per_hour)
    if seen:  # rows stamped outside [since, until) cannot be here; rows after `now` (clock skew) widen it
        end = max(end, parse(seen[-1]) + timedelta(hours=1))
    start = parse(since) if since else (parse(seen[0]) if seen else end - timedelta(hours=1))
    if (end - start) > timedelta(hours=MAX_HOURS):
        start = max(start, parse(seen[0]) if seen else end - timedelta(hours=1))
        start = max(start, end - timedelta(hours=MAX_HOURS))
    out = []
    t = start
    while t < end:
        key = t.strftime("%Y-%m-%dT%H")
        out.append({"hour": key + ":00:00Z", "blocked": per_hour.get(key, 0)})
        t += timedelta(hours=1)
    return out
