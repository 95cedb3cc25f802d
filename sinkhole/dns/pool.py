"""Upstream UDP queries over a pool of connected sockets on random ports (issue 16: the forward path).

A socket per upstream query (socket, connect, send, receive, close, and a reader registered and removed with the
event loop) was about a third of a cache miss's CPU. Here each UDP upstream has a `UdpPool`:

- **How many sockets**: up to `size` (default 64) per upstream, opened as queries need them. Each is connected to
  the upstream's address and port, so the kernel drops datagrams from any other source.
- **How ports are chosen**: by the kernel, when the socket is connected (Linux picks the port at random in
  `net.ipv4.ip_local_port_range`, as it did for the socket per query); never by us, never a fixed set.
- **How they rotate**: a socket is retired after `max_uses` queries (default 100) or `max_age` seconds (default
  10) since it was opened, whichever comes first, and a new socket (a new random port) takes its place. A retired
  socket closes once its last query is answered or timed out.
- **Which socket a query takes**: one of the pool's slots chosen at random; its ID is drawn at random (from
  os.urandom) among those not in flight on that socket.
- **What counts as the reply**: a datagram on that socket (so from the upstream's address and port) with our
  ID, QR set, one question and the same question (codec.matches: RFC 5452). Anything else is counted in
  `ignored` and dropped; the query keeps waiting for its own reply until its timeout.

What this means against an off-path attacker who forges replies (Kaminsky): a forged datagram must hit the one
port (of the ~28,000 ephemeral ones) that carries the query and its 16-bit ID, as with a socket per query; with k
queries in flight on that socket it hits one of them with probability k / 65536, so for a blind attacker the odds
per forged packet are (queries in flight) / (ports x 65536) either way. What a pool changes is how long a port
stays open: seconds instead of one round trip, which helps an attacker who can find open ports first (the
SAD DNS side channel, CVE-2020-25705, fixed in the kernel since 5.10). `max_uses` and `max_age` bound that time.
A forged ICMP "port unreachable" fails the queries in flight on that socket at once (they fail over to the next
upstream), where it failed one query before.

File descriptors: up to `size` per UDP upstream and worker, opened as random picks reach empty slots (so
about `size` once an upstream has had a few hundred queries), kept until picked again when too old. The
systemd unit allows 65,536; under a default soft limit of 1,024, a dozen UDP upstreams (zones included) fit.

`send` returns a future (no coroutine of its own, one timer per query) when the slot it picks has an open socket,
else None, and `ask` (a coroutine) opens one first. The future's result is the reply's bytes; it fails with
TimeoutError when none came within the timeout, ConnectionRefusedError when the upstream's host said nothing
listens there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import weakref

from sinkhole.dns import codec

log = logging.getLogger(__name__)

SIZE = 64  # sockets per upstream, at most
MAX_USES = 100  # queries a socket carries before it is replaced by one on a new random port
MAX_AGE = 10.0  # seconds a socket is used for at most, however few queries it carried


class _Random:
    """16-bit numbers from os.urandom, read 2 KiB at a time (one system call per 1024 numbers, not one each).
    A forked child drops what its parent had read (os.register_at_fork below): two workers never share IDs."""

    __slots__ = ("__weakref__", "_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        _RANDOMS.add(self)

    def forget(self) -> None:
        self._buf, self._pos = b"", 0

    def below(self, n: int) -> int:
        """A number from 0 to n - 1 (n at most 65536; unbiased when n is a power of two)."""
        pos = self._pos
        if pos >= len(self._buf):
            self._buf, pos = os.urandom(2048), 0
        self._pos = pos + 2
        return (self._buf[pos] << 8 | self._buf[pos + 1]) % n


def _retrieved(task: asyncio.Task[_Socket]) -> None:
    """An opening that failed with nobody left waiting for it is not an 'exception never retrieved'."""
    if not task.cancelled():
        task.exception()


_RANDOMS: weakref.WeakSet[_Random] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [r.forget() for r in list(_RANDOMS)])


class _Socket(asyncio.DatagramProtocol):
    """One connected UDP socket (an asyncio datagram transport) and the queries in flight on it, by ID."""

    __slots__ = ("born", "closing", "pool", "transport", "uses", "waiting")

    def __init__(self, pool: UdpPool) -> None:
        self.pool = pool
        self.transport: asyncio.DatagramTransport | None = None
        # qid -> (the future waiting for the reply, the question it must carry, the timer of its timeout)
        self.waiting: dict[int, tuple[asyncio.Future[bytes], bytes, asyncio.TimerHandle]] = {}
        self.uses = 0
        self.born = time.monotonic()
        self.closing = False  # retired: no new queries; closed when the last one in flight is done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        qid = codec.message_id(data) if len(data) >= 12 else -1
        found = self.waiting.get(qid)
        if found is None or not codec.matches(data, qid, found[1]):
            self.pool.ignored += 1  # late, spoofed, garbled or for another question: not the reply
            log.debug("ignored a datagram from upstream %s:%d that answers no query in flight",
                      self.pool.host, self.pool.port)
            return
        del self.waiting[qid]
        future, _, timer = found
        timer.cancel()
        if not future.done():  # done: cancelled (the other upstream of a parallel pair answered first)
            future.set_result(data)
        if self.closing and not self.waiting:
            self.close()

    def error_received(self, exc: Exception) -> None:
        """An ICMP error (port unreachable: nothing listens there): every query in flight on it fails now."""
        self.fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or ConnectionError("upstream socket closed"))
        self.transport = None
        self.pool._draining.discard(self)

    def expire(self, qid: int, future: asyncio.Future[bytes]) -> None:
        found = self.waiting.get(qid)
        if found is not None and found[0] is future:
            del self.waiting[qid]
            if self.closing and not self.waiting:
                self.close()
        if not future.done():
            future.set_exception(TimeoutError("no reply from the upstream in time"))

    def fail(self, exc: BaseException) -> None:
        """Every query in flight on this socket fails with `exc` now."""
        waiting, self.waiting = self.waiting, {}
        for future, _, timer in waiting.values():
            timer.cancel()
            if not future.done():
                future.set_exception(exc)
        if self.closing:
            self.close()

    def usable(self, max_uses: int, max_age: float) -> bool:
        return (self.transport is not None and not self.closing and self.uses < max_uses
                and time.monotonic() - self.born < max_age)

    def retire(self) -> None:
        self.closing = True
        if self.waiting:
            self.pool._draining.add(self)  # closed by its last reply or timeout (or by UdpPool.close)
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self.pool._draining.discard(self)


class UdpPool:
    """Connected UDP sockets to one upstream (host, port): see the module's docstring."""

    def __init__(self, host: str, port: int, size: int = SIZE, max_uses: int = MAX_USES,
                 max_age: float = MAX_AGE) -> None:
        self.host, self.port = host, port
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.size = size
        self.max_uses = max_uses
        self.max_age = max_age
        self._slots: list[_Socket | None] = [None] * size
        self._draining: set[_Socket] = set()  # retired, with queries still in flight
        self._opening: dict[int, asyncio.Future[_Socket]] = {}  # slot -> its socket being opened
        self._random = _Random()
        self.ignored = 0  # datagrams that answered no query in flight (late, spoofed, mismatched)
        self.opened = 0  # sockets opened since start

    async def _open(self, slot: int) -> _Socket:
        """A new socket in `slot` (a task of its own: a query that gives up waiting does not stop it)."""
        try:
            sock = socket.socket(self.family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.connect((self.host, self.port))  # UDP: no packet sent; the kernel binds a random local port
                loop = asyncio.get_running_loop()
                _, made = await loop.create_datagram_endpoint(lambda: _Socket(self), sock=sock)
            except BaseException:
                sock.close()
                raise
            self._slots[slot] = made
            self.opened += 1
            return made
        finally:
            self._opening.pop(slot, None)

    def send(self, out: bytes, question: bytes, timeout: float) -> asyncio.Future[bytes] | None:
        """Send `out` (our query; its ID is set here) on an open socket of a slot chosen at random, and return the
        future of the matching reply, which fails with TimeoutError after `timeout` seconds; None (nothing sent)
        when that slot has no socket open, or a used-up or old one (retired here): `ask` opens one.
        Raises OSError when the query cannot be sent at all."""
        s = self._slots[self._random.below(self.size)]
        if s is None:
            return None
        if not s.usable(self.max_uses, self.max_age):
            if not s.closing:
                s.retire()
            return None
        return self._send(s, out, question, timeout)

    async def ask(self, out: bytes, question: bytes, timeout: float) -> asyncio.Future[bytes]:
        """`send`, on a slot whose socket is opened first when it has none (or replaced, when it is used up)."""
        slot = self._random.below(self.size)
        s = self._slots[slot]
        if s is None or not s.usable(self.max_uses, self.max_age):
            if s is not None and not s.closing:
                s.retire()
            opening = self._opening.get(slot)
            if opening is None:  # the queries that pick this slot while it opens wait for the same socket
                opening = self._opening[slot] = asyncio.get_running_loop().create_task(self._open(slot))
                opening.add_done_callback(_retrieved)
            s = await asyncio.shield(opening)
        return self._send(s, out, question, timeout)

    def _send(self, s: _Socket, out: bytes, question: bytes, timeout: float) -> asyncio.Future[bytes]:
        if s.transport is None:  # closed while this query waited for it to open (the pool closed)
            raise ConnectionError("upstream socket closed")
        loop = asyncio.get_running_loop()
        qid = self._random.below(65536)
        while qid in s.waiting:
            qid = self._random.below(65536)
        future: asyncio.Future[bytes] = loop.create_future()
        timer = loop.call_later(timeout, s.expire, qid, future)
        s.waiting[qid] = (future, question, timer)
        s.uses += 1
        s.transport.sendto(codec.set_id(out, qid))  # an error sending comes back through error_received
        return future

    def retire(self) -> None:
        """No new queries here: every socket closes once its queries in flight are done (an upstream removed
        from the configuration)."""
        for i, s in enumerate(self._slots):
            if s is not None:
                s.retire()
                self._slots[i] = None

    def close(self) -> None:
        """Close every socket now; queries in flight fail with ConnectionError."""
        for opening in self._opening.values():
            opening.cancel()
        self._opening.clear()
        for s in [*self._slots, *self._draining]:
            if s is not None:
                s.fail(ConnectionError("upstream pool closed"))
                s.close()
        self._slots = [None] * self.size

    def ports(self) -> list[int]:
        """The local ports of the open sockets (tests, diagnostics)."""
        return [s.transport.get_extra_info("sockname")[1] for s in self._slots
                if s is not None and s.transport is not None]

    def in_flight(self) -> int:
        """Queries sent and not yet answered, timed out or failed."""
        return sum(len(s.waiting) for s in {*self._slots, *self._draining} if s is not None)
