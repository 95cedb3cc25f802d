"""Client groups (their own categories and extra rules, most specific network wins) and /regex/ rules:
the policy alone, the store and CLI, and a real server that answers two clients differently."""

from __future__ import annotations

from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from click.testing import CliRunner

from sinkhole.cli import cli
from sinkhole.errors import ConfigError
from sinkhole.model import Action, Rule, RuleKind
from sinkhole.policy.decide import GroupSpec, Policy
from sinkhole.store.db import Store
from tests.conftest import audit_rows, wait_for

RULES = [
    Rule("chat.example", RuleKind.BLOCK, "genai", "lists/genai.txt"),
    Rule("deep.example", RuleKind.BLOCK, "deepseek", "lists/deepseek.txt"),
    Rule("ops.example", RuleKind.BLOCK, "manual", "cli"),
    Rule("lab-only.example", RuleKind.BLOCK, "group:lab", "cli"),
    Rule("help.chat.example", RuleKind.ALLOW, "group:lab", "cli"),
    Rule("/^ai[0-9]+\\.corp\\.example$/", RuleKind.BLOCK, "manual", "cli"),
    Rule("/^ai7\\./", RuleKind.ALLOW, "manual", "cli"),
    Rule("203.0.113.0/24", RuleKind.BLOCK, "deepseek", "cli"),
]
GROUPS = [GroupSpec("lab", ("10.1.0.0/16", "fd00:1::/48"), ("deepseek",)),
          GroupSpec("lab-desk", ("10.1.2.0/24",), None)]


def test_most_specific_network_picks_the_group_and_the_rest_is_default():
    p = Policy(RULES, 3, groups=GROUPS)
    assert p.group_of("10.1.9.9").name == "lab"
    assert p.group_of("10.1.2.3").name == "lab-desk"  # /24 inside the /16
    assert p.group_of("fd00:1::5").name == "lab"
    assert p.group_of("::ffff:10.1.9.9").name == "lab"  # a v4-mapped client of a dual-stack socket
    assert p.group_of("10.2.0.1").name == "default"
    assert p.group_of("not an address").name == "default"


def test_each_group_has_its_own_categories_and_extra_rules():
    p = Policy(RULES, 3, groups=GROUPS)
    lab, desk, default = p.group_of("10.1.9.9"), p.group_of("10.1.2.3"), p.default
    # lab names its categories: deepseek only (plus manual, plus its own)
    assert p.decide_name("chat.example", lab).action is Action.FORWARDED
    assert p.decide_name("deep.example", lab).action is Action.BLOCKED
    assert p.decide_name("www.lab-only.example", lab).rule.category == "group:lab"
    assert p.decide_name("ops.example", lab).action is Action.BLOCKED  # manual rules apply to every group
    # lab-desk inherits everyone's categories and has no extra rules
    assert p.decide_name("chat.example", desk).action is Action.BLOCKED
    assert p.decide_name("lab-only.example", desk).action is Action.FORWARDED
    assert p.decide_name("chat.example", default).rule.source == "lists/genai.txt"
    assert p.decide_name("lab-only.example", default).action is Action.FORWARDED
    # a group's allow rule only opens the door for that group
    assert p.decide_name("help.chat.example", default).action is Action.BLOCKED


def test_disabled_category_stays_in_force_for_a_group_that_names_it():
    p = Policy(RULES, 3, groups=GROUPS, disabled=["deepseek"])
    assert p.decide_name("deep.example", p.group_of("10.1.9.9")).action is Action.BLOCKED
    assert p.decide_name("deep.example").action is Action.FORWARDED
    assert p.decide_name("deep.example", p.group_of("10.1.2.3")).action is Action.FORWARDED  # inherits


def test_regex_rules_cover_what_suffix_rules_cannot():
    p = Policy(RULES, 3, groups=GROUPS)
    v = p.decide_name("ai42.corp.example")
    assert v.action is Action.BLOCKED and v.rule.domain == "/^ai[0-9]+\\.corp\\.example$/"
    assert p.decide_name("aix.corp.example").action is Action.FORWARDED
    assert p.decide_name("x.ai42.corp.example").action is Action.FORWARDED  # anchored
    assert p.decide_name("ai7.corp.example").rule.kind is RuleKind.ALLOW  # an allow regex beats a block regex
    # a suffix rule decides before any regex
    p2 = Policy([*RULES, Rule("corp.example", RuleKind.ALLOW, "manual")])
    assert p2.decide_name("ai42.corp.example").rule == Rule("corp.example", RuleKind.ALLOW, "manual", None)
    assert (p.blocks, p.allows) == (6, 2)


