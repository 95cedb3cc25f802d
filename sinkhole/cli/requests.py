"""sinkhole requests list|approve|deny: access requests filed on the block page."""

from __future__ import annotations

import click

from sinkhole.cli.common import MAX_ID, Env, category_name, emit, output_options, parse_expiry, pass_env
from sinkhole.service import operations


@click.group("requests")
def requests_group() -> None:
    """Access requests people filed on the block page: list, approve (an allow rule with an expiry), deny."""


REQUEST_COLUMNS = ["id", "time", "status", "client", "grp", "host", "rule", "name", "reason", "ref", "decided_by",
                   "allow_rule", "expires_at"]


@requests_group.command("list")
@click.option("--status", type=click.Choice(["pending", "approved", "denied", "all"]), default="pending",
              show_default=True)
@output_options()
@pass_env
def requests_list(env: Env, status: str, fmt: str) -> None:
    """Access requests, oldest first: who asked (address, group, the name they gave), for which host, why."""
    with env.existing_store() as store:
        rows = store.requests(None if status == "all" else status)
    emit(rows, REQUEST_COLUMNS, fmt)


@requests_group.command("approve")
@click.argument("ident", metavar="ID", type=click.IntRange(min=1, max=MAX_ID))
@click.option("--expires", default="7d", show_default=True, metavar="DURATION|TIME",
              help="The allow rule is in force until then.")
@click.option("--group", "client_group", default=None, callback=category_name,
              help="Allow it for this client group [the group the client was in when it asked].")
@click.option("--name", "domain", default=None, metavar="NAME",
              help="Allow this name (and its subdomains) [the host that was asked].")
@pass_env
def requests_approve(env: Env, ident: int, expires: str, client_group: str | None, domain: str | None) -> None:
    """Approve request ID: an allow rule for the host, for the client's group, until --expires (journaled)."""
    until = parse_expiry(expires)
    with env.existing_store() as store:
        done, group, name = operations.approve_request(store, ident, until, client_group, domain)
    click.echo(f"approved request {ident}: allowed {name} for group {group} until {until} ({done['allow_rule']})")
    if group == "default":
        click.echo("note: the default group holds every client of no other group: all of them get this exception",
                   err=True)


@requests_group.command("deny")
@click.argument("ident", metavar="ID", type=click.IntRange(min=1, max=MAX_ID))
@pass_env
def requests_deny(env: Env, ident: int) -> None:
    """Deny request ID (it stays listed with --status denied)."""
    with env.existing_store() as store:
        store.decide_request(ident, False)
    click.echo(f"denied request {ident}")
