"""The systemd side of a service, stdlib only: socket activation, sd_notify, the watchdog interval,
log lines that carry their priority into the journal.

Each function does nothing (returns an empty result) when not started by systemd, so the
server can call them unconditionally. The protocols are those of sd_listen_fds(3),
sd_notify(3), sd_watchdog_enabled(3) and sd-daemon(3) (the `<N>` prefix).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import TextIO

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: the first file descriptor systemd passes

SocketPair = dict[str, socket.socket | None]


BLOCKPAGE = "blockpage"  # FileDescriptorName= of sinkhole-blockpage.socket; every other name but WEB is DNS's
WEB = "web"  # FileDescriptorName= of the web console's listening sockets, when a socket unit passes them
_unclaimed: list[tuple[str, socket.socket]] = []  # passed by systemd, not yet taken by a listen_sockets() call


def listen_sockets(name: str | None = None) -> list[socket.socket]:
    """The sockets systemd passed to this process (socket activation), non-blocking and close-on-exec.

    `name`: only those of that FileDescriptorName= (e.g. BLOCKPAGE); None: the DNS ones, every name but
    BLOCKPAGE and WEB. Each socket is returned once. Empty when LISTEN_PID is not our process id or LISTEN_FDS is
    unset. The LISTEN_* variables are removed from the environment either way, so that child processes do
    not take them for theirs.
    """
    _unclaimed.extend(_take_passed())
    taken = [(n, s) for n, s in _unclaimed if (n == name if name is not None else n not in (BLOCKPAGE, WEB))]
    for item in taken:
        _unclaimed.remove(item)
    return [s for _, s in taken]


def _take_passed() -> list[tuple[str, socket.socket]]:
    pid = os.environ.pop("LISTEN_PID", None)
    fds = os.environ.pop("LISTEN_FDS", None)
    names = os.environ.pop("LISTEN_FDNAMES", "").split(":")
    if pid is None or fds is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        count = int(fds)
    except ValueError:
        log.warning("ignoring malformed LISTEN_PID=%r LISTEN_FDS=%r", pid, fds)
        return []
    socks: list[tuple[str, socket.socket]] = []
    for i, fd in enumerate(range(LISTEN_FDS_START, LISTEN_FDS_START + max(count, 0))):
        try:
            sock = socket.socket(fileno=fd)  # the kernel tells family, type and protocol
        except OSError as exc:
            log.warning("file descriptor %d passed by systemd is not a usable socket: %s", fd, exc)
            continue
        sock.setblocking(False)
        sock.set_inheritable(False)
        socks.append((names[i] if i < len(names) else "", sock))
    return socks


def _address(sock: socket.socket) -> tuple[str, int] | None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    host, port = sock.getsockname()[:2]
    return host, port


def group_by_address(socks: list[socket.socket]) -> dict[tuple[str, int], SocketPair]:
    """Pair the UDP and TCP sockets bound to the same (host, port): {(host, port): {"udp": s, "tcp": s}}.

    A key has None for a transport systemd passed no socket for. Sockets that are not IPv4/IPv6
    UDP or TCP are left out (and logged); a second socket of one transport on one address too.
    """
    groups: dict[tuple[str, int], SocketPair] = {}
    for sock in socks:
        address = _address(sock)
        kind = {socket.SOCK_DGRAM: "udp", socket.SOCK_STREAM: "tcp"}.get(sock.type)
        if address is None or kind is None:
            log.warning("ignoring a passed socket that is not IPv4/IPv6 UDP or TCP: %r", sock)
            continue
        pair = groups.setdefault(address, {"udp": None, "tcp": None})
        if pair[kind] is not None:
            log.warning("ignoring a second %s socket passed for %s:%d", kind, *address)
            continue
        pair[kind] = sock
    return groups


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1", "STOPPING=1", "WATCHDOG=1", "STATUS=...") to $NOTIFY_SOCKET.

    True when the message was sent; False when not run by systemd or when sending failed.
    Never raises: a notification that cannot be sent must not stop the server.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]  # abstract namespace
    elif address[0] != "/":
        log.debug("unsupported NOTIFY_SOCKET address %r", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.debug("sd_notify %r to %r failed: %s", state, address, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when no watchdog is armed for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


# ---------------------------------------------------------------------------- the journal

PLAIN_FORMAT = "%(asctime)s sinkhole %(levelname)s %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(message)s"  # journald adds the time and the identifier (sinkhole)

ERR, WARNING, INFO, DEBUG = 3, 4, 6, 7  # syslog priorities, as journalctl -p names them


def is_journal(stream: TextIO) -> bool:
    """True when `stream` is the one systemd connected to the journal: $JOURNAL_STREAM names its
    device and inode (systemd.exec(5)); a terminal, a pipe or a file of our own is not."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, inode = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(inode))
    except (ValueError, OSError, AttributeError):  # unset or malformed, or a stream with no file descriptor
        return False


def priority(levelno: int) -> int:
    """A logging level as a syslog priority: CRITICAL 2, ERROR 3, WARNING 4, INFO 6, DEBUG 7."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return ERR
    if levelno >= logging.WARNING:
        return WARNING
    return INFO if levelno >= logging.INFO else DEBUG


def journal_prefix(level: int, stream: TextIO | None = None) -> str:
    """`<N>` for a line written to `stream` (stderr) when that is the journal, else nothing."""
    return f"<{level}>" if is_journal(stream or sys.stderr) else ""


class JournalFormatter(logging.Formatter):
    """Every line of a record (a traceback too) starts with the record's `<N>` priority: journald stores
    each line as an entry, and SyslogLevelPrefix= (on by default) reads the prefix off each one."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def log_handler(stream: TextIO | None = None) -> logging.Handler:
    """The server's log handler on `stream` (stderr): lines with their priority prefix and without a time
    stamp when the stream is the journal, else plain lines with the time. Filters can be added to it."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter(JOURNAL_FORMAT) if is_journal(stream) else logging.Formatter(PLAIN_FORMAT))
    return handler
