"""The server log says each repeatable warning at most once per interval per kind, with "N more like this".

A kind is the logger and the format string of the call (`log.warning("SERVFAIL for %s %s: %s", ...)`: every
SERVFAIL is one kind, whatever the name), so a module needs to know nothing of this: a burst of 1,500
SERVFAILs, refusals or bad packets is one line at once and one line when the interval ends, naming how many
were held back and the last of them. Records below WARNING pass untouched.

`install` puts one `RepeatFilter` on the handlers of the root logger (the server's stderr handler, whatever
formatter it has); `flush` says what was held back for kinds whose interval is over (the server calls it from
its housekeeping, every second) or for all of them (`final=True`, at shutdown), so that no count is lost.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

DEFAULT_INTERVAL = 10.0


@dataclass
class _Kind:
    since: float  # when the line that opened this interval was let through
    held: int = 0  # records of this kind held back since then
    last: logging.LogRecord | None = None  # the last of them


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
        if record.levelno < self.level or self.interval <= 0 or hasattr(record, "repeats"):
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        summary = None
        with self._lock:
            kind = self._kinds.get(key)
            if kind is not None and now - kind.since < self.interval:
                kind.held += 1
                kind.last = record
                return False
            if kind is not None and kind.held:
                summary = _summary(kind, now)
            self._kinds[key] = _Kind(now)
        if summary is not None:  # what was held back comes before the line that opens the next interval
            self._say(summary)
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
    last = kind.last
    assert last is not None
    fields = dict(last.__dict__)
    fields.update(msg="%d more like this in the last %.0f s; the last: %s",
                  args=(kind.held, now - kind.since, last.getMessage()), exc_info=None, exc_text=None,
                  stack_info=None, repeats=kind.held, created=time.time())
    return logging.makeLogRecord(fields)


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


def flush(final: bool = False) -> None:
    """RepeatFilter.flush on every installed filter (none: nothing to do)."""
    for f in _installed:
        f.flush(final)
