"""sinkhole reload: the running server reads its settings again (systemctl reload sinkhole)."""

from __future__ import annotations

import sys

import click

from sinkhole.cli.common import Env, FiniteFloat, complain, pass_env
from sinkhole.service import control


@click.command()
@click.option("--timeout", type=FiniteFloat(min=0.1, max=3600), default=60.0, show_default=True,
              metavar="SECONDS", help="How long to wait for the server's answer.")
@pass_env
def reload(env: Env, timeout: float) -> None:
    """Make the running server read its settings again, and wait until they are in force.

    The server is the one serving --db (SINKHOLE_DB); it reads its settings file (--config)
    again after this request came in and applies what can change at run time, in every worker. Exit 0
    when they are in force, 2 when they are refused (the reason on stderr; the running settings
    stay), 1 when no server answers. sinkhole.service's ExecReload= (systemctl reload sinkhole).
    """
    outcome = control.request_reload(env.checked_path(), timeout)
    if not outcome.ok:
        complain(f"sinkhole: reload {outcome.describe()}")
        sys.exit(2)
    click.echo(f"reloaded: {outcome.describe()}")
