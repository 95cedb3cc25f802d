"""The `sinkhole` command: thin click commands over the library, grouped by noun."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import click

from sinkhole import __version__, operations
from sinkhole.errors import ConfigError, DomainError, ListFormatError, SinkholeError
from sinkhole.files import guard_output, write_private
from sinkhole.model import Action, RuleKind
from sinkhole.policy.names import normalize
from sinkhole.progress import Progress, quiet_option
from sinkhole.service import systemd
from sinkhole.store.audit import MAX_RETENTION_DAYS
from sinkhole.store.db import Store
from sinkhole.store.journal import Actor
from sinkhole.store.schema import DatabaseError, default_db_path, iso_dt

USAGE_ERRORS = (ConfigError, DomainError, ListFormatError)
FORMATS = click.Choice(["table", "json", "csv"])
# every number an option takes is bounded: one line and exit 2 beyond, never a traceback from SQLite or datetime
MAX_ROWS = 1_000_000_000  # log --limit
MAX_TOP = 100_000  # stats/report --top
MAX_ID = 2**63 - 1  # a row id: SQLite's largest integer


class FiniteFloat(click.FloatRange):
    """click.FloatRange that refuses NaN (which compares as inside every range) and infinities."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def complain(text: str, priority: int = systemd.ERR) -> None:
    """One line on stderr; under systemd (a timer's `lists update`, ExecReload's `reload`) with its priority
    for the journal, so that `journalctl -p err` shows it."""
    click.echo(systemd.journal_prefix(priority) + text, err=True)


