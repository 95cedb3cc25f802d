"""Block list files: parsing hosts, domains, adblock and RPZ lists (whole file or nothing), and the
lists shipped in blocklists/."""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.ttl

from sinkhole.errors import DomainError, ListFormatError
from sinkhole.policy.decide import compile_regex
from sinkhole.policy.names import is_ip_address, is_regex, normalize
from sinkhole.policy.regexcost import RegexBudget

HOSTS_SINKS = {"0.0.0.0", "127.0.0.1", "::", "::1", "0:0:0:0:0:0:0:0"}
# names on the usual preamble lines of a hosts file (`127.0.0.1 localhost`, `ff02::1 ip6-allnodes` ...)
HOSTS_PREAMBLE = {"localhost", "localhost.localdomain", "broadcasthost", "local", "ip6-localhost",
                  "ip6-loopback", "ip6-localnet", "ip6-mcastprefix", "ip6-allnodes", "ip6-allrouters",
                  "ip6-allhosts"}
FORMATS = ("auto", "hosts", "domains", "adblock", "rpz")
RPZ_UNSUPPORTED_TRIGGERS = {
    "rpz-nsdname": "rpz-nsdname (name server name) triggers",
    "rpz-nsip": "rpz-nsip (name server address) triggers",
    "rpz-client-ip": "rpz-client-ip (client address) triggers",
}
RPZ_UNSUPPORTED_ACTIONS = {"rpz-drop": "rpz-drop (drop the query)", "rpz-tcp-only": "rpz-tcp-only (force TCP)"}
MAX_REGEX = 1024  # characters between the slashes: rules are matched against every forwarded name
PROGRESS_LINES = 10_000  # a parse reports its progress every this many lines
Advance = Callable[[int], None] | None  # called with the number of lines read since its last call


@dataclass
class BlockList:
    """A parsed list: its header fields, its block entries and its allow entries as (domain, note) pairs.

    A domain is a name (the rule covers it and its subdomains), an IP network in CIDR form (answers
    holding an address in it are blocked) or `/pattern/` (a regular expression over the name).
    `format` is the format the text was read as (what `auto` decided).
    """

    name: str
    entries: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    allows: list[tuple[str, str]] = field(default_factory=list)
    format: str = "domains"
    regex_lines: dict[str, int] = field(default_factory=dict)  # `/pattern/` -> its line, for budget errors

    @property
    def default_on(self) -> bool:
        return self.headers.get("default", "on").lower() not in ("off", "no", "false")


def regex_rule(text: str) -> str:
    """`/pattern/` checked with RE2 (the syntax the policy matches with: policy.compile_regex), returned as
    stored (slashes included); DomainError if it is not one, or if its RE2 program alone is over
    regexcost.REGEX_PROGRAM_MAX."""
    regex_size(text)
    return text.strip()


def regex_size(text: str) -> int:
    """The RE2 program size (instructions) of a `/pattern/` rule; DomainError as regex_rule says."""
    text = text.strip()
    pattern = text[1:-1]
    if not is_regex(text) or not pattern:
        raise DomainError(f"invalid regex rule {text!r}: write it as /pattern/")
    if len(pattern) > MAX_REGEX:
        raise DomainError(f"invalid regex rule {text[:40]!r}...: over {MAX_REGEX} characters")
    try:
        size = compile_regex(pattern).programsize
    except ValueError as exc:
        raise DomainError(f"invalid regex rule {text!r}: {exc} (RE2 syntax: no backreferences or lookaround)") from None
    try:
        RegexBudget().check_one(size)
    except ValueError as exc:
        raise DomainError(f"regex rule {text!r} refused: {exc}") from None
    return size


def check_regex_budget(stored: Iterable[str], new: Iterable[str], listed: BlockList | None = None,
                       source: str = "") -> None:
    """DomainError naming the first of the `new` `/pattern/` rules that would take the regex rules past their
    budget (regexcost), counted with the `stored` ones (those the new rules do not replace); ListFormatError
    with its line when the new rules are the list `listed` read from `source`."""
    budget = RegexBudget(_stored_size(r) for r in stored)
    for text in new:
        try:
            budget.take(regex_size(text))
        except ValueError as exc:
            reason = f"regex rule {text!r} refused: {exc}"
            if listed is not None:
                raise ListFormatError(source, listed.regex_lines.get(text, 0), reason) from None
            raise DomainError(reason) from None
        except DomainError as exc:
            if listed is not None:
                raise ListFormatError(source, listed.regex_lines.get(text, 0), str(exc)) from None
            raise


