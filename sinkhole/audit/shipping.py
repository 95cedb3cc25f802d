"""Shipping audit rows to the agency's SIEM as they are stored: RFC 5424 syslog over UDP or TCP, JSON Lines on stdout.

The audit writer thread hands each committed batch (the rows exactly as stored: sealed, with chain, link and mac,
and their seq) to `Shipper.ship`, which only appends to each destination's bounded queue and returns. Each
destination has its own sender thread, so a slow or absent collector never slows the writer, let alone a DNS
answer: when a queue is full, the rows that do not fit are counted and dropped, and a warning says so at most once
per `loss_log_interval`. A TCP collector that goes away is reconnected to with backoff; what was queued meanwhile
is sent then.

Syslog messages (RFC 5424, with TCP framing by octet counting, RFC 6587 section 3.4.1):

    <PRI>1 TIMESTAMP HOSTNAME sinkhole PROCID MSGID [sinkhole@32473 seq="7" time="..." client="..." ...] MSG

MSGID is the row's action (`blocked`, `canary`, `gap` ...), or `anchor` for a chain head; the structured data
holds every stored column but `rname` (derived from qname), and a column that is NULL is left out, so the SIEM's
copy can be checked against the MACs; MSG is a one-line summary for people. An anchor's MSG is the JSON line
`sinkhole log anchor` prints for that chain, so that the SIEM's anchors make a file for `sinkhole log verify
--anchor`. Anchors are sent every `anchor_interval` seconds and when the server stops.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sinkhole.errors import ConfigError
from sinkhole.policy.names import is_ip_address
from sinkhole.store.schema import AUDIT_INSERT, iso

log = logging.getLogger(__name__)

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7, "uucp": 8,
    "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13, "console": 14, "solaris-cron": 15,
    **{f"local{n}": 16 + n for n in range(8)},
}
WARNING, NOTICE, INFO = 4, 5, 6
# blocked attempts and bypass attempts are what a SIEM alerts on; a gap row says rows were lost
SEVERITY = {"blocked": NOTICE, "cname-blocked": NOTICE, "ip-blocked": NOTICE, "canary": NOTICE, "gap": WARNING}
ANCHOR_SEVERITY = NOTICE  # not INFO: a collector filtering at notice must keep the anchors
SD_ID = "sinkhole@32473"  # 32473: the example Private Enterprise Number of RFC 5612 (documentation use)
APP_NAME = "sinkhole"
ROW_KEYS = ("seq", *AUDIT_INSERT)  # the columns of a stored row, as `sinkhole log --format json` prints them
SD_SKIP = frozenset({"rname"})  # derived from qname, not covered by the MAC
ESSENTIAL = frozenset({"seq", "time", "client", "qname", "qtype", "action", "rule", "chain", "link", "mac"})
ANCHOR_KEYS = ("chain", "link", "seq", "mac", "time")  # sinkhole.audit.chain.heads(), `sinkhole log anchor`
UDP_MAX = 1400  # octets: one datagram without IP fragmentation on any Ethernet path, IPv4 or IPv6 (RFC 5426 3.2)
QUEUE_ROWS = 10_000  # rows held per destination while it cannot take them
BACKOFF_FIRST, BACKOFF_CAP = 0.1, 10.0  # seconds between TCP reconnects
CONNECT_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0  # a TCP collector that takes nothing for this long is reconnected to
CLOSE_TIMEOUT = 3.0  # seconds at shutdown to deliver what is queued and the last anchors
PIPE_BUF = 4096  # writes up to this size to a pipe are not interleaved with other workers' lines
_I = {c: i for i, c in enumerate(AUDIT_INSERT)}
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\.?\Z")


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Target:
    transport: str  # "udp" | "tcp"
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}://{host}:{self.port}"


def parse_target(text: str) -> Target:
    """'udp://HOST:PORT', 'tcp://HOST:PORT', 'HOST:PORT' (UDP), 'HOST' (UDP, port 514); '[::1]:514' for IPv6."""
    raw = text.strip()
    transport, rest = "udp", raw
    if "://" in raw:
        transport, rest = raw.split("://", 1)
        transport = transport.lower()
        if transport not in ("udp", "tcp"):
            raise ConfigError(f"syslog: {text!r}: the scheme must be udp:// or tcp://")
    host, port = rest, "514"
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0 or (rest[close + 1:] and not rest[close + 1:].startswith(":")):
            raise ConfigError(f"syslog: {text!r}: expected [IPV6]:PORT")
        host, port = rest[1:close], rest[close + 2:] or "514"
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"syslog: {text!r}: the port must be a number from 1 to 65535")
    if not host or not (is_ip_address(host) or _HOSTNAME.match(host)):
        raise ConfigError(f"syslog: {text!r}: {host!r} is neither an IP address nor a host name")
    return Target(transport, host, int(port))


def facility_code(name: str) -> int:
    try:
        return FACILITIES[name.lower()]
    except KeyError:
        raise ConfigError(f"syslog_facility must be one of {', '.join(FACILITIES)}, not {name!r}") from None


# ---------------------------------------------------------------------------- formats


def sd_escape(value: str) -> str:
    """An SD-PARAM value: '"', '\\' and ']' escaped with a backslash (RFC 5424 section 6.3.3)."""
    if '"' in value or "\\" in value or "]" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
    return value


def header_token(text: str, limit: int) -> str:
    """HOSTNAME, APP-NAME, PROCID, MSGID: 1 to `limit` printable US-ASCII characters, no space; '-' if empty."""
    token = "".join(c if "!" <= c <= "~" else "_" for c in text)[:limit]
    return token or "-"


def record(seq: int | None, row: Sequence[object]) -> dict[str, object]:
    """A stored row (AUDIT_INSERT order) and its seq -> the dict `sinkhole log --format json` prints for it."""
    return dict(zip(ROW_KEYS, (seq, *row), strict=True))


def summary(rec: dict[str, object]) -> str:
    action = rec.get("action")
    if action == "gap":
        return f"audit gap: {rec.get('answer')}"
    text = f"{action} {rec.get('qname')} {rec.get('qtype')} from {rec.get('client')}"
    count = rec.get("count")
    if count is not None and count != 1:  # identical answers within the audit window, the first at `time`
        text += f" ({count} times)"
    if rec.get("rule"):
        text += f" by rule {rec['rule']}" + (f" ({rec['category']})" if rec.get("category") else "")
    return text


def _pri(facility: int, severity: int) -> str:
    return f"<{facility * 8 + severity}>"


def _encode(header: str, params: list[tuple[str, str]], msg: str) -> bytes:
    sd = "[" + SD_ID + "".join(f' {k}="{sd_escape(v)}"' for k, v in params) + "]"
    text = f"{header} {sd}"
    if msg:
        # MSG in UTF-8 must begin with a BOM (RFC 5424 section 6.4); plain ASCII is sent as MSG-ANY, without one
        text += " " + (msg if msg.isascii() else "\ufeff" + msg)
    return text.encode("utf-8", "backslashreplace")


def format_row(rec: dict[str, object], facility: int, hostname: str, procid: str,
               limit: int | None = None) -> bytes:
    """One audit row as an RFC 5424 message, at most `limit` octets (for UDP): past it, the summary goes first,
    then the longest non-essential values are shortened (and `truncated="1"` says so)."""
    action = str(rec.get("action") or "-")
    header = (f"{_pri(facility, SEVERITY.get(action, INFO))}1 {rec.get('time') or '-'} {hostname} {APP_NAME} "
              f"{procid} {header_token(action, 32)}")
    params = [(k, _text(v)) for k, v in rec.items() if v is not None and k not in SD_SKIP]
    msg = summary(rec)
    out = _encode(header, params, msg)
    if limit is None or len(out) <= limit:
        return out
    out = _encode(header, params, "")
    truncated = False
    while len(out) > limit:
        candidates = [i for i, (k, v) in enumerate(params) if k not in ESSENTIAL and len(v) > 3]
        if not candidates:
            return out[:limit]  # cannot happen with the stored columns' sizes; stays a bounded datagram
        i = max(candidates, key=lambda j: len(params[j][1]))
        k, v = params[i]
        excess = len(out) - limit + (0 if truncated else len(' truncated="1"'))
        params[i] = (k, v[:max(0, len(v) - excess - 3)] + "...")
        if not truncated:
            params.append(("truncated", "1"))
            truncated = True
        out = _encode(header, params, "")
    return out


def anchor_line(head: dict[str, object]) -> str:
    """The JSON line `sinkhole log anchor` prints for a chain head (the form `log verify --anchor` reads)."""
    return json.dumps({k: head.get(k) for k in ANCHOR_KEYS})


def format_anchor(head: dict[str, object], facility: int, hostname: str, procid: str, now: str) -> bytes:
    header = f"{_pri(facility, ANCHOR_SEVERITY)}1 {now} {hostname} {APP_NAME} {procid} anchor"
    params = [(k, _text(head[k])) for k in ANCHOR_KEYS if head.get(k) is not None]
    return _encode(header, params, anchor_line(head))


def octet_frame(message: bytes) -> bytes:
    """TCP framing by octet counting (RFC 6587 section 3.4.1): MSG-LEN SP SYSLOG-MSG."""
    return b"%d %s" % (len(message), message)


def _text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def _now_iso() -> str:
    return iso(time.time())


# ---------------------------------------------------------------------------- the shipper


class Shipper:
    """Fans the writer's committed batches out to the destinations; keeps each chain's latest head."""

    def __init__(self, sinks: list[_Sink], node: str) -> None:
        self.sinks = sinks
        self.node = node
        self.heads: dict[str, dict[str, object]] = {}  # chain -> head, as chain.heads() gives it
        self.current: str | None = None  # the chain written last
        self._lock = threading.Lock()

    def start(self) -> None:
        for s in self.sinks:
            s.start()

    def ship(self, rows: list[tuple], last_seq: int | None) -> None:
        """Called by the writer thread right after `rows` (sealed, AUDIT_INSERT order) were committed, the last
        with seq `last_seq`. Never blocks: each destination queues what fits and counts the rest."""
        if not rows:
            return
        last = rows[-1]
        chain = last[_I["chain"]]
        if chain is not None:
            head = {"chain": chain, "link": last[_I["link"]], "seq": last_seq, "mac": last[_I["mac"]],
                    "time": last[_I["time"]]}
            with self._lock:
                self.heads[chain] = head
                self.current = chain
        first = None if last_seq is None else last_seq - len(rows) + 1
        for s in self.sinks:
            s.offer(first, rows)

    def snapshot(self) -> tuple[str | None, list[dict[str, object]]]:
        with self._lock:
            return self.current, list(self.heads.values())

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Deliver what is queued and the last anchors, for at most `timeout` seconds; then count the rest."""
        deadline = time.monotonic() + timeout
        for s in self.sinks:
            s.stop(deadline)
        for s in self.sinks:
            s.join(max(0.0, deadline - time.monotonic()) + 0.5)
            if s.is_alive():
                log.warning("shipping to %s: still busy at shutdown; %d rows not sent", s.label, s.queued)

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in self.sinks)

    @property
    def sent(self) -> int:
        return sum(s.sent for s in self.sinks)


