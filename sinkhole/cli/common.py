"""What every noun of the CLI shares: the database option's Env, errors turned into one line and an exit code, the
output options and the rows printed in them, and the checks of times, categories and file names."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from sinkhole.audit.chain import default_key_path
from sinkhole.errors import ConfigError, DomainError, ListFormatError, SinkholeError
from sinkhole.files import check_db_path
from sinkhole.service import operations, systemd
from sinkhole.store.db import Store, open_store
from sinkhole.store.schema import DatabaseError, default_db_path

USAGE_ERRORS = (ConfigError, DomainError, ListFormatError)
FORMATS = ("table", "json", "csv")  # the output formats of a command that prints rows
# every number an option takes is bounded: one line and exit 2 beyond, never a traceback from SQLite or datetime
MAX_ROWS = 1_000_000_000  # log --limit
MAX_TOP = 100_000  # stats/report --top
MAX_ID = 2**63 - 1  # a row id: SQLite's largest integer

F = TypeVar("F", bound=Callable[..., Any])


class FiniteFloat(click.FloatRange):
    """click.FloatRange that refuses NaN (which compares as inside every range) and infinities."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def complain(text: str, priority: int = systemd.ERR) -> None:
    """One line on stderr; under systemd (a timer's `lists update`, ExecReload's `reload`) with its priority
    for the journal, so that `journalctl -p err` shows it."""
    click.echo(systemd.journal_prefix(priority) + text, err=True)


class SinkholeGroup(click.Group):
    """Turns errors into one line on stderr and the contract's exit codes (2 bad input, 1 failure)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USAGE_ERRORS as exc:
            complain(f"sinkhole: {exc}")
            ctx.exit(2)
        except BrokenPipeError:  # `sinkhole block list | head`: the reader is gone, nothing to say
            sys.stdout = open(os.devnull, "w")  # python flushes stdout at exit: let that go nowhere
            ctx.exit(0)
        except (SinkholeError, DatabaseError, OSError) as exc:
            complain(f"sinkhole: {exc}")
            ctx.exit(1)


class Env:
    def __init__(self, db: Path | None) -> None:
        self.db_path = db or default_db_path()

    def checked_path(self) -> Path:
        """The database path, if it can be one (a regular file, or none yet): ConfigError before anything is
        made for /dev/null, a directory or an SQLite URI."""
        return check_db_path(self.db_path)

    def store(self) -> Store:
        """The database, made (0600, with the shipped lists) if there is none: for commands that change it."""
        return open_store(self.checked_path())

    def existing_store(self) -> Store:
        """For commands that only read, or remove: a missing file is a mistyped path, never a new database."""
        if not self.checked_path().exists():
            raise SinkholeError(f"no database at {self.db_path} (check --db / SINKHOLE_DB; `sinkhole serve` or a "
                                "change such as `block add` makes one)")
        return self.store()

    def key_path(self, key: Path | None) -> Path:
        """The audit key the server writes with: --key, else the one beside the database."""
        return key or default_key_path(self.db_path)

    def protected(self, key: Path | None) -> list[Path]:
        """What an output option may never write over: the database (and its WAL, SHM) and its audit key."""
        server_key = self.key_path(key)
        return [self.db_path, server_key, Path(f"{server_key}.lock")]


pass_env = click.make_pass_decorator(Env)


# ---------------------------------------------------------------------------- output


def output_options(choices: Sequence[str] = FORMATS, help: str | None = None) -> Callable[[F], F]:
    """The one --format option of a command's output (passed as `fmt`): the first choice is the default."""
    return click.option("--format", "fmt", type=click.Choice(list(choices)), default=choices[0], show_default=True,
                        help=help)


def emit(rows: list[dict], columns: list[str], fmt: str) -> None:
    """Rows in an output format: an aligned table, JSON Lines (one object a row) or CSV with a header."""
    if fmt == "json":
        for row in rows:
            click.echo(operations.json_line(row))
    elif fmt == "csv":
        click.echo(operations.csv_text(rows, columns), nl=False)
    else:
        cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
        click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=False)).rstrip())
        for row in cells:
            click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)).rstrip())


# ---------------------------------------------------------------------------- checks of option values


def parse_when(text: str | None, option: str) -> str | None:
    """'15m', '2h', '7d', '1w', '2026-11-01' or an ISO 8601 time -> ISO UTC text as stored in the log."""
    try:
        return operations.parse_when(text, option)
    except operations.BadValue as exc:
        raise click.BadParameter(exc.message, param_hint=option) from None


def parse_expiry(text: str | None, option: str = "--expires") -> str | None:
    """'7d', '12h', '2w' from now, or an ISO 8601 time -> ISO UTC text; it must lie in the future."""
    try:
        return operations.parse_expiry(text, option)
    except operations.BadValue as exc:
        raise click.BadParameter(exc.message, param_hint=option) from None


def category_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A category or group name option (callback): checked as a rule's category is."""
    try:
        return operations.check_category(value)
    except operations.BadValue as exc:
        raise click.BadParameter(exc.message) from None


def file_name(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None and not value.name:
        raise click.BadParameter(f"{str(value)!r} names no file")
    return value


server_key_option = click.option(
    "--key", "key", type=click.Path(dir_okay=False, path_type=Path), default=None, callback=file_name,
    help="The audit key the server writes with [env SINKHOLE_AUDIT_KEY; default DB.key].")
