"""A deterministic upstream resolver for tests: real UDP and TCP sockets on a loopback port.

Answers from a fixed table keyed by name, records every query it receives, and can
misbehave on purpose (silence, truncation, spoofed replies) for the names that ask for it.
"""

from __future__ import annotations

import random
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass

from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, SOA, TXT, A, DNSLabel, DNSRecord


@dataclass
class Seen:
    proto: str
    qid: int
    src: tuple
    qname: str
    qtype: str
    wire: bytes


ZONE_SOA = RR("example.test", QTYPE.SOA, ttl=300,
              rdata=SOA("ns.example.test", "hostmaster.example.test", (1, 3600, 600, 86400, 300)))


def address_for(name: str) -> str:
    """Deterministic 192.0.2.x address for a name, so tests can check the answer came from here."""
    return f"192.0.2.{sum(name.lower().encode()) % 250 + 1}"


class StubResolver:
    """Names under example.test (and anything else) resolve; special first labels misbehave:

    nx.*     NXDOMAIN with SOA          big.*    TXT answer > 512 bytes (TC over UDP)
    slow.*   never answered             spoof.*  first a reply with the wrong ID, then the real one
    cname.*  CNAME to target.example.test then A      https.* HTTPS record with target svc.target.example.test
    evil.*   A 203.0.113.7; HTTPS with ipv6hint 2001:db8:bad::7
    flags.*  AA set, an extra TXT in authority and additional sections
    huge.*   TXT answer > 512 bytes over UDP with no TC, whatever the client's buffer (a broken upstream)
    garbage.* random bytes            qr0.*     a copy of the query (QR=0)
    header.* a bare 12-byte header with the right ID
    spoofport.* forged answers from another port and another address first, then the real one
    tcphang.* TC=1 over UDP; over TCP the connection is accepted and never answered
    delay.*  answered after 0.3 s
    """

    def __init__(self, host: str = "127.0.0.1", silent: bool = False, misbehave: bool = True) -> None:
        self.host = host
        self.silent = silent
        self.misbehave = misbehave
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        stub = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock = self.request
                sock.settimeout(5)
                try:
                    while True:
                        head = _recv_exact(sock, 2)
                        if not head:
                            return
                        (n,) = struct.unpack("!H", head)
                        wire = _recv_exact(sock, n)
                        for out in stub.respond(wire, "tcp", self.client_address):
                            sock.sendall(struct.pack("!H", len(out)) + out)
                except OSError:
                    return

        class TcpServer(socketserver.ThreadingTCPServer):
            address_family = family
            allow_reuse_address = True
            daemon_threads = True

        for _attempt in range(50):  # a UDP port whose TCP twin is free too
            self.udp = socket.socket(family, socket.SOCK_DGRAM)
            self.udp.bind((host, 0))
            self.port = self.udp.getsockname()[1]
            try:
                self.tcp = TcpServer((host, self.port), Handler)
                break
            except OSError:
                self.udp.close()
        else:
            raise OSError("no port free for both UDP and TCP")
        self._threads = [threading.Thread(target=self._udp_loop, daemon=True),
                         threading.Thread(target=self.tcp.serve_forever, kwargs={"poll_interval": 0.05},
                                          daemon=True)]

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __enter__(self) -> StubResolver:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.tcp.shutdown()
        self.tcp.server_close()
        self.udp.close()

    def _udp_loop(self) -> None:
        while True:
            try:
                wire, src = self.udp.recvfrom(65535)
            except OSError:
                return
            for out in self.respond(wire, "udp", src):
                try:
                    self.udp.sendto(out, src)
                except OSError:
                    return

    def queries(self, qname: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if qname is None or s.qname == qname.lower().rstrip(".")]

    def respond(self, wire: bytes, proto: str, src: tuple) -> list[bytes]:
        try:
            q = DNSRecord.parse(wire)
        except Exception:
            return []
        qname = str(q.q.qname).rstrip(".").lower()
        with self._lock:
            self.seen.append(Seen(proto, q.header.id, src, qname, QTYPE.get(q.q.qtype), wire))
        if self.silent:
            return []
        first = qname.split(".")[0] if self.misbehave else ""
        if first == "slow":
            return []
        if first == "delay":
            time.sleep(0.3)
        if first == "garbage":
            return [bytes(random.Random(q.header.id).getrandbits(8) for _ in range(40))]
        if first == "qr0":
            return [wire]
        if first == "header":
            return [wire[:2] + b"\x81\x80" + b"\x00" * 8]
        if first == "tcphang":
            if proto == "tcp":
                time.sleep(10)
                return []
            t = q.reply()
            t.header.tc = 1
            return [t.pack()]
        r = q.reply()
        name = q.q.qname
        if first == "nx":
            r.header.rcode = RCODE.NXDOMAIN
            r.add_auth(ZONE_SOA)
        elif first == "big" and q.q.qtype == QTYPE.TXT:
            for i in range(40):
                r.add_answer(RR(name, QTYPE.TXT, ttl=300, rdata=TXT(f"record {i:02d} " + "x" * 90)))
            out = r.pack()
            if proto == "udp":
                limit = 512
                for rr in q.ar:
                    if rr.rtype == QTYPE.OPT:
                        limit = max(512, rr.rclass)
                if len(out) > limit:
                    t = q.reply()
                    t.header.tc = 1
                    return [t.pack()]
            return [out]
        elif first == "huge" and q.q.qtype == QTYPE.TXT:
            for i in range(20):
                r.add_answer(RR(name, QTYPE.TXT, ttl=300, rdata=TXT(f"record {i:02d} " + "x" * 90)))
        elif first == "evil" and q.q.qtype == QTYPE.A:
            r.add_answer(RR(name, QTYPE.A, ttl=300, rdata=A("203.0.113.7")))
        elif first == "evil" and q.q.qtype == 65:
            r.add_answer(*RR.fromZone(f"{qname}. 300 IN HTTPS 1 . alpn=h2 ipv6hint=2001:db8:bad::7"))
        elif first == "https" and q.q.qtype == 65:
            r.add_answer(*RR.fromZone(f"{qname}. 300 IN HTTPS 1 svc.target.example.test. alpn=h2"))
        elif first == "cname":
            target = DNSLabel("target.example.test")
            r.add_answer(RR(name, QTYPE.CNAME, ttl=300, rdata=CNAME(target)))
            r.add_answer(RR(target, QTYPE.A, ttl=300, rdata=A("192.0.2.200")))
        elif first == "flags":
            r.header.aa = 1
            r.add_answer(RR(name, QTYPE.A, ttl=300, rdata=A(address_for(qname))))
            r.add_auth(RR("example.test", QTYPE.NS, ttl=300, rdata=CNAME("ns.example.test")))
            r.add_ar(RR("ns.example.test", QTYPE.A, ttl=300, rdata=A("192.0.2.53")))
        elif q.q.qtype == QTYPE.A:
            r.add_answer(RR(name, QTYPE.A, ttl=300, rdata=A(address_for(qname))))
        elif q.q.qtype == QTYPE.AAAA:
            r.add_answer(RR(name, QTYPE.AAAA, ttl=300, rdata=AAAA("2001:db8::1")))
        elif q.q.qtype == QTYPE.MX:
            r.add_answer(RR(name, QTYPE.MX, ttl=300, rdata=MX("mail.example.test", 10)))
        elif q.q.qtype == QTYPE.TXT:
            r.add_answer(RR(name, QTYPE.TXT, ttl=300, rdata=TXT("stub")))
        else:
            r.add_auth(ZONE_SOA)
        out = r.pack()
        if first == "spoofport" and proto == "udp":
            forged = q.reply()
            forged.add_answer(RR(name, QTYPE.A, ttl=300, rdata=A("203.0.113.99")))
            with socket.socket(self.udp.family, socket.SOCK_DGRAM) as other:
                other.bind((self.host, 0))
                other.sendto(forged.pack(), src)  # right ID and question, wrong source port
            if self.udp.family == socket.AF_INET:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                    try:
                        other.bind(("127.0.0.2", self.port))  # right port, wrong source address
                        other.sendto(forged.pack(), src)
                    except OSError:
                        pass
            time.sleep(0.05)
            return [out]
        if first == "spoof":
            forged = q.reply()
            forged.header.id = (q.header.id + 1) % 65536
            forged.add_answer(RR(name, QTYPE.A, ttl=300, rdata=A("203.0.113.66")))
            wrong_q = DNSRecord.question("other.example.test")
            wrong_q.header.id = q.header.id
            other = wrong_q.reply()
            other.add_answer(RR("other.example.test", QTYPE.A, ttl=300, rdata=A("203.0.113.67")))
            return [forged.pack(), other.pack(), out]
        return [out]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return b""
        buf += chunk
    return buf
