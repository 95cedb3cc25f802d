"""Values that flow through the pipeline: a decoded query, a policy verdict, what was done with the query (an
Outcome), and the audit event made of it."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class Action(enum.StrEnum):
    """What the server did with one query; this is the `action` column of the audit log."""

    BLOCKED = "blocked"
    IP_BLOCKED = "ip-blocked"  # forwarded, but its answer held an address in a blocked network
    CNAME_BLOCKED = "cname-blocked"  # forwarded, but its answer led to a blocked name (CNAME cloaking)
    CANARY = "canary"  # a bypass canary (DoH canary, iCloud Private Relay, DDR): answered as the OS expects
    FORWARDED = "forwarded"
    CACHED = "cached"
    STALE = "stale"  # no upstream answered: an expired cache entry, served as RFC 8767 allows (cache_serve_stale)
    REFUSED = "refused"
    LIMITED = "limited"  # over the rate limit: TC=1 over UDP so that the client comes back over TCP
    LOCAL = "local"  # answered here without the upstream (ANY, in rows written before ANY was asked upstream)
    SERVFAIL = "servfail"
    FORMERR = "formerr"
    NOTIMP = "notimp"
    NOTAUTH = "notauth"  # a TSIG-signed query: we hold no keys (RFC 8945 §5.2.2: NOTAUTH, BADKEY)
    GAP = "gap"  # written by the audit writer: rows that could not be stored, how many and when
    CHECKPOINT = "checkpoint"  # written by a prune: what the verifier needs to resume the chains it cut
    PAGE = "page"  # a browser showed the block page (sinkhole.web.blockpage): qtype is the HTTP method


class RuleKind(enum.StrEnum):
    BLOCK = "block"
    ALLOW = "allow"


MAX_UDP = 1232  # bytes: the largest UDP reply sinkhole sends, and the buffer size it advertises (DNS flag day 2020)


@dataclass(frozen=True, slots=True)
class Edns:
    udp_size: int
    version: int
    do: bool
    ecs: bytes | None = None  # the data of the client's Client Subnet option (RFC 7871), if it sent one


class Query(NamedTuple):
    """The parts of a client's query that the pipeline needs; `wire` is the packet as received.

    Immutable, and a tuple rather than a frozen dataclass (as Outcome): one is made for every query the fast path
    does not answer, 0.25 us against 1.13 (a frozen dataclass's __init__ sets each field through
    object.__setattr__)."""

    wire: bytes
    id: int
    flags: int
    name: str  # lower case, presentation-escaped (\DDD), labels joined by '.', no trailing dot; "" = root
    qtype: int
    qclass: int
    question: bytes  # the question section exactly as the client sent it
    edns: Edns | None

    @property
    def qname(self) -> str:
        return self.name or "."

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.name.split(".")) if self.name else ()

    @property
    def max_udp(self) -> int:
        """Largest UDP reply this client gets: its buffer size (RFC 6891: below 512 counts as 512), at most
        the 1232 bytes we advertise, so that a small query never draws a large reply (amplification)."""
        return min(max(512, self.edns.udp_size), MAX_UDP) if self.edns else 512


@dataclass(frozen=True, slots=True)
class Rule:
    """One block or allow rule as the policy holds it."""

    domain: str
    kind: RuleKind
    category: str
    source: str | None = None  # the list file or URL it came from, "cli", ... (None: not known)


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    rule: Rule | None = None

    @property
    def blocked(self) -> bool:
        """Answered here, never forwarded: a blocked name or a bypass canary."""
        return self.action is Action.BLOCKED or self.action is Action.CANARY


FORWARD = Verdict(Action.FORWARDED)


class Outcome(NamedTuple):
    """What the server did with one query, made once: the pipeline counts it (metrics) and audits it from this one
    value, and `sinkhole check` explains it. The blocked-packet memo keeps it and records it again for each repeat.
    Immutable, and a tuple rather than a frozen dataclass: one is made for most queries, in a third of the time."""

    action: Action
    qname: str  # "" when the question could not be read
    qtype: int
    rcode: int
    verdict: Verdict | None = None
    summary: str | None = None  # what the client got: an address, NODATA, NXDOMAIN, "TC=1", a reason
    version: int = 0  # the policy version in force (0 where none decided: refused, limited, bad queries)
    group: str | None = None  # the client group whose policy decided
    upstream: str | None = None
    latency_ms: float | None = None


@dataclass(slots=True)
class AuditEvent:
    """One row for the audit log, made on the hot path and formatted by the writer thread.

    Not frozen, unlike the other values here: one is made for every audited query on the event loop, and a frozen
    dataclass's __init__ sets its 16 fields through object.__setattr__ (1.6 us against 0.2 us; issue 13's
    regression notes). Nothing changes an event once it is made; copies are made with dataclasses.replace."""

    time: float
    client: str
    transport: str
    qname: str
    qtype: int | str  # a str for rows that are not DNS queries (the block page's HTTP method)
    action: str
    rule: str | None
    category: str | None
    rcode: int | str  # a str likewise (the block page's HTTP status)
    answer: str | None
    policy_version: int
    upstream: str | None = None
    latency_ms: float | None = None
    group: str | None = None
    wire: bytes | None = None  # the query packet: the writer takes the name as asked from it
    source: str | None = None  # the list the deciding rule came from

    @classmethod
    def of(cls, o: Outcome, time: float, client: str, transport: str, wire: bytes | None) -> AuditEvent:
        """The audit row of one outcome, as `client` asked over `transport` at `time`."""
        rule = o.verdict.rule if o.verdict is not None else None
        if rule is None:
            return cls(time, client, transport, o.qname, o.qtype, o.action._value_, None, None, o.rcode, o.summary,
                       o.version, o.upstream, o.latency_ms, o.group, wire, None)
        return cls(time, client, transport, o.qname, o.qtype, o.action._value_, rule.domain, rule.category, o.rcode,
                   o.summary, o.version, o.upstream, o.latency_ms, o.group, wire, rule.source)
