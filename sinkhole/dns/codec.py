"""Wire format, the one place that parses or frames DNS messages: decode the header and question of a query
by hand, encode replies, read upstream replies record by record, frame messages on streams (RFC 7766).

The fast path never builds a full message object: a query is validated and cut into
the parts the pipeline needs; replies are assembled from the client's own question
bytes. dnslib is used for names of types and rcodes; dnspython only to rebuild the rare
reply that loses records (`relayed`).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

import dnslib

from sinkhole.errors import DecodeError
from sinkhole.model import MAX_UDP, Edns, Query

# Header flag bits
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
AD_FLAG = 0x0020  # "authentic data" (RFC 4035, RFC 6840 §5.7)
CD = 0x0010
OPCODE_MASK = 0x7800

# RCODEs
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, NOTAUTH = 0, 1, 2, 3, 4, 5, 9
BADVERS = 16
BADKEY = 17  # a TSIG error (RFC 8945)
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED", 9: "NOTAUTH",
               16: "BADVERS"}

# Types
T_A, T_NS, T_SOA, T_AAAA, T_OPT = 1, 2, 6, 28, 41
T_TKEY, T_TSIG, T_IXFR, T_AXFR, T_ANY = 249, 250, 251, 252, 255
META_QTYPES = frozenset({0, T_OPT, T_TKEY, T_TSIG})

OUR_UDP_SIZE = MAX_UDP  # DNS flag day 2020 recommendation: what we advertise, and the most we send over UDP
EDNS_ECS = 8  # the Client Subnet option (RFC 7871)
_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")
_TTL = struct.Struct("!I")
_PLAIN_LABEL = re.compile(rb"[a-z0-9_-]+\Z")
_PLAIN_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\Z")


class Drop(DecodeError):
    """The packet deserves no answer at all (too short to carry an ID, or itself a response)."""


class BadQuery(DecodeError):
    """The packet is a query we answer with an error rcode; carries what is needed to echo."""

    def __init__(self, rcode: int, reason: str, qid: int, flags: int, question: bytes = b"",
                 edns: Edns | None = None, tail: bytes = b"") -> None:
        super().__init__(reason)
        self.rcode = rcode
        self.reason = reason
        self.qid = qid
        self.flags = flags
        self.question = question
        self.edns = edns
        self.tail = tail  # a record the reply ends with: the unsigned TSIG of a NOTAUTH (RFC 8945 §5.2.2)

    def reply(self) -> bytes:
        return error_reply(self.qid, self.flags, self.rcode, self.question, self.edns, tail=self.tail)


def qtype_name(qtype: int) -> str:
    return dnslib.QTYPE.get(qtype, f"TYPE{qtype}")


def rcode_name(rcode: int) -> str:
    return RCODE_NAMES.get(rcode) or dnslib.RCODE.get(rcode, f"RCODE{rcode}")


def _escape_label(raw: bytes) -> str:
    """Presentation form of one lower-cased label: plain when LDH, else \\DDD escapes."""
    if _PLAIN_LABEL.match(raw):
        return raw.decode("ascii")
    out = []
    for b in raw:
        if b in b"abcdefghijklmnopqrstuvwxyz0123456789-_":
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def asked_name(wire: bytes, normalized: str | None = None) -> str | None:
    """The question name of a query as the client wrote it (case kept, escaped like Query.name), for
    the audit log; None when it cannot be read (the query was rejected before it was decoded). `normalized`:
    the name as decoded (Query.name), returned as it is when the packet holds no capital letter and the name
    no escape (the usual case: no label is read again)."""
    if normalized is not None and "\\" not in normalized:
        tail = wire[12:]
        if tail.lower() == tail:
            return normalized
    pos, end, labels = 12, min(len(wire), 12 + 256), []
    while pos < end:
        length = wire[pos]
        if length == 0:
            return ".".join(labels) or "."
        if length & 0xC0 or pos + 1 + length > end:
            return None
        raw = wire[pos + 1: pos + 1 + length]
        if _PLAIN_LABEL.match(raw.lower()):
            labels.append(raw.decode("ascii"))
        else:
            labels.append("".join(chr(b) if chr(b).isascii() and (chr(b).isalnum() or b in b"-_") else f"\\{b:03d}"
                                  for b in raw))
        pos += 1 + length
    return None


def is_dropped(wire: bytes) -> bool:
    """The packet gets no answer at all (decode_query raises Drop for it): shorter than a header, or a response."""
    return len(wire) < 12 or wire[2] & 0x80 != 0


def decode_query(wire: bytes) -> Query:
    """Validate a client's query and return its parts.

    Raises Drop for packets that get no answer, BadQuery for those answered with an
    error rcode (FORMERR, NOTIMP, BADVERS).
    """
    if len(wire) < 12:
        raise Drop("shorter than a DNS header")
    qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    if flags & QR:
        raise Drop("QR set: a response, not a query")
    if flags & OPCODE_MASK:
        raise BadQuery(NOTIMP, f"opcode {(flags & OPCODE_MASK) >> 11} not implemented", qid, flags,
                       _first_question(wire) if qdcount == 1 else b"")
    if qdcount != 1:
        raise BadQuery(FORMERR, f"QDCOUNT is {qdcount}, not 1", qid, flags)
    # Question name: plain labels only (nothing earlier in the message to point to).
    pos = 12
    end = len(wire)
    starts: list[int] = []
    while True:
        if pos >= end:
            raise BadQuery(FORMERR, "question name runs past the end", qid, flags)
        length = wire[pos]
        if length == 0:
            pos += 1
            break
        if length & 0xC0:
            raise BadQuery(FORMERR, "compressed or extended label in the question", qid, flags)
        nxt = pos + 1 + length
        if nxt > end:
            raise BadQuery(FORMERR, "question label runs past the end", qid, flags)
        if wire.find(b".", pos + 1, nxt) >= 0 or wire.find(b"\x00", pos + 1, nxt) >= 0:
            raise BadQuery(FORMERR, "label holds a literal dot or NUL", qid, flags)
        starts.append(pos)
        pos = nxt
    if pos - 12 > 255:
        raise BadQuery(FORMERR, "question name longer than 255 octets", qid, flags)
    if starts:
        # the length bytes between labels become dots: one copy, one decode, one check
        text = bytearray(wire[13:pos - 1])
        for start in starts[1:]:
            text[start - 13] = 0x2E
        name = text.decode("latin-1").lower()
        if not _PLAIN_NAME.match(name):
            name = ".".join(_escape_label(wire[s + 1: s + 1 + wire[s]].lower()) for s in starts)
    else:
        name = ""
    if pos + 4 > end:
        raise BadQuery(FORMERR, "question has no type and class", qid, flags)
    qtype, qclass = struct.unpack_from("!HH", wire, pos)
    pos += 4
    question = wire[12:pos]
    if flags & TC:
        raise BadQuery(FORMERR, "TC set in a query", qid, flags, question)
    if ancount or nscount:
        raise BadQuery(FORMERR, "answer or authority records in a query", qid, flags, question)
    if qtype in META_QTYPES:
        raise BadQuery(FORMERR, f"meta type {qtype} asked as a question", qid, flags, question)
    edns = None
    for i in range(arcount):
        name_start = pos
        pos = _skip_name(wire, pos, qid, flags, question)
        if pos + 10 > end:
            raise BadQuery(FORMERR, "additional record runs past the end", qid, flags, question)
        rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(wire, pos)
        pos += 10
        if pos + rdlen > end:
            raise BadQuery(FORMERR, "additional record data runs past the end", qid, flags, question)
        if rtype == T_OPT:
            if edns is not None:
                raise BadQuery(FORMERR, "two OPT records", qid, flags, question)
            if wire[name_start] != 0:
                raise BadQuery(FORMERR, "OPT record not owned by the root", qid, flags, question)
            ecs = _check_options(wire, pos, pos + rdlen, qid, flags, question)
            edns = Edns(udp_size=rclass, version=(ttl >> 16) & 0xFF, do=bool(ttl & 0x8000), ecs=ecs)
        elif rtype == T_TSIG:
            if i != arcount - 1:
                raise BadQuery(FORMERR, "a TSIG record that is not the last one", qid, flags, question, edns)
            # RFC 8945 §5.2.2: we hold no key, so the key is unknown: NOTAUTH, TSIG error BADKEY, unsigned
            raise BadQuery(NOTAUTH, "TSIG-signed query: sinkhole holds no TSIG keys", qid, flags, question, edns,
                           _unsigned_tsig(wire, name_start, pos, pos + rdlen, qid, flags, question, edns))
        pos += rdlen
    if edns is not None and edns.version != 0:
        raise BadQuery(BADVERS, f"EDNS version {edns.version}", qid, flags, question,
                       Edns(edns.udp_size, 0, edns.do))
    return Query(wire=wire, id=qid, flags=flags, name=name, qtype=qtype, qclass=qclass,
                 question=question, edns=edns)


def _first_question(wire: bytes) -> bytes:
    """The question section of a message we answer with an error before reading it, to echo it; b"" when it
    cannot be read (compressed, cut short)."""
    pos, end = 12, len(wire)
    while pos < end and wire[pos] and not wire[pos] & 0xC0:
        pos += 1 + wire[pos]
    if pos >= end or wire[pos] or pos + 5 > end or pos - 12 > 255:
        return b""
    return wire[12:pos + 5]


_MEMO: dict[bytes, Query] = {}
# each of the three memos (decoded queries, blocked packets, blocked answer shapes) holds at most this many: a
# working set of repeated questions fits, and a flood of distinct names (a million-rule list walked through)
# costs ~10 MB each rather than ~40 (measured: RSS per worker 205 MiB with 50,000 after 150,000 distinct names)
MEMO_MAX = 10_000
MEMO_MAX_PACKET = 512  # bytes: bigger packets (padded or hostile ones) are not memoized


def decode_query_memo(wire: bytes) -> Query:
    """decode_query, remembering the parts of queries seen before: two packets that differ only
    in their ID decode alike, so a repeated question costs a dict lookup instead of a parse."""
    seen = _MEMO.get(wire[2:])
    if seen is not None:
        return Query(wire, (wire[0] << 8) | wire[1], seen.flags, seen.name, seen.qtype, seen.qclass,
                     seen.question, seen.edns)
    query = decode_query(wire)
    if len(wire) <= MEMO_MAX_PACKET:  # a big packet (a padded or hostile one) is not worth keeping
        if len(_MEMO) >= MEMO_MAX:
            _MEMO.clear()
        _MEMO[wire[2:]] = query
    return query


def _skip_name(wire: bytes, pos: int, qid: int, flags: int, question: bytes) -> int:
    end = len(wire)
    while True:
        if pos >= end:
            raise BadQuery(FORMERR, "record name runs past the end", qid, flags, question)
        length = wire[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            if pos + 2 > end:
                raise BadQuery(FORMERR, "compression pointer runs past the end", qid, flags, question)
            if ((length & 0x3F) << 8 | wire[pos + 1]) >= pos:
                raise BadQuery(FORMERR, "compression pointer does not point backwards", qid, flags, question)
            return pos + 2
        if length & 0xC0:
            raise BadQuery(FORMERR, "extended label type", qid, flags, question)
        pos += 1 + length


def _check_options(wire: bytes, pos: int, end: int, qid: int, flags: int, question: bytes) -> bytes | None:
    """Check the options' framing; return the Client Subnet option's data, if any (checked as RFC 7871
    §6 says: FORMERR when it is malformed). Every other option (COOKIE, NSID, padding ...) is ignored:
    EDNS is hop by hop, and none of them goes upstream or comes back."""
    ecs = None
    while pos < end:
        if pos + 4 > end:
            raise BadQuery(FORMERR, "EDNS option header runs past the record", qid, flags, question)
        code, olen = struct.unpack_from("!HH", wire, pos)
        pos += 4 + olen
        if pos > end:
            raise BadQuery(FORMERR, "EDNS option data runs past the record", qid, flags, question)
        if code == EDNS_ECS:
            ecs = wire[pos - olen:pos]
            if not _good_ecs(ecs):
                raise BadQuery(FORMERR, "malformed Client Subnet option", qid, flags, question)
    return ecs


def _good_ecs(data: bytes) -> bool:
    """RFC 7871 §6: family 1 or 2, a source prefix within the family's bits, scope 0 in a query, and exactly
    the address octets the source prefix needs, with no bit set beyond it."""
    if len(data) < 4:
        return False
    family, source, scope = struct.unpack_from("!HBB", data)
    bits = {1: 32, 2: 128}.get(family)
    address = data[4:]
    if bits is None or source > bits or scope != 0 or len(address) != (source + 7) // 8:
        return False
    return not (source % 8 and address[-1] & (0xFF >> (source % 8)))


def ecs_address(data: bytes) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """The address and source prefix length of a (checked) Client Subnet option."""
    family, source = struct.unpack_from("!HB", data)
    size = 4 if family == 1 else 16
    return ipaddress.ip_address(data[4:].ljust(size, b"\0")), source


def ecs_option(address: ipaddress.IPv4Address | ipaddress.IPv6Address, prefix: int, scope: int = 0) -> bytes:
    """Client Subnet option data for `address` cut to `prefix` bits (only the octets the prefix needs)."""
    prefix = min(prefix, address.max_prefixlen)
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    return struct.pack("!HBB", 1 if address.version == 4 else 2, prefix, scope) + \
        network.network_address.packed[:(prefix + 7) // 8]


def _unsigned_tsig(wire: bytes, owner: int, rdata: int, end: int, qid: int, flags: int, question: bytes,
                   edns: Edns | None) -> bytes:
    """The TSIG record of an error reply to a signed query whose key we do not know: the same key name,
    algorithm, time and fudge, no MAC, the query's original ID and error BADKEY (RFC 8945 §5.2.2)."""
    try:
        key, _ = read_name(wire, owner, {})
        algorithm, pos = read_name(wire, rdata, {})
    except Malformed as exc:
        raise BadQuery(FORMERR, f"unreadable TSIG record: {exc}", qid, flags, question, edns) from None
    if pos + 10 > end:
        raise BadQuery(FORMERR, "TSIG record too short", qid, flags, question, edns)
    signed_fudge = wire[pos:pos + 8]
    (mac_size,) = struct.unpack_from("!H", wire, pos + 8)
    pos += 10 + mac_size
    if pos + 6 > end:
        raise BadQuery(FORMERR, "TSIG record too short", qid, flags, question, edns)
    original_id = wire[pos:pos + 2]
    data = encode_name(algorithm) + signed_fudge + b"\0\0" + original_id + struct.pack("!HH", BADKEY, 0)
    return encode_name(key) + _RR_FIXED.pack(T_TSIG, 255, 0, len(data)) + data


