"""asyncio UDP and TCP listeners (RFC 7766 framing, pipelining, idle timeout). Bytes in, bytes out."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import socket
import struct
import termios

from sinkhole import logthrottle
from sinkhole.dns import codec, fast
from sinkhole.dns.guard import Admission
from sinkhole.dns.pipeline import Pending, Pipeline
from sinkhole.model import Action

log = logging.getLogger(__name__)
OK = Admission.OK
CACHED = Action.CACHED.value

UDP_RCVBUF = 4 * 1024 * 1024
Bound = tuple[str, int, socket.socket | None, socket.socket | None]  # host, port, udp, tcp


def bind_pair(host: str, port: int) -> Bound:
    """UDP and TCP sockets on one address; with port 0, the same free port for both."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _attempt in range(50):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
            except OSError:
                pass
            udp.bind((host, port))
            actual = udp.getsockname()[1]
            try:
                tcp.bind((host, actual))
            except OSError as exc:
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    udp.close()
                    tcp.close()
                    continue
                raise
            tcp.listen(socket.SOMAXCONN)
            udp.setblocking(False)
            tcp.setblocking(False)
            return host, actual, udp, tcp
        except BaseException:
            udp.close()
            tcp.close()
            raise
    raise OSError(errno.EADDRINUSE, f"no port free for both UDP and TCP on {host}")


