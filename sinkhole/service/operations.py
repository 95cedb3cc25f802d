"""What an operator does, one function per task, shared by the `sinkhole` CLI and the web console.

The CLI (`sinkhole.cli`) and the console (`sinkhole.web`) are thin: they read their input (options, forms,
JSON), call these, and print or render what comes back. So a behaviour and its checks exist once: the time
forms a filter takes, the rows `log --format csv` writes, what `block add --group` checks, what `log verify`
concludes, how `lists update` treats each source.

Bad input raises `BadValue` (a ConfigError, so exit code 2 at the CLI's edge) naming the field it came in.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from sinkhole.audit import chain
from sinkhole.errors import ConfigError, DomainError, ListFormatError
from sinkhole.model import Action, RuleKind
from sinkhole.policy import lists
from sinkhole.policy.decide import EVERYWHERE, GROUP_PREFIX
from sinkhole.policy.lists import check_regex_budget, regex_rule
from sinkhole.policy.names import is_ip_address, is_regex, normalize
from sinkhole.store.db import Store
from sinkhole.store.journal import Actor
from sinkhole.store.schema import iso_dt


class Stages(Protocol):
    """Where a long operation reports its progress (the CLI's sinkhole.cli.progress.Progress: a bar on a
    terminal): a stage per step it can count, and a callback for the items done, or None when nobody watches."""

    enabled: bool

    def stage(self, label: str, total: int, unit: str) -> Callable[[int], None] | None: ...

    def done(self, finished: bool = True) -> None: ...


class BadValue(ConfigError):
    """A value a person gave is unusable: `field` names where it came from (an option, a form field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# ---------------------------------------------------------------------------- times

_RELATIVE = re.compile(r"(\d+)\s*([smhdw])\Z")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _absolute(text: str) -> datetime:
    when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_when(text: str | None, field: str = "since") -> str | None:
    """'15m', '2h', '7d', '1w' back from now, '2026-11-01' or an ISO 8601 time -> ISO UTC text as the log
    stores it; None for None or ''."""
    if text is None or not text.strip():
        return None
    m = _RELATIVE.match(text.strip().lower())
    try:
        when = (datetime.now(UTC) - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})) if m else _absolute(text)
        return iso_dt(when)
    except ValueError:
        raise BadValue(field, f"{text!r} is neither a duration like 15m/2h/7d nor an ISO 8601 time") from None
    except OverflowError:
        raise BadValue(field, f"{text!r} is out of the range of dates") from None


def parse_expiry(text: str | None, field: str = "expires") -> str | None:
    """'7d', '12h', '2w' from now, or an ISO 8601 time -> ISO UTC text; it must lie in the future."""
    if text is None or not text.strip():
        return None
    m = _RELATIVE.match(text.strip().lower())
    try:
        when = (datetime.now(UTC) + timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})) if m else _absolute(text)
    except (ValueError, OverflowError):
        raise BadValue(field, f"{text!r} is neither a duration like 12h/7d/2w nor an ISO 8601 time in "
                              "range") from None
    if when <= datetime.now(UTC):
        raise BadValue(field, f"{text!r} is not in the future")
    return iso_dt(when)


# ---------------------------------------------------------------------------- names, categories, rules

# a category: letters, digits, '-' and '_'; or a secondary's pulled zone, `rpz:<zone name>`
CATEGORY = re.compile(r"(?:[a-z0-9][a-z0-9_-]{0,62}|rpz:[a-z0-9_-][a-z0-9._-]{0,252})\Z")


def check_category(value: str | None, field: str = "category") -> str | None:
    """A category or group name as given (None passes), or BadValue."""
    if value is not None and not CATEGORY.match(value):
        raise BadValue(field, f"{value!r}: use lower-case letters, digits, '-' and '_'")
    return value


