"""What the web layer hands the service to run: the block page and the console.

The service sits below the web in the layers (DESIGN.md), so sinkhole.service never imports sinkhole.web: the
`sinkhole serve` command gives service.process.run a `Front`, and the service calls it with the sockets it bound
before root was dropped. The single server runs both; with workers, worker 0 runs the block page (it shares the
DNS process's audit log and policy) and the supervisor runs the console (it adds up every worker's counters).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sinkhole.policy.decide import Policy
from sinkhole.service.config import Settings
from sinkhole.web import blockpage, console
from sinkhole.web.limits import Service, where

log = logging.getLogger(__name__)


class Front:
    def console_tls(self, settings: Settings, db: Path) -> Any:
        """The console's TLS (console.tls_from_config), checked before anything is bound: ConfigError when plain
        HTTP would be served on an address that is not loopback; None for plain HTTP, or no console."""
        return console.tls_from_config(settings, db) if settings.web.web_listen else None

    def blockpage(self, settings: Settings, db: Path, get_policy: Callable[[], Policy], audit: Any,
                  sockets: list[socket.socket]) -> Service:
        """The block page, started, on its own thread and event loop; its page views go to `audit`."""
        service = blockpage.Service(blockpage.from_config(settings, db, get_policy, audit), sockets)
        service.start()
        log.info("block page on %s (HTTP and HTTPS)", ", ".join(where(s) for s in sockets))
        return service

    def console(self, settings: Settings, db: Path, sockets: list[socket.socket], tls: Any,
                live: Callable[[], list[dict]], health: Callable[[], list[str]]) -> Service:
        """The web console, started, on its own thread and event loop; `live` gives the serving processes'
        metrics snapshots, `health` their problems."""
        service = Service(console.Console(settings, db, live, health, tls), sockets, "web-console")
        service.start()
        scheme = "https" if service.app.tls is not None else "http"  # type: ignore[attr-defined]
        log.info("web console on %s", ", ".join(f"{scheme}://{where(s)}/" for s in sockets))
        return service