def test_ip_rules_follow_the_group_categories():
    p = Policy(RULES, 3, groups=GROUPS)
    assert p.inspect([], ["203.0.113.9"]).action is Action.IP_BLOCKED
    assert p.inspect([], ["203.0.113.9"], p.group_of("10.1.9.9")) is not None  # lab has deepseek
    p2 = Policy(RULES, 3, groups=[GroupSpec("none", ("10.9.0.0/16",), ())])
    assert p2.inspect([], ["203.0.113.9"], p2.group_of("10.9.0.1")) is None
    assert p2.inspect([("cname", "www.chat.example")], [], p2.group_of("10.9.0.1")) is None
    assert p2.inspect([("cname", "www.chat.example")], []).rule.domain == "cname:www.chat.example"


def test_store_keeps_networks_unique_and_journals_every_change(tmp_path):
    store = Store(tmp_path / "s.db")
    before = store.policy_version()
    assert store.save_group("lab", ["10.1.0.0/16"], ["deepseek"]) == (True, ["10.1.0.0/16"])
    with pytest.raises(ConfigError, match="already belongs to group lab"):
        store.save_group("other", ["10.1.0.0/16"], None)
    assert [g["name"] for g in store.groups()] == ["default", "lab"]  # nothing of `other` was written
    with pytest.raises(ConfigError, match="takes no networks"):
        store.save_group("default", ["10.9.0.0/16"], None)
    store.add_rules(RuleKind.BLOCK, ["lab-only.example"], category="group:lab")
    spec = store.group_specs()
    assert spec == [GroupSpec("lab", ("10.1.0.0/16",), ("deepseek",))]
    assert store.remove_group("lab") == ["10.1.0.0/16"]
    assert store.list_rules(category="group:lab") == []  # its extra rules went with it
    actions = [j["action"] for j in store.journal() if j["id"] > before]
    assert actions == ["group add", "block add", "group remove"]
    store.close()


def run(db: Path, *args: str):
    return CliRunner().invoke(cli, ["--db", str(db), *args])


