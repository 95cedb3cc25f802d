"""The HTTP layer the block page and the web console share: an aiohttp app behind a gate that bounds
what any one client can hold.

`Gate.serve(sockets)` accepts on listening sockets bound earlier (before root was dropped, or passed by
systemd). Each new connection is checked against the caps before a byte of it is read: connections in
all (`max_connections`) and per client address (`per_address`), and a token bucket of new connections
per address (`rate`, `burst`); over a cap the connection is closed at once, or, with `answer_refused` (the
console: a person at a browser should read why), answered `429 Too Many Requests` with `Retry-After`, at
most REFUSALS of them at once (beyond, closed at once: a flood still costs nothing). Then its first byte says
what it speaks: 0x16 starts a TLS handshake (the gate asks `tls_for(peer)` for the context, with a
handshake deadline), anything else is plain HTTP. The aiohttp server behind it limits each request
(header lines and fields, the body: `max_body`) and closes idle keep-alive connections; the gate also
aborts any connection older than `lifetime`, so that a client trickling bytes cannot hold a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from sinkhole.policy.names import client_address

log = logging.getLogger(__name__)
http_log = logging.getLogger("sinkhole.web.http")  # aiohttp's server logger for our apps (see _ClientFaults)


class _ClientFaults(logging.Filter):
    """aiohttp logs a request it cannot parse (a line too long, too many headers, not HTTP at all: the client's
    fault) as an ERROR with a traceback, so that any client could put lines into `journalctl -p err`. Such a
    record becomes one DEBUG line; an error of the server's own stays an ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        fault = record.exc_info[1] if record.exc_info else None
        if isinstance(fault, HttpProcessingError) and record.levelno > logging.DEBUG:
            http_log.debug("a request that is not valid HTTP from %s: %s", record.args[0] if record.args else "?",
                           str(fault).splitlines()[0] if str(fault) else type(fault).__name__)
            return False
        return True


http_log.addFilter(_ClientFaults())

TLS_HANDSHAKE = 0x16  # the first byte of a TLS record carrying a ClientHello
REFUSALS = 16  # refused connections answered with a 429 at once; beyond, reset
REFUSAL_SECONDS = 5.0  # how long a refused connection may take to send its request head and read the 429


@dataclass(frozen=True)
class Limits:
    max_connections: int = 512  # open at once, all clients
    per_address: int = 16  # open at once from one client address
    rate: float = 10.0  # new connections per second per address (token bucket) ...
    burst: float = 40.0  # ... and how many may come at once
    first_byte: float = 10.0  # seconds a new connection has to send its first byte
    handshake: float = 10.0  # seconds for the TLS handshake
    lifetime: float = 60.0  # seconds any connection may stay open, busy or not
    keepalive: float = 5.0  # seconds an idle keep-alive connection stays open
    max_body: int = 8192  # bytes of a request body (the access request form)
    max_line: int = 4096  # bytes of the request line and of one header line
    max_headers: int = 64
    answer_refused: bool = False  # over a cap: HTTP 429 with Retry-After (else the connection is reset)

    def server_kwargs(self) -> dict:
        """What aiohttp's AppRunner takes for these limits."""
        return {"keepalive_timeout": self.keepalive, "max_line_size": self.max_line,
                "max_field_size": self.max_line, "max_headers": self.max_headers, "access_log": None,
                "logger": http_log}