class SinkholeGroup(click.Group):
    """Turns errors into one line on stderr and the contract's exit codes (2 bad input, 1 failure)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USAGE_ERRORS as exc:
            complain(f"sinkhole: {exc}")
            ctx.exit(2)
        except BrokenPipeError:  # `sinkhole block list | head`: the reader is gone, nothing to say
            sys.stdout = open(os.devnull, "w")  # python flushes stdout at exit: let that go nowhere
            ctx.exit(0)
        except (SinkholeError, DatabaseError, OSError) as exc:
            complain(f"sinkhole: {exc}")
            ctx.exit(1)


class Env:
    def __init__(self, db: Path | None) -> None:
        self.db_path = db or default_db_path()

    def checked_path(self) -> Path:
        """The database path, if it can be one (a regular file, or none yet): ConfigError before anything is
        made for /dev/null, a directory or an SQLite URI."""
        from sinkhole.files import check_db_path

        return check_db_path(self.db_path)

    def store(self) -> Store:
        """The database, made (0600, with the shipped lists) if there is none: for commands that change it."""
        from sinkhole.store.db import open_store

        return open_store(self.checked_path())

    def existing_store(self) -> Store:
        """For commands that only read, or remove: a missing file is a mistyped path, never a new database."""
        if not self.checked_path().exists():
            raise SinkholeError(f"no database at {self.db_path} (check --db / SINKHOLE_DB; `sinkhole serve` or a "
                                "change such as `block add` makes one)")
        return self.store()


pass_env = click.make_pass_decorator(Env)


@click.group(cls=SinkholeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), envvar="SINKHOLE_DB",
              help="SQLite database shared by the server and the CLI [env SINKHOLE_DB; "
                   "default: ~/.local/state/sinkhole/sinkhole.db].")
@click.version_option(__version__, prog_name="sinkhole")
@click.pass_context
def cli(ctx: click.Context, db: Path | None) -> None:
    """DNS sinkhole for generative-AI services, with an audit log of every blocked query."""
    ctx.obj = Env(db)


# ---------------------------------------------------------------------------- output


def emit(rows: list[dict], columns: list[str], fmt: str) -> None:
    if fmt == "json":
        for row in rows:
            click.echo(operations.json_line(row))
    elif fmt == "csv":
        click.echo(operations.csv_text(rows, columns), nl=False)
    else:
        cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
        click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=False)).rstrip())
        for row in cells:
            click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)).rstrip())


def parse_when(text: str | None, option: str) -> str | None:
    """'15m', '2h', '7d', '1w', '2026-11-01' or an ISO 8601 time -> ISO UTC text as stored in the log."""
    try:
        return operations.parse_when(text, option)
    except operations.BadValue as exc:
        raise click.BadParameter(exc.message, param_hint=option) from None


def parse_expiry(text: str | None, option: str = "--expires") -> str | None:
    """'7d', '12h', '2w' from now, or an ISO 8601 time -> ISO UTC text; it must lie in the future."""
    try:
        return operations.parse_expiry(text, option)
    except operations.BadValue as exc:
        raise click.BadParameter(exc.message, param_hint=option) from None


def _category(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        return operations.check_category(value)
    except operations.BadValue as exc:
        raise click.BadParameter(exc.message) from None


# ---------------------------------------------------------------------------- serve


@cli.command()
@click.option("--listen", multiple=True, metavar="HOST:PORT",
              help="Address to serve UDP and TCP on; repeatable [default 127.0.0.1:5353].")
@click.option("--upstream", multiple=True, metavar="URL",
              help="Resolver to forward to: HOST[:PORT], udp://, tcp://, tls://HOST[:853][#NAME] or "
                   "https://HOST/dns-query; in order of preference; repeatable [default: /etc/resolv.conf].")
@click.option("--upstream-strategy", type=click.Choice(["failover", "fastest", "parallel"]), default=None,
              help="failover: in order; fastest: lowest measured latency; parallel: the two best at once [failover].")
@click.option("--upstream-ca", default=None, metavar="PEM",
              help="CA bundle that tls:// and https:// upstreams must chain to [the system's CAs].")
@click.option("--forward-zone", "forward_zones", multiple=True, metavar="ZONE=URL[,URL]",
              help="Names at or under ZONE go to these upstreams (most specific zone wins); repeatable.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              envvar="SINKHOLE_CONFIG", help="TOML file with settings (flags and SINKHOLE_* override it) "
                                             "[default: /etc/sinkhole/sinkhole.toml if it exists]. "
                                             "sinkhole reload (or SIGHUP) reads it again.")
@click.option("--mode", type=click.Choice(["sinkhole", "nxdomain"]), default=None,
              help="Answer blocked names with the sinkhole address (A/AAAA; NODATA otherwise) or NXDOMAIN.")
@click.option("--block-a", default=None, metavar="IPV4|none", help="Address for blocked A queries [0.0.0.0].")
@click.option("--block-aaaa", default=None, metavar="IPV6|none", help="Address for blocked AAAA queries [::].")
@click.option("--block-ttl", type=int, default=None, help="TTL of sinkhole answers in seconds [60].")
@click.option("--timeout", type=float, default=None, help="Seconds until SERVFAIL when no upstream answers [2].")
@click.option("--ecs", default=None, metavar="strip|V4/V6",
              help="EDNS Client Subnet sent upstream: none (strip), or each client's network of these prefix "
                   "lengths, e.g. 24/56, with answers cached per network [strip].")
@click.option("--log-queries", type=click.Choice(["blocked", "all", "none"]), default=None,
              help="Which queries the audit log keeps [blocked].")
@click.option("--log-client-prefix", default=None, metavar="V4/V6",
              help="Privacy: audit rows keep each client's network of these prefix lengths (e.g. 24/56), "
                   "not its address [whole addresses].")
@click.option("--audit-synchronous", type=click.Choice(["off", "normal", "full", "extra"]), default=None,
              help="SQLite synchronous level of the audit log: full loses no committed row on a power cut [normal].")
@click.option("--node", default=None, help="Node name written in every audit row [host name].")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Processes serving the same sockets [0: one per core].")
@click.option("--user", default=None, metavar="NAME",
              help="Started as root: bind the ports, then run as this user (e.g. to serve port 53).")
@click.option("--shipped-lists/--no-shipped-lists", default=None,
              help="Load the shipped lists into a new database [yes].")
@click.option("--cache-prefetch/--no-cache-prefetch", default=None,
              help="Refresh popular cache entries before they expire (a hit in the last tenth of the TTL) [no].")
@click.option("--cache-serve-stale", type=FiniteFloat(min=0), default=None, metavar="SECONDS",
              help="When no upstream answers, answer from a cache entry that expired less than this long ago "
                   "(RFC 8767: TTL 30 s, EDE 3) [0: never].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
@click.option("--syslog", default=None, metavar="[udp://|tcp://]HOST:PORT",
              help="Ship every audit row and the chain heads to this syslog collector (RFC 5424; UDP unless tcp://).")
@click.option("--syslog-facility", default=None, metavar="NAME", help="Syslog facility of those messages [local0].")
@click.option("--json-log/--no-json-log", default=None,
              help="Write every audit row as a JSON line on stdout (journald under systemd) [no].")
@click.option("--anchor-interval", type=float, default=None, metavar="SECONDS",
              help="Seconds between chain heads sent to syslog; one is sent at shutdown too [60].")
@click.option("--retention-days", type=click.IntRange(min=0, max=MAX_RETENTION_DAYS), default=None,
              help="Prune audit rows older than this, hourly, leaving checkpoints [365; 0: keep forever].")
@click.option("--metrics", default=None, metavar="HOST:PORT",
              help="Serve Prometheus /metrics and /healthz here, e.g. 127.0.0.1:9153 [off].")
@click.option("--rpz-listen", default=None, metavar="HOST:PORT",
              help="Serve the policy as an RPZ zone here (SOA, AXFR, IXFR over TCP; NOTIFY in) [off].")
@click.option("--policy-from", default=None, metavar="HOST:PORT",
              help="Run as a secondary: pull the RPZ zone from this primary into category rpz:ZONE [off].")
@click.option("--blockpage-listen", multiple=True, metavar="HOST[:PORT]",
              help="Serve the block page here (HTTP and HTTPS on each port; a bare HOST: ports 80 and 443); "
                   "blocked A/AAAA answers then point at it; repeatable [off].")
@click.option("--web-listen", multiple=True, metavar="HOST[:PORT]",
              help="Serve the web console here (a bare HOST: port 8053; plain HTTP on loopback only, else HTTPS); "
                   "accounts from `sinkhole user add`; repeatable [off].")
@pass_env
def serve(env: Env, config_file: Path | None, **flags: Any) -> None:
    """Serve DNS: sinkhole listed names, forward the rest, audit every block.

    sinkhole reload (or SIGHUP) reads the configuration again and applies what can change at run time."""
    from sinkhole.service import build, config, process, systemd
    from sinkhole.web.front import Front

    config_file = config_file or config.default_file()
    # a repeatable option given no value comes as (): not set, rather than set to nothing
    given = {k: (None if v == () else v) for k, v in flags.items()}
    cfg = build.load(config_file, flags=given)
    env.checked_path()
    # under systemd, each line carries its priority into the journal (journalctl -p warning)
    logging.basicConfig(level=cfg.process.log_level.upper(), handlers=[systemd.log_handler(sys.stderr)])
    sys.exit(process.run(cfg, env.db_path, reload=lambda: build.load(config_file, flags=given), front=Front()))


@cli.command()
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
    from sinkhole.service import control

    outcome = control.request_reload(env.checked_path(), timeout)
    if not outcome.ok:
        complain(f"sinkhole: reload {outcome.describe()}")
        sys.exit(2)
    click.echo(f"reloaded: {outcome.describe()}")


# ---------------------------------------------------------------------------- config


@cli.group("config")
def config_group() -> None:
    """Check the settings file, and show the settings a server would run with."""


@config_group.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path), envvar="SINKHOLE_CONFIG")
def config_check(file: Path | None) -> None:
    """Validate FILE [SINKHOLE_CONFIG, else /etc/sinkhole/sinkhole.toml]: every error, each with its
    line; exit 2 if there is any."""
    from sinkhole.service import build, config

    file = file or config.default_file()
    if file is None:
        raise ConfigError(f"no settings file: give FILE, set SINKHOLE_CONFIG, or create {config.DEFAULT_PATH}")
    problems = config.check_file(file, build.check)
    for problem in problems:
        click.echo(problem.format(file), err=True)
    if problems:
        sys.exit(2)
    click.echo(f"{file}: ok")


@config_group.command("show")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), envvar="SINKHOLE_CONFIG",
              help="The settings file [default: /etc/sinkhole/sinkhole.toml if it exists].")
@click.option("--format", "fmt", type=click.Choice(["toml", "json"]), default="toml", show_default=True)
def config_show(config_file: Path | None, fmt: str) -> None:
    """The effective settings (defaults < file < SINKHOLE_* environment), each with where it came from."""
    from sinkhole.service import build, config

    config_file = config_file or config.default_file()
    cfg, sources = build.load_sources(config_file)
    if fmt == "json":
        click.echo(json.dumps({"file": str(config_file) if config_file else None, "settings": {
            name: {"value": list(v) if isinstance(v := cfg.value(name), tuple) else v, "source": sources[name]}
            for name in config.KEYS}}, indent=2))
        return
    click.echo(f"# effective settings: defaults < {config_file or '(no file)'} < SINKHOLE_* environment")
    for name in config.KEYS:
        source = sources[name]
        if source == "env":
            source = f"env SINKHOLE_{name.upper()}"
        elif source == "file":
            source = f"file {config_file}"
        line = f"{name} = {config.to_toml(cfg.value(name))}"
        click.echo(f"{line}  # {source}")


# ---------------------------------------------------------------------------- block / allow


def _rule_group(kind: RuleKind, verb: str) -> click.Group:
    group = click.Group(kind.value, help=f"Manage {kind.value} rules (a rule covers the name and every subdomain).")

    @group.command("add")
    @click.argument("names", nargs=-1, required=True)
    @click.option("--category", default=None, callback=_category,
                  help="Category to file the rule under [manual: in force for every group].")
    @click.option("--group", "client_group", default=None, callback=_category,
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
    @click.option("--category", default=None, callback=_category, help="Remove only from this category [all].")
    @click.option("--group", "client_group", default=None, callback=_category,
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
    @click.option("--group", "client_group", default=None, callback=_category, help="Only this group's extra rules.")
    @click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
    @pass_env
    def list_(env: Env, category: str | None, client_group: str | None, fmt: str) -> None:
        if client_group is not None:
            category = operations.rule_category(category, client_group)
        with env.existing_store() as store:
            rows = store.list_rules(kind, category)
        emit(rows, ["domain", "category", "source", "added_at", "added_by", "expires_at", "note"], fmt)

    list_.help = f"List {kind.value} rules."
    return group


cli.add_command(_rule_group(RuleKind.BLOCK, "blocked"))
cli.add_command(_rule_group(RuleKind.ALLOW, "allowed"))


# ---------------------------------------------------------------------------- client groups


@cli.group("group")
def group_group() -> None:
    """Client groups: networks with their own categories and extra rules (most specific network wins)."""


@group_group.command("add")
@click.argument("name", callback=_category)
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
@click.argument("name", callback=_category)
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
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
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
@click.argument("name", callback=_category)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@pass_env
def group_show(env: Env, name: str, fmt: str) -> None:
    """One group: networks, categories in force with their rule counts, and its extra rules."""
    from sinkhole.policy.decide import GROUP_PREFIX

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


@cli.group("lists")
def lists_group() -> None:
    """Block lists and categories: show, enable, disable, import, update."""


@lists_group.command("show")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@pass_env
def lists_show(env: Env, fmt: str) -> None:
    """Every category: rules, source, in force or not; and the shipped lists not loaded."""
    with env.existing_store() as store:
        rows = operations.list_rows(store)
    for r in rows:
        r["enabled"] = "yes" if r["enabled"] else "no"
    emit(rows, ["category", "enabled", "block", "allow", "regex", "source", "disabled_since"], fmt)


@lists_group.command("enable")
@click.argument("category", callback=_category)
@pass_env
def lists_enable(env: Env, category: str) -> None:
    """Put CATEGORY's rules in force again; a shipped list not loaded yet (e.g. deepseek-telemetry) is loaded."""
    from sinkhole.policy import lists

    if not env.checked_path().exists() and category not in {bl.headers.get("category", bl.name)
                                                            for _, bl in lists.shipped_lists(False)}:
        raise ConfigError(f"no category {category!r}: see `sinkhole lists show`")  # and no new database made
    with env.store() as store:
        changed, loaded, source = operations.enable_list(store, category)
    if loaded is not None:
        click.echo(f"loaded {loaded} rules into category {category} from {source}")
    click.echo(f"category {category} is in force" + ("" if changed else " (it was already)"))


