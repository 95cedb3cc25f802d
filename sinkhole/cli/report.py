"""sinkhole report: a self-contained HTML report for a security officer."""

from __future__ import annotations

from pathlib import Path

import click

from sinkhole.audit import report as report_mod
from sinkhole.cli.common import MAX_TOP, Env, parse_when, pass_env, server_key_option
from sinkhole.cli.progress import Progress, quiet_option
from sinkhole.files import guard_output, write_private
from sinkhole.store.audit import STATS_QUERIES


@click.command()
@click.option("--since", default="7d", show_default=True, help="Duration back from now or ISO 8601 time.")
@click.option("--until", help="End (exclusive) [now].")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="The HTML file to write (one file: inline CSS and SVG, no script, nothing fetched).")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The operator's copy of the audit key: verify the chains and put the result in the report.")
@click.option("--top", type=click.IntRange(min=1, max=MAX_TOP), default=10, show_default=True)
@click.option("--force", is_flag=True, help="Write over OUTPUT if it is there (never the database or its audit key).")
@server_key_option
@quiet_option
@pass_env
def report(env: Env, since: str, until: str | None, output: Path, key_file: Path | None, top: int, force: bool,
           key: Path | None, quiet: bool) -> None:
    """A self-contained HTML report for a security officer: blocked attempts over time, top clients,
    top services, bypass attempts, client groups, and whether the audit chains verify."""
    since_iso, until_iso = parse_when(since, "--since"), parse_when(until, "--until")
    if since_iso is None:  # '' or blanks: a report is of a period, which needs a start
        raise click.BadParameter("empty: give a duration like 7d or an ISO 8601 time", param_hint="--since")
    if key_file is not None and not key_file.is_file():
        raise click.BadParameter(f"{str(key_file)!r}: no such file", param_hint="--key-file")
    env.checked_path()
    guard_output(output, force, env.protected(key) + ([key_file] if key_file is not None else []), "--output")
    with env.existing_store() as store, Progress.for_command(quiet) as progress:
        stats_ = store.stats(since_iso, until_iso, top, progress.stage("counting", STATS_QUERIES, "queries"))
        status = report_mod.chain_status(store, key_file, env.key_path(key),
                                         progress.stage if progress.enabled else None)
    page = report_mod.render(stats_, since_iso, until_iso, status, str(env.db_path))
    write_private(output, page.encode("utf-8"))  # 0600: the report names clients
    t = stats_["totals"]
    click.echo(f"wrote {output}: {t['blocked']} blocked queries from {t['clients']} clients since {since_iso};"
               f" chain: {status.summary}")
