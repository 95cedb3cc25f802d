"""The per-packet fast path (sinkhole.dns.fast): every test runs against the compiled module and its pure twin.

Real UDP sockets on 127.0.0.1, real DNS packets (dnspython builds them); time is passed in, never waited for.
"""

from __future__ import annotations

import gc
import importlib
import os
import select
import socket
import time
from collections.abc import Iterator
from types import ModuleType

import dns.message
import dns.rrset
import pytest

from sinkhole.dns import _fastpure, fast

PURE = os.environ.get("SINKHOLE_PURE", "") not in ("", "0")


def _compiled() -> ModuleType | None:
    try:
        return importlib.import_module("sinkhole.dns._fast")
    except ImportError:
        return None


IMPLS = [pytest.param(_fastpure, id="pure")]
if _compiled() is not None:
    IMPLS.append(pytest.param(_compiled(), id="compiled"))


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


def test_the_compiled_module_is_built_and_picked() -> None:
    """`make test` builds sinkhole/dns/_fast.pyx: a checkout where it did not build runs everything on the twin
    without saying so, unless SINKHOLE_PURE=1 asked for that."""
    if PURE:
        assert fast.COMPILED is False and fast.Table is _fastpure.Table
    else:
        assert _compiled() is not None, "sinkhole.dns._fast was not built (a C compiler and Python headers?)"
        assert fast.COMPILED is True and fast.Table is _compiled().Table  # type: ignore[union-attr]


def query(name: str, qtype: str = "A", qid: int = 1, edns: bool = False) -> bytes:
    q = dns.message.make_query(name, qtype, use_edns=0 if edns else False)
    q.id = qid
    return q.to_wire()


def reply_for(packet: bytes, ttl: int = 300, address: str = "192.0.2.1") -> bytes:
    q = dns.message.from_wire(packet)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(q.question[0].name, ttl, "IN", "A", address))
    return r.to_wire()


def ttl_of(wire: bytes) -> int:
    return dns.message.from_wire(wire).answer[0].ttl


def ttl_offset(reply: bytes, qlen: int) -> int:
    """Where the TTL of the one answer record is: header, question, then a 2-byte pointer, type and class."""
    return 12 + qlen + 2 + 4


# ---------------------------------------------------------------------------- Table


def test_a_blocked_reply_answers_the_same_packet_under_any_id(impl: ModuleType) -> None:
    table = impl.Table()
    packet = query("chat.deepseek.com", qid=7)
    reply = reply_for(packet, address="0.0.0.0")
    assert table.put_blocked(packet, reply, "blocked", 42)
    again = query("chat.deepseek.com", qid=0xBEEF)
    got = table.answer(again, 0.0)
    assert got is not None and got[:2] == b"\xbe\xef" and got[2:] == reply[2:]
    entry = table.lookup(again[2:], 0.0)
    assert (entry.kind, entry.tag) == ("blocked", 42)
    assert table.answer(query("chat.deepseek.com", "AAAA", qid=7), 0.0) is None  # another question: not known
    assert table.answer(b"\x00\x01", 0.0) is None  # shorter than a header
    assert table.hits == 2


def test_packets_too_big_or_too_small_are_never_put(impl: ModuleType) -> None:
    table = impl.Table()
    big = query("x" * 60 + "." + "y" * 60 + ".example", edns=True) + b"\0" * (impl.MAX_PACKET)
    assert not table.put_blocked(big, big)
    assert not table.put_blocked(b"\0" * 11, b"\0" * 11)
    assert len(table) == 0


def test_a_full_table_drops_its_oldest_eighth(impl: ModuleType) -> None:
    table = impl.Table(max_entries=16)
    packets = [query(f"n{i}.example") for i in range(17)]
    for p in packets:
        table.put_blocked(p, reply_for(p))
    assert len(table) == 14  # the seventeenth found it full: the oldest three (16 // 8 + 1) went first
    assert [table.answer(p, 0.0) is not None for p in packets] == [False] * 3 + [True] * 14


def test_the_compiled_tables_entries_are_not_walked_by_the_cyclic_garbage_collector() -> None:
    """An entry holds bytes, numbers, and tuples of them (its kind, offsets and TTLs): it is never in a reference
    cycle, so the compiled Entry is not tracked by the cyclic collector. Tracked, the tens of thousands a worker
    holds under load (a) were walked at every middle-generation collection: 18-28 ms on the event loop each
    (gc.callbacks in a worker at 20k q/s, 2026-12-08). The pure twin's entries are ordinary, tracked, objects."""
    compiled = _compiled()
    if compiled is None:
        pytest.skip("sinkhole.dns._fast is not built (test_the_compiled_module_is_built_and_picked says so)")
    table = compiled.Table()
    for i in range(1000):
        p = query(f"n{i}.chat.deepseek.com")
        table.put_blocked(p, reply_for(p, address="0.0.0.0"), ("blocked", 1, "udp", None), i)
        table.put_cached(query(f"n{i}.example"), reply_for(query(f"n{i}.example")), (40,), (300,), 0.0, 300.0)
    assert len(table) == 2000
    entry = table.lookup(query("n7.chat.deepseek.com")[2:], 0.0)
    assert entry is not None and entry.tag == 7 and not gc.is_tracked(entry)
    assert not any(type(o) is compiled.Entry for o in gc.get_objects())