def test_cli_errors_are_one_line_and_exit_2(db):
    for args, message in [
        (("group", "add", "lab", "--network", "10.1.0.0/33"), "invalid network '10.1.0.0/33'"),
        (("block", "add", "x.example", "--group", "nosuch"), "no group 'nosuch'"),
        (("block", "add", "x.example", "--group", "lab", "--category", "genai"), "exclude each other"),
        (("block", "add", "/[unclosed/"), "invalid regex rule '/[unclosed/'"),
        (("group", "remove", "default"), "cannot be removed"),
    ]:
        result = run(db, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
    bad_name = run(db, "group", "add", "Lab!")
    assert bad_name.exit_code == 2 and "'Lab!': use lower-case letters" in bad_name.output


def test_group_list_and_show(db):
    assert run(db, "--help").exit_code == 0
    assert run(db, "group", "add", "lab", "--network", "10.1.0.0/16", "--network", "fd00:1::/48",
               "--categories", "deepseek,doh-bypass", "--note", "ticket 7").exit_code == 0
    assert run(db, "block", "add", "--group", "lab", "lab-only.example").exit_code == 0
    listed = run(db, "group", "list", "--format", "json")
    rows = {r["name"]: r for r in map(__import__("json").loads, listed.output.splitlines())}
    assert rows["lab"]["networks"] == ["10.1.0.0/16", "fd00:1::/48"] and rows["lab"]["rules"] == 1
    assert rows["lab"]["in_force"] == ["deepseek", "doh-bypass", "manual"]
    assert rows["default"]["inherits"] is True
    shown = run(db, "group", "show", "lab")
    assert "10.1.0.0/16, fd00:1::/48" in shown.output and "block lab-only.example" in shown.output
    assert "deepseek: " in shown.output
    assert run(db, "group", "remove", "lab", "--network", "fd00:1::/48").exit_code == 0
    assert "fd00:1::/48" not in run(db, "group", "show", "lab").output


def ask_from(server, source: str, qname: str, qtype: str = "A") -> dns.message.Message:
    q = dns.message.make_query(qname, qtype, use_edns=0)
    q.id = 4242  # one ID for both clients: the per-group memo of blocked packets must not mix them up
    return dns.query.udp(q, server.host, port=server.port, source=source, timeout=5)


def addresses(reply: dns.message.Message) -> list[str]:
    return [r.to_text() for rrset in reply.answer for r in rrset if rrset.rdtype == dns.rdatatype.A]


def is_forwarded(reply: dns.message.Message) -> bool:
    got = addresses(reply)
    return bool(got) and "0.0.0.0" not in got


def test_two_clients_two_policies_over_real_sockets(make_server, stub, db):
    s = make_server(upstream=(stub.address,), shipped_lists=False, log_queries="all")
    assert run(db, "block", "add", "--category", "genai", "chat.example").exit_code == 0
    assert run(db, "group", "add", "lab", "--network", "127.0.0.2", "--categories", "none").exit_code == 0
    assert run(db, "block", "add", "--group", "lab", "lab-only.example", "target.example.test").exit_code == 0
    assert run(db, "block", "add", "/^ai[0-9]+\\.corp\\.example$/").exit_code == 0
    # the changes are in force within a second (the last one too: the server may have read the first three alone)
    assert wait_for(lambda: addresses(ask_from(s, "127.0.0.2", "lab-only.example")) == ["0.0.0.0"])
    assert wait_for(lambda: addresses(ask_from(s, "127.0.0.1", "ai1.corp.example")) == ["0.0.0.0"])
    assert addresses(ask_from(s, "127.0.0.1", "Chat.Example")) == ["0.0.0.0"]
    assert is_forwarded(ask_from(s, "127.0.0.2", "Chat.Example"))  # same packet, other group
    assert is_forwarded(ask_from(s, "127.0.0.1", "lab-only.example"))
    assert addresses(ask_from(s, "127.0.0.1", "ai12.corp.example")) == ["0.0.0.0"]
    assert addresses(ask_from(s, "127.0.0.2", "ai12.corp.example")) == ["0.0.0.0"]  # manual: everyone
    # a CNAME to a name blocked for the lab only: default gets the answer (and caches it), lab never does
    assert "target.example.test" in ask_from(s, "127.0.0.1", "cname.x.test").to_text()
    lab = ask_from(s, "127.0.0.2", "cname.x.test")
    assert addresses(lab) == ["0.0.0.0"] and not [r for r in lab.answer if r.rdtype == dns.rdatatype.CNAME]
    rows = wait_for(lambda: [r for r in audit_rows(db) if r["qname"] in ("chat.example", "cname.x.test")
                             and r["action"] != "formerr"] if len(audit_rows(db)) >= 8 else None)
    got = [(r["client"], r["grp"], r["action"], r["asked"], r["list"]) for r in rows]
    assert ("127.0.0.1", "default", "blocked", "Chat.Example", "cli") in got
    assert ("127.0.0.2", "lab", "forwarded", "Chat.Example", None) in got  # no rule decided
    assert ("127.0.0.2", "lab", "cname-blocked", "cname.x.test", "cli") in got
    regex_rows = [r for r in audit_rows(db) if r["qname"] == "ai12.corp.example"]
    assert {r["rule"] for r in regex_rows} == {"/^ai[0-9]+\\.corp\\.example$/"}
    assert dns.rcode.NOERROR == ask_from(s, "127.0.0.2", "aix.corp.example").rcode()


def test_a_secondary_zone_category_can_be_named(db):
    """A secondary's pulled zone is category `rpz:<zone>`: groups and `lists` must be able to name it."""
    result = run(db, "group", "add", "branch", "--network", "10.7.0.0/16", "--categories", "deepseek,rpz:rpz.sinkhole")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in map(__import__("json").loads,
                                      run(db, "group", "list", "--format", "json").output.splitlines())}
    assert "rpz:rpz.sinkhole" in rows["branch"]["in_force"]
    assert run(db, "lists", "disable", "rpz:rpz.sinkhole").exit_code == 2  # no such category yet: named, not refused
    assert "no category 'rpz:rpz.sinkhole'" in run(db, "lists", "disable", "rpz:rpz.sinkhole").output
    assert run(db, "group", "add", "x", "--categories", "rpz:").exit_code == 2


def test_rule_changes_patch_the_running_policy_and_others_reload_it(make_server, stub, db, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="sinkhole.service.server")
    s = make_server(upstream=(stub.address,), shipped_lists=False)
    assert run(db, "block", "add", "--category", "genai", "chat.example").exit_code == 0
    assert wait_for(lambda: addresses(ask_from(s, "127.0.0.1", "chat.example")) == ["0.0.0.0"])
    assert run(db, "block", "add", "more.chat.example", "other.example").exit_code == 0
    assert wait_for(lambda: addresses(ask_from(s, "127.0.0.1", "other.example")) == ["0.0.0.0"])
    assert run(db, "block", "remove", "other.example").exit_code == 0
    assert wait_for(lambda: is_forwarded(ask_from(s, "127.0.0.1", "other.example")))
    messages = [r.getMessage() for r in caplog.records if "policy version" in r.getMessage()]
    assert sum("patched" in m for m in messages) >= 2, messages  # add and remove of names in known categories
    assert s.server.policy.blocks == 2
    assert run(db, "lists", "disable", "genai").exit_code == 0  # not a named-rule change: read whole
    assert wait_for(lambda: is_forwarded(ask_from(s, "127.0.0.1", "chat.example")))
    assert "loaded" in [r.getMessage() for r in caplog.records if "policy version" in r.getMessage()][-1]
