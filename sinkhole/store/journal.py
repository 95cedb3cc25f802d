"""The change journal: who changed what, when, from where, with which command; every entry sealed into the
journal chain (sinkhole.audit.chain) in the transaction of the change itself. The id of the last entry that
changed the policy is the policy version."""

from __future__ import annotations

import json
import logging
import os
import pwd
import shlex
import socket
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from sinkhole.audit import chain
from sinkhole.errors import ConfigError
from sinkhole.store.schema import Database, iso

# journal actions that change nothing in the policy: they do not make a new policy version (a running server
# neither reloads nor logs a new version for them, and an RPZ serial stays as it is)
NOT_POLICY = frozenset({"settings reload", "log prune",
                        # the web console's accounts and logins (sinkhole.store.accounts)
                        "user add", "user passwd", "user role", "user remove", "user unlock",
                        "web login", "web logout", "web login failed", "web lockout"})
JOURNAL_FIELDS = ["id", "time", "user", "sudo_user", "host", "command", "action", "kind", "category", "domains",
                  "detail", "link", "mac"]
log = logging.getLogger(__name__)


def journal_filter(since: str | None, until: str | None, user: str | None) -> tuple[list[str], list[object]]:
    """The WHERE terms (and their arguments) of a journal query: `since` <= time < `until`; `user` matches the
    OS user or the sudo user (`web:NAME` for the console's accounts)."""
    where: list[str] = []
    args: list[object] = []
    if since:
        where.append("time >= ?")
        args.append(since)
    if until:
        where.append("time < ?")
        args.append(until)
    if user:
        where.append("(user = ? OR sudo_user = ?)")
        args += [user, user]
    return where, args


@dataclass(frozen=True)
class Actor:
    """Who made a change, for the journal."""

    user: str = field(default_factory=lambda: _safe_user())
    sudo_user: str | None = field(default_factory=lambda: os.environ.get("SUDO_USER"))
    host: str = field(default_factory=socket.gethostname)
    command: str = field(default_factory=lambda: shlex.join(["sinkhole", *sys.argv[1:]]))


def _safe_user() -> str:
    """The account of the effective UID: not $USER or $LOGNAME, which anyone can set."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


class JournalQueries(Database):
    """The journal's entries: written (and sealed) by every change, read by `sinkhole changes`, verified by
    `log verify` (journal_rows)."""

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

    def policy_version(self) -> int:
        """The id of the last journal entry that changed the policy (NOT_POLICY entries, such as logins, do not):
        read back from the newest entry, so a run of logins since the last change costs a few rows."""
        row = self.conn.execute(f"SELECT id FROM journal WHERE action NOT IN ({','.join('?' * len(NOT_POLICY))})"
                                " ORDER BY id DESC LIMIT 1", sorted(NOT_POLICY)).fetchone()
        return int(row[0]) if row else 0

    def journal_settings(self, values: dict[str, str], actor: Actor | None = None) -> int:
        """A configuration reload that changed settings: one journal entry naming each new value."""
        with self.db.atomic():
            return self._journal(actor or Actor(), "settings reload", None, None, sorted(values),
                                 json.dumps(values, sort_keys=True))

    def journal(self, since: str | None = None, until: str | None = None, user: str | None = None) -> list[dict]:
        """Journal entries in id order; `user` matches the OS user or the sudo user."""
        where, args = journal_filter(since, until, user)
        return list(self.db["journal"].rows_where(" AND ".join(where) or None, args, order_by="id"))

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

