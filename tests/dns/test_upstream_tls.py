"""Encrypted upstreams against a real Unbound on loopback: DNS over TLS and over HTTPS.

The test makes a throwaway CA and a server certificate (for dns.test and 127.0.0.1) with
`openssl`, and starts Debian's `unbound` with a plain, a TLS and an HTTPS port, forwarding
everything to the deterministic stub: no traffic leaves loopback. A byte relay in front of
the TLS and HTTPS ports counts the connections sinkhole opens (TLS runs end to end through it).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from sinkhole.dns import codec
from sinkhole.dns.upstream import Forwarder, parse_upstream
from tests.conftest import ask, free_ports
from tests.dnsstub import StubResolver, address_for
from tests.resolvers import UNBOUND, unbound_server

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(not (UNBOUND and OPENSSL),
                                reason="needs unbound and openssl (apt-get install unbound openssl)")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL or "openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> Path:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)
    return d / f"{name}.pem"


def make_server_cert(d: Path, ca: str) -> tuple[Path, Path]:
    (d / "ext.cnf").write_text("subjectAltName=DNS:dns.test,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                               "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                               "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=dns.test", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    return d / "server.key", d / "server.pem"


class Relay:
    """TCP byte relay on a loopback port to `target`: counts the connections made through it."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.accepted = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            server = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


class Unbound:
    def __init__(self, d: Path, stub: StubResolver, key: Path, pem: Path) -> None:
        for attempt in range(3):  # a port taken between free_ports() and Unbound's bind: new ports, once more
            try:
                self._start(d, stub, key, pem)
                return
            except RuntimeError as exc:
                if "address already in use" not in str(exc) or attempt == 2:
                    raise

    def _start(self, d: Path, stub: StubResolver, key: Path, pem: Path) -> None:
        self.plain, self.tls, self.https = free_ports(3)
        conf = d / "unbound.conf"
        tls = f"""    tls-port: {self.tls}
    https-port: {self.https}
    http-endpoint: "/dns-query"
    tls-service-key: "{key}"
    tls-service-pem: "{pem}"
"""
        listen = tuple(f"127.0.0.1@{p}" for p in (self.plain, self.tls, self.https))
        conf.write_text(unbound_server(d, self.plain, interfaces=listen, extra=tls) + f"""forward-zone:
    name: "."
    forward-addr: 127.0.0.1@{stub.port}
""")
        self.log = d / "unbound.log"
        self._logfile = self.log.open("wb")
        self.proc = subprocess.Popen([UNBOUND, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=self._logfile)
        deadline = time.monotonic() + 15
        while True:  # ready when the plain port answers
            try:
                q = dns.message.make_query("ready.example.test", "A")
                dns.query.udp(q, "127.0.0.1", port=self.plain, timeout=0.5)
                break
            except (OSError, dns.exception.Timeout):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    if self.proc.poll() is None:
                        self.proc.kill()
                        self.proc.wait(10)
                    self._logfile.close()
                    raise RuntimeError("unbound did not start: " + self.log.read_text()) from None

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._logfile.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "test-ca")
    other = make_ca(d, "other-ca")
    key, pem = make_server_cert(d, "test-ca")
    return {"dir": d, "ca": ca, "other": other, "key": key, "pem": pem}


@pytest.fixture(scope="module")
def unbound(pki) -> Iterator[Unbound]:
    with StubResolver() as stub:
        u = Unbound(pki["dir"], stub, pki["key"], pki["pem"])
        u.stub = stub  # type: ignore[attr-defined]
        try:
            yield u
        finally:
            u.close()


def dot(u: Unbound, port: int | None = None) -> str:
    return f"tls://127.0.0.1:{port or u.tls}#dns.test"


def doh(u: Unbound, port: int | None = None) -> str:
    return f"https://127.0.0.1:{port or u.https}/dns-query"


