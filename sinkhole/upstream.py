"""Forwarding to the agency's resolvers: failover, RFC 5452 reply matching, TC -> TCP.

The client's query bytes go upstream unchanged but for a fresh random ID, from a fresh
socket (a random source port chosen by the kernel); a reply counts only when it comes
from the upstream's address and port (connected socket), has QR set, our ID and the
same question. Anything else is ignored while we keep waiting for the real reply.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import ipaddress
import logging
import secrets
import socket
import struct
import time
from dataclasses import dataclass

from sinkhole import codec
from sinkhole.errors import ConfigError, UpstreamError
from sinkhole.model import Query

log = logging.getLogger(__name__)

DOWN_FOR = 5.0  # seconds an upstream that timed out is tried after the healthy ones
# upper bounds (seconds) of the latency histogram buckets kept per upstream (sinkhole.metrics exports them)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class Upstream:
    host: str
    port: int = 53

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """'1.2.3.4', '1.2.3.4:53', '::1', '[::1]:53' -> (host, port). Hosts must be IP addresses."""
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"bad address {text!r}: missing ']'")
        host, rest = text[1:close], text[close + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"bad address {text!r}: expected ':PORT' after ']'")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = _port(p, text)
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(f"bad address {text!r}: {host!r} is not an IP address") from exc
    return host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigError(f"bad address {whole!r}: port must be a number from 0 to 65535")
    return int(text)


def parse_upstream(text: str) -> Upstream:
    host, port = parse_hostport(text, 53)
    if port == 0:
        raise ConfigError(f"bad upstream {text!r}: port 0")
    return Upstream(host, port)


def system_upstreams(path: str = "/etc/resolv.conf") -> list[Upstream]:
    """The nameservers of resolv.conf, read with dnspython's parser."""
    import dns.resolver

    try:
        resolver = dns.resolver.Resolver(filename=path, configure=True)
    except (OSError, dns.resolver.NoResolverConfiguration) as exc:
        raise ConfigError(f"no upstream given and none found in {path}: {exc}") from exc
    ups = [Upstream(str(ns), resolver.port) for ns in resolver.nameservers]
    if not ups:
        raise ConfigError(f"no upstream given and none found in {path}")
    return ups


def _matches(reply: bytes, qid: int, question: bytes) -> bool:
    if len(reply) < 12 + len(question):
        return False
    rid, flags, qdcount = struct.unpack_from("!HHH", reply)
    if rid != qid or not flags & codec.QR or qdcount != 1:
        return False
    name_end = 12 + len(question) - 4
    return (reply[12:name_end].lower() == question[:-4].lower()
            and reply[name_end:name_end + 4] == question[-4:])