def where(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens, self.stamp = tokens, stamp


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the gate told when it closes."""

    def __init__(self, inner: asyncio.Protocol, done: Callable[[], None]) -> None:
        self.inner = inner
        self.done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.inner.connection_lost(exc)
        finally:
            self.done()


def peer_key(address: str) -> str:
    """The address a cap counts: a v4-mapped IPv6 address as its IPv4 address."""
    parsed = client_address(address)
    return str(parsed) if parsed is not None else address


class Gate:
    """Accepts connections for one aiohttp app within `limits` (see the module's text)."""

    def __init__(self, app: web.Application, limits: Limits,
                 tls_for: Callable[[str], ssl.SSLContext | None] | None = None, name: str = "web") -> None:
        self.app = app
        self.limits = limits
        self.tls_for = tls_for
        self.name = name
        self.runner: web.AppRunner | None = None
        self.open: dict[str, int] = {}
        self.total = 0
        self.buckets: dict[str, _Bucket] = {}
        self.refused = 0  # connections closed at accept, over a cap
        self.accepted = 0
        self._refusing = 0  # refused connections being answered (answer_refused)
        self._accepting: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.BaseTransport] = set()
        self.sockets: list[socket.socket] = []

    async def serve(self, sockets: list[socket.socket]) -> None:
        self.runner = web.AppRunner(self.app, handle_signals=False, **self.limits.server_kwargs())
        await self.runner.setup()
        loop = asyncio.get_running_loop()
        for sock in sockets:
            sock.setblocking(False)
            self.sockets.append(sock)
            self._accepting.append(loop.create_task(self._accept(sock)))

    async def close(self) -> None:
        tasks = [*self._accepting, *self._connections]
        for task in tasks:
            task.cancel()
        for transport in list(self._transports):
            transport.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.runner is not None:
            await self.runner.cleanup()
        for sock in self.sockets:
            sock.close()

    # ------------------------------------------------------------------ admission

    def admit(self, peer: str, now: float) -> float:
        """0 when a new connection from `peer` may open (and it is counted), else the seconds to wait before
        the next one may (Retry-After)."""
        lim = self.limits
        if self.total >= lim.max_connections or self.open.get(peer, 0) >= lim.per_address:
            return 1.0  # a slot frees when any connection closes: soon, but nobody knows when
        bucket = self.buckets.get(peer)
        if bucket is None:
            if len(self.buckets) >= 65536:  # forget the full buckets of clients long gone
                self.buckets = {k: b for k, b in self.buckets.items() if now - b.stamp < lim.burst / lim.rate}
            bucket = self.buckets[peer] = _Bucket(lim.burst, now)
        bucket.tokens = min(lim.burst, bucket.tokens + (now - bucket.stamp) * lim.rate)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            return (1.0 - bucket.tokens) / lim.rate
        bucket.tokens -= 1.0
        self.open[peer] = self.open.get(peer, 0) + 1
        self.total += 1
        return 0.0

    def release(self, peer: str) -> None:
        left = self.open.get(peer, 0) - 1
        if left > 0:
            self.open[peer] = left
        else:
            self.open.pop(peer, None)
        self.total -= 1

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(listening)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and the like: wait a moment rather than spin
                log.warning("%s: accept failed: %s", self.name, exc)
                await asyncio.sleep(0.1)
                continue
            peer = peer_key(address[0])
            wait = self.admit(peer, time.monotonic())
            if wait:
                self.refused += 1
                if self.limits.answer_refused and self._refusing < REFUSALS:
                    self._refusing += 1
                    task = loop.create_task(self._refuse(conn, peer, wait))
                    self._connections.add(task)
                    task.add_done_callback(self._connections.discard)
                    continue
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()
                continue
            self.accepted += 1
            conn.setblocking(False)
            task = loop.create_task(self._connection(conn, peer))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _refuse(self, conn: socket.socket, peer: str, wait: float) -> None:
        """A connection over a cap, answered: its request head is read (over TLS when it speaks TLS), then
        `429 Too Many Requests` with Retry-After, and the connection closed; all within REFUSAL_SECONDS."""
        loop = asyncio.get_running_loop()
        transport: asyncio.BaseTransport | None = None
        retry = max(1, math.ceil(wait))
        body = f"Too many connections from {peer}: try again in {retry} s.\n".encode()
        try:
            async with asyncio.timeout(REFUSAL_SECONDS):
                conn.setblocking(False)
                readable = loop.create_future()
                loop.add_reader(conn.fileno(), lambda: readable.done() or readable.set_result(None))
                try:
                    await readable
                finally:
                    loop.remove_reader(conn.fileno())
                head = conn.recv(1, socket.MSG_PEEK)
                ctx = self.tls_for(peer) if head and head[0] == TLS_HANDSHAKE and self.tls_for is not None else None
                if head and head[0] == TLS_HANDSHAKE and ctx is None:
                    raise ConnectionError("TLS asked, none configured")
                reader = asyncio.StreamReader(limit=self.limits.max_line * 4)
                protocol = asyncio.StreamReaderProtocol(reader)
                transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn, ssl=ctx)
                writer = asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: %d\r\nContent-Type: text/plain; "
                             b"charset=utf-8\r\nContent-Length: %d\r\nCache-Control: no-store\r\n"
                             b"Connection: close\r\n\r\n%s" % (retry, len(body), body))
                await writer.drain()
                writer.close()
                await writer.wait_closed()
        except (OSError, ConnectionError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            log.debug("%s: a refused connection from %s was not answered: %s", self.name, peer, exc)
        finally:
            if transport is not None:
                transport.abort()
            else:
                conn.close()
            self._refusing -= 1

    async def _connection(self, conn: socket.socket, peer: str) -> None:
        """Peek at the first byte, then hand the socket to aiohttp, over TLS or not; abort it at its deadline."""
        loop = asyncio.get_running_loop()
        closed: asyncio.Future[None] = loop.create_future()

        def done() -> None:
            if not closed.done():
                closed.set_result(None)
                self.release(peer)

        try:
            readable = loop.create_future()
            loop.add_reader(conn.fileno(), lambda: readable.done() or readable.set_result(None))
            try:
                await asyncio.wait_for(readable, self.limits.first_byte)
            finally:
                loop.remove_reader(conn.fileno())
            first = conn.recv(1, socket.MSG_PEEK)
            if not first:
                raise ConnectionError("closed before a byte")
            ctx = None
            if first[0] == TLS_HANDSHAKE:
                ctx = self.tls_for(peer) if self.tls_for is not None else None
                if ctx is None:
                    raise ConnectionError("TLS asked, none configured")
            assert self.runner is not None and self.runner.server is not None
            protocol = _Counted(self.runner.server(), done)
            transport, _ = await asyncio.wait_for(loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=ctx, ssl_handshake_timeout=self.limits.handshake if ctx else None),
                self.limits.handshake + 1)
        except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
            log.debug("%s: connection from %s closed before a request: %s", self.name, peer, exc)
            conn.close()
            done()
            return
        except asyncio.CancelledError:
            conn.close()
            done()
            raise
        self._transports.add(transport)
        try:
            await asyncio.wait_for(asyncio.shield(closed), self.limits.lifetime)
        except TimeoutError:  # its deadline, whatever it was doing
            log.debug("%s: connection from %s aborted after %.0f s", self.name, peer, self.limits.lifetime)
            transport.abort()
            done()
        finally:
            self._transports.discard(transport)


class Served(Protocol):
    """An HTTP app that starts on listening sockets and stops (the block page, the console)."""

    async def start(self, sockets: list[socket.socket]) -> None: ...

    async def stop(self) -> None: ...


class Service:
    """Runs a Served app on an event loop of its own, in a thread of the server process: what it does (TLS
    handshakes, templates, waiting on the database) never holds up the DNS event loop."""

    def __init__(self, app: Served, sockets: list[socket.socket], name: str) -> None:
        self.app = app
        self.sockets = sockets
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()
        self._stopped: asyncio.Event | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self.thread.start()
        self._started.wait(30)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stopped = asyncio.Event()
            try:
                await self.app.start(self.sockets)
            except BaseException as exc:
                self.error = exc
                self._started.set()
                return
            self._started.set()
            await self._stopped.wait()
            await self.app.stop()

        try:
            self.loop.run_until_complete(main())
        finally:
            self.loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self.loop is not None and self._stopped is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._stopped.set)
        self.thread.join(timeout)