class _Sink(threading.Thread):
    """One destination: a bounded queue of committed batches, and the thread that sends them."""

    label = "?"

    def __init__(self, shipper: Shipper, max_rows: int = QUEUE_ROWS) -> None:
        super().__init__(name=f"ship-{self.label}", daemon=True)
        self.shipper = shipper
        self.max_rows = max_rows
        self.loss_log_interval = 10.0
        self._items: deque[tuple[int | None, list[tuple]]] = deque()
        self._cond = threading.Condition()
        self.queued = 0  # rows in the queue
        self.sent = 0  # rows handed to the destination
        self.dropped = 0  # rows that will not be sent
        self._dropped_logged = 0
        self._last_loss_log = float("-inf")
        self._stopping = False
        self._deadline = float("inf")

    # -- the writer's side

    def offer(self, first_seq: int | None, rows: list[tuple]) -> None:
        with self._cond:
            room = self.max_rows - self.queued
            if room < len(rows):
                self.dropped += len(rows) - max(room, 0)
                if room <= 0:
                    return
                rows = rows[:room]
            self._items.append((first_seq, rows))
            self.queued += len(rows)
            self._cond.notify()

    def stop(self, deadline: float) -> None:
        with self._cond:
            self._stopping = True
            self._deadline = deadline
            self._cond.notify()

    # -- the sender thread

    def run(self) -> None:
        try:
            self.serve()
        except Exception:  # never die silently; the writer keeps queueing and this sink counts it as dropped
            log.exception("shipping to %s failed; audit rows are no longer shipped there", self.label)
        finally:
            self.release()

    def serve(self) -> None:
        while True:
            item = self.take(self.wait_time())
            self.tick()
            if item is None:
                if self._stopping:
                    self.finish()
                    return
                continue
            first, rows = item
            recs = [record(None if first is None else first + i, r) for i, r in enumerate(rows)]
            if not self.deliver(recs):  # gave up at shutdown
                self.lose(len(rows))
                self.drain_lost()
                self.log_loss(force=True)
                return
            self.log_loss()

    def take(self, timeout: float) -> tuple[int | None, list[tuple]] | None:
        with self._cond:
            if not self._items and not self._stopping:
                self._cond.wait(timeout)
            if not self._items:
                return None
            item = self._items.popleft()
            self.queued -= len(item[1])
            return item

    def wait_time(self) -> float:
        return 1.0

    def tick(self) -> None:
        """Called by the sender thread at least every `wait_time()` seconds."""
        self.log_loss()

    def finish(self) -> None:
        """The queue is empty and the shipper is stopping."""
        self.log_loss(force=True)

    def release(self) -> None:
        pass

    def deliver(self, recs: list[dict[str, object]]) -> bool:
        """Send the rows and count them in `sent` (or `dropped`); keep trying until they went or, when stopping,
        the deadline passed (-> False: the caller counts them as dropped)."""
        raise NotImplementedError

    def give_up(self) -> bool:
        return self._stopping and time.monotonic() >= self._deadline

    def lose(self, n: int) -> None:
        with self._cond:
            self.dropped += n

    def drain_lost(self) -> None:
        with self._cond:
            n = sum(len(rows) for _, rows in self._items)
            self._items.clear()
            self.queued = 0
            self.dropped += n

    def log_loss(self, force: bool = False) -> None:
        unlogged = self.dropped - self._dropped_logged
        now = time.monotonic()
        if unlogged <= 0 or (not force and now - self._last_loss_log < self.loss_log_interval):
            return
        log.warning("shipping to %s: %d audit rows not shipped (%d since start; %s); they are in the database",
                    self.label, unlogged, self.dropped, self.why())
        self._dropped_logged += unlogged
        self._last_loss_log = now

    def why(self) -> str:
        return f"queue of {self.max_rows} rows full"