def rule_targets(names: Iterable[str], networks: bool = False) -> list[str]:
    """Normalized names, and `/pattern/` regular expressions; with `networks`, an IP network (CIDR) is
    taken too: a block rule on a network blocks forwarded answers that hold an address in it."""
    out = []
    for n in names:
        if is_regex(n.strip()):  # `/pattern/`: a regular-expression rule, checked when compiled
            out.append(regex_rule(n))
            continue
        address, slash, _ = n.strip().partition("/")
        if networks and slash and is_ip_address(address):
            try:
                out.append(str(ipaddress.ip_network(n.strip(), strict=False)))
                continue
            except ValueError:
                raise DomainError(f"invalid network {n!r}: not an IP network in CIDR form") from None
        out.append(normalize(n))
    return out


def rule_category(category: str | None, client_group: str | None) -> str:
    """The category a rule is filed under: the one given, or a group's own `group:NAME`, or `manual`."""
    if client_group is not None and category is not None:
        raise ConfigError("--group and --category exclude each other: a group's extra rules have their own category")
    if client_group is not None:
        return GROUP_PREFIX + client_group
    return category or EVERYWHERE


def add_rules(store: Store, kind: RuleKind, names: Iterable[str], category: str | None = None,
              client_group: str | None = None, note: str | None = None, expires: str | None = None,
              actor: Actor | None = None) -> tuple[str, list[str], list[str]]:
    """Block or allow `names` (and their subdomains); returns (category, added, already there). One journal
    entry; a running server has them within a second."""
    filed = rule_category(category, client_group)
    targets = rule_targets(names, networks=kind is RuleKind.BLOCK)
    if not targets:
        raise BadValue("names", "give at least one name")
    if client_group is not None and client_group not in {g["name"] for g in store.groups()}:
        raise ConfigError(f"no group {client_group!r}: see `sinkhole group list`")
    if any(is_regex(t) for t in targets):
        stored = store.regex_rules()
        have = set(stored)
        check_regex_budget([r[0] for r in stored],
                           [t for t in dict.fromkeys(targets) if is_regex(t) and (t, kind.value, filed) not in have])
    added, present = store.add_rules(kind, targets, category=filed, note=note or None, expires=expires, actor=actor)
    return filed, added, present


def remove_rules(store: Store, kind: RuleKind, names: Iterable[str], category: str | None = None,
                 client_group: str | None = None, actor: Actor | None = None) -> tuple[list[str], list[str]]:
    """Remove rules for `names` (every category unless one, or a group, is named); (removed, missing)."""
    if client_group is not None:
        category = rule_category(category, client_group)
    targets = rule_targets(names, networks=kind is RuleKind.BLOCK)
    return store.remove_rules(kind, targets, category, actor=actor)


def group_rows(store: Store, categories: list[dict] | None = None) -> list[dict]:
    """store.groups() with, for each, the categories in force (`categories`: store.categories(), read once)."""
    categories = store.categories() if categories is None else categories
    rows = store.groups()
    inherited = [r["category"] for r in categories if r["enabled"] and not r["category"].startswith(GROUP_PREFIX)]
    for r in rows:
        if r["name"] == "default":
            r["networks"] = r["networks"] or ["(every client of no other group)"]
        r["inherits"] = r["categories"] is None
        r["in_force"] = sorted(set(inherited if r["categories"] is None else r["categories"]) | {EVERYWHERE})
    return rows


def networks(values: Iterable[str]) -> list[str]:
    """Client networks as CIDR (a bare address is a /32 or /128)."""
    out = []
    for v in values:
        try:
            out.append(str(ipaddress.ip_network(v.strip(), strict=False)))
        except ValueError:
            raise ConfigError(f"invalid network {v!r}: not an IP address or network in CIDR form") from None
    return out


def group_categories(value: str | None) -> list[str] | None:
    """`a,b,c`; `inherit` = those in force for everyone (None); `none` = []."""
    if value is None or value.strip() == "inherit":
        return None
    if value.strip() == "none":
        return []
    cats = [c.strip() for c in value.split(",") if c.strip()]
    for c in cats:
        if not CATEGORY.match(c):
            raise ConfigError(f"invalid category {c!r}: use lower-case letters, digits, '-' and '_'")
    return cats


# ---------------------------------------------------------------------------- lists


