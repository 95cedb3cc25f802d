"""Interop: dig (BIND's client, from Debian's dnsutils) against the real server process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from tests.dnsstub import address_for

DIG = shutil.which("dig")
pytestmark = pytest.mark.skipif(DIG is None and not os.environ.get("CI"),
                                reason="dig not installed (apt-get install dnsutils); required in CI")


def dig(port: int, *args: str, host: str = "127.0.0.1") -> str:
    assert DIG is not None, "dig is required in CI: .ci/run installs dnsutils"
    out = subprocess.run([DIG, f"@{host}", "-p", str(port), "+time=3", "+tries=1", *args],
                         capture_output=True, text=True, timeout=20)
    return out.stdout


def test_dig_blocked_and_forwarded_over_udp_and_tcp(server_process, stub):
    p = server_process("--upstream", stub.address)
    for proto in ("+notcp", "+tcp"):
        assert dig(p.port, proto, "+short", "chat.deepseek.com").split() == ["0.0.0.0"]
        assert dig(p.port, proto, "+short", "chat.deepseek.com", "AAAA").split() == ["::"]
        assert dig(p.port, proto, "+short", "www.example.test").split() == [address_for("www.example.test")]


def test_dig_shows_blocked_ede_and_nodata_soa(server_process, stub):
    p = server_process("--upstream", stub.address)
    out = dig(p.port, "new-host.deepseek.com", "HTTPS")
    assert "status: NOERROR" in out and "ANSWER: 0" in out and "AUTHORITY: 1" in out
    assert "deepseek.com.\t\t60\tIN\tSOA\tsinkhole.invalid. hostmaster.sinkhole.invalid." in out
    assert "EDE: 15 (Blocked): (blocked by sinkhole rule deepseek.com (deepseek))" in out
    out = dig(p.port, "+noedns", "chat.deepseek.com")
    assert "EDE" not in out and "OPT PSEUDOSECTION" not in out and "0.0.0.0" in out


def test_dig_nxdomain_mode(server_process, stub):
    p = server_process("--upstream", stub.address, "--mode", "nxdomain")
    out = dig(p.port, "platform.deepseek.com")
    assert "status: NXDOMAIN" in out and "EDE: 15 (Blocked)" in out


def test_defaults_serve_on_5353_with_shipped_lists(tmp_path):
    """`sinkhole serve` with no options: 127.0.0.1:5353, UDP and TCP, the shipped lists (as `make run`)."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        probe = socket.socket(socket.AF_INET, kind)
        try:
            probe.bind(("127.0.0.1", 5353))
        except OSError:
            pytest.skip("127.0.0.1:5353 is in use on this machine")
        finally:
            probe.close()
    exe = shutil.which("sinkhole", path=os.path.dirname(os.sys.executable)) or "sinkhole"
    env = {**os.environ, "SINKHOLE_DB": str(tmp_path / "d.db")}
    proc = subprocess.Popen([exe, "serve"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "forwarding to" in line:
                break
        # only blocked names are asked: nothing leaves this machine
        assert dig(5353, "+short", "chat.deepseek.com").split() == ["0.0.0.0"]
        assert dig(5353, "+tcp", "+short", "chat.deepseek.com").split() == ["0.0.0.0"]
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
