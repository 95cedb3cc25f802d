"""Block list files: parsing (whole file or nothing) and the lists shipped in blocklists/."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sinkhole.domains import is_ip_address, normalize
from sinkhole.errors import DomainError, ListFormatError

HOSTS_SINKS = {"0.0.0.0", "127.0.0.1", "::", "::1", "0:0:0:0:0:0:0:0"}


@dataclass
class BlockList:
    """A parsed list: its header fields and its entries as (domain, note) pairs."""

    name: str
    entries: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def default_on(self) -> bool:
        return self.headers.get("default", "on").lower() not in ("off", "no", "false")


def parse(text: str, source: str) -> BlockList:
    """Parse a list in plain-domain, hosts or `||name^` form; raise ListFormatError on the first bad line.

    Each line holds one name, optionally after a sink address (hosts form), optionally
    followed by `# comment` (kept as the rule's note: the shipped lists cite sources there).
    Lines starting with `#` or `!` are comments; `# key: value` lines before the first
    entry are headers.
    """
    result = BlockList(name=Path(source).stem)
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#!":
            if not result.entries and line.startswith("#") and ":" in line:
                key, _, value = line[1:].partition(":")
                if key.strip() and " " not in key.strip():
                    result.headers[key.strip().lower()] = value.strip()
            continue
        body, _, comment = line.partition("#")
        tokens = body.split()
        if not tokens:
            continue
        if len(tokens) == 2 and is_ip_address(tokens[0]):
            if tokens[0] not in HOSTS_SINKS:
                raise ListFormatError(source, number, f"hosts entry maps to {tokens[0]}, not a sink address")
            name = tokens[1]
        elif len(tokens) == 1:
            name = tokens[0]
            if name.startswith("||"):
                if not name.endswith("^"):
                    raise ListFormatError(source, number, f"adblock rule {name!r} must end with '^'")
                name = name[2:-1]
        else:
            raise ListFormatError(source, number, f"expected one domain per line, got {body.strip()!r}")
        if name in ("localhost", "localhost.localdomain", "broadcasthost", "local") and tokens[0] != name:
            continue  # the usual preamble of a hosts file
        try:
            domain = normalize(name)
        except DomainError as exc:
            raise ListFormatError(source, number, str(exc)) from None
        if domain in seen:
            continue
        seen.add(domain)
        result.entries.append((domain, comment.strip()))
    if not result.entries:
        raise ListFormatError(source, 0, "the list holds no domain")
    return result



def load_file(path: str | os.PathLike[str]) -> BlockList:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ListFormatError(str(p), 0, f"not UTF-8 text: {exc.reason}") from None
    return parse(text, str(p))


def shipped_dir() -> Path | None:
    """Where the shipped lists are: $SINKHOLE_BLOCKLISTS, the source tree, or <prefix>/share."""
    env = os.environ.get("SINKHOLE_BLOCKLISTS")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parent.parent / "blocklists",
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
