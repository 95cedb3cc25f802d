"""The RPZ primary: the zone in force for one client group and its recent differences; SOA, AXFR and IXFR
answers (RFC 1995: IXFR from the differences this process has built, kept in memory; a serial older than those
gets the whole zone), a new serial on every change of the zone, and NOTIFY to the secondaries (RFC 1996)."""

from __future__ import annotations

import ipaddress
import logging
import threading

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

from sinkhole.dns.answer import AnswerConfig
from sinkhole.errors import ConfigError
from sinkhole.fleet.zone import Diff, Record, Tsig, Zone, _order, _records, _reply, allowed, build
from sinkhole.store.db import Store

log = logging.getLogger(__name__)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
HISTORY_DIFFS = 64  # IXFR: differences kept in memory ...
HISTORY_RECORDS = 200_000  # ... and the records they may hold at most
NOTIFY_TRIES = 5


class Primary:
    """The zone in force and its recent differences; answers SOA, AXFR, IXFR; sends NOTIFY."""

    def __init__(self, origin: dns.name.Name, group: str, secondaries: list[Network], notify_to: list[tuple[str, int]],
                 tsig: Tsig | None, refresh: int, answers: AnswerConfig) -> None:
        """`secondaries`: who may transfer; `notify_to`: (host, port) to NOTIFY on each change; `refresh`: the
        SOA refresh of the zone; `answers`: the server's, whose action a blocked name gets."""
        self.answers = answers
        self.origin = origin
        self.group = group
        self.refresh = refresh
        self.networks = secondaries
        self.notify_to = notify_to
        self.tsig = tsig
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
            zone = build(rules, self.answers, self.origin, serial, self.group, self.refresh, version)
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
            if not allowed(peer, self.networks) or (need_tsig and not query.had_tsig):
                log.warning("RPZ: %s for %s from %s refused (%s)", dns.rdatatype.to_text(rdtype), self.origin, peer,
                            "not in rpz_secondaries" if not allowed(peer, self.networks) else "no TSIG")
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