def _stored_size(text: str) -> int:
    """A stored rule's share of the budget: 0 for one the policy leaves out (RE2 cannot take it, or too large)."""
    try:
        return regex_size(text)
    except DomainError:
        return 0


# ---------------------------------------------------------------------------- format detection

_RPZ_DIRECTIVE = re.compile(r"\$(ORIGIN|TTL|INCLUDE|GENERATE)\b", re.I)
# a resource record as RPZ zones hold them: OWNER [TTL] [CLASS] [TTL] TYPE RDATA; A and AAAA count
# only with an address after them, so that `not a domain` in a broken plain list stays a plain line
_RPZ_RECORD = re.compile(r"\S*\s+(\d\w*\s+)?(IN\s+)?(\d\w*\s+)?(?:(SOA|NS|CNAME|DNAME)\s|(A|AAAA)\s+(\S+))",
                         re.I)


def _looks_like_record(line: str) -> bool:
    m = _RPZ_RECORD.match(line + " ")
    return bool(m) and (m.group(4) is not None or is_ip_address(m.group(6) or ""))


def detect_format(text: str, progress: Advance = None) -> str:
    """What `--format auto` reads a text as: rpz, adblock, hosts or domains.

    An RPZ zone has `$ORIGIN`/`$TTL` directives or resource records (`name CNAME .`, an SOA);
    an adblock list has `||name^`, `@@` exceptions, `/regex/` rules, `!` comments or an
    `[Adblock Plus]` header; a hosts file has lines that start with an address. `progress` is
    called as lines are looked at, line_count(text) in all (the rest at once when an RPZ line ends
    the look early).
    """
    total = line_count(text)
    reported = 0
    found = ""
    hosts = adblock = False
    for number, raw in enumerate(text.splitlines(), 1):
        if progress is not None and number - reported >= PROGRESS_LINES:
            progress(min(number, total) - reported)
            reported = min(number, total)
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        fields = line.split()
        first = fields[0]
        address = is_ip_address(first.split("%")[0])
        # a record is an owner and a type at least: a line of one field (a plain list's) is none
        if _RPZ_DIRECTIVE.match(line) or (not address and len(fields) > 1 and _looks_like_record(line)):
            found = "rpz"
            break
        if line[0] in "![" or line.startswith(("||", "@@")) or is_regex(first):
            adblock = True
        elif address:
            hosts = True
    if progress is not None and total > reported:
        progress(total - reported)
    return found or ("adblock" if adblock else "hosts" if hosts else "domains")


# ---------------------------------------------------------------------------- hosts, domains, adblock


class _Rules:
    """Entries as they are read: duplicates dropped, a name both blocked and allowed kept as both."""

    def __init__(self, result: BlockList) -> None:
        self.result = result
        self.seen: dict[str, set[str]] = {"block": set(), "allow": set()}
        self.regexes = RegexBudget()  # the list's own: a list over it is refused at the line that goes over

    def add(self, kind: str, domain: str, note: str) -> None:
        if domain in self.seen[kind]:
            return
        self.seen[kind].add(domain)
        (self.result.entries if kind == "block" else self.result.allows).append((domain, note))


def _header(result: BlockList, line: str) -> None:
    """`# key: value` (or `! key: value`) before the first entry is a header."""
    if result.entries or result.allows or ":" not in line:
        return
    key, _, value = line[1:].partition(":")
    if key.strip() and " " not in key.strip():
        result.headers.setdefault(key.strip().lower(), value.strip())


def _name(text: str, source: str, number: int) -> str:
    try:
        return normalize(text)
    except DomainError as exc:
        raise ListFormatError(source, number, str(exc)) from None


