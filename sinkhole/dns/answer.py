"""Answers sinkhole makes itself, each with the Outcome the pipeline records for it: blocked names and canaries
(and their memos, BlockedAnswers), bad queries, clients not admitted, zone transfers, TC=1 for a UDP client whose
buffer the reply does not fit. Pure functions of their inputs, but for the memos."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from sinkhole.dns import codec
from sinkhole.dns.guard import Admission
from sinkhole.model import Action, Outcome, Query, Rule, Verdict
from sinkhole.policy.decide import CANARIES, Group
from sinkhole.policy.names import is_subdomain

EDE_BLOCKED = 15  # RFC 8914
EDE_NO_REACHABLE_AUTHORITY = 22
SOA_MNAME = codec.encode_name("sinkhole.invalid")
SOA_RNAME = codec.encode_name("hostmaster.sinkhole.invalid")
_HEADER = struct.Struct("!HHHHHH")


@dataclass(frozen=True, slots=True)
class AnswerConfig:
    """How blocked names are answered."""

    mode: str = "sinkhole"  # "sinkhole": A/AAAA get the sinkhole address, others NODATA; "nxdomain"
    a: ipaddress.IPv4Address | None = ipaddress.IPv4Address("0.0.0.0")  # noqa: RUF009 (immutable)
    aaaa: ipaddress.IPv6Address | None = ipaddress.IPv6Address("::")  # noqa: RUF009 (immutable)
    ttl: int = 60

    MODES = ("sinkhole", "nxdomain")


@dataclass(frozen=True, slots=True)
class Built:
    wire: bytes
    rcode: int
    summary: str  # what the client got, for the audit log: an address, NODATA or NXDOMAIN


def _soa(owner: str | bytes, ttl: int, serial: int) -> bytes:
    """Our SOA record; `owner` a name, or its wire form (a pointer to the question)."""
    rdata = SOA_MNAME + SOA_RNAME + struct.pack("!IIIII", serial & 0xFFFFFFFF, 3600, 600, 86400, ttl)
    owned = owner if isinstance(owner, bytes) else codec.encode_name(owner)
    return owned + struct.pack("!HHIH", codec.T_SOA, 1, ttl, len(rdata)) + rdata


def blocked(query: Query, rule: Rule, cfg: AnswerConfig, serial: int = 1) -> Built:
    """The reply for a blocked name: no real data of it ever reaches the client."""
    address = None
    if cfg.mode == "sinkhole" and query.qclass == 1:
        if query.qtype == codec.T_A and cfg.a is not None:
            address = cfg.a
        elif query.qtype == codec.T_AAAA and cfg.aaaa is not None:
            address = cfg.aaaa
    rcode = codec.NXDOMAIN if cfg.mode == "nxdomain" else codec.NOERROR
    if address is not None:
        rdata = address.packed
        section = b"\xc0\x0c" + struct.pack("!HHIH", query.qtype, 1, cfg.ttl, len(rdata)) + rdata
        counts = (1, 0)
        summary = str(address)
    elif rcode == codec.NOERROR and query.qtype == codec.T_SOA and query.qclass == 1 and query.name == rule.domain:
        section = _soa(b"\xc0\x0c", cfg.ttl, serial)  # the SOA of the rule's apex is what was asked: an answer
        counts = (1, 0)
        summary = "SOA"
    else:
        # the SOA of the rule's zone; for a rule that matched in the answer (cname:..., ip:...), the name asked
        owner = rule.domain if is_subdomain(query.name, rule.domain) else query.name
        section = _soa(owner, cfg.ttl, serial)
        counts = (0, 1)
        summary = "NXDOMAIN" if rcode == codec.NXDOMAIN else "NODATA"
    opt = b""
    if query.edns is not None:
        text = f"blocked by sinkhole rule {rule.domain} ({rule.category})"
        opt = codec.opt_record(query.edns, rcode, (EDE_BLOCKED, text))
    head = _HEADER.pack(query.id, codec.reply_flags(query.flags, rcode), 1, counts[0], counts[1],
                        1 if opt else 0)
    return Built(head + query.question + section + opt, rcode, summary)


def minimal_any(query: Query, ttl: int = 3600) -> bytes:
    """RFC 8482: ANY is answered with one synthesized HINFO record instead of everything."""
    rdata = b"\x07RFC8482\x00"
    section = b"\xc0\x0c" + struct.pack("!HHIH", 13, query.qclass, ttl, len(rdata)) + rdata
    opt = codec.opt_record(query.edns) if query.edns is not None else b""
    head = _HEADER.pack(query.id, codec.reply_flags(query.flags, codec.NOERROR), 1, 1, 0, 1 if opt else 0)
    return head + query.question + section + opt


def truncated(query: Query, reply: bytes | None = None) -> bytes:
    """An empty reply with TC=1: the client must ask again over TCP. Cut from `reply` (one too big for the
    client's UDP buffer), it keeps that reply's flags and rcode (AA, AD ...), as a resolver's own TC reply does."""
    out = bytearray(codec.error_reply(query.id, query.flags, codec.header_rcode(reply) if reply else codec.NOERROR,
                                      query.question, query.edns))
    if reply is not None:
        out[2:4] = reply[2:4]
    out[2] |= 0x02
    return bytes(out)


def refused(query: Query) -> bytes:
    return codec.error_reply(query.id, query.flags, codec.REFUSED, query.question, query.edns)


def servfail(query: Query, reason: str) -> bytes:
    ede = (EDE_NO_REACHABLE_AUTHORITY, reason) if query.edns is not None else None
    return codec.error_reply(query.id, query.flags, codec.SERVFAIL, query.question, query.edns, ede)


def fit(query: Query, reply: bytes, proto: str) -> bytes:
    """`reply` as the client can take it: over UDP, one larger than its buffer is cut to TC=1 (it asks over TCP)."""
    if proto == "udp" and len(reply) > query.max_udp:
        return truncated(query, reply)
    return reply


# ---------------------------------------------------------------------------- each with its Outcome

_BAD_QUERY_ACTIONS = {codec.NOTIMP: Action.NOTIMP, codec.NOTAUTH: Action.NOTAUTH}


def bad_query(bad: codec.BadQuery, admitted: Admission, group: str) -> tuple[Outcome, bytes]:
    """A query answered with an error rcode (FORMERR, NOTIMP, NOTAUTH, BADVERS); REFUSED for a client the guard
    did not admit."""
    if admitted is not Admission.OK:
        return (Outcome(Action.REFUSED, "", 0, codec.REFUSED, None, bad.reason, 0, group),
                codec.error_reply(bad.qid, bad.flags, codec.REFUSED, bad.question))
    return Outcome(_BAD_QUERY_ACTIONS.get(bad.rcode, Action.FORMERR), "", 0, bad.rcode, None, bad.reason, 0, group), \
        bad.reply()


def not_admitted(query: Query, admitted: Admission, group: str) -> tuple[Outcome, bytes]:
    """Over the rate limit over UDP: TC=1, the client asks again over TCP; otherwise REFUSED."""
    if admitted is Admission.LIMITED:
        return Outcome(Action.LIMITED, query.qname, query.qtype, codec.NOERROR, None, "TC=1", 0, group), \
            truncated(query)
    return (Outcome(Action.REFUSED, query.qname, query.qtype, codec.REFUSED, None,
                    "client not allowed or over the limit", 0, group), refused(query))


TRANSFERS = frozenset({codec.T_AXFR, codec.T_IXFR})


def transfer_refused(query: Query, verdict: Verdict, version: int, group: str) -> tuple[Outcome, bytes]:
    """AXFR and IXFR: sinkhole is no authority to transfer zones from (its own zone is the RPZ port's)."""
    return (Outcome(Action.REFUSED, query.qname, query.qtype, codec.REFUSED, verdict, "zone transfer", version, group),
            refused(query))


_SHAPE_FLAGS = codec.OPCODE_MASK | codec.RD | codec.CD


class BlockedAnswers:
    """The answers to blocked names and bypass canaries, and the memos that make a repeat cheap (both valid for
    one policy snapshot and one AnswerConfig: `clear` and `configure` forget them):

    - per client group, the reply to each packet but its ID, with its Outcome (`replay`): a question asked again
      costs a dict lookup, and is recorded again from the same Outcome;
    - the reply's shape per (rule, qtype, qclass, flags, DO, the rule's own SOA): names under one rule differ only
      in their question, so an answer is built once per shape.
    Each holds at most codec.MEMO_MAX entries; a bigger packet (a padded or hostile one) is not memoized."""

    def __init__(self, answers: AnswerConfig) -> None:
        self._memos: dict[str, dict[bytes, tuple[Outcome, bytes]]] = {}  # group -> packet but ID -> (outcome, tail)
        self._shapes: dict[tuple, tuple[bytes, bytes, int, str]] = {}
        self.configure(answers)

    def configure(self, answers: AnswerConfig) -> None:
        """How blocked names are answered from now on (a reload); what was memoized is forgotten."""
        self.config = answers
        self._canaries = {"nxdomain": AnswerConfig(mode="nxdomain", ttl=answers.ttl),
                          "nodata": AnswerConfig(mode="sinkhole", a=None, aaaa=None, ttl=answers.ttl)}
        self.clear()

    def clear(self) -> None:
        self._memos.clear()
        self._shapes.clear()

    def replay(self, wire: bytes, group: Group) -> tuple[Outcome, bytes] | None:
        """(outcome, the reply but its first two bytes) when this packet but its ID was answered here before."""
        memo = self._memos.get(group.name)
        return memo.get(wire[2:]) if memo is not None else None  # the ID: a packet's first two bytes

    def answer(self, query: Query, verdict: Verdict, group: Group, version: int) -> tuple[Outcome, bytes]:
        """The reply to a blocked name or a canary (memoized for `replay`)."""
        rule = verdict.rule
        assert rule is not None
        edns = query.edns
        shape = (verdict.action, rule.domain, rule.category, query.qtype, query.qclass, query.flags & _SHAPE_FLAGS,
                 -1 if edns is None else edns.do, query.qtype == codec.T_SOA and query.name == rule.domain)
        tpl = self._shapes.get(shape)
        if tpl is None:
            how = self.config if verdict.action is Action.BLOCKED else self._canaries[CANARIES[rule.domain]]
            built = blocked(query, rule, how, version or 1)
            tpl = (built.wire[2:12], built.wire[12 + len(query.question):], built.rcode, built.summary)
            if len(self._shapes) >= codec.MEMO_MAX:
                self._shapes.clear()
            self._shapes[shape] = tpl
        head, tail, rcode, summary = tpl
        wire = query.wire
        reply = wire[:2] + head + query.question + tail
        outcome = Outcome(verdict.action, query.name, query.qtype, rcode, verdict, summary, version, group.name)
        if len(wire) <= codec.MEMO_MAX_PACKET:
            memo = self._memos.get(group.name)
            if memo is None:
                memo = self._memos[group.name] = {}
            elif len(memo) >= codec.MEMO_MAX:
                memo.clear()
            memo[wire[2:]] = (outcome, reply[2:])
        return outcome, reply
