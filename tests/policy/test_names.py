"""Names as rules and lookups compare them; suffix matching at label boundaries."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sinkhole.errors import DomainError
from sinkhole.policy.names import SuffixTable, _normalize_labels, is_ip_address, is_regex, is_subdomain, normalize


@pytest.mark.parametrize("raw,expected", [
    ("DeepSeek.COM", "deepseek.com"), ("chat.deepseek.com.", "chat.deepseek.com"), ("  a.example  ", "a.example"),
    ("bücher.example", "xn--bcher-kva.example"), ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
    ("_dns.resolver.arpa", "_dns.resolver.arpa"), ("ai", "ai"), ("a" * 63 + ".example", "a" * 63 + ".example"),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


@pytest.mark.parametrize("raw,why", [
    ("bad..name", "empty label"), ("", "empty"), (".", "root"), (".example", "empty label"),
    ("a" * 64 + ".example", "over 63"), (".".join(["a" * 60] * 5), "over 253"),
    ("a b.example", "letters, digits"), ("a/b.example", "letters, digits"), ("*.example", "letters, digits"),
    ("deepseek.com..", "empty label"),
])
def test_normalize_rejects(raw, why):
    with pytest.raises(DomainError) as err:
        normalize(raw)
    assert why in str(err.value)
    assert "\n" not in str(err.value)


def test_is_subdomain_is_label_exact():
    assert is_subdomain("chat.deepseek.com", "deepseek.com")
    assert is_subdomain("deepseek.com", "deepseek.com")
    assert not is_subdomain("notdeepseek.com", "deepseek.com")
    assert not is_subdomain("deepseek.com.example.net", "deepseek.com")


def test_suffix_table_most_specific_wins():
    t = SuffixTable({"deepseek.com": 1, "status.deepseek.com": 2})
    assert t.lookup(("a", "b", "deepseek", "com")) == ("deepseek.com", 1)
    assert t.lookup(("x", "status", "deepseek", "com")) == ("status.deepseek.com", 2)
    assert t.lookup(("notdeepseek", "com")) is None
    assert t.lookup(("deepseek", "com", "example", "net")) is None
    assert t.lookup(()) is None


label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@given(st.lists(label, min_size=1, max_size=4), st.lists(label, min_size=1, max_size=4))
def test_lookup_agrees_with_is_subdomain(rule_labels, name_labels):
    rule = ".".join(rule_labels)
    name = ".".join(name_labels)
    t = SuffixTable({rule: True})
    assert (t.lookup(tuple(name_labels)) is not None) == is_subdomain(name, rule)


@given(st.lists(label, min_size=1, max_size=3), st.lists(label | st.just("a\\046b"), min_size=0, max_size=5))
def test_lookup_name_agrees_with_lookup_by_labels(rule_labels, name_labels):
    t = SuffixTable({".".join(rule_labels): 1, "com": 2})
    assert t.lookup_name(".".join(name_labels)) == t.lookup(tuple(name_labels))


@pytest.mark.parametrize("text,regex", [
    ("/", False), ("//", True), ("/a/", True), ("/x+\\.example/", True), ("a/", False), ("/a", False),
    ("10.0.0.0/8", False), ("", False),
])
def test_is_regex_is_the_one_shape_of_a_regex_rule(text, regex):
    """One rule for lists, the CLI, the policy and RPZ export: `//` is regex-shaped (and then refused for its
    empty pattern), never taken for a name or a network."""
    assert is_regex(text) is regex


def _ipaddress_reads(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(("text", "address"), [
    ("192.0.2.1", True), ("0.0.0.0", True), ("::", True), ("::1", True), ("2001:db8::5", True),
    ("::ffff:192.0.2.1", True), ("64:ff9b::203.0.113.7", True), ("fe80::1%eth0", True), ("FE80::1", True),
    ("1.2.3", False), ("256.0.0.1", False), ("01.2.3.4", False), ("1.2.3.4.", False), ("", False), ("...", False),
    ("deepseek.com", False), ("0.0.0.0.example", False), ("a:b", False), ("١٢٣.1.1.1", False), (" 1.2.3.4", False),
    ("1.2.3.4%x", False), ("localhost", False), ("123", False),
])
def test_is_ip_address_is_what_ipaddress_reads(text, address):
    """The quick refusal of a text with no ':' that is not digits and dots must never refuse an address."""
    assert is_ip_address(text) is address is _ipaddress_reads(text)


@given(st.text(alphabet="0123456789abcdefABCDEF.:%x ", max_size=45) | st.text(max_size=20) | st.ip_addresses().map(str))
def test_is_ip_address_agrees_with_ipaddress_on_any_text(text):
    assert is_ip_address(text) == _ipaddress_reads(text)


def _outcome(f, text: str) -> str | tuple[str, str]:
    try:
        return f(text)
    except DomainError as exc:
        return ("error", str(exc))


@given(st.text(alphabet="aZ09_-.\u3002\u00dfxn \t", max_size=80)
       | st.lists(st.text(alphabet="abc-_9", min_size=0, max_size=70), min_size=1, max_size=6).map(".".join)
       | st.text(max_size=30))
def test_a_plain_name_is_checked_at_once_as_label_by_label(text):
    """normalize's one regular expression for plain ASCII names gives what the label-by-label check gives, the
    same name or the same error, whatever the text (case, trailing dot, empty or long labels, over 253)."""
    assert _outcome(normalize, text) == _outcome(_normalize_labels, text)


@pytest.mark.parametrize("text", ["a" * 63 + ".example", ".".join(["a" * 63] * 4)[:253], ".".join(["a" * 63] * 4),
                                  "A.B.", "a..b", "a.", "-.x", "_dmarc.example", "x" * 64])
def test_a_plain_name_at_the_bounds_is_checked_as_label_by_label(text):
    assert _outcome(normalize, text) == _outcome(_normalize_labels, text)
