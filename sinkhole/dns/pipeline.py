"""The one place the order of a query's stages is written.

    codec.is_dropped -> guard.check -> answer.BlockedAnswers.replay -> codec.decode_query -> policy.decide
        -+- blocked -> answer (BlockedAnswers.answer) ----------------------------------------------------+
         +- AXFR/IXFR -> answer.transfer_refused ---------------------------------------------------------+
         +- forward -> cache.lookup -- hit ---------------------------------------------------------------+-> reply
                                    -- miss -> Pending -> forward: upstream, policy.inspect, cache.put ----+
    each reply's Outcome is recorded once (_done): counted for metrics, and audit.submit (non-blocking)

`begin` runs every stage that needs no I/O and returns the reply bytes, None (drop), or
a Pending forward; `forward` finishes those. Listeners call `begin` inline and only
schedule a task for forwards, so a blocked name or a cache hit never costs a task.

A miss, in `_ask`: codec.upstream_query (our own query: EDNS is hop by hop) -> upstream.forward
-> codec.read_reply (every record, any type) -> policy.inspect (CNAME/DNAME/SVCB targets, answer
addresses: sinkholed) and policy.blocked_owners (records of blocked names: removed) ->
codec.relayed (our OPT) -> cache.put; identical questions in flight share it (`_coalesced`), and
each client gets it as its own (codec.for_client: ID, question, RD/CD/AD). Any exception on the
way is a SERVFAIL for every client waiting on it (`failed`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from sinkhole import logthrottle
from sinkhole.dns import answer, codec
from sinkhole.dns.cache import Cache, key_of
from sinkhole.dns.guard import Admission, Guard, Shares
from sinkhole.dns.shortcut import Shortcuts
from sinkhole.dns.upstream import Forwarder
from sinkhole.errors import UpstreamError
from sinkhole.model import Action, AuditEvent, Outcome, Query, RuleKind, Verdict
from sinkhole.policy.decide import Group, Policy
from sinkhole.policy.names import client_address

log = logging.getLogger(__name__)
OK = Admission.OK
_DS_PROOF = frozenset({codec.T_DS, codec.T_NSEC, codec.T_NSEC3, codec.T_SOA})  # what a blocked apex's DS reply keeps


class AuditSink(Protocol):
    """Where outcomes are audited (sinkhole.audit.writer.AuditLog): the query path does not import the audit."""

    wanted: frozenset[Action]  # the actions it audits (a set the query path reads, not a call per query)

    def submit(self, event: AuditEvent, count: int = 1) -> None: ...

    def submit_tally(self, rows: list[tuple], new: list[tuple]) -> None: ...  # the fast path's (dns.shortcut)


class Pending(NamedTuple):
    """A query that passed the policy and must go upstream. A tuple, as Outcome is: one is made per cache miss,
    in a third of a frozen dataclass's time (0.26 against 0.86 us)."""

    query: Query
    verdict: Verdict
    version: int
    key: bytes
    group: Group
    ecs: bytes = b""  # the Client Subnet option we send upstream (ecs = "V4/V6"), or none