# ---------------------------------------------------------------------------- encoding


def reply_flags(query_flags: int, rcode: int, aa: bool = False) -> int:
    """QR set; opcode, RD and CD copied from the query; rcode's low four bits; RA for opcode QUERY only
    (recursion is what we offer for queries, not for NOTIFY, UPDATE or whatever else is asked)."""
    flags = QR | (query_flags & (OPCODE_MASK | RD | CD)) | (rcode & 0xF)
    if not query_flags & OPCODE_MASK:
        flags |= RA
    return flags | AA if aa else flags


def encode_name(name: str) -> bytes:
    """Wire form of a name in the presentation form decode_query gives (\\DDD escapes allowed)."""
    if name in ("", "."):
        return b"\x00"
    out = b""
    for label in name.split("."):
        raw = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1))), label).encode("latin-1")
        out += bytes([len(raw)]) + raw
    return out + b"\x00"


def opt_record(edns: Edns, rcode: int = 0, ede: tuple[int, str] | None = None) -> bytes:
    """An OPT RR for a reply: our UDP size, the extended rcode bits, DO copied, optional EDE."""
    options = b""
    if ede is not None:
        info, text = ede
        payload = struct.pack("!H", info) + text.encode("utf-8")
        options = struct.pack("!HH", 15, len(payload)) + payload
    ttl = ((rcode >> 4) & 0xFF) << 24 | (0x8000 if edns.do else 0)
    return b"\x00" + _RR_FIXED.pack(T_OPT, OUR_UDP_SIZE, ttl, len(options)) + options