class _Tasks:
    """Tasks in flight, so that shutdown can wait for them."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: object) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


class UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, pipeline: Pipeline, tasks: _Tasks) -> None:
        self.pipeline = pipeline
        self.tasks = tasks
        self.transport: asyncio.DatagramTransport | None = None
        self.accepting = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # grow the buffer for bursts, never shrink one systemd already set larger
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < UDP_RCVBUF:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
            except OSError:
                pass

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if not self.accepting:
            return
        try:
            result = self.pipeline.begin(data, addr[0], "udp")
        except Exception as exc:  # never silence: the client gets SERVFAIL
            result = self.pipeline.failed(data, addr[0], "udp", exc)
        if result is None:
            return
        if isinstance(result, Pending):
            self.tasks.spawn(self._forward(result, addr))
        elif self.transport is not None:
            self.transport.sendto(result, addr)

    async def _forward(self, pending: Pending, addr: tuple) -> None:
        try:
            reply: bytes | None = await self.pipeline.forward(pending, addr[0], "udp")
        except Exception as exc:  # forward() answers its own failures; this is the last line of defence
            reply = self.pipeline.failed(pending.query.wire, addr[0], "udp", exc)
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP socket error: %s", exc)


class FastUdp:
    """The UDP side of a Listener when the pipeline has a fast path (`Pipeline.shortcuts`, sinkhole.dns.shortcut):
    it owns the socket (read on the event loop's reader callback), and each time it is readable sinkhole.dns.fast's
    UdpFast reads what is waiting (recvmmsg when compiled) and answers what the tables know (the blocked answers of
    the policy in force, fresh cache hits) with sendmmsg, without Pipeline.begin; it hands back the rest, which
    goes to Pipeline.begin as UdpProtocol's datagrams do (what begin answers there is learnt for the next time)."""

    # datagrams read per readable event, at most (one recvmmsg when compiled): then the event loop turns to the rest,
    # and the other workers reading the same socket get their share, as with uvloop's UDP transport (libuv reads up
    # to 32 a poll event); with 256 one worker can take a whole burst before the others wake
    BUDGET = 32

    def __init__(self, sock: socket.socket, pipeline: Pipeline, tasks: _Tasks) -> None:
        assert pipeline.shortcuts is not None
        self.sock = sock
        self.pipeline = pipeline
        self.shortcuts = pipeline.shortcuts
        self.tasks = tasks
        self.fast = fast.UdpFast(sock, self.shortcuts.clients, self.shortcuts.tally)
        self.accepting = False
        self.closed = False
        self.send_failed = 0  # replies of the slow path the socket did not take (its buffer full)

    def start(self) -> None:
        try:  # grow the buffer for bursts, never shrink one systemd already set larger
            if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < UDP_RCVBUF:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        except OSError:
            pass
        self.sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self.shortcuts.start(loop)
        loop.add_reader(self.sock.fileno(), self._readable)
        self.accepting = True

    def _readable(self) -> None:
        pipeline, shortcuts, fp = self.pipeline, self.shortcuts, self.fast
        shortcuts.check()  # a new policy snapshot, guard or answers: the tables start empty
        if fp.clients is not shortcuts.clients:
            fp.clients = shortcuts.clients
        if fp.counts is not pipeline.detail:  # its answers are counted where the pipeline counts its own
            fp.counts, fp.actions = pipeline.detail, pipeline.counts
        cached = pipeline.counts.get(CACHED, 0)
        slow = fp.drain(pipeline.clock(), pipeline.wallclock(), self.BUDGET)
        hits = pipeline.counts.get(CACHED, 0) - cached
        if hits:
            pipeline.cache.hits += hits
        refusals = shortcuts.not_admitted
        for data, addr, admitted in slow:
            # admitted: None (the guard was not asked), True (it said OK), False (it refused: what it said is next
            # in refusals); begin asks it only in the first case, so that a packet takes one token, as today
            said = None if admitted is None else OK if admitted else refusals.popleft()
            try:
                result = pipeline.begin(data, addr[0], "udp", said)
            except Exception as exc:  # never silence: the client gets SERVFAIL
                result = pipeline.failed(data, addr[0], "udp", exc)
            if result is None:
                continue
            if isinstance(result, Pending):
                self.tasks.spawn(self._forward(result, addr))
            else:
                self._send(result, addr)

    def _send(self, reply: bytes, addr: tuple) -> None:
        if self.closed:
            return
        try:
            self.sock.sendto(reply, addr)
        except (BlockingIOError, InterruptedError):
            self.send_failed += 1
        except OSError as exc:
            log.debug("UDP send to %s failed: %s", addr[0], exc)

    async def _forward(self, pending: Pending, addr: tuple) -> None:
        try:
            reply: bytes | None = await self.pipeline.forward(pending, addr[0], "udp")
        except Exception as exc:  # forward() answers its own failures; this is the last line of defence
            reply = self.pipeline.failed(pending.query.wire, addr[0], "udp", exc)
        if reply is not None:
            self._send(reply, addr)

    def stop(self) -> None:
        """Read no more datagrams (the socket stays open for forwards in flight); the fast path's answers so far go
        to the audit log."""
        if self.accepting:
            self.accepting = False
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.shortcuts.flush()

    def close(self) -> None:
        if not self.closed:
            self.stop()
            self.shortcuts.stop()
            self.closed = True
            self.sock.close()


class ConnectionSlots:
    """Open TCP connections of one listener: at most `total`, and at most `per_address` from one address
    (Unbound's tcp-connection-limit), so that one client cannot take every slot."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self.by_address: dict[str, int] = {}
        self.open = 0

    def take(self, address: str) -> str | None:
        """A slot for a new connection from `address`; or why there is none."""
        if self.open >= self.total:
            return f"{self.total} connections open already"
        held = self.by_address.get(address, 0)
        if held >= self.per_address:
            return f"{held} connections from this address open already"
        self.by_address[address] = held + 1
        self.open += 1
        return None

    def give_back(self, address: str) -> None:
        held = self.by_address.get(address, 0) - 1
        if held > 0:
            self.by_address[address] = held
        else:
            self.by_address.pop(address, None)
        self.open -= 1


async def drain_within(writer: asyncio.StreamWriter, seconds: float) -> bool:
    """Wait until the client has read what was written down to the low-water mark; False when it did not
    within `seconds`: the caller closes the connection. A connection that broke meanwhile is not waited for
    (True): reading from it ends the handler."""
    if writer.transport.get_write_buffer_size() <= TcpHandler.WRITE_HIGH:
        return True  # nothing to wait for (and no timer to set up, on every query)
    try:
        async with asyncio.timeout(seconds):
            await writer.drain()
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def unsent(writer: asyncio.StreamWriter) -> int:
    """Bytes written to the connection that the client has not taken yet: in our buffer and in the kernel's
    send queue (Linux SIOCOUTQ; 0 where it cannot be asked)."""
    size = writer.transport.get_write_buffer_size()
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            size += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except (OSError, ValueError):
            pass
    return size


async def delivered_within(writer: asyncio.StreamWriter, seconds: float) -> bool:
    """Wait until the client has taken every reply (our buffer and the kernel's send queue); False when it
    has not within `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    if not await drain_within(writer, seconds):
        return False
    while unsent(writer):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def close_now(writer: asyncio.StreamWriter) -> None:
    """Close; a connection with replies its client has not read is reset (SO_LINGER 0), so that neither its
    socket nor the kernel memory of its send queue outlives it."""
    if unsent(writer):
        sock = writer.get_extra_info("socket")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, AttributeError):
            pass
        writer.transport.abort()
    else:
        writer.close()


class TcpHandler:
    """One instance per listening socket; `__call__` serves one client connection.

    A client outside allow_clients is closed at accept, before it holds a slot; one client address holds at
    most `per_client` of the `max_clients` slots. Every query needs its whole message within `idle_timeout`,
    and every reply must be read within it too: a client whose unread replies pass WRITE_HIGH bytes is not read
    from until it reads them, and closed when it has not within `idle_timeout`, or at once past OUTPUT_MAX."""

    SOCKET_BUFFER = 64 * 1024  # the kernel's send and receive buffers of a connection (Linux doubles them)
    WRITE_HIGH = 64 * 1024  # unread reply bytes above which no more queries are read from the connection
    OUTPUT_MAX = 256 * 1024  # unread reply bytes at which the connection is closed at once
    PIPELINE_MAX = 100  # queries of one connection waiting for an upstream at once
    TURN = 16  # queries read from one connection before the event loop turns to others
    RATE_PAUSE = 1.0  # seconds a connection is not read from when its client is over its rate limit

    def __init__(self, pipeline: Pipeline, tasks: _Tasks, idle_timeout: float, max_clients: int,
                 per_client: int | None = None) -> None:
        self.pipeline = pipeline
        self.tasks = tasks
        self.idle_timeout = idle_timeout
        self.slots = ConnectionSlots(max_clients, per_client or max_clients)
        self.writers: set[asyncio.StreamWriter] = set()
        self.refused = 0  # connections closed at accept (not allowed, or no slot)
        self.stalled = 0  # connections closed because their replies were not read

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = peer[0] if peer else "?"
        if not self.pipeline.guard.allows(client):
            self.refused += 1
            logthrottle.warning(log, "TCP connection from %s closed: not in allow_clients", client)
            writer.transport.abort()
            return
        why = self.slots.take(client)
        if why is not None:
            self.refused += 1
            logthrottle.warning(log, "TCP connection from %s closed: %s", client, why)
            writer.transport.abort()
            return
        self.writers.add(writer)
        writer.transport.set_write_buffer_limits(high=self.WRITE_HIGH)
        sock = writer.get_extra_info("socket")
        try:  # bounded kernel memory: a client that does not read fills the send buffer, then ours; one that
            # pipelines faster than it may be answered fills the receive buffer, then waits
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.SOCKET_BUFFER)
        except (OSError, AttributeError):
            pass
        inflight: set[asyncio.Task[None]] = set()
        turn = 0
        try:
            while True:
                turn += 1
                if turn % self.TURN == 0:  # queries already buffered are read without a pause: let others in
                    await asyncio.sleep(0)
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        length = codec.frame_length(await reader.readexactly(2))
                        if length == 0:
                            break
                        data = await reader.readexactly(length)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    break
                if writer.transport.is_closing():  # closed (shutdown, a stall): what is still buffered goes
                    break  # unanswered, as the client will see, and unaudited with it
                try:
                    result = self.pipeline.begin(data, client, "tcp")
                except Exception as exc:  # never silence: SERVFAIL, and the connection goes on
                    result = self.pipeline.failed(data, client, "tcp", exc)
                if result is None:
                    continue
                if isinstance(result, Pending):
                    task = self.tasks.spawn(self._forward(result, client, writer))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                    if len(inflight) >= self.PIPELINE_MAX:  # read on when one of them is answered
                        await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                elif not self._send(writer, result, client):
                    return
                if not await drain_within(writer, self.idle_timeout):  # waits only above WRITE_HIGH
                    self._stalled(client, f"not read within {self.idle_timeout:.0f} s")
                    return
                wait = self.pipeline.guard.tcp_wait(client)
                if wait > 0:  # over its rate limit: read on when it is within it again, a second from now at the
                    # soonest (its other connections wait too, and would take the next token first)
                    await asyncio.sleep(min(max(wait, self.RATE_PAUSE), self.idle_timeout))
            if inflight:
                await asyncio.wait(inflight)
            if not writer.transport.is_closing() and not await delivered_within(writer, self.idle_timeout):
                self._stalled(client, f"not read within {self.idle_timeout:.0f} s")
        finally:
            self.writers.discard(writer)
            self.slots.give_back(client)
            close_now(writer)  # replies still in flight find it closing and are dropped

    def _send(self, writer: asyncio.StreamWriter, reply: bytes, client: str) -> bool:
        """Queue one reply; False (and the connection aborted) when the client has left too much unread."""
        if writer.transport.is_closing():
            return False
        if writer.transport.get_write_buffer_size() + len(reply) > self.OUTPUT_MAX:
            self._stalled(client, f"over {self.OUTPUT_MAX // 1024} KiB unread")
            writer.transport.abort()
            return False
        writer.write(codec.frame(reply))
        return True

    def _stalled(self, client: str, why: str) -> None:
        self.stalled += 1
        logthrottle.warning(log, "TCP connection from %s closed: its replies were %s", client, why)

    async def _forward(self, pending: Pending, client: str, writer: asyncio.StreamWriter) -> None:
        try:
            reply: bytes | None = await self.pipeline.forward(pending, client, "tcp")
        except Exception as exc:  # forward() answers its own failures; this is the last line of defence
            reply = self.pipeline.failed(pending.query.wire, client, "tcp", exc)
        if reply is not None:
            self._send(writer, reply, client)

    def close_all(self) -> None:
        for w in list(self.writers):
            close_now(w)


class Listener:
    """Serves one address: the UDP and TCP sockets bound for it (by `bind_pair`, systemd or a supervisor)."""

    def __init__(self, host: str, port: int, udp_sock: socket.socket | None, tcp_sock: socket.socket | None) -> None:
        self.host = host
        self.port = port
        self.given = (udp_sock, tcp_sock)
        self.udp: asyncio.DatagramTransport | None = None
        self.udp_protocol: UdpProtocol | None = None
        self.udp_fast: FastUdp | None = None  # instead of udp and udp_protocol when the pipeline has a fast path
        self.tcp: asyncio.Server | None = None
        self.tcp_handler: TcpHandler | None = None

    async def start(self, pipeline: Pipeline, tasks: _Tasks, idle_timeout: float, max_clients: int,
                    per_client: int | None = None) -> None:
        """Serve the bound sockets: from here on, queries are answered."""
        loop = asyncio.get_running_loop()
        udp_sock, tcp_sock = self.given
        if udp_sock is not None and pipeline.shortcuts is not None:
            self.udp_fast = FastUdp(udp_sock, pipeline, tasks)
            self.udp_fast.start()
        elif udp_sock is not None:
            self.udp, self.udp_protocol = await loop.create_datagram_endpoint(  # type: ignore[assignment]
                lambda: UdpProtocol(pipeline, tasks), sock=udp_sock)
        if tcp_sock is not None:
            self.tcp_handler = TcpHandler(pipeline, tasks, idle_timeout, max_clients, per_client)
            self.tcp = await asyncio.start_server(self.tcp_handler, sock=tcp_sock, backlog=socket.SOMAXCONN)

    def stop_tcp(self) -> None:
        """No new TCP connections; open ones go on until `close`."""
        if self.tcp is not None:
            self.tcp.close()

    def stop_udp(self) -> None:
        """Ignore datagrams from now on; the socket stays open so that forwards in flight can reply."""
        if self.udp_protocol is not None:
            self.udp_protocol.accepting = False
        if self.udp_fast is not None:
            self.udp_fast.stop()

    def close(self) -> None:
        if self.tcp_handler is not None:
            self.tcp_handler.close_all()
        if self.udp is not None:
            self.udp.close()
        if self.udp_fast is not None:
            self.udp_fast.close()

    @property
    def transports(self) -> str:
        udp = self.udp if self.udp_fast is None else self.udp_fast
        return "+".join(t for t, present in (("udp", udp), ("tcp", self.tcp)) if present is not None)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
