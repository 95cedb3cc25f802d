"""sinkhole changes: the change journal (who changed the policy, when, how, and what)."""

from __future__ import annotations

import click

from sinkhole.cli.common import Env, emit, output_options, parse_when, pass_env
from sinkhole.service import operations

CHANGES_TABLE_COLUMNS = ["time", "id", "user", "sudo_user", "host", "action", "category", "what", "command"]
CHANGES_COLUMNS = ["id", "time", "user", "sudo_user", "host", "command", "action", "kind", "category", "count",
                   "domains", "detail", "what", "sealed"]


@click.command()
@click.option("--since", help="Start: a duration back from now (15m, 2h, 7d) or an ISO 8601 time (UTC if no zone).")
@click.option("--until", help="End (exclusive), same forms as --since.")
@click.option("--user", help="Only changes by this OS user (or made through sudo by this user).")
@output_options(help="json is JSON Lines: one object a change.")
@pass_env
def changes(env: Env, since: str | None, until: str | None, user: str | None, fmt: str) -> None:
    """Who changed the policy, when, from where, with which command, and what changed (the change journal).

    The id is the policy version: audit rows carry the id of the change in force when they were written."""
    since_iso, until_iso = parse_when(since, "--since"), parse_when(until, "--until")
    with env.existing_store() as store:
        entries = store.journal(since_iso, until_iso, user)
    rows = [operations.change_row(e, domains_as_list=fmt == "json") for e in entries]
    emit(rows, CHANGES_TABLE_COLUMNS if fmt == "table" else CHANGES_COLUMNS, fmt)
