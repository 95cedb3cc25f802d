"""Differential tests against the real DNS (tests/realdns.py): NSD serving a zone signed at test time, Unbound
as the agency's validating resolver, and a reference Unbound forwarding to the same agency resolver.

sinkhole forwards to the agency's Unbound too; for names it does not block, its reply must be the reference's:
rcode, flags (AA TC RD RA AD CD), EDNS (version, buffer size, DO, no options), every section as RRsets with
their data, and TTLs as they age (within two seconds; to one in the ageing test). Then the DNSSEC cases
that only sinkhole has: a validating Unbound behind sinkhole (as an agency site's resolver would be), once
over UDP and once over TCP, must get sinkhole's answer for a blocked zone that is unsigned under a signed
parent, validate everything sinkhole relays, and fail (as it must) for a blocked name inside a signed zone
unless told that name is insecure.

NSD and the Unbounds are started once for this module (about 4 s); every process listens on 127.0.0.1.
"""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from sinkhole.model import RuleKind
from sinkhole.store.db import Store
from tests import realdns
from tests.conftest import RunningServer, audit_rows, wait_for
from tests.realdns import RealDns, ask

pytestmark = pytest.mark.skipif(None in (realdns.NSD, realdns.UNBOUND, realdns.KEYGEN, realdns.SIGNZONE),
                                reason="needs nsd, unbound and ldnsutils (apt-get install nsd unbound ldnsutils; "
                                       ".ci/run does)")

BLOCKED = ["ai.agency.test", "chat.agency.test", "bot.agency.test", "198.51.100.0/24"]
TRANSPORTS = [pytest.param(False, id="udp"), pytest.param(True, id="tcp")]
FLAG_BITS = dns.flags.QR | dns.flags.AA | dns.flags.TC | dns.flags.RD | dns.flags.RA | dns.flags.AD | dns.flags.CD

# (name, type): what real zones hold. Each is asked plain (RD, EDNS) and with DO, over UDP and over TCP.
QUESTIONS = [
    ("www.agency.test", "A"), ("www.agency.test", "AAAA"), ("www.agency.test", "TXT"),
    ("mail.agency.test", "MX"),
    ("alias.agency.test", "A"),  # CNAME
    ("chain1.agency.test", "A"),  # CNAME -> CNAME -> CNAME -> A
    ("dead.agency.test", "A"),  # CNAME to a name that does not exist: NXDOMAIN with the CNAME
    ("host.old.agency.test", "A"),  # DNAME, synthesized CNAME, A
    ("x.old.agency.test", "A"),  # DNAME to a name that does not exist
    ("a.wild.agency.test", "A"), ("b.wild.agency.test", "TXT"),  # wildcard, with its NSEC3 proof under DO
    ("c.wild.agency.test", "AAAA"),  # wildcard NODATA
    ("svc.agency.test", "SVCB"), ("web.agency.test", "HTTPS"), ("aliasmode.agency.test", "HTTPS"),
    ("nope.agency.test", "A"),  # NXDOMAIN, NSEC3 denial
    ("www.agency.test", "SRV"),  # NODATA
    ("agency.test", "SOA"), ("agency.test", "NS"), ("agency.test", "DNSKEY"), ("agency.test", "NSEC3PARAM"),
    ("ai.agency.test", "DS"),  # the DS of a blocked apex: the parent's answer (an insecure delegation), forwarded
    ("chat.agency.test", "DS"),  # the same for a blocked name inside the signed zone: NODATA, NSEC3 proof
    ("big.agency.test", "TXT"),  # 2.3 kB: TC over UDP, whole over TCP
]
FLAGS = {"plain": {}, "do": {"do": True}}
# and some with other flags: AD, CD, DO+CD, no EDNS, RD=0
MORE = [(name, qtype, flags) for name, qtype in [("www.agency.test", "A"), ("nope.agency.test", "A"),
                                                 ("host.old.agency.test", "A"), ("big.agency.test", "TXT")]
        for flags in ("ad", "cd", "do+cd", "noedns", "nord")]
FLAGS.update({"ad": {"ad": True}, "cd": {"cd": True}, "do+cd": {"do": True, "cd": True}, "noedns": {"edns": False},
              "nord": {"rd": False}})
CASES = [(name, qtype, flags) for name, qtype in QUESTIONS for flags in ("plain", "do")] + MORE


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    dns_ = RealDns(tmp_path_factory.mktemp("realdns")).start()
    yield dns_
    dns_.stop()


