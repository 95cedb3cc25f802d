"""The fast path's Blocker answers exactly as Pipeline.begin does, or leaves the packet to it.

Differential: every packet goes through the real Pipeline (today's slow path) and through a Blocker made by
sinkhole.dns.shortcut, for the compiled module and its pure twin. Where the Blocker answers, the reply must be
the pipeline's byte for byte, and the audit row it stands for must say what the pipeline's AuditEvent says.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import dns.edns
import dns.message
import dns.rdataclass
import pytest

from sinkhole.dns import _fastpure, codec, shortcut
from sinkhole.dns.pipeline import Pending, Pipeline
from sinkhole.dns.upstream import Forwarder, Upstream
from sinkhole.model import Action, AuditEvent, RuleKind
from sinkhole.policy.decide import GroupSpec, Policy
from sinkhole.service import build

RULES = [
    ("deepseek.com", RuleKind.BLOCK.value, "deepseek", "deepseek.txt"),
    ("ok.deepseek.com", RuleKind.ALLOW.value, "manual", "cli"),
    ("chatgpt.com", RuleKind.BLOCK.value, "genai", "genai.txt"),
    ("claude.ai", RuleKind.BLOCK.value, "genai", None),
    ("lab-only.example", RuleKind.BLOCK.value, "group:lab", "cli"),
    ("/^regex-blocked\\./", RuleKind.BLOCK.value, "manual", "cli"),
]
GROUPS = [GroupSpec("lab", ("10.1.0.0/16",), ("deepseek",))]


def _impls() -> list:
    out = [pytest.param(_fastpure, id="pure")]
    try:
        out.append(pytest.param(importlib.import_module("sinkhole.dns._fast"), id="compiled"))
    except ImportError:
        pass
    return out


class Recorder:
    """The audit log as the pipeline sees it (wanted, submit): keeps the events."""

    wanted = frozenset(Action)

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def submit(self, event: AuditEvent, count: int = 1) -> None:
        self.events.append(event)


def packet(name: str, qtype: str = "A", qid: int = 0x1234, edns: int | None = None, do: bool = False,
           rd: bool = True, cd: bool = False, rdclass: str = "IN", options: list | None = None) -> bytes:
    q = dns.message.make_query(name, qtype, rdclass=dns.rdataclass.from_text(rdclass), use_edns=edns,
                               want_dnssec=do, options=options)
    q.id = qid
    if not rd:
        q.flags &= ~dns.flags.RD
    if cd:
        q.flags |= dns.flags.CD
    return q.to_wire()


BLOCKED = [
    packet("deepseek.com"), packet("chat.deepseek.com", "AAAA"), packet("api.chat.deepseek.com", "MX"),
    packet("chat.deepseek.com", "TXT", edns=0), packet("chat.deepseek.com", "A", edns=0, do=True),
    packet("chat.deepseek.com", "HTTPS", rd=False), packet("chat.deepseek.com", "A", cd=True, edns=0),
    packet("ChAt.DeepSeek.COM", "A"), packet("x_y-z.chatgpt.com", "NS"), packet("claude.ai", "AAAA", edns=0),
    packet("a.b.c.d.e.f.claude.ai", "CNAME"), packet("deep.ok.deepseek.com.deepseek.com"),
]
LEFT = [
    packet("ok.deepseek.com"), packet("www.ok.deepseek.com", "AAAA"),  # allowed
    packet("example.org"), packet("regex-blocked.example"),  # not covered by a suffix rule
    packet("use-application-dns.net"), packet("mask.icloud.com", "AAAA"),  # canaries
    packet("deepseek.com", "SOA"), packet("deepseek.com", "DS"), packet("deepseek.com", "ANY"),
    packet("chat.deepseek.com", "A", rdclass="CH"),
    packet("chat.deepseek.com", "A", edns=0, options=[dns.edns.GenericOption(10, b"12345678")]),  # a cookie
    packet("chat.deepseek.com", "A", edns=1),  # BADVERS
    bytes.fromhex("1234010000010000000000000361206204646565700000010001"),  # a label with a space
    packet("chat.deepseek.com")[:-2],  # cut short
    packet("chat.deepseek.com") + b"\0",  # a byte after the question
    bytes.fromhex("12348100000100000000000004636861740000010001"),  # a response
]


@pytest.fixture
def setup() -> tuple[Pipeline, Policy, Recorder]:
    cfg = build.load(env={}, flags={"upstream": ("127.0.0.1:9",), "rate_limit": 0, "rate_limit_net": 0})
    policy = Policy(RULES, version=7, groups=GROUPS)
    audit = Recorder()
    pipeline = Pipeline(lambda: policy, Forwarder([Upstream("127.0.0.1", 9)]), audit, build.answers(cfg),  # type: ignore[arg-type]
                        build.guard(cfg), build.cache(cfg))
    return pipeline, policy, audit


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("client", ["127.0.0.1", "10.1.2.3"])
def test_the_blocker_answers_as_the_pipeline_or_not_at_all(impl: ModuleType, client: str,
                                                           setup: tuple[Pipeline, Policy, Recorder]) -> None:
    pipeline, policy, audit = setup
    group = policy.group_of(client)
    table = impl.Table()
    tags = shortcut.Tags()
    blocker = shortcut.blocker(table, policy, group, pipeline.answers, True, tags)
    answered = 0
    known: dict[int, tuple] = {}
    for wire in BLOCKED + LEFT:
        fast_reply = blocker.answer(wire)
        slow = pipeline.begin(wire, client, "udp")
        if fast_reply is None:
            continue
        answered += 1
        assert fast_reply == slow, dns.message.from_wire(wire).question
        event = audit.events[-1]
        entry = table.lookup(wire[2:], 0.0)
        assert entry is not None and entry.tail == slow[2:]  # type: ignore[index]
        # counted under the key Pipeline.detail counts the same answer by (what /metrics shows)
        assert entry.kind == ("blocked", event.qtype, "udp", group.name) and entry.kind in pipeline.detail
        known.update(tags.take_new())
        description = dict(zip(shortcut.DESCRIPTION, known[entry.tag], strict=True))
        assert description == {
            "qname": event.qname, "qtype": event.qtype, "action": event.action, "rule": event.rule,
            "category": event.category, "rcode": event.rcode, "answer": event.answer,
            "policy_version": event.policy_version, "group": event.group, "source": event.source,
            "asked": codec.asked_name(event.wire)}  # type: ignore[arg-type]
    for wire in LEFT:
        assert blocker.answer(wire) is None
    if group is policy.default:
        assert answered == len(BLOCKED)
    else:  # the lab group has only the deepseek category (and its own): genai's names are forwarded for it
        assert answered == sum(b"deepseek" in w.lower() for w in BLOCKED)
        assert blocker.answer(packet("lab-only.example")) is not None
        assert isinstance(pipeline.begin(packet("chatgpt.com"), client, "udp"), Pending)


@pytest.mark.parametrize("impl", _impls())
def test_a_shape_is_made_once_and_serves_every_name_of_its_rule(impl: ModuleType,
                                                                setup: tuple[Pipeline, Policy, Recorder]) -> None:
    pipeline, policy, _ = setup
    made: list[str] = []
    table = impl.Table()
    b = shortcut.blocker(table, policy, policy.default, pipeline.answers, False, shortcut.Tags())
    template = b.template
    b.template = lambda wire, domain, entry: (made.append(domain), template(wire, domain, entry))[1]
    for i in range(100):
        assert b.answer(packet(f"n{i}.chat.deepseek.com", qid=i)) is not None
    assert made == ["deepseek.com"] and len(table) == 100 and b.answered == 100
    entry = table.lookup(packet("n5.chat.deepseek.com")[2:], 0.0)
    assert entry.tag is None  # audit off
