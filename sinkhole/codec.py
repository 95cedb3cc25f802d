"""Wire format: decode the header and question of a query by hand, encode replies.

The fast path never builds a full message object: a query is validated and cut into
the parts the pipeline needs; replies are assembled from the client's own question
bytes. dnslib is used where a whole message must be read (`answer_targets`) and for names
of types and rcodes.
"""

from __future__ import annotations

import ipaddress
import re
import struct

import dnslib

from sinkhole.model import MAX_UDP, Edns, Query

# Header flag bits
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
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
_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")
_PLAIN_LABEL = re.compile(rb"[a-z0-9_-]+\Z")
_PLAIN_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\Z")


class Drop(Exception):
    """The packet deserves no answer at all (too short to carry an ID, or itself a response)."""


class BadQuery(Exception):
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


def asked_name(wire: bytes) -> str | None:
    """The question name of a query as the client wrote it (case kept, escaped like Query.name), for
    the audit log; None when it cannot be read (the query was rejected before it was decoded)."""
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
            _check_options(wire, pos, pos + rdlen, qid, flags, question)
            edns = Edns(udp_size=rclass, version=(ttl >> 16) & 0xFF, do=bool(ttl & 0x8000))
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


def _check_options(wire: bytes, pos: int, end: int, qid: int, flags: int, question: bytes) -> None:
    while pos < end:
        if pos + 4 > end:
            raise BadQuery(FORMERR, "EDNS option header runs past the record", qid, flags, question)
        (olen,) = struct.unpack_from("!H", wire, pos + 2)
        pos += 4 + olen
        if pos > end:
            raise BadQuery(FORMERR, "EDNS option data runs past the record", qid, flags, question)


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


def header_rcode(wire: bytes) -> int:
    return wire[3] & 0xF if len(wire) >= 4 else SERVFAIL


def is_truncated(wire: bytes) -> bool:
    return len(wire) >= 4 and bool(wire[2] & 0x02)


_TARGET_TYPES = {5: "cname", 39: "dname", 64: "svcb", 65: "https"}


_ADDRESS_TYPES = frozenset({T_A, T_AAAA, 64, 65})


def may_redirect(wire: bytes, qlen: int, addresses: bool = False) -> bool:
    """Whether the answer section holds a CNAME, DNAME, SVCB or HTTPS record (or, with `addresses`,
    an A or AAAA record): a cheap walk over the record headers, so that only those replies are
    parsed in full by `answer_facts`."""
    try:
        ancount = struct.unpack_from("!H", wire, 6)[0]
        pos = 12 + qlen
        for _ in range(ancount):
            while True:  # skip the owner name
                length = wire[pos]
                if length == 0:
                    pos += 1
                    break
                if length & 0xC0 == 0xC0:
                    pos += 2
                    break
                pos += 1 + length
            rtype, _, _, rdlen = _RR_FIXED.unpack_from(wire, pos)
            if rtype in _TARGET_TYPES or (addresses and rtype in _ADDRESS_TYPES):
                return True
            pos += 10 + rdlen
    except (IndexError, struct.error):
        return True  # odd: let the full parser decide
    return False


def answer_targets(wire: bytes) -> list[tuple[str, str]]:
    return answer_facts(wire)[0]


def answer_facts(wire: bytes) -> tuple[list[tuple[str, str]], list[str]]:
    """What an upstream answer sends the client on to: (kind, name) for every CNAME and DNAME
    target and every SVCB/HTTPS TargetName in the answer section, normalized; and every address
    in it (A, AAAA, SVCB/HTTPS ipv4hint and ipv6hint). A reply that does not parse yields
    nothing (it is relayed as it is)."""
    try:
        record = dnslib.DNSRecord.parse(wire)
    except Exception:  # dnslib raises several types for bad input
        return [], []
    out: list[tuple[str, str]] = []
    addresses: list[str] = []
    for rr in record.rr:
        if rr.rtype in (T_A, T_AAAA):
            addresses.append(str(rr.rdata))
            continue
        if rr.rtype in (64, 65):
            for key, value in getattr(rr.rdata, "params", []) or []:
                size = {4: 4, 6: 16}.get(key)
                if size:
                    raw = bytes(value)
                    addresses += [str(ipaddress.ip_address(raw[i:i + size]))
                                  for i in range(0, len(raw) - size + 1, size)]
        kind = _TARGET_TYPES.get(rr.rtype)
        if kind is None:
            continue
        target = getattr(rr.rdata, "target", None) if kind in ("svcb", "https") else rr.rdata.label
        if isinstance(target, list):  # dnslib gives an SVCB/HTTPS TargetName as its labels
            name = ".".join(bytes(label).decode("ascii", "backslashreplace") for label in target).lower()
        else:
            name = str(target).rstrip(".").lower() if target is not None else ""
        if name:
            out.append((kind, name))
    return out, addresses


# ---------------------------------------------------------------------------- names


class Malformed(Exception):
    """An upstream reply that cannot be read record by record: never relayed (the client gets SERVFAIL)."""


def read_name(wire: bytes, pos: int, seen: dict[int, str]) -> tuple[str, int]:
    """The name at `pos` (normalized like Query.name) and where the bytes after it start. Compression
    pointers must point before the labels that hold them, so that every name ends; `seen` keeps the names
    already read by where they start, for the pointers of later records."""
    labels: list[str] = []
    starts: list[int] = []
    after = -1
    limit = pos
    size = 1
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
                if known:
                    labels.append(known)
                    size += len(known) + 1  # close enough for the length check: escapes only lengthen it
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
        labels.append(raw.decode("ascii") if _PLAIN_LABEL.match(raw) else _escape_label(raw))
        pos = nxt
    if after < 0:
        after = pos + 1
    name = ".".join(labels)
    for i, start in enumerate(starts):  # each label starts a suffix a later pointer may name
        if start not in seen:
            seen[start] = name if i == 0 else ".".join(labels[i:])
    return name, after
