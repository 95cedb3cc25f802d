"""The decision for one name. Pure: a Policy is an immutable snapshot, swapped whole on reload.

Client groups. Every client belongs to one group: the one whose network holds its address most
specifically, else `default`. A group has its own set of categories in force; the rules of every
category sit in one table, each name mapping to the (kind, category, list) entries that name it, and a
lookup skips entries whose category is not in force for the asking group. So ten groups over a million
rules cost a million rules, not ten million.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import re2

from sinkhole.model import FORWARD, Action, Query, Rule, RuleKind, Verdict
from sinkhole.policy.names import client_address, is_regex
from sinkhole.policy.regexcost import within_budget

# Names that browsers and operating systems ask to learn whether they may bypass this resolver.
# Exact names, answered here whatever the rules say (unless an allow rule names them exactly).
CANARIES: dict[str, str] = {
    "use-application-dns.net": "nxdomain",  # Firefox keeps DNS-over-HTTPS off (its canary domain)
    "mask.icloud.com": "nxdomain",  # iCloud Private Relay stays off (Apple's documented way)
    "mask-h2.icloud.com": "nxdomain",
    "_dns.resolver.arpa": "nodata",  # RFC 9462: no discovery of this resolver's encrypted twins
}
CANARY_CATEGORY = "bypass"
DEFAULT_GROUP = "default"
GROUP_PREFIX = "group:"  # the category `group:NAME` holds the extra rules of group NAME, in force for it alone
EVERYWHERE = "manual"  # rules added by `block add` / `allow add` without --category: in force for every group
_CLIENT_MEMO_MAX = 65536
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix: the last 32 bits are IPv4
_REGEX_MEMO_MAX = 8192  # names whose regex outcome a policy remembers (Policy._match_regex)
DS = 43  # the qtype of a delegation signer RRset (RFC 4034)
log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Entry = tuple[RuleKind, str, str | None]  # (kind, category, list it came from)


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the reason is in the exception; RE2 would also print it on stderr
_RE2_OPTIONS.never_capture = True  # a rule only asks whether the name matches


_RE2_ALL_OPTIONS = re2.Options()
_RE2_ALL_OPTIONS.log_errors = False
_RE2_ALL_OPTIONS.never_capture = True
_RE2_ALL_OPTIONS.max_mem = 64 << 20  # bytes for the program of every pattern at once


def any_of(patterns: list[str]) -> Any:
    """One RE2 program that matches where any of `patterns` does; None when RE2 cannot hold them all (then each
    is tried, as before)."""
    try:
        return re2.compile("|".join(f"(?:{p})" for p in patterns), _RE2_ALL_OPTIONS)
    except re2.error:
        return None


def compile_regex(pattern: str) -> Any:
    """A regex rule's pattern compiled with RE2 (google-re2): matching takes time linear in the name whatever
    the pattern (no backtracking), so that no rule can make a lookup slow. RE2's syntax is Python's without
    backreferences and lookaround; a pattern outside it, or too large for RE2's memory bound, raises
    ValueError with RE2's reason."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        raise ValueError(reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)) from None


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """A client group as stored: its networks, and its categories (None: those in force for everyone)."""

    name: str
    networks: tuple[str, ...] = ()
    categories: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Group:
    """A group as the policy uses it: the exact set of categories in force for its clients."""

    name: str
    allowed: frozenset[str]