def _parse_lines(text: str, source: str, fmt: str, result: BlockList, progress: Advance = None) -> None:
    """hosts, domains and adblock lists; `auto` takes each line in whichever of the three forms it has."""
    rules = _Rules(result)
    comments = "#!" if fmt in ("adblock", "auto") else "#"
    number = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if progress is not None and number % PROGRESS_LINES == 0:
            progress(PROGRESS_LINES)
        line = raw.strip()
        if not line or line[0] in comments:
            if line[:1] in ("#", "!"):
                _header(result, line)
            continue
        if fmt in ("adblock", "auto") and line.startswith("[") and line.endswith("]"):
            continue  # `[Adblock Plus 2.0]`
        if fmt in ("adblock", "auto") and (line.startswith(("||", "@@")) or is_regex(line.split("#")[0].strip())):
            _adblock_line(line, source, number, rules)
            continue
        body, _, comment = line.partition("#")
        comment = comment.strip()
        tokens = body.split()
        if not tokens:
            continue
        if is_ip_address(tokens[0].split("%")[0]):  # hosts: ADDRESS NAME [NAME ...]
            if fmt in ("domains", "adblock"):
                raise ListFormatError(source, number, f"a hosts line ({tokens[0]} ...) in a list read as {fmt}")
            if len(tokens) < 2:
                raise ListFormatError(source, number, f"hosts line holds an address and no name: {body.strip()!r}")
            names = [t for t in tokens[1:] if t.lower() not in HOSTS_PREAMBLE and not is_ip_address(t)]
            if not names:
                continue  # `127.0.0.1 localhost`, `ff02::1 ip6-allnodes`, `0.0.0.0 0.0.0.0`
            if tokens[0] not in HOSTS_SINKS:
                raise ListFormatError(source, number, f"hosts entry maps to {tokens[0]}, not a sink address")
            for name in names:
                rules.add("block", _name(name, source, number), comment)
            continue
        if fmt == "hosts":
            raise ListFormatError(source, number, f"expected an address and a name (hosts form), got {body.strip()!r}")
        if len(tokens) != 1:
            raise ListFormatError(source, number, f"expected one domain per line, got {body.strip()!r}")
        name = tokens[0]
        if name.startswith("|") and fmt == "domains":
            raise ListFormatError(source, number, f"an adblock rule ({name}) in a list read as domains")
        if name.startswith("*.") and fmt != "adblock":
            name = name[2:]  # `*.name`: the wildcard lists' form; our rule on `name` covers its subdomains
        rules.add("block", _name(name, source, number), comment)
    if progress is not None:
        progress(number % PROGRESS_LINES)
    if not result.entries and not result.allows:
        raise ListFormatError(source, 0, "the list holds no domain")


def _adblock_line(line: str, source: str, number: int, rules: _Rules) -> None:
    """`||name^`, `@@||name^` (an exception: allow rule), `/regex/` and `@@/regex/`."""
    kind = "block"
    rule = line
    if rule.startswith("@@"):
        kind, rule = "allow", rule[2:]
    comment = ""
    if not is_regex(rule) and "#" in rule:
        rule, _, comment = rule.partition("#")
        rule, comment = rule.strip(), comment.strip()
    if is_regex(rule):
        rule = rule.strip()
        try:
            size = regex_size(rule)
            if rule not in rules.seen[kind]:
                try:
                    rules.regexes.take(size)
                except ValueError as exc:
                    raise DomainError(f"regex rule {rule!r} refused: {exc}") from None
        except DomainError as exc:
            raise ListFormatError(source, number, str(exc)) from None
        rules.result.regex_lines.setdefault(rule, number)
        rules.add(kind, rule, comment)
        return
    if not rule.startswith("||"):
        raise ListFormatError(source, number, f"adblock rule {line!r}: expected ||name^ or /regex/")
    if "$" in rule:
        raise ListFormatError(source, number, f"adblock rule {line!r}: modifiers (${rule.partition('$')[2]})"
                                              " are not supported")
    if not rule.endswith("^"):
        raise ListFormatError(source, number, f"adblock rule {rule!r} must end with '^'")
    name = rule[2:-1]
    if "*" in name or "/" in name:
        raise ListFormatError(source, number, f"adblock rule {rule!r}: only a host name may stand between || and ^")
    rules.add(kind, _name(name, source, number), comment)


# ---------------------------------------------------------------------------- RPZ


def _strip_zone_comment(line: str) -> tuple[str, str]:
    """(text, comment) of a zone-file line: `;` starts a comment outside quotes."""
    quoted = escaped = False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            return line[:i], line[i + 1:].strip()
    return line, ""


def _paren_depth(text: str) -> int:
    depth = 0
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif not quoted:
            depth += (ch == "(") - (ch == ")")
    return depth


