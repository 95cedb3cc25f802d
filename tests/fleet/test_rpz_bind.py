"""Interop: BIND 9 (Debian's named) as a TSIG-keyed secondary of our RPZ primary, on loopback.

The configuration is the README's BIND snippet with loopback addresses: `response-policy` naming
the zone, the zone as `type secondary` with `primaries { ... key "xfr-key"; }`, and `min-update-interval`
lowered (BIND's default applies a new zone version at most once a minute). named forwards
everything else to the test stub (`forward only`; its root hints name 127.0.0.1 too, so nothing
ever leaves loopback). A `sinkhole block add` must reach named's answers within seconds of the
NOTIFY, a `block remove` too, and a transfer without the key is refused.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.tsigkeyring
import dns.xfr
import dns.zone
import pytest

from sinkhole.model import RuleKind
from sinkhole.store.db import Store
from tests.conftest import ROOT, free_ports, wait_for
from tests.dnsstub import address_for
from tests.fleet.test_rpz import run
from tests.resolvers import ResolverProcess

NAMED = shutil.which("named") or shutil.which("named", path="/usr/sbin:/sbin")
CHECKCONF = shutil.which("named-checkconf") or shutil.which("named-checkconf", path="/usr/bin:/usr/sbin:/sbin")
ZONE = "rpz.sinkhole"
SECRET = base64.b64encode(b"sinkhole-bind-interop-test-key!!").decode()

pytestmark = pytest.mark.skipif(NAMED is None, reason="named not installed (apt-get install bind9; .ci/run does)")


class Named(ResolverProcess):
    def __init__(self, work: Path, port: int, rpz_port: int, stub_port: int) -> None:
        (work / "root.hints").write_text(". 3600000 IN NS a.root.invalid.\na.root.invalid. 3600000 IN A 127.0.0.1\n")
        self.conf = work / "named.conf"
        self.conf.write_text(f"""
key "xfr-key" {{ algorithm hmac-sha256; secret "{SECRET}"; }};
controls {{ }};
options {{
    directory "{work}";
    pid-file "{work}/named.pid";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion yes;
    allow-query {{ 127.0.0.1; }};
    forward only;
    forwarders {{ 127.0.0.1 port {stub_port}; }};
    dnssec-validation no;
    trust-anchor-telemetry no;
    notify no;
    response-policy {{ zone "{ZONE}" min-update-interval 1; }};
}};
zone "." {{ type hint; file "{work}/root.hints"; }};
zone "{ZONE}" {{
    type secondary;
    primaries {{ 127.0.0.1 port {rpz_port} key "xfr-key"; }};
    file "{work}/{ZONE}.db";
    allow-query {{ none; }};
}};
""")
        if CHECKCONF is not None:
            check = subprocess.run([CHECKCONF, str(self.conf)], capture_output=True, text=True, timeout=30)
            assert check.returncode == 0, check.stdout + check.stderr
        # -g: foreground, log to stderr; -4: IPv4 only; -n 1: one worker thread
        super().__init__([str(NAMED), "-g", "-4", "-n", "1", "-c", str(self.conf)], port, work / "named.log")


def test_bind_applies_block_add_and_remove_within_seconds(server_process, stub, db, tmp_path):
    store = Store(db)
    store.add_rules(RuleKind.BLOCK, ["deepseek.com"], category="test")
    store.add_rules(RuleKind.ALLOW, ["status.deepseek.com"], category="test")
    store.close()
    named_port, rpz_port = free_ports(2)
    sinkhole = server_process("--upstream", stub.address, "--no-shipped-lists", "--rpz-listen",
                              f"127.0.0.1:{rpz_port}", "--workers", "1",
                              env={"SINKHOLE_RPZ_NOTIFY": f"127.0.0.1:{named_port}",
                                   "SINKHOLE_RPZ_TSIG": f"xfr-key:hmac-sha256:{SECRET}",
                                   "SINKHOLE_RELOAD_INTERVAL": "0.1"})
    named = Named(tmp_path, named_port, rpz_port, stub.port)
    try:
        zone_in = wait_for(lambda: named.answer("chat.deepseek.com") == ["0.0.0.0"], timeout=20)
        assert zone_in, (f"named did not apply the zone: {named.answer('chat.deepseek.com')}\n"
                         + named.log.read_text() + "".join(sinkhole.lines))
        assert named.answer("deepseek.com") == ["0.0.0.0"]
        assert named.answer("chat.deepseek.com", "AAAA") == ["::"]
        assert named.answer("status.deepseek.com") == [address_for("status.deepseek.com")], "rpz-passthru"
        assert named.answer("www.new-ai.test") == [address_for("www.new-ai.test")], "forwarded before the change"

        assert run(db, "block", "add", "new-ai.test").exit_code == 0
        blocked = wait_for(lambda: named.answer("www.new-ai.test") == ["0.0.0.0"], timeout=10)
        assert blocked, f"still {named.answer('www.new-ai.test')} 10 s after block add\n" + named.log.read_text()
        assert named.answer("new-ai.test") == ["0.0.0.0"]

        assert run(db, "block", "remove", "new-ai.test").exit_code == 0
        answered = wait_for(lambda: named.answer("www.new-ai.test") == [address_for("www.new-ai.test")], timeout=10)
        assert answered, f"still {named.answer('www.new-ai.test')} 10 s after block remove\n" + named.log.read_text()
        assert named.answer("chat.deepseek.com") == ["0.0.0.0"], "the other rules stay"

        # named took every version by transfer, signed with the key; without it the primary refuses
        named_log = named.log.read_text()
        assert f"zone {ZONE}/IN: transferred serial" in named_log, named_log
        assert "TSIG xfr-key" in named_log, named_log
        with pytest.raises(dns.xfr.TransferError):
            dns.zone.from_xfr(dns.query.xfr("127.0.0.1", ZONE, port=rpz_port, timeout=5))
        keyring = dns.tsigkeyring.from_text({"xfr-key": ("hmac-sha256", SECRET)})
        signed = dns.zone.from_xfr(dns.query.xfr("127.0.0.1", ZONE, port=rpz_port, timeout=5, keyring=keyring,
                                                 keyname="xfr-key"))
        assert signed.get_node("deepseek.com") is not None
    finally:
        named.stop()


@pytest.mark.skipif(CHECKCONF is None, reason="named-checkconf not installed (bind9-utils)")
def test_the_readmes_bind_snippet_is_a_valid_named_conf(tmp_path):
    """What an operator copies from the README passes named-checkconf (with a real secret in place)."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index('    key "xfr-key"')
    lines = []
    for line in readme[start:].splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    snippet = "\n".join(lines).replace("BASE64SECRET", SECRET)
    assert "response-policy" in snippet and "type secondary" in snippet
    conf = tmp_path / "named.conf"
    conf.write_text(snippet + "\n")
    check = subprocess.run([CHECKCONF, str(conf)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr + snippet
