"""Upstream queries over the pool of connected UDP sockets (sinkhole.dns.pool), against a real responder on
127.0.0.1 that can also answer wrongly first (a hostile upstream, or an attacker who forges its replies), on
asyncio's event loop (the tests' servers) and on uvloop's (`sinkhole serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import dns.message
import dns.rrset
import pytest
import uvloop

from sinkhole.dns.pool import UdpPool

LOOPS = [pytest.param(asyncio.run, id="asyncio"), pytest.param(uvloop.run, id="uvloop")]
Run = Callable[[Coroutine[Any, Any, None]], None]


def query(name: str, qid: int = 0) -> bytes:
    q = dns.message.make_query(name, "A", use_edns=False)
    q.id = qid
    return q.to_wire()


def answer(wire: bytes, address: str = "192.0.2.7") -> bytes:
    q = dns.message.from_wire(wire)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", address))
    return r.to_wire()


def name_and_address(reply: bytes) -> tuple[str, str]:
    r = dns.message.from_wire(reply)
    return str(r.question[0].name), r.answer[0][0].to_text()


class Responder(asyncio.DatagramProtocol):
    """Answers every query (unless `silent`); with `hostile`, first sends what an attacker would: a reply with the
    right ID for another name, a reply with another ID for the right name, and a reply that is a copy of the query
    (QR clear), all with an answer of 203.0.113.66."""

    def __init__(self, hostile: bool = False, silent: bool = False) -> None:
        self.hostile = hostile
        self.silent = silent
        self.sources: set[int] = set()
        self.received: list[bytes] = []
        self.senders: list[tuple] = []  # where each query came from
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.sources.add(addr[1])
        self.received.append(data)
        self.senders.append(addr)
        if self.silent:
            return
        assert self.transport is not None
        qid = data[0] << 8 | data[1]
        if self.hostile:
            self.transport.sendto(answer(query("evil.example", qid), "203.0.113.66"), addr)
            self.transport.sendto(answer((qid ^ 1).to_bytes(2, "big") + data[2:], "203.0.113.66"), addr)
            self.transport.sendto(data, addr)
        self.transport.sendto(answer(data), addr)


async def ask(pool: UdpPool, wire: bytes, timeout: float = 10) -> bytes:
    """As Forwarder._udp asks: on an open socket if the slot picked has one, else after opening one."""
    return await (await start(pool, wire, timeout))


async def start(pool: UdpPool, wire: bytes, timeout: float = 10) -> asyncio.Future[bytes]:
    """The query sent, and the future of its reply."""
    return pool.send(wire, wire[12:], timeout) or await pool.ask(wire, wire[12:], timeout)


async def responder(**kw: bool) -> tuple[Responder, asyncio.DatagramTransport, int]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: Responder(**kw), local_addr=("127.0.0.1", 0))
    return proto, transport, transport.get_extra_info("sockname")[1]  # type: ignore[return-value]


@contextlib.asynccontextmanager
async def upstream(hostile: bool = False, silent: bool = False,
                   **pool_kw: Any) -> AsyncIterator[tuple[Responder, asyncio.DatagramTransport, UdpPool]]:
    """A Responder on 127.0.0.1 (`hostile`, `silent` as it takes them) and a UdpPool to it (`pool_kw`), closed after."""
    resp, transport, port = await responder(hostile=hostile, silent=silent)
    pool = UdpPool("127.0.0.1", port, **pool_kw)
    try:
        yield resp, transport, pool
    finally:
        pool.close()
        transport.close()


@pytest.mark.parametrize("run", LOOPS)
def test_concurrent_queries_share_the_pool_and_each_gets_its_own_reply(run: Run) -> None:
    async def main() -> None:
        async with upstream(size=8, max_uses=1000) as (resp, _, pool):
            names = [f"n{i}.example." for i in range(200)]
            replies = await asyncio.gather(*(ask(pool, query(n)) for n in names))
            assert [name_and_address(r) for r in replies] == [(n, "192.0.2.7") for n in names]
            assert 2 <= pool.opened <= 8 and len(resp.sources) == pool.opened  # a few sockets, each its own port
            ids = [w[0] << 8 | w[1] for w in resp.received]
            assert len(set(ids)) >= 190, "IDs drawn at random, not the caller's (all 0 here)"
            assert pool.in_flight() == 0

    run(main())


@pytest.mark.parametrize("run", LOOPS)
def test_replies_with_a_wrong_id_or_question_or_no_qr_are_ignored_and_the_real_one_taken(run: Run) -> None:
    async def main() -> None:
        # one socket: every query in flight shares it
        async with upstream(hostile=True, size=1) as (_, _, pool):
            names = [f"n{i}.example." for i in range(50)]
            replies = await asyncio.gather(*(ask(pool, query(n)) for n in names))
            assert [name_and_address(r) for r in replies] == [(n, "192.0.2.7") for n in names]
            # three forged datagrams per query; one with ID ^ 1 may land on another query in flight on the same
            # socket, and is ignored there too (its question is not that query's)
            assert pool.ignored == 3 * len(names)

    run(main())


@pytest.mark.parametrize("run", LOOPS)
def test_a_reply_carrying_another_query_s_id_on_the_same_socket_is_ignored(run: Run) -> None:
    """Two queries in flight on one socket: a reply with the second's ID but the first's question (a mix-up or a
    forgery that guessed an ID in flight) answers neither; each still gets its own."""

    async def main() -> None:
        async with upstream(silent=True, size=1) as (resp, transport, pool):
            first, second = query("first.example."), query("second.example.")
            a, b = await start(pool, first), await start(pool, second)
            await wait(lambda: len(resp.received) == 2)
            sent_a, sent_b = resp.received
            (here,) = pool.ports()
            assert transport is not None
            transport.sendto(answer(sent_b[:2] + sent_a[2:], "203.0.113.66"), ("127.0.0.1", here))
            transport.sendto(answer(sent_a[:2] + sent_b[2:], "203.0.113.66"), ("127.0.0.1", here))
            await wait(lambda: pool.ignored == 2)
            assert not a.done() and not b.done()
            transport.sendto(answer(sent_b), ("127.0.0.1", here))
            transport.sendto(answer(sent_a), ("127.0.0.1", here))
            assert name_and_address(await a) == ("first.example.", "192.0.2.7")
            assert name_and_address(await b) == ("second.example.", "192.0.2.7")

    run(main())


@pytest.mark.parametrize("run", LOOPS)
def test_a_reply_from_another_port_is_dropped_by_the_connected_socket(run: Run) -> None:
    async def main() -> None:
        resp, transport, port = await responder(silent=True)
        pool = UdpPool("127.0.0.1", port, size=1)
        forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            wire = query("www.example.")
            future = await start(pool, wire)
            await wait(lambda: len(resp.received) == 1)
            (here,) = pool.ports()
            forger.bind(("127.0.0.1", 0))
            forger.sendto(answer(resp.received[0], "203.0.113.66"), ("127.0.0.1", here))  # right ID, wrong port
            transport.sendto(answer(resp.received[0]), ("127.0.0.1", here))
            assert name_and_address(await future) == ("www.example.", "192.0.2.7")
            assert pool.ignored == 0  # the kernel dropped the forged one: it never reached us
        finally:
            forger.close()
            pool.close()
            transport.close()

    run(main())


@pytest.mark.parametrize("run", LOOPS)
def test_used_up_sockets_are_replaced_by_new_random_ports(run: Run) -> None:
    async def main() -> None:
        async with upstream(size=2, max_uses=5) as (resp, _, pool):
            for i in range(40):
                wire = query(f"n{i}.example.")
                await ask(pool, wire)
            assert pool.opened >= 8  # 40 queries, 5 per socket at most
            assert len(resp.sources) == pool.opened  # each socket its own port
            assert len(pool.ports()) <= 2  # the used-up ones are closed

    run(main())


@pytest.mark.parametrize("run", LOOPS)
def test_old_sockets_are_replaced_however_few_queries_they_carried(run: Run) -> None:
    async def main() -> None:
        async with upstream(size=1, max_uses=1000, max_age=0.0) as (resp, _, pool):
            for i in range(5):
                wire = query(f"n{i}.example.")
                await ask(pool, wire)
            assert pool.opened == 5 and len(resp.sources) == 5

    run(main())


@pytest.mark.parametrize("run", LOOPS)
def test_a_retired_socket_still_takes_the_replies_of_its_queries_in_flight(run: Run) -> None:
    async def main() -> None:
        async with upstream(silent=True, size=1, max_uses=1) as (resp, transport, pool):
            first, second = query("first.example."), query("second.example.")
            a = await start(pool, first)
            b = await start(pool, second)  # the first socket is used up: a second one
            await wait(lambda: len(resp.received) == 2)
            assert pool.opened == 2 and len(resp.sources) == 2
            for wire, sender in zip(reversed(resp.received), reversed(resp.senders), strict=True):
                transport.sendto(answer(wire), sender)  # the second's reply first, each to its own socket
            assert name_and_address(await a) == ("first.example.", "192.0.2.7")
            assert name_and_address(await b) == ("second.example.", "192.0.2.7")
            await wait(lambda: not pool._draining)  # the retired socket closed once its query was answered

    run(main())


@pytest.mark.parametrize("run", LOOPS)
def test_a_query_that_gives_up_while_its_socket_opens_does_not_stop_the_others(run: Run) -> None:
    """Two queries wait for the same slot's socket to open; the first is cancelled (the other upstream of a
    parallel pair answered): the socket still opens, and the second query is sent and answered."""

    async def main() -> None:
        async with upstream(size=1) as (_, _, pool):
            first, second = query("first.example."), query("second.example.")
            a = asyncio.ensure_future(start(pool, first))
            b = asyncio.ensure_future(start(pool, second))
            await asyncio.sleep(0)  # both wait for the one slot's socket now
            assert not a.done() and not b.done()
            a.cancel()
            assert name_and_address(await (await b)) == ("second.example.", "192.0.2.7")
            assert a.cancelled() and pool.opened == 1

    run(main())


@pytest.mark.parametrize("run", LOOPS)
def test_no_reply_times_out_and_leaves_nothing_waiting(run: Run) -> None:
    async def main() -> None:
        async with upstream(silent=True, size=1) as (_, _, pool):
            wire = query("www.example.org")
            with pytest.raises(TimeoutError):
                await ask(pool, wire, 0.2)
            assert pool.in_flight() == 0

    run(main())


@pytest.mark.parametrize("run", LOOPS)
def test_nothing_listening_fails_the_query_at_once(run: Run) -> None:
    async def main() -> None:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # a port with nothing on it: the kernel answers ICMP port unreachable
        pool = UdpPool("127.0.0.1", port, size=1)
        try:
            for _ in range(2):  # and again on the same socket
                wire = query("www.example.org")
                with pytest.raises(ConnectionRefusedError):
                    await ask(pool, wire)
        finally:
            pool.close()

    run(main())


@pytest.mark.parametrize("run", LOOPS)
def test_close_fails_the_queries_in_flight(run: Run) -> None:
    async def main() -> None:
        _, transport, port = await responder(silent=True)
        pool = UdpPool("127.0.0.1", port, size=1)
        try:
            wire = query("www.example.org")
            future = await start(pool, wire)
            pool.close()
            with pytest.raises(ConnectionError):
                await future
            assert pool.ports() == []
        finally:
            transport.close()

    run(main())


async def wait(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `check` on the running loop until it holds (a generous deadline: the machine may be loaded)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.005)


def test_a_forked_child_draws_other_ids_than_its_parent() -> None:
    """Workers are forked: the random numbers the parent had read ahead are not the child's too."""
    pool = UdpPool("127.0.0.1", 53)
    pool._random.below(65536)  # the parent has read ahead
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its next 64 numbers to the parent, and out
        try:
            os.write(write, bytes(str([pool._random.below(65536) for _ in range(64)]), "ascii"))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        theirs = pipe.read()
    os.waitpid(child, 0)
    ours = str([pool._random.below(65536) for _ in range(64)])
    assert theirs.startswith("[") and theirs != ours
