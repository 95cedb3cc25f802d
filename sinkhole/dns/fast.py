"""The per-packet fast path: compiled (`sinkhole.dns._fast`, Cython) when it was built, else its pure-Python twin
(`sinkhole.dns._fastpure`), same names and behaviour. SINKHOLE_PURE=1 in the environment forces the twin (CI runs
the tests both ways); `COMPILED` says which one is in use."""

from __future__ import annotations

import os

if os.environ.get("SINKHOLE_PURE", "") not in ("", "0"):
    from sinkhole.dns._fastpure import (
        COMPILED,
        MAX_ENTRIES,
        MAX_PACKET,
        Blocker,
        Clients,
        Entry,
        Table,
        Tally,
        UdpFast,
    )
else:
    try:
        from sinkhole.dns._fast import (  # type: ignore[no-redef]
            COMPILED,
            MAX_ENTRIES,
            MAX_PACKET,
            Blocker,
            Clients,
            Entry,
            Table,
            Tally,
            UdpFast,
        )
    except ImportError:  # not built (no C compiler when it was installed): the twin, and the tests say so
        from sinkhole.dns._fastpure import (  # type: ignore[no-redef]
            COMPILED,
            MAX_ENTRIES,
            MAX_PACKET,
            Blocker,
            Clients,
            Entry,
            Table,
            Tally,
            UdpFast,
        )

__all__ = ["COMPILED", "MAX_ENTRIES", "MAX_PACKET", "Blocker", "Clients", "Entry", "Table", "Tally", "UdpFast"]