@lists_group.command("disable")
@click.argument("category", callback=_category)
@pass_env
def lists_disable(env: Env, category: str) -> None:
    """Take CATEGORY's rules out of force (they stay stored: `lists enable` brings them back)."""
    with env.existing_store() as store:
        changed = operations.disable_list(store, category)
    click.echo(f"category {category} is out of force" + ("" if changed else " (it was already)"))


LIST_FORMATS = click.Choice(["auto", "hosts", "domains", "adblock", "rpz"])


@lists_group.command("import")
@click.argument("source", metavar="FILE|URL")
@click.option("--category", default=None, callback=_category,
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
@click.argument("categories", nargs=-1, callback=lambda ctx, p, v: tuple(_category(ctx, p, c) for c in v))
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


# ---------------------------------------------------------------------------- export


@cli.group("export")
def export_group() -> None:
    """Write the policy in another system's format."""


@export_group.command("rpz")
@click.option("--group", "client_group", default="default", show_default=True, callback=_category,
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
    from sinkhole.fleet import zone as rpz
    from sinkhole.service import build

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


# ---------------------------------------------------------------------------- log / stats

LOG_TABLE_COLUMNS, LOG_COLUMNS = operations.LOG_TABLE_COLUMNS, operations.LOG_COLUMNS


@cli.group("log", invoke_without_command=True)
@click.option("--since", help="Start: a duration back from now (15m, 2h, 7d) or an ISO 8601 time (UTC if no zone).")
@click.option("--until", help="End (exclusive), same forms as --since.")
@click.option("--client", help="Client IP address or CIDR network.")
@click.option("--domain", help="A name and all its subdomains.")
@click.option("--action", type=click.Choice([a.value for a in Action]), help="Only rows with this action.")
@click.option("--group", "group", metavar="NAME", help="Only rows decided by this client group's policy.")
@click.option("--category", metavar="NAME", help="Only rows whose rule is in this category (e.g. doh-bypass).")
@click.option("--rule", metavar="TEXT", help="Only rows decided by this rule, exactly as stored (e.g. deepseek.com).")
@click.option("--limit", type=click.IntRange(min=1, max=MAX_ROWS), default=None,
              help="At most this many rows (the latest).")
@click.option("--ref", metavar="CODE", help="The block page view with this reference code, and the DNS row it follows.")
@click.option("--follow", "-f", is_flag=True,
              help="Then keep printing matching rows as they are written, until Ctrl-C or SIGTERM "
                   "(starts with the last 10 unless --since or --limit says otherwise).")
@click.option("--interval", type=FiniteFloat(min=0.05, max=60), default=0.25, show_default=True,
              hidden=True, help="Seconds between two looks at the log with --follow.")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True,
              help="json is JSON Lines: one object a row.")
@click.option("--db", "dbs", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Query these databases (several nodes') as one log, ordered by time; repeatable.")
@click.pass_context
def log_(ctx: click.Context, since: str | None, until: str | None, client: str | None, domain: str | None,
         action: str | None, group: str | None, category: str | None, rule: str | None, limit: int | None,
         ref: str | None, follow: bool, interval: float, fmt: str, dbs: tuple[Path, ...]) -> None:
    """Show the audit log, oldest first; `log verify` checks its chains, `log anchor` prints their heads."""
    if ctx.invoked_subcommand is not None:
        return
    env = ctx.find_object(Env)
    assert env is not None
    if follow and until:
        raise click.BadParameter("--follow prints rows as they come: it takes no end", param_hint="--until")
    try:
        checked = operations.LogFilter.parse(since, until, client, domain, action, group, category, rule)
    except operations.BadValue as exc:
        raise click.BadParameter(exc.message, param_hint=f"--{exc.field}") from None
    filters = checked.kwargs()
    if dbs:
        if follow:
            raise ConfigError("--follow reads one database: run one `log --follow` per node, or ship to syslog")
        merged: list[dict] = []
        for path in dict.fromkeys(dbs):
            one = Env(path).existing_store()
            try:
                merged.extend(one.query_log(limit=limit, **filters))
            finally:
                one.close()
        # one log: by time, then node (each row names the node that wrote it), then each node's own order
        merged.sort(key=lambda r: (r["time"], r["node"] or "", r["seq"]))
        if limit:
            merged = merged[-limit:]
        emit(merged, [*LOG_TABLE_COLUMNS, "node"] if fmt == "table" else LOG_COLUMNS, fmt)
        return
    with env.existing_store() as store:
        if ref is not None:
            rows = _page_view(store, ref)
        elif follow:
            _follow(env, store, filters, limit if limit or since else 10, fmt, interval)
            return
        else:
            rows = list(store.query_log(limit=limit, **filters))
    emit(rows, LOG_TABLE_COLUMNS if fmt == "table" else LOG_COLUMNS, fmt)


def _page_view(store: Store, ref: str) -> list[dict]:
    """The audit row of the block page view with reference `ref` (its second is in the code), and the DNS row
    it names; exit 1 when there is none."""
    from sinkhole.web.blockpage import parse_ref

    try:
        code, second = parse_ref(ref)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ref") from None
    rows = [r for r in store.query_log(since=iso_dt(datetime.fromtimestamp(second, UTC)),
                                       until=iso_dt(datetime.fromtimestamp(second + 1, UTC)), action="page")
            if (r["answer"] or "").split(";")[0] == f"ref {code}"]
    if not rows:
        raise SinkholeError(f"no block page view with reference {code} (written at "
                            f"{iso_dt(datetime.fromtimestamp(second, UTC))[:19]}Z, if it was)")
    m = re.search(r"; dns seq (\d+)", rows[0]["answer"] or "")
    if m:
        rows[:0] = [r for r in [store.audit_row(int(m.group(1)))] if r is not None]
    return rows


FOLLOW_BATCH = 5000


class _Stop(Exception):
    """SIGTERM during `log --follow`: stop as Ctrl-C does."""


def _follow(env: Env, store: Store, filters: dict, limit: int | None, fmt: str, interval: float) -> None:
    """`log --follow`: the latest rows, then every new matching row by seq, until Ctrl-C or SIGTERM (exit 0).

    Polls `seq > last seen` (commit order is seq order: see Store.log_after), so rows from several
    workers and processes come each once; a database file replaced under us (deleted and made again by the
    server) is followed from its first row."""
    import signal
    import time

    def stop(signum: int, frame: object) -> None:
        raise _Stop

    previous = signal.signal(signal.SIGTERM, stop)
    columns = LOG_TABLE_COLUMNS if fmt == "table" else LOG_COLUMNS
    out = _Stream(columns, fmt)
    try:
        last = store.last_seq()
        out.write(list(store.query_log(limit=limit, through_seq=last, **filters)))
        while True:
            time.sleep(interval)
            if store.replaced():
                store.close()
                store, last = env.existing_store(), 0
            # every row up to `top` is committed (commit order is seq order): read the matching ones among
            # them, then move past all of them, matching or not
            top = store.last_seq()
            while last < top:
                rows = store.log_after(last, top, batch=FOLLOW_BATCH, **filters)
                out.write(rows)
                last = rows[-1]["seq"] if len(rows) == FOLLOW_BATCH else top
    except (KeyboardInterrupt, _Stop):
        return
    finally:
        signal.signal(signal.SIGTERM, previous)
        store.close()


class _Stream:
    """Rows printed as they come: CSV with one header, a table with fixed widths, JSON Lines as usual."""

    WIDTHS: ClassVar[dict[str, int]] = {"time": 27, "client": 15, "transport": 9, "qname": 30, "qtype": 5,
                                        "action": 13, "rule": 20}

    def __init__(self, columns: list[str], fmt: str) -> None:
        self.columns, self.fmt, self.started = columns, fmt, False

    def write(self, rows: list[dict]) -> None:
        if self.fmt == "json":
            emit(rows, self.columns, "json")
            return
        if self.fmt == "csv":
            click.echo(operations.csv_text(rows, self.columns, header=not self.started), nl=False)
        else:
            widths = [max(len(c), self.WIDTHS.get(c, 0)) for c in self.columns]
            lines = [] if self.started else ["  ".join(c.ljust(w) for c, w in zip(self.columns, widths,
                                                                                    strict=True)).rstrip()]
            for r in rows:
                lines.append("  ".join(("" if r.get(c) is None else str(r.get(c))).ljust(w)
                                       for c, w in zip(self.columns, widths, strict=True)).rstrip())
            if lines:
                click.echo("\n".join(lines))
        self.started = True


def _key_path(env: Env, key: Path | None) -> Path:
    from sinkhole.audit.chain import default_key_path

    return key or default_key_path(env.db_path)


def _protected(env: Env, key: Path | None) -> list[Path]:
    """What an output option may never write over: the database (and its WAL, SHM) and its audit key."""
    server_key = _key_path(env, key)
    return [env.db_path, server_key, Path(f"{server_key}.lock")]


def _file_name(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None and not value.name:
        raise click.BadParameter(f"{str(value)!r} names no file")
    return value


_SERVER_KEY = click.option("--key", "key", type=click.Path(dir_okay=False, path_type=Path), default=None,
                           callback=_file_name,
                           help="The audit key the server writes with [env SINKHOLE_AUDIT_KEY; default DB.key].")


@log_.command("verify")
@click.option("--key-file", "key_files", required=True, multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The operator's copy of the audit key (from `log anchor --export-key`), kept off this host; "
                   "with several --db, one for all or one per --db in the same order.")
@click.option("--anchor", "anchor_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Heads saved earlier by `sinkhole log anchor`: a tail cut off since then is reported "
                   "(with several --db: one per --db, in the same order).")
@click.option("--db", "dbs", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Verify these databases (several nodes'), each with the key file next to it; repeatable.")
@_SERVER_KEY
@quiet_option
@pass_env
def log_verify(env: Env, key_files: tuple[Path, ...], anchor_files: tuple[Path, ...], dbs: tuple[Path, ...],
               key: Path | None, quiet: bool) -> None:
    """Walk every chain of the audit log and check every row's MAC; exit 1 naming the first bad row of each."""
    from sinkhole.audit.chain import default_key_path

    paths = list(dbs) or [env.db_path]
    if len(key_files) not in (1, len(paths)):
        raise ConfigError(f"{len(key_files)} --key-file for {len(paths)} databases: give one for all, or one per --db")
    if anchor_files and len(anchor_files) != len(paths):
        raise ConfigError(f"{len(anchor_files)} --anchor for {len(paths)} databases: give one per --db")
    if key is not None and len(paths) > 1:
        raise ConfigError("--key names one database's server key: with several --db each uses the key file next to it")
    failed = 0
    for i, path in enumerate(paths):
        if len(paths) > 1:
            click.echo(f"== {path}")
        server_key = key or (default_key_path(path) if dbs else _key_path(env, None))
        ok = _verify_one(Env(path), key_files[i if len(key_files) > 1 else 0],
                         anchor_files[i] if anchor_files else None, server_key, Progress.for_command(quiet))
        failed += not ok
    if failed:
        if len(paths) > 1:
            click.echo(f"verification failed for {failed} of {len(paths)} databases")
        sys.exit(1)


def _verify_one(env: Env, key_file: Path, anchor_file: Path | None, server_key: Path, progress: Progress) -> bool:
    from sinkhole.audit import chain

    generation, secret = chain.read_key(key_file)
    anchor = chain.read_anchor(anchor_file) if anchor_file is not None else None
    try:
        current: tuple[int, bytes] | None = chain.read_key(server_key)
    except chain.AuditKeyError as exc:
        current = None
        click.echo(f"note: {exc}; a chain deleted whole since the last chain start is only found with --anchor")
    with env.existing_store() as store, progress:
        result = operations.verify(store, generation, secret, anchor, current, progress=progress)
    for kind, text in result.lines:
        click.echo(text if kind == "info" else f"{kind}: {text}")
    click.echo(result.summary)
    return result.ok


@log_.command("anchor")
@click.option("--format", "fmt", type=click.Choice(["json", "table"]), default="json", show_default=True,
              help="json is JSON Lines: one chain head a line, the form `verify --anchor` reads.")
@click.option("--export-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Instead: copy the current audit key (made if there is none) to this new file, for verify.")
@click.option("--force", is_flag=True, help="With --export-key: write over a file that is there (never the "
                                            "database or its audit key).")
@_SERVER_KEY
@pass_env
def log_anchor(env: Env, fmt: str, export_key: Path | None, force: bool, key: Path | None) -> None:
    """Print the head of every chain (chain, link, seq, mac, time), to keep somewhere an intruder cannot edit."""
    from sinkhole.audit import chain

    if export_key is not None:
        env.checked_path()
        guard_output(export_key, force, _protected(env, key), "--export-key", new_dirs=True)
        server_key = _key_path(env, key)
        if export_key.exists() and not (server_key.exists()
                                        and chain.is_key_of(export_key, *chain.read_key(server_key))):
            raise ConfigError(f"--export-key {export_key}: not an export of this database's audit key, never "
                              "written over (it may be another database's)")
        generation, secret, _ = chain.ensure_key(server_key)
        chain.write_key(export_key, generation, secret)
        click.echo(f"exported audit key generation {generation} (fingerprint {chain.fingerprint(secret)}) to "
                   f"{export_key}: keep it off this host; it verifies every chain started from now on")
        return
    with env.existing_store() as store:
        heads = store.chain_heads()
    if fmt == "json":
        for head in heads:
            click.echo(json.dumps(head))
    else:
        emit(heads, ["chain", "link", "seq", "mac", "time"], "table")


@log_.command("prune")
@click.option("--retention-days", type=click.IntRange(min=1, max=MAX_RETENTION_DAYS), default=None,
              help="Delete rows older than this many days [365, the server's default].")
@click.option("--before", "before_text", default=None,
              help="Instead: delete rows older than this (a duration back from now, or an ISO 8601 time).")
@click.option("--node", default=None, help="Node name on the checkpoint chain [host name].")
@_SERVER_KEY
@quiet_option
@pass_env
def log_prune(env: Env, retention_days: int | None, before_text: str | None, node: str | None,
              key: Path | None, quiet: bool) -> None:
    """Delete old audit rows now, leaving checkpoints so that `log verify` still passes; journaled.

    Needs the audit key (a checkpoint is a chain of its own): without it nothing is deleted."""
    import socket

    if retention_days is not None and before_text is not None:
        raise click.UsageError("give --retention-days or --before, not both")
    if before_text is not None:
        before = parse_when(before_text, "--before")
        if before is None:  # '' reads as no time at all: not one to prune before
            raise click.BadParameter("give a duration like 30d or an ISO 8601 time", param_hint="--before")
    else:
        before = iso_dt(datetime.now(UTC) - timedelta(days=retention_days or 365))
    with env.existing_store() as store, Progress.for_command(quiet) as progress:
        if key is not None:
            store.key_path = key
        res = store.prune_audit(before, node or socket.gethostname(), actor=Actor(),
                                planned=lambda rows: progress.stage("pruning", rows, "rows"))
    if not res.rows:
        click.echo(f"nothing to prune: no audit rows older than {before}")
    else:
        click.echo(f"pruned {res.rows} audit rows older than {before} ({res.first_time} .. {res.last_time}) from "
                   f"{res.chains} chains" + (f" and {res.unchained} rows without a chain" if res.unchained else ""))
        click.echo(f"checkpoint chain {res.checkpoint_chain}; journal entry {res.journal_id}; {res.batches} batches, "
                   f"write lock held at most {res.max_lock_ms:.0f} ms, {res.seconds:.1f} s in all")
    for name in res.skipped:
        click.echo(f"sinkhole: chain {name} not pruned: rows are missing at its start with no checkpoint "
                   "(see sinkhole log verify)", err=True)
    if res.skipped:
        sys.exit(1)


# ---------------------------------------------------------------------------- changes

CHANGES_TABLE_COLUMNS = ["time", "id", "user", "sudo_user", "host", "action", "category", "what", "command"]
CHANGES_COLUMNS = ["id", "time", "user", "sudo_user", "host", "command", "action", "kind", "category", "count",
                   "domains", "detail", "what", "sealed"]


@cli.command()
@click.option("--since", help="Start: a duration back from now (15m, 2h, 7d) or an ISO 8601 time (UTC if no zone).")
@click.option("--until", help="End (exclusive), same forms as --since.")
@click.option("--user", help="Only changes by this OS user (or made through sudo by this user).")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True,
              help="json is JSON Lines: one object a change.")
@pass_env
def changes(env: Env, since: str | None, until: str | None, user: str | None, fmt: str) -> None:
    """Who changed the policy, when, from where, with which command, and what changed (the change journal).

    The id is the policy version: audit rows carry the id of the change in force when they were written."""
    since_iso, until_iso = parse_when(since, "--since"), parse_when(until, "--until")
    with env.existing_store() as store:
        entries = store.journal(since_iso, until_iso, user)
    rows = [operations.change_row(e, domains_as_list=fmt == "json") for e in entries]
    emit(rows, CHANGES_TABLE_COLUMNS if fmt == "table" else CHANGES_COLUMNS, fmt)


@cli.command()
@click.option("--since", default="24h", show_default=True, help="Duration back from now or ISO 8601 time.")
@click.option("--until", help="End (exclusive).")
@click.option("--top", type=click.IntRange(min=1, max=MAX_TOP), default=10, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@quiet_option
@pass_env
def stats(env: Env, since: str, until: str | None, top: int, fmt: str, quiet: bool) -> None:
    """Totals, top blocked rules and names, top clients, bypass attempts, groups, categories, blocked per hour."""
    from sinkhole.store.audit import STATS_QUERIES

    since_iso, until_iso = parse_when(since, "--since"), parse_when(until, "--until")
    with env.existing_store() as store, Progress.for_command(quiet) as progress:
        result = store.stats(since_iso, until_iso, top, progress.stage("counting", STATS_QUERIES, "queries"))
    if fmt == "json":
        click.echo(json.dumps({"since": since_iso, **result}, indent=2))
        return
    t = result["totals"]
    click.echo(f"since {since_iso}: {t['blocked']} blocked queries from {t['clients']} clients "
               f"for {t['domains']} names ({t['queries_logged']} rows in the log)")
    click.echo(f"block page views: {t.get('page_views', 0)} from {t.get('page_clients', 0)} clients")
    for title, rows, cols in (("top blocked rules", result["top_rules"], ["rule", "category", "queries", "clients"]),
                              ("top blocked names", result["top_names"], ["qname", "queries"]),
                              ("top clients", result["top_clients"], ["client", "queries", "names"]),
                              (f"bypass attempts ({t['bypass_attempts']}: canaries and public DoH/DoT resolvers)",
                               result["bypass_clients"], ["client", "attempts", "canaries"]),
                              ("blocked by client group", result["by_group"], ["group", "blocked", "clients"]),
                              ("blocked by category", result["by_category"], ["category", "blocked", "clients"])):
        click.echo(f"\n{title}:")
        emit(rows, cols, "table")
    import shutil

    width = min(max(shutil.get_terminal_size((100, 24)).columns - 12, 24), 120)
    click.echo("\nblocked per hour (UTC):")
    for line in histogram(result["hourly"], width):
        click.echo(line)


BLOCKS = " ▁▂▃▄▅▆▇█"


def histogram(hourly: list[dict], width: int = 72, height: int = 8) -> list[str]:
    """Blocked per hour as Unicode block columns, at most `width` columns (several hours a column when
    the range is longer), `height` rows high, each cell in eighths; a scale on the left, times below."""
    if not hourly:
        return ["(no hours in the range)"]
    per = -(-len(hourly) // width)  # hours a column, rounded up
    columns = [sum(h["blocked"] for h in hourly[i:i + per]) for i in range(0, len(hourly), per)]
    peak = max(columns)
    label_w = len(f"{peak:,}")
    lines = []
    for row in range(height, 0, -1):
        cells = []
        for value in columns:
            eighths = round(value * height * 8 / peak) if peak else 0
            cells.append(BLOCKS[min(max(eighths - (row - 1) * 8, 0), 8)])
        scale = f"{peak:,}" if row == height else ("0" if row == 1 else "")
        lines.append(f"{scale:>{label_w}} ┤{''.join(cells)}".rstrip())
    first, last = hourly[0]["hour"], hourly[-1]["hour"]
    unit = "1 hour" if per == 1 else f"{per} hours"
    axis = f"{first[:13].replace('T', ' ')}h"
    end = f"{last[:13].replace('T', ' ')}h"
    gap = max(len(columns) - len(axis) - len(end), 1)
    lines.append(f"{'':>{label_w}}  {axis}{' ' * gap}{end}")
    lines.append(f"{'':>{label_w}}  one column = {unit}; peak {peak:,} blocked")
    return lines


@cli.command()
@click.option("--since", default="7d", show_default=True, help="Duration back from now or ISO 8601 time.")
@click.option("--until", help="End (exclusive) [now].")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="The HTML file to write (one file: inline CSS and SVG, no script, nothing fetched).")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The operator's copy of the audit key: verify the chains and put the result in the report.")
@click.option("--top", type=click.IntRange(min=1, max=MAX_TOP), default=10, show_default=True)
@click.option("--force", is_flag=True, help="Write over OUTPUT if it is there (never the database or its audit key).")
@_SERVER_KEY
@quiet_option
@pass_env
def report(env: Env, since: str, until: str | None, output: Path, key_file: Path | None, top: int, force: bool,
           key: Path | None, quiet: bool) -> None:
    """A self-contained HTML report for a security officer: blocked attempts over time, top clients,
    top services, bypass attempts, client groups, and whether the audit chains verify."""
    from sinkhole.audit import report as report_mod

    since_iso, until_iso = parse_when(since, "--since"), parse_when(until, "--until")
    assert since_iso is not None
    if key_file is not None and not key_file.is_file():
        raise click.BadParameter(f"{str(key_file)!r}: no such file", param_hint="--key-file")
    env.checked_path()
    guard_output(output, force, _protected(env, key) + ([key_file] if key_file is not None else []), "--output")
    from sinkhole.store.audit import STATS_QUERIES

    with env.existing_store() as store, Progress.for_command(quiet) as progress:
        stats_ = store.stats(since_iso, until_iso, top, progress.stage("counting", STATS_QUERIES, "queries"))
        status = report_mod.chain_status(store, key_file, _key_path(env, key),
                                         progress.stage if progress.enabled else None)
    page = report_mod.render(stats_, since_iso, until_iso, status, str(env.db_path))
    write_private(output, page.encode("utf-8"))  # 0600: the report names clients
    t = stats_["totals"]
    click.echo(f"wrote {output}: {t['blocked']} blocked queries from {t['clients']} clients since {since_iso};"
               f" chain: {status.summary}")


@cli.command()
@click.argument("name")
@click.option("--type", "qtype", default="A", show_default=True, help="Query type (A, AAAA, HTTPS, ...).")
@click.option("--client", default="127.0.0.1", show_default=True, help="As asked by this client address.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), envvar="SINKHOLE_CONFIG",
              help="The server's settings file (answers, client ACL, rate limits).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_env
def check(env: Env, name: str, qtype: str, client: str, config_file: Path | None, fmt: str) -> None:
    """What the policy in force does with NAME, and why: decision, rule, category, list and its
    source, and the exact answer a client would get. Sends nothing; exit 0 either way.

    The answer follows the settings file (--config) and SINKHOLE_* variables, not the flags of a
    running `sinkhole serve` (e.g. --blockpage-listen): give those settings in the file."""
    import ipaddress

    import dns.rdatatype

    from sinkhole.service import build, config
    from sinkhole.service.explain import explain

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


# ---------------------------------------------------------------------------- ca (the block page's certificates)

_CA_DIR = click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
                       envvar="SINKHOLE_BLOCKPAGE_CA", default=None,
                       help="The CA directory [env SINKHOLE_BLOCKPAGE_CA, as the server's blockpage_ca; default: "
                            "ca/ beside the database].")


def _ca_dir(env: Env, directory: Path | None) -> Path:
    from sinkhole.web import certs

    return directory or certs.ca_directory(env.checked_path())


@cli.group("ca")
def ca_group() -> None:
    """The block page's certificate authority: PCs that trust it see the page over HTTPS for blocked names."""


def _deploy_hint(directory: Path) -> None:
    click.echo(f"key: {directory / 'ca.key'} (0600: only the server's account may read it; never copy it)")
    click.echo("deploy the certificate (sinkhole ca export -o sinkhole-ca.crt) to every managed PC as a trusted root:")
    click.echo("  Windows: Group Policy > Computer Configuration > Windows Settings > Security Settings > "
               "Public Key Policies > Trusted Root Certification Authorities > Import")
    click.echo("  Firefox: policy ImportEnterpriseRoots = true (it then trusts the Windows roots)")
    click.echo("  Chrome/Edge: policy QuicAllowed = false (HTTP/3 would not reach the page); see README.md")


@ca_group.command("init")
@click.option("--name", default="sinkhole block page CA", show_default=True, help="The CA's common name.")
@click.option("--organization", default="", help="The agency's name, in the certificate's subject.")
@click.option("--days", type=click.IntRange(1, 36500), default=3650, show_default=True, help="Validity of the root.")
@click.option("--permit", "permitted", multiple=True, metavar="DOMAIN",
              help="Name constraint: the CA can sign only for DOMAIN and its subdomains (browsers enforce it); "
                   "repeatable [no constraint].")
@click.option("--force", is_flag=True, help="Replace an existing CA (every PC must then trust the new one).")
@_CA_DIR
@pass_env
def ca_init(env: Env, name: str, organization: str, days: int, permitted: tuple[str, ...], force: bool,
            directory: Path | None) -> None:
    """Make a new root CA for the block page (ECDSA P-256; key 0600) and say how to deploy it."""
    from sinkhole.web import certs

    where = _ca_dir(env, directory)
    ca = certs.init_ca(where, name, organization, days, tuple(normalize(p) for p in permitted), force)
    click.echo(f"made CA {ca.describe()}")
    click.echo(f"certificate: {where / certs.CERT_FILE}")
    if permitted:
        click.echo(f"name constraints: it can sign only for {', '.join(ca.permitted or ())} and their subdomains")
    _deploy_hint(where)


@ca_group.command("import")
@click.option("--cert", "cert_file", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The intermediate CA certificate the agency's CA issued (PEM or DER; its chain may follow it).")
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Its private key, unencrypted (PEM or DER).")
@click.option("--chain", "chain_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="The certificates above it, up to the agency's root (PEM).")
@click.option("--force", is_flag=True, help="Replace an existing CA.")
@_CA_DIR
@pass_env
def ca_import(env: Env, cert_file: Path, key_file: Path, chain_file: Path | None, force: bool,
              directory: Path | None) -> None:
    """Use an intermediate CA issued by the agency's own CA (already trusted by its PCs)."""
    from sinkhole.web import certs

    where = _ca_dir(env, directory)
    ca = certs.import_ca(where, cert_file, key_file, chain_file, force)
    click.echo(f"imported CA {ca.describe()}" + (f" with {len(ca.chain)} chain certificates" if ca.chain else ""))
    click.echo(f"key: {where / certs.KEY_FILE} (0600); the original at {key_file} can now be removed")


@ca_group.command("export")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the certificate here [stdout].")
@click.option("--der", is_flag=True, help="DER (binary .cer/.crt, as the Group Policy import takes it) [PEM].")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@_CA_DIR
@pass_env
def ca_export(env: Env, output: Path | None, der: bool, force: bool, directory: Path | None) -> None:
    """The CA certificate (never the key), for Group Policy and the other trust stores."""
    from cryptography.hazmat.primitives import serialization

    from sinkhole.web import certs

    ca = certs.load_ca(_ca_dir(env, directory))
    data = ca.cert.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)
    if output is None:
        if der:
            raise click.BadParameter("DER is binary: give --output FILE", param_hint="--der")
        click.echo(data.decode(), nl=False)
        return
    guard_output(output, force, [*_protected(env, None), _ca_dir(env, directory) / certs.KEY_FILE], "--output")
    output.write_bytes(data)
    click.echo(f"wrote {output}: {ca.describe()}", err=True)


@ca_group.command("show")
@_CA_DIR
@pass_env
def ca_show(env: Env, directory: Path | None) -> None:
    """The CA in use: subject, validity, fingerprint, name constraints."""
    from sinkhole.web import certs

    where = _ca_dir(env, directory)
    ca = certs.load_ca(where)
    click.echo(f"{where}: {ca.describe()}")
    permitted = ca.permitted
    click.echo("name constraints: " + (", ".join(permitted) if permitted is not None
                                       else "none (it may sign any name)"))
    for c in ca.chain:
        click.echo(f"chain: {c.subject.rfc4514_string()}")


# ---------------------------------------------------------------------------- requests (from the block page)


@cli.group("requests")
def requests_group() -> None:
    """Access requests people filed on the block page: list, approve (an allow rule with an expiry), deny."""


REQUEST_COLUMNS = ["id", "time", "status", "client", "grp", "host", "rule", "name", "reason", "ref", "decided_by",
                   "allow_rule", "expires_at"]


@requests_group.command("list")
@click.option("--status", type=click.Choice(["pending", "approved", "denied", "all"]), default="pending",
              show_default=True)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
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
@click.option("--group", "client_group", default=None, callback=_category,
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


# ---------------------------------------------------------------------------- user (web console accounts)
# Accounts of the web console (web_listen): sinkhole.store.accounts keeps them, sinkhole.web.sessions hashes the
# passwords (argon2id). Every change is journaled with the OS account that made it.


@cli.group("user")
def user_group() -> None:
    """Accounts of the web console: viewer (dashboard), auditor (+ log, exports, verification, reports),
    admin (+ policy and accounts)."""


def _new_password(stdin: bool, name: str) -> str:
    from sinkhole.web import sessions

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
    from sinkhole.store.accounts import Accounts

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
    from sinkhole.store.accounts import check_name

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
    from sinkhole.store.accounts import check_name

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
    from sinkhole.store.accounts import check_name

    name = check_name(name)
    with env.existing_store() as store:
        ended = _accounts(store).remove_user(name, Actor())
    click.echo(f"removed account {name}" + (f"; {ended} sessions ended" if ended else ""))


@user_group.command("unlock")
@click.argument("name")
@pass_env
def user_unlock(env: Env, name: str) -> None:
    """Clear NAME's failed logins (an account locks for 15 minutes after 5 in a row)."""
    from sinkhole.store.accounts import check_name

    name = check_name(name)
    with env.existing_store() as store:
        was = _accounts(store).unlock(name, Actor())
    click.echo(f"unlocked {name}" if was else f"{name} was not locked")


@user_group.command("list")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@pass_env
def user_list(env: Env, fmt: str) -> None:
    """Every account: role, last login and from where, failed logins in a row, locked until, open sessions."""
    with env.existing_store() as store:
        rows = _accounts(store).users()
    emit(rows, ["name", "role", "last_login", "last_address", "failures", "locked_until", "sessions",
                "created_at", "created_by"], fmt)


# ---------------------------------------------------------------------------- (end of user)


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
