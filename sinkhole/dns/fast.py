"""The per-packet fast path: compiled (`sinkhole.dns._fast`, Cython) when it was built, else its pure-Python twin
(`sinkhole.dns._fastpure`), same names and behaviour. SINKHOLE_PURE=1 in the environment forces the twin (CI runs
the tests both ways); `COMPILED` says which one is in use."""

from __future__ import annotations

import os

if os.environ.get("SINKHOLE_PURE", "") not in ("", "0"):
    from sinkhole.dns import _fastpure as _impl
else:
    try:
        from sinkhole.dns import _fast as _impl  # type: ignore[no-redef]
    except ImportError:  # not built (no C compiler when it was installed): the twin, and the tests say so
        from sinkhole.dns import _fastpure as _impl  # type: ignore[no-redef]

COMPILED = _impl.COMPILED
MAX_ENTRIES = _impl.MAX_ENTRIES
MAX_PACKET = _impl.MAX_PACKET
Blocker = _impl.Blocker
Clients = _impl.Clients
Entry = _impl.Entry
Table = _impl.Table
Tally = _impl.Tally
UdpFast = _impl.UdpFast

__all__ = ["COMPILED", "MAX_ENTRIES", "MAX_PACKET", "Blocker", "Clients", "Entry", "Table", "Tally", "UdpFast"]
