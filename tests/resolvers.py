"""A third-party resolver (Unbound, BIND's named) run by a test as a plain process on loopback."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

UNBOUND = shutil.which("unbound") or shutil.which("unbound", path="/usr/sbin:/sbin")


def unbound_server(directory: Path, port: int, *, interfaces: tuple[str, ...] = ("127.0.0.1",),
                   modules: str = "iterator", extra: str = "") -> str:
    """The `server:` clause every test's Unbound starts with, then `extra` (more indented `server:` lines): a plain
    process (no chroot, no user change, files in `directory`) on loopback, one thread, loopback clients only, that
    queries loopback servers and lets the "test." names through to them (a default local zone, RFC 6761)."""
    listen = "".join(f"    interface: {i}\n" for i in interfaces)
    return f"""server:
{listen}    port: {port}
    do-ip6: no
    do-not-query-localhost: no
    username: ""
    chroot: ""
    directory: "{directory}"
    pidfile: "{directory}/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 1
    num-threads: 1
    so-reuseport: no
    access-control: 127.0.0.0/8 allow
    module-config: "{modules}"
    qname-minimisation: no
    local-zone: "test." nodefault
{extra}"""


class ResolverProcess:
    """The process started with `cmd`, its output in `log`; asked over UDP on 127.0.0.1:`port`."""

    def __init__(self, cmd: list[str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.out = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT)

    def ask(self, name: str, qtype: str = "A") -> dns.message.Message:
        return dns.query.udp(dns.message.make_query(name, qtype), "127.0.0.1", port=self.port, timeout=2)

    def answer(self, name: str, qtype: str = "A") -> list[str] | str:
        """The addresses it answers, or its rcode's name when it is not NOERROR ("timeout": no answer)."""
        try:
            r = self.ask(name, qtype)
        except dns.exception.Timeout:
            return "timeout"
        if r.rcode() != dns.rcode.NOERROR:
            return dns.rcode.to_text(r.rcode())
        return sorted(rr.to_text() for rrset in r.answer for rr in rrset if rrset.rdtype == r.question[0].rdtype)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.out.close()
