"""Upstream URLs, strategies (failover, fastest, parallel) and conditional forwarding, over real
sockets to local stubs; the settings that choose them."""

from __future__ import annotations

import time

import dns.flags
import dns.rcode
import pytest
from dnslib import RCODE, DNSRecord

from sinkhole.dns.upstream import Upstream, parse_upstream
from sinkhole.errors import ConfigError
from sinkhole.service import build
from tests.conftest import ask, wait_for
from tests.dnsstub import StubResolver, address_for


class SlowStub(StubResolver):
    """Answers everything, each after `delay` seconds."""

    def __init__(self, delay: float, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.delay = delay

    def respond(self, wire: bytes, proto: str, src: tuple) -> list[bytes]:
        time.sleep(self.delay)
        return super().respond(wire, proto, src)


class ServfailStub(StubResolver):
    """Answers everything at once with SERVFAIL."""

    def respond(self, wire: bytes, proto: str, src: tuple) -> list[bytes]:
        super().respond(wire, proto, src)  # recorded
        r = DNSRecord.parse(wire).reply()
        r.header.rcode = RCODE.SERVFAIL
        return [r.pack()]


# ---------------------------------------------------------------------------- URLs


@pytest.mark.parametrize("text,expected,shown", [
    ("10.0.0.53", Upstream("10.0.0.53", 53, "udp"), "10.0.0.53:53"),
    ("udp://10.0.0.53:5300", Upstream("10.0.0.53", 5300, "udp"), "10.0.0.53:5300"),
    ("tcp://[::1]", Upstream("::1", 53, "tcp"), "tcp://[::1]:53"),
    ("tls://10.0.0.53", Upstream("10.0.0.53", 853, "tls"), "tls://10.0.0.53:853"),
    ("tls://10.0.0.53:8853#dns.corp.example", Upstream("10.0.0.53", 8853, "tls", "dns.corp.example"),
     "tls://10.0.0.53:8853#dns.corp.example"),
    ("TLS://DNS.Corp.Example.", Upstream("dns.corp.example", 853, "tls"), "tls://dns.corp.example:853"),
    ("https://dns.corp.example/dns-query", Upstream("dns.corp.example", 443, "https", "", "/dns-query"),
     "https://dns.corp.example:443/dns-query"),
    ("https://10.0.0.53:8443/q{?dns}#dns.corp.example",
     Upstream("10.0.0.53", 8443, "https", "dns.corp.example", "/q"), "https://10.0.0.53:8443/q#dns.corp.example"),
    ("https://[2001:db8::53]", Upstream("2001:db8::53", 443, "https", "", "/dns-query"),
     "https://[2001:db8::53]:443/dns-query"),
])
def test_upstream_urls(text, expected, shown):
    up = parse_upstream(text)
    assert up == expected and str(up) == shown
    assert parse_upstream(shown) == up  # what the log shows can be given back


@pytest.mark.parametrize("text,why", [
    ("ftp://10.0.0.53", "use HOST[:PORT]"),
    ("http://10.0.0.53/dns-query", "needs https://"),
    ("udp://10.0.0.53#dns.test", "for tls:// and https://"),
    ("tcp://dns.corp.example", "not an IP address"),  # plain DNS needs an address: no lookup to find it
    ("tls://10.0.0.53/dns-query", "only tls://HOST[:PORT]"),
    ("tls://10.0.0.53:0", "port 0"),
    ("tls://10.0.0.53#bad..name", "neither an IP address nor a host name"),
    ("https://user@dns.test/dns-query", "no user"),
    ("https://dns.test:99999/", "out of range"),
])
def test_bad_upstream_url_says_why(text, why):
    with pytest.raises(ConfigError) as err:
        parse_upstream(text)
    assert why in str(err.value) and repr(text) in str(err.value)


def test_tcp_upstream_is_asked_over_tcp_only_on_one_connection(make_server, stub):
    s = make_server(upstream=(f"tcp://{stub.address}",))
    for i, tcp in enumerate((False, True, False)):
        name = f"t{i}.example.test"
        assert ask(s, name, tcp=tcp).answer[0][0].to_text() == address_for(name)
    seen = stub.queries()
    assert [q.proto for q in seen] == ["tcp"] * 3
    assert len({q.src for q in seen}) == 1


def test_tcp_upstream_reply_too_big_for_a_udp_client_is_truncated(make_server, stub):
    s = make_server(upstream=(f"tcp://{stub.address}",))
    r = ask(s, "big.example.test", "TXT", payload=1232)
    assert r.flags & dns.flags.TC and not r.answer
    assert len(ask(s, "big.example.test", "TXT", tcp=True).answer[0]) == 40


# ---------------------------------------------------------------------------- strategies


def test_fastest_prefers_the_upstream_that_answers_sooner(make_server):
    with SlowStub(0.08) as slow, StubResolver() as fast:
        s = make_server(upstream=(slow.address, fast.address), upstream_strategy="fastest")
        for i in range(24):
            name = f"f{i}.example.test"
            assert ask(s, name).answer[0][0].to_text() == address_for(name)
        assert len(fast.queries()) >= 20, "the faster upstream gets nearly everything"
        assert 1 <= len(slow.queries()) <= 4, "the slower one: a first measurement and a probe now and then"


def test_failover_keeps_the_configured_order(make_server):
    with SlowStub(0.02) as slow, StubResolver() as fast:
        s = make_server(upstream=(slow.address, fast.address))
        for i in range(4):
            ask(s, f"o{i}.example.test")
        assert len(slow.queries()) == 4 and not fast.queries()


def test_parallel_answers_from_the_live_upstream_without_waiting_for_the_silent_one(make_server):
    with StubResolver(silent=True) as dead, StubResolver() as live:
        # failover would give the silent one half of 20 s, past the client's patience of 3 s
        s = make_server(upstream=(dead.address, live.address), upstream_strategy="parallel", timeout=20.0)
        r = ask(s, "p.example.test", timeout=3)
        assert r.answer[0][0].to_text() == address_for("p.example.test")
        assert live.queries("p.example.test")
        # the silent stub's thread records the query on its own schedule: give it a moment
        assert wait_for(lambda: dead.queries("p.example.test"), timeout=2.0), "both were asked at once"


def test_parallel_servfail_is_not_a_good_answer_while_the_other_may_still_answer(make_server):
    with ServfailStub() as broken, SlowStub(0.15) as slow:
        s = make_server(upstream=(broken.address, slow.address), upstream_strategy="parallel")
        r = ask(s, "sf.example.test")
        assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].to_text() == address_for("sf.example.test")
        assert broken.queries("sf.example.test")


