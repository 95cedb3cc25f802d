"""The fast path's parts made from the pipeline's: the Blocker of one client group (its templates come from
answer.blocked, so that its answers are the pipeline's byte for byte), and the audit tags.

An audit tag is a number standing for everything an audit row of one answer says but the client, the
transport and the time (name, type, action, rule, category, rcode, answer, policy version, group, name as
asked, list): the fast path's rows carry the number, and the audit writer learns what it stands for once
(`Tags.take_new`).
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque

from sinkhole.dns import answer, cache, codec, fast
from sinkhole.dns.cache import Cache, Entry
from sinkhole.dns.guard import Admission
from sinkhole.model import Action, AuditEvent, Outcome, Query, Rule, RuleKind
from sinkhole.policy.decide import CANARIES, Group, Policy

# what a tag stands for, in this order
DESCRIPTION = ("qname", "qtype", "action", "rule", "category", "rcode", "answer", "policy_version", "group", "asked",
               "source")
# tags made since the last reset, at most: past it, the next batch starts afresh (Shortcuts.check), numbering from 0
# again, so that the audit log's table of what each tag stands for (AuditLog.submit_tally) stays this size
MAX_TAGS = 1_000_000


class Tags:
    """Audit row descriptions by number; new ones are handed to the writer before the rows that use them, each
    with the first packet that had it (the audit takes the name as asked from it)."""

    def __init__(self) -> None:
        self._ids: dict[tuple, int] = {}
        self._new: list[tuple[int, tuple]] = []
        self.wires: dict[int, bytes] = {}  # tag -> a query packet with that description
        self.next = 0

    def __len__(self) -> int:
        return len(self._ids)

    def tag(self, description: tuple, wire: bytes | None = None) -> int:
        found = self._ids.get(description)
        if found is None:
            if len(self._ids) >= MAX_TAGS:
                self._ids.clear()
            found = self._ids[description] = self.next
            self.next += 1
            self._new.append((found, description))
            if wire is not None:
                self.wires[found] = wire
        return found

    def take_new(self) -> list[tuple[int, tuple]]:
        new, self._new = self._new, []
        return new


def blocker(table: fast.Table, policy: Policy, group: Group, answers: answer.AnswerConfig, audited: bool,
            tags: Tags) -> fast.Blocker:
    """The Blocker answering `group`'s clients under `policy` as Pipeline.begin does (put into `table`); what it
    answers is counted as Pipeline.detail counts it, (action, qtype, "udp", group name)."""
    version = policy.version
    row_group = group.name

    def template(packet: bytes, domain: str, entry: tuple) -> tuple[bytes, bytes, int, str]:
        query = codec.decode_query(packet)
        built = answer.blocked(query, Rule(domain, entry[0], entry[1], entry[2]), answers, version or 1)
        return built.wire[2:12], built.wire[12 + len(query.question):], built.rcode, built.summary

    def describe(packet: bytes, qname: str, qtype: int, domain: str, entry: tuple, rcode: int,
                 summary: str) -> tuple[tuple, int | None]:
        kind = (Action.BLOCKED.value, qtype, "udp", row_group)
        if not audited:
            return kind, None
        question = packet[12:]
        asked = qname if question.lower() == question else codec.asked_name(packet)
        return kind, tags.tag((qname, qtype, Action.BLOCKED.value, domain, entry[1], rcode, summary, version,
                               row_group, asked, entry[2]), packet)

    twin = sys.modules[type(table).__module__]  # the Blocker of the table's own module (compiled or pure)
    made = twin.Blocker(table, policy._map, group.allowed, RuleKind.ALLOW,
                        CANARIES if policy.canaries else (), bool(policy._regexes), template, describe)
    table.blocker = made
    return made


class Shortcuts:
    """The fast path's state in one worker, shared by its UDP listeners (sinkhole.dns.listener.FastUdp).

    - a `Table` per client group of whole replies by query packet without its ID: the blocked (and canary)
      answers the pipeline made under the policy snapshot in force (`learn`), and its cache hits, whose TTLs
      the table ages and which it drops at the cache entry's expiry or prefetch time (`learn_cached`); each
      table's `Blocker` answers blocked names it has not seen yet from answer.blocked's templates;
    - `clients`: per client address its group's table (none for a client allow_clients refuses: the pipeline
      answers it, as today) and whether the guard must be asked per packet (`admit`: the guard's own buckets,
      so a client over its rate limit gets what it gets today, and the refusals it was given are handed to the
      pipeline with the packet, `not_admitted`);
    - `tally`: the audit rows of the answers given on the fast path, handed to the audit log as counted events
      (`flush`: every flush_interval, at the end, and before the pipeline submits an event of its own, so that
      the rows are in the order of the answers), so that every answer is in the log as a row or a count;
    - every answer is counted (Entry.kind: Pipeline.detail's key) by UdpFast in the pipeline's own counters,
      before it is sent, so that /metrics and the stop line count every answer once, as the pipeline does.

    `check` (before each batch) follows the pipeline: a new policy snapshot, a new guard (reload) or new answer
    settings empty the tables and forget the clients, as Pipeline._follow empties its memos and cache."""

    FLUSH_INTERVAL = 0.2  # seconds between two hand-overs of the tally to the audit log
    # the same while the last one had rows: a hand-over costs the event loop ~1.5 us a row, and at 0.2 s it held
    # answers back for 3-4 ms at a time (load (a) at 20k q/s, 2,000 rows each)
    BUSY_INTERVAL = 0.02

    def __init__(self, pipeline: object, window: float) -> None:
        self.pipeline = pipeline  # the Pipeline (not imported: it imports this module)
        self.tally = fast.Tally(window)
        # a tally row stands for answers within one hand-over: no longer apart than the audit window
        self.flush_interval = min(self.FLUSH_INTERVAL, window) if window > 0 else self.FLUSH_INTERVAL
        self.tags = Tags()
        self.tables: dict[str, fast.Table] = {}
        self.not_admitted: deque[Admission] = deque()  # the guard's answers to packets it refused, oldest first
        self.clients = self._clients()
        self._following: tuple = ()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the tally to the audit log every FLUSH_INTERVAL seconds from now on (once for all listeners)."""
        if self._timer is None:
            self._timer = loop.call_later(self.flush_interval, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        busy = self.flush()
        self._timer = loop.call_later(self.BUSY_INTERVAL if busy else self.flush_interval, self._tick, loop)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()

    def _clients(self) -> fast.Clients:
        guard = self.pipeline.guard  # type: ignore[attr-defined]
        refusals = self.not_admitted
        ok = Admission.OK

        class Guarded(fast.Clients):  # type: ignore[misc, valid-type]
            def admit(self, client: object, now: float) -> bool:
                admitted = guard.check(client.text, "udp")  # type: ignore[attr-defined]
                if admitted is ok:
                    return True
                refusals.append(admitted)
                return False

        limited = guard.client is not None or guard.network is not None
        # rate 1.0: a marker that the client is limited (UdpFast asks `admit`); the buckets are the guard's
        return Guarded(self._classify, rate=1.0 if limited else 0.0, net_rate=0.0)

    def _classify(self, client: str) -> tuple[fast.Table | None, bool, object]:
        """(the table of the client's group, or None when the guard refuses it; not limited; network key)."""
        pipeline = self.pipeline
        if not pipeline.guard.allows(client):  # type: ignore[attr-defined]
            return None, True, client
        group = pipeline.get_policy().group_of(client)  # type: ignore[attr-defined]
        return self.table(group), False, client

    def table(self, group: Group) -> fast.Table:
        table = self.tables.get(group.name)
        if table is None:
            pipeline = self.pipeline
            table = self.tables[group.name] = fast.Table()
            policy = pipeline.get_policy()  # type: ignore[attr-defined]
            audit = pipeline.audit  # type: ignore[attr-defined]
            blocker(table, policy, group, pipeline.answers, Action.BLOCKED in audit.wanted, self.tags)  # type: ignore
        return table

    def check(self) -> None:
        """Before a batch: empty everything made under an older policy snapshot, guard or answer settings."""
        pipeline = self.pipeline
        policy = pipeline.get_policy()  # type: ignore[attr-defined]
        now = (id(policy), policy.version, pipeline.guard, pipeline.answers, pipeline.audit.wanted)  # type: ignore
        if now != self._following or self.tags.next >= MAX_TAGS:
            self.reset()
            self._following = now

    def reset(self) -> None:
        self.flush()
        for table in self.tables.values():
            table.clear()
            table.blocker = None
        self.tables.clear()
        self.tags = Tags()
        self.not_admitted.clear()
        self.clients = self._clients()

    def learn(self, wire: bytes, reply: bytes, outcome: Outcome) -> None:
        """`reply` (a blocked or canary answer of the pipeline) answers `wire` with any ID until the next reset."""
        table = self.tables.get(outcome.group or "")
        if table is None:
            return  # no client of that group came the fast way since the last reset
        table.put_blocked(wire, reply, (outcome.action._value_, outcome.qtype, "udp", outcome.group),
                          self._tag(wire, outcome))

    def learn_cached(self, wire: bytes, query: Query, entry: Entry | None, outcome: Outcome, prefetch: bool) -> None:
        """The cache's answer to `wire` from `entry`, its TTLs aged by the table, until it expires or is due for
        a refresh (with prefetch on, the entry a refresh was asked for already is not learnt: its successor is)."""
        table = self.tables.get(outcome.group or "")
        if table is None or entry is None:
            return
        if prefetch and entry[cache.PREFETCH_AT] == cache.INF:
            return
        table.put_cached(wire, Cache.render(entry, query, entry[cache.STORED]), entry[cache.TTL_OFFSETS],
                         entry[cache.TTLS], entry[cache.STORED], entry[cache.EXPIRES], entry[cache.PREFETCH_AT],
                         (outcome.action._value_, outcome.qtype, "udp", outcome.group), self._tag(wire, outcome))

    def _tag(self, wire: bytes, outcome: Outcome) -> int | None:
        if outcome.action not in self.pipeline.audit.wanted:  # type: ignore[attr-defined]
            return None
        e = AuditEvent.of(outcome, 0.0, "", "udp", wire)
        return self.tags.tag((e.qname, e.qtype, e.action, e.rule, e.category, e.rcode, e.answer, e.policy_version,
                              e.group, codec.asked_name(wire, e.qname), e.source), wire)

    def flush(self) -> int:
        """Hand the tallied answers to the audit log (AuditLog.submit_tally): rows of (tag, client, transport,
        count, first, last), and before them what the tags new since the last hand-over stand for."""
        rows = self.tally.take()
        new = self.tags.take_new()
        if new:
            wires = self.tags.wires
            new = [(tag, d, wires.get(tag)) for tag, d in new]
        if rows or new:
            self.pipeline.audit.submit_tally(rows, new)  # type: ignore[attr-defined]
        return len(rows)  # how many rows were handed over
