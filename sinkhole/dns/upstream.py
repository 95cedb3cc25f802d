"""Forwarding to the agency's resolvers: UDP, TCP, DNS over TLS and over HTTPS; strategies,
conditional forwarding, RFC 5452 reply matching, TC -> TCP.

Upstreams are written as URLs (`parse_upstream`):

    HOST[:PORT], udp://HOST[:PORT]   UDP, and TCP when the reply is truncated
    tcp://HOST[:PORT]                TCP only, one pooled pipelined connection
    tls://HOST[:PORT][#NAME]         DNS over TLS (RFC 7858, port 853), pooled and pipelined like TCP
    https://HOST[:PORT]/PATH[#NAME]  DNS over HTTPS (RFC 8484), POST, HTTP/2 with connection reuse

`#NAME` is the name the TLS certificate must carry (and the SNI), for an upstream given by
address, as Unbound's `addr@port#name`; without it the host itself is checked.

Over UDP the query the pipeline made (codec.upstream_query: the client's question, EDNS hop by
hop) goes upstream with a fresh random ID, on one of the upstream's pool of connected sockets
(sinkhole.dns.pool: ports the kernel picks at random, replaced after 100 queries or 10 seconds);
a reply counts only when it comes from the upstream's address and port (connected socket), has
QR set, our ID and the same question. Anything else is ignored while we keep waiting for the
real reply.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import ipaddress
import logging
import re
import secrets
import socket
import ssl
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sinkhole.dns import codec
from sinkhole.dns.pool import SIZE as pool_size
from sinkhole.dns.pool import UdpPool
from sinkhole.errors import ConfigError, UpstreamError
from sinkhole.model import Query
from sinkhole.policy.names import DomainError, SuffixTable, normalize

log = logging.getLogger(__name__)

DOWN_FOR = 5.0  # seconds an upstream that failed is tried after the healthy ones
DEFAULT_PORTS = {"udp": 53, "tcp": 53, "tls": 853, "https": 443}
STRATEGIES = ("failover", "fastest", "parallel")
RTT_WEIGHT = 0.3  # weight of a new round-trip sample in the smoothed RTT (EWMA)
PROBE_EVERY = 16  # fastest / parallel: every 16th choice puts another upstream first, to measure it again
DOH_CONNECTIONS = 4  # HTTP connections per DoH upstream (HTTP/2 multiplexes many queries on each)
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_FAILURES = (TimeoutError, OSError, asyncio.IncompleteReadError, UpstreamError)
# `. NS`, RD set, ID 0 (set per probe): what a probe asks an upstream that let a query time out. Any resolver
# answers it (from its priming, or with an error rcode): only silence counts against the upstream.
PROBE_QUESTION = b"\x00\x00\x02\x00\x01"
PROBE_QUERY = b"\x00\x00\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + PROBE_QUESTION
# upper bounds (seconds) of the latency histogram buckets kept per upstream (sinkhole.service.metrics exports them)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class Upstream:
    host: str  # an IP address; tls:// and https:// may name a host instead
    port: int = 53
    proto: str = "udp"  # udp (TCP on TC) | tcp | tls | https
    name: str = ""  # tls / https: the name the certificate must carry (SNI); "" = host
    path: str = ""  # https: the DoH path

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def server_name(self) -> str:
        return self.name or self.host

    @property
    def encrypted(self) -> bool:
        return self.proto in ("tls", "https")

    def __str__(self) -> str:
        where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        tail = f"#{self.name}" if self.name else ""
        if self.proto == "udp":
            return where
        if self.proto == "https":
            return f"https://{where}{self.path}{tail}"
        return f"{self.proto}://{where}{tail}"


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """'1.2.3.4', '1.2.3.4:53', '::1', '[::1]:53' -> (host, port). Hosts must be IP addresses."""
    return _hostport(text, default_port, names=False)


def _hostport(text: str, default_port: int, names: bool) -> tuple[str, int]:
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
        if not names or text.startswith("["):
            raise ConfigError(f"bad address {text!r}: {host!r} is not an IP address") from exc
        host = _hostname(host, text)
    return host, port


def _hostname(name: str, whole: str) -> str:
    name = name.lower().rstrip(".")
    if not _HOSTNAME.match(name):
        raise ConfigError(f"bad address {whole!r}: {name!r} is neither an IP address nor a host name")
    return name


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigError(f"bad address {whole!r}: port must be a number from 0 to 65535")
    return int(text)


def parse_upstream(text: str) -> Upstream:
    """One upstream URL (see the module's docstring) -> Upstream; ConfigError saying what is wrong."""
    raw = text.strip()
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "udp", raw
    scheme = scheme.lower()
    if scheme == "http":
        raise ConfigError(f"bad upstream {text!r}: DNS over HTTPS needs https://")
    if scheme not in DEFAULT_PORTS:
        raise ConfigError(f"bad upstream {text!r}: use HOST[:PORT], udp://, tcp://, tls:// or https://")
    try:
        if scheme == "https":
            return _parse_doh(raw)
        rest, hashed, name = rest.partition("#")
        if hashed and scheme not in ("tls",):
            raise ConfigError(f"bad upstream {text!r}: '#NAME' (the certificate's name) is for tls:// and https://")
        if "/" in rest or "?" in rest or "@" in rest:
            raise ConfigError(f"bad upstream {text!r}: only {scheme}://HOST[:PORT] is expected here")
        host, port = _hostport(rest, DEFAULT_PORTS[scheme], names=scheme == "tls")
        if hashed:
            name = _hostname(name, text)
    except ConfigError as exc:  # say it of the whole URL
        reason = str(exc).split(": ", 1)[-1]
        raise ConfigError(f"bad upstream {text!r}: {reason}") from None
    if port == 0:
        raise ConfigError(f"bad upstream {text!r}: port 0")
    return Upstream(host, port, scheme, name if name != host else "")


def _parse_doh(text: str) -> Upstream:
    try:
        url = urlsplit(text.replace("{?dns}", "", 1))  # the RFC 8484 URI template as servers publish it
        port = url.port or 443
    except ValueError as exc:
        raise ConfigError(f"bad upstream {text!r}: {exc}") from None
    if url.username is not None or url.password is not None or url.query:
        raise ConfigError(f"bad upstream {text!r}: no user, password or query string in a DoH URL")
    if not url.hostname:
        raise ConfigError(f"bad upstream {text!r}: no host")
    path = url.path
    if path in ("", "/"):
        path = "/dns-query"
    if not path.startswith("/") or any(c in path for c in " {}"):
        raise ConfigError(f"bad upstream {text!r}: bad path {path!r}")
    host, _ = _hostport(url.hostname if ":" not in url.hostname else f"[{url.hostname}]", 443, names=True)
    name = _hostname(url.fragment, text) if url.fragment else ""
    if port == 0:
        raise ConfigError(f"bad upstream {text!r}: port 0")
    return Upstream(host, port, "https", name if name != host else "", path)


def parse_zones(zones: Mapping[str, Sequence[str]]) -> dict[str, list[Upstream]]:
    """{zone: [upstream URL, ...]} -> {normalized zone: [Upstream, ...]}."""
    out: dict[str, list[Upstream]] = {}
    for zone, urls in zones.items():
        try:
            key = normalize(zone)
        except DomainError as exc:
            raise ConfigError(f"bad zone {zone!r}: {exc}") from None
        if key in out:
            raise ConfigError(f"zone {key!r} is given twice")
        if not urls:
            raise ConfigError(f"zone {key!r}: no upstream given")
        out[key] = [parse_upstream(u) for u in urls]
    return out


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


def tls_context(ca: str | None = None) -> ssl.SSLContext:
    """Certificates verified against `ca` only (a pinned CA bundle) or else the system's CAs; TLS 1.2 or later."""
    try:
        ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"upstream_ca: cannot load {ca!r} as PEM CA certificates: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _reason(exc: BaseException) -> str:
    """What went wrong, in words an operator can act on (a certificate error is said as such)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            if seen.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
                return f"certificate is for another name ({seen.verify_message}); write the name it carries as #NAME"
            return f"certificate not trusted ({seen.verify_message or seen}); see upstream_ca"
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, TimeoutError):
        return "TimeoutError"
    return str(exc) or type(exc).__name__


class _Stop(Exception):
    """No upstream is to blame (out of sockets, out of time): stop trying."""


@dataclass
class _Tries:
    errors: list[str] = field(default_factory=list)
    fallback: tuple[bytes, Upstream] | None = None  # a truncated UDP reply, for when TCP fails


class Forwarder:
    def __init__(self, upstreams: list[Upstream], timeout: float = 2.0, max_inflight: int = 1000,
                 strategy: str = "failover", ca: str | None = None,
                 zones: Mapping[str, Iterable[Upstream]] | None = None) -> None:
        if not upstreams:
            raise ConfigError("at least one upstream is needed")
        if strategy not in STRATEGIES:
            raise ConfigError(f"upstream_strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
        self.upstreams = list(upstreams)
        self.timeout = timeout
        self.strategy = strategy
        self.max_inflight = max_inflight  # each forward holds a socket: bounded, beyond it SERVFAIL at once
        self.inflight = 0
        # conditional forwarding: most specific zone wins, one dict probe per label; None: no zones at all
        self.zones: SuffixTable | None = SuffixTable({z: list(u) for z, u in zones.items()}) if zones else None
        everyone = self.upstreams + [u for ups in (zones or {}).values() for u in ups]
        self._tls = tls_context(ca) if any(u.proto == "tls" for u in everyone) else None
        self._https_ctx = tls_context(ca) if any(u.proto == "https" for u in everyone) else None
        self._udp_pools: dict[Upstream, UdpPool] = {}
        self.udp_sockets = pool_size  # sockets per UDP upstream (sinkhole.dns.pool), for the pools made from now on
        self._tcp_pool: dict[Upstream, _TcpConnection] = {}
        self._connecting: dict[Upstream, asyncio.Task[_TcpConnection]] = {}
        self._doh: dict[Upstream, _DohClient] = {}
        self._down_until: dict[Upstream, float] = {}
        self._probes: dict[Upstream, asyncio.Task[None]] = {}  # an upstream whose silence is being checked
        self._rtt: dict[Upstream, float] = {}  # smoothed round-trip time, seconds
        self._last_answer: dict[Upstream, float] = {}  # loop time of the upstream's latest good answer
        self._picks = 0
        # per upstream, for metrics: answers per latency bucket (the last: above every bound), their
        # total seconds, and failed attempts (timeouts, errors); plain ints, read at scrape time
        everyone_ = list(dict.fromkeys(everyone))
        self.latency: dict[Upstream, list[int]] = {u: [0] * (len(LATENCY_BUCKETS) + 1) for u in everyone_}
        self.latency_sum: dict[Upstream, float] = dict.fromkeys(everyone_, 0.0)
        self.failures: dict[Upstream, int] = dict.fromkeys(everyone_, 0)

    def set_upstreams(self, upstreams: list[Upstream]) -> None:
        """A reloaded configuration: new (default) upstreams are asked from the next query on."""
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
            pool = self._udp_pools.pop(u, None)
            if pool is not None:  # its sockets close once their queries in flight are done (a zone that
                pool.retire()  # forwards to it too gets a new pool at its next query)
            self._down_until.pop(u, None)
        self.upstreams = list(upstreams)

    def is_down(self, up: Upstream) -> bool:
        """`up` failed (or let a query and then a probe time out) and is tried after the others for now."""
        return self._down_until.get(up, 0.0) > time.monotonic()

    def probing(self, up: Upstream) -> bool:
        """A probe is checking whether `up`, which let a query time out, answers at all."""
        return up in self._probes

    def upstreams_for(self, name: str) -> list[Upstream]:
        """The upstreams a (normalized) name goes to: those of the most specific zone holding it, or the default."""
        if self.zones is not None:
            hit = self.zones.lookup_name(name)
            if hit is not None:
                return hit[1]  # type: ignore[return-value]
        return self.upstreams

    def _order(self, ups: list[Upstream]) -> list[Upstream]:
        down = self._down_until
        if down:
            now = time.monotonic()
            healthy = [u for u in ups if down.get(u, 0.0) <= now]
            late = [u for u in ups if down.get(u, 0.0) > now]
        else:
            healthy, late = ups, []
        if self.strategy != "failover" and len(healthy) > 1:
            rtt = self._rtt
            healthy = sorted(healthy, key=lambda u: rtt.get(u, 0.0))  # never measured: first, to be measured
            self._picks += 1
            first = 0 if self.strategy == "fastest" else 1  # parallel: the best one always goes
            if self._picks % PROBE_EVERY == 0 and len(healthy) > first + 1:
                j = first + 1 + secrets.randbelow(len(healthy) - first - 1)
                healthy[first], healthy[j] = healthy[j], healthy[first]
        return healthy + late if late else healthy

    async def forward(self, query: Query, client_tcp: bool, out: bytes | None = None) -> tuple[bytes, Upstream]:
        """Ask the upstreams `out` (the message to send for `query`, ID aside: the pipeline's own, with EDNS hop by
        hop; by default the client's packet) and return the reply, carrying the client's ID.

        Raises UpstreamError when no upstream answered within the timeout.
        """
        if self.inflight >= self.max_inflight:
            raise UpstreamError(f"{self.inflight} queries already waiting for an upstream")
        self.inflight += 1
        try:
            return await self._forward(query, client_tcp, query.wire if out is None else out)
        finally:
            self.inflight -= 1

    async def _forward(self, query: Query, client_tcp: bool, out: bytes) -> tuple[bytes, Upstream]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        order = self._order(self.upstreams_for(query.name) if self.zones is not None else self.upstreams)
        tries = _Tries()
        if self.strategy == "parallel" and len(order) > 1:
            got = await self._parallel(order, query, out, client_tcp, deadline, tries)
        else:
            got = await self._failover(order, query, out, client_tcp, deadline, tries)
        if got is not None:
            return codec.set_id(got[0], query.id), got[1]
        if tries.fallback is not None and not client_tcp:
            # the TCP retry failed: a UDP client gets the truncated reply and may retry over TCP itself
            return codec.set_id(tries.fallback[0], query.id), tries.fallback[1]
        raise UpstreamError("; ".join(tries.errors) or "no time left to ask an upstream")

    async def _failover(self, order: list[Upstream], query: Query, out: bytes, client_tcp: bool, deadline: float,
                        tries: _Tries) -> tuple[bytes, Upstream] | None:
        loop = asyncio.get_running_loop()
        for i, up in enumerate(order):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # share what is left among the upstreams not yet tried
            try:
                return await self._attempt(up, query, out, client_tcp, remaining / (len(order) - i), deadline,
                                           tries), up
            except _Stop:
                break
            except _FAILURES:
                continue
        return None

    async def _parallel(self, order: list[Upstream], query: Query, out: bytes, client_tcp: bool, deadline: float,
                        tries: _Tries) -> tuple[bytes, Upstream] | None:
        """The two best at once; the first good answer wins. A SERVFAIL or REFUSED is kept only
        until the other has answered or failed. When both fail, the next two, and so on."""
        loop = asyncio.get_running_loop()
        poor: tuple[bytes, Upstream] | None = None
        for i in range(0, len(order), 2):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            pairs_left = (len(order) - i + 1) // 2
            budget = remaining / pairs_left
            tasks = {loop.create_task(self._attempt(up, query, out, client_tcp, budget, deadline, tries)): up
                     for up in order[i:i + 2]}
            stop = False
            try:
                while tasks:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        up = tasks.pop(task)
                        exc = task.exception()
                        if exc is not None:
                            stop = stop or isinstance(exc, _Stop)
                            continue
                        reply = task.result()
                        if codec.header_rcode(reply) in (codec.SERVFAIL, codec.REFUSED):
                            poor = poor or (reply, up)
                            continue
                        return reply, up
            finally:
                for task in tasks:
                    task.cancel()
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            if poor is not None or stop:
                break
        return poor

    async def _attempt(self, up: Upstream, query: Query, out: bytes, client_tcp: bool, budget: float,
                       deadline: float, tries: _Tries) -> bytes:
        """One upstream, one try; its health and round-trip time are noted. Raises on failure."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        question = query.question
        try:
            if up.proto == "udp":
                reply = await self._udp(up, out, question, budget)
                if codec.is_truncated(reply):
                    tries.fallback = (reply, up)
                    if deadline - loop.time() <= 0:
                        raise _Stop  # our time is up, not the upstream's fault
                    full = await self._stream(up, out, question, deadline - loop.time())
                    if client_tcp or len(full) <= query.max_udp:
                        reply = full
            elif up.proto == "https":
                reply = await self._doh_client(up).ask(out, question, budget)
            else:
                reply = await self._stream(up, out, question, budget)
        except _Stop:
            raise
        except _FAILURES as exc:
            reason = _reason(exc)
            tries.errors.append(f"{up}: {reason}")
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS):
                raise _Stop from exc  # out of sockets here: no upstream is to blame
            if isinstance(exc, TimeoutError):
                self.failures[up] = self.failures.get(up, 0) + 1
                if self._last_answer.get(up, -1.0) <= started:
                    self._suspect(up, reason, loop.time() - started)
                # else it answered other queries while this one waited: the name is slow, the upstream is not down
                raise
            self._failed(up, reason, loop.time() - started)
            raise
        self._answered(up, loop.time() - started)
        return reply

    def _answered(self, up: Upstream, rtt: float) -> None:
        self._last_answer[up] = asyncio.get_running_loop().time()
        if self._down_until.pop(up, None) is not None:
            log.info("upstream %s answers again", up)
        buckets = self.latency.get(up)
        if buckets is None:
            buckets = self.latency[up] = [0] * (len(LATENCY_BUCKETS) + 1)
            self.latency_sum[up] = 0.0
        buckets[bisect.bisect_left(LATENCY_BUCKETS, rtt)] += 1
        self.latency_sum[up] += rtt
        old = self._rtt.get(up)
        self._rtt[up] = rtt if old is None else old + RTT_WEIGHT * (rtt - old)

    def _suspect(self, up: Upstream, reason: str, spent: float) -> None:
        """A query timed out at `up` and nothing else came back from it meanwhile. On a quiet network that may
        be one client's names alone (an authority that never answers them): `up` is marked down only if a
        probe (`. NS`, which any resolver answers) gets no reply either."""
        if up in self._probes or self._down_until.get(up, 0.0) > time.monotonic():
            return
        probe = self._probes[up] = asyncio.get_running_loop().create_task(self._probe(up, reason, spent))
        probe.add_done_callback(lambda _: self._probes.pop(up, None))

    async def _probe(self, up: Upstream, reason: str, spent: float) -> None:
        try:
            if up.proto == "udp":
                await self._udp(up, PROBE_QUERY, PROBE_QUESTION, self.timeout)
            elif up.proto == "https":
                await self._doh_client(up).ask(PROBE_QUERY, PROBE_QUESTION, self.timeout)
            else:
                await self._stream(up, PROBE_QUERY, PROBE_QUESTION, self.timeout)
        except _FAILURES as exc:
            self._failed(up, f"{reason}, and a probe: {_reason(exc)}", spent, counted=True)
            return
        log.debug("upstream %s answers a probe: a query that timed out there was slow on its own", up)

    def _failed(self, up: Upstream, reason: str, spent: float, counted: bool = False) -> None:
        if not counted:
            self.failures[up] = self.failures.get(up, 0) + 1
        if self._down_until.get(up, 0.0) <= time.monotonic():
            log.warning("upstream %s failed: %s; tried after the others for %.0f s", up, reason, DOWN_FOR)
        self._down_until[up] = time.monotonic() + DOWN_FOR
        old = self._rtt.get(up)
        penalty = max(spent, self.timeout)  # a quick refusal must not look fast
        self._rtt[up] = penalty if old is None else old + RTT_WEIGHT * (penalty - old)

    async def _udp(self, up: Upstream, out: bytes, question: bytes, timeout: float) -> bytes:
        """`out` on one of the upstream's pooled sockets with an ID drawn there; the reply that matches it."""
        pool = self._udp_pools.get(up)
        if pool is None:
            pool = self._udp_pools[up] = UdpPool(up.host, up.port, self.udp_sockets)
        future = pool.send(out, question, timeout)
        if future is None:  # the slot picked has no open socket yet (or a used-up one): opened first
            future = await pool.ask(out, question, timeout)
        return await future

    async def _stream(self, up: Upstream, wire: bytes, question: bytes, timeout: float) -> bytes:
        """Over the upstream's pooled TCP or TLS connection (opened when there is none), pipelined by ID."""
        conn = None
        try:
            async with asyncio.timeout(timeout):
                for retry in (False, True):
                    conn, fresh = await self._connection(up)
                    qid = secrets.randbits(16)
                    while qid in conn.waiting:
                        qid = secrets.randbits(16)
                    try:
                        reply = await conn.ask(codec.set_id(wire, qid), qid)
                        break
                    except ConnectionError:
                        if fresh or retry:
                            raise
                        # the upstream closed the idle connection as we used it: once more, on a new one
                        log.debug("pooled connection to %s was closed; opening another", up)
        except TimeoutError:
            if conn is not None and not conn.waiting:
                conn.close()  # a connection that did not answer in time is not used again
            raise
        if not codec.matches(reply, qid, question):
            raise UpstreamError(f"a {up.proto.upper()} reply with our ID but another question")
        return reply

    async def _connection(self, up: Upstream) -> tuple[_TcpConnection, bool]:
        """The pooled connection, or a new one; queries arriving while one is being opened share it."""
        conn = self._tcp_pool.get(up)
        if conn is not None and not conn.closed:
            return conn, False
        opening = self._connecting.get(up)
        if opening is None:
            opening = self._connecting[up] = asyncio.get_running_loop().create_task(self._open(up))
            opening.add_done_callback(lambda task: self._opened(up, task))
        return await asyncio.shield(opening), True

    async def _open(self, up: Upstream) -> _TcpConnection:
        async with asyncio.timeout(max(self.timeout, 1.0)):
            if up.proto == "tls":
                reader, writer = await asyncio.open_connection(up.host, up.port, ssl=self._tls,
                                                               server_hostname=up.server_name)
            else:
                reader, writer = await asyncio.open_connection(up.host, up.port)
        return _TcpConnection(reader, writer)

    def _opened(self, up: Upstream, task: asyncio.Task[_TcpConnection]) -> None:
        if self._connecting.get(up) is task:
            del self._connecting[up]
        if task.cancelled() or task.exception() is not None:
            return
        old, self._tcp_pool[up] = self._tcp_pool.get(up), task.result()
        if old is not None and not old.waiting:
            old.close()

    def _doh_client(self, up: Upstream) -> _DohClient:
        client = self._doh.get(up)
        if client is None:
            assert self._https_ctx is not None
            client = self._doh[up] = _DohClient(up, self._https_ctx, self.timeout)
        return client

    def close(self) -> None:
        """Close the pooled TCP/TLS connections and stop the probes; DoH clients need `aclose`."""
        for task in (*self._connecting.values(), *self._probes.values()):
            task.cancel()
        for conn in self._tcp_pool.values():
            conn.close()
        self._tcp_pool.clear()
        for pool in self._udp_pools.values():
            pool.close()
        self._udp_pools.clear()

    async def aclose(self) -> None:
        self.close()
        clients, self._doh = list(self._doh.values()), {}
        for client in clients:
            await client.aclose()


class _TcpConnection:
    """One TCP or TLS connection to an upstream, reused for many queries (RFC 7766 pipelining): replies
    are matched to their queries by ID as they come, in any order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.waiting: dict[int, asyncio.Future[bytes]] = {}
        self.closed = False
        self._reading = asyncio.get_running_loop().create_task(self._read())

    async def ask(self, out: bytes, qid: int) -> bytes:
        if self.closed:
            raise ConnectionError("upstream connection closed")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[qid] = future
        try:
            self.writer.write(codec.frame(out))
            await self.writer.drain()
            return await future
        finally:
            self.waiting.pop(qid, None)

    async def _read(self) -> None:
        error: BaseException = ConnectionError("upstream closed the connection")
        try:
            while True:
                reply = await self.reader.readexactly(codec.frame_length(await self.reader.readexactly(2)))
                if len(reply) >= 2:
                    future = self.waiting.get(codec.message_id(reply))
                    if future is not None and not future.done():
                        future.set_result(reply)
        except (OSError, asyncio.IncompleteReadError) as exc:
            error = ConnectionError(f"upstream connection lost: {exc}")
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


class _DohClient:
    """DNS over HTTPS (RFC 8484): POST application/dns-message with ID 0, over httpx's connection
    pool (HTTP/2 when the server offers it: many queries multiplexed on one connection)."""

    def __init__(self, up: Upstream, ctx: ssl.SSLContext, timeout: float) -> None:
        import httpx

        self._httpx = httpx
        host = f"[{up.host}]" if ":" in up.host else up.host
        self.url = f"https://{host}:{up.port}{up.path}"
        self.headers = {"content-type": "application/dns-message", "accept": "application/dns-message"}
        self.extensions: dict[str, Any] = {}
        if up.name:  # connect to the address, but name the certificate's host in SNI and Host
            self.extensions["sni_hostname"] = up.name
            self.headers["host"] = up.name if up.port == 443 else f"{up.name}:{up.port}"
        options: dict[str, Any] = dict(
            verify=ctx, trust_env=False, timeout=httpx.Timeout(max(timeout, 1.0)),
            limits=httpx.Limits(max_connections=DOH_CONNECTIONS, max_keepalive_connections=DOH_CONNECTIONS))
        try:
            self.client = httpx.AsyncClient(http2=True, **options)
        except ImportError:  # the h2 package is missing: HTTP/1.1 keep-alive connections still get reused
            log.warning("DoH upstream %s: HTTP/2 needs the h2 package; using HTTP/1.1", up)
            self.client = httpx.AsyncClient(**options)

    async def ask(self, wire: bytes, question: bytes, timeout: float) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                r = await self.client.post(self.url, content=codec.set_id(wire, 0), headers=self.headers,
                                           extensions=self.extensions)
        except self._httpx.HTTPError as exc:
            raise UpstreamError(_reason(exc)) from exc
        if r.status_code != 200:
            raise UpstreamError(f"HTTP status {r.status_code}")
        kind = r.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind != "application/dns-message":
            raise UpstreamError(f"a DoH reply of type {kind!r}, not application/dns-message")
        if not codec.matches(r.content, 0, question):
            raise UpstreamError("a DoH reply that does not match the question")
        return r.content

    async def aclose(self) -> None:
        await self.client.aclose()
