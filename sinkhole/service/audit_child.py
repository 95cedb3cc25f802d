"""The audit writer process when it is started from the interpreter's file, not forked (audit_process.start: its
worker had other threads): `python -c audit_process._BOOT EVENTS_FD REPORTS_FD` ignores SIGTERM and SIGINT, then
runs `main`."""

from __future__ import annotations

import logging
import sys

from sinkhole.service import build, systemd
from sinkhole.service.audit_process import serve


def main() -> None:
    """argv: the two pipes' descriptors (events in, reports out)."""
    logging.basicConfig(level=logging.INFO, handlers=[systemd.log_handler(sys.stderr)])
    serve(int(sys.argv[1]), int(sys.argv[2]), build.audit_log)