def test_a_cached_reply_ages_its_ttls_by_whole_seconds_and_expires(impl: ModuleType) -> None:
    table = impl.Table()
    packet = query("www.example.org")
    reply = reply_for(packet, ttl=300)
    qlen = len(packet) - 12
    assert table.put_cached(packet, reply, (ttl_offset(reply, qlen),), (300,), 1000.0, 1300.0)
    assert ttl_of(table.answer(packet, 1000.9)) == 300
    assert ttl_of(table.answer(packet, 1001.0)) == 299
    assert ttl_of(table.answer(query("www.example.org", qid=99), 1250.5)) == 50
    assert table.answer(packet, 1300.0) is None  # expired: removed, the slow path asks upstream
    assert len(table) == 0


def test_a_cached_reply_due_for_refresh_goes_the_slow_way(impl: ModuleType) -> None:
    table = impl.Table()
    packet = query("www.example.org")
    reply = reply_for(packet, ttl=100)
    table.put_cached(packet, reply, (ttl_offset(reply, len(packet) - 12),), (100,), 0.0, 100.0, refresh_at=90.0)
    assert table.answer(packet, 89.0) is not None
    assert table.answer(packet, 90.0) is None  # the pipeline's cache sees this hit and schedules the prefetch
    assert table.answer(packet, 50.0) is None  # and it is gone until the pipeline puts the refreshed one


def test_a_clock_before_the_entry_was_stored_is_not_trusted(impl: ModuleType) -> None:
    table = impl.Table()
    packet = query("www.example.org")
    reply = reply_for(packet, ttl=100)
    table.put_cached(packet, reply, (ttl_offset(reply, len(packet) - 12),), (100,), 50.0, 150.0)
    assert table.answer(packet, 49.0) is None


# ---------------------------------------------------------------------------- Clients


def test_clients_are_classified_once_and_rate_limited_per_client_and_network(impl: ModuleType) -> None:
    asked: list[str] = []
    table = impl.Table()

    def classify(text: str) -> tuple:
        asked.append(text)
        return table, text == "127.0.0.1", text.rsplit(".", 1)[0]

    clients = impl.Clients(classify, rate=10.0, burst=3.0, net_rate=1.0, net_burst=5.0)
    a = clients.lookup("10.0.0.1")
    assert clients.lookup("10.0.0.1") is a and asked == ["10.0.0.1"]
    assert [clients.admit(a, 0.0) for _ in range(4)] == [True, True, True, False]  # the client's burst of 3
    assert clients.admit(a, 0.1)  # 10/s: one more token after 0.1 s
    b = clients.lookup("10.0.0.2")  # same network: its bucket (burst 5, 1/s) has 1.1 tokens left
    assert [clients.admit(b, 0.1), clients.admit(b, 0.1)] == [True, False]
    local = clients.lookup("127.0.0.1")  # exempt: no buckets at all
    assert all(clients.admit(local, 0.0) for _ in range(100))
    clients.clear()
    assert len(clients) == 0
    clients.lookup("10.0.0.1")
    assert asked.count("10.0.0.1") == 2


def test_no_rate_limit_admits_everything(impl: ModuleType) -> None:
    clients = impl.Clients(lambda text: (None, False, text))
    c = clients.lookup("192.0.2.9")
    assert all(clients.admit(c, 0.0) for _ in range(10_000))
    assert c.table is None


# ---------------------------------------------------------------------------- Tally


def test_identical_answers_within_a_window_are_one_row_with_a_count(impl: ModuleType) -> None:
    tally = impl.Tally(1.0)
    for i in range(1000):
        tally.add("10.0.0.1", 5, "udp", 100.0 + i / 1000)
    tally.add("10.0.0.2", 5, "udp", 100.5)
    tally.add("10.0.0.1", 6, "udp", 100.6)
    tally.add("10.0.0.1", 5, "tcp", 100.7)
    rows = sorted(tally.take())
    assert rows == [(5, "10.0.0.1", "tcp", 1, 100.7, 100.7), (5, "10.0.0.1", "udp", 1000, 100.0, 100.999),
                    (5, "10.0.0.2", "udp", 1, 100.5, 100.5), (6, "10.0.0.1", "udp", 1, 100.6, 100.6)]
    assert sum(r[3] for r in rows) == tally.added == 1003
    assert tally.take() == [] and len(tally) == 0


def test_window_zero_is_one_row_per_answer(impl: ModuleType) -> None:
    tally = impl.Tally(0)
    for i in range(5):
        tally.add("10.0.0.1", 5, "udp", float(i))
    assert tally.take() == [(5, "10.0.0.1", "udp", 1, float(i), float(i)) for i in range(5)]


# ---------------------------------------------------------------------------- UdpFast, on real sockets


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(10)
    try:
        yield server, client
    finally:
        server.close()
        client.close()


