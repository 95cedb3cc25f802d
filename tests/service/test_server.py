"""End to end over real sockets: sinkhole answers for blocked names, over UDP and TCP."""

from __future__ import annotations

import dns.flags
import dns.rcode
import dns.rdatatype
import pytest

from sinkhole.model import RuleKind
from sinkhole.store.db import Store
from tests.conftest import ask, ede_of

TRANSPORTS = [pytest.param(False, id="udp"), pytest.param(True, id="tcp")]


@pytest.fixture
def blocking(make_server, stub, db):
    """A server whose policy holds deepseek.com (block) and an allow exception under it."""
    store = Store(db)
    store.add_rules(RuleKind.BLOCK, ["deepseek.com", "gemini.google.com"], category="test")
    store.add_rules(RuleKind.ALLOW, ["status.deepseek.com"], category="test")
    store.close()
    return make_server(upstream=(stub.address,), shipped_lists=False)


@pytest.mark.parametrize("tcp", TRANSPORTS)
@pytest.mark.parametrize("name", ["deepseek.com", "chat.deepseek.com", "a.b.deepseek.com", "CHAT.DeepSeek.COM",
                                  "chat.deepseek.com."])
def test_blocked_a_gets_sinkhole_address(blocking, stub, tcp, name):
    r = ask(blocking, name, "A", tcp=tcp)
    assert r.rcode() == dns.rcode.NOERROR
    assert [rr.to_text() for rrset in r.answer for rr in rrset] == ["0.0.0.0"]
    assert r.answer[0].ttl == 60
    assert stub.queries() == [], "a blocked name must never reach the upstream"


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_blocked_aaaa_gets_unspecified_address(blocking, tcp):
    r = ask(blocking, "chat.deepseek.com", "AAAA", tcp=tcp)
    assert [rr.to_text() for rrset in r.answer for rr in rrset] == ["::"]


@pytest.mark.parametrize("tcp", TRANSPORTS)
@pytest.mark.parametrize("qtype", ["HTTPS", "SVCB", "MX", "TXT", "ANY", "NS", "CNAME"])
def test_other_types_of_blocked_name_get_nodata_with_soa(blocking, stub, qtype, tcp):
    r = ask(blocking, "chat.deepseek.com", qtype, tcp=tcp)
    assert r.rcode() == dns.rcode.NOERROR
    assert r.answer == []
    assert len(r.authority) == 1 and r.authority[0].rdtype == dns.rdatatype.SOA
    assert r.authority[0].name.to_text() == "deepseek.com."
    assert stub.queries() == []


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_soa_of_a_rule_s_own_name_is_an_answer(blocking, stub, tcp):
    r = ask(blocking, "DeepSeek.com", "SOA", tcp=tcp)
    assert r.rcode() == dns.rcode.NOERROR and r.authority == []
    assert [(rrset.name.to_text(), rrset.rdtype) for rrset in r.answer] == [("DeepSeek.com.", dns.rdatatype.SOA)]
    assert r.answer[0][0].mname.to_text() == "sinkhole.invalid."
    below = ask(blocking, "chat.deepseek.com", "SOA", tcp=tcp)  # below the apex: no such SOA, NODATA
    assert below.answer == [] and below.authority[0].name.to_text() == "deepseek.com."
    assert stub.queries() == []


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_reply_echoes_id_question_and_flags(blocking, tcp):
    r = ask(blocking, "Chat.DeepSeek.com", "A", tcp=tcp)
    assert r.flags & dns.flags.QR and r.flags & dns.flags.RA and r.flags & dns.flags.RD
    assert r.question[0].name.to_text() == "Chat.DeepSeek.com."  # case kept as asked (0x20)
    q = dns.message.make_query("chat.deepseek.com", "A")
    q.flags &= ~dns.flags.RD
    r2 = dns.query.udp(q, blocking.host, port=blocking.port, timeout=5)
    assert r2.id == q.id and not r2.flags & dns.flags.RD


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_edns_query_gets_opt_and_extended_error_blocked(blocking, tcp):
    r = ask(blocking, "chat.deepseek.com", "A", tcp=tcp)
    assert r.edns == 0
    assert ede_of(r) == [(15, "blocked by sinkhole rule deepseek.com (test)")]


