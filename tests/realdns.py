"""The real DNS on loopback, for the differential tests: zones nobody here answers by hand.

`RealDns` builds, in a temporary directory and at test time:

- `agency.test.`, signed with NSEC3 by `ldns-signzone` (one ECDSA P-256 key; inception in the past so
  that no clock skew matters), holding what real zones hold: CNAME chains, a DNAME, a wildcard,
  SVCB and HTTPS records, a TXT RRset too big for 1232 bytes, MX, and `ai.agency.test.`, an unsigned
  child delegated without DS; and `bogus.agency.test. A`, whose RRSIG is broken after signing, so that a
  validating resolver answers SERVFAIL for it, and the data only to a query with CD (checking disabled);
- `ai.agency.test.`, that child, unsigned;
- NSD serving both (as a plain process: no chroot, no user change, files in the directory);
- Unbound as the agency's validating resolver ("agency"): stub zones to NSD (for `.` too, so that
  nothing ever leaves loopback: NSD refuses what it does not serve), the zone's own DS as its only
  trust anchor;
- Unbound as the reference ("reference"), forwarding to the agency's Unbound and validating with the
  same anchor, as a site resolver in the agency's network would; and, on request, more Unbounds
  forwarding wherever a test says (`Unbound.forwarding`), e.g. a validating one behind sinkhole.

Every process listens on 127.0.0.1 on ports above 1024 and is stopped by `stop()`.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode

from tests.conftest import free_ports
from tests.resolvers import UNBOUND, ResolverProcess, unbound_server

NSD = shutil.which("nsd") or shutil.which("nsd", path="/usr/sbin:/sbin")
KEYGEN = shutil.which("ldns-keygen")
SIGNZONE = shutil.which("ldns-signzone")
P = TypeVar("P", bound=ResolverProcess)
ZONE = "agency.test."
CHILD = "ai.agency.test."
BIG_TXT_RECORDS = 12  # 12 strings of 180 octets: about 2.3 kB, more than fits in 1232 bytes

PARENT = """$ORIGIN agency.test.
$TTL 300
@        SOA   ns.agency.test. hostmaster.agency.test. 1 3600 600 86400 120
@        NS    ns
ns       A     127.0.0.1
www      A     192.0.2.10
www      AAAA  2001:db8::10
www      TXT   "hello from www"
mail     MX    10 www
alias    CNAME www
chain1   CNAME chain2
chain2   CNAME chain3
chain3   CNAME www
dead     CNAME nothing-here
old      DNAME new.agency.test.
host.new A     192.0.2.20
*.wild   A     192.0.2.30
*.wild   TXT   "wildcard"
svc      SVCB  1 www.agency.test. alpn=h2 port=8443 ipv4hint=192.0.2.10
web      HTTPS 1 . alpn=h2,h3 ipv4hint=192.0.2.11 ipv6hint=2001:db8::11
aliasmode HTTPS 0 www.agency.test.
mapped   AAAA  ::ffff:198.51.100.7
chat     A     192.0.2.40
bot      A     192.0.2.41
cloak    CNAME chat.ai.agency.test.
bogus    A     192.0.2.66
ai       NS    ns.ai
ns.ai    A     127.0.0.1
"""

CHILD_ZONE = """$ORIGIN ai.agency.test.
$TTL 300
@        SOA   ns.ai.agency.test. hostmaster.agency.test. 1 3600 600 86400 120
@        NS    ns
ns       A     127.0.0.1
@        A     192.0.2.50
chat     A     192.0.2.51
"""


def _big_txt() -> str:
    return "".join(f'big      TXT   "{i:02d} {"x" * 176}"\n' for i in range(BIG_TXT_RECORDS))


def _break_signature(zone: Path, owner: str, covered: str) -> None:
    """Change one byte of the signature of `owner`'s RRSIG over `covered` in a signed zone file: the RRset stays
    as it was, its signature no longer verifies (a validating resolver calls it bogus)."""
    lines = zone.read_text().splitlines()
    for i, line in enumerate(lines):
        fields = line.split()
        if len(fields) > 5 and fields[0].lower() == owner and fields[3] == "RRSIG" and fields[4] == covered:
            signature = fields[-1]
            fields[-1] = ("B" if signature[0] == "A" else "A") + signature[1:]
            lines[i] = "\t".join(fields[:4]) + "\t" + " ".join(fields[4:])
            zone.write_text("\n".join(lines) + "\n")
            return
    raise RuntimeError(f"no RRSIG {covered} at {owner} in {zone}")


def _run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stdout}{done.stderr}")
    return done.stdout


def ask(port: int, name: str, qtype: str = "A", *, tcp: bool = False, do: bool = False, ad: bool = False,
        cd: bool = False, rd: bool = True, edns: bool = True, payload: int = 1232,
        timeout: float = 5.0) -> dns.message.Message:
    """One query to 127.0.0.1:`port` with dnspython; TC replies over UDP are returned, not raised."""
    q = dns.message.make_query(name, qtype, use_edns=0 if edns or do else False, want_dnssec=do, payload=payload)
    q.flags = (q.flags & ~(dns.flags.RD | dns.flags.AD | dns.flags.CD)) | (
        (dns.flags.RD if rd else 0) | (dns.flags.AD if ad else 0) | (dns.flags.CD if cd else 0))
    if tcp:
        return dns.query.tcp(q, "127.0.0.1", port=port, timeout=timeout)
    return dns.query.udp(q, "127.0.0.1", port=port, timeout=timeout, raise_on_truncation=False)


def wait_answering(process: ResolverProcess, name: str = f"www.{ZONE}", timeout: float = 20.0) -> None:
    """Poll until `process` answers `name` A with NOERROR (it has loaded its zones, primed its anchor)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline and process.proc.poll() is None:
        try:
            r = ask(process.port, name, "A", timeout=1.0)
            if r.rcode() == dns.rcode.NOERROR and r.answer:
                return
            last = dns.rcode.to_text(r.rcode())
        except (dns.exception.Timeout, OSError) as exc:
            last = type(exc).__name__
        time.sleep(0.05)
    raise RuntimeError(f"port {process.port} does not answer {name} ({last}; exit code {process.proc.poll()}):\n"
                       + (process.log.read_text() if process.log.exists() else ""))