def test_parallel_relays_servfail_when_nobody_does_better(make_server):
    with ServfailStub() as broken, StubResolver(silent=True) as dead:
        s = make_server(upstream=(broken.address, dead.address), upstream_strategy="parallel", timeout=1.0)
        assert ask(s, "bad.example.test").rcode() == dns.rcode.SERVFAIL
        assert broken.queries("bad.example.test") and dead.queries("bad.example.test")


# ---------------------------------------------------------------------------- conditional forwarding


def test_names_under_a_forward_zone_go_to_its_upstreams(make_server):
    with StubResolver() as public, StubResolver() as corp, StubResolver() as lab:
        s = make_server(upstream=(public.address,),
                        forward_zones={"corp.example": [corp.address], "lab.corp.example": [f"tcp://{lab.address}"]})
        routes = {"www.corp.example": corp, "corp.example": corp, "Intranet.CORP.example": corp,
                  "db.lab.corp.example": lab, "notcorp.example": public, "corp.example.net": public,
                  "www.example.test": public}
        for name, expected in routes.items():
            assert ask(s, name).answer[0][0].to_text() == address_for(name.lower())
            for stub in (public, corp, lab):
                assert bool(stub.queries(name)) == (stub is expected), f"{name} must go to one upstream set"
        assert [q.proto for q in lab.queries()] == ["tcp"]
        # the same name goes to the same set every time: its cached answer is that set's answer
        before = len(corp.queries())
        ask(s, "www.corp.example")
        assert len(corp.queries()) == before and not public.queries("www.corp.example")


