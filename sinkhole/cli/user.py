"""sinkhole user add|passwd|remove|unlock|list: accounts of the web console."""

from __future__ import annotations

import sys

import click

from sinkhole.cli.common import Env, emit, output_options, pass_env
from sinkhole.errors import ConfigError
from sinkhole.store.accounts import Accounts, check_name
from sinkhole.store.db import Store
from sinkhole.store.journal import Actor
from sinkhole.web import sessions


@click.group("user")
def user_group() -> None:
    """Accounts of the web console: viewer (dashboard), auditor (+ log, exports, verification, reports),
    admin (+ policy and accounts)."""


def _new_password(stdin: bool, name: str) -> str:
    if stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True, err=True)
    try:
        return sessions.hash_password(password)
    except sessions.PasswordError as exc:
        raise ConfigError(str(exc)) from None


_PASSWORD_STDIN = click.option("--password-stdin", is_flag=True,
                               help="Read the password from the first line of standard input (for scripts) "
                                    "[prompt twice, not echoed].")


def _accounts(store: Store):
    return Accounts(store)


@user_group.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "auditor", "admin"]), required=True,
              help="viewer: the dashboard; auditor: also the log, exports, verification and reports; admin: also "
                   "policy changes and accounts.")
@_PASSWORD_STDIN
@pass_env
def user_add(env: Env, name: str, role: str, password_stdin: bool) -> None:
    """Make account NAME with a password (asked twice, at least 10 characters)."""
    name = check_name(name)
    hashed = _new_password(password_stdin, name)
    with env.store() as store:
        _accounts(store).add_user(name, role, hashed, Actor())
    click.echo(f"added account {name} ({role})")


@user_group.command("passwd")
@click.argument("name")
@_PASSWORD_STDIN
@pass_env
def user_passwd(env: Env, name: str, password_stdin: bool) -> None:
    """Set a new password for NAME: it is unlocked and signed out everywhere."""
    name = check_name(name)
    with env.existing_store() as store:
        accounts = _accounts(store)
        if accounts.user(name) is None:
            raise ConfigError(f"no account {name!r} (sinkhole user list)")
        ended = accounts.set_password(name, _new_password(password_stdin, name), Actor())
    click.echo(f"new password for {name}" + (f"; {ended} sessions ended" if ended else ""))


@user_group.command("remove")
@click.argument("name")
@pass_env
def user_remove(env: Env, name: str) -> None:
    """Remove account NAME and end its sessions."""
    name = check_name(name)
    with env.existing_store() as store:
        ended = _accounts(store).remove_user(name, Actor())
    click.echo(f"removed account {name}" + (f"; {ended} sessions ended" if ended else ""))


@user_group.command("unlock")
@click.argument("name")
@pass_env
def user_unlock(env: Env, name: str) -> None:
    """Clear NAME's failed logins (an account locks for 15 minutes after 5 in a row)."""
    name = check_name(name)
    with env.existing_store() as store:
        was = _accounts(store).unlock(name, Actor())
    click.echo(f"unlocked {name}" if was else f"{name} was not locked")


@user_group.command("list")
@output_options()
@pass_env
def user_list(env: Env, fmt: str) -> None:
    """Every account: role, last login and from where, failed logins in a row, locked until, open sessions."""
    with env.existing_store() as store:
        rows = _accounts(store).users()
    emit(rows, ["name", "role", "last_login", "last_address", "failures", "locked_until", "sessions",
                "created_at", "created_by"], fmt)
