"""The one place the order of a query's stages is written.

    decode -> guard -> policy.decide -+- blocked --> answer.blocked ---------------------------+
                                      +- forward --> cache.get -- miss --> upstream.forward ---+--> reply
                                                        (hit) ----------------------------------+
                                                     audit.submit (non-blocking) <--------------+

`begin` runs every stage that needs no I/O and returns the reply bytes, None (drop), or
a Pending forward; `forward` finishes those. Listeners call `begin` inline and only
schedule a task for forwards, so a blocked name or a cache hit never costs a task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sinkhole import answer, codec
from sinkhole.audit import AuditLog
from sinkhole.cache import Cache, key_of
from sinkhole.errors import UpstreamError
from sinkhole.guard import Guard, Outcome
from sinkhole.model import Action, AuditEvent, Query, Verdict
from sinkhole.policy import CANARIES, Group, Policy
from sinkhole.upstream import Forwarder

log = logging.getLogger(__name__)
BLOCKED = Action.BLOCKED
_BAD_QUERY_ACTIONS = {codec.NOTIMP: Action.NOTIMP, codec.NOTAUTH: Action.NOTAUTH}
_SHAPE_FLAGS = codec.OPCODE_MASK | codec.RD | codec.CD


@dataclass(frozen=True, slots=True)
class Pending:
    """A query that passed the policy and must go upstream."""

    query: Query
    verdict: Verdict
    version: int
    key: bytes
    group: Group


class Pipeline:
    def __init__(self, get_policy: Callable[[], Policy], forwarder: Forwarder, audit: AuditLog,
                 answers: answer.AnswerConfig, guard: Guard | None = None, cache: Cache | None = None) -> None:
        self.guard = guard or Guard()
        self._canary_answers = {
            "nxdomain": answer.AnswerConfig(mode="nxdomain", ttl=answers.ttl),
            "nodata": answer.AnswerConfig(mode="sinkhole", a=None, aaaa=None, ttl=answers.ttl),
        }
        self.cache = cache if cache is not None else Cache()
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
        # (action, qtype, transport, group) -> queries: read by sinkhole.metrics at scrape time
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
        if query.qtype == codec.T_ANY:
            self._record(Action.LOCAL, client, proto, query.qname, query.qtype, codec.NOERROR, verdict,
                         "RFC 8482 HINFO", policy.version, group=gname, wire=wire)
            return answer.minimal_any(query)
        key = key_of(query)
        if group is not policy.default:  # answers are inspected under the group's policy: cached per group
            key += b"\0" + gname.encode()
        hit = self.cache.get(key, query, time.monotonic())
        if hit is not None:
            if self.cache.due:
                self._prefetch(Pending(query, verdict, policy.version, key, group))
            if proto == "udp" and len(hit) > query.max_udp:
                hit = answer.truncated(query, hit)
            self._record(Action.CACHED, client, proto, query.qname, query.qtype, codec.header_rcode(hit), verdict,
                         None, policy.version, group=gname, wire=wire)
            return hit
        return Pending(query, verdict, policy.version, key, group)

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
        query, verdict, version = pending.query, pending.verdict, pending.version
        started = time.perf_counter()
        try:
            reply, upstream, cloaked = await self._coalesced(pending, proto == "tcp")
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
        if cloaked is not None and cloaked.rule is not None:
            # the answer leads to a blocked name or network: the client gets the sinkhole answer instead
            built = answer.blocked(query, cloaked.rule, self.answers, version or 1)
            self._record(cloaked.action, client, proto, query.qname, query.qtype, built.rcode, cloaked,
                         built.summary, version, upstream, (time.perf_counter() - started) * 1000,
                         pending.group.name, query.wire)
            return built.wire
        if proto == "udp" and len(reply) > query.max_udp:
            reply = answer.truncated(query, reply)  # an upstream that ignored the buffer size
        self._record(Action.FORWARDED, client, proto, query.qname, query.qtype, codec.header_rcode(reply),
                     verdict, None, version, upstream, (time.perf_counter() - started) * 1000, pending.group.name,
                     query.wire)
        return reply

    async def _coalesced(self, pending: Pending, client_tcp: bool) -> tuple[bytes, str, Verdict | None]:
        """One upstream query for identical questions in flight at once; each client gets its own ID and case.

        The reply is inspected before it is cached: one that leads to a blocked name is never cached."""
        query, key = pending.query, pending.key
        if not client_tcp:
            running = self._inflight.get(key)
            if running is not None:
                wire, upstream, cloaked = await asyncio.shield(running)
                out = bytearray(wire)
                out[0:2] = query.wire[0:2]
                out[12:12 + len(query.question)] = query.question
                return bytes(out), upstream, cloaked
        future: asyncio.Future[tuple[bytes, str, Verdict | None]] = asyncio.get_running_loop().create_future()
        if not client_tcp:
            self._inflight[key] = future
        try:
            reply, up = await self.forwarder.forward(query, client_tcp=client_tcp)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        else:
            cloaked = None
            policy = self.get_policy()
            if reply[7] | reply[6] and codec.may_redirect(reply, len(query.question), bool(policy.ip_rules)):
                cloaked = policy.inspect(*codec.answer_facts(reply), pending.group)
            future.set_result((reply, str(up), cloaked))
            if cloaked is None:
                self.cache.put(key, query, reply, time.monotonic())
            return reply, str(up), cloaked
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    async def handle(self, wire: bytes, client: str, proto: str) -> bytes | None:
        """Both halves in one call, for callers that are already in a task."""
        result = self.begin(wire, client, proto)
        if isinstance(result, Pending):
            return await self.forward(result, client, proto)
        return result