def error_reply(qid: int, query_flags: int, rcode: int, question: bytes = b"",
                edns: Edns | None = None, ede: tuple[int, str] | None = None, tail: bytes = b"") -> bytes:
    """A reply with no records but the echoed question (when known), OPT (when asked) and `tail` (one
    more additional record: a TSIG)."""
    arcount = (1 if edns is not None else 0) + (1 if tail else 0)
    head = _HEADER.pack(qid, reply_flags(query_flags, rcode), 1 if question else 0, 0, 0, arcount)
    opt = opt_record(edns, rcode, ede) if edns is not None else b""
    return head + question + opt + tail


def set_id(wire: bytes, qid: int) -> bytes:
    return struct.pack("!H", qid) + wire[2:]


def message_id(wire: bytes) -> int:
    return (wire[0] << 8) | wire[1]


def bare_error(wire: bytes, rcode: int) -> bytes:
    """A reply with `rcode` and nothing else (no question, no RA) to a message that could not be read (or not
    trusted) as a whole; b"" for a response or a packet shorter than a header: never answered."""
    if len(wire) < 12:
        return b""
    qid, flags = struct.unpack("!HH", wire[:4])
    if flags & QR:
        return b""
    return _HEADER.pack(qid, QR | (flags & OPCODE_MASK) | (flags & RD) | rcode, 0, 0, 0, 0)


