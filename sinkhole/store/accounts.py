"""The web console's accounts, sessions and login journal: the SQL, as a thin extension of Store.

Tables (made on first use, beside the others in the one database):
- `web_users`: name, role (viewer < auditor < admin), the argon2id hash, failed logins in a row, locked_until;
- `web_sessions`: one row per signed-in browser or script, keyed by the SHA-256 of its cookie (the cookie
  itself is never stored), with its CSRF token, its start and its last use.

Every account change (`user add|passwd|remove|unlock`, from the CLI or the console) and every login, logout,
failed login and lockout is an entry of the chained change journal (Store._journal), with the address it came
from; none of them changes the policy (store.NOT_POLICY), so a running server does not reload for them.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from dataclasses import dataclass

from sinkhole.errors import ConfigError
from sinkhole.store.db import Store
from sinkhole.store.journal import Actor
from sinkhole.store.schema import iso

ROLES = ("viewer", "auditor", "admin")  # each may do what the ones before it may
NAME = re.compile(r"[a-z0-9][a-z0-9._@-]{0,63}\Z")
LOCK_AFTER = 5  # failed logins in a row that lock an account ...
LOCK_SECONDS = 900  # ... for this long (or until `sinkhole user unlock` / `user passwd`)

_TABLES = """
CREATE TABLE IF NOT EXISTS web_users (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, hash TEXT NOT NULL, created_at TEXT, created_by TEXT,
    password_changed_at TEXT, failures INTEGER NOT NULL DEFAULT 0, last_failure TEXT, locked_until REAL,
    last_login TEXT, last_address TEXT);