def _zone_records(text: str, source: str):
    """(line number, starts with blank, text without parentheses, comment) of each logical line."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start = i + 1
        body, comment = _strip_zone_comment(lines[i])
        blank_owner = lines[i][:1] in (" ", "\t")
        depth = _paren_depth(body)
        while depth > 0:
            i += 1
            if i >= len(lines):
                raise ListFormatError(source, start, "unbalanced parentheses: '(' is never closed")
            more, extra = _strip_zone_comment(lines[i])
            body += " " + more
            comment = comment or extra
            depth = _paren_depth(body)
        if depth < 0:
            raise ListFormatError(source, start, "unbalanced parentheses: ')' with no '('")
        i += 1
        body = body.replace("(", " ").replace(")", " ") if "(" in body or ")" in body else body
        yield start, blank_owner, body, comment  # body "" for a comment line


def _rpz_ip(labels: list[str], source: str, number: int) -> str:
    """`32.1.2.0.192.rpz-ip` -> 192.0.2.1/32; `48.zz.db8.2001.rpz-ip` -> 2001:db8::/48."""
    shown = ".".join(labels)
    parts = labels[:-1]
    if len(parts) < 2 or not parts[0].isdigit():
        raise ListFormatError(source, number, f"rpz-ip trigger {shown!r}: expected PREFIX.ADDRESS-REVERSED.rpz-ip")
    prefix = int(parts[0])
    words = list(reversed(parts[1:]))
    if len(words) == 4 and "zz" not in words and all(w.isdigit() for w in words):
        address = ".".join(words)
    elif words.count("zz") == 1:
        at = words.index("zz")
        address = ":".join(words[:at]) + "::" + ":".join(words[at + 1:])
    elif len(words) == 8:
        address = ":".join(words)
    else:
        raise ListFormatError(source, number, f"rpz-ip trigger {shown!r}: not an IPv4 address (4 numbers) or an"
                                              " IPv6 address (8 words, or zz for ::)")
    try:
        return str(ipaddress.ip_network(f"{address}/{prefix}", strict=True))
    except ValueError as exc:
        raise ListFormatError(source, number, f"rpz-ip trigger {shown!r} ({address}/{prefix}): {exc}") from None


def _parse_rpz(text: str, source: str, result: BlockList, progress: Advance = None) -> None:
    """A Response Policy Zone (draft-vixie-dnsop-dns-rpz) as BIND and Unbound read it.

    Triggers: QNAME (`name`, `*.name`) and `rpz-ip` (answer addresses); both `name` and `*.name`
    become the rule `name`, which covers the name and its subdomains. Actions: `CNAME .`
    (NXDOMAIN), `CNAME *.` (NODATA), local data (A, AAAA, TXT ...) and a CNAME to another name
    become block rules; `CNAME rpz-passthru.` an allow rule. Name-server and client triggers,
    and the drop and tcp-only actions, cannot be expressed: the file is rejected.
    """
    rules = _Rules(result)
    kinds: dict[str, tuple[str, int]] = {}  # rule -> (kind, line): one action per rule
    origin: dns.name.Name | None = None
    apex: dns.name.Name | None = None
    owner: str | None = None  # the previous record's owner, for records with a blank owner
    reported = 0  # lines read up to the last progress report
    for number, blank_owner, body, comment in _zone_records(text, source):
        if progress is not None and number - reported >= PROGRESS_LINES:
            progress(number - reported)
            reported = number
        tokens = body.split()
        if not tokens:
            if comment:
                _header(result, ";" + comment)  # `; category: NAME` before the first record
            continue
        head = tokens[0].upper()
        if head.startswith("$") and not blank_owner:
            if head == "$ORIGIN":
                if len(tokens) != 2 or not tokens[1].endswith("."):
                    raise ListFormatError(source, number, "$ORIGIN takes one absolute name (ending with '.')")
                try:
                    origin = dns.name.from_text(tokens[1])
                except dns.exception.DNSException as exc:
                    raise ListFormatError(source, number, f"$ORIGIN {tokens[1]}: {exc}") from None
                apex = apex or origin
            elif head == "$TTL":
                if len(tokens) != 2 or not _is_ttl(tokens[1]):
                    raise ListFormatError(source, number, "$TTL takes one TTL")
            else:
                raise ListFormatError(source, number, f"{tokens[0]} is not supported (only $ORIGIN and $TTL)")
            continue
        if blank_owner:
            if owner is None:
                raise ListFormatError(source, number, "a record with no owner name and none before it")
        else:
            owner = tokens.pop(0)
        for _ in range(2):  # [TTL] [CLASS] in either order
            if tokens and (_is_ttl(tokens[0]) or tokens[0].upper() in ("IN", "CH", "HS")):
                if tokens[0].upper() in ("CH", "HS"):
                    raise ListFormatError(source, number, f"class {tokens[0]}: a policy zone is class IN")
                tokens.pop(0)
        if not tokens:
            raise ListFormatError(source, number, f"record for {owner} has no type")
        try:
            rdtype = dns.rdatatype.from_text(tokens[0])
        except dns.exception.DNSException:
            raise ListFormatError(source, number, f"unknown record type {tokens[0]!r}") from None
        rdata_text = body[_token_end(body, len(body.split()) - len(tokens)):].strip()
        try:
            rdata = dns.rdata.from_text(dns.rdataclass.IN, rdtype, rdata_text, origin=origin or dns.name.root,
                                        relativize=False)
        except dns.exception.DNSException as exc:
            raise ListFormatError(source, number, f"{tokens[0]} {rdata_text!r}: {exc}") from None
        if rdtype in (dns.rdatatype.SOA, dns.rdatatype.NS):
            if rdtype == dns.rdatatype.SOA and apex is None and owner.endswith("."):
                apex = _zone_name(owner, None, source, number)
            continue
        labels = _relative_labels(owner, origin, apex, source, number)
        if not labels:
            raise ListFormatError(source, number, f"{tokens[0]} record at the zone apex: only SOA and NS belong there")
        what = f"{owner} {tokens[0].upper()} {rdata_text}".strip()
        kind = _rpz_action(rdtype, rdata, what, source, number)
        last = labels[-1]
        if last in RPZ_UNSUPPORTED_TRIGGERS:
            raise ListFormatError(source, number, f"{what}: {RPZ_UNSUPPORTED_TRIGGERS[last]} are not supported"
                                                  " (sinkhole decides on query names and answer addresses only)")
        if last == "rpz-ip":
            rule = _rpz_ip(labels, source, number)
            if kind == "allow":
                raise ListFormatError(source, number, f"{what}: passthru for an rpz-ip trigger is not supported"
                                                      " (network rules are block rules only)")
        else:
            if labels[0] == "*":
                labels = labels[1:]
                if not labels:
                    raise ListFormatError(source, number, f"{what}: a wildcard over the whole zone blocks every name")
            if labels[-1].startswith("rpz-"):  # rpz-ip-like triggers this draft version does not know
                raise ListFormatError(source, number, f"{what}: unknown RPZ trigger {labels[-1]!r}")
            rule = _name(".".join(labels), source, number)
        previous = kinds.get(rule)
        if previous is not None and previous[0] != kind:
            raise ListFormatError(source, number, f"{what}: {kind} for {rule} conflicts with the {previous[0]} at line"
                                                  f" {previous[1]} (a sinkhole rule covers a name and its"
                                                  " subdomains alike)")
        kinds.setdefault(rule, (kind, number))
        rules.add(kind, rule, comment or f"rpz: {what}")
    if progress is not None:
        progress(line_count(text) - reported)
    if not result.entries and not result.allows:
        raise ListFormatError(source, 0, "the zone holds no policy record")


def _is_ttl(token: str) -> bool:
    if not token[:1].isdigit():
        return False
    try:
        dns.ttl.from_text(token)
    except dns.exception.DNSException:
        return False
    return True


def _token_end(body: str, index: int) -> int:
    """Offset just after the index-th whitespace-separated token of body."""
    return list(re.finditer(r"\S+", body))[index].end()


def _zone_name(text: str, origin: dns.name.Name | None, source: str, number: int) -> dns.name.Name:
    try:
        return dns.name.from_text(text, origin)
    except dns.exception.DNSException as exc:
        raise ListFormatError(source, number, f"owner name {text!r}: {exc}") from None


def _relative_labels(owner: str, origin: dns.name.Name | None, apex: dns.name.Name | None,
                     source: str, number: int) -> list[str]:
    """The owner's labels below the policy zone's apex, lower case."""
    if owner == "@":
        if origin is None:
            return []
        name = origin
    elif owner.endswith(".") or origin is not None:
        name = _zone_name(owner, origin, source, number)
    else:  # no $ORIGIN: relative names are relative to the apex, wherever it is
        name = _zone_name(owner, None, source, number)
        return [label.decode("ascii", "replace").lower() for label in name.labels]
    if apex is None:
        raise ListFormatError(source, number, f"absolute owner name {owner!r} with no $ORIGIN (or SOA) to say"
                                              " where the policy zone starts")
    if not name.is_subdomain(apex):
        raise ListFormatError(source, number, f"{owner!r} is not under the policy zone {apex}")
    return [label.decode("ascii", "replace").lower() for label in name.relativize(apex).labels]


def _rpz_action(rdtype: int, rdata, what: str, source: str, number: int) -> str:
    """block or allow, for the record's action."""
    if rdtype == dns.rdatatype.DNAME:
        raise ListFormatError(source, number, f"{what}: DNAME is not an RPZ action")
    if rdtype != dns.rdatatype.CNAME:
        return "block"  # local data: the name gets an answer of the zone's choosing
    target = rdata.target
    if target == dns.name.root or target.labels == (b"*", b""):
        return "block"  # NXDOMAIN, NODATA
    first = target.labels[0].decode("ascii", "replace").lower()
    if len(target.labels) == 2 and first == "rpz-passthru":
        return "allow"
    if len(target.labels) == 2 and first in RPZ_UNSUPPORTED_ACTIONS:
        raise ListFormatError(source, number, f"{what}: the action {RPZ_UNSUPPORTED_ACTIONS[first]} is not"
                                              " supported")
    return "block"  # a CNAME to another name: a walled garden; sinkholed here


