"""The policy as a Response Policy Zone (draft-vixie-dnsop-dns-rpz): export, primary, secondary.

- `build()` turns the rules in force for one client group into RPZ records: a blocked `name` gets the
  configured action on `name` and `*.name` (a sinkhole rule covers every subdomain; an RPZ name alone
  covers only itself), an allowed one `CNAME rpz-passthru.` on both, a blocked network an `rpz-ip`
  trigger. `/regex/` rules have no RPZ form: they are left out and named.
- `Primary` serves that zone from `rpz_listen`: SOA over UDP and TCP, AXFR and IXFR over TCP to the
  addresses in `rpz_secondaries` (TSIG when `rpz_tsig` is set), a new serial on every change of the
  zone, and NOTIFY to `rpz_notify`. IXFR answers come from the differences between the versions this
  process has built (kept in memory); a serial older than those gets the whole zone (RFC 1995, 4).
- `Secondary` pulls a zone from `policy_from` (IXFR, else AXFR) when the primary's SOA serial changes,
  on NOTIFY and every SOA refresh, and makes one category (`rpz:<zone>`) hold exactly its rules in one
  transaction; the server's reloader puts them in force. A primary that cannot be reached, or a zone
  that cannot be applied, leaves the rules in force as they were.

The one home of zone transfers; like dns/upstream.py, it speaks dnspython.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.serial
import dns.tsig
import dns.versioned
import dns.xfr

from sinkhole import logthrottle
from sinkhole.dns import codec
from sinkhole.dns.answer import AnswerConfig
from sinkhole.dns.listener import ConnectionSlots, close_now, drain_within
from sinkhole.errors import ConfigError, ListFormatError, SinkholeError
from sinkhole.policy import lists
from sinkhole.policy.names import client_address, is_regex
from sinkhole.store.db import Store, open_store
from sinkhole.store.journal import Actor

if TYPE_CHECKING:
    from sinkhole.service.config import Settings

log = logging.getLogger(__name__)

DEFAULT_ZONE = "rpz.sinkhole."
SOA_MNAME = "sinkhole.invalid."
SOA_RNAME = "hostmaster.sinkhole.invalid."
NS_TARGET = "localhost."  # the customary NS of a policy zone: nobody resolves through it
PROGRESS_RECORDS = 10_000  # rules or records between two progress reports of an export
Advance = Callable[[int], None] | None  # called with the number of items done since its last call
SOA_EXPIRE = 28 * 86400  # a secondary (Unbound, BIND) drops an expired zone: keep using it for weeks
MESSAGE_BUDGET = 16_000  # bytes of records per transfer message (uncompressed), well under 64 KiB
HISTORY_DIFFS = 64  # IXFR: differences kept in memory ...
HISTORY_RECORDS = 200_000  # ... and the records they may hold at most
NOTIFY_TRIES = 5
RPZ_MAX_CONNECTIONS = 64  # TCP connections to rpz_listen at once (the same process serves DNS) ...
RPZ_MAX_PER_ADDRESS = 4  # ... and from one address
RPZ_IDLE_TIMEOUT = 30.0  # seconds to send a whole request, and to read each reply message
CATEGORY_PREFIX = "rpz:"
Record = tuple[dns.name.Name, dns.rdata.Rdata]


def _rdata(rdtype: str, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)


PASSTHRU = _rdata("CNAME", "rpz-passthru.")
NXDOMAIN = _rdata("CNAME", ".")
NODATA = _rdata("CNAME", "*.")


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Tsig:
    name: dns.name.Name
    algorithm: dns.name.Name
    secret: bytes

    @property
    def keyring(self) -> dict[dns.name.Name, dns.tsig.Key]:
        return {self.name: dns.tsig.Key(self.name, self.secret, self.algorithm)}

    @property
    def key(self) -> dns.tsig.Key:
        return dns.tsig.Key(self.name, self.secret, self.algorithm)


TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1", "hmac-md5")


def parse_tsig(text: str) -> Tsig | None:
    """`name:algorithm:base64secret` (e.g. `xfr-key:hmac-sha256:c2VjcmV0...`), or None for ''."""
    if not text.strip():
        return None
    parts = text.strip().split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise ConfigError("rpz_tsig: expected NAME:ALGORITHM:BASE64SECRET, e.g. xfr-key:hmac-sha256:c2VjcmV0")
    name, algorithm, secret = parts
    if algorithm.lower().rstrip(".") not in TSIG_ALGORITHMS:
        raise ConfigError(f"rpz_tsig: algorithm {algorithm!r} is not one of {', '.join(TSIG_ALGORITHMS)}")
    try:
        raw = base64.b64decode(secret, validate=True)
        key_name = dns.name.from_text(name)
    except (binascii.Error, ValueError):
        raise ConfigError("rpz_tsig: the secret is not base64") from None
    except dns.exception.DNSException as exc:
        raise ConfigError(f"rpz_tsig: key name {name!r}: {exc}") from None
    if not raw:
        raise ConfigError("rpz_tsig: the secret is empty")
    return Tsig(key_name, dns.name.from_text(algorithm.lower()), raw)


def zone_name(text: str) -> dns.name.Name:
    try:
        name = dns.name.from_text(text.strip() or DEFAULT_ZONE)
    except dns.exception.DNSException as exc:
        raise ConfigError(f"rpz_zone: {text!r}: {exc}") from None
    if name == dns.name.root:
        raise ConfigError("rpz_zone: the policy zone needs a name of its own, not the root")
    return name


# ---------------------------------------------------------------------------- the zone


@dataclass
class Zone:
    """One version of the policy zone: its serial and its records below the apex."""

    origin: dns.name.Name
    serial: int
    records: frozenset[Record]
    ttl: int = 60
    refresh: int = 60
    group: str = "default"
    version: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # comment lines: rules RPZ cannot express

    def soa(self, serial: int | None = None) -> dns.rdata.Rdata:
        s = self.serial if serial is None else serial
        return _rdata("SOA", f"{SOA_MNAME} {SOA_RNAME} {s} {self.refresh} {max(1, self.refresh // 4)} "
                             f"{SOA_EXPIRE} {self.ttl}")

    def apex(self) -> list[Record]:
        return [(self.origin, self.soa()), (self.origin, _rdata("NS", NS_TARGET))]

    def sorted_records(self, progress: Advance = None) -> list[Record]:
        """The records in canonical-ish order. `progress` is called with the number of records whose sort key
        is made since its last call (most of the time a sort takes; len(records) in all)."""
        keyed = []
        for i, record in enumerate(self.records):
            keyed.append((_order(record), i, record))  # i: equal keys never compare the records themselves
            if progress is not None and (i + 1) % PROGRESS_RECORDS == 0:
                progress(PROGRESS_RECORDS)
        if progress is not None:
            progress(len(keyed) % PROGRESS_RECORDS)
        keyed.sort()
        return [record for _, _, record in keyed]

    def lines(self, progress: Advance = None, ordered: list[Record] | None = None) -> Iterator[str]:
        """The zone file's lines (without line ends); `ordered`: sorted_records(), if already made. `progress` is
        called with the number of records written since its last call (len(records) in all)."""
        yield from (f"$ORIGIN {self.origin.to_text()}", f"$TTL {self.ttl}", f"@ SOA {self.soa().to_text()}",
                    f"@ NS {NS_TARGET}",
                    f"; sinkhole policy version {self.version} for group {self.group}: {self.counts.get('block', 0)}"
                    f" block, {self.counts.get('allow', 0)} allow and {self.counts.get('network', 0)} network rules")
        yield from (f"; left out: {s}" for s in self.skipped)
        for i, (name, rdata) in enumerate(self.sorted_records() if ordered is None else ordered, start=1):
            yield f"{name.relativize(self.origin).to_text()} {dns.rdatatype.to_text(rdata.rdtype)} {rdata.to_text()}"
            if progress is not None and i % PROGRESS_RECORDS == 0:
                progress(PROGRESS_RECORDS)
        if progress is not None:
            progress(len(self.records) % PROGRESS_RECORDS)

    def to_text(self) -> str:
        """A zone file that BIND, Unbound, Knot and `sinkhole lists import` read."""
        return "\n".join(self.lines()) + "\n"


def _order(record: Record) -> tuple:
    """Canonical-ish order: by reversed labels, a name just before its wildcard, then by type."""
    name, rdata = record
    labels = name.labels[:-1]
    wild = labels[:1] == (b"*",)
    return tuple(reversed(labels[1:] if wild else labels)), wild, rdata.rdtype


def block_actions(answers: AnswerConfig) -> list[dns.rdata.Rdata]:
    """The RPZ action for a blocked name: local data with the sinkhole addresses, or CNAME . / CNAME *."""
    if answers.mode == "nxdomain":
        return [NXDOMAIN]
    local = []
    if answers.a is not None:
        local.append(_rdata("A", str(answers.a)))
    if answers.aaaa is not None:
        local.append(_rdata("AAAA", str(answers.aaaa)))
    return local or [NODATA]


def rpz_ip_labels(network: str) -> str:
    """192.0.2.0/24 -> `24.0.2.0.192`; 2001:db8::/48 -> `48.zz.db8.2001` (RPZ's reversed form)."""
    net = ipaddress.ip_network(network, strict=False)
    if net.version == 4:
        words = str(net.network_address).split(".")
    else:
        text = net.network_address.compressed
        if "::" in text:
            left, right = text.split("::")
            words = (left.split(":") if left else []) + ["zz"] + (right.split(":") if right else [])
        else:
            words = text.split(":")
    return ".".join([str(net.prefixlen), *reversed(words)])


def build(rules: Iterable[tuple[str, str, str]], answers: AnswerConfig, origin: dns.name.Name, serial: int,
          group: str = "default", refresh: int = 60, version: int = 0, progress: Advance = None) -> Zone:
    """The zone for `rules` (domain, kind, category) as they are in force for one group. `progress` is called
    with the number of rules turned into records since its last call (one per rule in all)."""
    kinds: dict[str, str] = {}
    networks: set[str] = set()
    skipped: list[str] = []
    count = 0
    for domain, kind, category in rules:
        count += 1
        if "/" in domain:
            if is_regex(domain):
                skipped.append(f"{domain} ({kind}, category {category}): a regular expression has no RPZ form")
            elif kind == "block":
                networks.add(str(ipaddress.ip_network(domain, strict=False)))
            continue
        if kinds.get(domain) != "allow":  # at equal specificity an allow rule wins
            kinds[domain] = kind
    action = block_actions(answers)
    records: set[Record] = set()
    for i, (domain, kind) in enumerate(kinds.items(), start=1):
        if progress is not None and i % PROGRESS_RECORDS == 0:
            progress(PROGRESS_RECORDS)
        name = dns.name.from_text(domain, origin)
        wild = dns.name.from_text("*." + domain, origin)
        for rdata in ([PASSTHRU] if kind == "allow" else action):
            records.add((name, rdata))
            records.add((wild, rdata))
    for network in networks:
        name = dns.name.from_text(rpz_ip_labels(network) + ".rpz-ip", origin)
        for rdata in action:
            records.add((name, rdata))
    if progress is not None:  # the rest: the last names, networks, duplicates and regular expressions
        progress(count - len(kinds) // PROGRESS_RECORDS * PROGRESS_RECORDS)
    counts = {"block": sum(k == "block" for k in kinds.values()), "allow": sum(k == "allow" for k in kinds.values()),
              "network": len(networks)}
    return Zone(origin, serial, frozenset(records), answers.ttl, refresh, group, version, counts, sorted(skipped))


# ---------------------------------------------------------------------------- wire helpers


def _allowed(peer: str, networks: list) -> bool:
    address = client_address(peer)
    if address is None:
        return False
    return any(address.version == n.version and address in n for n in networks)


def _same_host(a: str, b: str) -> bool:
    x, y = client_address(a), client_address(b)
    return x is not None and x == y


@dataclass
class Diff:
    old: int
    new: int
    deleted: frozenset[Record]
    added: frozenset[Record]


# ---------------------------------------------------------------------------- primary and NOTIFY listener


class Endpoint:
    """The RPZ listener (`rpz_listen`): the primary's SOA/AXFR/IXFR, and NOTIFY for a secondary."""

    def __init__(self, cfg: Settings, primary: Primary | None, secondary: Secondary | None) -> None:
        from sinkhole.dns.upstream import parse_hostport

        self.host, self.port = parse_hostport(cfg.fleet.rpz_listen, 53)
        self.primary = primary
        self.secondary = secondary
        self.tsig = parse_tsig(cfg.fleet.rpz_tsig)
        self.keyring = self.tsig.keyring if self.tsig else None
        self.tcp_server: asyncio.AbstractServer | None = None
        self.udp: asyncio.DatagramTransport | None = None
        self.conns: set[asyncio.Task] = set()
        self.slots = ConnectionSlots(RPZ_MAX_CONNECTIONS, RPZ_MAX_PER_ADDRESS)

    async def start(self, sockets: tuple[socket.socket, socket.socket]) -> None:
        """Serve on `sockets`: those of bind(), made before root was dropped."""
        loop = asyncio.get_running_loop()
        udp, tcp = sockets
        self.port = tcp.getsockname()[1]  # port 0: the one bind() got
        self.tcp_server = await asyncio.start_server(self._tcp_client, sock=tcp)
        self.udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
        log.info("RPZ %s on udp+tcp %s", " and ".join(
            w for w, on in (("primary for zone " + str(self.primary.origin) if self.primary else "", self.primary),
                            ("NOTIFY from " + self.secondary.where if self.secondary else "", self.secondary)) if on),
            self.address)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def stop(self) -> None:
        if self.tcp_server is not None:
            self.tcp_server.close()
        for task in list(self.conns):
            task.cancel()
        if self.udp is not None:
            self.udp.close()

    def _may_connect(self, peer: str) -> bool:
        """Over TCP: the secondaries (rpz_secondaries) transfer, and a secondary's own primary may send NOTIFY."""
        if self.primary is not None and _allowed(peer, self.primary.networks):
            return True
        return self.secondary is not None and _same_host(peer, self.secondary.host)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        why = self.slots.take(peer) if self._may_connect(peer) else "not in rpz_secondaries"
        if why is not None:  # closed as accepted: it holds no slot and no file descriptor
            logthrottle.warning(log, "RPZ: TCP connection from %s closed: %s", peer, why)
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self.conns.add(task)
        loop = asyncio.get_running_loop()
        try:
            while True:
                async with asyncio.timeout(RPZ_IDLE_TIMEOUT):  # the whole request within it
                    wire = await reader.readexactly(codec.frame_length(await reader.readexactly(2)))
                replies = await loop.run_in_executor(None, self.answer, wire, peer, True)
                if not replies:
                    break
                for reply in replies:
                    writer.write(codec.frame(reply))
                    if not await drain_within(writer, RPZ_IDLE_TIMEOUT):  # a transfer must be read, too
                        log.warning("RPZ: TCP connection from %s closed: its replies were not read within %.0f s",
                                    peer, RPZ_IDLE_TIMEOUT)
                        return
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.conns.discard(task)
            self.slots.give_back(peer)
            close_now(writer)

    def answer(self, wire: bytes, peer: str, tcp: bool) -> list[bytes]:
        """The reply messages to one request (several for a transfer); [] to drop it."""
        try:
            query = dns.message.from_wire(wire, keyring=self.keyring)
        except (dns.message.UnknownTSIGKey, dns.tsig.BadSignature, dns.tsig.BadTime, dns.tsig.PeerError) as exc:
            log.warning("RPZ: %s from %s failed TSIG (%s): refused", "request", peer, exc.__class__.__name__)
            return [r for r in [codec.bare_error(wire, dns.rcode.NOTAUTH)] if r]
        except dns.exception.DNSException:
            return [r for r in [codec.bare_error(wire, dns.rcode.FORMERR)] if r]
        if query.flags & dns.flags.QR:
            return []
        if query.opcode() == dns.opcode.NOTIFY:
            return [self._notify(query, peer)]
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            return [_reply(query, dns.rcode.NOTIMP if query.opcode() != dns.opcode.QUERY
                                else dns.rcode.FORMERR)]
        if self.primary is None:
            return [_reply(query, dns.rcode.REFUSED)]
        return self.primary.answer(query, peer, tcp, self.tsig is not None)

    def _notify(self, query: dns.message.Message, peer: str) -> bytes:
        """RFC 1996: a NOTIFY from our primary makes the secondary check its serial now."""
        s = self.secondary
        if s is None or not query.question or query.question[0].name != s.origin:
            return _reply(query, dns.rcode.REFUSED if s is None else dns.rcode.NOTAUTH)
        if not _same_host(peer, s.host) or (self.tsig is not None and not query.had_tsig):
            log.warning("RPZ: NOTIFY for %s from %s refused: not from the primary %s%s", s.origin, peer, s.where,
                        " with the TSIG key" if self.tsig else "")
            return _reply(query, dns.rcode.REFUSED)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        s.wake.set()
        return response.to_wire(max_size=65535)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            replies = self.endpoint.answer(data, addr[0], False)
        except Exception:  # never let one datagram stop the listener
            log.exception("RPZ: failed to answer a datagram from %s", addr[0])
            return
        if replies and self.transport is not None:
            self.transport.sendto(replies[0], addr)


class Primary:
    """The zone in force and its recent differences; answers SOA, AXFR, IXFR; sends NOTIFY."""

    def __init__(self, cfg: Settings, answers: AnswerConfig) -> None:
        from sinkhole.dns.upstream import parse_hostport

        self.cfg = cfg
        self.answers = answers
        self.origin = zone_name(cfg.fleet.rpz_zone)
        self.group = cfg.fleet.rpz_group
        self.networks = [ipaddress.ip_network(n, strict=False) for n in cfg.fleet.rpz_secondaries]
        self.notify_to = [parse_hostport(t, 53) for t in cfg.fleet.rpz_notify]
        self.tsig = parse_tsig(cfg.fleet.rpz_tsig)
        self.zone: Zone | None = None
        self.history: tuple[Diff, ...] = ()
        self._skipped_warned: list[str] = []
        self._lock = threading.Lock()

    # ---- building (in the policy reloader's thread, or at start)

    def policy_changed(self, store: Store) -> bool:
        """Build the zone again; a new serial and NOTIFY when its records changed. True when they did."""
        with self._lock:
            try:
                version, rules = store.rules_in_force(self.group)
            except ConfigError as exc:  # the group was removed: keep serving the last zone
                log.warning("RPZ: zone %s not rebuilt: %s", self.origin, exc)
                return False
            old = self.zone
            serial = max(version, 1)
            if old is not None and not dns.serial.Serial(serial) > dns.serial.Serial(old.serial):
                serial = (old.serial + 1) & 0xFFFFFFFF or 1  # the database went back (replaced): keep going up
            zone = build(rules, self.answers, self.origin, serial, self.group, self.cfg.fleet.rpz_refresh, version)
            if zone.skipped != self._skipped_warned:
                for line in zone.skipped:
                    log.warning("RPZ: left out of zone %s: %s", self.origin, line)
                self._skipped_warned = zone.skipped
            if old is not None and zone.records == old.records:
                return False
            if old is not None:
                diff = Diff(old.serial, zone.serial, old.records - zone.records, zone.records - old.records)
                history = [*self.history, diff]
                while history and (len(history) > HISTORY_DIFFS or
                                   sum(len(d.deleted) + len(d.added) for d in history) > HISTORY_RECORDS):
                    history.pop(0)
                self.history = tuple(history)
            self.zone = zone
        log.info("RPZ zone %s serial %d: %d block, %d allow, %d network rules (%d records)", self.origin,
                 zone.serial, zone.counts["block"], zone.counts["allow"], zone.counts["network"], len(zone.records))
        if old is not None and self.notify_to:
            threading.Thread(target=self.send_notify, args=(zone.serial,), name="rpz-notify", daemon=True).start()
        return True

    # ---- NOTIFY

    def send_notify(self, serial: int) -> None:
        """RFC 1996: tell every secondary the zone changed, retrying until it answers (5 tries)."""
        for host, port in self.notify_to:
            message = dns.message.make_query(self.origin, dns.rdatatype.SOA, use_edns=False)
            message.flags = dns.flags.AA  # and no RD; the opcode lives in the flags: set it after
            message.set_opcode(dns.opcode.NOTIFY)
            message.answer.append(dns.rrset.from_rdata(self.origin, self.answers.ttl, self.zone_soa(serial)))
            if self.tsig is not None:
                message.use_tsig(self.tsig.key)
            for attempt in range(NOTIFY_TRIES):
                try:
                    reply = dns.query.udp(message, host, port=port, timeout=1.0 + attempt, ignore_unexpected=True)
                except (dns.exception.DNSException, OSError) as exc:
                    error = str(exc) or exc.__class__.__name__
                    continue
                if reply.rcode() == dns.rcode.NOERROR:
                    log.info("RPZ: NOTIFY %s serial %d to %s:%d acknowledged", self.origin, serial, host, port)
                else:
                    log.warning("RPZ: NOTIFY %s serial %d to %s:%d answered %s", self.origin, serial, host, port,
                                dns.rcode.to_text(reply.rcode()))
                break
            else:
                log.warning("RPZ: NOTIFY %s serial %d to %s:%d: no answer after %d tries (%s)", self.origin, serial,
                            host, port, NOTIFY_TRIES, error)

    def zone_soa(self, serial: int) -> dns.rdata.Rdata:
        assert self.zone is not None
        return self.zone.soa(serial)

    # ---- answering

    def answer(self, query: dns.message.Message, peer: str, tcp: bool, need_tsig: bool) -> list[bytes]:
        question = query.question[0]
        zone = self.zone
        if zone is None or question.name != self.origin or question.rdclass != dns.rdataclass.IN:
            return [_reply(query, dns.rcode.REFUSED)]
        rdtype = question.rdtype
        if rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR) or need_tsig:
            if not _allowed(peer, self.networks) or (need_tsig and not query.had_tsig):
                log.warning("RPZ: %s for %s from %s refused (%s)", dns.rdatatype.to_text(rdtype), self.origin, peer,
                            "not in rpz_secondaries" if not _allowed(peer, self.networks) else "no TSIG")
                return [_reply(query, dns.rcode.REFUSED)]
        if rdtype == dns.rdatatype.SOA or (rdtype == dns.rdatatype.IXFR and not tcp):
            # IXFR over UDP: the SOA alone says "come over TCP" (RFC 1995, 2)
            return [_records(query, [(self.origin, zone.soa())], zone.ttl)[0]]
        if rdtype == dns.rdatatype.NS:
            return [_records(query, [zone.apex()[1]], zone.ttl)[0]]
        if rdtype == dns.rdatatype.AXFR:
            if not tcp:
                return [_reply(query, dns.rcode.REFUSED)]
            log.info("RPZ: AXFR %s serial %d to %s", self.origin, zone.serial, peer)
            return _records(query, self._axfr(zone), zone.ttl, multi=True)
        if rdtype == dns.rdatatype.IXFR:
            return _records(query, self._ixfr(query, zone, peer), zone.ttl, multi=True)
        response = dns.message.make_response(query)  # anything else at the apex: no data
        response.flags |= dns.flags.AA
        response.authority.append(dns.rrset.from_rdata(self.origin, zone.ttl, zone.soa()))
        return [response.to_wire(max_size=65535)]

    def _axfr(self, zone: Zone) -> list[Record]:
        soa = (self.origin, zone.soa())
        return [soa, *zone.apex()[1:], *zone.sorted_records(), soa]

    def _ixfr(self, query: dns.message.Message, zone: Zone, peer: str) -> list[Record]:
        soa = (self.origin, zone.soa())
        have = None
        for rrset in query.authority:
            if rrset.rdtype == dns.rdatatype.SOA and rrset:
                have = rrset[0].serial
        if have is not None and have == zone.serial:
            return [soa]  # up to date
        chain: list[Diff] = []
        at = have
        for diff in self.history:
            if diff.old == at:
                chain.append(diff)
                at = diff.new
        if have is None or not chain or at != zone.serial:
            log.info("RPZ: IXFR %s from serial %s to %s: whole zone (no differences kept from that serial)",
                     self.origin, have, peer)
            return self._axfr(zone)
        log.info("RPZ: IXFR %s serial %d -> %d to %s (%d differences)", self.origin, have, zone.serial, peer,
                 len(chain))
        out = [soa]
        for diff in chain:
            out.append((self.origin, zone.soa(diff.old)))
            out.extend(sorted(diff.deleted, key=_order))
            out.append((self.origin, zone.soa(diff.new)))
            out.extend(sorted(diff.added, key=_order))
        out.append(soa)
        return out


def _reply(query: dns.message.Message, rcode: int) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response.to_wire(max_size=65535)


def _records(query: dns.message.Message, records: list[Record], ttl: int, multi: bool = False) -> list[bytes]:
    """Records as answer messages, each under MESSAGE_BUDGET bytes; signed in sequence with TSIG
    (RFC 8945, 5.3.1) when the request was signed."""
    out: list[bytes] = []
    ctx: Any = None
    response: dns.message.Message | None = None
    size = 0

    def flush() -> None:
        nonlocal ctx, response
        assert response is not None
        if query.had_tsig and multi:
            out.append(response.to_wire(max_size=65535, multi=True, tsig_ctx=ctx))
            ctx = response.tsig_ctx
        else:
            out.append(response.to_wire(max_size=65535))
        response = None

    for name, rdata in records:
        cost = len(name.to_wire() or b"") + 10 + len(rdata.to_wire() or b"")
        if response is not None and size + cost > MESSAGE_BUDGET:
            flush()
        if response is None:
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            size = 0
        response.answer.append(dns.rrset.from_rdata(name, ttl, rdata))
        size += cost
    if response is not None:
        flush()
    return out


# ---------------------------------------------------------------------------- secondary


class TransferError(SinkholeError):
    """The zone could not be pulled from the primary, or not applied."""


class Secondary(threading.Thread):
    """Pulls the policy zone from `policy_from` and applies it as category `rpz:<zone>`."""

    def __init__(self, cfg: Settings, db: Path) -> None:
        from sinkhole.dns.upstream import parse_hostport

        super().__init__(name="rpz-secondary", daemon=True)
        self.cfg = cfg
        self.db = db
        self.host, self.port = parse_hostport(cfg.fleet.policy_from, 53)
        self.where = cfg.fleet.policy_from
        self.origin = zone_name(cfg.fleet.rpz_zone)
        self.category = CATEGORY_PREFIX + self.origin.to_text(omit_final_dot=True)
        self.tsig = parse_tsig(cfg.fleet.rpz_tsig)
        self.zone: dns.versioned.Zone | None = None
        self.applied: int | None = None  # the serial whose rules are in the database
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.refresh = float(cfg.fleet.rpz_refresh)
        self.retry = max(1.0, cfg.fleet.rpz_refresh / 4)
        self._failing_since: float | None = None
        self._last_complaint = 0.0
        self.transfers = 0

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def run(self) -> None:
        log.info("RPZ secondary: zone %s from %s into category %s", self.origin, self.where, self.category)
        while not self.stopping.is_set():
            try:
                self.check()
                if self._failing_since is not None:
                    log.info("RPZ: primary %s answers again (serial %s in force)", self.where, self.applied)
                self._failing_since = None
                delay = self.refresh
            except Exception as exc:  # one line per retry interval at most; the rules in force stay
                now = time.monotonic()
                if self._failing_since is None:
                    self._failing_since = now
                if now - self._last_complaint >= max(self.retry, 10.0) or self._last_complaint == 0.0:
                    self._last_complaint = now
                    log.warning("RPZ: zone %s from %s: %s; keeping the policy in force (serial %s)", self.origin,
                                self.where, exc, self.applied)
                delay = self.retry
            self.wake.wait(delay)
            self.wake.clear()

    def _soa_serial(self) -> tuple[int, int, int]:
        """(serial, refresh, retry) of the primary's SOA, asked over UDP."""
        query = dns.message.make_query(self.origin, dns.rdatatype.SOA)
        if self.tsig is not None:
            query.use_tsig(self.tsig.key)
        try:
            reply = dns.query.udp(query, self.host, port=self.port, timeout=3.0)
        except (dns.exception.DNSException, OSError) as exc:
            raise TransferError(f"SOA query failed: {str(exc) or exc.__class__.__name__}") from None
        if reply.rcode() != dns.rcode.NOERROR:
            raise TransferError(f"SOA query answered {dns.rcode.to_text(reply.rcode())}")
        for rrset in reply.answer:
            if rrset.rdtype == dns.rdatatype.SOA and rrset.name == self.origin:
                return rrset[0].serial, rrset[0].refresh, rrset[0].retry
        raise TransferError("the primary's answer holds no SOA for the zone")

    def check(self) -> None:
        """Compare serials; transfer and apply when the primary has another one."""
        serial, refresh, retry = self._soa_serial()
        self.refresh = float(min(max(refresh, 1), 86400))
        self.retry = float(min(max(retry, 1), 3600))
        if self.applied == serial and self.zone is not None:
            return
        zone = self._transfer()
        self.apply(zone)

    def _transfer(self) -> dns.versioned.Zone:
        kw: dict[str, Any] = {}
        if self.tsig is not None:
            kw = {"keyring": self.tsig.keyring, "keyname": self.tsig.name, "keyalgorithm": self.tsig.algorithm}
        zone = self.zone
        if zone is not None:  # IXFR from the serial we hold
            try:
                query, _ = dns.xfr.make_query(zone, **kw)
                dns.query.inbound_xfr(self.host, zone, query, port=self.port, timeout=10, lifetime=120)
                self.transfers += 1
                return zone
            except (dns.exception.DNSException, OSError, ValueError) as exc:
                log.info("RPZ: IXFR of %s from %s failed (%s): trying AXFR", self.origin, self.where,
                         str(exc) or exc.__class__.__name__)
        fresh = dns.versioned.Zone(self.origin)
        try:
            query, _ = dns.xfr.make_query(fresh, serial=None, **kw)
            dns.query.inbound_xfr(self.host, fresh, query, port=self.port, timeout=10, lifetime=300)
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            raise TransferError(f"AXFR failed: {str(exc) or exc.__class__.__name__}") from None
        self.zone = fresh
        self.transfers += 1
        return fresh

    def apply(self, zone: dns.versioned.Zone) -> None:
        """Make the category hold exactly the zone's rules, in one transaction (nothing when equal)."""
        soa = zone.get_rdataset(self.origin, dns.rdatatype.SOA)
        serial = soa[0].serial if soa else 0
        text = zone.to_text(want_origin=True)
        source = f"rpz://{self.where}/{self.origin.to_text(omit_final_dot=True)}"
        has_policy = any(n != dns.name.empty and n != self.origin for n in zone.nodes)
        try:
            parsed = lists.parse(text, source, "rpz") if has_policy else lists.BlockList(self.category)
        except ListFormatError as exc:
            raise TransferError(f"serial {serial} cannot be applied: {exc}") from None
        store = open_store(self.db, self.cfg.policy.shipped_lists)
        try:
            have = {(r["domain"], r["kind"]) for r in store.list_rules(category=self.category) if r["source"] != "cli"}
            want = {(d, "block") for d, _ in parsed.entries} | {(d, "allow") for d, _ in parsed.allows}
            if have != want:
                actor = Actor(command=f"sinkhole serve: RPZ transfer of {self.origin} serial {serial}"
                                      f" from {self.where}")
                store.replace_category(self.category, parsed.entries, source, actor=actor, allows=parsed.allows)
                log.info("RPZ: zone %s serial %d from %s applied: %d block and %d allow rules in category %s",
                         self.origin, serial, self.where, len(parsed.entries), len(parsed.allows), self.category)
        finally:
            store.close()
        self.applied = serial


# ---------------------------------------------------------------------------- wiring


def bind(cfg: Settings) -> tuple[socket.socket, socket.socket] | None:
    """The UDP and TCP sockets of rpz_listen (port 0: the same free port for both), bound before --user
    drops root so that the zone can be served on port 53; None when there is no rpz_listen."""
    from sinkhole.dns.listener import bind_pair
    from sinkhole.dns.upstream import parse_hostport

    if not cfg.fleet.rpz_listen:
        return None
    host, port = parse_hostport(cfg.fleet.rpz_listen, 53)
    _, _, udp, tcp = bind_pair(host, port)
    return udp, tcp


class Node:
    """What `sinkhole serve` runs for RPZ: a primary, a secondary, or both, and their listener."""

    def __init__(self, cfg: Settings, db: Path, answers: AnswerConfig) -> None:
        self.primary = Primary(cfg, answers) if cfg.fleet.rpz_listen else None
        self.secondary = Secondary(cfg, db) if cfg.fleet.policy_from else None
        self.endpoint = Endpoint(cfg, self.primary, self.secondary) if cfg.fleet.rpz_listen else None

    def policy_changed(self, store: Store) -> None:
        if self.primary is not None:
            self.primary.policy_changed(store)

    async def start(self, sockets: tuple[socket.socket, socket.socket] | None) -> None:
        """`sockets`: from bind(); None only when there is no rpz_listen."""
        if self.endpoint is not None:
            assert sockets is not None, "rpz_listen is bound before the server starts (rpz.bind)"
            await self.endpoint.start(sockets)
        if self.secondary is not None:
            self.secondary.start()

    async def stop(self) -> None:
        if self.secondary is not None:
            self.secondary.stop()
        if self.endpoint is not None:
            await self.endpoint.stop()
        if self.secondary is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.secondary.join, 5)
