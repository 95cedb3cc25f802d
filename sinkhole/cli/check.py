"""sinkhole check NAME: what the policy in force does with a name, and why (nothing is sent)."""

from __future__ import annotations

import ipaddress
import json
import logging
from pathlib import Path

import click
import dns.rdatatype

from sinkhole.cli.common import Env, output_options, pass_env
from sinkhole.policy.names import normalize
from sinkhole.service import build, config
from sinkhole.service.explain import explain


@click.command()
@click.argument("name")
@click.option("--type", "qtype", default="A", show_default=True, help="Query type (A, AAAA, HTTPS, ...).")
@click.option("--client", default="127.0.0.1", show_default=True, help="As asked by this client address.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), envvar="SINKHOLE_CONFIG",
              help="The server's settings file (answers, client ACL, rate limits).")
@output_options(("table", "json"))
@pass_env
def check(env: Env, name: str, qtype: str, client: str, config_file: Path | None, fmt: str) -> None:
    """What the policy in force does with NAME, and why: decision, rule, category, list and its
    source, and the exact answer a client would get. Sends nothing; exit 0 either way.

    The answer follows the settings file (--config) and SINKHOLE_* variables, not the flags of a
    running `sinkhole serve` (e.g. --blockpage-listen): give those settings in the file."""
    domain = normalize(name)
    try:
        dns.rdatatype.from_text(qtype)
        ipaddress.ip_address(client)
    except (ValueError, dns.rdatatype.UnknownRdatatype):
        raise click.BadParameter(f"{qtype!r} or {client!r} is not a query type / an IP address") from None
    settings_file = config_file or config.default_file()
    cfg = build.load(settings_file)
    quiet = logging.getLogger("sinkhole")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the server's own warnings are not the answer here
    try:
        with env.existing_store() as store:
            result = explain(store, cfg, domain, qtype, client)
    finally:
        quiet.setLevel(level)  # a process that goes on (tests, a caller) keeps its logging
    if fmt == "json":
        click.echo(json.dumps(result))
        return
    for key in ("name", "qtype", "client", "group", "decision", "rule", "kind", "category", "list", "source",
                "policy_version", "blockpage"):
        if result[key] is not None:
            click.echo(f"{key:15} {result[key]}")
    click.echo("answer:")
    for line in str(result["answer"]).splitlines():
        click.echo(f"  {line}")
    click.echo(f"(settings from {settings_file or 'the defaults'} and SINKHOLE_* variables; the flags of a running "
               "`sinkhole serve`, such as --blockpage-listen, are not seen here)")
