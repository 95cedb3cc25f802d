"""The decision for one name: pure, over a policy snapshot."""

from __future__ import annotations

from sinkhole.model import Action, Rule, RuleKind
from sinkhole.policy.decide import GroupSpec, Policy


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


def test_a_patched_policy_equals_one_built_whole():
    """A running server applies `block add` / `remove` by patching its policy: the result must decide every
    name as a policy read whole from the same rules would."""
    base = [("deepseek.com", "block", "deepseek", "lists/deepseek.txt"), ("x.example", "block", "manual", "cli"),
            ("ok.deepseek.com", "allow", "manual", "cli"), ("lab.example", "block", "group:lab", "cli")]
    groups = [GroupSpec("lab", ("10.1.0.0/16",), ("deepseek",))]
    p = Policy(base, 3, groups=groups)
    # add y.example (manual), remove x.example, add an allow next to a block, give deepseek.com a second entry
    after = [r for r in base if r[0] != "x.example"] + [
        ("y.example", "block", "manual", "cli"), ("lab.example", "allow", "manual", "cli"),
        ("deepseek.com", "block", "manual", "cli")]
    touched = {"x.example", "y.example", "lab.example", "deepseek.com"}
    patched = p.patched(touched, [r for r in after if r[0] in touched], 9)
    whole = Policy(after, 9, groups=groups)
    assert patched is not None and patched.version == 9
    assert (patched.blocks, patched.allows) == (whole.blocks, whole.allows)
    for name in ("deepseek.com", "chat.deepseek.com", "ok.deepseek.com", "x.example", "y.example", "a.y.example",
                 "lab.example", "none.example"):
        for client in ("10.1.2.3", "192.0.2.1"):
            assert patched.decide_name(name, patched.group_of(client)) == whole.decide_name(
                name, whole.group_of(client)), (name, client)
    assert p.decide_name("x.example").blocked and not p.decide_name("y.example").blocked  # the old one is untouched
    # a category this policy has no rules in, a regex or a network: read whole instead
    assert p.patched({"z.example"}, [("z.example", "block", "newcat", "cli")], 10) is None
    assert p.patched({"/^a/"}, [("/^a/", "block", "manual", "cli")], 10) is None


def test_a_stored_empty_regex_or_bad_network_is_left_out_not_fatal(caplog):
    """`//` and `x/y` can only reach the database by hand (lists and the CLI refuse them): the policy still
    loads, blocks nothing more for them (an empty pattern would match every name), and says what it left out."""
    with caplog.at_level("WARNING", logger="sinkhole.policy.decide"):
        p = Policy([("//", "block", "manual"), ("x/y", "block", "manual"), ("/^chat\\./", "block", "manual"),
                    ("deepseek.com", "block", "manual")], version=2)
    assert p.decide_name("chat.example").action is Action.BLOCKED  # the good regex still works
    assert p.decide_name("www.example").action is Action.FORWARDED  # `//` did not block everything
    assert p.decide_name("deepseek.com").action is Action.BLOCKED
    assert p.blocks == 2
    left_out = [r.getMessage() for r in caplog.records]
    assert any("// " in m and "empty pattern" in m for m in left_out)
    assert any("x/y" in m for m in left_out)


def test_nat64_and_mapped_ipv6_addresses_are_checked_against_ipv4_networks():
    from sinkhole.model import Action
    from sinkhole.policy.decide import Policy

    policy = Policy([("203.0.113.0/24", "block", "test")])
    for address in ("::ffff:203.0.113.7", "64:ff9b::203.0.113.7", "64:ff9b::cb00:7107"):
        verdict = policy.inspect([], [address])
        assert verdict is not None and verdict.action is Action.IP_BLOCKED, address
        assert verdict.rule.domain == "ip:203.0.113.7 in 203.0.113.0/24"
    packed = bytes.fromhex("0064ff9b0000000000000000cb007107")  # as the codec hands them over
    assert policy.inspect([], [packed]) is not None
    # outside the /96 (the local-use 64:ff9b:1::/48 of RFC 8215 too), and other IPv4 networks: not blocked
    for address in ("64:ff9b:1::cb00:7107", "64:ff9c::203.0.113.7", "64:ff9b::198.51.100.7", "2001:db8::cb00:7107"):
        assert policy.inspect([], [address]) is None, address
