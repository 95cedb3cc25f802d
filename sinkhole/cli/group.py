"""sinkhole group add|remove|list|show: client groups, their networks, categories and extra rules."""

from __future__ import annotations

import json

import click

from sinkhole.cli.common import Env, category_name, emit, output_options, pass_env
from sinkhole.errors import ConfigError
from sinkhole.policy.decide import GROUP_PREFIX
from sinkhole.service import operations


@click.group("group")
def group_group() -> None:
    """Client groups: networks with their own categories and extra rules (most specific network wins)."""


@group_group.command("add")
@click.argument("name", callback=category_name)
@click.option("--network", "networks", multiple=True, metavar="CIDR",
              help="A client network of the group (IPv4 or IPv6; a bare address is a /32 or /128); repeatable.")
@click.option("--categories", default=None, metavar="A,B,...|inherit|none",
              help="Categories in force for the group, replacing its set [new group: inherit, i.e. those in "
                   "force for everyone]. The `manual` rules and the group's own extra rules always apply.")
@click.option("--note", default=None, help="Why: a ticket number, a policy reference.")
@pass_env
def group_add(env: Env, name: str, networks: tuple[str, ...], categories: str | None, note: str | None) -> None:
    """Create group NAME, or add networks to it / change its categories.

    e.g. `sinkhole group add defence --network 10.20.0.0/16 --categories deepseek,genai-cn,genai,doh-bypass`
    """
    nets = operations.networks(networks)
    cats = operations.group_categories(categories)
    with env.store() as store:
        known = {r["category"] for r in store.categories()}
        created, added = store.save_group(name, nets, cats, note)
    click.echo(f"{'created' if created else 'changed'} group {name}"
               + (f": networks {', '.join(added)}" if added else ""))
    if cats is not None:
        click.echo(f"categories in force for {name}: {', '.join(cats) or '(none)'} (plus manual and its own rules)")
        unknown = [c for c in cats if c not in known]
        if unknown:
            click.echo(f"note: no rules in {', '.join(unknown)} yet", err=True)


@group_group.command("remove")
@click.argument("name", callback=category_name)
@click.option("--network", "networks", multiple=True, metavar="CIDR", help="Remove only this network; repeatable.")
@pass_env
def group_remove(env: Env, name: str, networks: tuple[str, ...]) -> None:
    """Remove group NAME (its clients fall back to the default group, its extra rules go), or some networks."""
    nets = operations.networks(networks) if networks else None
    if not env.checked_path().exists():  # a new database would have no group but default: say so, make none
        raise ConfigError("the default group cannot be removed (its categories can be changed)"
                          if name == "default" and nets is None else f"no group {name!r}: see `sinkhole group list`")
    with env.store() as store:
        gone = store.remove_group(name, nets)
    if nets is None:
        click.echo(f"removed group {name}" + (f" and its networks {', '.join(gone)}" if gone else ""))
    else:
        click.echo(f"removed from group {name}: {', '.join(gone)}")


@group_group.command("list")
@output_options()
@pass_env
def group_list(env: Env, fmt: str) -> None:
    """Every group: its networks, categories in force and number of extra rules."""
    with env.existing_store() as store:
        rows = operations.group_rows(store)
    if fmt != "json":
        for r in rows:
            r["networks"] = " ".join(r["networks"])
            r["in_force"] = ",".join(r["in_force"]) + (" (inherited)" if r["inherits"] else "")
    emit(rows, ["name", "networks", "in_force", "rules", "note"], fmt)


@group_group.command("show")
@click.argument("name", callback=category_name)
@output_options(("text", "json"))
@pass_env
def group_show(env: Env, name: str, fmt: str) -> None:
    """One group: networks, categories in force with their rule counts, and its extra rules."""
    with env.existing_store() as store:
        categories = store.categories()
        rows = {r["name"]: r for r in operations.group_rows(store, categories)}
        if name not in rows:
            raise ConfigError(f"no group {name!r}: see `sinkhole group list`")
        row = rows[name]
        counts = {r["category"]: r for r in categories}
        row["categories_in_force"] = [{"category": c, "block": (counts.get(c) or {}).get("block") or 0,
                                       "allow": (counts.get(c) or {}).get("allow") or 0} for c in row["in_force"]]
        row["extra_rules"] = [{"domain": r["domain"], "kind": r["kind"], "note": r["note"]}
                              for r in store.list_rules(None, GROUP_PREFIX + name)]
    if fmt == "json":
        click.echo(json.dumps(row, indent=2))
        return
    click.echo(f"group {name}" + (f" ({row['note']})" if row.get("note") else ""))
    click.echo(f"  networks: {', '.join(row['networks']) or '(none)'}")
    click.echo("  categories in force" + (" (inherited from everyone's)" if row["inherits"] else "") + ":")
    for c in row["categories_in_force"]:
        click.echo(f"    {c['category']}: {c['block']} block, {c['allow']} allow")
    click.echo(f"  extra rules ({len(row['extra_rules'])}):")
    for r in row["extra_rules"]:
        click.echo(f"    {r['kind']} {r['domain']}" + (f"  # {r['note']}" if r["note"] else ""))