CREATE TABLE IF NOT EXISTS web_sessions (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, csrf TEXT NOT NULL, created REAL NOT NULL, seen REAL NOT NULL,
    address TEXT, tls INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS web_sessions_user ON web_sessions(user);
"""


def check_name(name: str) -> str:
    """An account name: lower case letters, digits and . _ @ - (64 at most); ConfigError otherwise."""
    name = name.strip().lower()
    if not NAME.match(name):
        raise ConfigError(f"{name[:80]!r} cannot be an account name: lower-case letters, digits and . _ @ -, "
                          "64 at most")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    return role


def may(role: str | None, needed: str) -> bool:
    """Whether `role` may do what `needed` may (viewer < auditor < admin)."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def web_actor(account: str, address: str, what: str) -> Actor:
    """The journal's actor for something done in the web console: the account (as `web:NAME`, never to be taken
    for an OS account), the address the request came from (in the host column) and what was done."""
    return Actor(user=f"web:{account}", sudo_user=None, host=address, command=f"web console: {what}")


@dataclass(frozen=True)
class Session:
    id: str  # SHA-256 hex of the cookie
    user: str
    role: str
    csrf: str
    created: float
    seen: float
    address: str | None


class Accounts:
    """Accounts and sessions in `store`'s database (see the module's text)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = store.conn
        try:
            self.conn.executescript(_TABLES)
        except sqlite3.OperationalError as exc:  # a read-only database that has no such tables yet
            if "readonly" not in str(exc):
                raise

    # ------------------------------------------------------------------ accounts

    def users(self) -> list[dict]:
        """Every account (no hashes), by name; `locked` when locked now."""
        now = time.time()
        rows = self.conn.execute(
            "SELECT name, role, created_at, created_by, password_changed_at, failures, last_failure, locked_until,"
            " last_login, last_address, (SELECT count(*) FROM web_sessions s WHERE s.user = u.name) AS sessions"
            " FROM web_users u ORDER BY name").fetchall()
        out = []
        for (name, role, created_at, created_by, changed, failures, last_failure, locked_until, last_login,
             last_address, sessions) in rows:
            out.append({"name": name, "role": role, "created_at": created_at, "created_by": created_by,
                        "password_changed_at": changed, "failures": failures, "last_failure": last_failure,
                        "locked_until": iso(locked_until) if locked_until and locked_until > now else None,
                        "last_login": last_login, "last_address": last_address, "sessions": sessions})
        return out

    def user(self, name: str) -> dict | None:
        """One account with its hash, or None. A lock that has run out is gone, and its failures with it: the
        count (and the backoff it sets) starts again from 0."""
        row = self.conn.execute("SELECT name, role, hash, failures, locked_until FROM web_users WHERE name = ?",
                                (name,)).fetchone()
        if row is None:
            return None
        user = dict(zip(("name", "role", "hash", "failures", "locked_until"), row, strict=True))
        if user["locked_until"] is not None and user["locked_until"] <= time.time():
            user["failures"], user["locked_until"] = 0, None
        return user

    def admins(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM web_users WHERE role = 'admin'").fetchone()[0])

    def add_user(self, name: str, role: str, password_hash: str, actor: Actor) -> None:
        name, role = check_name(name), check_role(role)
        with self.store._immediate():
            if self.conn.execute("SELECT 1 FROM web_users WHERE name = ?", (name,)).fetchone():
                raise ConfigError(f"account {name!r} exists already (sinkhole user passwd {name} sets a new password)")
            now = iso(time.time())
            self.conn.execute("INSERT INTO web_users (name, role, hash, created_at, created_by, password_changed_at)"
                              " VALUES (?,?,?,?,?,?)", (name, role, password_hash, now, actor.user, now))
            self.store._journal(actor, "user add", None, None, [], json.dumps({"account": name, "role": role}))

    def _existing(self, name: str) -> dict:
        user = self.user(name)
        if user is None:
            raise ConfigError(f"no account {name!r} (sinkhole user list)")
        return user

    def set_password(self, name: str, password_hash: str, actor: Actor) -> int:
        """A new password: the account is unlocked and every session of it ends; returns the sessions ended."""
        with self.store._immediate():
            self._existing(name)
            self.conn.execute("UPDATE web_users SET hash = ?, password_changed_at = ?, failures = 0,"
                              " locked_until = NULL WHERE name = ?", (password_hash, iso(time.time()), name))
            ended = self.conn.execute("DELETE FROM web_sessions WHERE user = ?", (name,)).rowcount
            self.store._journal(actor, "user passwd", None, None, [],
                                json.dumps({"account": name, "sessions_ended": ended}))
        return ended

    def set_role(self, name: str, role: str, actor: Actor) -> None:
        role = check_role(role)
        with self.store._immediate():
            user = self._existing(name)
            if user["role"] == "admin" and role != "admin" and self.admins() == 1:
                raise ConfigError(f"{name} is the last admin account: add another admin first")
            self.conn.execute("UPDATE web_users SET role = ? WHERE name = ?", (role, name))
            self.store._journal(actor, "user role", None, None, [],
                                json.dumps({"account": name, "role": role, "was": user["role"]}))

    def remove_user(self, name: str, actor: Actor) -> int:
        """Remove an account and end its sessions; returns the sessions ended."""
        with self.store._immediate():
            self._existing(name)
            self.conn.execute("DELETE FROM web_users WHERE name = ?", (name,))
            ended = self.conn.execute("DELETE FROM web_sessions WHERE user = ?", (name,)).rowcount
            self.store._journal(actor, "user remove", None, None, [],
                                json.dumps({"account": name, "sessions_ended": ended}))
        return ended

    def unlock(self, name: str, actor: Actor) -> bool:
        """Clear the failed logins of an account; False when it was not locked."""
        with self.store._immediate():
            user = self._existing(name)
            was = bool(user["locked_until"] and user["locked_until"] > time.time())
            self.conn.execute("UPDATE web_users SET failures = 0, locked_until = NULL WHERE name = ?", (name,))
            self.store._journal(actor, "user unlock", None, None, [], json.dumps({"account": name, "was_locked": was}))
        return was

    # ------------------------------------------------------------------ logins

    def login_succeeded(self, name: str, address: str, session: Session, tls: bool) -> None:
        """A good password: the failures are forgotten, the session stored, the login journaled."""
        with self.store._immediate():
            self.conn.execute("UPDATE web_users SET failures = 0, locked_until = NULL, last_login = ?,"
                              " last_address = ? WHERE name = ?", (iso(time.time()), address, name))
            self.conn.execute("INSERT INTO web_sessions (id, user, csrf, created, seen, address, tls)"
                              " VALUES (?,?,?,?,?,?,?)", (session.id, name, session.csrf, session.created,
                                                          session.seen, address, int(tls)))
            self.store._journal(web_actor(name, address, "login"), "web login", None, None, [],
                                json.dumps({"account": name, "role": session.role, "address": address,
                                            "https": tls}))

    def login_failed(self, name: str, address: str, reason: str, known: bool) -> float | None:
        """A failed login (wrong password, unknown account, locked account): journaled with the address; a
        known account counts it, and LOCK_AFTER in a row lock it for LOCK_SECONDS (a `web lockout` entry).
        Returns the time the account is locked until, when it is."""
        now = time.time()
        with self.store._immediate():
            locked_until = None
            failures = 0
            if known and reason == "wrong password":  # after a lock that has run out, the count starts again
                self.conn.execute("UPDATE web_users SET failures = CASE WHEN locked_until <= ?1 THEN 1"
                                  " ELSE failures + 1 END, locked_until = CASE WHEN locked_until <= ?1 THEN NULL"
                                  " ELSE locked_until END, last_failure = ?2 WHERE name = ?3", (now, iso(now), name))
                failures = int(self.conn.execute("SELECT failures FROM web_users WHERE name = ?",
                                                 (name,)).fetchone()[0])
            actor = web_actor(name, address, "login")
            self.store._journal(actor, "web login failed", None, None, [], json.dumps(
                {"account": name, "address": address, "reason": reason, "failures": failures}))
            if failures >= LOCK_AFTER:
                locked_until = now + LOCK_SECONDS
                self.conn.execute("UPDATE web_users SET locked_until = ? WHERE name = ?", (locked_until, name))
                self.store._journal(actor, "web lockout", None, None, [], json.dumps(
                    {"account": name, "address": address, "failures": failures, "until": iso(locked_until)}))
        return locked_until

    # ------------------------------------------------------------------ sessions

    def session(self, ident: str) -> Session | None:
        """The session with this id and its account's role now (None when it or the account is gone)."""
        row = self.conn.execute(
            "SELECT s.id, s.user, u.role, s.csrf, s.created, s.seen, s.address FROM web_sessions s"
            " JOIN web_users u ON u.name = s.user WHERE s.id = ?", (ident,)).fetchone()
        return None if row is None else Session(*row)

    def touch(self, ident: str, now: float) -> None:
        with self.store.db.atomic():
            self.conn.execute("UPDATE web_sessions SET seen = ? WHERE id = ?", (now, ident))

    def logout(self, session: Session, address: str) -> None:
        with self.store._immediate():
            gone = self.conn.execute("DELETE FROM web_sessions WHERE id = ?", (session.id,)).rowcount
            if gone:
                self.store._journal(web_actor(session.user, address, "logout"), "web logout", None, None, [],
                                    json.dumps({"account": session.user, "address": address}))

    def end_session(self, ident: str) -> None:
        """A session past its time: removed without a journal entry (the next login is one)."""
        with self.store.db.atomic():
            self.conn.execute("DELETE FROM web_sessions WHERE id = ?", (ident,))

    def prune_sessions(self, idle_before: float, created_before: float) -> int:
        with self.store.db.atomic():
            return self.conn.execute("DELETE FROM web_sessions WHERE seen < ? OR created < ?",
                                     (idle_before, created_before)).rowcount