@pytest.mark.parametrize("kind", ["dot", "doh"])
@pytest.mark.parametrize("tcp", [False, True], ids=["udp-client", "tcp-client"])
def test_encrypted_upstream_answers_are_relayed(make_server, unbound, pki, kind, tcp):
    url = dot(unbound) if kind == "dot" else doh(unbound)
    s = make_server(upstream=(url,), upstream_ca=str(pki["ca"]))
    name = f"{kind}-{int(tcp)}.example.test"
    r = ask(s, name, tcp=tcp)
    assert r.rcode() == dns.rcode.NOERROR
    assert [rr.to_text() for rrset in r.answer for rr in rrset] == [address_for(name)]
    assert unbound.stub.queries(name), "the answer came through Unbound from the stub"
    nx = ask(s, f"nx.{kind}.example.test", tcp=tcp)
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.authority


@pytest.mark.parametrize("kind", ["dot", "doh"])
def test_untrusted_certificate_gives_servfail_and_says_why(make_server, unbound, pki, caplog, kind):
    url = dot(unbound) if kind == "dot" else doh(unbound)
    caplog.set_level(logging.WARNING)
    for ca in (None, pki["other"]):  # the system's CAs, then a pinned CA that did not sign it
        s = make_server(upstream=(url,), timeout=1.0, **({"upstream_ca": str(ca)} if ca else {}))
        name = f"untrusted-{kind}-{'pinned' if ca else 'system'}.example.test"
        r = ask(s, name)
        assert r.rcode() == dns.rcode.SERVFAIL
        assert not unbound.stub.queries(name)
    lines = [r.getMessage() for r in caplog.records if "certificate not trusted" in r.getMessage()]
    assert any(line.startswith(f"upstream {parse_upstream(url)} failed: certificate not trusted") for line in lines)
    assert any("SERVFAIL for untrusted" in line for line in lines)


def test_certificate_for_another_name_is_refused(make_server, unbound, pki, caplog):
    caplog.set_level(logging.WARNING)
    s = make_server(upstream=(f"tls://127.0.0.1:{unbound.tls}#other.test",), upstream_ca=str(pki["ca"]),
                    timeout=1.0)
    assert ask(s, "wrongname.example.test").rcode() == dns.rcode.SERVFAIL
    assert not unbound.stub.queries("wrongname.example.test")
    assert any("certificate is for another name" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["dot", "doh"])
def test_one_connection_carries_many_queries(make_server, unbound, pki, kind):
    relay = Relay(unbound.tls if kind == "dot" else unbound.https)
    try:
        url = dot(unbound, relay.port) if kind == "dot" else doh(unbound, relay.port)
        s = make_server(upstream=(url,), upstream_ca=str(pki["ca"]))
        for i in range(6):
            name = f"reuse{i}.{kind}.example.test"
            assert ask(s, name, tcp=bool(i % 2)).answer[0][0].to_text() == address_for(name)
        assert relay.accepted == 1, "one TLS connection (one handshake) for six queries"
    finally:
        relay.close()


@pytest.mark.parametrize("kind", ["dot", "doh"])
def test_concurrent_queries_share_one_connection_under_uvloop(unbound, pki, kind):
    """The forwarder on uvloop, as the server runs it: 30 queries at once, pipelined over one connection."""
    uvloop = pytest.importorskip("uvloop")
    relay = Relay(unbound.tls if kind == "dot" else unbound.https)
    names = [f"burst{i}.{kind}.example.test" for i in range(30)]

    async def main() -> list[bytes]:
        url = dot(unbound, relay.port) if kind == "dot" else doh(unbound, relay.port)
        fwd = Forwarder([parse_upstream(url)], timeout=5.0, ca=str(pki["ca"]))
        try:
            queries = [codec.decode_query(dns.message.make_query(n, "A", id=i).to_wire())
                       for i, n in enumerate(names)]
            replies = await asyncio.gather(*(fwd.forward(q, client_tcp=False) for q in queries))
            return [wire for wire, _ in replies]
        finally:
            await fwd.aclose()

    try:
        replies = uvloop.run(main())
        for i, (name, wire) in enumerate(zip(names, replies, strict=True)):
            r = dns.message.from_wire(wire)
            assert r.id == i and r.answer[0][0].to_text() == address_for(name)
        assert relay.accepted == 1
    finally:
        relay.close()
