"""A TTL-aware cache of upstream replies, kept as wire bytes.

A hit is the stored reply with the client's ID and question bytes put in and every TTL
decreased by the time it spent here: no message object is built. Negative answers are
cached for the SOA's TTL or MINIMUM, whichever is lower (RFC 2308). Entries are keyed
on the lower-cased question name, type, class and the EDNS/DO/CD/RD bits of the query,
bounded in number, and evicted least recently used first. The AD bit is not in the key: the
upstream is always asked with AD, and each client sees it only if it asked with AD or DO.

Serve-stale (RFC 8767, off unless `serve_stale` > 0): an expired entry is kept that many
seconds more; when no upstream answers, the pipeline answers from it with every TTL set to
30 s and, for EDNS clients, Extended DNS Error 3 (Stale Answer, RFC 8914). A refresh that
succeeds replaces it.
"""

from __future__ import annotations

from collections import OrderedDict

from sinkhole.dns import codec
from sinkhole.model import Query

STALE_TTL = 30  # RFC 8767 section 4: the TTL of a stale answer
EDE_STALE = 3  # RFC 8914: Stale Answer


# An entry is a plain tuple, in this order. Not a class nor a namedtuple: the garbage collector stops tracking a
# plain tuple of numbers, bytes and such tuples once it has seen it, and never walks it again (sinkhole.service.heap).
# With a class, under 6 s of cache misses a worker's oldest generation held 75,718 entries of 81,486 objects;
# with tuples, 3,344 objects in all.
WIRE = 0  # the reply as received, ID and question included
QLEN = 1  # length of the question section
TTL_OFFSETS = 2  # where each decrementable TTL is
TTLS = 3  # and its value as stored
STORED = 4  # when it was stored (the clock of lookup's `now`)
EXPIRES = 5
PREFETCH_AT = 6  # after this, a hit also refreshes the entry from the upstream (inf: never)
OPT_AT = 7  # where the OPT record starts when it is the last record (-1: none; -2: not last)
Entry = tuple[bytes, int, tuple[int, ...], tuple[int, ...], float, float, float, int]
INF = float("inf")


def key_of(query: Query) -> bytes:
    """Question name lower-cased plus type and class, and one byte of EDNS / DO / CD / RD."""
    q = query.question
    flags = (1 if query.edns is not None else 0) | (2 if query.edns and query.edns.do else 0) | (
        4 if query.flags & codec.CD else 0) | (8 if query.flags & codec.RD else 0)
    return q[:-4].lower() + q[-4:] + bytes([flags])


class Cache:
    def __init__(self, max_entries: int = 100_000, min_ttl: int = 0, max_ttl: int = 86400,
                 negative_max_ttl: int = 3600, prefetch: bool = False, serve_stale: float = 0.0) -> None:
        self.max_entries = max_entries
        # seconds an expired entry is kept to answer from when no upstream answers (RFC 8767); 0: off
        self.serve_stale = serve_stale
        self.stale_served = 0
        # prefetch (as Unbound's `prefetch: yes`): a hit in the last tenth of an entry's TTL refreshes it in
        # the background, so a popular name never expires for its clients; the hit is served as usual
        self.prefetch = prefetch
        self.prefetch_fraction = 0.1
        self.prefetches = 0  # refreshes asked for by hits
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.negative_max_ttl = negative_max_ttl
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def entry(self, key: bytes) -> Entry | None:
        """The entry stored for `key`, live or not, without counting a hit or a miss (the fast path learns
        its TTLs and expiry from it)."""
        return self._entries.get(key)

    def lookup(self, key: bytes, query: Query, now: float) -> tuple[bytes, bool] | None:
        """(the stored reply made this client's, due) for a live entry, None on a miss; `due`: this hit is the one
        in the last tenth of the entry's TTL that asks for a refresh (prefetch; once per entry)."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if now >= entry[EXPIRES]:
            if now >= entry[EXPIRES] + self.serve_stale:
                del self._entries[key]
            self.misses += 1  # a stale entry is only for when the upstream fails (stale())
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        if now >= entry[PREFETCH_AT]:  # once: the refreshed entry replaces this one
            self._entries[key] = (*entry[:PREFETCH_AT], INF, *entry[PREFETCH_AT + 1:])
            self.prefetches += 1
            return self.render(entry, query, now), True
        return self.render(entry, query, now), False

    @staticmethod
    def render(entry: Entry, query: Query, now: float) -> bytes:
        """The stored reply for this client (codec.for_client: its ID, question bytes, RD, CD, AD), TTLs aged."""
        out = codec.for_client(entry[WIRE], entry[QLEN], query)
        elapsed = int(now - entry[STORED])
        if elapsed:
            codec.set_ttls(out, entry[TTL_OFFSETS], entry[TTLS], elapsed)
        return bytes(out)

    def stale(self, key: bytes, query: Query, now: float) -> bytes | None:
        """When no upstream answered: the entry for `key`, if it expired less than `serve_stale` seconds ago
        (or has not expired: another forward stored it meanwhile), with every TTL at 30 s and EDE 3."""
        entry = self._entries.get(key) if self.serve_stale > 0 else None
        if entry is None:
            return None
        if now < entry[EXPIRES]:
            return self.render(entry, query, now)
        if now >= entry[EXPIRES] + self.serve_stale:
            return None
        self.stale_served += 1
        out = bytearray(self.render(entry, query, entry[STORED]))
        codec.set_ttls(out, entry[TTL_OFFSETS], None, STALE_TTL)
        if query.edns is not None and entry[OPT_AT] != -2:  # our OPT, with the EDE, in place of the upstream's
            return codec.with_own_opt(out, entry[OPT_AT], query.edns,
                                      (EDE_STALE, "stale answer: no upstream answered"))
        return bytes(out)

    def put(self, key: bytes, query: Query, reply: bytes, now: float) -> None:
        """Store a validated upstream reply when it may be reused; anything odd is simply not cached."""
        if self.max_entries <= 0 or len(reply) < 12 + len(query.question):
            return
        rcode = codec.header_rcode(reply)
        if codec.is_truncated(reply) or rcode not in (codec.NOERROR, codec.NXDOMAIN):
            return
        try:
            offsets, ttls, negative_ttl, has_answer, opt_at = codec.scan_records(reply, len(query.question))
        except codec.Malformed:
            return
        if has_answer and rcode == codec.NOERROR:
            ttl = min(ttls)
            ttl = max(self.min_ttl, min(ttl, self.max_ttl))
        elif negative_ttl is not None:
            ttl = max(self.min_ttl, min(negative_ttl, self.negative_max_ttl))
        else:
            return  # a negative answer without SOA: RFC 2308 says not to cache it
        if ttl <= 0:
            return
        prefetch_at = INF  # never, for TTLs of a second or less
        if self.prefetch and ttl >= 2:
            prefetch_at = now + ttl * (1 - self.prefetch_fraction)
        self._entries[key] = (reply, len(query.question), tuple(offsets), tuple(ttls), now, now + ttl, prefetch_at,
                              opt_at)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