def test_no_zones_no_zone_table(make_server, stub):
    s = make_server(upstream=(stub.address,))
    assert s.server.forwarder.zones is None


# ---------------------------------------------------------------------------- settings


def test_upstream_settings_from_file_env_and_flags(tmp_path):
    f = tmp_path / "sinkhole.toml"
    f.write_text('upstream = ["tls://10.0.0.53#dns.corp.example", "https://10.0.1.53/dns-query"]\n'
                 'upstream_strategy = "fastest"\n'
                 '[forward_zones]\n'
                 '"corp.example" = ["10.0.0.53", "10.0.0.54"]\n'
                 'lab.corp.example = "tcp://10.9.0.53"\n')  # unquoted: TOML makes it nested tables
    cfg = build.load(f, env={})
    assert cfg.upstreams.upstream_strategy == "fastest"
    assert [str(u) for u in build.upstreams(cfg)] == ["tls://10.0.0.53:853#dns.corp.example",
                                                 "https://10.0.1.53:443/dns-query"]
    assert {z: [str(u) for u in ups] for z, ups in build.zones(cfg).items()} == {
        "corp.example": ["10.0.0.53:53", "10.0.0.54:53"], "lab.corp.example": ["tcp://10.9.0.53:53"]}
    cfg = build.load(f, env={"SINKHOLE_FORWARD_ZONES": "corp.example=10.0.0.99; other.example=10.1.0.1,10.1.0.2",
                              "SINKHOLE_UPSTREAM_STRATEGY": "parallel"})
    assert cfg.upstreams.upstream_strategy == "parallel" and list(build.zones(cfg)) == ["corp.example", "other.example"]
    cfg = build.load(f, env={}, flags={"forward_zones": ("x.example=10.2.0.1",)})
    assert list(build.zones(cfg)) == ["x.example"]
    assert build.zones(build.load(env={})) == {}


@pytest.mark.parametrize("settings,message", [
    ({"upstream": ("tls://10.0.0.53:x",)}, "upstream: bad upstream 'tls://10.0.0.53:x'"),
    ({"upstream_strategy": "random"}, "upstream_strategy must be one of failover, fastest, parallel"),
    ({"forward_zones": ("corp.example",)}, "forward_zones: 'corp.example': expected ZONE=UPSTREAM"),
    ({"forward_zones": ("corp.example=",)}, "forward_zones: zone 'corp.example': no upstream"),
    ({"forward_zones": ("bad..zone=10.0.0.1",)}, "forward_zones: bad zone 'bad..zone'"),
    ({"forward_zones": ("corp.example=dns.corp.example",)}, "forward_zones: bad upstream 'dns.corp.example'"),
    ({"forward_zones": {"corp.example": 53}}, "forward_zones"),
    ({"upstream_ca": "/nonexistent/ca.pem"}, "upstream_ca: cannot load '/nonexistent/ca.pem'"),
])
def test_bad_upstream_settings_name_the_setting(settings, message):
    with pytest.raises(ConfigError) as err:
        build.load(env={}, flags=settings)
    assert message in str(err.value)


def test_serve_flags_reach_the_settings(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sinkhole import cli
    from sinkhole.service import process

    seen = {}
    monkeypatch.setattr(process, "run", lambda cfg, db, **kw: seen.setdefault("cfg", cfg) and 0)
    result = CliRunner().invoke(cli.cli, [
        "--db", str(tmp_path / "db"), "serve", "--upstream", "tls://127.0.0.1#dns.test",
        "--upstream-strategy", "parallel", "--forward-zone", "corp.example=127.0.0.2,tcp://127.0.0.3",
        "--forward-zone", "lab.example=127.0.0.4"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert cfg.upstreams.upstream_strategy == "parallel"
    assert {z: [str(u) for u in ups] for z, ups in build.zones(cfg).items()} == {
        "corp.example": ["127.0.0.2:53", "tcp://127.0.0.3:53"], "lab.example": ["127.0.0.4:53"]}
    bad = CliRunner().invoke(cli.cli, ["--db", str(tmp_path / "db"), "serve", "--upstream", "tls://x..y"])
    assert bad.exit_code == 2 and "bad upstream 'tls://x..y'" in bad.output