class Policy:
    """Block and allow rules, each covering a name and all its subdomains.

    The most specific rule in force for the client's group wins; at equal specificity an allow rule
    beats a block rule. `/regex/` rules are tried only for names that no suffix rule covers; there an
    allow regex beats a block regex. Canaries are answered for every group.
    """

    __slots__ = ("_client_groups", "_combos", "_in_force", "_kinds", "_map", "_networks", "_regex_any", "_regex_memo",
                 "_regexes",
                 "allows",
                 "blocks", "canaries", "categories", "default", "groups", "ip_rules", "version")

    def __init__(self, rules: Iterable[Rule | tuple] = (), version: int = 0, canaries: bool = True,
                 groups: Iterable[GroupSpec] = (), disabled: Iterable[str] = (),
                 bulk: Iterable[tuple[tuple[str, str, str | None], Callable[[], list[str]]]] = ()) -> None:
        """`rules`: (domain, kind, category[, source]) tuples or Rules. `bulk`: the plain names (no regex, no
        network) of each (kind, category, source), as a function that returns them: called only for those
        in force for some group, and taken into the table in C (dict.fromkeys), not a name at a time."""
        self.canaries = canaries
        groups = list(groups)
        specs = {g.name: g for g in groups if g.name != DEFAULT_GROUP}
        default_spec = next((g for g in groups if g.name == DEFAULT_GROUP), None)
        off = frozenset(disabled)
        explicit = {c for g in specs.values() if g.categories is not None for c in g.categories}
        if default_spec is not None and default_spec.categories is not None:
            explicit.update(default_spec.categories)

        def in_force_somewhere(category: str) -> bool:
            if category.startswith(GROUP_PREFIX):
                return category[len(GROUP_PREFIX):] in specs or category == GROUP_PREFIX + DEFAULT_GROUP
            return category not in off or category in explicit

        table: dict[str, tuple[Entry, ...]] = {}
        combos: dict[tuple, tuple] = {}  # every distinct tuple of entries, shared by the names that have it
        # (kind, category, source) -> (in force somewhere, entry, its one-entry combo, is an allow rule): the
        # per-rule work is one small-tuple lookup here and one dict store, with no enum hashing (Python-level)
        kinds: dict[tuple, tuple[bool, Entry, tuple[Entry, ...], bool]] = {}
        regexes: list[tuple[Any, Entry, str]] = []
        self.ip_rules: list[tuple[Network, str, str | None]] = []
        counts = [0, 0]  # block, allow
        self._kinds, self._combos, self._in_force = kinds, combos, in_force_somewhere
        new_kind = self._new_kind
        collecting = gc.isenabled()
        gc.disable()  # a million rules allocate millions of small objects: no collections while they do
        try:
            for key, fetch in bulk:
                info = kinds.get(key) or new_kind(key)
                if not info[0]:
                    continue
                names = fetch()
                counts[info[3]] += len(names)
                if not table:
                    table = dict.fromkeys(names, info[2])
                    continue
                dups = table.keys() & names
                for domain in dups:  # a name in two lists: rare, one at a time
                    have = table[domain]
                    if info[1] not in have:
                        combo = (*have, info[1])
                        table[domain] = combos.setdefault(combo, combo)
                table.update(dict.fromkeys(set(names) - dups if dups else names, info[2]))
                del names
            for rule in rules:
                if isinstance(rule, Rule):
                    domain, key = rule.domain, (rule.kind.value, rule.category, rule.source)
                else:
                    domain, key = rule[0], (rule[1], rule[2], rule[3] if len(rule) > 3 else None)
                keep, entry, single, allow = kinds.get(key) or new_kind(key)
                if not keep:
                    continue
                if "/" in domain:
                    if is_regex(domain):  # checked when it was stored; a bad one is skipped, never fatal here
                        try:
                            if len(domain) == 2:  # `//`: no pattern, which would match every name
                                raise ValueError("an empty pattern")
                            regexes.append((compile_regex(domain[1:-1]), entry, domain))
                        except ValueError as exc:  # stored before RE2 checked them (Python's re did), or by hand
                            log.warning("regex rule %s (category %s) left out of the policy: %s", domain, key[1], exc)
                            continue
                    elif not allow:  # a network: answers holding an address in it are blocked
                        try:
                            self.ip_rules.append((ipaddress.ip_network(domain, strict=False), key[1], key[2]))
                        except ValueError:  # written into the database by other means than sinkhole's
                            log.warning("rule %s (category %s) left out of the policy: neither a name, a /regex/ nor "
                                        "a network", domain, key[1])
                            continue
                    else:
                        continue
                    counts[allow] += 1
                    continue
                counts[allow] += 1
                have = table.get(domain)
                if have is None:
                    table[domain] = single
                elif entry not in have:
                    combo = (*have, entry)
                    table[domain] = combos.setdefault(combo, combo)
        finally:
            if collecting:
                gc.enable()
        seen = {key[1] for key, info in kinds.items() if info[0]}
        blocks, allows = counts
        self.categories = frozenset(seen)  # the categories with rules in force for some group
        self._map = table
        regexes, over = within_budget(regexes, lambda r: r[0].programsize)
        if over:  # stored by other means than block add / lists import, which refuse them
            log.warning("%d regex rules left out of the policy, over the regex budget (policy.regexcost): %s ...",
                        len(over), ", ".join(f"{text} ({entry[1]})" for _, entry, text in over[:3]))
        self._regexes = regexes
        self._regex_memo: OrderedDict[tuple[str, frozenset[str]], Rule | None] = OrderedDict()
        # every pattern in one RE2 program: one pass over a name tells that none matches (most names)
        self._regex_any = any_of([text[1:-1] for _, _, text in regexes]) if len(regexes) > 1 else None
        self.version = version
        self.blocks = blocks
        self.allows = allows
        base = {c for c in seen if c not in off and not c.startswith(GROUP_PREFIX)} | {EVERYWHERE}
        if default_spec is not None and default_spec.categories is not None:
            base = set(default_spec.categories) | {EVERYWHERE}
        self.default = Group(DEFAULT_GROUP, frozenset(base | {GROUP_PREFIX + DEFAULT_GROUP}))
        self.groups: dict[str, Group] = {DEFAULT_GROUP: self.default}
        networks: list[tuple[Network, Group]] = []
        for spec in specs.values():
            cats = base if spec.categories is None else set(spec.categories) | {EVERYWHERE}
            group = self.groups[spec.name] = Group(spec.name, frozenset(cats | {GROUP_PREFIX + spec.name}))
            networks.extend((ipaddress.ip_network(n, strict=False), group) for n in spec.networks)
        networks.sort(key=lambda item: item[0].prefixlen, reverse=True)  # most specific first
        self._networks = networks
        self._client_groups: dict[str, Group] = {}

    def _new_kind(self, key: tuple[str, str, str | None]) -> tuple[bool, Entry, tuple[Entry, ...], bool]:
        """The shared entry for (kind, category, source) the first time it is met: whether its category is
        in force for some group, the entry, its one-entry combo, and whether it allows."""
        entry = (RuleKind(key[0]), key[1], key[2])
        info = self._kinds[key] = (self._in_force(key[1]), entry, (entry,), entry[0] is RuleKind.ALLOW)
        self._combos[(entry,)] = info[2]
        return info

    def patched(self, touched: Iterable[str], rules: Iterable[tuple], version: int) -> Policy | None:
        """This policy with the rules of the `touched` names replaced by `rules` (every rule each of those
        names has now: (domain, kind, category, source)), as version `version`: a `block add` on a million-
        rule policy costs a copy of the name table, not a rebuild. None when the change needs a rebuild
        (a category this policy has no rules in: it may change what groups inherit; a regex or network)."""
        touched = set(touched)
        if any("/" in d for d in touched):
            return None
        now: dict[str, list[tuple]] = {}
        for rule in rules:
            now.setdefault(rule[0], []).append(rule)
        kinds, combos = self._kinds, self._combos
        table = self._map.copy()
        counts = [self.blocks, self.allows]
        for domain in touched:
            old = table.pop(domain, ())
            for entry in old:
                counts[entry[0] is RuleKind.ALLOW] -= 1
            entries: list[Entry] = []
            for _, kind, category, source in now.get(domain, ()):
                if (category not in self.categories and category != EVERYWHERE
                        and not category.startswith(GROUP_PREFIX) and self._in_force(category)):
                    return None  # a category new to this policy: what groups inherit may change
                key = (kind, category, source)
                info = kinds.get(key) or self._new_kind(key)
                if info[0] and info[1] not in entries:
                    entries.append(info[1])
                    counts[info[3]] += 1
            if entries:
                combo = tuple(entries)
                table[domain] = combos.setdefault(combo, combo)
        new = object.__new__(Policy)
        for name in Policy.__slots__:
            setattr(new, name, getattr(self, name))
        new._map, new.version, new.blocks, new.allows = table, version, counts[0], counts[1]
        new._client_groups = {}
        new._regex_memo = OrderedDict()
        return new

    # ------------------------------------------------------------------ groups

    def group_of(self, client: str) -> Group:
        """The group of a client address: its most specific network's, else `default`."""
        if not self._networks:
            return self.default
        memo = self._client_groups
        group = memo.get(client)
        if group is None:
            group = self.default
            address = client_address(client)
            if address is None:
                return group
            for network, candidate in self._networks:
                if address.version == network.version and address in network:
                    group = candidate
                    break
            if len(memo) >= _CLIENT_MEMO_MAX:
                memo.clear()
            memo[client] = group
        return group

    # ------------------------------------------------------------------ names

    def match_name(self, name: str, group: Group | None = None) -> Rule | None:
        """The rule in force for `group` (default: the default group) that decides `name`, if any."""
        allowed = (group or self.default).allowed
        get = self._map.get
        key = name
        while key:
            hit = get(key)
            if hit is not None:
                found = None
                for entry in hit:
                    if entry[1] in allowed:
                        if entry[0] is RuleKind.ALLOW:
                            return Rule(key, RuleKind.ALLOW, entry[1], entry[2])
                        if found is None:
                            found = entry
                if found is not None:
                    return Rule(key, found[0], found[1], found[2])
            cut = key.find(".")
            if cut < 0:
                break
            key = key[cut + 1:]
        if self._regexes:
            return self._match_regex(name, allowed)
        return None

    def _match_regex(self, name: str, allowed: frozenset[str]) -> Rule | None:
        """Memoized per (name, categories in force), most recent _REGEX_MEMO_MAX: a name asked again costs a dict
        lookup, however many patterns (the memo is this snapshot's: a new policy starts empty)."""
        memo, key = self._regex_memo, (name, allowed)
        try:
            found = memo[key]
            memo.move_to_end(key)
            return found
        except KeyError:  # not there (or dropped by another thread in between)
            pass
        found = self._search_regexes(name, allowed)
        memo[key] = found
        if len(memo) > _REGEX_MEMO_MAX:
            try:
                memo.popitem(last=False)
            except KeyError:
                pass
        return found

    def _search_regexes(self, name: str, allowed: frozenset[str]) -> Rule | None:
        if self._regex_any is not None and self._regex_any.search(name) is None:
            return None  # 2 us for 1,000 patterns, where trying each took 1.6 ms
        found = None
        for pattern, entry, text in self._regexes:
            if entry[1] in allowed and pattern.search(name):
                if entry[0] is RuleKind.ALLOW:
                    return Rule(text, RuleKind.ALLOW, entry[1], entry[2])
                if found is None:
                    found = Rule(text, RuleKind.BLOCK, entry[1], entry[2])
        return found

    def decide_labels(self, labels: tuple[str, ...], group: Group | None = None) -> Verdict:
        return self.decide_name(".".join(labels), group)

    def decide_name(self, name: str, group: Group | None = None, qtype: int = 0) -> Verdict:
        """The verdict for `name` asked by `group` (default: the default group). Asked for the DS RRset (`qtype`) of
        a rule's own apex, it is forwarded: that RRset belongs to the parent zone, and a validating resolver behind
        us needs it to prove an unsigned blocked zone insecure, and so to accept the sinkhole answers below it."""
        rule = self.match_name(name, group)
        if self.canaries and name in CANARIES and not (rule and rule.kind is RuleKind.ALLOW and rule.domain == name):
            return Verdict(Action.CANARY, Rule(name, RuleKind.BLOCK, CANARY_CATEGORY))
        if rule is None:
            return FORWARD
        if rule.kind is RuleKind.ALLOW or (qtype == DS and rule.domain == name):
            return Verdict(Action.FORWARDED, rule)
        return Verdict(Action.BLOCKED, rule)

    def decide(self, query: Query, group: Group | None = None) -> Verdict:
        """The verdict for a query (decide_name's for its name and qtype)."""
        return self.decide_name(query.name, group, query.qtype)

    def inspect(self, targets: list[tuple[str, str]], addresses: list[str | bytes] = (),  # type: ignore[assignment]
                group: Group | None = None) -> Verdict | None:
        """A forwarded answer that leads to a blocked name (a CNAME or DNAME chain, an HTTPS/SVCB target), or
        holds an address in a blocked network (A, AAAA, ipv4hint, ipv6hint; an IPv4-mapped IPv6 address, and one
        in the NAT64 well-known prefix 64:ff9b::/96, is checked against the IPv4 networks), is blocked too: the
        verdict names what matched, e.g. rule `cname:chat.deepseek.com` or `ip:203.0.113.7 in 203.0.113.0/24`."""
        for kind, name in targets:
            rule = self.match_name(name, group)
            if rule is not None and rule.kind is RuleKind.BLOCK:
                return Verdict(Action.CNAME_BLOCKED, Rule(f"{kind}:{name}", RuleKind.BLOCK, rule.category,
                                                          rule.source))
        if self.ip_rules and addresses:
            allowed = (group or self.default).allowed
            for given in addresses:  # text, or packed (4 or 16 bytes)
                address = ipaddress.ip_address(given)
                if isinstance(address, ipaddress.IPv6Address):
                    if address.ipv4_mapped is not None:
                        address = address.ipv4_mapped  # ::ffff:a.b.c.d reaches a.b.c.d: IPv4 network rules apply
                    elif address in _NAT64:  # 64:ff9b::a.b.c.d (RFC 6052): a NAT64 gateway reaches a.b.c.d
                        address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
                for network, category, source in self.ip_rules:
                    if category in allowed and address.version == network.version and address in network:
                        return Verdict(Action.IP_BLOCKED, Rule(f"ip:{address} in {network}", RuleKind.BLOCK,
                                                               category, source))
        return None

    def blocked_owners(self, owners: Iterable[str], qname: str, group: Group | None = None) -> set[str]:
        """Of the owner names of records in a forwarded answer for `qname` (an allowed name), those a block rule
        covers: their records are not relayed. Names at or above `qname` are not asked (the apex data of a zone
        an allowed name lies in, as `deepseek.com SOA` in a denial for an allowed `status.deepseek.com`)."""
        found = set()
        for owner in owners:
            if owner == "" or qname == owner or qname.endswith("." + owner):
                continue
            rule = self.match_name(owner, group)
            if rule is not None and rule.kind is RuleKind.BLOCK:
                found.add(owner)
        return found

    def covers(self, name: str) -> bool:
        """Some rule (of any group) names exactly `name`."""
        return name in self._map

    def __len__(self) -> int:
        return len(self._map)

    def __repr__(self) -> str:
        return f"<Policy v{self.version}: {self.blocks} block, {self.allows} allow, {len(self.groups)} groups>"