def enable_list(store: Store, category: str, actor: Actor | None = None) -> tuple[bool, int | None, str | None]:
    """Put a category in force; a shipped list not loaded yet (e.g. deepseek-telemetry) is loaded first.
    Returns (changed, rules loaded or None, the shipped file loaded or None)."""
    loaded = source = None
    if not any(r["category"] == category for r in store.categories()):
        shipped = {bl.headers.get("category", bl.name): (src, bl) for src, bl in lists.shipped_lists(False)}
        if category not in shipped:
            raise ConfigError(f"no category {category!r}: see `sinkhole lists show`")
        source, bl = shipped[category]
        _check_regex_budget(store, category, bl, source)  # a shipped list is held to the budget as an import is
        loaded = store.replace_category(category, bl.entries, source, actor=actor)
    changed = store.set_enabled(category, True, actor=actor)
    return changed or loaded is not None, loaded, source


def disable_list(store: Store, category: str, actor: Actor | None = None) -> bool:
    """Take a category out of force (its rules stay stored); False when it was out already."""
    if not any(r["category"] == category for r in store.categories()):
        raise ConfigError(f"no category {category!r}: see `sinkhole lists show`")
    return store.set_enabled(category, False, actor=actor)


def list_rows(store: Store) -> list[dict]:
    """Every category (rules, regexes, source, in force) and the shipped lists not loaded."""
    rows = store.categories()
    shapes = store.rule_shapes()
    for r in rows:
        r["regex"] = (shapes.get(r["category"]) or {}).get("regex") or 0
    known = {r["category"] for r in rows}
    for source, bl in lists.shipped_lists(only_default=False):
        name = bl.headers.get("category", bl.name)
        if name not in known:
            rows.append({"category": name, "block": 0, "allow": 0, "regex": 0, "source": source, "enabled": 0,
                         "disabled_since": "not loaded (sinkhole lists enable " + name + ")"})
    return rows


def read_source(location: str, etag: str | None = None, last_modified: str | None = None):
    """A list source's bytes: a URL (conditional GET when validators are given) or a file."""
    from sinkhole.policy import fetch

    if fetch.is_url(location):
        return fetch.fetch_url(location, etag, last_modified)
    return fetch.read_file(location)


def counts_text(parsed) -> str:
    """'12 rules' or '12 rules (10 block, 2 allow)'."""
    total = len(parsed.entries) + len(parsed.allows)
    text = f"{total} rules"
    return text + (f" ({len(parsed.entries)} block, {len(parsed.allows)} allow)" if parsed.allows else "")


@dataclass(frozen=True)
class ListRead:
    """A list fetched and checked whole, not stored yet: what `store_list` puts in force."""

    source: str  # as the person gave it
    location: str  # a URL, or a file's absolute path (for `lists update`)
    category: str
    parsed: object  # lists.BlockList
    got: object  # fetch.Fetched

    @property
    def summary(self) -> str:
        return counts_text(self.parsed)

    @property
    def format(self) -> str:
        return self.parsed.format  # type: ignore[attr-defined]


def _parse(text: str, source: str, fmt: str, progress: Stages | None, prefix: str = "") -> lists.BlockList:
    """lists.parse with a bar for each pass over the text: the look for its format (`auto` only), then the check
    of every line."""
    if progress is None:
        return lists.parse(text, source, fmt)
    lines = lists.line_count(text)
    detected = lists.detect_format(text, progress.stage(f"{prefix}format", lines, "lines")) if fmt == "auto" else None
    return lists.parse(text, source, fmt, progress.stage(f"{prefix}checking", lines, "lines"), detected)


def read_list(source: str, category: str | None = None, fmt: str = "auto", files: bool = True,
              progress: Stages | None = None) -> ListRead:
    """Fetch a list file or http(s) URL and check it whole (ListFormatError names the bad line). `files`: a
    path is taken too (the CLI; the console takes URLs only). `progress`: the CLI's bar. Nothing is written."""
    from sinkhole.policy import fetch  # urllib.request, http.client and ssl: only to fetch a list

    if fetch.is_url(source):
        location = source
        default_name = Path(urlsplit(source).path).stem
    elif fetch.has_scheme(source) or not files:
        raise ConfigError(f"{source}: only http:// and https:// URLs" + (", or a file path" if files else ""))
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{source}: no such file" + (" (a directory)" if path.is_dir() else ""))
        location = str(path.resolve())
        default_name = path.stem
    if fmt not in lists.FORMATS:
        raise BadValue("format", f"{fmt!r} is not one of {', '.join(lists.FORMATS)}")
    got = read_source(location)
    assert got.body is not None
    text = lists.decode(got.body, source)
    parsed = _parse(text, source, fmt, progress)  # errors name what the user typed
    if progress is not None:
        progress.done()
    name = category or parsed.headers.get("category") or default_name
    if not CATEGORY.match(name):
        raise ConfigError(f"{name!r} cannot be a category name: give one with --category")
    return ListRead(source, location, name, parsed, got)


