"""Interop: Debian's Unbound as a secondary of our RPZ primary, with an `rpz:` clause, on loopback.

sinkhole serves the policy zone on a loopback port and NOTIFYs Unbound on every change; Unbound
transfers it (IXFR, or AXFR) and applies it to the names it resolves, forwarding the rest to the
test stub. A `sinkhole block add` must reach Unbound's answers within seconds, a `block remove` too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sinkhole.model import RuleKind
from sinkhole.store.db import Store
from tests.conftest import free_ports, wait_for
from tests.dnsstub import address_for
from tests.fleet.test_rpz import run
from tests.resolvers import UNBOUND, ResolverProcess, unbound_server

ZONE = "rpz.sinkhole."

pytestmark = pytest.mark.skipif(UNBOUND is None, reason="unbound not installed (apt-get install unbound; .ci/run does)")


class Unbound(ResolverProcess):
    def __init__(self, work: Path, port: int, rpz_port: int, stub_port: int) -> None:
        self.conf = work / "unbound.conf"
        self.conf.write_text(unbound_server(work, port, modules="respip iterator") + f"""rpz:
    name: "{ZONE}"
    primary: 127.0.0.1@{rpz_port}
    zonefile: "{work}/rpz.sinkhole.zone"
    allow-notify: 127.0.0.1
    rpz-log: yes
forward-zone:
    name: "."
    forward-addr: 127.0.0.1@{stub_port}
""")
        super().__init__([str(UNBOUND), "-d", "-c", str(self.conf)], port, work / "unbound.log")


@pytest.fixture
def unbound_with_rpz(server_process, stub, db, tmp_path):
    """sinkhole as the RPZ primary (a real `sinkhole serve` with workers), Unbound as its secondary."""
    store = Store(db)
    store.add_rules(RuleKind.BLOCK, ["deepseek.com"], category="test")
    store.add_rules(RuleKind.ALLOW, ["status.deepseek.com"], category="test")
    store.close()
    unbound_port, rpz_port = free_ports(2)
    sinkhole = server_process("--upstream", stub.address, "--no-shipped-lists", "--rpz-listen",
                              f"127.0.0.1:{rpz_port}", "--workers", "2",
                              env={"SINKHOLE_RPZ_NOTIFY": f"127.0.0.1:{unbound_port}",
                                   "SINKHOLE_RELOAD_INTERVAL": "0.1"})
    unbound = Unbound(tmp_path, unbound_port, rpz_port, stub.port)
    try:
        zone_in = wait_for(lambda: unbound.answer("chat.deepseek.com") == ["0.0.0.0"], timeout=15)
        assert zone_in, (f"Unbound did not apply the zone: {unbound.answer('chat.deepseek.com')}\n"
                         + unbound.log.read_text() + "".join(sinkhole.lines))
        yield unbound, sinkhole
    finally:
        unbound.stop()


def test_unbound_applies_block_add_and_remove_within_seconds(unbound_with_rpz, db):
    unbound, sinkhole = unbound_with_rpz
    assert unbound.answer("deepseek.com") == ["0.0.0.0"]
    assert unbound.answer("chat.deepseek.com", "AAAA") == ["::"]
    assert unbound.answer("status.deepseek.com") == [address_for("status.deepseek.com")], "rpz-passthru"
    assert unbound.answer("www.new-ai.test") == [address_for("www.new-ai.test")], "forwarded before the change"

    assert run(db, "block", "add", "new-ai.test").exit_code == 0
    blocked = wait_for(lambda: unbound.answer("www.new-ai.test") == ["0.0.0.0"], timeout=10)
    assert blocked, f"still {unbound.answer('www.new-ai.test')} 10 s after block add\n" + unbound.log.read_text()
    assert unbound.answer("new-ai.test") == ["0.0.0.0"]

    assert run(db, "block", "remove", "new-ai.test").exit_code == 0
    answered = wait_for(lambda: unbound.answer("www.new-ai.test") == [address_for("www.new-ai.test")], timeout=10)
    assert answered, f"still {unbound.answer('www.new-ai.test')} 10 s after block remove\n" + unbound.log.read_text()
    assert unbound.answer("chat.deepseek.com") == ["0.0.0.0"], "the other rules stay"
    log = "".join(sinkhole.lines)
    assert "NOTIFY rpz.sinkhole." in log and "acknowledged" in log
    assert " differences)" in log, "Unbound took the changes as IXFR differences:\n" + log


def test_unbound_answers_nxdomain_when_the_server_does(server_process, stub, db, tmp_path):
    store = Store(db)
    store.add_rules(RuleKind.BLOCK, ["deepseek.com"], category="test")
    store.close()
    unbound_port, rpz_port = free_ports(2)
    server_process("--upstream", stub.address, "--no-shipped-lists", "--rpz-listen", f"127.0.0.1:{rpz_port}",
                   "--mode", "nxdomain", "--workers", "1", env={"SINKHOLE_RPZ_NOTIFY": f"127.0.0.1:{unbound_port}"})
    unbound = Unbound(tmp_path, unbound_port, rpz_port, stub.port)
    try:
        assert wait_for(lambda: unbound.answer("chat.deepseek.com") == "NXDOMAIN", timeout=15), \
            unbound.log.read_text()
        assert unbound.answer("deepseek.com") == "NXDOMAIN"
    finally:
        unbound.stop()
