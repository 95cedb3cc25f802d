"""The policy as an RPZ zone: `export rpz`, a primary served over real loopback sockets (SOA, AXFR, IXFR,
NOTIFY, ACL, TSIG), and a sinkhole secondary pulling from a sinkhole primary."""

from __future__ import annotations

import base64
import socket
import threading
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import dns.serial
import dns.tsig
import dns.tsigkeyring
import dns.versioned
import dns.xfr
import dns.zone
import pytest
from click.testing import CliRunner

from sinkhole.cli import cli
from sinkhole.errors import ConfigError
from sinkhole.fleet import zone as rpz
from sinkhole.model import RuleKind
from sinkhole.policy import lists
from sinkhole.service.build import load
from sinkhole.store.db import Store
from tests.conftest import ask, free_ports, wait_for

ZONE = "rpz.sinkhole."
SECRET = base64.b64encode(b"sixteen byte key, and then some").decode()
TSIG = f"xfr-key:hmac-sha256:{SECRET}"


def run(db: Path, *args: str, env: dict | None = None):
    return CliRunner().invoke(cli, ["--db", str(db), *args], env=env or {}, catch_exceptions=False)


def seeded(db: Path) -> Path:
    store = Store(db)
    store.add_rules(RuleKind.BLOCK, ["deepseek.com", "chat.example-ai.test", "203.0.113.0/24", "2001:db8::/48",
                                     r"/^chat[0-9]+\.x\.test$/"], category="test")
    store.add_rules(RuleKind.ALLOW, ["status.deepseek.com"], category="test")
    store.close()
    return db


def records(zone: dns.zone.Zone) -> dict[str, set[str]]:
    """Owner (relative) -> {"TYPE rdata", ...} for every node below the apex."""
    out: dict[str, set[str]] = {}
    for name, node in zone.nodes.items():
        if name == dns.name.empty:
            continue
        for rdataset in node:
            for rdata in rdataset:
                out.setdefault(name.to_text(), set()).add(f"{dns.rdatatype.to_text(rdataset.rdtype)} {rdata}")
    return out


def rpz_port(server) -> int:
    return server.server.rpz.endpoint.port


def soa_serial(port: int, keyring: object = None) -> int:
    q = dns.message.make_query(ZONE, "SOA")
    if keyring is not None:
        q.use_tsig(keyring)
    r = dns.query.udp(q, "127.0.0.1", port=port, timeout=3)
    assert r.rcode() == dns.rcode.NOERROR
    return r.answer[0][0].serial


def axfr(port: int, **kw: object) -> dns.zone.Zone:
    return dns.zone.from_xfr(dns.query.xfr("127.0.0.1", ZONE, port=port, timeout=5, **kw))


# ---------------------------------------------------------------------------- export


def test_export_is_a_zone_dnspython_reads_with_every_rule(db):
    seeded(db)
    result = run(db, "export", "rpz", "--group", "default", env={"SINKHOLE_SHIPPED_LISTS": "false"})
    assert result.exit_code == 0, result.output
    zone = dns.zone.from_text(result.stdout, origin=ZONE, relativize=True)
    soa = zone.get_rdataset("@", "SOA")[0]
    assert soa.serial == Store(db).policy_version()
    got = records(zone)
    for name in ("deepseek.com", "*.deepseek.com", "chat.example-ai.test", "*.chat.example-ai.test"):
        assert got[name] == {"A 0.0.0.0", "AAAA ::"}, name
    assert got["status.deepseek.com"] == got["*.status.deepseek.com"] == {"CNAME rpz-passthru."}
    assert got["24.0.113.0.203.rpz-ip"] == {"A 0.0.0.0", "AAAA ::"}
    assert got["48.zz.db8.2001.rpz-ip"] == {"A 0.0.0.0", "AAAA ::"}
    assert not any("chat" in n and "x" in n.split(".") for n in got), "a regex has no RPZ form"
    assert "; left out: /^chat[0-9]+\\.x\\.test$/" in result.stdout
    assert "left out of the zone: /^chat[0-9]+\\.x\\.test$/" in result.stderr


@pytest.mark.parametrize(("env", "action"), [
    ({"SINKHOLE_MODE": "nxdomain"}, {"CNAME ."}),
    ({"SINKHOLE_BLOCK_A": "none", "SINKHOLE_BLOCK_AAAA": "none"}, {"CNAME *."}),
    ({"SINKHOLE_BLOCK_A": "192.0.2.80", "SINKHOLE_BLOCK_AAAA": "none"}, {"A 192.0.2.80"}),
])
def test_export_action_follows_the_configured_answers(db, env, action):
    seeded(db)
    result = run(db, "export", "rpz", env=env)
    assert result.exit_code == 0, result.output
    got = records(dns.zone.from_text(result.stdout, origin=ZONE))
    assert got["deepseek.com"] == got["*.deepseek.com"] == action
    assert got["status.deepseek.com"] == {"CNAME rpz-passthru."}