class SyslogSink(_Sink):
    """RFC 5424 to a collector over UDP (one datagram a message) or TCP (octet counting), with anchors."""

    def __init__(self, shipper: Shipper, target: Target, facility: int, anchor_interval: float,
                 max_rows: int = QUEUE_ROWS) -> None:
        self.label = str(target)
        super().__init__(shipper, max_rows)
        self.target = target
        self.facility = facility
        self.anchor_interval = anchor_interval
        self.hostname = header_token(shipper.node, 255)
        self.sock: socket.socket | None = None
        self.addr: Any = None
        self.connected = False
        self.connects = 0  # successful TCP connections
        self.anchors = 0  # anchor messages sent
        self.refused = 0  # UDP datagrams the kernel refused (counted in dropped too)
        self.error = ""
        self.backoff_first, self.backoff_cap = BACKOFF_FIRST, BACKOFF_CAP
        self.delay = self.backoff_first
        self.next_try = 0.0
        self.down_since: float | None = None
        self.next_anchor = time.monotonic() + anchor_interval
        self.anchored: dict[str, object] = {}  # chain -> the mac of the last anchor sent for it

    # -- anchors

    def wait_time(self) -> float:
        return max(0.0, min(1.0, self.next_anchor - time.monotonic()))

    def tick(self) -> None:
        super().tick()
        if time.monotonic() >= self.next_anchor and not self._stopping:
            self.send_anchors()

    def finish(self) -> None:
        self.send_anchors(final=True)
        super().finish()

    def send_anchors(self, final: bool = False) -> None:
        """The current chain's head (every time: also a sign of life), and any other head not yet anchored."""
        self.next_anchor = time.monotonic() + self.anchor_interval
        current, heads = self.shipper.snapshot()
        due = [h for h in heads if h["chain"] == current or self.anchored.get(str(h["chain"])) != h["mac"]]
        if not due:
            return
        procid = str(os.getpid())
        now = _now_iso()
        messages = [format_anchor(h, self.facility, self.hostname, procid, now) for h in due]
        if self.send(messages, wait=final):
            for h in due:
                self.anchored[str(h["chain"])] = h["mac"]
            self.anchors += len(due)
        elif final:
            log.warning("shipping to %s: the last chain heads could not be sent at shutdown (%s); "
                        "run `sinkhole log anchor` and keep its output", self.label, self.error)

    # -- rows

    def deliver(self, recs: list[dict[str, object]]) -> bool:
        procid = str(os.getpid())
        limit = UDP_MAX if self.target.transport == "udp" else None
        messages = [format_row(r, self.facility, self.hostname, procid, limit) for r in recs]
        before = self.refused
        if not self.send(messages, wait=True):
            return False
        self.sent += len(recs) - (self.refused - before)  # UDP: a datagram the kernel refused is lost alone
        return True

    def send(self, messages: list[bytes], wait: bool) -> bool:
        """True once sent. Waits (with backoff) for the collector while `wait`, until the shutdown deadline."""
        while True:
            if self.try_send(messages):
                return True
            if not wait or self.give_up():
                return False
            self.tick_while_down()

    def tick_while_down(self) -> None:
        self.log_loss()
        pause = max(0.0, self.next_try - time.monotonic())
        with self._cond:
            if not self._stopping:
                self._cond.wait(min(pause, 1.0))
        if self._stopping:
            time.sleep(min(pause, max(0.0, self._deadline - time.monotonic()), 0.2))

    def try_send(self, messages: list[bytes]) -> bool:
        if time.monotonic() < self.next_try:
            return False
        try:
            if self.target.transport == "udp":
                self.send_udp(messages)
            else:
                self.send_tcp(messages)
        except OSError as exc:
            self.failed(exc)
            return False
        if self.down_since is not None:
            log.warning("shipping to %s: sending again after %.1f s", self.label, time.monotonic() - self.down_since)
            self.down_since = None
        self.delay = self.backoff_first
        return True

    def failed(self, exc: OSError) -> None:
        self.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, socket.gaierror) else str(exc)
        self.close_socket()
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            log.warning("shipping to %s: %s; holding up to %d rows and retrying", self.label, self.error,
                        self.max_rows)
        self.next_try = now + self.delay
        self.delay = min(self.delay * 2, self.backoff_cap)

    def resolve(self, kind: int) -> tuple[int, Any]:
        infos = socket.getaddrinfo(self.target.host, self.target.port, type=kind)
        family, _, _, _, addr = infos[0]
        return family, addr

    def send_udp(self, messages: list[bytes]) -> None:
        if self.sock is None:
            family, self.addr = self.resolve(socket.SOCK_DGRAM)
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
        for m in messages:
            try:
                self.sock.sendto(m, self.addr)
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.EMSGSIZE):  # that datagram is lost, not the rest
                    self.refused += 1
                    self.lose(1)
                    continue
                raise

    def send_tcp(self, messages: list[bytes]) -> None:
        if self.sock is not None and not self.alive():
            self.close_socket()
        if self.sock is None:
            family, addr = self.resolve(socket.SOCK_STREAM)
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(CONNECT_TIMEOUT)
                sock.connect(addr)
                sock.settimeout(SEND_TIMEOUT)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                sock.close()
                raise
            self.sock, self.connected = sock, True
            self.connects += 1
            if self.connects > 1:
                log.info("shipping to %s: connected again", self.label)
        self.sock.sendall(b"".join(octet_frame(m) for m in messages))

    def alive(self) -> bool:
        """False if the collector closed the connection (or reset it): reconnect before sending into a void."""
        assert self.sock is not None
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return True
            return bool(self.sock.recv(4096, socket.MSG_DONTWAIT))  # a collector says nothing; b"": closed
        except (OSError, ValueError):
            return False

    def close_socket(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock, self.connected = None, False

    def release(self) -> None:
        self.close_socket()

    def why(self) -> str:
        if self.down_since is not None:
            return f"collector unreachable for {time.monotonic() - self.down_since:.0f} s: {self.error}"
        return super().why()


class JsonSink(_Sink):
    """Each row as one JSON object a line on stdout (under systemd: to journald); the server's log is on stderr."""

    label = "stdout"

    def __init__(self, shipper: Shipper, fd: int = 1, max_rows: int = QUEUE_ROWS,
                 dumps: Callable[[object], str] | None = None) -> None:
        super().__init__(shipper, max_rows)
        self.fd = fd
        self.error = ""
        self.dumps = dumps or (lambda rec: json.dumps(rec, ensure_ascii=False, default=str))

    def deliver(self, recs: list[dict[str, object]]) -> bool:
        chunk: list[bytes] = []
        size = 0
        try:
            for rec in recs:
                line = (self.dumps(rec) + "\n").encode("utf-8", "backslashreplace")
                if size + len(line) > PIPE_BUF and chunk:
                    self.write(b"".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            if chunk:
                self.write(b"".join(chunk))
        except OSError as exc:  # stdout closed: nothing to wait for
            if not self.error:
                log.warning("shipping to stdout: %s; JSON lines are no longer written", exc)
            self.error = str(exc)
            self.lose(len(recs))
            return True
        self.sent += len(recs)
        return True

    def write(self, data: bytes) -> None:
        """Whole lines in one write() each where they fit PIPE_BUF, so that workers' lines do not interleave."""
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def why(self) -> str:
        return self.error or super().why()
