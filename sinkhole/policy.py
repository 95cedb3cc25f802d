"""The decision for one name. Pure: a Policy is an immutable snapshot, swapped whole on reload."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from sinkhole.domains import SuffixTable
from sinkhole.model import FORWARD, Action, Query, Rule, RuleKind, Verdict

# Names that browsers and operating systems ask to learn whether they may bypass this resolver.
# Exact names, answered here whatever the rules say (unless an allow rule names them exactly).
CANARIES: dict[str, str] = {
    "use-application-dns.net": "nxdomain",  # Firefox keeps DNS-over-HTTPS off (its canary domain)
    "mask.icloud.com": "nxdomain",  # iCloud Private Relay stays off (Apple's documented way)
    "mask-h2.icloud.com": "nxdomain",
    "_dns.resolver.arpa": "nodata",  # RFC 9462: no discovery of this resolver's encrypted twins
}
CANARY_CATEGORY = "bypass"


class Policy:
    """Block and allow rules, each covering a name and all its subdomains.

    The most specific rule wins; at equal specificity an allow rule beats a block rule.
    The table maps each domain to one shared (kind, category) pair, so a million rules
    cost a dict entry and a string each, not an object each.
    """

    __slots__ = ("_table", "allows", "blocks", "canaries", "ip_rules", "version")

    def __init__(self, rules: Iterable[Rule | tuple[str, str, str]] = (), version: int = 0,
                 canaries: bool = True) -> None:
        self.canaries = canaries
        table: dict[str, tuple[RuleKind, str]] = {}
        groups: dict[tuple[str, str], tuple[RuleKind, str]] = {}
        blocks = allows = 0
        self.ip_rules: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = []
        for rule in rules:
            if isinstance(rule, Rule):
                domain, kind, category = rule.domain, rule.kind.value, rule.category
            else:
                domain, kind, category = rule
            group = groups.get((kind, category))
            if group is None:
                group = groups[(kind, category)] = (RuleKind(kind), category)
            if "/" in domain:  # a network: answers holding an address in it are blocked
                if group[0] is RuleKind.BLOCK:
                    self.ip_rules.append((ipaddress.ip_network(domain, strict=False), category))
                    blocks += 1
                continue
            if group[0] is RuleKind.ALLOW:
                allows += 1
                table[domain] = group
            else:
                blocks += 1
                # a block never displaces an allow of the same name; first category wins
                table.setdefault(domain, group)
        self._table = SuffixTable(table)
        self.version = version
        self.blocks = blocks
        self.allows = allows

    def match_name(self, name: str) -> Rule | None:
        hit = self._table.lookup_name(name)
        if hit is None:
            return None
        domain, (kind, category) = hit  # type: ignore[misc]
        return Rule(domain, kind, category)

    def decide_labels(self, labels: tuple[str, ...]) -> Verdict:
        return self.decide_name(".".join(labels))

    def decide_name(self, name: str) -> Verdict:
        rule = self.match_name(name)
        if self.canaries and name in CANARIES and not (rule and rule.kind is RuleKind.ALLOW and rule.domain == name):
            return Verdict(Action.CANARY, Rule(name, RuleKind.BLOCK, CANARY_CATEGORY))
        if rule is None:
            return FORWARD
        if rule.kind is RuleKind.ALLOW:
            return Verdict(Action.FORWARDED, rule)
        return Verdict(Action.BLOCKED, rule)

    def decide(self, query: Query) -> Verdict:
        return self.decide_name(query.name)

    def inspect(self, targets: list[tuple[str, str]], addresses: list[str] = ()) -> Verdict | None:  # type: ignore[assignment]
        """A forwarded answer that leads to a blocked name (a CNAME chain, an HTTPS/SVCB target), or
        holds an address in a blocked network (A, AAAA, ipv4hint, ipv6hint), is blocked too: the
        verdict names what matched, e.g. rule `cname:chat.deepseek.com` or `ip:203.0.113.7 in 203.0.113.0/24`."""
        for kind, name in targets:
            rule = self.match_name(name)
            if rule is not None and rule.kind is RuleKind.BLOCK:
                return Verdict(Action.CNAME_BLOCKED, Rule(f"{kind}:{name}", RuleKind.BLOCK, rule.category))
        for text in addresses if self.ip_rules else ():
            address = ipaddress.ip_address(text)
            for network, category in self.ip_rules:
                if address.version == network.version and address in network:
                    return Verdict(Action.IP_BLOCKED, Rule(f"ip:{address} in {network}", RuleKind.BLOCK, category))
        return None

    def __repr__(self) -> str:
        return f"<Policy v{self.version}: {self.blocks} block, {self.allows} allow>"
