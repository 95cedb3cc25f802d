"""The per-packet fast path in plain Python: the twin of the compiled `sinkhole.dns._fast`, same names, same
behaviour (tests/dns/test_fast.py runs every test against both). `sinkhole.dns.fast` picks one at import.

What it holds, per worker:

- `Table`: whole replies by the query packet without its ID (bytes 2 on): the blocked answers of one policy
  snapshot, and fresh cache hits (their TTLs aged once a second, not per query). A hit costs one dict lookup;
  the reply is the client's ID followed by the stored tail.
- `Clients`: what is known about each client address (its table, exempt from the rate limit or not, its
  token buckets), asked once of a `classify` callback, then kept.
- `Tally`: the audit rows of the answers given here, as (tag, client, transport, count, first, last):
  identical answers to one client within a window are one row with a count (window 0: one row per query).
- `UdpFast`: owns a UDP socket: reads what is waiting, answers what the table knows, hands the rest back.

Nothing here decides policy: entries are put by the pipeline, which made the answer the slow way first.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from itertools import islice

COMPILED = False
MAX_ENTRIES = 100_000  # per table; a full one drops its oldest eighth
MAX_PACKET = 512  # bytes: bigger queries (padded or hostile) are never put
MAX_CLIENTS = 65_536
INF = float("inf")


class Entry:
    __slots__ = ("base", "cached", "elapsed", "expires", "kind", "offsets", "refresh_at", "stored", "tag", "tail",
                 "ttls")

    def __init__(self, tail: bytes, kind: object, tag: object) -> None:
        self.tail = tail  # the reply without its first two bytes (the ID), as sent now
        self.kind = kind  # what UdpFast.counts counts this answer as (the pipeline's metrics key); None: not counted
        self.tag = tag  # what the audit row of this answer says (None: not audited)
        self.cached = False
        self.base = tail
        self.offsets: tuple[int, ...] = ()
        self.ttls: tuple[int, ...] = ()
        self.stored = 0.0
        self.expires = INF
        self.refresh_at = INF
        self.elapsed = 0


def _aged(base: bytes, offsets: tuple[int, ...], ttls: tuple[int, ...], elapsed: int) -> bytes:
    out = bytearray(base)
    for off, ttl in zip(offsets, ttls, strict=True):
        out[off:off + 4] = max(0, ttl - elapsed).to_bytes(4, "big")
    return bytes(out)


class Table:
    """Replies by query packet without its ID."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: dict[bytes, Entry] = {}
        self.hits = 0
        self.blocker: Blocker | None = None  # answers the blocked names this table has not seen yet

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def _put(self, packet: bytes, entry: Entry) -> bool:
        if len(packet) > MAX_PACKET or len(packet) < 12 or self.max_entries <= 0:
            return False
        if len(self._entries) >= self.max_entries:
            self._evict()
        self._entries[packet[2:]] = entry
        return True

    def _evict(self) -> None:
        """The oldest eighth goes (dicts keep insertion order): a flood of new names costs a table's worth of
        memory, and the names asked again and again stay (a full clear sent all of them the slow way)."""
        entries = self._entries
        for key in list(islice(entries, len(entries) // 8 + 1)):
            del entries[key]

    def put_blocked(self, packet: bytes, reply: bytes, kind: object = None, tag: object = None) -> bool:
        """`reply` answers `packet` (and the same packet with any other ID) for as long as the table lives."""
        return self._put(packet, Entry(reply[2:], kind, tag))

    def put_cached(self, packet: bytes, reply: bytes, offsets: tuple[int, ...], ttls: tuple[int, ...],
                   stored: float, expires: float, refresh_at: float = INF, kind: object = None,
                   tag: object = None) -> bool:
        """`reply` (its TTLs as stored at `stored`, at `offsets` in the reply) answers `packet` until `expires`
        or `refresh_at` (a prefetch is due: the slow path takes that query), every TTL less the whole seconds
        since `stored`."""
        entry = Entry(reply[2:], kind, tag)
        entry.cached = True
        entry.offsets = tuple(o - 2 for o in offsets)
        entry.ttls = tuple(ttls)
        entry.stored, entry.expires, entry.refresh_at = stored, expires, refresh_at
        return self._put(packet, entry)

    def lookup(self, key: bytes, now: float) -> Entry | None:
        """The entry for a packet without its ID (`packet[2:]`), its tail current at `now`; None if none or
        no longer good (expired, or due for a refresh: removed, the slow path takes over)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.cached:
            if now >= entry.expires or now >= entry.refresh_at or now < entry.stored:
                del self._entries[key]
                return None
            elapsed = int(now - entry.stored)
            if elapsed != entry.elapsed:
                entry.tail = _aged(entry.base, entry.offsets, entry.ttls, elapsed)
                entry.elapsed = elapsed
        self.hits += 1
        return entry

    def answer(self, packet: bytes, now: float) -> bytes | None:
        if len(packet) < 12:
            return None
        entry = self.lookup(packet[2:], now)
        return None if entry is None else packet[:2] + entry.tail


_SHAPE_FLAGS = 0x7800 | 0x0100 | 0x0010  # opcode, RD, CD: what a blocked answer copies (codec.reply_flags)
_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")
T_SOA, T_OPT, T_DS = 6, 41, 43
Template = Callable[[bytes, str, tuple], tuple]
Describe = Callable[[bytes, str, int, str, tuple, int, str], tuple]


class Blocker:
    """Blocked answers to packets the table has not seen, without the slow path: the header and question
    read here (plain names only; anything unusual is left to the codec), the name's suffixes looked up in the
    policy's name table (`names`: name -> entries (kind, category, source), as sinkhole.policy keeps them)
    the way Policy.match_name does for one group (`allowed`: its categories), and the answer made from a
    template per shape (`template(packet, domain, entry) -> (header bytes 2-12, bytes after the question, rcode,
    summary)`, made once by answer.blocked). `describe(packet, qname, qtype, domain, entry, rcode, summary) ->
    (kind, tag)` says how the answer is counted and audited. The answer is put into the table.

    Left to the slow path (None): an allowed name, a name no suffix rule blocks (forwarded, or for the regex
    rules to say), canaries, SOA, DS, ANY, transfers and meta types, other classes, EDNS with options or a
    version, anything after the question or the OPT record, and a name with anything but letters, digits, '-'
    and '_'."""

    def __init__(self, table: Table, names: dict, allowed: frozenset[str] | set[str], allow_kind: object,
                 canaries: frozenset[str] | set[str] | dict, regexes: bool, template: Template,
                 describe: Describe) -> None:
        self.table = table
        self.names = names
        self.allowed = frozenset(allowed)
        self.allow_kind = allow_kind
        self.canaries = frozenset(canaries)
        self.regexes = regexes
        self.shapes: dict[tuple, tuple] = {}
        self.template = template
        self.describe = describe
        self.answered = 0
        self.passed = 0

    def answer(self, packet: bytes) -> bytes | None:
        entry = self._answer(packet)
        return None if entry is None else packet[:2] + entry.tail

    def _answer(self, w: bytes) -> Entry | None:
        n = len(w)
        if n < 17 or n > MAX_PACKET:
            return None
        flags = w[2] << 8 | w[3]
        if flags & (0x8000 | 0x7800 | 0x0200):
            return None
        if w[4] != 0 or w[5] != 1 or w[6] or w[7] or w[8] or w[9] or w[10] or w[11] > 1:
            return None
        pos = 12
        labels: list[bytes] = []
        while True:
            if pos >= n:
                return None
            length = w[pos]
            if length == 0:
                pos += 1
                break
            if length > 63 or pos + 1 + length > n or len(labels) >= 127:
                return None
            label = w[pos + 1:pos + 1 + length].translate(_LOWER)
            if not _PLAIN.issuperset(label):
                return None
            labels.append(label)
            pos += 1 + length
            if pos - 12 > 255:
                return None
        if not labels or pos + 4 > n:
            return None
        qtype = w[pos] << 8 | w[pos + 1]
        qclass = w[pos + 2] << 8 | w[pos + 3]
        qend = pos + 4
        if qclass != 1 or qtype in (0, T_SOA, T_OPT, T_DS) or qtype >= 249:
            return None
        do = -1
        if w[11] == 1:
            if qend + 11 != n or w[qend] != 0 or (w[qend + 1] << 8 | w[qend + 2]) != T_OPT:
                return None
            if w[qend + 6] != 0 or w[qend + 9] or w[qend + 10]:
                return None
            do = 1 if w[qend + 7] & 0x80 else 0
        elif qend != n:
            return None
        qname = b".".join(labels).decode("ascii")
        if qname in self.canaries:
            return None
        found = None
        key = qname
        while True:
            hit = self.names.get(key)
            if hit is not None:
                for entry in hit:
                    if entry[1] in self.allowed:
                        if entry[0] is self.allow_kind:
                            return None
                        if found is None:
                            found = entry
                if found is not None:
                    break
            cut = key.find(".")
            if cut < 0:
                return None
            key = key[cut + 1:]
        shape = (key, found, qtype, flags & _SHAPE_FLAGS, do)
        tpl = self.shapes.get(shape)
        if tpl is None:
            tpl = self.template(w, key, found)
            if len(self.shapes) >= 10_000:
                self.shapes.clear()
            self.shapes[shape] = tpl
        reply = w[:2] + tpl[0] + w[12:qend] + tpl[1]
        kind, tag = self.describe(w, qname, qtype, key, found, tpl[2], tpl[3])
        result = Entry(reply[2:], kind, tag)
        self.table._put(w, result)
        self.answered += 1
        return result


class Bucket:
    __slots__ = ("last", "tokens")

    def __init__(self, tokens: float, last: float) -> None:
        self.tokens = tokens
        self.last = last


def _take(bucket: Bucket, rate: float, burst: float, now: float) -> bool:
    tokens = min(burst, bucket.tokens + (now - bucket.last) * rate)
    bucket.last = now
    if tokens >= 1.0:
        bucket.tokens = tokens - 1.0
        return True
    bucket.tokens = tokens
    return False


class Client:
    __slots__ = ("exempt", "net", "own", "table", "text")

    def __init__(self, text: str, table: Table | None, exempt: bool) -> None:
        self.text = text
        self.table = table  # None: every packet of this client goes the slow way
        self.exempt = exempt
        self.own: Bucket | None = None
        self.net: Bucket | None = None


Classify = Callable[[str], tuple["Table | None", bool, object]]


class Clients:
    """Per client address: its table and its token buckets (as sinkhole.dns.guard: per client, per network).

    `classify(address text)` -> (table or None, exempt from the rate limit, network key) is asked once per
    address; rate 0 switches that limit off."""

    def __init__(self, classify: Classify, rate: float = 0.0, burst: float = 1.0, net_rate: float = 0.0,
                 net_burst: float = 1.0) -> None:
        self.classify = classify
        self.rate, self.burst = rate, max(burst, 1.0)
        self.net_rate, self.net_burst = net_rate, max(net_burst, 1.0)
        self._known: dict[object, Client] = {}
        self._nets: dict[object, Bucket] = {}

    def __len__(self) -> int:
        return len(self._known)

    def clear(self) -> None:
        """Forget every client (a new policy: tables and groups change); token buckets start full again."""
        self._known.clear()
        self._nets.clear()

    def get(self, key: object, text: str) -> Client:
        client = self._known.get(key)
        if client is None:
            table, exempt, net = self.classify(text)
            client = Client(text, table, exempt)
            if len(self._known) >= MAX_CLIENTS:
                self._known.clear()
                self._nets.clear()
            if not exempt:
                if self.rate > 0:
                    client.own = Bucket(self.burst, 0.0)
                    client.own.last = -1.0  # full at first sight, whatever `now` is
                if self.net_rate > 0:
                    bucket = self._nets.get(net)
                    if bucket is None:
                        bucket = self._nets[net] = Bucket(self.net_burst, -1.0)
                    client.net = bucket
            self._known[key] = client
        return client

    def admit(self, client: Client, now: float) -> bool:
        """A token from the client's bucket, then its network's: False when over either limit."""
        own = client.own
        if own is not None:
            if own.last < 0:
                own.last = now
            if not _take(own, self.rate, self.burst, now):
                return False
        net = client.net
        if net is not None:
            if net.last < 0:
                net.last = now
            if not _take(net, self.net_rate, self.net_burst, now):
                return False
        return True

    def lookup(self, text: str) -> Client:
        """The client for an address given as text (the pure path, tests)."""
        return self.get(text, text)


class Tally:
    """Audit rows of answers given on the fast path; `take()` hands them over and starts a new window."""

    def __init__(self, window: float = 1.0) -> None:
        self.window = window
        self._cells: dict[tuple, list] = {}
        self._rows: list[tuple] = []
        self.added = 0  # answers tallied since start

    def __len__(self) -> int:
        return len(self._cells) + len(self._rows)

    def add(self, client: str, tag: object, transport: str, now: float) -> None:
        self.added += 1
        if self.window <= 0:
            self._rows.append((tag, client, transport, 1, now, now))
            return
        key = (client, tag, transport)
        cell = self._cells.get(key)
        if cell is None:
            self._cells[key] = [1, now, now]
        else:
            cell[0] += 1
            cell[2] = now

    def take(self) -> list[tuple]:
        """(tag, client, transport, count, first, last) for everything added since the last take."""
        rows = self._rows
        self._rows = []
        if self._cells:
            cells, self._cells = self._cells, {}
            rows.extend((tag, client, transport, c[0], c[1], c[2]) for (client, tag, transport), c in cells.items())
        return rows


class UdpFast:
    """Reads a non-blocking UDP socket until it is empty (or `budget` packets), answers from the tables what
    they hold, and returns the rest as (packet, address, admitted) for the slow path: admitted is True (the
    rate limit was checked and passed), False (over the limit) or None (not checked: not a fast client)."""

    def __init__(self, sock: socket.socket, clients: Clients, tally: Tally, batch: int = 32) -> None:
        self.sock = sock
        self.clients = clients
        self.tally = tally
        self.batch = batch
        self.received = 0
        self.answered = 0
        self.send_failed = 0
        # answers given here, by Entry.kind, and by its first item (kind[0]), counted before each is sent: a server
        # makes them its pipeline's own counters (Pipeline.detail, Pipeline.counts)
        self.counts: dict[object, int] = {}
        self.actions: dict[object, int] = {}

    def drain(self, mono: float, wall: float, budget: int = 256) -> list[tuple[bytes, tuple, bool | None]]:
        slow: list[tuple[bytes, tuple, bool | None]] = []
        recv, send = self.sock.recvfrom, self.sock.sendto
        clients, tally, counts, actions = self.clients, self.tally, self.counts, self.actions
        for _ in range(budget):
            try:
                data, addr = recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ICMP errors surfacing on the socket: nothing to answer
                continue
            self.received += 1
            client = clients.get(addr[0], addr[0])
            table = client.table
            if table is None:
                slow.append((data, addr, None))
                continue
            if not clients.admit(client, mono):
                slow.append((data, addr, False))
                continue
            entry = table.lookup(data[2:], mono) if 12 <= len(data) <= MAX_PACKET else None
            if entry is None and table.blocker is not None and 12 <= len(data) <= MAX_PACKET:
                entry = table.blocker._answer(data)
            if entry is None:
                slow.append((data, addr, True))
                continue
            self.answered += 1  # counted and audited as answered, like the slow path (which records, then sends)
            kind = entry.kind
            if kind is not None:
                counts[kind] = counts.get(kind, 0) + 1
                action = kind[0]  # type: ignore[index]
                actions[action] = actions.get(action, 0) + 1
            if entry.tag is not None:
                tally.add(client.text, entry.tag, "udp", wall)
            try:
                send(data[:2] + entry.tail, addr)
            except OSError:
                self.send_failed += 1
        return slow