def store_list(store: Store, read: ListRead, fmt: str = "auto", actor: Actor | None = None,
               progress: Stages | None = None) -> int:
    """Make the category hold exactly the list's rules, in one transaction, and record its source for
    `update_lists`; returns the number of rules."""
    parsed, got = read.parsed, read.got
    _check_regex_budget(store, read.category, parsed, read.source)
    total = len(parsed.entries) + len(parsed.allows)  # type: ignore[attr-defined]
    storing = progress.stage("storing", total, "rules") if progress is not None else None
    # files: the sources row keeps the absolute path (for `lists update`), the rules the path as typed
    return store.import_list(read.category, parsed.entries, parsed.allows, read.location, fmt,  # type: ignore
                             got.sha256 or "", got.etag, got.last_modified, rule_source=read.source,  # type: ignore
                             actor=actor, progress=storing)


def _check_regex_budget(store: Store, category: str, parsed, source: str) -> None:
    """ListFormatError (with the line) when the list's regex rules, with those of the other categories, go over
    the regex budget (policy.regexcost): nothing is written and the category's rules stay in force."""
    if parsed.regex_lines:
        check_regex_budget([r[0] for r in store.regex_rules(but=category)],
                           [d for d, _ in (*parsed.entries, *parsed.allows) if is_regex(d)], parsed, source)


@dataclass(frozen=True)
class SourceResult:
    category: str
    location: str
    ok: bool
    text: str  # what happened, for a person: 'unchanged (304 Not Modified) URL', 'failed, ...: reason'


def update_lists(store: Store, categories: Iterable[str] | None = None, actor: Actor | None = None,
                 progress: Stages | None = None) -> Iterator[SourceResult]:
    """Fetch every recorded source again (or those of `categories`) and replace the lists that changed, one
    result per source as it is done. A source that fails keeps its rules in force; the others go on."""
    from sinkhole.policy import fetch

    wanted = list(categories or [])
    sources = store.sources(wanted or None)
    missing = sorted(set(wanted) - {s["category"] for s in sources})
    if missing:
        raise ConfigError(f"no recorded source for {', '.join(missing)}: import it first"
                          " (sinkhole lists import FILE|URL --category NAME)")
    for src in sources:
        name, location = src["category"], src["location"]
        try:
            got = read_source(location, src["etag"], src["last_modified"])
            if got.status == 304:
                store.touch_source(name, got.etag, got.last_modified)
                yield SourceResult(name, location, True, f"unchanged (304 Not Modified) {location}")
                continue
            assert got.body is not None
            if got.sha256 == src["sha256"]:
                store.touch_source(name, got.etag, got.last_modified)
                yield SourceResult(name, location, True, f"unchanged (same content) {location}")
                continue
            text = lists.decode(got.body, location)
            storing = None
            parsed = _parse(text, location, src["format"] or "auto", progress, f"{name}: ")
            _check_regex_budget(store, name, parsed, location)
            if progress is not None:
                storing = progress.stage(f"{name}: storing", len(parsed.entries) + len(parsed.allows), "rules")
            store.import_list(name, parsed.entries, parsed.allows, location, src["format"] or "auto",
                              got.sha256 or "", got.etag, got.last_modified, action="lists update", actor=actor,
                              progress=storing)
            if progress is not None:
                progress.done()
            yield SourceResult(name, location, True, f"updated, {counts_text(parsed)} ({parsed.format}), was "
                                                     f"{src['rules']} {location}")
        except (fetch.FetchError, ListFormatError) as exc:
            if progress is not None:
                progress.done(finished=False)
            yield SourceResult(name, location, False, f"failed, rules in force unchanged: {exc}")