@pytest.fixture(scope="module")
def sinkhole(real, tmp_path_factory):
    db = tmp_path_factory.mktemp("sinkhole") / "sinkhole.db"
    store = Store(db)
    store.add_rules(RuleKind.BLOCK, BLOCKED, category="test")
    store.close()
    server = RunningServer(db, upstream=(f"127.0.0.1:{real.agency_port}",), shipped_lists=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def downstream(real, sinkhole):
    """Two validating Unbounds forwarding to sinkhole, over UDP and over TCP (`tcp-upstream: yes`), as agency
    sites' resolvers would; bot.agency.test is configured insecure, chat.agency.test is not."""
    upstream = f"127.0.0.1@{sinkhole.port}"
    return {False: real.forwarder("site-udp", upstream, insecure=("bot.agency.test",)),
            True: real.forwarder("site-tcp", upstream, insecure=("bot.agency.test",), extra="    tcp-upstream: yes\n")}


def comparable(m: dns.message.Message) -> dict:
    """A reply as the comparison sees it: everything but the ID and the order of RRsets; TTLs apart."""
    out: dict = {"rcode": dns.rcode.to_text(m.rcode()), "flags": dns.flags.to_text(m.flags & FLAG_BITS),
                 "edns": (m.edns, m.payload, dns.flags.edns_to_text(m.ednsflags), m.options) if m.edns >= 0 else None,
                 "question": m.question}
    for section in ("answer", "authority", "additional"):
        out[section] = sorted((r.name.to_text().lower(), dns.rdatatype.to_text(r.rdtype),
                               dns.rdatatype.to_text(r.covers), sorted(x.to_text() for x in r))
                              for r in getattr(m, section))
    return out


def ttls(m: dns.message.Message) -> dict:
    return {(section, r.name.to_text().lower(), r.rdtype, r.covers): r.ttl
            for section in ("answer", "authority", "additional") for r in getattr(m, section)}


@pytest.mark.parametrize("tcp", TRANSPORTS)
@pytest.mark.parametrize("name,qtype,flags", CASES, ids=[f"{n}-{t}-{f}" for n, t, f in CASES])
def test_sinkhole_answers_as_the_reference_resolver(real, sinkhole, name, qtype, flags, tcp):
    ours = ask(sinkhole.port, name, qtype, tcp=tcp, **FLAGS[flags])
    theirs = ask(real.reference_port, name, qtype, tcp=tcp, **FLAGS[flags])
    assert comparable(ours) == comparable(theirs), f"\nsinkhole:\n{ours}\n\nreference:\n{theirs}"
    ours_ttl, theirs_ttl = ttls(ours), ttls(theirs)
    assert ours_ttl.keys() == theirs_ttl.keys()
    # both count down what the agency's resolver said, each from when it asked and each rounding down: a second
    # apart at most, or two if this machine paused between the two questions
    late = {k: (ours_ttl[k], theirs_ttl[k]) for k in ours_ttl if abs(ours_ttl[k] - theirs_ttl[k]) > 2}
    assert not late, f"TTLs (sinkhole, reference) differ by more than two seconds: {late}"


def test_ttls_age_alike(real, sinkhole):
    """Both cache what the agency's resolver said and count it down: after some seconds, the same TTLs."""
    name = "mail.agency.test"
    first = ask(sinkhole.port, name, "MX").answer, ask(real.reference_port, name, "MX").answer
    assert first[0] and first[1]
    started = first[1][0].ttl if first[1] else 0
    # wait (poll) until the reference's TTL has gone down by two seconds, then ask both again
    aged = wait_for(lambda: (r := ask(real.reference_port, name, "MX")).answer and
                    r.answer[0].ttl <= started - 2 and r, timeout=10, interval=0.2)
    assert aged, "the reference's TTL did not go down"
    ours = ask(sinkhole.port, name, "MX").answer[0].ttl
    assert abs(ours - aged.answer[0].ttl) <= 1 and ours <= first[0][0].ttl - 1


# ---------------------------------------------------------------------------- blocked names, real zones


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_blocked_apex_soa_is_an_answer_and_below_it_an_authority(real, sinkhole, tcp):
    apex = ask(sinkhole.port, "ai.agency.test", "SOA", tcp=tcp)
    assert apex.rcode() == dns.rcode.NOERROR and not apex.authority
    assert [(r.name.to_text(), dns.rdatatype.to_text(r.rdtype)) for r in apex.answer] == [("ai.agency.test.", "SOA")]
    assert apex.answer[0][0].mname.to_text() == "sinkhole.invalid."
    below = ask(sinkhole.port, "chat.ai.agency.test", "SOA", tcp=tcp)
    assert below.rcode() == dns.rcode.NOERROR and not below.answer
    assert below.authority[0].name.to_text() == "ai.agency.test." and below.authority[0].rdtype == dns.rdatatype.SOA


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_real_cname_and_mapped_address_to_blocked_targets_are_sinkholed(real, sinkhole, tcp):
    cloak = ask(sinkhole.port, "cloak.agency.test", "A", tcp=tcp)  # CNAME chat.ai.agency.test
    assert [rr.to_text() for rrset in cloak.answer for rr in rrset] == ["0.0.0.0"]
    mapped = ask(sinkhole.port, "mapped.agency.test", "AAAA", tcp=tcp)  # ::ffff:198.51.100.7
    assert [rr.to_text() for rrset in mapped.answer for rr in rrset] == ["::"]
    def both() -> dict | None:  # the audit writer stores them a moment later, not necessarily together
        found = {r["qname"]: (r["action"], r["rule"]) for r in audit_rows(sinkhole.db)
                 if r["qname"] in ("cloak.agency.test", "mapped.agency.test")}
        return found if len(found) == 2 else None

    rows = wait_for(both, timeout=15)
    assert rows == {"cloak.agency.test": ("cname-blocked", "cname:chat.ai.agency.test"),
                    "mapped.agency.test": ("ip-blocked", "ip:198.51.100.7 in 198.51.100.0/24")}


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_validating_resolver_behind_sinkhole_gets_the_sinkhole_answer_for_an_unsigned_blocked_child(
        real, sinkhole, downstream, tcp):
    site = downstream[tcp]
    for name in ("chat.ai.agency.test", "ai.agency.test"):
        r = ask(site.port, name, "A", do=True)
        assert r.rcode() == dns.rcode.NOERROR, f"{name}: {r}\n{site.log.read_text()}"
        assert [rr.to_text() for rrset in r.answer for rr in rrset] == ["0.0.0.0"]
        assert not r.flags & dns.flags.AD, "proved insecure, not secure"
    transport = "tcp" if tcp else "udp"
    assert wait_for(lambda: [row for row in audit_rows(sinkhole.db) if row["qname"] == "chat.ai.agency.test"
                             and row["transport"] == transport], timeout=5), f"the site asked over {transport}"


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_validating_resolver_behind_sinkhole_validates_what_sinkhole_relays(real, sinkhole, downstream, tcp):
    site = downstream[tcp]
    for name, qtype, rcode in [("www.agency.test", "A", "NOERROR"), ("host.old.agency.test", "A", "NOERROR"),
                               ("a.wild.agency.test", "A", "NOERROR"), ("nope.agency.test", "A", "NXDOMAIN"),
                               ("c.wild.agency.test", "AAAA", "NOERROR"), ("web.agency.test", "HTTPS", "NOERROR")]:
        r = ask(site.port, name, qtype, do=True)
        assert dns.rcode.to_text(r.rcode()) == rcode and r.flags & dns.flags.AD, f"{name} {qtype}: {r}"


@pytest.mark.parametrize("tcp", TRANSPORTS)
def test_a_blocked_name_inside_a_signed_zone_needs_the_validating_resolver_to_call_it_insecure(
        real, sinkhole, downstream, tcp):
    site = downstream[tcp]
    # chat.agency.test is signed data of agency.test: sinkhole's unsigned answer cannot validate (as with RPZ)
    assert ask(site.port, "chat.agency.test", "A", do=True).rcode() == dns.rcode.SERVFAIL
    # bot.agency.test is the same, but the site's resolver has `domain-insecure: "bot.agency.test"`
    r = ask(site.port, "bot.agency.test", "A", do=True)
    assert r.rcode() == dns.rcode.NOERROR and [rr.to_text() for rrset in r.answer for rr in rrset] == ["0.0.0.0"]



@pytest.mark.parametrize("first_cd", [pytest.param(True, id="cd-first"), pytest.param(False, id="plain-first")])
def test_checking_disabled_is_part_of_the_cache_key(real, tmp_path, first_cd):
    """bogus.agency.test's RRSIG is broken: the agency's validating Unbound answers SERVFAIL without CD and the
    data with CD. Whichever sinkhole caches first, the other kind of client gets what the reference gets."""
    for cd in (False, True):
        reference = ask(real.reference_port, "bogus.agency.test", cd=cd)
        assert (reference.rcode(), bool(reference.answer)) == ((dns.rcode.NOERROR, True) if cd else
                                                               (dns.rcode.SERVFAIL, False)), reference
    server = RunningServer(tmp_path / "sinkhole.db", upstream=(f"127.0.0.1:{real.agency_port}",),
                           shipped_lists=False).start()
    try:
        first = ask(server.port, "bogus.agency.test", cd=first_cd)
        again = ask(server.port, "bogus.agency.test", cd=first_cd)  # now from the cache, if it was cached
        other = ask(server.port, "bogus.agency.test", cd=not first_cd)
        for reply, cd in ((first, first_cd), (again, first_cd), (other, not first_cd)):
            if cd:
                assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.CD, reply
                assert [r[0].to_text() for r in reply.answer] == ["192.0.2.66"], reply
            else:
                assert reply.rcode() == dns.rcode.SERVFAIL and not reply.answer, reply
        if first_cd:
            assert server.server.pipeline.cache.hits >= 1  # the CD=1 answer was in the cache and was not served to CD=0
    finally:
        server.stop()