def test_export_read_back_by_the_rpz_list_parser_gives_the_same_rules(db):
    seeded(db)
    text = run(db, "export", "rpz").stdout
    parsed = lists.parse(text, "export.rpz", "rpz")
    store = Store(db)
    blocks = {r["domain"] for r in store.list_rules(RuleKind.BLOCK) if not lists.is_regex(r["domain"])}
    allows = {r["domain"] for r in store.list_rules(RuleKind.ALLOW)}
    store.close()
    assert {d for d, _ in parsed.entries} == blocks
    assert {d for d, _ in parsed.allows} == allows


def test_export_for_a_group_holds_its_extra_rules_and_its_categories_only(db):
    seeded(db)
    assert run(db, "group", "add", "defence", "--network", "10.20.0.0/16", "--categories", "none").exit_code == 0
    assert run(db, "block", "add", "--group", "defence", "notebooklm.google.com").exit_code == 0
    assert run(db, "block", "add", "everyone.example").exit_code == 0  # manual: in force for every group
    defence = records(dns.zone.from_text(run(db, "export", "rpz", "--group", "defence").stdout, origin=ZONE))
    default = records(dns.zone.from_text(run(db, "export", "rpz").stdout, origin=ZONE))
    assert "notebooklm.google.com" in defence and "notebooklm.google.com" not in default
    assert "everyone.example" in defence and "everyone.example" in default
    assert "deepseek.com" in default and "deepseek.com" not in defence  # category test is not defence's


def test_export_for_an_unknown_group_is_a_usage_error(db):
    seeded(db)
    result = run(db, "export", "rpz", "--group", "nosuch")
    assert result.exit_code == 2
    assert "no group 'nosuch'" in result.stderr


def test_rpz_ip_labels():
    assert rpz.rpz_ip_labels("192.0.2.1/32") == "32.1.2.0.192"
    assert rpz.rpz_ip_labels("2001:db8::/32") == "32.zz.db8.2001"
    assert rpz.rpz_ip_labels("::1/128") == "128.1.zz"
    assert rpz.rpz_ip_labels("2001:db8:1:2:3:4:5:6/128") == "128.6.5.4.3.2.1.db8.2001"


@pytest.mark.parametrize(("key", "value", "says"), [
    ("rpz_listen", "localhost:53", "not an IP address"),
    ("rpz_tsig", "key:hmac-sha256", "NAME:ALGORITHM:BASE64SECRET"),
    ("rpz_tsig", "key:rot13:c2VjcmV0", "algorithm"),
    ("rpz_secondaries", "10.0.0.0/33", "rpz_secondaries"),
    ("rpz_notify", "127.0.0.1:53", "needs rpz_listen"),
    ("rpz_refresh", "0", "rpz_refresh"),
    ("rpz_zone", ".", "root"),
])
def test_bad_rpz_settings_are_refused(key, value, says):
    with pytest.raises(ConfigError, match=says):
        load(env={f"SINKHOLE_{key.upper()}": value})


# ---------------------------------------------------------------------------- primary


@pytest.fixture
def primary(make_server, stub, db):
    def start(**settings: object):
        seeded(db)
        return make_server(upstream=(stub.address,), shipped_lists=False, rpz_listen="127.0.0.1:0", **settings)
    return start


def test_axfr_from_an_allowed_address_holds_the_policy(primary, db):
    server = primary()
    zone = axfr(rpz_port(server))
    got = records(zone)
    assert got["*.deepseek.com"] == {"A 0.0.0.0", "AAAA ::"}
    assert got["status.deepseek.com"] == {"CNAME rpz-passthru."}
    assert zone.get_rdataset("@", "SOA")[0].serial == soa_serial(rpz_port(server))


def test_axfr_from_an_address_not_listed_is_refused(primary):
    server = primary(rpz_secondaries=("10.0.0.0/8",))
    with pytest.raises((EOFError, ConnectionError)):  # over TCP: closed as accepted (tests/fleet/test_rpz_abuse.py)
        axfr(rpz_port(server))
    q = dns.message.make_query(ZONE, "AXFR")
    r = dns.query.udp(q, "127.0.0.1", port=rpz_port(server), timeout=3)
    assert r.rcode() == dns.rcode.REFUSED


def test_tsig_good_key_transfers_and_no_key_or_bad_key_does_not(primary):
    server = primary(rpz_tsig=TSIG)
    port = rpz_port(server)
    good = dns.tsigkeyring.from_text({"xfr-key": ("hmac-sha256", SECRET)})
    zone = axfr(port, keyring=good, keyname="xfr-key", keyalgorithm="hmac-sha256")
    assert "deepseek.com" in records(zone)
    with pytest.raises(dns.xfr.TransferError, match="REFUSED"):
        axfr(port)  # unsigned
    bad = dns.tsigkeyring.from_text({"xfr-key": ("hmac-sha256", base64.b64encode(b"another secret!!").decode())})
    with pytest.raises(dns.exception.DNSException):
        axfr(port, keyring=bad, keyname="xfr-key", keyalgorithm="hmac-sha256")


