"""The RPZ secondary: pulls a zone from `policy_from` (IXFR, else AXFR) when the primary's SOA serial changes, on
NOTIFY and every SOA refresh, and makes one category (`rpz:<zone>`) hold exactly its rules in one transaction;
the server's reloader puts them in force. A primary that cannot be reached, or a zone that cannot be applied,
leaves the rules in force as they were."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

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

from sinkhole.errors import ListFormatError, SinkholeError
from sinkhole.fleet.zone import CATEGORY_PREFIX, Tsig
from sinkhole.policy import lists
from sinkhole.store.db import open_store
from sinkhole.store.journal import Actor

log = logging.getLogger(__name__)


class TransferError(SinkholeError):
    """The zone could not be pulled from the primary, or not applied."""


class Secondary(threading.Thread):
    """Pulls the policy zone from `policy_from` and applies it as category `rpz:<zone>`."""

    def __init__(self, host: str, port: int, where: str, origin: dns.name.Name, tsig: Tsig | None, refresh: int,
                 db: Path, shipped_lists: bool = True) -> None:
        """The primary at (host, port), written `where` in logs and sources; the database (as open_store opens it,
        with `shipped_lists`) its zone's rules go to."""
        super().__init__(name="rpz-secondary", daemon=True)
        self.db = db
        self.shipped_lists = shipped_lists
        self.host, self.port = host, port
        self.where = where
        self.origin = origin
        self.category = CATEGORY_PREFIX + self.origin.to_text(omit_final_dot=True)
        self.tsig = tsig
        self.zone: dns.versioned.Zone | None = None
        self.applied: int | None = None  # the serial whose rules are in the database
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.refresh = float(refresh)
        self.retry = max(1.0, refresh / 4)
        self.failing_since: float | None = None  # monotonic time of the first failure in a row
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
                if self.failing_since is not None:
                    log.info("RPZ: primary %s answers again (serial %s in force)", self.where, self.applied)
                self.failing_since = None
                delay = self.refresh
            except Exception as exc:  # one line per retry interval at most; the rules in force stay
                now = time.monotonic()
                if self.failing_since is None:
                    self.failing_since = now
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
        store = open_store(self.db, self.shipped_lists)
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