def test_query_without_edns_gets_no_opt(blocking):
    r = ask(blocking, "chat.deepseek.com", "A", edns=False)
    assert r.edns == -1 and ede_of(r) == []
    assert [rr.to_text() for rrset in r.answer for rr in rrset] == ["0.0.0.0"]


@pytest.mark.parametrize("name", ["notdeepseek.com", "deepseek.com.example.test", "deepseek.co",
                                  "google.com.example.test"])
def test_lookalikes_are_forwarded_not_blocked(blocking, stub, name):
    r = ask(blocking, name, "A")
    assert r.answer and r.answer[0][0].to_text().startswith("192.0.2.")
    assert stub.queries(name), f"{name} should have been forwarded"


def test_blocking_a_product_host_leaves_its_parent_alone(blocking, stub):
    assert ask(blocking, "gemini.google.com").answer[0][0].to_text() == "0.0.0.0"
    r = ask(blocking, "mail.google.com")
    assert r.answer[0][0].to_text().startswith("192.0.2.")


def test_allow_rule_beats_less_specific_block(blocking, stub):
    r = ask(blocking, "status.deepseek.com")
    assert r.answer[0][0].to_text().startswith("192.0.2.")
    r = ask(blocking, "api.status.deepseek.com")
    assert r.answer[0][0].to_text().startswith("192.0.2.")
    assert ask(blocking, "api.deepseek.com").answer[0][0].to_text() == "0.0.0.0"


def test_nxdomain_mode(make_server, stub, db):
    s = make_server(upstream=(stub.address,), mode="nxdomain", shipped_lists=True)
    for qtype in ("A", "AAAA", "TXT"):
        r = ask(s, "chat.deepseek.com", qtype)
        assert r.rcode() == dns.rcode.NXDOMAIN
        assert r.answer == [] and r.authority[0].rdtype == dns.rdatatype.SOA
        assert ede_of(r)[0][0] == 15


def test_configured_block_addresses_and_ttl(make_server, stub):
    s = make_server(upstream=(stub.address,), block_a="192.0.2.10", block_aaaa="2001:db8::10", block_ttl=5)
    r = ask(s, "chat.deepseek.com", "A")
    assert r.answer[0][0].to_text() == "192.0.2.10" and r.answer[0].ttl == 5
    r = ask(s, "chat.deepseek.com", "AAAA", tcp=True)
    assert r.answer[0][0].to_text() == "2001:db8::10"
    assert r.authority == []


def test_block_a_none_gives_nodata(make_server, stub):
    s = make_server(upstream=(stub.address,), block_a="none")
    r = ask(s, "chat.deepseek.com", "A")
    assert r.answer == [] and r.authority[0].rdtype == dns.rdatatype.SOA


# ---------------------------------------------------------------------------- bypass canaries


@pytest.mark.parametrize("tcp", TRANSPORTS)
@pytest.mark.parametrize("name,qtype,rcode", [
    ("use-application-dns.net", "A", dns.rcode.NXDOMAIN),  # Firefox: keep DoH off
    ("mask.icloud.com", "A", dns.rcode.NXDOMAIN),  # iCloud Private Relay off
    ("mask-h2.icloud.com", "AAAA", dns.rcode.NXDOMAIN),
    ("_dns.resolver.arpa", "SVCB", dns.rcode.NOERROR),  # RFC 9462: nothing to discover
])
def test_bypass_canaries_are_answered_here_and_audited(make_server, stub, db, name, qtype, rcode, tcp):
    import sqlite3

    from tests.conftest import wait_for

    s = make_server(upstream=(stub.address,))
    r = ask(s, name, qtype, tcp=tcp)
    assert r.rcode() == rcode and r.answer == []
    assert r.authority and r.authority[0].rdtype == dns.rdatatype.SOA
    assert ede_of(r) == [(15, f"blocked by sinkhole rule {name} (bypass)")]
    assert stub.queries() == []
    rows = wait_for(lambda: sqlite3.connect(db).execute("SELECT action, qname, category FROM audit").fetchall())
    assert rows == [("canary", name, "bypass")]


