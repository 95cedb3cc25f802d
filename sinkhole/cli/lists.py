"""sinkhole lists show|enable|disable|import|update: block lists and their categories."""

from __future__ import annotations

import sys

import click

from sinkhole.cli.common import Env, category_name, complain, emit, output_options, pass_env
from sinkhole.cli.progress import Progress, quiet_option
from sinkhole.errors import ConfigError
from sinkhole.policy import lists
from sinkhole.service import operations


@click.group("lists")
def lists_group() -> None:
    """Block lists and categories: show, enable, disable, import, update."""


@lists_group.command("show")
@output_options()
@pass_env
def lists_show(env: Env, fmt: str) -> None:
    """Every category: rules, source, in force or not; and the shipped lists not loaded."""
    with env.existing_store() as store:
        rows = operations.list_rows(store)
    for r in rows:
        r["enabled"] = "yes" if r["enabled"] else "no"
    emit(rows, ["category", "enabled", "block", "allow", "regex", "source", "disabled_since"], fmt)


@lists_group.command("enable")
@click.argument("category", callback=category_name)
@pass_env
def lists_enable(env: Env, category: str) -> None:
    """Put CATEGORY's rules in force again; a shipped list not loaded yet (e.g. deepseek-telemetry) is loaded."""
    if not env.checked_path().exists() and category not in {bl.headers.get("category", bl.name)
                                                            for _, bl in lists.shipped_lists(False)}:
        raise ConfigError(f"no category {category!r}: see `sinkhole lists show`")  # and no new database made
    with env.store() as store:
        changed, loaded, source = operations.enable_list(store, category)
    if loaded is not None:
        click.echo(f"loaded {loaded} rules into category {category} from {source}")
    click.echo(f"category {category} is in force" + ("" if changed else " (it was already)"))


@lists_group.command("disable")
@click.argument("category", callback=category_name)
@pass_env
def lists_disable(env: Env, category: str) -> None:
    """Take CATEGORY's rules out of force (they stay stored: `lists enable` brings them back)."""
    with env.existing_store() as store:
        changed = operations.disable_list(store, category)
    click.echo(f"category {category} is out of force" + ("" if changed else " (it was already)"))


LIST_FORMATS = click.Choice(["auto", "hosts", "domains", "adblock", "rpz"])


@lists_group.command("import")
@click.argument("source", metavar="FILE|URL")
@click.option("--category", default=None, callback=category_name,
              help="Category the list becomes [the list's `# category:` header, else its file name].")
@click.option("--format", "fmt", type=LIST_FORMATS, default="auto", show_default=True,
              help="List format; auto tells RPZ zones, adblock, hosts and plain domain lists apart.")
@quiet_option
@pass_env
def lists_import(env: Env, source: str, category: str | None, fmt: str, quiet: bool) -> None:
    """Make a category hold exactly the rules of a list FILE or an http(s) URL.

    Formats: plain domains, hosts (`0.0.0.0 name`), adblock (`||name^`, `@@||name^` exceptions,
    `/regex/`) and RPZ zone files. The list is checked whole first: one bad line rejects it,
    with its line number, and the rules in force stay as they were. The source is recorded, so
    that `sinkhole lists update` can fetch it again. e.g.
    `sinkhole lists import https://lists.example/ai.txt --category ai`
    """
    with Progress.for_command(quiet) as progress:
        read = operations.read_list(source, category, fmt, progress=progress)  # a bad list: nothing written
        with env.store() as store:
            operations.store_list(store, read, fmt, progress=progress)
    click.echo(f"imported {read.summary} ({read.format}) into category {read.category} from {source}")


@lists_group.command("update")
@click.argument("categories", nargs=-1, callback=lambda ctx, p, v: tuple(category_name(ctx, p, c) for c in v))
@quiet_option
@pass_env
def lists_update(env: Env, categories: tuple[str, ...], quiet: bool) -> None:
    """Fetch every imported list again (or those of CATEGORIES) and replace the ones that changed.

    URLs are fetched with a conditional GET (If-None-Match / If-Modified-Since): 304 leaves the
    category as it is; files are read again. A list is replaced, in one transaction, only when
    its content changed. One line per source; a source that fails (unreachable, a bad line) keeps
    its rules in force, the others are still updated, and the exit code is 1. For a timer or cron.
    """
    failed = 0
    progress = Progress.for_command(quiet)
    with env.existing_store() as store:
        any_source = False
        for res in operations.update_lists(store, categories, progress=progress):
            any_source = True
            if res.ok:
                click.echo(f"{res.category}: {res.text}")
            else:
                failed += 1
                complain(f"{res.category}: {res.text}")
        if not any_source:
            click.echo("no list sources recorded (sinkhole lists import FILE|URL records one)")
    if failed:
        sys.exit(1)
