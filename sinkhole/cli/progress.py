"""Progress of the CLI's long commands (lists import/update, log verify/prune, export rpz) on a terminal.

A command takes a `Progress` and opens a stage per step it can count (`stage(label, total, unit)`),
handing the returned callback to the library function that does the work, which calls it with the
number of items done since its last call. On a terminal (stderr) the stage is click's progress bar:
done/total, percent, rate and time left. When stderr is not a terminal (piped, a file, the journal of a
timer) or with --quiet, there is no bar and nothing else is written: the callback is None.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import click

Advance = Callable[[int], None]


def on_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Stages of one command; `enabled` False (not a terminal, or --quiet) makes every stage silent."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._bar: Any = None
        self._started = 0.0
        self._unit = ""

    @classmethod
    def for_command(cls, quiet: bool) -> Progress:
        return cls(not quiet and on_terminal())

    def stage(self, label: str, total: int, unit: str) -> Advance | None:
        """Start counting `total` `unit` (ending the stage before); the callback to report progress, or None."""
        self.done()
        if not self.enabled or total <= 0:
            return None
        self._started = time.monotonic()
        self._unit = unit
        # click's own ETA appears after a second at the earliest: ours comes with the first step
        self._bar = click.progressbar(length=total, label=label, file=self.stream, show_pos=True, show_eta=False,
                                      show_percent=True, width=24, item_show_func=self._rate)
        self._bar.__enter__()
        return self._bar.update

    def _rate(self, _item: object) -> str | None:
        """'37,512 lines/s, 00:00:12 left' (the rate so far, and the time the rest takes at that rate)."""
        bar = self._bar
        elapsed = time.monotonic() - self._started
        if bar is None or elapsed <= 0 or not bar.pos:
            return None
        rate = bar.pos / elapsed
        text = f"{rate:,.0f} {self._unit}/s"
        if bar.pos < bar.length:
            left = int((bar.length - bar.pos) / rate)
            text += f", {left // 3600:02d}:{left // 60 % 60:02d}:{left % 60:02d} left"
        return text

    def done(self, finished: bool = True) -> None:
        """End the stage in hand; its bar stays on the terminal (full, unless the work stopped half-way)."""
        bar = self._bar
        if bar is not None:
            if finished:
                bar.pos = bar.length  # a count that came out smaller than its estimate still ends at 100 %
                bar.render_progress()
            bar.__exit__(None, None, None)
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.done(finished=exc_type is None)


quiet_option = click.option("-q", "--quiet", is_flag=True,
                            help="No progress bar (one shows on stderr only when it is a terminal).")
