"""Client groups: networks with their own categories in force and their own extra rules (`group:NAME`)."""

from __future__ import annotations

import json
import time

from sinkhole.errors import ConfigError
from sinkhole.policy.decide import DEFAULT_GROUP, GROUP_PREFIX, GroupSpec
from sinkhole.store.journal import Actor, JournalQueries
from sinkhole.store.schema import iso


class GroupQueries(JournalQueries):
    """Client groups and their networks; each change journaled."""

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