def test_large_zone_comes_in_several_messages_that_add_up(primary, db):
    store = Store(db)
    store.add_rules(RuleKind.BLOCK, [f"host{i}.bulk.test" for i in range(3000)], category="bulk")
    store.close()
    server = primary(rpz_tsig=TSIG)
    key = dns.tsigkeyring.from_text({"xfr-key": ("hmac-sha256", SECRET)})
    q = dns.message.make_query(ZONE, "AXFR")
    q.use_tsig(key, keyname="xfr-key", algorithm="hmac-sha256")
    messages = list(dns.query.xfr("127.0.0.1", ZONE, port=rpz_port(server), keyring=key, keyname="xfr-key",
                                  keyalgorithm="hmac-sha256", timeout=5))
    assert len(messages) > 1, "every message is signed in sequence and under 64 KiB"
    zone = dns.zone.from_xfr(iter(messages))
    assert len([n for n in records(zone) if n.endswith("bulk.test")]) == 6000


def test_serial_goes_up_after_block_add_and_ixfr_sends_the_difference(primary, db):
    server = primary()
    port = rpz_port(server)
    before = soa_serial(port)
    held = dns.versioned.Zone(ZONE)
    dns.query.inbound_xfr("127.0.0.1", held, port=port, timeout=5)
    assert run(db, "block", "add", "new-ai.test").exit_code == 0
    after = wait_for(lambda: (s := soa_serial(port)) != before and s)
    assert after and dns.serial.Serial(after) > before
    answer = [rr for m in dns.query.xfr("127.0.0.1", ZONE, rdtype=dns.rdatatype.IXFR, serial=before, port=port,
                                        timeout=5) for rr in m.answer]
    owners = [rr.name.to_text() for rr in answer if rr.rdtype != dns.rdatatype.SOA]
    assert sorted(set(owners)) == ["*.new-ai.test", "new-ai.test"], "only the difference"
    query, _ = dns.xfr.make_query(held)
    dns.query.inbound_xfr("127.0.0.1", held, query, port=port, timeout=5)
    assert held.get_rdataset("@", "SOA")[0].serial == after
    assert "new-ai.test" in records(held) and "deepseek.com" in records(held)
    assert run(db, "block", "remove", "new-ai.test").exit_code == 0
    wait_for(lambda: soa_serial(port) != after)
    query, _ = dns.xfr.make_query(held)
    dns.query.inbound_xfr("127.0.0.1", held, query, port=port, timeout=5)
    assert "new-ai.test" not in records(held) and "deepseek.com" in records(held)


def test_notify_reaches_a_listener_after_a_change(primary, db):
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(5)
    server = primary(rpz_notify=(f"127.0.0.1:{listener.getsockname()[1]}",))
    serial = soa_serial(rpz_port(server))
    got: list[dns.message.Message] = []

    def receive() -> None:
        wire, peer = listener.recvfrom(65535)
        message = dns.message.from_wire(wire)
        got.append(message)
        listener.sendto(dns.message.make_response(message).to_wire(), peer)

    t = threading.Thread(target=receive)
    t.start()
    try:
        assert run(db, "block", "add", "notified.test").exit_code == 0
        t.join(10)
    finally:
        listener.close()
    assert got, "no NOTIFY within 10 s of the change"
    notify = got[0]
    assert notify.opcode() == dns.opcode.NOTIFY
    assert notify.question[0].name.to_text() == ZONE and notify.question[0].rdtype == dns.rdatatype.SOA
    assert notify.answer[0][0].serial > serial


def test_other_names_and_garbage_get_no_zone(primary):
    server = primary()
    port = rpz_port(server)
    r = dns.query.udp(dns.message.make_query("deepseek.com", "A"), "127.0.0.1", port=port, timeout=3)
    assert r.rcode() == dns.rcode.REFUSED
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(b"\x12\x34\x01\x00\x00\x01garbage", ("127.0.0.1", port))
        reply = s.recv(512)
    assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == dns.rcode.FORMERR
    assert soa_serial(port) >= 1, "still serving"


# ---------------------------------------------------------------------------- secondary


