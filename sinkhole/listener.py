"""asyncio UDP and TCP listeners (RFC 7766 framing, pipelining, idle timeout). Bytes in, bytes out."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct

from sinkhole.pipeline import Pending, Pipeline

log = logging.getLogger(__name__)

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


def bind_all(addresses: list[tuple[str, int]]) -> tuple[list[Bound], bool]:
    """systemd's sockets when socket-activated (whatever `addresses` says), else ours; True when systemd's."""
    from sinkhole import systemd

    passed = systemd.listen_sockets()
    if passed:
        return [(h, p, pair["udp"], pair["tcp"]) for (h, p), pair in systemd.group_by_address(passed).items()], True
    bound: list[Bound] = []
    try:
        for host, port in addresses:
            bound.append(bind_pair(host, port))
    except BaseException:
        close_all(bound)
        raise
    return bound, False


def close_all(bound: list[Bound]) -> None:
    """Close the sockets of bind_all (when what follows the binding fails)."""
    for _, _, udp, tcp in bound:
        for sock in (udp, tcp):
            if sock is not None:
                sock.close()


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


class TcpHandler:
    """One instance per listening socket; `__call__` serves one client connection."""

    def __init__(self, pipeline: Pipeline, tasks: _Tasks, idle_timeout: float, max_clients: int) -> None:
        self.pipeline = pipeline
        self.tasks = tasks
        self.idle_timeout = idle_timeout
        self.max_clients = max_clients
        self.writers: set[asyncio.StreamWriter] = set()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = peer[0] if peer else "?"
        if len(self.writers) >= self.max_clients:
            log.warning("TCP connection from %s closed: %d clients already", client, self.max_clients)
            writer.close()
            return
        self.writers.add(writer)
        inflight: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        (length,) = struct.unpack("!H", await reader.readexactly(2))
                        if length == 0:
                            break
                        data = await reader.readexactly(length)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    break
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
                else:
                    writer.write(struct.pack("!H", len(result)) + result)
                try:
                    await writer.drain()
                except ConnectionError:
                    break
            if inflight:
                await asyncio.wait(inflight)
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _forward(self, pending: Pending, client: str, writer: asyncio.StreamWriter) -> None:
        try:
            reply: bytes | None = await self.pipeline.forward(pending, client, "tcp")
        except Exception as exc:  # forward() answers its own failures; this is the last line of defence
            reply = self.pipeline.failed(pending.query.wire, client, "tcp", exc)
        if reply is not None and not writer.is_closing():
            writer.write(struct.pack("!H", len(reply)) + reply)

    def close_all(self) -> None:
        for w in list(self.writers):
            w.close()


class Listener:
    """Serves one address: the UDP and TCP sockets bound for it (by `bind_pair`, systemd or a supervisor)."""

    def __init__(self, host: str, port: int, udp_sock: socket.socket | None, tcp_sock: socket.socket | None) -> None:
        self.host = host
        self.port = port
        self.given = (udp_sock, tcp_sock)
        self.udp: asyncio.DatagramTransport | None = None
        self.udp_protocol: UdpProtocol | None = None
        self.tcp: asyncio.Server | None = None
        self.tcp_handler: TcpHandler | None = None

    async def start(self, pipeline: Pipeline, tasks: _Tasks, idle_timeout: float, max_clients: int) -> None:
        """Serve the bound sockets: from here on, queries are answered."""
        loop = asyncio.get_running_loop()
        udp_sock, tcp_sock = self.given
        if udp_sock is not None:
            self.udp, self.udp_protocol = await loop.create_datagram_endpoint(  # type: ignore[assignment]
                lambda: UdpProtocol(pipeline, tasks), sock=udp_sock)
        if tcp_sock is not None:
            self.tcp_handler = TcpHandler(pipeline, tasks, idle_timeout, max_clients)
            self.tcp = await asyncio.start_server(self.tcp_handler, sock=tcp_sock, backlog=socket.SOMAXCONN)

    def stop_tcp(self) -> None:
        """No new TCP connections; open ones go on until `close`."""
        if self.tcp is not None:
            self.tcp.close()

    def stop_udp(self) -> None:
        """Ignore datagrams from now on; the socket stays open so that forwards in flight can reply."""
        if self.udp_protocol is not None:
            self.udp_protocol.accepting = False

    def close(self) -> None:
        if self.tcp_handler is not None:
            self.tcp_handler.close_all()
        if self.udp is not None:
            self.udp.close()

    @property
    def transports(self) -> str:
        return "+".join(t for t, present in (("udp", self.udp), ("tcp", self.tcp)) if present is not None)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
