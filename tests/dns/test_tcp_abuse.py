"""TCP under abuse, over real sockets: refused addresses hold no slot, one address cannot take them all,
a client that never reads its replies is closed, and TCP queries count in the rate limits."""

from __future__ import annotations

import socket
import struct
import time

import dns.message
import dns.query
import dns.rcode
import pytest

from tests.conftest import wait_for


def connect_from(server, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect((server.host, server.port))
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """The server closed (or reset) this connection without a word."""
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def ask_tcp_from(server, source: str, name: str = "chat.deepseek.com") -> dns.message.Message:
    return dns.query.tcp(dns.message.make_query(name, "A"), server.host, port=server.port, source=source, timeout=5)


def handler(server):
    return server.server.listeners[0].tcp_handler


def test_refused_addresses_never_hold_a_tcp_slot(make_server, stub):
    s = make_server(upstream=(stub.address,), allow_clients=("127.0.0.1/32",), tcp_max_clients=10)
    idle = [connect_from(s, "127.0.0.2") for _ in range(50)]
    try:
        assert all(closed_by_server(sock) for sock in idle), "closed as accepted, before any query"
        assert handler(s).slots.open == 0
        # an allowed client still gets its answer over TCP, with 50 refused connections made before it
        assert ask_tcp_from(s, "127.0.0.1").answer[0][0].to_text() == "0.0.0.0"
        assert handler(s).refused == 50
    finally:
        for sock in idle:
            sock.close()


def test_one_address_holds_at_most_its_share_of_tcp_slots(make_server, stub):
    s = make_server(upstream=(stub.address,), tcp_max_clients=10, tcp_max_per_client=4, tcp_idle_timeout=30)
    held = [connect_from(s, "127.0.0.3") for _ in range(20)]
    try:
        assert wait_for(lambda: handler(s).slots.open == 4 and handler(s).refused == 16, timeout=10)
        assert sum(closed_by_server(sock) for sock in held[4:]) == 16
        # the slots left are for everyone else
        assert ask_tcp_from(s, "127.0.0.1").answer[0][0].to_text() == "0.0.0.0"
        assert ask_tcp_from(s, "127.0.0.4").answer[0][0].to_text() == "0.0.0.0"
    finally:
        for sock in held:
            sock.close()


def test_a_client_that_never_reads_its_replies_is_closed(make_server, stub):
    s = make_server(upstream=(stub.address,), tcp_idle_timeout=1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # its kernel takes little of what we send
    sock.bind(("127.0.0.5", 0))
    sock.connect((s.host, s.port))
    sock.settimeout(2)
    wire = dns.message.make_query("chat.deepseek.com", "A").to_wire()
    framed = struct.pack("!H", len(wire)) + wire
    sent = 0
    try:
        for _ in range(15000):  # pipelined, never read; stops when the server stops reading us
            sock.sendall(framed)
            sent += 1
    except (TimeoutError, OSError):
        pass
    try:
        assert sent > 1000
        # closed within the idle timeout of not reading, though still connected and still not reading
        assert wait_for(lambda: not handler(s).writers, timeout=15), (
            f"{len(handler(s).writers)} connections still open after {sent} queries never read")
        # what it left unread was dropped with the connection (reset), not kept in the kernel to be sent
        received, reset = 0, False
        sock.settimeout(5)
        try:
            while chunk := sock.recv(65536):
                received += len(chunk)
        except ConnectionResetError:
            reset = True
        least = sent * len(framed)  # every reply is longer than its query
        assert reset and received < least, f"{received} reply bytes delivered after close ({sent} queries)"
        assert handler(s).stalled == 1 and handler(s).slots.open == 0
    finally:
        sock.close()


@pytest.mark.parametrize("action", ["truncate", "refuse"])
def test_tcp_queries_count_in_the_rate_limits(make_server, stub, action):
    # a burst of 5, then (nearly) nothing: a token every 100 s
    s = make_server(upstream=(stub.address,), rate_limit=0.01, rate_limit_burst=5, rate_limit_net=0,
                    rate_limit_exempt=(), rate_limit_action=action, tcp_idle_timeout=1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.6", 0))
        sock.settimeout(10)
        sock.connect((s.host, s.port))
        for i in range(8):  # pipelined on one connection
            dns.query.send_tcp(sock, dns.message.make_query(f"n{i}.chat.deepseek.com", "A"))
        codes = [dns.query.receive_tcp(sock)[0].rcode() for _ in range(8)]
    # over the limit, the connection is read from only once per tcp_idle_timeout, and each query then REFUSED
    assert codes == [dns.rcode.NOERROR] * 5 + [dns.rcode.REFUSED] * 3
    # another address is not limited by it
    assert ask_tcp_from(s, "127.0.0.7").rcode() == dns.rcode.NOERROR


def test_queries_left_in_a_connections_buffer_at_shutdown_are_not_answered_unaudited(make_server, stub, db,
                                                                                      monkeypatch):
    """A connection read at its rate limit still holds pipelined queries when the server stops: none of them may
    be answered (and counted) once the audit writer has stopped, or a blocked answer would have no row."""
    from sinkhole.audit.writer import AuditLog
    from tests.conftest import audit_rows

    real_close = AuditLog.close

    def close_then_linger(self, timeout: float = 30.0) -> None:
        real_close(self, timeout)
        time.sleep(1.5)  # the event loop goes on meanwhile, as it does while a large queue is flushed

    monkeypatch.setattr(AuditLog, "close", close_then_linger)
    s = make_server(upstream=(stub.address,), rate_limit=5, rate_limit_burst=5, rate_limit_net=0,
                    rate_limit_exempt=())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.8", 0))
    sock.settimeout(10)
    sock.connect((s.host, s.port))
    try:
        sock.sendall(b"".join(struct.pack("!H", len(w)) + w for w in
                              (dns.message.make_query(f"n{i}.chat.deepseek.com", "A").to_wire() for i in range(50))))
        for _ in range(5):  # the burst is answered; then the connection waits for a token
            dns.query.receive_tcp(sock)
        s.stop()
    finally:
        sock.close()
    blocked = s.server.pipeline.counts.get("blocked", 0)
    assert blocked >= 5
    assert len([r for r in audit_rows(db) if r["action"] == "blocked"]) == blocked