def test_canaries_are_exact_names_and_can_be_turned_off(make_server, stub):
    s = make_server(upstream=(stub.address,))
    assert ask(s, "www.icloud.com").answer[0][0].to_text().startswith("192.0.2.")
    assert ask(s, "x.use-application-dns.net").answer[0][0].to_text().startswith("192.0.2.")
    off = make_server(upstream=(stub.address,), bypass_canaries=False, db=s.db.parent / "off.db")
    assert ask(off, "use-application-dns.net").answer[0][0].to_text().startswith("192.0.2.")


def test_stats_show_bypass_attempts(make_server, stub, db):
    import json
    import subprocess
    import sys

    s = make_server(upstream=(stub.address,))
    for name in ("use-application-dns.net", "mask.icloud.com", "use-application-dns.net", "dns.google"):
        ask(s, name)
    s.stop()
    out = subprocess.run([sys.executable, "-m", "sinkhole", "--db", str(db), "stats", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    stats = json.loads(out)
    assert stats["totals"]["bypass_attempts"] == 4
    assert stats["bypass_clients"] == [{"client": "127.0.0.1", "attempts": 4,
                                        "canaries": stats["bypass_clients"][0]["canaries"]}]
    assert set(stats["bypass_clients"][0]["canaries"].split(",")) == {"use-application-dns.net", "mask.icloud.com",
                                                                      "dns.google"}


# ---------------------------------------------------------------------------- response inspection


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_answer_leading_to_a_blocked_name_is_sinkholed(make_server, stub, db, tcp):
    import sqlite3

    from tests.conftest import wait_for

    s = make_server(upstream=(stub.address,))
    r = ask(s, "cname.example.test", tcp=tcp)  # CNAME -> target.example.test: not blocked yet
    assert [rr.rdtype for rr in r.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    store = Store(db)
    store.add_rules(RuleKind.BLOCK, ["target.example.test"], category="cloak")
    store.close()

    def sinkholed() -> bool:
        a = ask(s, "cname.example.test", tcp=tcp)  # the cached answer must not outlive the new rule
        return [rr.to_text() for rrset in a.answer for rr in rrset] == ["0.0.0.0"]

    assert wait_for(sinkholed, timeout=2)
    r = ask(s, "https.example.test", "HTTPS", tcp=tcp)
    assert r.answer == [] and r.authority[0].rdtype == dns.rdatatype.SOA
    assert ede_of(r) == [(15, "blocked by sinkhole rule https:svc.target.example.test (cloak)")]
    assert r.authority[0].name.to_text() == "https.example.test."  # the SOA is of the name asked
    rows = wait_for(lambda: sqlite3.connect(db).execute(
        "SELECT action, qname, rule, category FROM audit ORDER BY seq").fetchall())
    assert ("cname-blocked", "cname.example.test", "cname:target.example.test", "cloak") in rows
    assert ("cname-blocked", "https.example.test", "https:svc.target.example.test", "cloak") in rows
    # an allowed CNAME chain is relayed as it came
    assert ask(s, "www.example.test").answer[0][0].to_text().startswith("192.0.2.")


def test_answer_with_an_address_in_a_blocked_network_is_sinkholed(make_server, stub, db):
    import sqlite3

    from tests.conftest import wait_for

    store = Store(db)
    store.add_rules(RuleKind.BLOCK, ["203.0.113.0/24", "2001:db8:bad::/48"], category="ai-ranges")
    store.close()
    s = make_server(upstream=(stub.address,), shipped_lists=False)
    r = ask(s, "evil.example.test")
    assert [rr.to_text() for rrset in r.answer for rr in rrset] == ["0.0.0.0"]
    assert ede_of(r) == [(15, "blocked by sinkhole rule ip:203.0.113.7 in 203.0.113.0/24 (ai-ranges)")]
    r = ask(s, "evil.example.test", "HTTPS")  # the address is only in the ipv6hint
    assert r.answer == [] and r.authority[0].name.to_text() == "evil.example.test."
    assert ask(s, "www.example.test").answer[0][0].to_text().startswith("192.0.2.")
    rows = wait_for(lambda: sqlite3.connect(db).execute(
        "SELECT action, rule FROM audit ORDER BY seq").fetchall())
    assert ("ip-blocked", "ip:203.0.113.7 in 203.0.113.0/24") in rows
