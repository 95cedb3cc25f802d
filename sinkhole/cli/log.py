"""sinkhole log (query, --follow, several nodes' databases as one), log verify|anchor|prune: the audit log."""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import click

from sinkhole.audit import chain
from sinkhole.audit.chain import default_key_path
from sinkhole.cli.common import (
    MAX_ROWS,
    Env,
    FiniteFloat,
    emit,
    output_options,
    parse_when,
    pass_env,
    server_key_option,
)
from sinkhole.cli.progress import Progress, quiet_option
from sinkhole.errors import ConfigError, SinkholeError
from sinkhole.files import guard_output
from sinkhole.model import Action
from sinkhole.service import operations
from sinkhole.store.audit import MAX_RETENTION_DAYS
from sinkhole.store.db import Store
from sinkhole.store.journal import Actor
from sinkhole.store.schema import iso_dt
from sinkhole.web.refs import parse_ref

LOG_TABLE_COLUMNS, LOG_COLUMNS = operations.LOG_TABLE_COLUMNS, operations.LOG_COLUMNS


@click.group("log", invoke_without_command=True)
@click.option("--since", help="Start: a duration back from now (15m, 2h, 7d) or an ISO 8601 time (UTC if no zone).")
@click.option("--until", help="End (exclusive), same forms as --since.")
@click.option("--client", help="Client IP address or CIDR network.")
@click.option("--domain", help="A name and all its subdomains.")
@click.option("--action", type=click.Choice([a.value for a in Action]), help="Only rows with this action.")
@click.option("--group", "group", metavar="NAME", help="Only rows decided by this client group's policy.")
@click.option("--category", metavar="NAME", help="Only rows whose rule is in this category (e.g. doh-bypass).")
@click.option("--rule", metavar="TEXT", help="Only rows decided by this rule, exactly as stored (e.g. deepseek.com).")
@click.option("--limit", type=click.IntRange(min=1, max=MAX_ROWS), default=None,
              help="At most this many rows (the latest).")
@click.option("--ref", metavar="CODE", help="The block page view with this reference code, and the DNS row it follows.")
@click.option("--follow", "-f", is_flag=True,
              help="Then keep printing matching rows as they are written, until Ctrl-C or SIGTERM "
                   "(starts with the last 10 unless --since or --limit says otherwise).")
@click.option("--interval", type=FiniteFloat(min=0.05, max=60), default=0.25, show_default=True,
              hidden=True, help="Seconds between two looks at the log with --follow.")
