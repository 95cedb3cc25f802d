"""Domain names as sinkhole compares them: lower case, no trailing dot, IDNA A-labels."""

from __future__ import annotations

import ipaddress
import re

import idna

from sinkhole.errors import DomainError

MAX_NAME = 253  # presentation length without the trailing dot (RFC 1035: 255 octets on the wire)
MAX_LABEL = 63
_LABEL_OK = re.compile(r"[a-z0-9_-]+\Z")
_PLAIN_NAME = re.compile(r"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}\.?\Z")  # what _normalize_labels returns as it is
_DOTS = str.maketrans(  # ideographic and full-width dots separate labels too (UTS 46)
    {"\u3002": ".", "\uff0e": ".", "\uff61": "."})


def is_regex(text: str) -> bool:
    """Text shaped as a `/pattern/` rule (a regular expression, matched with RE2 against the whole name). `//`
    is regex-shaped but has no pattern: lists and the CLI refuse it (policy.lists.regex_rule), and a policy
    leaves one out that was stored by other means."""
    return len(text) >= 2 and text[0] == "/" and text[-1] == "/"


def normalize(name: str) -> str:
    """Return `name` in the canonical form used by rules and lookups, or raise DomainError.

    Accepts Unicode (turned into punycode A-labels), any case, and one trailing dot. A name of ASCII letters,
    digits, '-' and '_' in labels of 1 to 63 (nearly every line of a list) is checked by one regular expression;
    what it does not match goes label by label (_normalize_labels), which says what is wrong.
    """
    text = name.strip().lower()
    if text.isascii() and _PLAIN_NAME.match(text):
        if text[-1] == ".":
            text = text[:-1]
        if len(text) <= MAX_NAME:
            return text
    return _normalize_labels(name)


def _normalize_labels(name: str) -> str:
    """normalize, label by label: IDNA for a label that is not ASCII, and the error for what is not a name."""
    text = name.strip().translate(_DOTS)
    if not text:
        raise DomainError("empty domain name")
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise DomainError("the root '.' is not a domain that can be listed")
    labels = text.split(".")
    out = []
    for label in labels:
        if not label:
            raise DomainError(f"invalid domain {name!r}: empty label")
        label = label.lower()
        if not label.isascii():
            # IDNA 2008 with UTS 46 non-transitional mapping, as browsers look names up (ß stays ß)
            try:
                label = idna.encode(label, uts46=True, transitional=False).decode("ascii")
            except idna.IDNAError as exc:
                raise DomainError(f"invalid domain {name!r}: label {label!r} is not valid IDNA: {exc}") from None
        if len(label) > MAX_LABEL:
            raise DomainError(f"invalid domain {name!r}: label {label[:20]!r}... is {len(label)} bytes, over 63")
        if not _LABEL_OK.match(label):
            raise DomainError(
                f"invalid domain {name!r}: label {label!r} may hold only letters, digits, '-' and '_'"
            )
        out.append(label)
    result = ".".join(out)
    if len(result) > MAX_NAME:
        raise DomainError(f"invalid domain {name[:40]!r}...: {len(result)} characters, over 253")
    return result


def is_ip_address(text: str) -> bool:
    """An IPv4 or IPv6 address as ipaddress.ip_address reads it (an IPv6 one with its zone too).

    A text with no ':' that is not all ASCII digits and dots is no address: said at once, without ipaddress's two
    parsers and their two exceptions. That was 40 % of `lists import`'s time for a million names (py-spy), every
    line of a list asking whether its first word is an address (hosts format)."""
    if ":" not in text and not (text.isascii() and text.replace(".", "").isdigit()):
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def client_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client's address as a socket gives it: without an IPv6 zone (`%eth0`), an IPv4-mapped IPv6
    address (`::ffff:192.0.2.1`, from a dual-stack socket) as the IPv4 one; None if it is not an address."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def reverse_name(name: str) -> str:
    """'chat.deepseek.com' -> 'com.deepseek.chat': names under one domain sort together after it."""
    return ".".join(reversed(name.split(".")))


def is_subdomain(name: str, parent: str) -> bool:
    """True when `name` equals `parent` or lies under it, at a label boundary."""
    return name == parent or name.endswith("." + parent)


class SuffixTable:
    """Maps domains to values; `lookup` finds the most specific entry covering a name.

    One dict probe per label of the queried name, whatever the table size.
    """

    __slots__ = ("_map",)

    def __init__(self, items: dict[str, object] | None = None) -> None:
        self._map: dict[str, object] = dict(items or {})

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, name: str) -> bool:
        return name in self._map

    def lookup_name(self, name: str) -> tuple[str, object] | None:
        """`lookup` for a dotted name: each parent is a slice after the next dot. (Escaped names
        have no literal dots: those are \\046.)"""
        get = self._map.get
        key = name
        while key:
            hit = get(key)
            if hit is not None:
                return key, hit
            cut = key.find(".")
            if cut < 0:
                return None
            key = key[cut + 1:]
        return None

    def lookup(self, labels: tuple[str, ...]) -> tuple[str, object] | None:
        """Most specific (longest) entry equal to or a parent of the name given as labels."""
        get = self._map.get
        n = len(labels)
        for i in range(n):
            key = ".".join(labels[i:])
            hit = get(key)
            if hit is not None:
                return key, hit
        return None