class Pipeline:
    def __init__(self, get_policy: Callable[[], Policy], forwarder: Forwarder, audit: AuditSink,
                 answers: answer.AnswerConfig, guard: Guard, cache: Cache,
                 ecs: tuple[int, int] | None = None, shares: Shares | None = None,
                 clock: Callable[[], float] = time.monotonic, wallclock: Callable[[], float] = time.time) -> None:
        """`clock`: the seconds cache entries age by; `wallclock`: the time audit rows carry."""
        self.get_policy = get_policy
        self.forwarder = forwarder
        self.audit = audit
        self.guard = guard
        self.cache = cache
        self.blocked = answer.BlockedAnswers(answers)
        self.shares = shares or Shares()  # forwards in flight per client and per network
        # Client Subnet (RFC 7871): None strips it (internal addresses never leave the agency); (V4, V6) sends
        # the client's network of those prefix lengths upstream, and keys the cache on it
        self.ecs = ecs
        self.clock = clock
        self.wallclock = wallclock
        self._in_force: tuple[int, int] | None = None  # the policy snapshot the memos and the cache are valid for
        self._inflight: dict[bytes, asyncio.Future[tuple[bytes, str, Verdict | None]]] = {}
        self._background: set[asyncio.Task[None]] = set()  # cache refreshes (prefetch) in flight
        self.counts: dict[str, int] = {}  # action (or "dropped", "prefetched" ...) -> queries
        # (action, qtype, transport, group) -> queries: read by sinkhole.service.metrics at scrape time
        self.detail: dict[tuple[str, int, str, str | None], int] = {}
        # the fast path's tables (sinkhole.dns.shortcut): UDP blocked answers and cache hits made here are put
        # there, and a listener answers the same packets again without begin; None: no fast path
        self.shortcuts: Shortcuts | None = None

    @property
    def answers(self) -> answer.AnswerConfig:
        return self.blocked.config

    def set_answers(self, answers: answer.AnswerConfig) -> None:
        """A reloaded configuration (SIGHUP): blocked answers are built anew from the next query on."""
        self.blocked.configure(answers)

    def begin(self, wire: bytes, client: str, proto: str, admitted: Admission | None = None) -> bytes | Pending | None:
        """Every stage that needs no I/O, in order: the reply, None (no answer at all), or a Pending forward.
        `admitted`: what the guard said of this packet already (the fast path asked it), else it is asked here."""
        if codec.is_dropped(wire):  # shorter than a header, or a response: no answer, no rate-limit token spent
            self.counts["dropped"] = self.counts.get("dropped", 0) + 1
            return None
        policy = self.get_policy()
        if (id(policy), policy.version) != self._in_force:  # a new snapshot: what was made under the old one goes
            self._follow(policy)
        group = policy.group_of(client)
        if admitted is None:
            admitted = self.guard.check(client, proto)  # client ACL and rate limits: once a packet
        if admitted is OK:
            memo = self.blocked.replay(wire, group)  # this packet but its ID was blocked before: the same reply
            if memo is not None:
                reply = wire[:2] + memo[1]
                if proto == "udp" and self.shortcuts is not None:
                    self.shortcuts.learn(wire, reply, memo[0])
                return self._done(memo[0], reply, client, proto, wire)
        try:
            query = codec.decode_query_memo(wire)
        except codec.BadQuery as bad:  # FORMERR, NOTIMP, NOTAUTH, BADVERS; REFUSED for a client not admitted
            outcome, reply = answer.bad_query(bad, admitted, group.name)
            return self._done(outcome, reply, client, proto, None)
        if admitted is not OK:  # TC=1 over the limit (UDP), else REFUSED
            outcome, reply = answer.not_admitted(query, admitted, group.name)
            return self._done(outcome, reply, client, proto, wire)
        verdict = policy.decide_name(query.name, group, query.qtype)  # Policy.decide, without a call in between
        if verdict.blocked:
            outcome, reply = self.blocked.answer(query, verdict, group, policy.version)
            if proto == "udp" and self.shortcuts is not None:  # the fast path answers this packet from now on
                self.shortcuts.learn(wire, reply, outcome)
            return self._done(outcome, reply, client, proto, wire)
        if query.qtype in answer.TRANSFERS:
            outcome, reply = answer.transfer_refused(query, verdict, policy.version, group.name)
            return self._done(outcome, reply, client, proto, wire)
        return self._cached(query, verdict, policy, group, client, proto, wire)

    def _cached(self, query: Query, verdict: Verdict, policy: Policy, group: Group, client: str, proto: str,
                wire: bytes) -> bytes | Pending:
        """The cache's answer for an allowed query, or a Pending forward when it has none."""
        key, ecs = self._cache_key(query, client, group, policy)
        hit = self.cache.lookup(key, query, self.clock())
        if hit is None:
            return Pending(query, verdict, policy.version, key, group, ecs)
        reply, due = hit
        if due:  # a hit in the last tenth of its TTL: refreshed behind the client's back (prefetch)
            self._prefetch(Pending(query, verdict, policy.version, key, group, ecs))
        if ecs and query.edns is not None and query.edns.ecs:
            reply = codec.with_ecs(reply, query.edns.ecs, ecs)
        rendered = reply
        reply = answer.fit(query, reply, proto)
        outcome = Outcome(Action.CACHED, query.qname, query.qtype, codec.header_rcode(reply), verdict, None,
                          policy.version, group.name)
        if proto == "udp" and self.shortcuts is not None and self.ecs is None and not due and reply is rendered:
            self.shortcuts.learn_cached(wire, query, self.cache.entry(key), outcome, self.cache.prefetch)
        return self._done(outcome, reply, client, proto, wire)

    def _done(self, outcome: Outcome, reply: bytes, client: str, proto: str, wire: bytes | None) -> bytes:
        """The one place a query is counted (metrics) and audited; returns its reply."""
        name = outcome.action._value_  # Action.value, without the enum property's two Python calls per query
        counts = self.counts
        counts[name] = counts.get(name, 0) + 1
        key = (name, outcome.qtype, proto, outcome.group)
        detail = self.detail
        detail[key] = detail.get(key, 0) + 1
        if outcome.action in self.audit.wanted:
            shortcuts = self.shortcuts
            if shortcuts is not None and len(shortcuts.tally):  # the fast path's answers given before this one are
                shortcuts.flush()  # queued before it: the audit's rows stay in the order of the answers
            self.audit.submit(AuditEvent.of(outcome, self.wallclock(), client, proto, wire))
        return reply

    def _follow(self, policy: Policy) -> None:
        """A new policy snapshot is in force: the blocked answers and the cache made under the old one go (a cached
        answer may lead to a name that is blocked now)."""
        self.blocked.clear()
        self.cache.clear()
        self._in_force = (id(policy), policy.version)  # not a reference: the old policy may go

    def _cache_key(self, query: Query, client: str, group: Group, policy: Policy) -> tuple[bytes, bytes]:
        """The cache key of a query (codec's key_of, per Client Subnet prefix and per client group: answers are
        inspected under the group's policy), and the Client Subnet option to send upstream."""
        key = key_of(query)
        ecs = b""
        if self.ecs is not None:  # Client Subnet forwarded, cut to a prefix: answers are cached per prefix
            ecs = self._client_subnet(query, client)
            key += b"\1" + bytes([len(ecs)]) + ecs
        if group is not policy.default:
            key += b"\0" + group.name.encode()
        return key, ecs

    def _client_subnet(self, query: Query, client: str) -> bytes:
        """The Client Subnet option sent upstream with ecs = "V4/V6": the client's own option cut to at most
        that prefix (none when it asked for none: source prefix 0, RFC 7871 §7.1.2), else its address so cut."""
        assert self.ecs is not None
        asked = query.edns.ecs if query.edns is not None else None
        if asked is not None:
            address, source = codec.ecs_address(asked)
            if source == 0:
                return b""
        else:
            found = client_address(client)
            if found is None:
                return b""
            address, source = found, 128
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
        return codec.ecs_option(address, min(source, self.ecs[0] if address.version == 4 else self.ecs[1]))

    def _prefetch(self, pending: Pending) -> None:
        """Refresh a cache entry whose hit asked for it, off the client's path (coalesced like any forward)."""
        try:
            task = asyncio.get_running_loop().create_task(self._refresh(pending))
        except RuntimeError:  # no loop (sinkhole check): nothing to refresh for
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh(self, pending: Pending) -> None:
        try:
            await self._coalesced(pending, False)
        except Exception as exc:  # the entry just expires as it would have without prefetch
            log.debug("prefetch of %s failed: %s", pending.query.qname, exc)
        else:
            self.counts["prefetched"] = self.counts.get("prefetched", 0) + 1

    async def forward(self, pending: Pending, client: str, proto: str) -> bytes:
        """The upstream's reply (inspected; cached unless it leads to a blocked name or network), a stale answer
        (RFC 8767) or SERVFAIL; recorded once, with the upstream and the latency."""
        query = pending.query
        token = self.shares.take(client, self.guard.network_of(client), self.forwarder.max_inflight)
        if token is None:  # this client (or its network) holds its share of the forwards: it waits, not others
            logthrottle.warning(log, "REFUSED %s %s for %s: over its share of the queries waiting for an upstream",
                                query.qname, codec.qtype_name(query.qtype), client)
            return self._done(Outcome(Action.REFUSED, query.qname, query.qtype, codec.REFUSED, pending.verdict,
                                      "over its share of forwards in flight", pending.version, pending.group.name),
                              answer.refused(query), client, proto, query.wire)
        started = time.perf_counter()
        try:
            shared, upstream, cloaked = await self._coalesced(pending, proto == "tcp")
        except UpstreamError as exc:
            outcome, reply = self._unanswered(pending, exc, proto, started)  # STALE or SERVFAIL
        except Exception as exc:  # a bug of ours, or input nobody foresaw: this client still gets an answer
            return self.failed(query.wire, client, proto, exc)
        else:
            outcome, reply = self._answered(pending, shared, upstream, cloaked, proto, started)
        finally:
            self.shares.give_back(token)
        return self._done(outcome, reply, client, proto, query.wire)

    def _answered(self, pending: Pending, shared: bytes, upstream: str, cloaked: Verdict | None, proto: str,
                  started: float) -> tuple[Outcome, bytes]:
        """The upstream's reply made this client's; the sinkhole answer instead when it leads to a blocked name or
        network (cname-blocked, ip-blocked)."""
        query, version, group = pending.query, pending.version, pending.group.name
        latency = (time.perf_counter() - started) * 1000
        if cloaked is not None and cloaked.rule is not None:
            built = answer.blocked(query, cloaked.rule, self.answers, version or 1)
            return (Outcome(cloaked.action, query.qname, query.qtype, built.rcode, cloaked, built.summary, version,
                            group, upstream, latency), built.wire)
        reply = bytes(codec.for_client(shared, len(query.question), query))
        if pending.ecs and query.edns is not None and query.edns.ecs:
            reply = codec.with_ecs(reply, query.edns.ecs, pending.ecs)
        reply = answer.fit(query, reply, proto)
        return (Outcome(Action.FORWARDED, query.qname, query.qtype, codec.header_rcode(reply), pending.verdict, None,
                        version, group, upstream, latency), reply)

    def _unanswered(self, pending: Pending, exc: UpstreamError, proto: str, started: float) -> tuple[Outcome, bytes]:
        """No upstream answered: the last answer we had (serve-stale, RFC 8767: TTL 30 s, EDE 3), else SERVFAIL."""
        query, version, group = pending.query, pending.version, pending.group.name
        latency = (time.perf_counter() - started) * 1000
        stale = self.cache.stale(pending.key, query, self.clock())
        if stale is not None:
            log.warning("stale answer for %s %s: %s", query.qname, codec.qtype_name(query.qtype), exc)
            stale = answer.fit(query, stale, proto)
            return (Outcome(Action.STALE, query.qname, query.qtype, codec.header_rcode(stale), pending.verdict, None,
                            version, group, None, latency), stale)
        log.warning("SERVFAIL for %s %s: %s", query.qname, codec.qtype_name(query.qtype), exc)
        return (Outcome(Action.SERVFAIL, query.qname, query.qtype, codec.SERVFAIL, pending.verdict, None, version,
                        group, None, latency), answer.servfail(query, "no upstream answered"))

    def failed(self, wire: bytes, client: str, proto: str, exc: BaseException) -> bytes | None:
        """An unexpected exception while answering `wire`: SERVFAIL for the client (None only for a packet that
        gets no answer at all), one line in the log (at most one a kind per interval, the log's filter sees to
        that: the format is constant)."""
        log.error("unexpected error answering a query from %s over %s, answered SERVFAIL: %s: %s", client, proto,
                  type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        reply = codec.servfail_for(wire)
        self.counts["internal-error"] = self.counts.get("internal-error", 0) + 1
        if reply is not None:
            try:
                query = codec.decode_query(wire)
                self._done(Outcome(Action.SERVFAIL, query.qname, query.qtype, codec.SERVFAIL,
                                   summary=f"internal error: {type(exc).__name__}"), reply, client, proto, wire)
            except Exception:  # an unreadable query, or the audit log is what failed: the answer matters more
                log.debug("the SERVFAIL for an internal error was not recorded", exc_info=True)
        return reply

    async def _coalesced(self, pending: Pending, client_tcp: bool) -> tuple[bytes, str, Verdict | None]:
        """One upstream query for identical questions in flight at once: every asker gets the same outcome,
        the reply (to be made its own with codec.for_client) or the exception, whatever it is."""
        key = pending.key
        if not client_tcp:
            running = self._inflight.get(key)
            if running is not None:
                return await asyncio.shield(running)
        future: asyncio.Future[tuple[bytes, str, Verdict | None]] = asyncio.get_running_loop().create_future()
        if not client_tcp:
            self._inflight[key] = future
        try:
            result = await self._ask(pending, client_tcp)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        else:
            future.set_result(result)
            return result
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    async def _ask(self, pending: Pending, client_tcp: bool) -> tuple[bytes, str, Verdict | None]:
        """Our own query upstream; the reply read record by record and inspected before it is cached: one
        that leads to a blocked name is never cached, and records of blocked names are never relayed."""
        query = pending.query
        reply, up = await self.forwarder.forward(query, client_tcp, codec.upstream_query(query, pending.ecs))
        try:
            shared, cloaked = self._inspect(pending, reply)
        except codec.Malformed as exc:
            raise UpstreamError(f"a malformed reply from {up}: {exc}") from None
        if cloaked is None:
            self.cache.put(pending.key, query, shared, self.clock())
        return shared, str(up), cloaked

    def _inspect(self, pending: Pending, reply: bytes) -> tuple[bytes, Verdict | None]:
        query = pending.query
        facts = codec.read_reply(reply, len(query.question), query.name)
        if query.qtype == codec.T_ANY and codec.header_rcode(reply) == codec.NOERROR:
            return answer.minimal_any(query), None  # RFC 8482: the name exists; one HINFO, not everything it has
        policy = self.get_policy()
        if facts.targets or (facts.addresses and policy.ip_rules):
            cloaked = policy.inspect(facts.targets, facts.addresses, pending.group)
            if cloaked is not None:
                return reply, cloaked
        qname = query.name
        owners = {r.owner for r in facts.records if r.owner != qname and r.rtype != codec.T_OPT and not r.denial}
        drop: set[tuple] | None = None
        if owners:
            blocked = policy.blocked_owners(owners, qname, pending.group)
            if blocked:
                drop = {(r.section, r.owner) for r in facts.records if r.owner in blocked}
                self.counts["stripped"] = self.counts.get("stripped", 0) + 1
        rule = pending.verdict.rule
        if query.qtype == codec.T_DS and rule is not None and rule.kind is RuleKind.BLOCK:
            # the DS of a blocked apex, forwarded on purpose (the parent's proof that the zone is unsigned): of
            # what the blocked apex owns, only that proof (and its signatures) is relayed, never data below the cut
            apex = {(r.section, r.owner, r.rtype, r.covered) for r in facts.records if r.owner == qname
                    and (r.covered if r.rtype == codec.T_RRSIG else r.rtype) not in _DS_PROOF}
            if apex:
                drop = (drop or set()) | apex
                self.counts["stripped"] = self.counts.get("stripped", 0) + 1
        return codec.relayed(reply, facts, query.edns, drop), None

    async def handle(self, wire: bytes, client: str, proto: str) -> bytes | None:
        """Both halves in one call, for callers that are already in a task."""
        result = self.begin(wire, client, proto)
        if isinstance(result, Pending):
            return await self.forward(result, client, proto)
        return result
