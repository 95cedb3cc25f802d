"""Access requests filed on the block page, and their approval (an allow rule with an expiry) or denial."""

from __future__ import annotations

import time

from sinkhole.errors import ConfigError
from sinkhole.model import RuleKind
from sinkhole.policy.decide import DEFAULT_GROUP, EVERYWHERE, GROUP_PREFIX
from sinkhole.store.journal import Actor
from sinkhole.store.rules import RuleQueries
from sinkhole.store.schema import iso


class RequestQueries(RuleQueries):
    """Access requests from the block page; an approval adds its allow rule in the same transaction."""

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