# ---------------------------------------------------------------------------- access requests


def approve_request(store: Store, ident: int, expires: str, client_group: str | None = None,
                    domain: str | None = None, actor: Actor | None = None) -> tuple[dict, str, str]:
    """Approve request `ident`: an allow rule for the host asked (or `domain`), for the client's group (or
    `client_group`), until `expires` (ISO UTC); journaled. Returns (the request as decided, group, name)."""
    req = store.request(ident)
    group = client_group or req["grp"] or "default"
    name = normalize(domain) if domain else req["host"]
    return store.decide_request(ident, True, actor=actor, group=group, domain=name, expires=expires), group, name


# ---------------------------------------------------------------------------- the audit log

# count: how many identical answers the row stands for (audit_window), the first at `time`
LOG_TABLE_COLUMNS = ["time", "client", "transport", "qname", "qtype", "action", "count", "rule", "answer"]
LOG_COLUMNS = ["seq", "time", "client", "transport", "qname", "qtype", "action", "rule", "category", "rcode",
               "answer", "policy_version", "upstream", "latency_ms", "node", "grp", "asked", "list", "count"]
ACTIONS = tuple(a.value for a in Action)


@dataclass(frozen=True)
class LogFilter:
    """The filters `sinkhole log` and the console's log page take, checked and normalized (see `parse`)."""

    since: str | None = None  # ISO UTC
    until: str | None = None  # ISO UTC, exclusive
    client: str | None = None  # an address, or a network in CIDR form
    domain: str | None = None  # a name and its subdomains
    action: str | None = None
    group: str | None = None
    category: str | None = None
    rule: str | None = None

    @classmethod
    def parse(cls, since: str | None = None, until: str | None = None, client: str | None = None,
              domain: str | None = None, action: str | None = None, group: str | None = None,
              category: str | None = None, rule: str | None = None) -> LogFilter:
        """From what a person typed (empty strings count as not given): times as `parse_when` reads them, the
        client as an address or CIDR, the name normalized (DomainError); BadValue names the field that is wrong."""
        def given(v: str | None) -> str | None:
            return v.strip() if v is not None and v.strip() else None

        client = given(client)
        if client:
            try:
                client = (str(ipaddress.ip_network(client, strict=False)) if "/" in client
                          else str(ipaddress.ip_address(client)))
            except ValueError:
                raise BadValue("client", f"{client!r} is not an IP address or CIDR") from None
        domain = given(domain)
        if domain:
            domain = normalize(domain)  # DomainError, as everywhere a name is given
        action = given(action)
        if action and action not in ACTIONS:
            raise BadValue("action", f"{action!r} is not one of {', '.join(ACTIONS)}")
        return cls(parse_when(given(since), "since"), parse_when(given(until), "until"), client, domain, action,
                   given(group), given(category), given(rule))

    def kwargs(self) -> dict:
        """As Store.query_log / count_log take them."""
        return {"since": self.since, "until": self.until, "client": self.client, "domain": self.domain,
                "action": self.action, "group": self.group, "category": self.category, "rule": self.rule}


