"""The decision for one name: pure, over a policy snapshot."""

from __future__ import annotations

from sinkhole.model import Action, Rule, RuleKind
from sinkhole.policy import Policy


def labels(name: str) -> tuple[str, ...]:
    return tuple(name.split("."))


def test_most_specific_rule_wins_and_allow_wins_ties():
    p = Policy([
        Rule("deepseek.com", RuleKind.BLOCK, "deepseek"),
        Rule("status.deepseek.com", RuleKind.ALLOW, "manual"),
        Rule("x.status.deepseek.com", RuleKind.BLOCK, "manual"),
        Rule("tie.example", RuleKind.BLOCK, "a"),
        Rule("tie.example", RuleKind.ALLOW, "b"),
        Rule("tie2.example", RuleKind.ALLOW, "b"),
        Rule("tie2.example", RuleKind.BLOCK, "a"),
    ], version=7)
    assert p.decide_labels(labels("chat.deepseek.com")).action is Action.BLOCKED
    assert p.decide_labels(labels("status.deepseek.com")).action is Action.FORWARDED
    assert p.decide_labels(labels("a.status.deepseek.com")).rule.kind is RuleKind.ALLOW
    assert p.decide_labels(labels("y.x.status.deepseek.com")).action is Action.BLOCKED
    for name in ("tie.example", "www.tie.example", "tie2.example"):
        v = p.decide_labels(labels(name))
        assert v.action is Action.FORWARDED and v.rule.kind is RuleKind.ALLOW, name
    assert p.decide_labels(labels("example.org")).rule is None
    assert (p.version, p.blocks, p.allows) == (7, 4, 3)


def test_first_category_of_a_name_is_reported():
    p = Policy([Rule("chatgpt.com", RuleKind.BLOCK, "genai"), Rule("chatgpt.com", RuleKind.BLOCK, "manual")])
    assert p.decide_labels(labels("chatgpt.com")).rule.category == "genai"


def test_escaped_labels_never_match():
    p = Policy([Rule("deepseek.com", RuleKind.BLOCK, "deepseek")])
    # a single label holding "deepseek.com" reaches the policy escaped, so it cannot match
    assert not p.decide_labels(("deepseek\\046com",)).blocked
