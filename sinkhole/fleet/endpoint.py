"""The RPZ listener (`rpz_listen`): SOA, AXFR and IXFR for the primary's secondaries, NOTIFY for the secondary.

TCP only from the secondaries (rpz_secondaries) and, for NOTIFY, from the secondary's own primary: anyone else is
closed as accepted; at most `max_connections` at once, `max_per_address` from one address, and a whole request
and each reply within `idle_timeout` (settings rpz_max_connections, rpz_max_per_address, rpz_idle_timeout).
"""

from __future__ import annotations

import asyncio
import logging
import socket

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.serial
import dns.tsig
import dns.versioned
import dns.xfr

from sinkhole import logthrottle
from sinkhole.dns import codec
from sinkhole.dns.listener import ConnectionSlots, close_now, drain_within
from sinkhole.fleet.primary import Primary
from sinkhole.fleet.secondary import Secondary
from sinkhole.fleet.zone import Tsig, _reply, allowed, same_host

log = logging.getLogger(__name__)


class Endpoint:
    """The RPZ listener (`rpz_listen`): the primary's SOA/AXFR/IXFR, and NOTIFY for a secondary."""

    def __init__(self, host: str, port: int, tsig: Tsig | None, primary: Primary | None,
                 secondary: Secondary | None, max_connections: int = 64, max_per_address: int = 4,
                 idle_timeout: float = 30.0) -> None:
        self.host, self.port = host, port
        self.primary = primary
        self.secondary = secondary
        self.tsig = tsig
        self.keyring = self.tsig.keyring if self.tsig else None
        self.tcp_server: asyncio.AbstractServer | None = None
        self.udp: asyncio.DatagramTransport | None = None
        self.conns: set[asyncio.Task] = set()
        self.slots = ConnectionSlots(max_connections, max_per_address)
        self.idle_timeout = idle_timeout

    async def start(self, sockets: tuple[socket.socket, socket.socket]) -> None:
        """Serve on `sockets`: those of bind(), made before root was dropped."""
        loop = asyncio.get_running_loop()
        udp, tcp = sockets
        self.port = tcp.getsockname()[1]  # port 0: the one bind() got
        self.tcp_server = await asyncio.start_server(self._tcp_client, sock=tcp)
        self.udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
        log.info("RPZ %s on udp+tcp %s", " and ".join(
            w for w, on in (("primary for zone " + str(self.primary.origin) if self.primary else "", self.primary),
                            ("NOTIFY from " + self.secondary.where if self.secondary else "", self.secondary)) if on),
            self.address)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def stop(self) -> None:
        if self.tcp_server is not None:
            self.tcp_server.close()
        for task in list(self.conns):
            task.cancel()
        if self.udp is not None:
            self.udp.close()

    def _may_connect(self, peer: str) -> bool:
        """Over TCP: the secondaries (rpz_secondaries) transfer, and a secondary's own primary may send NOTIFY."""
        if self.primary is not None and allowed(peer, self.primary.networks):
            return True
        return self.secondary is not None and same_host(peer, self.secondary.host)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        why = self.slots.take(peer) if self._may_connect(peer) else "not in rpz_secondaries"
        if why is not None:  # closed as accepted: it holds no slot and no file descriptor
            logthrottle.warning(log, "RPZ: TCP connection from %s closed: %s", peer, why)
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self.conns.add(task)
        loop = asyncio.get_running_loop()
        try:
            while True:
                async with asyncio.timeout(self.idle_timeout):  # the whole request within it
                    wire = await reader.readexactly(codec.frame_length(await reader.readexactly(2)))
                replies = await loop.run_in_executor(None, self.answer, wire, peer, True)
                if not replies:
                    break
                for reply in replies:
                    writer.write(codec.frame(reply))
                    if not await drain_within(writer, self.idle_timeout):  # a transfer must be read, too
                        log.warning("RPZ: TCP connection from %s closed: its replies were not read within %.0f s",
                                    peer, self.idle_timeout)
                        return
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.conns.discard(task)
            self.slots.give_back(peer)
            close_now(writer)

    def answer(self, wire: bytes, peer: str, tcp: bool) -> list[bytes]:
        """The reply messages to one request (several for a transfer); [] to drop it."""
        try:
            query = dns.message.from_wire(wire, keyring=self.keyring)
        except (dns.message.UnknownTSIGKey, dns.tsig.BadSignature, dns.tsig.BadTime, dns.tsig.PeerError) as exc:
            log.warning("RPZ: %s from %s failed TSIG (%s): refused", "request", peer, exc.__class__.__name__)
            return [r for r in [codec.bare_error(wire, dns.rcode.NOTAUTH)] if r]
        except dns.exception.DNSException:
            return [r for r in [codec.bare_error(wire, dns.rcode.FORMERR)] if r]
        if query.flags & dns.flags.QR:
            return []
        if query.opcode() == dns.opcode.NOTIFY:
            return [self._notify(query, peer)]
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            return [_reply(query, dns.rcode.NOTIMP if query.opcode() != dns.opcode.QUERY
                                else dns.rcode.FORMERR)]
        if self.primary is None:
            return [_reply(query, dns.rcode.REFUSED)]
        return self.primary.answer(query, peer, tcp, self.tsig is not None)

    def _notify(self, query: dns.message.Message, peer: str) -> bytes:
        """RFC 1996: a NOTIFY from our primary makes the secondary check its serial now."""
        s = self.secondary
        if s is None or not query.question or query.question[0].name != s.origin:
            return _reply(query, dns.rcode.REFUSED if s is None else dns.rcode.NOTAUTH)
        if not same_host(peer, s.host) or (self.tsig is not None and not query.had_tsig):
            log.warning("RPZ: NOTIFY for %s from %s refused: not from the primary %s%s", s.origin, peer, s.where,
                        " with the TSIG key" if self.tsig else "")
            return _reply(query, dns.rcode.REFUSED)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        s.wake.set()
        return response.to_wire(max_size=65535)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            replies = self.endpoint.answer(data, addr[0], False)
        except Exception:  # never let one datagram stop the listener
            log.exception("RPZ: failed to answer a datagram from %s", addr[0])
            return
        if replies and self.transport is not None:
            self.transport.sendto(replies[0], addr)