def csv_text(rows: Iterable[dict], columns: list[str], header: bool = True) -> str:
    """Rows as `sinkhole log --format csv` writes them (one header line unless `header` is False)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def json_line(row: dict) -> str:
    """One row as `--format json` (JSON Lines) writes it, without the newline."""
    return json.dumps(row, ensure_ascii=False, default=str)


# ---------------------------------------------------------------------------- the change journal


def change_row(entry: dict, domains_as_list: bool = True) -> dict:
    """A journal entry as `sinkhole changes` shows it: with `what` (the names and the detail, in short)."""
    try:
        domains = json.loads(entry.get("domains") or "[]")
    except ValueError:
        domains = []
    if not isinstance(domains, list):
        domains = []
    parts = []
    if domains:
        shown = ", ".join(map(str, domains[:5])) + (f" (+{len(domains) - 5} more)" if len(domains) > 5 else "")
        parts.append(f"{len(domains)} {'name' if len(domains) == 1 else 'names'}: {shown}")
    if entry.get("detail"):
        parts.append(str(entry["detail"]))
    return {"id": entry["id"], "time": entry["time"], "user": entry["user"], "sudo_user": entry["sudo_user"],
            "host": entry["host"], "command": entry["command"], "action": entry["action"], "kind": entry["kind"],
            "category": entry["category"], "count": len(domains),
            "domains": domains if domains_as_list else " ".join(map(str, domains)), "detail": entry["detail"],
            "what": "; ".join(parts), "sealed": entry.get("mac") is not None}


# ---------------------------------------------------------------------------- verification


@dataclass
class Verification:
    """What `log verify` concludes about one database: lines for a person (kind: 'ok', 'pruned', 'note',
    'info' or 'BAD'), the problems, and per chain the first bad row."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    first_bad: dict[str, str] = field(default_factory=dict)  # chain -> its problem (the first bad row)
    chains: int = 0
    rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def summary(self) -> str:
        if self.problems:
            return f"verification failed: {len(self.problems)} problems in {self.chains} chains and the journal"
        return f"verified: {self.chains} chains, {self.rows} rows"


def verify(store: Store, generation: int, secret: bytes, anchor: dict | None = None,
           current: tuple[int, bytes] | None = None, progress: Stages | None = None) -> Verification:
    """Walk every chain of the audit log and the change journal with the operator's key (generation, secret);
    `current`: the server's key file now, when it can be read (see sinkhole.audit.chain.verify)."""
    out = Verification()
    say = out.lines.append
    advance = None
    if progress is not None and progress.enabled:
        rows = store.count_log()
        advance = progress.stage("verifying", rows, "rows")
    report = chain.verify(store, generation, secret, anchor, current, advance)
    if progress is not None:
        progress.done()
    journal = chain.verify_journal(store, generation, secret)
    if report.before_chain:
        say(("info", f"{report.before_chain} rows from before the chain started (written without a MAC: not "
                     "covered)"))
    bad = {name for name, _ in report.problems}
    for name, w in sorted(report.chains.items()):
        if name in bad:
            continue
        pruned = (f" (links 0..{w.pruned_below - 1} pruned: checkpoint seq {w.checkpoint_seq})"
                  if w.pruned_below else "")
        say(("ok", f"chain {name}: {w.rows} rows, links {w.pruned_below}..{w.expected - 1}, last seq "
                   f"{w.last_seq} at {w.last_time}{pruned}"))
    for name, (links, seq) in sorted(report.pruned.items()):
        say(("pruned", f"chain {name}: links 0..{links - 1} pruned whole (checkpoint seq {seq})"))
    if report.gone_generations:
        say(("pruned", "the chains of key generations " + ", ".join(
            f"{lo}..{hi}" if lo != hi else str(lo) for lo, hi in report.gone_generations) + " (checkpoints)"))
    out.first_bad = {name: problem for name, problem in report.problems if name is not None}
    problems = [p for _, p in report.problems]
    if journal.problem:
        problems.append(journal.problem)
        out.first_bad.setdefault("journal", journal.problem)
    elif journal.entries:
        say(("ok", f"journal: {journal.entries} entries (ids {journal.first_id}..{journal.last_id}), "
                   f"{journal.sealed} sealed" + (f", {journal.before} from before the journal was chained"
                                                 if journal.before else "")))
    if journal.last_id is None and report.max_policy_version:
        say(("note", f"audit rows say policy version {report.max_policy_version} was in force, but the journal "
                     "is empty (a database written without the CLI, or every journal entry deleted)"))
    elif report.max_policy_version > (journal.last_id or 0):
        problems.append(f"journal: audit rows say policy version {report.max_policy_version} was in force, but "
                        f"the journal ends at id {journal.last_id}: its newest entries were deleted")
    for problem in problems:
        say(("BAD", problem))
    if not report.anchored:
        say(("note", "without --anchor a tail cut off the end of a chain cannot be told"))
    out.problems = problems
    out.chains = len(report.chains)
    out.rows = sum(w.rows for w in report.chains.values())
    return out
