"""`sinkhole check`: what the policy in force does with one question, and why, without sending anything."""

from __future__ import annotations

import dns.message
import dns.rdatatype

from sinkhole.audit.writer import AuditLog
from sinkhole.dns.pipeline import Pending, Pipeline
from sinkhole.dns.upstream import Forwarder, Upstream
from sinkhole.model import Outcome
from sinkhole.service import build
from sinkhole.service.config import Settings
from sinkhole.store.db import Store


class _Explaining(Pipeline):
    """The pipeline, keeping the Outcome of the one query instead of counting and auditing it."""

    outcome: Outcome | None = None

    def _done(self, outcome: Outcome, reply: bytes, client: str, proto: str, wire: bytes | None) -> bytes:
        self.outcome = outcome
        return reply


def explain(store: Store, cfg: Settings, name: str, qtype: str = "A", client: str = "127.0.0.1") -> dict:
    """The decision for `name` as a server with `cfg` would take it for `client`: the rule, its list and
    source note, and the exact answer (presentation form) when it is answered here. Nothing is sent:
    a name that would be forwarded is only said to be."""
    policy = store.load_policy(cfg.policy.bypass_canaries)
    # the pipeline serve builds, but with nobody to forward to and an audit log that keeps nothing: nothing is sent
    pipeline = build.pipeline(cfg, lambda: policy, Forwarder([Upstream("127.0.0.1", 9)], cfg.upstreams.timeout),
                              AuditLog(store.path, cfg.audit.node, "none"), kind=_Explaining)
    assert isinstance(pipeline, _Explaining)
    wire = dns.message.make_query(name, dns.rdatatype.from_text(qtype), use_edns=0).to_wire()
    group = policy.group_of(client)
    result = pipeline.begin(wire, client, "udp")
    verdict = None
    if isinstance(result, Pending):
        decision, verdict = "forwarded", result.verdict
        shown = ("asked of the upstreams; an answer that leads to a blocked name or network is "
                 "sinkholed instead (cname-blocked, ip-blocked)")
    elif pipeline.outcome is not None:
        decision, verdict = pipeline.outcome.action.value, pipeline.outcome.verdict
        shown = dns.message.from_wire(result).to_text() if result else "(no answer: dropped)"
    else:
        decision, shown = "dropped", "(no answer: dropped)"
    rule = verdict.rule if verdict is not None and decision in ("blocked", "canary", "forwarded") else None
    source = note = None
    if rule is not None:
        source, note = store.rule_note(rule.domain, rule.kind, rule.category) or (None, None)
    page = None
    if decision == "blocked" and cfg.blockpage.blockpage_listen:
        answers = build.answers(cfg)
        at = [str(a) for a in (answers.a, answers.aaaa) if a is not None]
        page = f"https://{name}/ and http://{name}/ show the block page at {' and '.join(at)}" if at else None
    return {
        "name": name, "qtype": qtype.upper(), "client": client, "group": group.name, "decision": decision,
        "rule": rule.domain if rule else None, "kind": rule.kind.value if rule else None,
        "category": rule.category if rule else None, "list": source, "source": note,
        "policy_version": policy.version, "blockpage": page, "answer": shown,
    }