# ---------------------------------------------------------------------------- entry points


def line_count(text: str) -> int:
    """The number of lines `parse` reads (the total of its progress)."""
    return text.count("\n") + (1 if text and not text.endswith("\n") else 0)


def parse(text: str, source: str, fmt: str = "auto", progress: Advance = None,
          detected: str | None = None) -> BlockList:
    """Parse a list; raise ListFormatError (source, line number, reason) on the first bad line.

    Formats: `domains` (one name a line), `hosts` (`0.0.0.0 name ...`), `adblock` (`||name^`,
    `@@||name^` exceptions, `/regex/`), `rpz` (a Response Policy Zone file), or `auto`, which
    reads an RPZ zone as `rpz` and anything else a line at a time in whichever of the other three
    forms each line has. A `# comment` after an entry is kept as the rule's note (the shipped lists
    cite sources there); `# key: value` lines before the first entry are headers. `progress` is
    called with the number of lines read since its last call (line_count(text) in all). `detected`: what
    detect_format said of this text, when the caller asked it already (to show its own progress).
    """
    if fmt not in FORMATS:
        raise ListFormatError(source, 0, f"unknown list format {fmt!r} (one of {', '.join(FORMATS)})")
    result = BlockList(name=Path(source.rstrip("/")).stem or "list")
    result.format = (detected or detect_format(text)) if fmt == "auto" else fmt
    if result.format == "rpz":
        _parse_rpz(text, source, result, progress)
    else:
        _parse_lines(text, source, "auto" if fmt == "auto" else fmt, result, progress)
    return result


def decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ListFormatError(source, 0, f"not UTF-8 text: {exc.reason}") from None


def load_file(path: str | os.PathLike[str], fmt: str = "auto") -> BlockList:
    p = Path(path)
    return parse(decode(p.read_bytes(), str(p)), str(p), fmt)


def shipped_dir() -> Path | None:
    """Where the shipped lists are: $SINKHOLE_BLOCKLISTS, the source tree, or <prefix>/share."""
    env = os.environ.get("SINKHOLE_BLOCKLISTS")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[2] / "blocklists",
                   Path(sys.prefix) / "share" / "sinkhole" / "blocklists"]
    for c in candidates:
        if c.is_dir() and any(c.glob("*.txt")):
            return c
    return None


def shipped_lists(only_default: bool = True) -> list[tuple[str, BlockList]]:
    """(file name, list) for every shipped list, sorted by name; the default-on ones unless told."""
    d = shipped_dir()
    if d is None:
        return []
    out = []
    for path in sorted(d.glob("*.txt")):
        bl = load_file(path)
        if bl.default_on or not only_default:
            out.append((f"blocklists/{path.name}", bl))
    return out


def seed() -> list[tuple[str, list[tuple[str, str]], str]]:
    """The shipped default lists as (category, entries, source) for Store's first start."""
    return [(bl.headers.get("category", bl.name), bl.entries, source) for source, bl in shipped_lists()]