def matches(reply: bytes, qid: int, question: bytes) -> bool:
    """`reply` answers our query `qid` for `question` (RFC 5452: the ID, QR, one question, the same name (in any
    case), type and class); anything else is not the reply, whatever its source."""
    if len(reply) < 12 + len(question):
        return False
    rid, flags, qdcount = struct.unpack_from("!HHH", reply)
    if rid != qid or not flags & QR or qdcount != 1:
        return False
    name_end = 12 + len(question) - 4
    return (reply[12:name_end].lower() == question[:-4].lower()
            and reply[name_end:name_end + 4] == question[-4:])


# ---------------------------------------------------------------------------- framing on streams

FRAME = struct.Struct("!H")  # RFC 7766 (TCP, and TLS, RFC 7858): each message follows its length in two bytes


def frame(message: bytes) -> bytes:
    """A message as it goes on a TCP or TLS stream."""
    return FRAME.pack(len(message)) + message


def frame_length(head: bytes) -> int:
    """The length a stream's two-byte prefix announces (0: the client has nothing more to ask)."""
    return FRAME.unpack(head)[0]


def header_rcode(wire: bytes) -> int:
    return wire[3] & 0xF if len(wire) >= 4 else SERVFAIL


def is_truncated(wire: bytes) -> bool:
    return len(wire) >= 4 and bool(wire[2] & 0x02)