@output_options(help="json is JSON Lines: one object a row.")
@click.option("--db", "dbs", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Query these databases (several nodes') as one log, ordered by time; repeatable.")
@click.pass_context
def log_(ctx: click.Context, since: str | None, until: str | None, client: str | None, domain: str | None,
         action: str | None, group: str | None, category: str | None, rule: str | None, limit: int | None,
         ref: str | None, follow: bool, interval: float, fmt: str, dbs: tuple[Path, ...]) -> None:
    """Show the audit log, oldest first; `log verify` checks its chains, `log anchor` prints their heads."""
    if ctx.invoked_subcommand is not None:
        return
    env = ctx.find_object(Env)
    assert env is not None
    if follow and until:
        raise click.BadParameter("--follow prints rows as they come: it takes no end", param_hint="--until")
    try:
        checked = operations.LogFilter.parse(since, until, client, domain, action, group, category, rule)
    except operations.BadValue as exc:
        raise click.BadParameter(exc.message, param_hint=f"--{exc.field}") from None
    filters = checked.kwargs()
    if dbs:
        if follow:
            raise ConfigError("--follow reads one database: run one `log --follow` per node, or ship to syslog")
        merged: list[dict] = []
        for path in dict.fromkeys(dbs):
            one = Env(path).existing_store()
            try:
                merged.extend(one.query_log(limit=limit, **filters))
            finally:
                one.close()
        # one log: by time, then node (each row names the node that wrote it), then each node's own order
        merged.sort(key=lambda r: (r["time"], r["node"] or "", r["seq"]))
        if limit:
            merged = merged[-limit:]
        emit(merged, [*LOG_TABLE_COLUMNS, "node"] if fmt == "table" else LOG_COLUMNS, fmt)
        return
    with env.existing_store() as store:
        if ref is not None:
            rows = _page_view(store, ref)
        elif follow:
            _follow(env, store, filters, limit if limit or since else 10, fmt, interval)
            return
        else:
            rows = list(store.query_log(limit=limit, **filters))
    emit(rows, LOG_TABLE_COLUMNS if fmt == "table" else LOG_COLUMNS, fmt)


def _page_view(store: Store, ref: str) -> list[dict]:
    """The audit row of the block page view with reference `ref` (its second is in the code), and the DNS row
    it names; exit 1 when there is none."""
    try:
        code, second = parse_ref(ref)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ref") from None
    rows = [r for r in store.query_log(since=iso_dt(datetime.fromtimestamp(second, UTC)),
                                       until=iso_dt(datetime.fromtimestamp(second + 1, UTC)), action="page")
            if (r["answer"] or "").split(";")[0] == f"ref {code}"]
    if not rows:
        raise SinkholeError(f"no block page view with reference {code} (written at "
                            f"{iso_dt(datetime.fromtimestamp(second, UTC))[:19]}Z, if it was)")
    m = re.search(r"; dns seq (\d+)", rows[0]["answer"] or "")
    if m:
        rows[:0] = [r for r in [store.audit_row(int(m.group(1)))] if r is not None]
    return rows


FOLLOW_BATCH = 5000


class _Stop(Exception):
    """SIGTERM or SIGINT during `log --follow`: stop, exit 0."""


def _follow(env: Env, store: Store, filters: dict, limit: int | None, fmt: str, interval: float) -> None:
    """`log --follow`: the latest rows, then every new matching row by seq, until Ctrl-C or SIGTERM (exit 0).

    Polls `seq > last seen` (commit order is seq order: see Store.log_after), so rows from several
    workers and processes come each once; a database file replaced under us (deleted and made again by the
    server) is followed from its first row."""

    def stop(signum: int, frame: object) -> None:
        raise _Stop

    # SIGINT too, by a handler of our own: Python raises KeyboardInterrupt only when it found SIGINT at its default,
    # and a shell starts background jobs with SIGINT ignored (the server likewise sets both)
    previous = signal.signal(signal.SIGTERM, stop), signal.signal(signal.SIGINT, stop)
    columns = LOG_TABLE_COLUMNS if fmt == "table" else LOG_COLUMNS
    out = _Stream(columns, fmt)
    try:
        last = store.last_seq()
        out.write(list(store.query_log(limit=limit, through_seq=last, **filters)))
        while True:
            time.sleep(interval)
            if store.replaced():
                store.close()
                store, last = env.existing_store(), 0
            # every row up to `top` is committed (commit order is seq order): read the matching ones among
            # them, then move past all of them, matching or not
            top = store.last_seq()
            while last < top:
                rows = store.log_after(last, top, batch=FOLLOW_BATCH, **filters)
                out.write(rows)
                last = rows[-1]["seq"] if len(rows) == FOLLOW_BATCH else top
    except (KeyboardInterrupt, _Stop):
        return
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
        store.close()


class _Stream:
    """Rows printed as they come: CSV with one header, a table with fixed widths, JSON Lines as usual."""

    WIDTHS: ClassVar[dict[str, int]] = {"time": 27, "client": 15, "transport": 9, "qname": 30, "qtype": 5,
                                        "action": 13, "count": 5, "rule": 20}

    def __init__(self, columns: list[str], fmt: str) -> None:
        self.columns, self.fmt, self.started = columns, fmt, False

    def write(self, rows: list[dict]) -> None:
        if self.fmt == "json":
            emit(rows, self.columns, "json")
            return
        if self.fmt == "csv":
            click.echo(operations.csv_text(rows, self.columns, header=not self.started), nl=False)
        else:
            widths = [max(len(c), self.WIDTHS.get(c, 0)) for c in self.columns]
            lines = [] if self.started else ["  ".join(c.ljust(w) for c, w in zip(self.columns, widths,
                                                                                    strict=True)).rstrip()]
            for r in rows:
                lines.append("  ".join(("" if r.get(c) is None else str(r.get(c))).ljust(w)
                                       for c, w in zip(self.columns, widths, strict=True)).rstrip())
            if lines:
                click.echo("\n".join(lines))
        self.started = True


@log_.command("verify")
@click.option("--key-file", "key_files", required=True, multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The operator's copy of the audit key (from `log anchor --export-key`), kept off this host; "
                   "with several --db, one for all or one per --db in the same order.")
@click.option("--anchor", "anchor_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Heads saved earlier by `sinkhole log anchor`: a tail cut off since then is reported "
                   "(with several --db: one per --db, in the same order).")
@click.option("--db", "dbs", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Verify these databases (several nodes'), each with the key file next to it; repeatable.")
@server_key_option
@quiet_option
@pass_env
def log_verify(env: Env, key_files: tuple[Path, ...], anchor_files: tuple[Path, ...], dbs: tuple[Path, ...],
               key: Path | None, quiet: bool) -> None:
    """Walk every chain of the audit log and check every row's MAC; exit 1 naming the first bad row of each."""
    paths = list(dbs) or [env.db_path]
    if len(key_files) not in (1, len(paths)):
        raise ConfigError(f"{len(key_files)} --key-file for {len(paths)} databases: give one for all, or one per --db")
    if anchor_files and len(anchor_files) != len(paths):
        raise ConfigError(f"{len(anchor_files)} --anchor for {len(paths)} databases: give one per --db")
    if key is not None and len(paths) > 1:
        raise ConfigError("--key names one database's server key: with several --db each uses the key file next to it")
    failed = 0
    for i, path in enumerate(paths):
        if len(paths) > 1:
            click.echo(f"== {path}")
        server_key = key or (default_key_path(path) if dbs else env.key_path(None))
        ok = _verify_one(Env(path), key_files[i if len(key_files) > 1 else 0],
                         anchor_files[i] if anchor_files else None, server_key, Progress.for_command(quiet))
        failed += not ok
    if failed:
        if len(paths) > 1:
            click.echo(f"verification failed for {failed} of {len(paths)} databases")
        sys.exit(1)


def _verify_one(env: Env, key_file: Path, anchor_file: Path | None, server_key: Path, progress: Progress) -> bool:
    generation, secret = chain.read_key(key_file)
    anchor = chain.read_anchor(anchor_file) if anchor_file is not None else None
    try:
        current: tuple[int, bytes] | None = chain.read_key(server_key)
    except chain.AuditKeyError as exc:
        current = None
        click.echo(f"note: {exc}; a chain deleted whole since the last chain start is only found with --anchor")
    with env.existing_store() as store, progress:
        result = operations.verify(store, generation, secret, anchor, current, progress=progress)
    for kind, text in result.lines:
        click.echo(text if kind == "info" else f"{kind}: {text}")
    click.echo(result.summary)
    return result.ok


@log_.command("anchor")
@output_options(("json", "table"), help="json is JSON Lines: one chain head a line, the form `verify --anchor` reads.")
@click.option("--export-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Instead: copy the current audit key (made if there is none) to this new file, for verify.")
@click.option("--force", is_flag=True, help="With --export-key: write over a file that is there (never the "
                                            "database or its audit key).")
@server_key_option
@pass_env
def log_anchor(env: Env, fmt: str, export_key: Path | None, force: bool, key: Path | None) -> None:
    """Print the head of every chain (chain, link, seq, mac, time), to keep somewhere an intruder cannot edit."""
    if export_key is not None:
        env.checked_path()
        guard_output(export_key, force, env.protected(key), "--export-key", new_dirs=True)
        server_key = env.key_path(key)
        if export_key.exists() and not (server_key.exists()
                                        and chain.is_key_of(export_key, *chain.read_key(server_key))):
            raise ConfigError(f"--export-key {export_key}: not an export of this database's audit key, never "
                              "written over (it may be another database's)")
        generation, secret, _ = chain.ensure_key(server_key)
        chain.write_key(export_key, generation, secret)
        click.echo(f"exported audit key generation {generation} (fingerprint {chain.fingerprint(secret)}) to "
                   f"{export_key}: keep it off this host; it verifies every chain started from now on")
        return
    with env.existing_store() as store:
        heads = store.chain_heads()
    if fmt == "json":
        for head in heads:
            click.echo(json.dumps(head))
    else:
        emit(heads, ["chain", "link", "seq", "mac", "time"], "table")


@log_.command("prune")
@click.option("--retention-days", type=click.IntRange(min=1, max=MAX_RETENTION_DAYS), default=None,
              help="Delete rows older than this many days [365, the server's default].")
@click.option("--before", "before_text", default=None,
              help="Instead: delete rows older than this (a duration back from now, or an ISO 8601 time).")
@click.option("--node", default=None, help="Node name on the checkpoint chain [host name].")
@server_key_option
@quiet_option
@pass_env
def log_prune(env: Env, retention_days: int | None, before_text: str | None, node: str | None,
              key: Path | None, quiet: bool) -> None:
    """Delete old audit rows now, leaving checkpoints so that `log verify` still passes; journaled.

    Needs the audit key (a checkpoint is a chain of its own): without it nothing is deleted."""
    if retention_days is not None and before_text is not None:
        raise click.UsageError("give --retention-days or --before, not both")
    if before_text is not None:
        before = parse_when(before_text, "--before")
        if before is None:  # '' reads as no time at all: not one to prune before
            raise click.BadParameter("give a duration like 30d or an ISO 8601 time", param_hint="--before")
    else:
        before = iso_dt(datetime.now(UTC) - timedelta(days=retention_days or 365))
    with env.existing_store() as store, Progress.for_command(quiet) as progress:
        if key is not None:
            store.key_path = key
        res = store.prune_audit(before, node or socket.gethostname(), actor=Actor(),
                                planned=lambda rows: progress.stage("pruning", rows, "rows"))
    if not res.rows:
        click.echo(f"nothing to prune: no audit rows older than {before}")
    else:
        click.echo(f"pruned {res.rows} audit rows older than {before} ({res.first_time} .. {res.last_time}) from "
                   f"{res.chains} chains" + (f" and {res.unchained} rows without a chain" if res.unchained else ""))
        click.echo(f"checkpoint chain {res.checkpoint_chain}; journal entry {res.journal_id}; {res.batches} batches, "
                   f"write lock held at most {res.max_lock_ms:.0f} ms, {res.seconds:.1f} s in all")
    for name in res.skipped:
        click.echo(f"sinkhole: chain {name} not pruned: rows are missing at its start with no checkpoint "
                   "(see sinkhole log verify)", err=True)
    if res.skipped:
        sys.exit(1)