class Nsd(ResolverProcess):
    """NSD serving the signed parent and the unsigned child from `work`."""

    def __init__(self, work: Path, port: int) -> None:
        conf = work / "nsd.conf"
        conf.write_text(f"""server:
    ip-address: 127.0.0.1@{port}
    port: {port}
    do-ip6: no
    username: ""
    chroot: ""
    zonesdir: "{work}"
    database: ""
    zonelistfile: "{work}/zone.list"
    xfrdfile: "{work}/xfrd.state"
    xfrdir: "{work}"
    pidfile: "{work}/nsd.pid"
    server-count: 1
    verbosity: 1
    hide-version: yes
    reuseport: no
remote-control:
    control-enable: no
zone:
    name: "{ZONE}"
    zonefile: "{work}/parent.zone.signed"
zone:
    name: "{CHILD}"
    zonefile: "{work}/child.zone"
""")
        super().__init__([str(NSD), "-d", "-c", str(conf)], port, work / "nsd.log")


class Unbound(ResolverProcess):
    """Unbound as a plain process on 127.0.0.1:`port`, validating below the test zone's own trust anchor."""

    def __init__(self, work: Path, name: str, port: int, anchor: str, upstream: str, *, stub: bool = False,
                 insecure: tuple[str, ...] = (), extra: str = "") -> None:
        directory = work / name
        directory.mkdir(exist_ok=True)
        self.conf = directory / "unbound.conf"
        if stub:  # the agency's resolver: iterates to NSD for the test zones and for the root
            zones = "".join(f'stub-zone:\n    name: "{z}"\n    stub-addr: {upstream}\n' for z in (".", ZONE, CHILD))
        else:
            zones = f'forward-zone:\n    name: "."\n    forward-addr: {upstream}\n'
        insecure_lines = "".join(f'    domain-insecure: "{z}"\n' for z in insecure)
        validating = f"""    val-log-level: 2
    trust-anchor: "{anchor}"
{insecure_lines}    minimal-responses: yes
    prefetch: no
{extra}"""
        self.conf.write_text(unbound_server(directory, port, modules="validator iterator", extra=validating) + zones)
        super().__init__([str(UNBOUND), "-d", "-c", str(self.conf)], port, directory / "unbound.log")


class RealDns:
    """NSD, the agency's Unbound and the reference Unbound on loopback (see the module's docstring)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.processes: list[ResolverProcess] = []
        self.anchor = self._sign()

    def _sign(self) -> str:
        """Sign the parent with a fresh key (NSEC3, no extra iterations); its DS is the trust anchor."""
        (self.work / "parent.zone").write_text(PARENT + _big_txt())
        (self.work / "child.zone").write_text(CHILD_ZONE)
        key = _run([str(KEYGEN), "-a", "ECDSAP256SHA256", "-k", ZONE.rstrip(".")], self.work).strip()
        _run([str(SIGNZONE), "-n", "-t", "0", "-i", "20200101", "-e", "20400101", "-f", "parent.zone.signed",
              "parent.zone", key], self.work)
        _break_signature(self.work / "parent.zone.signed", f"bogus.{ZONE}", "A")
        return " ".join((self.work / f"{key}.ds").read_text().split())

    def start(self) -> RealDns:
        try:
            self.nsd = self._started(lambda port: Nsd(self.work, port))
            self.agency = self._started(lambda port: Unbound(self.work, "agency", port, self.anchor,
                                                             f"127.0.0.1@{self.nsd.port}", stub=True))
            self.reference = self.forwarder("reference", f"127.0.0.1@{self.agency.port}")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def agency_port(self) -> int:
        return self.agency.port

    @property
    def reference_port(self) -> int:
        return self.reference.port

    def forwarder(self, name: str, upstream: str, insecure: tuple[str, ...] = (), extra: str = "") -> Unbound:
        """A validating Unbound forwarding everything to `upstream` (ADDRESS@PORT), on a port of its own;
        `insecure`: its domain-insecure names; `extra`: more `server:` lines."""
        return self._started(lambda port: Unbound(self.work, name, port, self.anchor, upstream, insecure=insecure,
                                                  extra=extra))

    def _started(self, make: Callable[[int], P]) -> P:
        """make(port) on a free port, answering; a port taken between free_ports() and the bind: another."""
        for attempt in range(3):
            process = make(free_ports(1)[0])
            self.processes.append(process)
            try:
                wait_answering(process)
                return process
            except RuntimeError as exc:
                process.stop()
                self.processes.remove(process)
                if attempt == 2 or "already in use" not in str(exc):
                    raise
        raise AssertionError("unreachable")

    def logs(self) -> str:
        return "\n".join(f"--- {p.log}\n{p.log.read_text()}" for p in self.processes if p.log.exists())

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