# ---------------------------------------------------------------------------- upstream replies
#
# What the forward path needs from an upstream reply, read record by record without building a message
# object: every record's section, owner and type (any type, known to a library or not: its data is only
# copied), the names the answer sends the client on to, and the addresses it holds. Replies are never
# parsed on a cache hit.

ANSWER, AUTHORITY, ADDITIONAL = 0, 1, 2
T_CNAME, T_DNAME, T_SVCB, T_HTTPS = 5, 39, 64, 65
T_DS, T_RRSIG, T_NSEC, T_NSEC3 = 43, 46, 47, 50
_TARGET_KINDS = {T_CNAME: "cname", T_DNAME: "dname", T_SVCB: "svcb", T_HTTPS: "https"}
_DENIAL_TYPES = frozenset({T_NSEC, T_NSEC3})
_HINT_SIZES = {4: 4, 6: 16}  # SvcParamKey ipv4hint, ipv6hint: the size of one address


class Malformed(DecodeError):
    """An upstream reply that cannot be read record by record: never relayed (the client gets SERVFAIL)."""


@dataclass(slots=True)
class Record:
    section: int  # ANSWER, AUTHORITY or ADDITIONAL
    owner: str  # normalized as Query.name is (lower case, \DDD escapes, no trailing dot; "" = root)
    rtype: int
    start: int  # where the record starts in the message
    rdata: int  # where its data starts
    end: int  # where it ends
    covered: int = 0  # RRSIG: the type it covers

    @property
    def denial(self) -> bool:
        """An NSEC or NSEC3 record, or the signature of one: a proof that names do not exist, not data."""
        return self.rtype in _DENIAL_TYPES or (self.rtype == T_RRSIG and self.covered in _DENIAL_TYPES)


@dataclass(slots=True)
class ReplyFacts:
    records: list[Record]
    end: int  # where the last record ends (bytes after it are not relayed)
    opt: Record | None  # the upstream's OPT record (hop by hop: replaced by ours)
    ext_rcode: int  # the upper eight bits of the rcode, from the upstream's OPT
    targets: list[tuple[str, str]]  # (kind, name): CNAME and DNAME targets, SVCB/HTTPS TargetNames, answer section
    addresses: list[bytes]  # A and AAAA in the answer section, SVCB/HTTPS ipv4hint and ipv6hint there, packed


def read_name(wire: bytes, pos: int, seen: dict[int, tuple[str, int]]) -> tuple[str, int]:
    """The name at `pos` (normalized like Query.name) and where the bytes after it start. Compression
    pointers must point before the labels that hold them, so that every name ends; `seen` keeps the names
    already read (and their length on the wire) by where they start, for the pointers of later records."""
    labels: list[str] = []
    starts: list[int] = []
    sizes: list[int] = []
    after = -1
    limit = pos
    size = tail = 1  # octets on the wire: the root label's, so far
    end = len(wire)
    while True:
        if pos >= end:
            raise Malformed("a name runs past the end")
        length = wire[pos]
        if length == 0:
            break
        if length & 0xC0 == 0xC0:
            if pos + 1 >= end:
                raise Malformed("a compression pointer runs past the end")
            target = (length & 0x3F) << 8 | wire[pos + 1]
            if after < 0:
                after = pos + 2
            if target >= limit:
                raise Malformed("a compression pointer that does not point backwards")
            known = seen.get(target)
            if known is not None:
                labels.append(known[0])
                tail = known[1]
                size += tail - 1
                if size > 255:
                    raise Malformed("a name longer than 255 octets")
                break
            pos = limit = target
            continue
        if length & 0xC0:
            raise Malformed("an extended label type")
        nxt = pos + 1 + length
        if nxt > end:
            raise Malformed("a label runs past the end")
        size += 1 + length
        if size > 255:
            raise Malformed("a name longer than 255 octets")
        raw = wire[pos + 1:nxt].lower()
        starts.append(pos)
        sizes.append(1 + length)
        labels.append(raw.decode("ascii") if _PLAIN_LABEL.match(raw) else _escape_label(raw))
        pos = nxt
    if after < 0:
        after = pos + 1
    name = ".".join(labels)
    for i, start in enumerate(starts):  # each label starts a suffix a later pointer may name
        if start not in seen:
            seen[start] = (name if i == 0 else ".".join(labels[i:]), sum(sizes[i:]) + tail)
    return name, after


