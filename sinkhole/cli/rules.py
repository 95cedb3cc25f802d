"""sinkhole block|allow add|remove|list: the operator's own rules."""

from __future__ import annotations

import sys

import click

from sinkhole.cli.common import Env, category_name, emit, output_options, parse_expiry, pass_env
from sinkhole.errors import ConfigError
from sinkhole.model import RuleKind
from sinkhole.service import operations


def _rule_group(kind: RuleKind, verb: str) -> click.Group:
    group = click.Group(kind.value, help=f"Manage {kind.value} rules (a rule covers the name and every subdomain).")

    @group.command("add")
    @click.argument("names", nargs=-1, required=True)
    @click.option("--category", default=None, callback=category_name,
                  help="Category to file the rule under [manual: in force for every group].")
    @click.option("--group", "client_group", default=None, callback=category_name,
                  help="Only for the clients of this group (an extra rule of the group).")
    @click.option("--note", default=None, help="Why: a ticket number, a policy reference.")
    @click.option("--expires", default=None, metavar="DURATION|TIME",
                  help="In force until then (12h, 7d, 2w, or an ISO 8601 time); a running server removes it "
                       "at that time [never].")
    @pass_env
    def add(env: Env, names: tuple[str, ...], category: str | None, client_group: str | None,
            note: str | None, expires: str | None) -> None:
        operations.rule_category(category, client_group)
        operations.rule_targets(names, networks=kind is RuleKind.BLOCK)  # bad input: nothing opened or written
        until = parse_expiry(expires)
        if client_group not in (None, "default") and not env.checked_path().exists():
            # a new database has no group but default: never make one only to say so
            raise ConfigError(f"no group {client_group!r}: see `sinkhole group list`")
        with env.store() as store:
            category, added, present = operations.add_rules(store, kind, names, category, client_group, note, until)
        for d in added:
            click.echo(f"{verb}: {d} (category {category})" + (f" until {until}" if until else ""))
        for d in present:
            click.echo(f"already {verb}: {d} (category {category})")

    add.help = f"{kind.value.capitalize()} NAMES and all their subdomains."

    @group.command("remove")
    @click.argument("names", nargs=-1, required=True)
    @click.option("--category", default=None, callback=category_name, help="Remove only from this category [all].")
    @click.option("--group", "client_group", default=None, callback=category_name,
                  help="Remove only the group's extra rule.")
    @pass_env
    def remove(env: Env, names: tuple[str, ...], category: str | None, client_group: str | None) -> None:
        if client_group is not None:
            operations.rule_category(category, client_group)
        operations.rule_targets(names, networks=kind is RuleKind.BLOCK)  # bad input: nothing opened or written
        with env.existing_store() as store:
            removed, missing = operations.remove_rules(store, kind, names, category, client_group)
        for d in removed:
            click.echo(f"removed {kind.value} rule: {d}")
        if missing:
            click.echo(f"sinkhole: no {kind.value} rule for {', '.join(missing)}", err=True)
            sys.exit(1)

    remove.help = f"Remove {kind.value} rules for NAMES."

    @group.command("list")
    @click.option("--category", default=None, help="Only this category.")
    @click.option("--group", "client_group", default=None, callback=category_name,
                  help="Only this group's extra rules.")
    @output_options()
    @pass_env
    def list_(env: Env, category: str | None, client_group: str | None, fmt: str) -> None:
        if client_group is not None:
            category = operations.rule_category(category, client_group)
        with env.existing_store() as store:
            rows = store.list_rules(kind, category)
        emit(rows, ["domain", "category", "source", "added_at", "added_by", "expires_at", "note"], fmt)

    list_.help = f"List {kind.value} rules."
    return group


block = _rule_group(RuleKind.BLOCK, "blocked")
allow = _rule_group(RuleKind.ALLOW, "allowed")
