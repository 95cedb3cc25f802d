"""Answers sinkhole makes itself: blocked names and local errors. Pure functions of their inputs."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from sinkhole.dns import codec
from sinkhole.model import Query, Rule
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
