"""sinkhole export rpz: the policy in force as a Response Policy Zone file."""

from __future__ import annotations

import itertools
from pathlib import Path

import click

from sinkhole.cli.common import Env, category_name, complain, pass_env
from sinkhole.cli.progress import Progress, quiet_option
from sinkhole.fleet import zone as rpz
from sinkhole.service import build, systemd


@click.group("export")
def export_group() -> None:
    """Write the policy in another system's format."""


@export_group.command("rpz")
@click.option("--group", "client_group", default="default", show_default=True, callback=category_name,
              help="Export what is in force for the clients of this group.")
@click.option("--zone", default=None, metavar="NAME", help="Name of the policy zone [rpz_zone: rpz.sinkhole.].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), envvar="SINKHOLE_CONFIG",
              help="The server's settings file: the answers (mode, block_a, block_aaaa, block_ttl) become the actions.")
@quiet_option
@pass_env
def export_rpz(env: Env, client_group: str, zone: str | None, config_file: Path | None, quiet: bool) -> None:
    """The policy in force as a Response Policy Zone file (BIND, Unbound, Knot Resolver, PowerDNS).

    Each rule NAME becomes NAME and *.NAME (a rule covers every subdomain) with the action of the
    server's answers: local data (A 0.0.0.0, AAAA ::) or CNAME . (NXDOMAIN); an allow rule is
    CNAME rpz-passthru.; a blocked network an rpz-ip trigger. /regex/ rules have no RPZ form: they
    are left out, named in a comment and on stderr. The serial is the policy version.
    """
    cfg = build.load(config_file)
    origin = rpz.zone_name(zone if zone is not None else cfg.fleet.rpz_zone)
    with env.existing_store() as store:
        version, rules = store.rules_in_force(client_group)
    with Progress.for_command(quiet) as progress:
        result = rpz.build(rules, build.answers(cfg), origin, max(version, 1), client_group, cfg.fleet.rpz_refresh,
                           version,
                           progress.stage("building", len(rules), "rules"))
        del rules
        ordered = result.sorted_records(progress.stage("ordering", len(result.records), "records"))
        progress.done()
        for line in result.skipped:
            complain(f"sinkhole: warning: left out of the zone: {line}", systemd.WARNING)
        lines = result.lines(progress.stage("writing", len(result.records), "records"), ordered)
        while chunk := list(itertools.islice(lines, 10_000)):
            click.echo("\n".join(chunk))
