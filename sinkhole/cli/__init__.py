"""The `sinkhole` command: thin click commands over the library, one module per noun.

A command's module is imported only when that command runs (click's "lazily loading subcommands"): `sinkhole
block add` does not load the server, dnspython's resolver or the web console. `sinkhole --help` lists the
commands from COMMANDS without importing any (tests/cli/test_commands.py checks that each summary there is the one its
command's own help starts with). A new command: a library function first, then `cli/<noun>.py` with
`@output_options(...)` where it prints rows, one entry in COMMANDS, and a CliRunner test in tests/cli/.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from sinkhole import __version__
from sinkhole.cli.common import Env, SinkholeGroup, complain

# command name -> (module:attribute, the first paragraph of its help: what `sinkhole --help` shows)
COMMANDS: dict[str, tuple[str, str]] = {
    "allow": ("rules:allow", "Manage allow rules (a rule covers the name and every subdomain)."),
    "block": ("rules:block", "Manage block rules (a rule covers the name and every subdomain)."),
    "ca": ("ca:ca_group", "The block page's certificate authority: PCs that trust it see the page over HTTPS for "
                    "blocked names."),
    "changes": ("changes:changes", "Who changed the policy, when, from where, with which command, and what changed "
                                   "(the change journal)."),
    "check": ("check:check", "What the policy in force does with NAME, and why: decision, rule, category, list "
                             "and its source, and the exact answer a client would get. Sends nothing; exit 0 "
                             "either way."),
    "config": ("config:config_group", "Check the settings file, and show the settings a server would run with."),
    "export": ("export:export_group", "Write the policy in another system's format."),
    "group": ("group:group_group", "Client groups: networks with their own categories and extra rules (most specific "
                             "network wins)."),
    "lists": ("lists:lists_group", "Block lists and categories: show, enable, disable, import, update."),
    "log": ("log:log_", "Show the audit log, oldest first; `log verify` checks its chains, `log anchor` prints their "
                       "heads."),
    "reload": ("reload:reload", "Make the running server read its settings again, and wait until they are in force."),
    "report": ("report:report", "A self-contained HTML report for a security officer: blocked attempts over time, "
                                "top clients, top services, bypass attempts, client groups, and whether the audit "
                                "chains verify."),
    "requests": ("requests:requests_group", "Access requests people filed on the block page: list, approve (an allow "
                                      "rule with an expiry), deny."),
    "serve": ("serve:serve", "Serve DNS: sinkhole listed names, forward the rest, audit every block."),
    "stats": ("stats:stats", "Totals, top blocked rules and names, top clients, bypass attempts, groups, "
                             "categories, blocked per hour."),
    "user": ("user:user_group", "Accounts of the web console: viewer (dashboard), auditor (+ log, exports, "
                                "verification, reports), admin (+ policy and accounts)."),
}


class LazyGroup(SinkholeGroup):
    """The top-level group: a command's module is imported when the command is looked up to run (or to show its
    own help); the list of commands in --help comes from COMMANDS."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[cmd_name][0].partition(":")
        command = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        assert isinstance(command, click.Command) and command.name == cmd_name
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """As click's, with each command's summary taken from COMMANDS rather than from its imported module."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = [(name, click.Command(name, help=COMMANDS[name][1]).get_short_help_str(limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), envvar="SINKHOLE_DB",
              help="SQLite database shared by the server and the CLI [env SINKHOLE_DB; "
                   "default: ~/.local/state/sinkhole/sinkhole.db].")
@click.version_option(__version__, prog_name="sinkhole")
@click.pass_context
def cli(ctx: click.Context, db: Path | None) -> None:
    """DNS sinkhole for generative-AI services, with an audit log of every blocked query."""
    ctx.obj = Env(db)


def main() -> None:
    """Entry point: click's usage errors, too, become one line on stderr."""
    try:
        code = cli.main(prog_name="sinkhole", standalone_mode=False)
    except click.exceptions.Abort:
        complain("sinkhole: aborted")
        sys.exit(1)
    except click.ClickException as exc:
        where = exc.ctx.command_path if isinstance(exc, click.UsageError) and exc.ctx else "sinkhole"
        complain(f"{where}: {exc.format_message()} (see --help)")
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