def read_reply(wire: bytes, qlen: int, qname: str = "") -> ReplyFacts:
    """Every record of an upstream reply whose header and question were checked (codec.matches), and the
    facts the policy inspects (see ReplyFacts). Raises Malformed for anything a client could not read.

    `qname`: the question's name as Query.name has it (what matches compared the reply's question with), so that
    the records pointing to it (most owners: a compression pointer to offset 12) do not read it again."""
    _, _, _, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    pos = 12 + qlen
    end = len(wire)
    # the root ("") is not seeded: a name ending in a pointer to it would get a trailing dot
    seen: dict[int, tuple[str, int]] = {12: (qname, qlen - 4)} if qname else {}
    records: list[Record] = []
    targets: list[tuple[str, str]] = []
    addresses: list[bytes] = []
    opt = None
    ext_rcode = 0
    total = ancount + nscount + arcount
    for i in range(total):
        start = pos
        owner, pos = read_name(wire, pos, seen)
        if pos + 10 > end:
            raise Malformed("a record runs past the end")
        rtype, _, ttl, rdlen = _RR_FIXED.unpack_from(wire, pos)
        rdata = pos + 10
        pos = rdata + rdlen
        if pos > end:
            raise Malformed("record data runs past the end")
        section = ANSWER if i < ancount else AUTHORITY if i < ancount + nscount else ADDITIONAL
        record = Record(section, owner, rtype, start, rdata, pos)
        records.append(record)
        if rtype == T_OPT:
            if section != ADDITIONAL or opt is not None or owner:
                raise Malformed("an OPT record out of place")
            opt, ext_rcode = record, ttl >> 24
        elif rtype == T_TSIG:
            raise Malformed("a TSIG record in a reply to an unsigned query")
        elif rtype == T_RRSIG:
            if rdlen < 18:
                raise Malformed("an RRSIG record too short")
            record.covered = wire[rdata] << 8 | wire[rdata + 1]
        elif section == ANSWER:
            if rtype == T_A or rtype == T_AAAA:
                if rdlen != (4 if rtype == T_A else 16):
                    raise Malformed("an address record of the wrong length")
                addresses.append(wire[rdata:pos])
            elif rtype == T_CNAME or rtype == T_DNAME:
                target, after = read_name(wire, rdata, seen)
                if after != pos:
                    raise Malformed(f"{_TARGET_KINDS[rtype].upper()} data is not one name")
                targets.append((_TARGET_KINDS[rtype], target))
            elif rtype == T_SVCB or rtype == T_HTTPS:
                _read_svcb(wire, rdata, pos, seen, _TARGET_KINDS[rtype], targets, addresses)
    return ReplyFacts(records, pos, opt, ext_rcode, targets, addresses)


def _read_svcb(wire: bytes, rdata: int, end: int, seen: dict[int, tuple[str, int]], kind: str,
               targets: list[tuple[str, str]], addresses: list[bytes]) -> None:
    """RFC 9460: priority, TargetName ("." is the owner itself), then key/length/value parameters."""
    if end - rdata < 3:
        raise Malformed("SVCB data too short")
    target, pos = read_name(wire, rdata + 2, seen)
    if pos > end:
        raise Malformed("SVCB TargetName runs past its data")
    if target:
        targets.append((kind, target))
    while pos < end:
        if pos + 4 > end:
            raise Malformed("an SVCB parameter runs past its data")
        key, size = struct.unpack_from("!HH", wire, pos)
        pos += 4
        if pos + size > end:
            raise Malformed("an SVCB parameter value runs past its data")
        width = _HINT_SIZES.get(key)
        if width:
            if size % width:
                raise Malformed("an SVCB address hint of the wrong length")
            addresses += [wire[i:i + width] for i in range(pos, pos + size, width)]
        pos += size