def read_all(sock: socket.socket, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        out.append(sock.recv(65535))
    return out


def test_udp_answers_what_the_table_knows_and_returns_the_rest(impl: ModuleType,
                                                                pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    table = impl.Table()
    blocked = query("chat.deepseek.com", qid=1)
    reply = reply_for(blocked, address="0.0.0.0")
    table.put_blocked(blocked, reply, ("blocked", 1, "udp", None), 9)
    tally = impl.Tally(1.0)
    fastpath = impl.UdpFast(server, impl.Clients(lambda text: (table, True, text)), tally)
    target = server.getsockname()
    unknown = query("www.example.org", qid=77)
    for qid in range(100, 110):
        client.sendto(query("chat.deepseek.com", qid=qid), target)
    client.sendto(unknown, target)
    slow = drain_until(fastpath, 11)
    replies = read_all(client, 10)
    assert sorted(r[:2] for r in replies) == [qid.to_bytes(2, "big") for qid in range(100, 110)]
    assert all(r[2:] == reply[2:] for r in replies)
    assert [(data, addr[0], admitted) for data, addr, admitted in slow] == [(unknown, "127.0.0.1", True)]
    assert slow[0][1] == client.getsockname()  # the slow path answers to this address
    assert (fastpath.received, fastpath.answered, fastpath.send_failed) == (11, 10, 0)
    assert fastpath.counts == {("blocked", 1, "udp", None): 10}
    assert tally.take() == [(9, "127.0.0.1", "udp", 10, 5.0, 5.0)]
    known = len(fastpath.clients)
    fastpath.clients.lookup("127.0.0.1")  # as TCP asks: the client UDP found, with the same buckets
    assert len(fastpath.clients) == known == 1


def drain_until(fastpath: object, count: int, deadline: float = 10.0) -> list:
    """drain() whenever the socket is readable, until `count` packets were read (or the deadline)."""
    slow: list = []
    end = time.monotonic() + deadline
    while fastpath.received < count and time.monotonic() < end:  # type: ignore[attr-defined]
        select.select([fastpath.sock], [], [], 0.05)  # type: ignore[attr-defined]
        slow += fastpath.drain(1.0, 5.0)  # type: ignore[attr-defined]
    assert fastpath.received == count  # type: ignore[attr-defined]
    return slow


def test_udp_hands_over_clients_without_a_table_and_over_their_limit(
        impl: ModuleType, pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    table = impl.Table()
    packet = query("chat.deepseek.com", qid=1)
    table.put_blocked(packet, reply_for(packet), "blocked", 1)
    target = server.getsockname()

    slow_clients = impl.UdpFast(server, impl.Clients(lambda text: (None, False, text)), impl.Tally())
    client.sendto(packet, target)
    assert [(d, a) for d, _, a in drain_until(slow_clients, 1)] == [(packet, None)]

    limited = impl.UdpFast(server, impl.Clients(lambda text: (table, False, text), rate=1.0, burst=2.0), impl.Tally())
    for _ in range(3):
        client.sendto(packet, target)
    slow = drain_until(limited, 3)
    assert [a for _, _, a in slow] == [False]  # the third is over the burst of 2: the slow path answers TC=1
    assert len(read_all(client, 2)) == 2 and limited.answered == 2


def test_udp_reads_many_at_once_within_its_budget(impl: ModuleType, pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    table = impl.Table()
    packet = query("chat.deepseek.com", qid=1)
    table.put_blocked(packet, reply_for(packet), None, None)
    fastpath = impl.UdpFast(server, impl.Clients(lambda text: (table, True, text)), impl.Tally())
    for qid in range(200):
        client.sendto(query("chat.deepseek.com", qid=qid), server.getsockname())
    select.select([server], [], [], 10)
    first = fastpath.drain(0.0, 0.0, budget=50)
    assert first == [] and fastpath.received <= 50
    drain_until(fastpath, 200)
    assert fastpath.answered == 200 and fastpath.counts == {}  # kind None: not counted; tag None: not audited
    assert len({r[:2] for r in read_all(client, 200)}) == 200


def test_udp_over_ipv6(impl: ModuleType) -> None:
    server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        server.bind(("::1", 0))
        server.setblocking(False)
        client.settimeout(10)
        table = impl.Table()
        packet = query("chat.deepseek.com", qid=1)
        table.put_blocked(packet, reply_for(packet), "blocked", 3)
        seen: list[str] = []
        tally = impl.Tally()
        fastpath = impl.UdpFast(server, impl.Clients(lambda text: (seen.append(text), (table, True, text))[1]), tally)
        client.sendto(query("chat.deepseek.com", qid=5), server.getsockname()[:2])
        client.sendto(query("other.example", qid=6), server.getsockname()[:2])
        slow = drain_until(fastpath, 2)
        assert client.recv(65535)[:2] == b"\x00\x05"
        assert seen == ["::1"] and slow[0][1][0] == "::1" and slow[0][1][1] == client.getsockname()[1]
        assert tally.take()[0][:4] == (3, "::1", "udp", 1)
    finally:
        server.close()
        client.close()
