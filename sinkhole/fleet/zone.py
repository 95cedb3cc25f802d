"""The policy as a Response Policy Zone (draft-vixie-dnsop-dns-rpz): the zone, its export, and the settings it
takes (TSIG, the zone's name).

`build()` turns the rules in force for one client group into RPZ records: a blocked `name` gets the configured
action on `name` and `*.name` (a sinkhole rule covers every subdomain; an RPZ name alone covers only itself), an
allowed one `CNAME rpz-passthru.` on both, a blocked network an `rpz-ip` trigger. `/regex/` rules have no RPZ
form: they are left out and named. fleet.primary serves the zone, fleet.secondary pulls one, fleet.endpoint is
the listener of both, fleet.node puts them together for a server. Like dns/upstream.py, this package speaks
dnspython.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.serial
import dns.tsig
import dns.versioned
import dns.xfr

from sinkhole.dns.answer import AnswerConfig
from sinkhole.errors import ConfigError
from sinkhole.policy.names import client_address, is_regex

log = logging.getLogger(__name__)

DEFAULT_ZONE = "rpz.sinkhole."
SOA_MNAME = "sinkhole.invalid."
SOA_RNAME = "hostmaster.sinkhole.invalid."
NS_TARGET = "localhost."  # the customary NS of a policy zone: nobody resolves through it
PROGRESS_RECORDS = 10_000  # rules or records between two progress reports of an export
Advance = Callable[[int], None] | None  # called with the number of items done since its last call
SOA_EXPIRE = 28 * 86400  # a secondary (Unbound, BIND) drops an expired zone: keep using it for weeks
MESSAGE_BUDGET = 16_000  # bytes of records per transfer message (uncompressed), well under 64 KiB
CATEGORY_PREFIX = "rpz:"
Record = tuple[dns.name.Name, dns.rdata.Rdata]


def _rdata(rdtype: str, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)


PASSTHRU = _rdata("CNAME", "rpz-passthru.")
NXDOMAIN = _rdata("CNAME", ".")
NODATA = _rdata("CNAME", "*.")


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Tsig:
    name: dns.name.Name
    algorithm: dns.name.Name
    secret: bytes

    @property
    def keyring(self) -> dict[dns.name.Name, dns.tsig.Key]:
        return {self.name: dns.tsig.Key(self.name, self.secret, self.algorithm)}

    @property
    def key(self) -> dns.tsig.Key:
        return dns.tsig.Key(self.name, self.secret, self.algorithm)


TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1", "hmac-md5")


def parse_tsig(text: str) -> Tsig | None:
    """`name:algorithm:base64secret` (e.g. `xfr-key:hmac-sha256:c2VjcmV0...`), or None for ''."""
    if not text.strip():
        return None
    parts = text.strip().split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise ConfigError("rpz_tsig: expected NAME:ALGORITHM:BASE64SECRET, e.g. xfr-key:hmac-sha256:c2VjcmV0")
    name, algorithm, secret = parts
    if algorithm.lower().rstrip(".") not in TSIG_ALGORITHMS:
        raise ConfigError(f"rpz_tsig: algorithm {algorithm!r} is not one of {', '.join(TSIG_ALGORITHMS)}")
    try:
        raw = base64.b64decode(secret, validate=True)
        key_name = dns.name.from_text(name)
    except (binascii.Error, ValueError):
        raise ConfigError("rpz_tsig: the secret is not base64") from None
    except dns.exception.DNSException as exc:
        raise ConfigError(f"rpz_tsig: key name {name!r}: {exc}") from None
    if not raw:
        raise ConfigError("rpz_tsig: the secret is empty")
    return Tsig(key_name, dns.name.from_text(algorithm.lower()), raw)


def zone_name(text: str) -> dns.name.Name:
    try:
        name = dns.name.from_text(text.strip() or DEFAULT_ZONE)
    except dns.exception.DNSException as exc:
        raise ConfigError(f"rpz_zone: {text!r}: {exc}") from None
    if name == dns.name.root:
        raise ConfigError("rpz_zone: the policy zone needs a name of its own, not the root")
    return name


# ---------------------------------------------------------------------------- the zone


@dataclass
class Zone:
    """One version of the policy zone: its serial and its records below the apex."""

    origin: dns.name.Name
    serial: int
    records: frozenset[Record]
    ttl: int = 60
    refresh: int = 60
    group: str = "default"
    version: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # comment lines: rules RPZ cannot express

    def soa(self, serial: int | None = None) -> dns.rdata.Rdata:
        s = self.serial if serial is None else serial
        return _rdata("SOA", f"{SOA_MNAME} {SOA_RNAME} {s} {self.refresh} {max(1, self.refresh // 4)} "
                             f"{SOA_EXPIRE} {self.ttl}")

    def apex(self) -> list[Record]:
        return [(self.origin, self.soa()), (self.origin, _rdata("NS", NS_TARGET))]

    def sorted_records(self, progress: Advance = None) -> list[Record]:
        """The records in canonical-ish order. `progress` is called with the number of records whose sort key
        is made since its last call (most of the time a sort takes; len(records) in all)."""
        keyed = []
        for i, record in enumerate(self.records):
            keyed.append((_order(record), i, record))  # i: equal keys never compare the records themselves
            if progress is not None and (i + 1) % PROGRESS_RECORDS == 0:
                progress(PROGRESS_RECORDS)
        if progress is not None:
            progress(len(keyed) % PROGRESS_RECORDS)
        keyed.sort()
        return [record for _, _, record in keyed]

    def lines(self, progress: Advance = None, ordered: list[Record] | None = None) -> Iterator[str]:
        """The zone file's lines (without line ends); `ordered`: sorted_records(), if already made. `progress` is
        called with the number of records written since its last call (len(records) in all)."""
        yield from (f"$ORIGIN {self.origin.to_text()}", f"$TTL {self.ttl}", f"@ SOA {self.soa().to_text()}",
                    f"@ NS {NS_TARGET}",
                    f"; sinkhole policy version {self.version} for group {self.group}: {self.counts.get('block', 0)}"
                    f" block, {self.counts.get('allow', 0)} allow and {self.counts.get('network', 0)} network rules")
        yield from (f"; left out: {s}" for s in self.skipped)
        for i, (name, rdata) in enumerate(self.sorted_records() if ordered is None else ordered, start=1):
            yield f"{name.relativize(self.origin).to_text()} {dns.rdatatype.to_text(rdata.rdtype)} {rdata.to_text()}"
            if progress is not None and i % PROGRESS_RECORDS == 0:
                progress(PROGRESS_RECORDS)
        if progress is not None:
            progress(len(self.records) % PROGRESS_RECORDS)

    def to_text(self) -> str:
        """A zone file that BIND, Unbound, Knot and `sinkhole lists import` read."""
        return "\n".join(self.lines()) + "\n"


def _order(record: Record) -> tuple:
    """Canonical-ish order: by reversed labels, a name just before its wildcard, then by type."""
    name, rdata = record
    labels = name.labels[:-1]
    wild = labels[:1] == (b"*",)
    return tuple(reversed(labels[1:] if wild else labels)), wild, rdata.rdtype


def block_actions(answers: AnswerConfig) -> list[dns.rdata.Rdata]:
    """The RPZ action for a blocked name: local data with the sinkhole addresses, or CNAME . / CNAME *."""
    if answers.mode == "nxdomain":
        return [NXDOMAIN]
    local = []
    if answers.a is not None:
        local.append(_rdata("A", str(answers.a)))
    if answers.aaaa is not None:
        local.append(_rdata("AAAA", str(answers.aaaa)))
    return local or [NODATA]


def rpz_ip_labels(network: str) -> str:
    """192.0.2.0/24 -> `24.0.2.0.192`; 2001:db8::/48 -> `48.zz.db8.2001` (RPZ's reversed form)."""
    net = ipaddress.ip_network(network, strict=False)
    if net.version == 4:
        words = str(net.network_address).split(".")
    else:
        text = net.network_address.compressed
        if "::" in text:
            left, right = text.split("::")
            words = (left.split(":") if left else []) + ["zz"] + (right.split(":") if right else [])
        else:
            words = text.split(":")
    return ".".join([str(net.prefixlen), *reversed(words)])


def build(rules: Iterable[tuple[str, str, str]], answers: AnswerConfig, origin: dns.name.Name, serial: int,
          group: str = "default", refresh: int = 60, version: int = 0, progress: Advance = None) -> Zone:
    """The zone for `rules` (domain, kind, category) as they are in force for one group. `progress` is called
    with the number of rules turned into records since its last call (one per rule in all)."""
    kinds: dict[str, str] = {}
    networks: set[str] = set()
    skipped: list[str] = []
    count = 0
    for domain, kind, category in rules:
        count += 1
        if "/" in domain:
            if is_regex(domain):
                skipped.append(f"{domain} ({kind}, category {category}): a regular expression has no RPZ form")
            elif kind == "block":
                networks.add(str(ipaddress.ip_network(domain, strict=False)))
            continue
        if kinds.get(domain) != "allow":  # at equal specificity an allow rule wins
            kinds[domain] = kind
    action = block_actions(answers)
    records: set[Record] = set()
    for i, (domain, kind) in enumerate(kinds.items(), start=1):
        if progress is not None and i % PROGRESS_RECORDS == 0:
            progress(PROGRESS_RECORDS)
        name = dns.name.from_text(domain, origin)
        wild = dns.name.from_text("*." + domain, origin)
        for rdata in ([PASSTHRU] if kind == "allow" else action):
            records.add((name, rdata))
            records.add((wild, rdata))
    for network in networks:
        name = dns.name.from_text(rpz_ip_labels(network) + ".rpz-ip", origin)
        for rdata in action:
            records.add((name, rdata))
    if progress is not None:  # the rest: the last names, networks, duplicates and regular expressions
        progress(count - len(kinds) // PROGRESS_RECORDS * PROGRESS_RECORDS)
    counts = {"block": sum(k == "block" for k in kinds.values()), "allow": sum(k == "allow" for k in kinds.values()),
              "network": len(networks)}
    return Zone(origin, serial, frozenset(records), answers.ttl, refresh, group, version, counts, sorted(skipped))


def allowed(peer: str, networks: list) -> bool:
    """`peer` (an address as a socket gives it: a v4-mapped one counts as IPv4) is in one of `networks`."""
    address = client_address(peer)
    if address is None:
        return False
    return any(address.version == n.version and address in n for n in networks)


def same_host(a: str, b: str) -> bool:
    x, y = client_address(a), client_address(b)
    return x is not None and x == y


@dataclass
class Diff:
    old: int
    new: int
    deleted: frozenset[Record]
    added: frozenset[Record]


def _reply(query: dns.message.Message, rcode: int) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response.to_wire(max_size=65535)


def _records(query: dns.message.Message, records: list[Record], ttl: int, multi: bool = False) -> list[bytes]:
    """Records as answer messages, each under MESSAGE_BUDGET bytes; signed in sequence with TSIG
    (RFC 8945, 5.3.1) when the request was signed."""
    out: list[bytes] = []
    ctx: Any = None
    response: dns.message.Message | None = None
    size = 0

    def flush() -> None:
        nonlocal ctx, response
        assert response is not None
        if query.had_tsig and multi:
            out.append(response.to_wire(max_size=65535, multi=True, tsig_ctx=ctx))
            ctx = response.tsig_ctx
        else:
            out.append(response.to_wire(max_size=65535))
        response = None

    for name, rdata in records:
        cost = len(name.to_wire() or b"") + 10 + len(rdata.to_wire() or b"")
        if response is not None and size + cost > MESSAGE_BUDGET:
            flush()
        if response is None:
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            size = 0
        response.answer.append(dns.rrset.from_rdata(name, ttl, rdata))
        size += cost
    if response is not None:
        flush()
    return out