def relayed(wire: bytes, facts: ReplyFacts, edns: Edns | None, drop: set[tuple] | None = None) -> bytes:
    """The upstream's reply as sinkhole relays it: its records byte for byte, but EDNS hop by hop (RFC 6891
    §6.1.1): the upstream's OPT (its options, NSID, cookies, its buffer size) replaced by our own (when the
    client sent one), with the upstream's extended rcode. `drop`: (section, owner) whose records go, or
    (section, owner, rtype, covered) for one RRset (never the NSEC/NSEC3 proofs); the message is then rebuilt
    by dnspython, as when OPT is not last."""
    opt = facts.opt
    if drop or (opt is not None and opt is not facts.records[-1]):
        return _rebuilt(wire, facts, edns, drop or set())
    arcount = wire[10] << 8 | wire[11]
    body = bytearray(wire[:opt.start] if opt is not None else wire[:facts.end])
    if opt is not None:
        arcount -= 1
    if edns is not None:
        body += opt_record(edns, facts.ext_rcode << 4 | (wire[3] & 0xF))
        arcount += 1
    body[10:12] = arcount.to_bytes(2, "big")
    return bytes(body)


def _rebuilt(wire: bytes, facts: ReplyFacts, edns: Edns | None, drop: set[tuple]) -> bytes:
    import dns.message
    import dns.rdatatype

    try:
        message = dns.message.from_wire(wire, ignore_trailing=True, one_rr_per_rrset=True)
    except Exception as exc:  # dnspython raises many kinds for what it cannot read
        raise Malformed(f"dnspython cannot read it: {exc}") from None
    denial = (dns.rdatatype.NSEC, dns.rdatatype.NSEC3)
    for section, rrsets in enumerate((message.answer, message.authority, message.additional)):
        rrsets[:] = [r for r in rrsets if r.rdtype in denial or r.covers in denial
                     or ((section, _normal(r.name)) not in drop
                         and (section, _normal(r.name), r.rdtype, r.covers) not in drop)]
    message.use_edns(False)
    out = bytearray(message.to_wire())
    if edns is not None:
        out += opt_record(edns, facts.ext_rcode << 4 | (wire[3] & 0xF))
        out[10:12] = ((out[10] << 8 | out[11]) + 1).to_bytes(2, "big")
    out[0:4] = wire[0:4]  # the header's flags exactly as the upstream set them
    return bytes(out)


def _normal(name: object) -> str:
    """A dnspython name, normalized like Query.name."""
    labels = [label.lower() for label in name.labels if label]  # type: ignore[attr-defined]
    return ".".join(raw.decode("ascii") if _PLAIN_LABEL.match(raw) else _escape_label(raw) for raw in labels)


