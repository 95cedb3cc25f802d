"""Start-up, written once: bind every socket while still root, become the service's user, create and seed the
database, then run one server or supervise workers.

    run(settings, db, reload, front)
      bind(settings)         DNS (systemd's sockets when socket-activated, else ours), rpz_listen, the block
                             page's and the console's listening sockets (systemd's or ours); all closed again
                             if a later bind fails
      become(user)           (`user` set) what later code loads lazily is loaded, then root is dropped
      open_store(db)         the database made and seeded once, before workers could race to make it
      one server             server.serve(Server(...)) on this process's event loop, or
      a supervisor           workers.Supervisor(...).run(): forked workers on the same sockets

Binding before dropping root is what lets an unprivileged service answer on ports 53, 80 and 443; the sockets
are handed down as they are, so a server or a worker never binds anything itself.
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401  (run_in_executor at shutdown: loaded before root is dropped)
import encodings.idna  # (codecs are looked up, and imported, on first use: the same)
import encodings.utf_8_sig  # noqa: F401  (list files are read as UTF-8 with or without a BOM: the same)
import importlib.metadata  # noqa: F401  (sqlite-utils' plugins: the same)
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from sinkhole import logthrottle
from sinkhole.dns.listener import bind_pair
from sinkhole.service import build, privileges, server, systemd, workers
from sinkhole.service.config import Settings
from sinkhole.service.server import Bound, Front, Server
from sinkhole.store.db import open_store
from sinkhole.store.schema import preload

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- binding


def bind(settings: Settings) -> Bound:
    """Every socket the settings ask for, bound now (before --user drops root); see the module's text."""
    passed = systemd.listen_sockets()
    if passed:
        dns = [(h, p, pair["udp"], pair["tcp"]) for (h, p), pair in systemd.group_by_address(passed).items()]
    else:
        dns = []
    bound = Bound(dns, bool(passed))
    try:
        if not passed:
            for host, port in build.listen_addresses(settings):
                bound.dns.append(bind_pair(host, port))
        address = build.rpz_address(settings)
        if address is not None:
            _, _, udp, tcp = bind_pair(*address)
            bound.rpz = (udp, tcp)
        bound.blockpage = _blockpage(settings)
        bound.web = _web(settings)
    except BaseException:
        bound.close()
        raise
    return bound


def bind_tcp(addresses: list[tuple[str, int]], name: str) -> list[socket.socket]:
    """Listening TCP sockets: those systemd passed under FileDescriptorName `name`, else bound here (before
    root is dropped, so that ports 80 and 443 work); port 0 picks a free port."""
    passed = systemd.listen_sockets(name)
    if passed:
        return passed
    socks: list[socket.socket] = []
    try:
        for host, port in addresses:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _blockpage(settings: Settings) -> list[socket.socket]:
    """The block page's listening sockets (systemd's, else bound now); [] when blockpage_listen is off."""
    if not settings.blockpage.blockpage_listen:
        unused = systemd.listen_sockets(systemd.BLOCKPAGE)
        if unused:
            log.warning("systemd passed %d block page sockets, but blockpage_listen is not set: not serving them "
                        "(set SINKHOLE_BLOCKPAGE_LISTEN, or disable sinkhole-blockpage.socket)", len(unused))
        for sock in unused:
            sock.close()
        return []
    return bind_tcp(build.blockpage_addresses(settings), systemd.BLOCKPAGE)


def _web(settings: Settings) -> list[socket.socket]:
    """The web console's listening sockets (systemd's, named `web`, else bound now); [] when web_listen is off."""
    if not settings.web.web_listen:
        for sock in systemd.listen_sockets(systemd.WEB):
            sock.close()
        return []
    return bind_tcp(build.web_addresses(settings), systemd.WEB)


# ---------------------------------------------------------------------------- becoming the service's user


def become(user: str) -> None:
    """Become `user`. What later code would import or load lazily is loaded already (the imports at the top of
    this module, and the store's own: sqlite-utils' plugins), because the new user may not be able to read the
    installation (a Python under /root, say)."""
    preload()
    privileges.drop_to(user)


# ---------------------------------------------------------------------------- running


class _EarlyStop:
    """SIGTERM or SIGINT before the server or the supervisor handles them: remembered, not fatal."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._note) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _note(self, signum: int, frame: object) -> None:
        self.requested = True

    def asked(self) -> bool:
        return self.requested


def run(settings: Settings, db: Path, reload: Callable[[], Settings] | None = None, front: Front | None = None) -> int:
    """Serve until SIGTERM or SIGINT; a reload (SIGHUP, `sinkhole reload`) calls `reload` and applies what can
    change at run time; returns the exit code. `front`: the block page and the console (sinkhole.web.front)."""
    logthrottle.install(settings.process.log_repeat_interval)  # on the handler `serve` set up
    early = _EarlyStop()
    web_tls = front.console_tls(settings, db) if front is not None else None  # a console that cannot be served
    bound = bind(settings)  # says so before anything is bound
    try:
        if settings.process.user:
            become(settings.process.user)
        open_store(db, settings.policy.shipped_lists).close()  # made and seeded once, before workers race
    except BaseException:
        bound.close()
        raise
    count = settings.process.workers or os.cpu_count() or 1
    if count > 1:
        return workers.Supervisor(settings, db, count, bound, reload, front, web_tls, early=early.asked).run()
    one = Server(settings, db, bound, reload=reload, front=front, web_tls=web_tls)
    server.run_loop(lambda: server.serve(one, early=early.asked))
    return 0