def test_secondary_applies_the_zone_blocks_new_names_and_keeps_its_policy_without_primary(make_server, stub, db,
                                                                                          tmp_path):
    notify_port = free_ports(1)[0]
    primary = make_server(upstream=(stub.address,), shipped_lists=False, rpz_listen="127.0.0.1:0",
                          rpz_refresh=3600, rpz_notify=(f"127.0.0.1:{notify_port}",), db=seeded(db))
    secondary_db = tmp_path / "secondary.db"
    secondary = make_server(upstream=(stub.address,), shipped_lists=False, db=secondary_db,
                            policy_from=f"127.0.0.1:{rpz_port(primary)}", rpz_listen=f"127.0.0.1:{notify_port}")
    assert wait_for(lambda: ask(secondary, "chat.deepseek.com").answer[0][0].to_text() == "0.0.0.0", timeout=10)
    assert ask(secondary, "status.deepseek.com").answer[0][0].to_text() != "0.0.0.0", "passthru is an allow rule"
    rules = {r["domain"]: r for r in Store(secondary_db).list_rules(category="rpz:rpz.sinkhole")}
    assert rules["deepseek.com"]["kind"] == "block" and rules["203.0.113.0/24"]["kind"] == "block"
    # refresh is an hour: only the NOTIFY can bring the new name within seconds
    assert ask(secondary, "api.fresh-ai.test").answer[0][0].to_text() != "0.0.0.0"
    assert run(db, "block", "add", "fresh-ai.test").exit_code == 0
    fresh = wait_for(lambda: ask(secondary, "api.fresh-ai.test").answer[0][0].to_text() == "0.0.0.0", timeout=10)
    assert fresh, "the secondary did not block the new name within 10 s"
    primary.stop()
    secondary.server.rpz.secondary.wake.set()  # a refresh now: the primary does not answer
    wait_for(lambda: secondary.server.rpz.secondary.failing_since is not None, timeout=10)
    assert secondary.server.rpz.secondary.failing_since is not None
    assert ask(secondary, "api.fresh-ai.test").answer[0][0].to_text() == "0.0.0.0"
    assert ask(secondary, "chat.deepseek.com").answer[0][0].to_text() == "0.0.0.0"


def test_secondary_polls_at_the_primarys_refresh_and_removes_names(make_server, stub, db, tmp_path):
    primary = make_server(upstream=(stub.address,), shipped_lists=False, rpz_listen="127.0.0.1:0", rpz_refresh=1,
                          db=seeded(db))
    secondary = make_server(upstream=(stub.address,), shipped_lists=False, db=tmp_path / "secondary.db",
                            policy_from=f"127.0.0.1:{rpz_port(primary)}")
    assert wait_for(lambda: ask(secondary, "chat.deepseek.com").answer[0][0].to_text() == "0.0.0.0", timeout=10)
    assert run(db, "block", "remove", "deepseek.com").exit_code == 0
    assert wait_for(lambda: ask(secondary, "chat.deepseek.com").answer[0][0].to_text() != "0.0.0.0", timeout=10)
    assert ask(secondary, "chat.example-ai.test").answer[0][0].to_text() == "0.0.0.0"


def test_notify_from_another_address_is_refused(make_server, stub, tmp_path):
    secondary = make_server(upstream=(stub.address,), shipped_lists=False, db=tmp_path / "s.db",
                            policy_from="127.0.0.2:9", rpz_listen="127.0.0.1:0")
    q = dns.message.make_query(ZONE, "SOA")
    q.set_opcode(dns.opcode.NOTIFY)
    r = dns.query.udp(q, "127.0.0.1", port=rpz_port(secondary), timeout=3)
    assert r.rcode() == dns.rcode.REFUSED


def test_secondary_with_the_tsig_key_pulls_and_one_with_another_key_keeps_what_it_has(make_server, stub, db,
                                                                                       tmp_path, caplog):
    primary = make_server(upstream=(stub.address,), shipped_lists=False, rpz_listen="127.0.0.1:0", rpz_refresh=1,
                          rpz_tsig=TSIG, db=seeded(db))
    good = make_server(upstream=(stub.address,), shipped_lists=False, db=tmp_path / "good.db", rpz_tsig=TSIG,
                       policy_from=f"127.0.0.1:{rpz_port(primary)}")
    other = base64.b64encode(b"not the primary's key").decode()
    bad = make_server(upstream=(stub.address,), shipped_lists=False, db=tmp_path / "bad.db",
                      rpz_tsig=f"xfr-key:hmac-sha256:{other}", policy_from=f"127.0.0.1:{rpz_port(primary)}")
    assert wait_for(lambda: ask(good, "chat.deepseek.com").answer[0][0].to_text() == "0.0.0.0", timeout=10)
    assert wait_for(lambda: bad.server.rpz.secondary.failing_since is not None, timeout=10)
    assert ask(bad, "chat.deepseek.com").answer[0][0].to_text() != "0.0.0.0"
    assert Store(tmp_path / "bad.db").list_rules(category="rpz:rpz.sinkhole") == []
    assert any("keeping the policy in force" in r.getMessage() for r in caplog.records)
