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
        except Exception:
            log.exception("unexpected error handling a UDP query from %s", addr[0])
            return
        if result is None:
            return
        if isinstance(result, Pending):
            self.tasks.spawn(self._forward(result, addr))
        elif self.transport is not None:
            self.transport.sendto(result, addr)

    async def _forward(self, pending: Pending, addr: tuple) -> None:
        try:
            reply = await self.pipeline.forward(pending, addr[0], "udp")
        except Exception:
            log.exception("unexpected error forwarding a UDP query from %s", addr[0])
            return
        if self.transport is not None and not self.transport.is_closing():
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
                except Exception:
                    log.exception("unexpected error handling a TCP query from %s", client)
                    break
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
            reply = await self.pipeline.forward(pending, client, "tcp")
        except Exception:
            log.exception("unexpected error forwarding a TCP query from %s", client)
            return
        if not writer.is_closing():
            writer.write(struct.pack("!H", len(reply)) + reply)

    def close_all(self) -> None:
        for w in list(self.writers):
            w.close()


class Listener:
    """UDP and TCP on one address and port; with port 0 both get the same free port."""

    def __init__(self, host: str, port: int, udp_sock: socket.socket | None = None,
                 tcp_sock: socket.socket | None = None) -> None:
        self.host = host
        self.port = port
        self.given = (udp_sock, tcp_sock)  # already bound (socket activation, or a parent process)
        self.udp: asyncio.DatagramTransport | None = None
        self.udp_protocol: UdpProtocol | None = None
        self.tcp: asyncio.Server | None = None
        self.tcp_handler: TcpHandler | None = None

    async def start(self, pipeline: Pipeline, tasks: _Tasks, idle_timeout: float, max_clients: int) -> None:
        loop = asyncio.get_running_loop()
        handler = TcpHandler(pipeline, tasks, idle_timeout, max_clients)
        udp_sock, tcp_sock = self.given
        if udp_sock is not None or tcp_sock is not None:
            if udp_sock is not None:
                self.udp, self.udp_protocol = await loop.create_datagram_endpoint(
                    lambda: UdpProtocol(pipeline, tasks), sock=udp_sock)
            if tcp_sock is not None:
                self.tcp = await asyncio.start_server(handler, sock=tcp_sock, backlog=socket.SOMAXCONN)
                self.tcp_handler = handler
            return
        for _attempt in range(50):
            udp, proto = await loop.create_datagram_endpoint(lambda: UdpProtocol(pipeline, tasks),
                                                             local_addr=(self.host, self.port))
            port = udp.get_extra_info("sockname")[1]
            try:
                tcp = await asyncio.start_server(handler, self.host, port, reuse_address=True)
            except OSError as exc:
                udp.close()
                if self.port == 0 and exc.errno == errno.EADDRINUSE:
                    continue  # the free UDP port is taken for TCP: try another
                raise
            self.udp, self.tcp, self.tcp_handler, self.port = udp, tcp, handler, port
            self.udp_protocol = proto  # type: ignore[assignment]
            return
        raise OSError(errno.EADDRINUSE, f"no port free for both UDP and TCP on {self.host}")

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
