"""List formats (hosts, domains, adblock, RPZ), `/regex/` rules, `lists import FILE|URL` and `lists update`.

URL tests talk to a real HTTP server on 127.0.0.1 (ThreadingHTTPServer on port 0 in a thread) that
serves list bodies with ETag and Last-Modified, answers conditional requests with 304 and records the
request headers it got. The CLI runs through CliRunner on a real temporary database; the end-to-end
tests check that a running server answers a name as blocked within one second of an import or update.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st

from sinkhole.cli import cli
from sinkhole.errors import ListFormatError
from sinkhole.policy import fetch, lists
from tests.conftest import ask, query, wait_for
from tests.dnsstub import address_for

# ---------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One known seed list instead of the shipped ones; no database outside tmp_path."""
    seed = tmp_path / "seed-lists"
    seed.mkdir()
    (seed / "seed.txt").write_text("# category: seeded\nseeded.example  # test seed\n", encoding="utf-8")
    monkeypatch.setenv("SINKHOLE_BLOCKLISTS", str(seed))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("SINKHOLE_DB", raising=False)
    monkeypatch.delenv("SINKHOLE_CONFIG", raising=False)
    return seed


def run(db: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--db", str(db), *args], catch_exceptions=False)


def rules_of(db: Path, category: str, kind: str = "block") -> set[str]:
    return {r["domain"] for r in query(db, "SELECT domain FROM rules WHERE category = ? AND kind = ?",
                                       (category, kind))}


def show(db: Path) -> dict[str, dict]:
    out = run(db, "lists", "show", "--format", "json").stdout
    return {r["category"]: r for r in map(json.loads, out.splitlines())}


def snapshot(db: Path) -> tuple[list[dict], int, list[dict]]:
    """Everything an import or update may change: the rules, the journal length, the sources."""
    return (query(db, "SELECT domain, kind, category, source FROM rules ORDER BY id"),
            query(db, "SELECT count(*) AS n FROM journal")[0]["n"],
            query(db, "SELECT * FROM sources ORDER BY category"))


class ListServer:
    """Serves list bodies at paths with ETag and Last-Modified; 304 on a matching conditional request.

    `requests` records (path, headers) of every request; `fail[path] = status` makes a path fail;
    `conditional = False` makes it ignore validators (always 200, as some servers do)."""

    def __init__(self) -> None:
        self.bodies: dict[str, tuple[bytes, str, str]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.fail: dict[str, int] = {}
        self.conditional = True
        self._version = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append((self.path, dict(self.headers.items())))
                if self.path in owner.fail:
                    self.send_error(owner.fail[self.path])
                    return
                if self.path not in owner.bodies:
                    self.send_error(404)
                    return
                body, etag, modified = owner.bodies[self.path]
                inm, ims = self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since")
                if owner.conditional and (inm == etag if inm is not None else ims == modified):
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", etag)
                self.send_header("Last-Modified", modified)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def put(self, path: str, text: str) -> str:
        """Serve `text` at `path` with a new ETag and Last-Modified; returns the URL."""
        self._version += 1
        body = text.encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        modified = formatdate(1_700_000_000 + self._version * 60, usegmt=True)
        self.bodies[path] = (body, etag, modified)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def headers_for(self, path: str) -> list[dict[str, str]]:
        return [h for p, h in self.requests if p == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def http() -> ListServer:
    s = ListServer()
    yield s
    s.close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- formats


def test_detect_format_reports_its_progress_as_it_looks_and_every_line_in_all():
    text = "".join(f"n{i}.example\n" for i in range(3 * lists.PROGRESS_LINES + 5))
    steps: list[int] = []
    assert lists.detect_format(text, steps.append) == "domains"
    assert sum(steps) == lists.line_count(text) and len(steps) >= 3  # it moved while it looked
    steps.clear()
    rpz = "$TTL 60\n" + text  # an RPZ directive ends the look at once: the rest is reported whole
    assert lists.detect_format(rpz, steps.append) == "rpz"
    assert steps == [lists.line_count(rpz)]


@given(st.text(min_size=1, max_size=40).filter(lambda t: len(t.split()) == 1))
def test_a_line_of_one_field_is_never_a_record(line):
    """detect_format asks _looks_like_record only of lines of two fields or more (a plain list's lines are one):
    a record is an owner, then its type, so one field never is one, whatever it holds."""
    assert not lists._looks_like_record(line.strip())


def test_parse_looks_for_the_format_only_when_asked_to(monkeypatch):
    text = "a.example\nb.example\n"

    def looked(*_args, **_kw):
        raise AssertionError("detect_format called")

    monkeypatch.setattr(lists, "detect_format", looked)
    assert lists.parse(text, "t.txt", "domains").format == "domains"
    assert lists.parse(text, "t.txt", "auto", detected="hosts").format == "hosts"  # the caller's look is taken


def test_hosts_format_takes_every_name_on_a_sink_line_and_skips_the_preamble():
    text = ("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\n"
            "0.0.0.0 0.0.0.0\n0.0.0.0 A.ai.example b.ai.example  # two names\n:: c.ai.example\n")
    bl = lists.parse(text, "hosts.txt", "hosts")
    assert bl.format == "hosts"
    assert bl.entries == [("a.ai.example", "two names"), ("b.ai.example", "two names"), ("c.ai.example", "")]
    with pytest.raises(ListFormatError) as err:
        lists.parse("0.0.0.0 a.example\nb.example\n", "h.txt", "hosts")
    assert err.value.line == 2 and "hosts form" in err.value.reason


def test_domains_format_one_name_a_line_and_wildcards_map_to_the_parent():
    bl = lists.parse("# category: plain\nOne.example\n*.two.example # wildcard\nbücher.example\n", "d.txt", "domains")
    assert bl.headers["category"] == "plain" and bl.format == "domains"
    assert bl.entries == [("one.example", ""), ("two.example", "wildcard"), ("xn--bcher-kva.example", "")]
    for bad, reason in [("0.0.0.0 a.example\n", "hosts line"), ("||a.example^\n", "adblock rule")]:
        with pytest.raises(ListFormatError) as err:
            lists.parse(bad, "d.txt", "domains")
        assert err.value.line == 1 and reason in err.value.reason


def test_adblock_format_exceptions_become_allow_rules_and_regex_rules_are_kept_whole():
    regex = r"/^(chat|api)[0-9]*\.ai\.example$/"
    text = (f"[Adblock Plus 2.0]\n! Title: test\n||ai.example^\n@@||status.ai.example^\n{regex}\n"
            "@@/^ok[.]/\n||ai.example^\nplain.example\n")
    bl = lists.parse(text, "a.txt", "adblock")
    assert bl.format == "adblock" and bl.headers["title"] == "test"
    assert bl.entries == [("ai.example", ""), (regex, ""), ("plain.example", "")]
    assert bl.allows == [("status.ai.example", ""), ("/^ok[.]/", "")]


def rpz_ip(network: str) -> str:
    """The rpz-ip owner name for a network, written here from the draft's rules, independent of lists.py."""
    net = ipaddress.ip_network(network)
    if net.version == 4:
        return f"{net.prefixlen}." + ".".join(reversed(str(net.network_address).split("."))) + ".rpz-ip"
    words = str(net.network_address).split(":")  # compressed form: '' marks the ::
    if words[:2] == ["", ""]:
        words = words[1:]
    if words[-2:] == ["", ""]:
        words = words[:-1]
    return f"{net.prefixlen}." + ".".join("zz" if w == "" else w for w in reversed(words)) + ".rpz-ip"


RPZ = """$TTL 300
$ORIGIN rpz.agency.example.
; category: rpz-test
@   IN SOA ns.agency.example. hostmaster.agency.example. (
        2026112201 ; serial
        3600 600 86400 60 )
    IN NS  ns.agency.example.
chat.ai.example       CNAME .            ; NXDOMAIN
*.ai.example          CNAME .
nodata.ai.example     CNAME *.
local.ai.example  60  IN A 10.9.9.9
                      AAAA ::1
garden.ai.example     CNAME walled-garden.agency.example.
status.ai.example     CNAME rpz-passthru.
Abs.AI2.example.rpz.agency.example. CNAME .
{v4_host} CNAME .
{v4_net} CNAME .
{v6_net} CNAME .
{v6_low} CNAME .
"""


def test_rpz_zone_maps_triggers_and_actions_to_rules():
    nets = {"v4_host": "192.0.2.1/32", "v4_net": "198.51.100.0/24", "v6_net": "2001:db8:ad::/48",
            "v6_low": "::1/128"}
    text = RPZ.format(**{k: rpz_ip(v) for k, v in nets.items()})
    bl = lists.parse(text, "zone.rpz")
    assert bl.format == "rpz" and bl.headers["category"] == "rpz-test"
    blocked = {d for d, _ in bl.entries}
    assert blocked == {"chat.ai.example", "ai.example", "nodata.ai.example", "local.ai.example",
                       "garden.ai.example", "abs.ai2.example", *nets.values()}
    assert [d for d, _ in bl.allows] == ["status.ai.example"]
    notes = dict(bl.entries)
    assert notes["chat.ai.example"] == "NXDOMAIN"  # the record's comment
    assert notes["ai.example"] == "rpz: *.ai.example CNAME ."  # else the record itself


@pytest.mark.parametrize("network", ["10.0.0.0/8", "203.0.113.128/25", "192.0.2.7/32", "2001:db8::/32",
                                     "2001:db8:0:0:1::/80", "fe80::/10", "2001:db8:1:2:3:4:5:6/128", "::/1"])
def test_rpz_ip_triggers_give_the_network(network):
    bl = lists.parse(f"$ORIGIN rpz.example.\n{rpz_ip(network)} CNAME .\n", "ip.rpz", "rpz")
    assert bl.entries[0][0] == str(ipaddress.ip_network(network))


@pytest.mark.parametrize("text,fmt", [
    ("0.0.0.0 a.example\n0.0.0.0 b.example\n", "hosts"),
    ("a.example\nb.example\n", "domains"),
    ("! comment\n||a.example^\n", "adblock"),
    ("a.example\n@@||b.example^\n", "adblock"),
    ("/^ads?\\./\n", "adblock"),
    ("$ORIGIN rpz.example.\na.example CNAME .\n", "rpz"),
    ("$TTL 60\n@ SOA ns. h. 1 2 3 4 5\na.example CNAME .\n", "rpz"),
    ("; no directives\na.example 300 IN CNAME .\n", "rpz"),
    ("a.example\n0.0.0.0 b.example\n", "hosts"),
])
def test_auto_detection_picks_the_format(text, fmt, tmp_path, db):
    assert lists.parse(text, "x.txt").format == fmt
    path = tmp_path / "list.txt"
    path.write_text(text)
    result = run(db, "lists", "import", str(path), "--category", "detected")
    assert result.exit_code == 0, result.output
    assert f"({fmt})" in result.stdout
    assert query(db, "SELECT format FROM sources WHERE category = 'detected'") == [{"format": "auto"}]


def test_explicit_format_overrides_detection(tmp_path, db):
    path = tmp_path / "zone.txt"
    path.write_text("$ORIGIN rpz.example.\na.example CNAME .\n")
    assert run(db, "lists", "import", str(path), "--category", "forced", "--format", "rpz").exit_code == 0
    result = run(db, "lists", "import", str(path), "--category", "forced", "--format", "domains")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"sinkhole: {path}:1: ")
    assert rules_of(db, "forced") == {"a.example"}


BAD = [
    ("domains", "good.example\nbad..example\n", 2, "empty label"),
    ("hosts", "0.0.0.0 a.example\n10.1.2.3 b.example\n", 2, "not a sink address"),
    ("adblock", "||a.example^\n||b.example^$third-party\n", 2, "modifiers"),
    ("adblock", "||a.example^\n/(unclosed/\n", 2, "invalid regex rule '/(unclosed/'"),
    ("adblock", "||a.example^\n||*.b.example^\n", 2, "only a host name"),
    ("auto", "||a.example^\n@@/[z-a]/\n", 2, "invalid character class range"),  # RE2's words
    ("rpz", "$ORIGIN rpz.example.\na.example CNAME .\nns1.example.rpz-nsdname CNAME .\n", 3, "rpz-nsdname"),
    ("rpz", "$ORIGIN rpz.example.\n32.1.2.0.10.rpz-nsip CNAME .\n", 2, "rpz-nsip"),
    ("rpz", "$ORIGIN rpz.example.\n24.0.0.10.10.rpz-client-ip CNAME .\n", 2, "rpz-client-ip"),
    ("rpz", "$ORIGIN rpz.example.\na.example CNAME rpz-drop.\n", 2, "rpz-drop"),
    ("rpz", "$ORIGIN rpz.example.\na.example CNAME rpz-tcp-only.\n", 2, "rpz-tcp-only"),
    ("rpz", "$ORIGIN rpz.example.\n24.1.2.0.192.rpz-ip CNAME .\n", 2, "host bits set"),
    ("rpz", "$ORIGIN rpz.example.\n32.1.2.192.rpz-ip CNAME .\n", 2, "not an IPv4 address"),
    ("rpz", "$ORIGIN rpz.example.\n32.1.2.0.192.rpz-ip CNAME rpz-passthru.\n", 2, "block rules only"),
    ("rpz", "$ORIGIN rpz.example.\nelsewhere.example. CNAME .\n", 2, "not under the policy zone"),
    ("rpz", "$ORIGIN rpz.example.\na.example A 300.1.1.1\n", 2, "A '300.1.1.1'"),
    ("rpz", "$ORIGIN rpz.example.\na.example CNAME .\nb.example BOGUS x\n", 3, "unknown record type"),
    ("rpz", "$ORIGIN rpz.example.\n$INCLUDE other.zone\n", 2, "not supported"),
    ("rpz", "$ORIGIN rpz.example.\na.example CNAME rpz-passthru.\n*.a.example CNAME .\n", 3, "conflicts"),
    ("rpz", "$ORIGIN rpz.example.\n@ SOA ns. h. ( 1 2 3\n", 2, "unbalanced"),
    ("rpz", "$ORIGIN rpz.example.\n* CNAME .\n", 2, "every name"),
]


@pytest.mark.parametrize("fmt,text,line,reason", BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD])
def test_bad_line_rejects_the_list_whole_and_changes_nothing(fmt, text, line, reason, tmp_path, db):
    good = tmp_path / "good.txt"
    good.write_text("kept.example\n")
    assert run(db, "lists", "import", str(good), "--category", "target").exit_code == 0
    before = snapshot(db)
    bad = tmp_path / "bad.txt"
    bad.write_text(text)
    result = run(db, "lists", "import", str(bad), "--category", "target", "--format", fmt)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sinkhole: {bad}:{line}: "), result.stderr
    assert reason in lines[0]
    assert snapshot(db) == before
    assert rules_of(db, "target") == {"kept.example"}


# ---------------------------------------------------------------------------- import (files, URLs)


def test_file_import_records_its_source_and_allow_rules_follow_the_list(tmp_path, db):
    path = tmp_path / "ads.txt"
    path.write_text("||ai.example^\n@@||status.ai.example^\n/^gpt[0-9]+\\./\n")
    result = run(db, "lists", "import", str(path), "--category", "ads")
    assert result.exit_code == 0, result.output
    assert rules_of(db, "ads") == {"ai.example", "/^gpt[0-9]+\\./"}
    assert rules_of(db, "ads", "allow") == {"status.ai.example"}
    src = query(db, "SELECT * FROM sources WHERE category = 'ads'")[0]
    assert src["location"] == str(path.resolve()) and src["rules"] == 3
    assert src["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    journal = query(db, "SELECT action, category FROM journal ORDER BY id DESC LIMIT 1")[0]
    assert journal == {"action": "lists import", "category": "ads"}
    shown = show(db)
    assert shown["ads"]["block"] == 2 and shown["ads"]["allow"] == 1 and shown["ads"]["regex"] == 1
    # an allow rule added by hand to the category stays; the list's own exceptions follow the list
    assert run(db, "allow", "add", "manual.ai.example", "--category", "ads").exit_code == 0
    path.write_text("||ai.example^\n")
    assert run(db, "lists", "import", str(path), "--category", "ads").exit_code == 0
    assert rules_of(db, "ads", "allow") == {"manual.ai.example"}
    assert rules_of(db, "ads") == {"ai.example"}


def test_regex_rules_on_the_command_line(db):
    result = run(db, "block", "add", "/^chat[0-9]*\\.ai\\.example$/", "--category", "rx")
    assert result.exit_code == 0, result.output
    assert rules_of(db, "rx") == {"/^chat[0-9]*\\.ai\\.example$/"}
    bad = run(db, "block", "add", "/(unclosed/")
    assert bad.exit_code == 2 and "invalid regex rule" in bad.stderr and len(bad.stderr.splitlines()) == 1
    shown = show(db)
    assert shown["rx"]["regex"] == 1


def test_url_import_records_validators_and_update_sends_them(http, db):
    url = http.put("/ai.txt", "||one.ai.example^\n||two.ai.example^\n")
    result = run(db, "lists", "import", url, "--category", "remote")
    assert result.exit_code == 0, result.output
    assert rules_of(db, "remote") == {"one.ai.example", "two.ai.example"}
    body, etag, modified = http.bodies["/ai.txt"]
    src = query(db, "SELECT * FROM sources WHERE category = 'remote'")[0]
    assert (src["location"], src["etag"], src["last_modified"]) == (url, etag, modified)
    assert src["sha256"] == hashlib.sha256(body).hexdigest() and src["rules"] == 2
    assert "If-None-Match" not in http.headers_for("/ai.txt")[0]  # the first fetch is unconditional

    before = snapshot(db)
    result = run(db, "lists", "update")
    assert result.exit_code == 0, result.output
    sent = http.headers_for("/ai.txt")[-1]
    assert sent["If-None-Match"] == etag and sent["If-Modified-Since"] == modified
    assert result.stdout.splitlines() == [f"remote: unchanged (304 Not Modified) {url}"]
    rules, journal, _ = snapshot(db)
    assert (rules, journal) == before[:2]  # a 304 writes no rule and no journal entry

    http.put("/ai.txt", "||two.ai.example^\n||three.ai.example^\n@@||ok.two.ai.example^\n")
    result = run(db, "lists", "update", "remote")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("remote: updated, 3 rules (2 block, 1 allow) (adblock), was 2")
    assert rules_of(db, "remote") == {"two.ai.example", "three.ai.example"}
    assert rules_of(db, "remote", "allow") == {"ok.two.ai.example"}
    assert http.headers_for("/ai.txt")[-1]["If-None-Match"] == etag  # still the old validator: it changed
    new_src = query(db, "SELECT * FROM sources WHERE category = 'remote'")[0]
    assert new_src["etag"] == http.bodies["/ai.txt"][1] != etag
    journal = query(db, "SELECT action, detail FROM journal ORDER BY id DESC LIMIT 1")[0]
    assert journal["action"] == "lists update" and url in journal["detail"]


def test_update_with_a_server_that_ignores_validators_compares_content(http, db):
    url = http.put("/plain.txt", "a.ai.example\n")
    assert run(db, "lists", "import", url, "--category", "plain").exit_code == 0
    http.conditional = False
    before = snapshot(db)
    result = run(db, "lists", "update")
    assert result.exit_code == 0 and result.stdout.strip() == f"plain: unchanged (same content) {url}"
    assert snapshot(db)[:2] == before[:2]


def test_failing_sources_keep_their_rules_the_others_update_and_exit_1(http, tmp_path, db):
    broken_url = http.put("/broken.txt", "a.ai.example\n")
    gone_url = f"http://127.0.0.1:{closed_port()}/gone.txt"
    bad_url = http.put("/bad.txt", "b.ai.example\n")
    path = tmp_path / "local.txt"
    path.write_text("c.ai.example\n")
    for url, cat in [(broken_url, "broken"), (bad_url, "bad"), (str(path), "local")]:
        assert run(db, "lists", "import", url, "--category", cat).exit_code == 0
    other = ListServer()  # a source whose server goes away
    try:
        assert run(db, "lists", "import", other.put("/x.txt", "d.ai.example\n"), "--category", "gone").exit_code == 0
        gone_url = other.url("/x.txt")
    finally:
        other.close()
    http.fail["/broken.txt"] = 500
    http.put("/bad.txt", "b.ai.example\nnew.ai.example\nbad..ai.example\n")
    path.write_text("c.ai.example\ne.ai.example\n")
    before = {cat: rules_of(db, cat) for cat in ("broken", "bad", "gone")}

    result = run(db, "lists", "update")
    assert result.exit_code == 1
    err = {line.split(":")[0]: line for line in result.stderr.splitlines()}
    assert set(err) == {"broken", "bad", "gone"}
    assert "HTTP 500" in err["broken"]
    assert f"{bad_url}:3: invalid domain 'bad..ai.example'" in err["bad"]
    assert gone_url in err["gone"] and "refused" in err["gone"].lower()
    assert all("rules in force unchanged" in line for line in err.values())
    assert {cat: rules_of(db, cat) for cat in before} == before
    assert rules_of(db, "local") == {"c.ai.example", "e.ai.example"}
    assert result.stdout.splitlines() == [line for line in result.stdout.splitlines() if line.startswith("local:")]
    assert len(result.stdout.splitlines()) == 1


def test_url_import_failures(http, db, monkeypatch):
    assert run(db, "block", "add", "other.example").exit_code == 0  # the database exists, seeded
    before = snapshot(db)
    unreachable = run(db, "lists", "import", f"http://127.0.0.1:{closed_port()}/x.txt", "--category", "x")
    missing = run(db, "lists", "import", http.url("/nothing.txt"), "--category", "x")
    http.put("/bad.txt", "ok.example\nnot a domain\n")
    bad = run(db, "lists", "import", http.url("/bad.txt"), "--category", "x")
    scheme = run(db, "lists", "import", "ftp://127.0.0.1/list.txt", "--category", "x")
    http.put("/big.txt", "a.example\n" * 100)
    monkeypatch.setattr(fetch, "MAX_BYTES", 500)
    big = run(db, "lists", "import", http.url("/big.txt"), "--category", "x")
    assert (unreachable.exit_code, missing.exit_code, bad.exit_code, scheme.exit_code, big.exit_code) == (1, 1, 2, 2, 1)
    assert "HTTP 404" in missing.stderr
    assert bad.stderr.strip() == f"sinkhole: {http.url('/bad.txt')}:2: expected one domain per line, got 'not a domain'"
    assert "only http:// and https://" in scheme.stderr and "500-byte limit" in big.stderr
    for r in (unreachable, missing, bad, scheme, big):
        assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert snapshot(db) == before


def test_https_certificates_are_verified(tmp_path):
    """A TLS server with a self-signed certificate is refused (urllib with the default context)."""
    import ssl
    import subprocess

    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                           "-out", str(crt), "-days", "1", "-subj", "/CN=127.0.0.1"], capture_output=True)
    if made.returncode != 0:
        pytest.skip("openssl is not available to make a certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    tls = ListServer()
    try:
        tls.httpd.socket = ctx.wrap_socket(tls.httpd.socket, server_side=True)
        tls.put("/l.txt", "a.example\n")
        with pytest.raises(fetch.FetchError) as err:
            fetch.fetch_url(tls.url("/l.txt").replace("http://", "https://"), timeout=5)
        assert "certificate" in str(err.value).lower()
    finally:
        tls.close()


def test_file_update_rereads_changed_files_only(tmp_path, db):
    path = tmp_path / "f.txt"
    path.write_text("a.ai.example\n")
    assert run(db, "lists", "import", str(path), "--category", "f").exit_code == 0
    before = snapshot(db)
    result = run(db, "lists", "update", "f")
    assert result.exit_code == 0 and result.stdout.strip() == f"f: unchanged (same content) {path.resolve()}"
    assert snapshot(db)[:2] == before[:2]
    path.write_text("b.ai.example\n")
    assert run(db, "lists", "update", "f").exit_code == 0
    assert rules_of(db, "f") == {"b.ai.example"}
    path.unlink()
    result = run(db, "lists", "update")
    assert result.exit_code == 1 and "f: failed" in result.stderr and rules_of(db, "f") == {"b.ai.example"}
    unknown = run(db, "lists", "update", "no-such")
    assert unknown.exit_code == 2 and "no recorded source for no-such" in unknown.stderr


# ---------------------------------------------------------------------------- end to end


def test_url_import_and_update_reach_a_running_server_within_a_second(make_server, stub, http, db):
    s = make_server(upstream=(stub.address,), shipped_lists=False)
    assert ask(s, "chat.remote-ai.test").answer[0][0].to_text().startswith("192.0.2.")
    url = http.put("/remote.txt", "0.0.0.0 remote-ai.test\n")
    assert run(db, "lists", "import", url, "--category", "remote").exit_code == 0
    assert wait_for(lambda: ask(s, "chat.remote-ai.test").answer[0][0].to_text() == "0.0.0.0")

    http.put("/remote.txt", "0.0.0.0 other-ai.test\n")
    result = run(db, "lists", "update")
    assert result.exit_code == 0 and "remote: updated" in result.stdout
    assert wait_for(lambda: ask(s, "api.other-ai.test").answer[0][0].to_text() == "0.0.0.0")
    assert ask(s, "chat.remote-ai.test").answer[0][0].to_text().startswith("192.0.2.")


def test_rpz_import_blocks_names_passes_exceptions_and_sinkholes_answers_by_address(make_server, stub, http, db):
    s = make_server(upstream=(stub.address,), shipped_lists=False)
    target = address_for("addr.example.test")  # the stub's answer for this name
    zone = (f"$ORIGIN rpz.example.\n*.rpz-ai.test CNAME .\nok.rpz-ai.test CNAME rpz-passthru.\n"
            f"{rpz_ip(target + '/32')} CNAME .\n")
    url = http.put("/policy.rpz", zone)
    result = run(db, "lists", "import", url, "--category", "rpz")
    assert result.exit_code == 0 and "(rpz)" in result.stdout
    assert wait_for(lambda: ask(s, "www.rpz-ai.test").answer[0][0].to_text() == "0.0.0.0")
    assert ask(s, "ok.rpz-ai.test").answer[0][0].to_text().startswith("192.0.2.")  # passthru
    assert ask(s, "addr.example.test").answer[0][0].to_text() == "0.0.0.0"  # the answer's address matched