def _skip_stored_name(wire: bytes, pos: int) -> int:
    """Past the name at `pos` of a reply that read_reply checked already (a pointer ends a name)."""
    while True:
        length = wire[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2
        pos += 1 + length


def scan_records(wire: bytes, qlen: int) -> tuple[list[int], list[int], int | None, bool, int]:
    """For the cache: TTL offsets and values of every record but OPT; the negative TTL (the SOA's, capped by its
    MINIMUM) if any; whether there are answers; where the OPT record starts if it is the last one (-1: no OPT;
    -2: an OPT before other records). Malformed for a reply whose records run past its end."""
    try:
        return _scan_records(wire, qlen)
    except (IndexError, struct.error):
        raise Malformed("records run past the end") from None


def _scan_records(wire: bytes, qlen: int) -> tuple[list[int], list[int], int | None, bool, int]:
    _, _, _, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    pos = 12 + qlen
    offsets, ttls = [], []
    negative_ttl = None
    opt_at = -1
    total = ancount + nscount + arcount
    for i in range(total):
        start = pos
        pos = _skip_stored_name(wire, pos)
        rtype, _, ttl, rdlen = _RR_FIXED.unpack_from(wire, pos)
        if rtype == T_OPT:
            opt_at = start if i == total - 1 else -2
        else:
            offsets.append(pos + 4)
            ttls.append(ttl)
            if rtype == T_SOA and ancount <= i < ancount + nscount and rdlen >= 22:
                rdata = pos + 10
                minimum = _TTL.unpack_from(wire, rdata + rdlen - 4)[0]
                negative_ttl = min(ttl, minimum)
        pos += 10 + rdlen
    if pos > len(wire):
        raise Malformed("records run past the end")
    return offsets, ttls, negative_ttl, ancount > 0, opt_at


def set_ttls(reply: bytearray, offsets: tuple[int, ...], ttls: tuple[int, ...] | None, less: int = 0) -> None:
    """Each TTL at `offsets` (from scan_records) to its stored value less `less` seconds (never below 0), or, with
    `ttls` None, to `less` itself."""
    pack = _TTL.pack_into
    if ttls is None:
        for off in offsets:
            pack(reply, off, less)
        return
    for off, ttl in zip(offsets, ttls, strict=True):
        pack(reply, off, max(0, ttl - less))


def with_own_opt(reply: bytearray, opt_at: int, edns: Edns, ede: tuple[int, str] | None = None) -> bytes:
    """`reply` ending in our OPT record (with `ede`) instead of the one at `opt_at` (scan_records'; -1: it has
    none, and one more additional record is counted)."""
    rcode = reply[3] & 0xF
    if opt_at >= 0:
        del reply[opt_at:]
    else:
        struct.pack_into("!H", reply, 10, struct.unpack_from("!H", reply, 10)[0] + 1)
    reply += opt_record(edns, rcode, ede)
    return bytes(reply)


def upstream_query(query: Query, ecs: bytes = b"") -> bytes:
    """The query sinkhole sends upstream for a client's (ID 0: the forwarder puts in its own): the client's
    question (case as asked), RD and CD as the client set them, AD set (RFC 6840 §5.7: we understand it;
    whether the client sees it is decided per client), and with EDNS only when the client used it: our own
    OPT (our buffer size, DO as the client asked) holding no option of the client's; `ecs`: a Client Subnet
    option of our own making, or nothing."""
    flags = (query.flags & (RD | CD)) | AD_FLAG
    edns = query.edns
    if edns is None:
        return _HEADER.pack(0, flags, 1, 0, 0, 0) + query.question
    options = struct.pack("!HH", EDNS_ECS, len(ecs)) + ecs if ecs else b""
    opt = b"\x00" + _RR_FIXED.pack(T_OPT, OUR_UDP_SIZE, 0x8000 if edns.do else 0, len(options)) + options
    return _HEADER.pack(0, flags, 1, 0, 0, 1) + query.question + opt


def for_client(wire: bytes, qlen: int, query: Query) -> bytearray:
    """A reply shared by several clients (a cache entry, a coalesced forward) made this client's: its ID, its
    question bytes (case as it asked), RD and CD as it set them, and AD only if the upstream set it and the
    client asked with AD or DO (RFC 6840 §5.7)."""
    out = bytearray(wire)
    qid, flags = query.id, query.flags
    out[0], out[1] = qid >> 8, qid & 0xFF
    out[12:12 + qlen] = query.question
    out[2] = (out[2] & 0xFE) | ((flags >> 8) & 0x01)
    wants_ad = flags & AD_FLAG or (query.edns is not None and query.edns.do)
    out[3] = (out[3] & 0xCF) | (flags & CD) | (out[3] & AD_FLAG if wants_ad else 0)
    return out


def with_ecs(reply: bytes, asked: bytes, sent: bytes) -> bytes:
    """Our reply (ending in our own OPT, with no option yet) with a Client Subnet option for a client that sent
    one (RFC 7871 §7.2.2): its family, source prefix and address, and as scope the prefix we forwarded
    (answers are cached per prefix)."""
    if len(reply) < 23 or reply[-11:-8] != b"\x00\x00\x29" or reply[-2:] != b"\x00\x00":
        return reply
    option = asked[:3] + sent[2:3] + asked[4:]
    data = struct.pack("!HH", EDNS_ECS, len(option)) + option
    return reply[:-2] + struct.pack("!H", len(data)) + data


def servfail_for(wire: bytes) -> bytes | None:
    """SERVFAIL for a query that something unexpected went wrong with, echoing what can be read of it (None for
    a packet that gets no answer at all: a response, or shorter than a header)."""
    try:
        query = decode_query(wire)
    except Drop:
        return None
    except BadQuery as bad:
        return error_reply(bad.qid, bad.flags, SERVFAIL, bad.question, bad.edns)
    except Exception:  # the decoder itself failed: the header is all we trust
        if len(wire) < 12 or wire[2] & 0x80:
            return None
        return error_reply((wire[0] << 8) | wire[1], (wire[2] << 8) | wire[3], SERVFAIL)
    return error_reply(query.id, query.flags, SERVFAIL, query.question, query.edns)