class Forwarder:
    def __init__(self, upstreams: list[Upstream], timeout: float = 2.0, max_inflight: int = 1000) -> None:
        if not upstreams:
            raise ConfigError("at least one upstream is needed")
        self.upstreams = list(upstreams)
        self.timeout = timeout
        self.max_inflight = max_inflight  # each forward holds a socket: bounded, beyond it SERVFAIL at once
        self.inflight = 0
        self._tcp_pool: dict[Upstream, _TcpConnection] = {}
        self._down_until: dict[Upstream, float] = {}
        # per upstream, for metrics: answers per latency bucket (the last: above every bound), their
        # total seconds, and failed attempts (timeouts, errors); plain ints, read at scrape time
        self.latency: dict[Upstream, list[int]] = {u: [0] * (len(LATENCY_BUCKETS) + 1) for u in self.upstreams}
        self.latency_sum: dict[Upstream, float] = dict.fromkeys(self.upstreams, 0.0)
        self.failures: dict[Upstream, int] = dict.fromkeys(self.upstreams, 0)

    def set_upstreams(self, upstreams: list[Upstream]) -> None:
        """A reloaded configuration: new upstreams are asked from the next query on."""
        if not upstreams:
            raise ConfigError("at least one upstream is needed")
        for u in upstreams:
            self.latency.setdefault(u, [0] * (len(LATENCY_BUCKETS) + 1))
            self.latency_sum.setdefault(u, 0.0)
            self.failures.setdefault(u, 0)
        for u in set(self.upstreams) - set(upstreams):
            conn = self._tcp_pool.pop(u, None)
            if conn is not None and not conn.waiting:
                conn.close()
            self._down_until.pop(u, None)
        self.upstreams = list(upstreams)

    def _order(self) -> list[Upstream]:
        now = time.monotonic()
        healthy = [u for u in self.upstreams if self._down_until.get(u, 0.0) <= now]
        return healthy + [u for u in self.upstreams if u not in healthy]

    async def forward(self, query: Query, client_tcp: bool) -> tuple[bytes, Upstream]:
        """Relay `query` and return the upstream's reply, carrying the client's ID.

        Raises UpstreamError when no upstream answered within the timeout.
        """
        if self.inflight >= self.max_inflight:
            raise UpstreamError(f"{self.inflight} queries already waiting for an upstream")
        self.inflight += 1
        try:
            return await self._forward(query, client_tcp)
        finally:
            self.inflight -= 1

    async def _forward(self, query: Query, client_tcp: bool) -> tuple[bytes, Upstream]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        order = self._order()
        question = query.question
        fallback: tuple[bytes, Upstream] | None = None
        errors = []
        for i, up in enumerate(order):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # share what is left among the upstreams not yet tried
            budget = remaining / (len(order) - i)
            qid = secrets.randbits(16)
            out = codec.set_id(query.wire, qid)
            asked = time.perf_counter()
            try:
                reply = await self._udp(up, out, qid, question, budget)
                if codec.is_truncated(reply):
                    fallback = (reply, up)
                    if deadline - loop.time() <= 0:
                        break  # our time is up, not the upstream's fault
                    reply = await self._tcp(up, out, qid, question, deadline - loop.time())
                    if not client_tcp and len(reply) > query.max_udp:
                        reply = fallback[0]
            except (TimeoutError, OSError, asyncio.IncompleteReadError, UpstreamError) as exc:
                reason = type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
                errors.append(f"{up}: {reason}")
                if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS):
                    break  # out of sockets here: no upstream is to blame
                self._down_until[up] = time.monotonic() + DOWN_FOR
                self.failures[up] = self.failures.get(up, 0) + 1
                continue
            self._down_until.pop(up, None)
            took = time.perf_counter() - asked
            buckets = self.latency.get(up)
            if buckets is not None:
                buckets[bisect.bisect_left(LATENCY_BUCKETS, took)] += 1
                self.latency_sum[up] += took
            return codec.set_id(reply, query.id), up
        if fallback is not None and not client_tcp:
            # the TCP retry failed: a UDP client gets the truncated reply and may retry over TCP itself
            return codec.set_id(fallback[0], query.id), fallback[1]
        raise UpstreamError("; ".join(errors) or "no time left to ask an upstream")

    async def _udp(self, up: Upstream, out: bytes, qid: int, question: bytes, timeout: float) -> bytes:
        loop = asyncio.get_running_loop()
        sock = socket.socket(up.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (up.host, up.port))
                await loop.sock_sendall(sock, out)
                while True:
                    reply = await loop.sock_recv(sock, 65535)
                    if _matches(reply, qid, question):
                        return reply
                    log.debug("ignored a reply from %s that does not match the query", up)
        finally:
            sock.close()

    async def _tcp(self, up: Upstream, out: bytes, qid: int, question: bytes, timeout: float) -> bytes:
        """Over the upstream's pooled TCP connection (opened when there is none), pipelined by ID."""
        conn = None
        try:
            async with asyncio.timeout(timeout):
                conn = self._tcp_pool.get(up)
                if conn is None or conn.closed or qid in conn.waiting:
                    reader, writer = await asyncio.open_connection(up.host, up.port)
                    conn = _TcpConnection(reader, writer)
                    old, self._tcp_pool[up] = self._tcp_pool.get(up), conn
                    if old is not None and not old.waiting:
                        old.close()
                reply = await conn.ask(out, qid)
        except TimeoutError:
            if conn is not None and not conn.waiting:
                conn.close()  # a connection that did not answer in time is not used again
            raise
        if not _matches(reply, qid, question):
            raise UpstreamError(f"{up}: a TCP reply with our ID but another question")
        return reply

    def close(self) -> None:
        for conn in self._tcp_pool.values():
            conn.close()
        self._tcp_pool.clear()


class _TcpConnection:
    """One TCP connection to an upstream, reused for many queries (RFC 7766 pipelining): replies
    are matched to their queries by ID as they come, in any order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.waiting: dict[int, asyncio.Future[bytes]] = {}
        self.closed = False
        self._reading = asyncio.get_running_loop().create_task(self._read())

    async def ask(self, out: bytes, qid: int) -> bytes:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[qid] = future
        try:
            self.writer.write(struct.pack("!H", len(out)) + out)
            await self.writer.drain()
            return await future
        finally:
            self.waiting.pop(qid, None)

    async def _read(self) -> None:
        error: BaseException = ConnectionError("upstream closed the TCP connection")
        try:
            while True:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
                reply = await self.reader.readexactly(length)
                if len(reply) >= 2:
                    future = self.waiting.get(int.from_bytes(reply[:2], "big"))
                    if future is not None and not future.done():
                        future.set_result(reply)
        except (OSError, asyncio.IncompleteReadError) as exc:
            error = ConnectionError(f"upstream TCP connection lost: {exc}")
        except asyncio.CancelledError:
            pass
        finally:
            self.closed = True
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(error)
            self.writer.close()

    def close(self) -> None:
        self.closed = True
        self._reading.cancel()
