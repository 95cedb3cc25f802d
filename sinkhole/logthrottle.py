"""The server log says each repeatable warning at most once per interval per kind, with "N more like this".

A kind is the logger and the format string of the call (`log.warning("SERVFAIL for %s %s: %s", ...)`: every
SERVFAIL is one kind, whatever the name), so a module needs to know nothing of this: a burst of 1,500
SERVFAILs, refusals or bad packets is one line at once and one line when the interval ends, naming how many
were held back and the last of them. Records below WARNING pass untouched.

`install` puts one `RepeatFilter` on the handlers of the root logger (the server's stderr handler, whatever
formatter it has); `flush` says what was held back for kinds whose interval is over (the server calls it from
its housekeeping, every second) or for all of them (`final=True`, at shutdown), so that no count is lost.

A line an operator must see every time it happens (a refused reload: each one is an admin's action, with a
reason of its own) is logged with `extra=logthrottle.ALWAYS` and passes untouched.

A logging call that is held back still costs a LogRecord (8 us): on paths a flood drives (a refusal per
query), `warning(log, msg, *args)` asks the filter first and makes no record for a held-back line (0.5 us).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

DEFAULT_INTERVAL = 10.0
ALWAYS = {"unthrottled": True}  # `log.error(..., extra=ALWAYS)`: never held back


@dataclass
class _Kind:
    since: float  # when the line that opened this interval was let through
    held: int = 0  # records of this kind held back since then
    last: tuple[str, int, str, object] | None = None  # the last of them: (logger, level, msg, args)


class RepeatFilter(logging.Filter):
    """At most one record per `interval` seconds for each (logger, format string) at `level` and above."""

    def __init__(self, interval: float = DEFAULT_INTERVAL, level: int = logging.WARNING) -> None:
        super().__init__()
        self.interval = interval
        self.level = level
        self.handler: logging.Handler | None = None  # where summaries go: the handler this filter is on
        self._kinds: dict[tuple[str, str], _Kind] = {}
        self._lock = threading.Lock()  # the audit writer, the reloader and the event loop all log

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.levelno < self.level or self.interval <= 0 or hasattr(record, "repeats")
                or getattr(record, "unthrottled", False)):
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        summary = None
        with self._lock:
            kind = self._kinds.get(key)
            if kind is not None and now - kind.since < self.interval:
                kind.held += 1
                kind.last = (record.name, record.levelno, record.msg, record.args)
                return False
            if kind is not None and kind.held:
                summary = _summary(kind, now)
            self._kinds[key] = _Kind(now)
        if summary is not None:  # what was held back comes before the line that opens the next interval
            self._say(summary)
        return True

    def hold(self, name: str, level: int, msg: str, args: tuple) -> bool:
        """Count a line of this kind without a record, if it would be held back; False: log it."""
        if level < self.level or self.interval <= 0:
            return False
        with self._lock:
            kind = self._kinds.get((name, msg))
            if kind is None or time.monotonic() - kind.since >= self.interval:
                return False
            kind.held += 1
            kind.last = (name, level, msg, args)
            return True

    def flush(self, final: bool = False) -> None:
        """Say what was held back for every kind whose interval is over (all of them when `final`); forget
        kinds that have been quiet for an interval."""
        now = time.monotonic()
        summaries = []
        with self._lock:
            for key, kind in list(self._kinds.items()):
                over = now - kind.since >= self.interval
                if kind.held and (over or final):
                    summaries.append(_summary(kind, now))
                    self._kinds[key] = _Kind(now)  # a new interval: the next record of the kind is held back
                elif over:
                    del self._kinds[key]
        for summary in summaries:
            self._say(summary)

    def _say(self, record: logging.LogRecord) -> None:
        if self.handler is not None:
            self.handler.handle(record)


def _summary(kind: _Kind, now: float) -> logging.LogRecord:
    assert kind.last is not None
    name, level, msg, args = kind.last
    try:
        last = str(msg) % args if args else str(msg)
    except (TypeError, ValueError):
        last = str(msg)
    record = logging.LogRecord(name, level, "", 0, "%d more like this in the last %.0f s; the last: %s",
                               (kind.held, now - kind.since, last), None)
    record.repeats = kind.held
    return record


_installed: list[RepeatFilter] = []


def _after_fork() -> None:
    """A worker forked while another thread held a filter's lock must not wait for it forever."""
    for f in _installed:
        f._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def install(interval: float = DEFAULT_INTERVAL, logger: logging.Logger | None = None) -> list[RepeatFilter]:
    """A RepeatFilter on every handler of `logger` (the root logger) that has none yet; the interval of those
    that have one is set to `interval`. Returns the filters."""
    logger = logger or logging.getLogger()
    out = []
    for handler in logger.handlers:
        have = next((f for f in handler.filters if isinstance(f, RepeatFilter)), None)
        if have is None:
            have = RepeatFilter(interval)
            have.handler = handler
            handler.addFilter(have)
            _installed.append(have)
        have.interval = interval
        out.append(have)
    return out


def set_interval(interval: float) -> None:
    """A reloaded configuration: every installed filter uses `interval` from now on (0: every line)."""
    flush(final=True)
    for f in _installed:
        f.interval = interval


def warning(logger: logging.Logger, msg: str, *args: object) -> None:
    """logger.warning(msg, *args), but a line the filter would hold back is only counted (no record made)."""
    if not logger.isEnabledFor(logging.WARNING):
        return
    if len(_installed) == 1 and _installed[0].hold(logger.name, logging.WARNING, msg, args):
        return
    logger.warning(msg, *args)


def flush(final: bool = False) -> None:
    """RepeatFilter.flush on every installed filter (none: nothing to do)."""
    for f in _installed:
        f.flush(final)
