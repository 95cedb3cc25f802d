"""Rules and categories: adding, removing, importing lists and their sources, enabling categories, and the
policy built from them (in whole, or patched for the names the journal says changed)."""

from __future__ import annotations

import functools
import itertools
import json
import time
from collections.abc import Callable, Iterable

from sinkhole.errors import ConfigError
from sinkhole.model import RuleKind
from sinkhole.policy.decide import Policy
from sinkhole.store.groups import GroupQueries
from sinkhole.store.journal import NOT_POLICY, Actor
from sinkhole.store.schema import Seed, iso

# journal actions a running server applies by patching its policy (they add or remove the names they list);
# those that change nothing in the policy are NOT_POLICY; any other action makes it read the policy whole
PATCHABLE = frozenset({"block add", "block remove", "allow add", "allow remove", "block expire", "allow expire"})
PATCH_MAX = 50_000  # names: beyond this, reading the policy whole is as quick
PROGRESS_ROWS = 10_000  # rows stored between two progress reports of a list import


class RuleQueries(GroupQueries):
    """Rules, categories and list sources; each change journaled; the policy built from them."""

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

    def regex_rules(self, but: str | None = None) -> list[tuple[str, str, str]]:
        """(domain, kind, category) of every `/pattern/` rule stored, but those of category `but`: what the
        regex budget (policy.regexcost) is counted over."""
        return self.conn.execute("SELECT domain, kind, category FROM rules WHERE domain LIKE '/%/'"
                                 " AND category IS NOT ?", (but,)).fetchall()

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


    def _seed(self, seed: Iterable[Seed]) -> None:
        actor = Actor(command="first start: load shipped lists")
        for category, entries, source in seed:
            self._replace_category(category, entries, source, actor, action="lists load")
