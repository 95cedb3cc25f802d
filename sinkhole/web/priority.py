"""The web layer's threads give way to the DNS event loop. Stdlib only: `sinkhole user add` hashes a password
(web.sessions) without loading the HTTP server (aiohttp: about 130 ms of start-up)."""

from __future__ import annotations

import os
import threading

NICE = 10  # the console's threads: a nice value above the process's, so that they yield the CPU to DNS


def lower_priority() -> None:
    """Make the calling thread nicer (Linux schedules each thread by its own nice value), so that the console's
    rendering, queries and password hashing give way to the DNS event loop on a busy machine."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except (OSError, AttributeError):
        pass
