"""The one place the order of a query's stages is written.

    decode -> guard -> policy.decide -+- blocked --> answer.blocked ---------------------------+
                                      +- forward --> cache.get -- miss --> upstream.forward ---+--> reply
                                                        (hit) ----------------------------------+
                                                     audit.submit (non-blocking) <--------------+

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
from dataclasses import dataclass

from sinkhole import logthrottle
from sinkhole.audit.writer import AuditLog
from sinkhole.dns import answer, codec
from sinkhole.dns.cache import Cache, key_of
from sinkhole.dns.guard import Guard, Outcome, Shares
from sinkhole.dns.upstream import Forwarder
from sinkhole.errors import UpstreamError
from sinkhole.model import Action, AuditEvent, Query, RuleKind, Verdict
from sinkhole.policy.decide import CANARIES, Group, Policy
from sinkhole.policy.names import client_address

log = logging.getLogger(__name__)
BLOCKED = Action.BLOCKED
_BAD_QUERY_ACTIONS = {codec.NOTIMP: Action.NOTIMP, codec.NOTAUTH: Action.NOTAUTH}
_SHAPE_FLAGS = codec.OPCODE_MASK | codec.RD | codec.CD
_DS_PROOF = frozenset({codec.T_DS, codec.T_NSEC, codec.T_NSEC3, codec.T_SOA})  # what a blocked apex's DS reply keeps


@dataclass(frozen=True, slots=True)
class Pending:
    """A query that passed the policy and must go upstream."""

    query: Query
    verdict: Verdict
    version: int
    key: bytes
    group: Group
    ecs: bytes = b""  # the Client Subnet option we send upstream (ecs = "V4/V6"), or none


class Pipeline:
    def __init__(self, get_policy: Callable[[], Policy], forwarder: Forwarder, audit: AuditLog,
                 answers: answer.AnswerConfig, guard: Guard, cache: Cache,
                 ecs: tuple[int, int] | None = None, shares: Shares | None = None) -> None:
        self.guard = guard
        self.shares = shares or Shares()  # forwards in flight per client and per network
        # Client Subnet (RFC 7871): None strips it (internal addresses never leave the agency); (V4, V6) sends
        # the client's network of those prefix lengths upstream, and keys the cache on it
        self.ecs = ecs
        self._canary_answers = {
            "nxdomain": answer.AnswerConfig(mode="nxdomain", ttl=answers.ttl),
            "nodata": answer.AnswerConfig(mode="sinkhole", a=None, aaaa=None, ttl=answers.ttl),
        }
        self.cache = cache
        self._inflight: dict[bytes, asyncio.Future[tuple[bytes, str, Verdict | None]]] = {}
        # blocked answers by packet-without-ID, valid for one policy snapshot; one memo per client group
        self._memo: dict[bytes, tuple[bytes, str, int, int, Verdict, str]] = {}
        self._group_memos: dict[str, dict[bytes, tuple[bytes, str, int, int, Verdict, str]]] = {}
        self._memo_policy: tuple[int, int] | None = None
        # blocked answers by (rule, qtype, qclass, flags, DO): header and the sections after the question
        self._shapes: dict[tuple, tuple[bytes, bytes, int, str]] = {}
        self.get_policy = get_policy
        self.forwarder = forwarder
        self.audit = audit
        self.answers = answers
        self.counts: dict[str, int] = {}
        self._background: set[asyncio.Task[None]] = set()  # cache refreshes (prefetch) in flight
        # (action, qtype, transport, group) -> queries: read by sinkhole.service.metrics at scrape time
        self.detail: dict[tuple[str, int, str, str | None], int] = {}

    def _record(self, action: Action, client: str, proto: str, qname: str, qtype: int, rcode: int,
                verdict: Verdict | None = None, summary: str | None = None, version: int = 0,
                upstream: str | None = None, latency_ms: float | None = None, group: str | None = None,
                wire: bytes | None = None) -> None:
        name = action.value
        counts = self.counts
        counts[name] = counts.get(name, 0) + 1
        key = (name, qtype, proto, group)
        detail = self.detail
        detail[key] = detail.get(key, 0) + 1
        if self.audit.wants(action):
            rule = verdict.rule if verdict is not None else None
            self.audit.submit(AuditEvent(
                time.time(), client, proto, qname, qtype, name,
                rule.domain if rule else None, rule.category if rule else None, rcode, summary, version,
                upstream, latency_ms, group, wire, rule.source if rule else None))

    def set_answers(self, answers: answer.AnswerConfig) -> None:
        """A reloaded configuration (SIGHUP): blocked answers are built anew from the next query on."""
        self.answers = answers
        self._canary_answers = {
            "nxdomain": answer.AnswerConfig(mode="nxdomain", ttl=answers.ttl),
            "nodata": answer.AnswerConfig(mode="sinkhole", a=None, aaaa=None, ttl=answers.ttl),
        }
        self._memo.clear()
        self._group_memos.clear()
        self._shapes.clear()

    def begin(self, wire: bytes, client: str, proto: str) -> bytes | Pending | None:
        policy = self.get_policy()
        if (id(policy), policy.version) != self._memo_policy:  # not a reference: the old policy may go
            self._memo.clear()
            self._group_memos.clear()
            self._shapes.clear()
            self.cache.clear()  # a cached answer may lead to a name that is blocked now
            self._memo_policy = (id(policy), policy.version)
        outcome = None
        group = policy.group_of(client)
        if group is policy.default:
            memo = self._memo
        else:
            memo = self._group_memos.get(group.name)
            if memo is None:
                memo = self._group_memos[group.name] = {}
        gname = group.name
        done = memo.get(wire[2:])
        if done is not None:
            outcome = self.guard.check(client, proto)
            if outcome is Outcome.OK:
                # the same packet but for its ID was blocked before under this policy: same answer
                tail, qname, qtype, rcode, verdict, summary = done
                self._record(verdict.action, client, proto, qname, qtype, rcode, verdict, summary, policy.version,
                             group=gname, wire=wire)
                return wire[:2] + tail
        try:
            query = codec.decode_query_memo(wire)
        except codec.Drop:
            self.counts["dropped"] = self.counts.get("dropped", 0) + 1
            return None
        except codec.BadQuery as bad:
            if (outcome or self.guard.check(client, proto)) is not Outcome.OK:
                self._record(Action.REFUSED, client, proto, "", 0, codec.REFUSED, summary=bad.reason, group=gname)
                return codec.error_reply(bad.qid, bad.flags, codec.REFUSED, bad.question)
            action = _BAD_QUERY_ACTIONS.get(bad.rcode, Action.FORMERR)
            self._record(action, client, proto, "", 0, bad.rcode, summary=bad.reason, group=gname)
            return bad.reply()
        if outcome is None:
            outcome = self.guard.check(client, proto)
        if outcome is not Outcome.OK:
            if outcome is Outcome.LIMITED:
                self._record(Action.LIMITED, client, proto, query.qname, query.qtype, codec.NOERROR,
                             summary="TC=1", group=gname, wire=wire)
                return answer.truncated(query)
            self._record(Action.REFUSED, client, proto, query.qname, query.qtype, codec.REFUSED,
                         summary="client not allowed or over the limit", group=gname, wire=wire)
            return answer.refused(query)
        verdict = policy.decide_name(query.name, group)
        if verdict.blocked and query.qtype == codec.T_DS and verdict.rule.domain == query.name:  # type: ignore[union-attr]
            # the DS RRset of a rule's apex belongs to the parent zone: forwarded, so that a validating resolver
            # behind us can prove an unsigned blocked zone insecure and accept the sinkhole answers below it
            verdict = Verdict(Action.FORWARDED, verdict.rule)
        if verdict.blocked:
            rule = verdict.rule
            assert rule is not None
            edns = query.edns
            # the answer differs between names of one rule only in the question: build it once
            shape = (verdict.action, rule.domain, rule.category, query.qtype, query.qclass,
                     query.flags & _SHAPE_FLAGS, -1 if edns is None else edns.do,
                     query.qtype == codec.T_SOA and query.name == rule.domain)  # an apex's SOA is an answer
            tpl = self._shapes.get(shape)
            if tpl is None:
                how = self.answers if verdict.action is BLOCKED else self._canary_answers[CANARIES[rule.domain]]
                built = answer.blocked(query, rule, how, policy.version or 1)
                tpl = (built.wire[2:12], built.wire[12 + len(query.question):], built.rcode, built.summary)
                if len(self._shapes) >= codec.MEMO_MAX:
                    self._shapes.clear()
                self._shapes[shape] = tpl
            head, tail, rcode, summary = tpl
            reply = wire[:2] + head + query.question + tail
            self._record(verdict.action, client, proto, query.name, query.qtype, rcode, verdict, summary,
                         policy.version, group=gname, wire=wire)
            if len(wire) <= codec.MEMO_MAX_PACKET:
                if len(memo) >= codec.MEMO_MAX:
                    memo.clear()
                memo[wire[2:]] = (reply[2:], query.name, query.qtype, rcode, verdict, summary)
            return reply
        if query.qtype in (codec.T_AXFR, codec.T_IXFR):
            self._record(Action.REFUSED, client, proto, query.qname, query.qtype, codec.REFUSED, verdict,
                         "zone transfer", policy.version, group=gname, wire=wire)
            return answer.refused(query)
        key = key_of(query)
        ecs = b""
        if self.ecs is not None:  # Client Subnet forwarded, cut to a prefix: answers are cached per prefix
            ecs = self._client_subnet(query, client)
            key += b"\1" + bytes([len(ecs)]) + ecs
        if group is not policy.default:  # answers are inspected under the group's policy: cached per group
            key += b"\0" + gname.encode()
        hit = self.cache.get(key, query, time.monotonic())
        if hit is not None:
            if self.cache.due:
                self._prefetch(Pending(query, verdict, policy.version, key, group, ecs))
            if ecs and query.edns is not None and query.edns.ecs:
                hit = codec.with_ecs(hit, query.edns.ecs, ecs)
            if proto == "udp" and len(hit) > query.max_udp:
                hit = answer.truncated(query, hit)
            self._record(Action.CACHED, client, proto, query.qname, query.qtype, codec.header_rcode(hit), verdict,
                         None, policy.version, group=gname, wire=wire)
            return hit
        return Pending(query, verdict, policy.version, key, group, ecs)

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
        """Refresh cache entries whose hits asked for it, off the client's path (coalesced like any forward)."""
        self.cache.due.clear()
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
        token = self.shares.take(client, self.guard.network_of(client), self.forwarder.max_inflight)
        if token is None:  # this client (or its network) holds its share of the forwards: it waits, not others
            query = pending.query
            logthrottle.warning(log, "REFUSED %s %s for %s: over its share of the queries waiting for an upstream",
                                query.qname, codec.qtype_name(query.qtype), client)
            self._record(Action.REFUSED, client, proto, query.qname, query.qtype, codec.REFUSED, pending.verdict,
                         "over its share of forwards in flight", pending.version, group=pending.group.name,
                         wire=query.wire)
            return answer.refused(query)
        try:
            return await self._forward(pending, client, proto)
        finally:
            self.shares.give_back(token)

    async def _forward(self, pending: Pending, client: str, proto: str) -> bytes:
        query, verdict, version = pending.query, pending.verdict, pending.version
        started = time.perf_counter()
        try:
            shared, upstream, cloaked = await self._coalesced(pending, proto == "tcp")
        except UpstreamError as exc:
            stale = self.cache.stale(pending.key, query, time.monotonic())
            if stale is not None:  # serve-stale (RFC 8767): the last answer we had, TTL 30 s, EDE 3
                log.warning("stale answer for %s %s: %s", query.qname, codec.qtype_name(query.qtype), exc)
                if proto == "udp" and len(stale) > query.max_udp:
                    stale = answer.truncated(query, stale)
                self._record(Action.STALE, client, proto, query.qname, query.qtype, codec.header_rcode(stale),
                             verdict, None, version, None, (time.perf_counter() - started) * 1000,
                             pending.group.name, query.wire)
                return stale
            log.warning("SERVFAIL for %s %s: %s", query.qname, codec.qtype_name(query.qtype), exc)
            self._record(Action.SERVFAIL, client, proto, query.qname, query.qtype, codec.SERVFAIL, verdict,
                         None, version, None, (time.perf_counter() - started) * 1000, pending.group.name, query.wire)
            return answer.servfail(query, "no upstream answered")
        except Exception as exc:  # a bug of ours, or input nobody foresaw: this client still gets an answer
            return self.failed(query.wire, client, proto, exc)
        if cloaked is not None and cloaked.rule is not None:
            # the answer leads to a blocked name or network: the client gets the sinkhole answer instead
            built = answer.blocked(query, cloaked.rule, self.answers, version or 1)
            self._record(cloaked.action, client, proto, query.qname, query.qtype, built.rcode, cloaked,
                         built.summary, version, upstream, (time.perf_counter() - started) * 1000,
                         pending.group.name, query.wire)
            return built.wire
        reply = bytes(codec.for_client(shared, len(query.question), query))
        if pending.ecs and query.edns is not None and query.edns.ecs:
            reply = codec.with_ecs(reply, query.edns.ecs, pending.ecs)
        if proto == "udp" and len(reply) > query.max_udp:
            reply = answer.truncated(query, reply)
        self._record(Action.FORWARDED, client, proto, query.qname, query.qtype, codec.header_rcode(reply),
                     verdict, None, version, upstream, (time.perf_counter() - started) * 1000, pending.group.name,
                     query.wire)
        return reply

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
                self._record(Action.SERVFAIL, client, proto, query.qname, query.qtype, codec.SERVFAIL,
                             summary=f"internal error: {type(exc).__name__}", wire=wire)
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
            self.cache.put(pending.key, query, shared, time.monotonic())
        return shared, str(up), cloaked

    def _inspect(self, pending: Pending, reply: bytes) -> tuple[bytes, Verdict | None]:
        query = pending.query
        facts = codec.read_reply(reply, len(query.question))
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
