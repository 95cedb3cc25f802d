"""The web console's JSON API over a real server (HTTP on 127.0.0.1, an ephemeral port), with an HTTP client.

Every role against every endpoint (allowed, or 403; 401 without a session), CSRF, logout, timeouts, the login
journal and lockout, changes that reach DNS, the export against `sinkhole log`, verification with an uploaded
key, HTTPS with the block page's CA, and what a page shows of text a client or an attacker chose.
"""

from __future__ import annotations

import html
import http.client
import json
import re
import socket
import sqlite3
import ssl
import time
from pathlib import Path

import dns.message
import dns.name
import dns.query
import httpx
import pytest
from click.testing import CliRunner

from sinkhole.cli import cli
from tests.conftest import RunningServer, ask, audit_rows, query, wait_for

PASSWORDS = {"ada": "admin password 1", "aud": "auditor password 2", "vic": "viewer password 3"}
ROLES = {"ada": "admin", "aud": "auditor", "vic": "viewer"}

# (method, path, least role): written here from the roles, not read from the code
EXPECTED = [
    ("GET", "/api/session", "viewer"), ("GET", "/api/dashboard", "viewer"), ("POST", "/api/password", "viewer"),
    ("GET", "/api/log", "auditor"), ("GET", "/api/log/1", "auditor"), ("GET", "/api/log/export", "auditor"),
    ("GET", "/api/verify", "auditor"), ("POST", "/api/verify", "auditor"), ("GET", "/api/report", "auditor"),
    ("GET", "/api/changes", "auditor"), ("GET", "/api/rules", "auditor"), ("GET", "/api/lists", "auditor"),
    ("GET", "/api/groups", "auditor"), ("GET", "/api/check", "auditor"), ("GET", "/api/requests", "auditor"),
    ("POST", "/api/rules", "admin"), ("POST", "/api/rules/remove", "admin"), ("POST", "/api/lists/enable", "admin"),
    ("POST", "/api/lists/disable", "admin"), ("POST", "/api/lists/import", "admin"),
    ("POST", "/api/lists/update", "admin"), ("POST", "/api/groups", "admin"), ("POST", "/api/groups/remove", "admin"),
    ("POST", "/api/requests/approve", "admin"), ("POST", "/api/requests/deny", "admin"), ("GET", "/api/users", "admin"),
    ("POST", "/api/users", "admin"), ("POST", "/api/users/password", "admin"), ("POST", "/api/users/role", "admin"),
    ("POST", "/api/users/unlock", "admin"), ("POST", "/api/users/remove", "admin"),
    ("POST", "/api/logout", "viewer"),  # last: it ends the session it is sent with
]
RANK = ["viewer", "auditor", "admin"]


def cli_ok(db: Path, *args: str, input: str | None = None) -> str:
    result = CliRunner().invoke(cli, ["--db", str(db), *args], input=input, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def add_user(db: Path, name: str, role: str, password: str) -> None:
    cli_ok(db, "user", "add", name, "--role", role, "--password-stdin", input=password + "\n")


@pytest.fixture
def console(make_server, stub, db: Path) -> RunningServer:
    server = make_server(upstream=(stub.address,), web_listen=("127.0.0.1:0",))
    for name, password in PASSWORDS.items():
        add_user(db, name, ROLES[name], password)
    return server


def base_url(server: RunningServer) -> str:
    assert server.server is not None
    host, port = server.server.bound.web[0].getsockname()[:2]
    return f"http://{host}:{port}"


class Client:
    """An HTTP client signed in (or not) to the console, with the session's CSRF token."""

    def __init__(self, server: RunningServer, name: str | None = None, password: str | None = None) -> None:
        self.http = httpx.Client(base_url=base_url(server), follow_redirects=False, timeout=30)
        self.csrf = ""
        if name is not None:
            r = self.login(name, password or PASSWORDS[name])
            assert r.status_code == 200, r.text
            self.csrf = r.json()["csrf"]

    def login(self, name: str, password: str) -> httpx.Response:
        return self.http.post("/api/login", json={"name": name, "password": password})

    def get(self, path: str, **params: object) -> httpx.Response:
        return self.http.get(path, params=params)

    def post(self, path: str, body: dict | None = None, csrf: bool = True, **kw: object) -> httpx.Response:
        headers = {"X-CSRF-Token": self.csrf} if csrf else {}
        if "files" in kw:
            return self.http.post(path, headers=headers, **kw)
        return self.http.post(path, json=body or {}, headers=headers)


def journal(db: Path, action_prefix: str) -> list[dict]:
    return [r for r in query(db, "SELECT * FROM journal ORDER BY id") if r["action"].startswith(action_prefix)]


def test_every_role_against_every_endpoint_is_allowed_or_403_and_401_without_a_session(console) -> None:
    anonymous = Client(console)
    for method, path, _ in EXPECTED:
        r = anonymous.get(path) if method == "GET" else anonymous.post(path, {})
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert "error" in r.json()
    seen: dict[tuple[str, str, str], int] = {}
    for name, role in ROLES.items():
        client = Client(console, name)
        for method, path, least in EXPECTED:
            r = client.get(path) if method == "GET" else client.post(path, {})
            seen[(role, method, path)] = r.status_code
            if RANK.index(role) < RANK.index(least):
                assert r.status_code == 403, (role, method, path, r.status_code, r.text)
                assert f"needs the {least} role" in r.json()["error"]
            else:
                assert r.status_code not in (401, 403) and r.status_code < 500, (role, method, path, r.status_code,
                                                                                   r.text)
    assert len(seen) == len(ROLES) * len(EXPECTED)


def test_a_post_without_the_csrf_token_is_403_and_changes_nothing(console, db: Path) -> None:
    admin = Client(console, "ada")
    for method, path, _ in EXPECTED:
        if method != "POST":
            continue
        r = admin.post(path, {"kind": "block", "names": ["csrf.example"], "name": "vic"}, csrf=False)
        assert r.status_code == 403, (path, r.status_code)
        assert "CSRF" in r.json()["error"]
        wrong = admin.http.post(path, json={"kind": "block", "names": ["csrf.example"]},
                                headers={"X-CSRF-Token": "x" * 43})
        assert wrong.status_code == 403, path
    assert not query(db, "SELECT * FROM rules WHERE domain = 'csrf.example'")
    assert admin.get("/api/session").status_code == 200  # logout without the token did not sign it out


def test_a_session_after_logout_is_401_and_the_logins_are_journaled(console, db: Path) -> None:
    client = Client(console, "aud")
    assert client.get("/api/log").status_code == 200
    assert client.post("/api/logout").status_code == 200
    for path in ("/api/log", "/api/session", "/api/dashboard"):
        assert client.get(path).status_code == 401
    logins, logouts = journal(db, "web login"), journal(db, "web logout")
    assert [(e["user"], e["host"]) for e in logins] == [("web:aud", "127.0.0.1")]
    assert json.loads(logins[0]["detail"])["address"] == "127.0.0.1"
    assert [(e["user"], e["host"]) for e in logouts] == [("web:aud", "127.0.0.1")]
    assert all(e["mac"] is not None for e in logins + logouts)  # chained like every journal entry


def test_cookies_are_httponly_samesite_strict_and_pages_forbid_scripts(console) -> None:
    http = httpx.Client(base_url=base_url(console), follow_redirects=False)
    r = http.post("/api/login", json={"name": "vic", "password": PASSWORDS["vic"]})
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert "secure" not in cookie  # plain HTTP on loopback: a Secure cookie would never come back
    page = http.get("/")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script" not in csp  # no script-src at all: none may run
    assert page.headers["x-frame-options"] == "DENY"
    login = httpx.get(base_url(console) + "/login")
    assert "sinkhole_login" in login.headers["set-cookie"]


def test_sessions_end_when_idle_too_long_or_too_old(console, db: Path) -> None:
    client = Client(console, "vic")
    assert client.get("/api/session").status_code == 200
    idle = console.cfg.web.web_idle_timeout
    with sqlite3.connect(db) as conn:  # the session's last use, moved back past the idle timeout
        conn.execute("UPDATE web_sessions SET seen = seen - ?", (idle + 5,))
    assert client.get("/api/session").status_code == 401
    other = Client(console, "aud")
    with sqlite3.connect(db) as conn:  # used just now, but signed in longer ago than a session may last
        conn.execute("UPDATE web_sessions SET created = created - ? WHERE user = 'aud'",
                     (console.cfg.web.web_session_lifetime + 5,))
    assert other.get("/api/session").status_code == 401
    assert query(db, "SELECT count(*) AS n FROM web_sessions") == [{"n": 0}]


def test_five_wrong_passwords_lock_the_account_and_each_failure_is_journaled(console, db: Path) -> None:
    client = Client(console)
    unknown = client.login("nobody-here", "whatever it is")
    assert unknown.status_code == 401
    answers = []
    for _ in range(5):
        r = client.login("aud", "not the password")
        assert r.status_code == 401
        answers.append(r.json()["error"])
    r = client.login("aud", PASSWORDS["aud"])  # the right password, now: still locked
    assert r.status_code == 401
    answers.append(r.json()["error"])
    # the same words whether the account exists, the password is wrong or the account is locked
    assert set(answers) == {unknown.json()["error"]}
    failed = journal(db, "web login failed")[1:]
    assert len(failed) == 6 and all(e["host"] == "127.0.0.1" for e in failed)
    assert [json.loads(e["detail"])["reason"] for e in failed] == ["wrong password"] * 5 + ["locked"]
    lockouts = journal(db, "web lockout")
    assert len(lockouts) == 1 and json.loads(lockouts[0]["detail"])["account"] == "aud"
    assert client.login("nobody", "whatever it is").status_code == 401
    assert json.loads(journal(db, "web login failed")[-1]["detail"])["reason"] == "unknown account"
    listed = cli_ok(db, "user", "list", "--format", "json")
    locked = {u["name"]: u["locked_until"] for u in map(json.loads, listed.splitlines())}
    assert locked["aud"] is not None and locked["ada"] is None
    cli_ok(db, "user", "unlock", "aud")
    assert Client(console).login("aud", PASSWORDS["aud"]).status_code == 200


def test_when_a_lock_runs_out_the_failed_logins_count_from_zero_again(console, db: Path) -> None:
    client = Client(console)
    for _ in range(5):
        assert client.login("vic", "not the password").status_code == 401
    assert client.login("vic", PASSWORDS["vic"]).status_code == 401  # locked
    with sqlite3.connect(db) as conn:  # the lock ran out a second ago
        conn.execute("UPDATE web_users SET locked_until = ? WHERE name = 'vic'", (time.time() - 1,))
    assert client.login("vic", "one more typo").status_code == 401  # one failure: not five, not a new lock
    row = query(db, "SELECT failures, locked_until FROM web_users WHERE name = 'vic'")[0]
    assert row == {"failures": 1, "locked_until": None}
    assert len(journal(db, "web lockout")) == 1
    assert client.login("vic", PASSWORDS["vic"]).status_code == 200


def test_a_rule_added_over_the_api_is_answered_within_a_second_and_journaled_with_the_account(console,
                                                                                              db: Path) -> None:
    admin = Client(console, "ada")
    r = admin.post("/api/rules", {"kind": "block", "names": ["api-added.example"], "note": "ticket 9",
                                  "expires": "2h"})
    assert r.status_code == 200 and r.json()["added"] == ["api-added.example"], r.text
    def answer() -> str:
        reply = ask(console, "www.api-added.example").answer
        return reply[0][0].to_text() if reply else ""

    assert wait_for(lambda: answer() == "0.0.0.0", 5.0)
    entry = journal(db, "block add")[-1]
    assert (entry["user"], entry["host"], entry["command"]) == ("web:ada", "127.0.0.1", "web console: POST /api/rules")
    assert admin.post("/api/rules", {"kind": "block", "names": ["bad..name"]}).status_code == 400
    removed = admin.post("/api/rules/remove", {"kind": "block", "names": ["api-added.example"]})
    assert removed.json()["removed"] == ["api-added.example"]
    assert wait_for(lambda: answer() == "192.0.2.55", 5.0)  # the stub's answer again


def test_the_export_is_exactly_what_sinkhole_log_prints_for_the_same_filter(console, db: Path) -> None:
    for qname in ("chat.deepseek.com", "api.deepseek.com", "chatgpt.com"):
        ask(console, qname)
    wait_for(lambda: len(audit_rows(db)) >= 3, 5.0)
    auditor = Client(console, "aud")
    for fmt in ("csv", "json"):
        for flt in ({}, {"domain": "deepseek.com"}, {"client": "127.0.0.0/8", "category": "deepseek"}):
            exported = auditor.get("/api/log/export", format=fmt, **flt)
            assert exported.status_code == 200
            args = [arg for k, v in flt.items() for arg in (f"--{k}", v)]
            printed = cli_ok(db, "log", "--format", fmt, *args)
            assert exported.text == printed, (fmt, flt)
            assert exported.text.count("deepseek") >= (2 if "domain" in flt else 0)
    assert "attachment" in exported.headers["content-disposition"]


def test_log_pages_follow_each_other_without_gaps_or_repeats(console, db: Path) -> None:
    for i in range(23):
        ask(console, f"h{i}.deepseek.com")
    wait_for(lambda: len(audit_rows(db)) >= 23, 5.0)
    auditor = Client(console, "aud")
    seen, before = [], None
    while True:
        page = auditor.get("/api/log", size=5, domain="deepseek.com", **({"before": before} if before else {})).json()
        seen += [r["seq"] for r in page["rows"]]
        before = page["next"]
        if not before:
            break
    assert seen == sorted((r["seq"] for r in audit_rows(db)), reverse=True)
    one = auditor.get(f"/api/log/{seen[0]}").json()
    assert one["row"]["qname"] == "h22.deepseek.com" and one["rule"]["domain"] == "deepseek.com"
    assert one["chain"]["link"] == 22 and one["chain"]["chain"].startswith("test-node#")
    assert auditor.get("/api/log", client="not-an-address").status_code == 400
    assert auditor.get("/api/log/999999").status_code == 404


def test_verification_with_the_uploaded_key_finds_the_first_bad_row(make_server, stub, db: Path,
                                                                    operator_key: Path) -> None:
    server = make_server(upstream=(stub.address,), web_listen=("127.0.0.1:0",))
    add_user(db, "aud", "auditor", PASSWORDS["aud"])
    for i in range(4):
        ask(server, f"v{i}.deepseek.com")
    wait_for(lambda: len(audit_rows(db)) >= 4, 5.0)
    auditor = Client(server, "aud")
    key = operator_key.read_bytes()
    r = auditor.post("/api/verify?wait=1", files={"key": ("audit.key", key)})
    assert r.status_code == 200, r.text
    assert r.json()["last"]["ok"] is True and r.json()["last"]["summary"].startswith("verified: 1 chains")
    seq = audit_rows(db)[2]["seq"]
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit SET client = '10.9.9.9' WHERE seq = ?", (seq,))
    r = auditor.post("/api/verify?wait=1", files={"key": ("audit.key", key)})
    last = r.json()["last"]
    assert last["ok"] is False
    assert list(last["first_bad"].values()) == [f"chain {audit_rows(db)[0]['chain']}: seq {seq}: edited or forged "
                                                "(MAC mismatch)"]
    assert auditor.post("/api/verify?wait=1", files={"key": ("k", b"not a key")}).status_code == 400
    for suffix in ("", "-wal"):  # the key was never stored
        stored = Path(f"{db}{suffix}")
        assert not stored.exists() or key.split()[2] not in stored.read_bytes()


def test_check_requests_groups_lists_and_accounts_over_the_api(console, db: Path) -> None:
    admin = Client(console, "ada")
    check = admin.get("/api/check", name="chat.deepseek.com").json()
    assert check["decision"] == "blocked" and "0.0.0.0" in check["answer"]
    assert admin.post("/api/groups", {"name": "legal", "networks": "10.30.0.0/16",
                                      "categories": "deepseek"}).status_code == 200
    assert admin.get("/api/check", name="chatgpt.com", client="10.30.1.1").json()["decision"] == "forwarded"
    assert admin.post("/api/lists/disable", {"category": "genai"}).json()["changed"] is True
    assert any(r["category"] == "genai" and not r["enabled"] for r in admin.get("/api/lists").json()["lists"])
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO access_requests (time, client, grp, host, rule, category, name, reason, ref, status)"
                     " VALUES ('2026-01-01T00:00:00Z', '10.30.1.1', 'legal', 'chat.deepseek.com', 'chat.deepseek.com',"
                     " 'deepseek', 'Kim', 'ticket 5', 'AAAAA-BBBBB', 'pending')")
    r = admin.post("/api/requests/approve", {"id": "1", "expires": "1d"})
    assert r.status_code == 200 and r.json()["request"]["status"] == "approved", r.text
    assert r.json()["request"]["decided_by"] == "web:ada"
    assert admin.post("/api/users", {"name": "newbie", "role": "viewer", "password": "short"}).status_code == 400
    assert admin.post("/api/users", {"name": "newbie", "role": "viewer",
                                     "password": "a long enough one"}).status_code == 200
    assert Client(console).login("newbie", "a long enough one").status_code == 200
    assert admin.post("/api/users/remove", {"name": "ada"}).status_code == 400  # not oneself
    assert admin.post("/api/users/remove", {"name": "newbie"}).status_code == 200
    assert [e["action"] for e in journal(db, "user")][-2:] == ["user add", "user remove"]
    assert journal(db, "user add")[-1]["user"] == "web:ada"


def test_a_viewer_changes_their_own_password_and_is_signed_out(console) -> None:
    viewer = Client(console, "vic")
    assert viewer.post("/api/password", {"current": "wrong", "password": "another password"}).status_code == 400
    r = viewer.post("/api/password", {"current": PASSWORDS["vic"], "password": "another password"})
    assert r.status_code == 200
    assert viewer.get("/api/session").status_code == 401
    assert Client(console).login("vic", "another password").status_code == 200


def test_login_form_needs_its_token_and_posts_from_another_origin_are_refused(console) -> None:
    http = httpx.Client(base_url=base_url(console), follow_redirects=False)
    r = http.post("/login", data={"name": "ada", "password": PASSWORDS["ada"]})
    assert r.status_code == 403 and "sinkhole_session" not in r.headers.get("set-cookie", "")
    assert http.post("/api/login", data={"name": "ada", "password": PASSWORDS["ada"]}).status_code == 415
    admin = Client(console, "ada")
    r = admin.http.post("/api/rules", json={"kind": "block", "names": ["x.example"]},
                        headers={"X-CSRF-Token": admin.csrf, "Origin": "http://evil.example"})
    assert r.status_code == 403


def test_text_a_client_or_an_attacker_chose_is_escaped_in_the_pages(console, db: Path) -> None:
    name = dns.name.Name([b"x<script>alert(1)</script>", b"deepseek", b"com", b""])
    dns.query.udp(dns.message.make_query(name, "A"), console.host, port=console.port, timeout=5)
    Client(console).login("<script>alert(2)</script>", "whatever it is")
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO access_requests (time, client, grp, host, rule, category, name, reason, ref, status)"
                     " VALUES ('2026-01-01T00:00:00Z', '127.0.0.1', 'default', 'chat.deepseek.com', 'deepseek.com',"
                     " 'deepseek', '<b>Kim</b>', '<script>alert(3)</script>', 'AAAAA-BBBBB', 'pending')")
    wait_for(lambda: audit_rows(db), 5.0)
    seq = audit_rows(db)[-1]["seq"]
    admin = Client(console, "ada")
    for path in ("/", "/log", f"/log/{seq}", "/changes", "/requests", "/check?name=chat.deepseek.com"):
        html = admin.http.get(path).text
        assert "<script" not in html.lower(), path
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in admin.http.get("/changes").text
    assert "&lt;script&gt;alert(3)&lt;/script&gt;" in admin.http.get("/requests").text


def test_https_with_a_certificate_from_the_ca_and_plain_http_redirected(make_server, stub, db: Path,
                                                                       tmp_path: Path) -> None:
    cli_ok(db, "ca", "init", "--name", "Console test CA")
    server = make_server(upstream=(stub.address,), web_listen=("127.0.0.1:0",))
    add_user(db, "vic", "viewer", PASSWORDS["vic"])
    assert server.server is not None
    port = server.server.bound.web[0].getsockname()[1]
    ca = str(db.parent / "ca" / "ca.pem")
    with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=ssl.create_default_context(cafile=ca)) as http:
        r = http.post("/api/login", json={"name": "vic", "password": PASSWORDS["vic"]})
        assert r.status_code == 200
        cookie = r.headers["set-cookie"].lower()
        assert "secure" in cookie and "httponly" in cookie
        assert http.get("/api/session").json()["account"] == "vic"
        assert "max-age" in http.get("/login").headers["strict-transport-security"]
        # over the connection cap, HTTPS too reads a 429 (after its handshake), not a reset
        from sinkhole.web.console import LIMITS

        held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(LIMITS.per_address)]
        try:
            gate = server.server.console.app.gate  # type: ignore[union-attr]
            assert wait_for(lambda: gate.open.get("127.0.0.1", 0) >= LIMITS.per_address, 30.0)
            with httpx.Client(base_url=f"https://127.0.0.1:{port}",
                              verify=ssl.create_default_context(cafile=ca)) as fresh:
                refused = fresh.get("/login")
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        finally:
            for sock in held:
                sock.close()
    plain = httpx.get(f"http://127.0.0.1:{port}/login?next=/", follow_redirects=False)
    assert plain.status_code == 308 and plain.headers["location"] == f"https://127.0.0.1:{port}/login?next=/"
    # the redirect goes to this console whatever Host the request names: never to a host the client chose
    for host, goes_to in [("evil.example", "127.0.0.1"), ("evil.example:443", "127.0.0.1"), ("[::1]:1", "127.0.0.1"),
                          ("evil.example/x?", "127.0.0.1"), ("", "127.0.0.1"), ("localhost:99", "localhost"),
                          (f"127.0.0.1:{port}", "127.0.0.1")]:
        plain = httpx.get(f"http://127.0.0.1:{port}/log?x=1", headers={"Host": host}, follow_redirects=False)
        assert plain.status_code == 308, host
        assert plain.headers["location"] == f"https://{goes_to}:{port}/log?x=1", (host, plain.headers["location"])


def test_plain_http_is_refused_on_an_address_that_is_not_loopback(make_server, stub, db: Path) -> None:
    from sinkhole.errors import ConfigError

    with pytest.raises(ConfigError, match="plain HTTP is served on loopback only"):
        make_server(upstream=(stub.address,), web_listen=("0.0.0.0:0",))


def test_dashboard_figures(console, db: Path) -> None:
    for qname in ("chat.deepseek.com", "chat.deepseek.com", "use-application-dns.net"):
        ask(console, qname)
    wait_for(lambda: len(audit_rows(db)) >= 3, 5.0)
    viewer = Client(console, "vic")
    d = viewer.get("/api/dashboard", fresh=1).json()  # not the figures computed at start, before the rows
    assert d["totals"]["blocked"] == 2 and d["totals"]["bypass_attempts"] == 1
    assert d["top_names"][0] == {"qname": "chat.deepseek.com", "queries": 2}
    assert d["version"] and d["uptime_s"] >= 0 and d["health"] == []
    assert d["policy"]["blocks"] > 100 and d["processes"] == 1
    assert sum(h["blocked"] for h in d["hourly"]) == 2
    assert viewer.get("/api/dashboard", period="1y").status_code == 400
    started = time.monotonic()
    while not d["queries_per_second"] and time.monotonic() - started < 15:  # the sampler's second sample
        time.sleep(0.5)
        d = viewer.get("/api/dashboard").json()
    assert set(d["queries_per_second"]) >= {"blocked", "canary"}


def test_lists_imported_from_a_url_and_updated_over_the_api(console, db: Path) -> None:
    from tests.policy.test_lists import ListServer

    lists = ListServer()
    try:
        url = lists.put("/ai.txt", "# category: third-party-ai\nimported-ai.example\n||other-ai.example^\n")
        admin = Client(console, "ada")
        r = admin.post("/api/lists/import", {"url": url})
        assert r.status_code == 200 and r.json()["category"] == "third-party-ai" and r.json()["rules"] == 2, r.text
        assert wait_for(lambda: ask(console, "x.imported-ai.example").answer[0][0].to_text() == "0.0.0.0", 5.0)
        assert admin.post("/api/lists/update", {}).json()["results"][0]["text"].startswith("unchanged (304")
        lists.put("/ai.txt", "# category: third-party-ai\nimported-ai.example\n")
        updated = admin.post("/api/lists/update", {"categories": ["third-party-ai"]}).json()
        assert updated["failed"] == 0 and updated["results"][0]["text"].startswith("updated, 1 rules")
        bad = lists.put("/bad.txt", "good.example\nbad..name\n")
        r = admin.post("/api/lists/import", {"url": bad, "category": "bad"})
        assert r.status_code == 400 and r.json()["error"].startswith(f"{bad}:2: ")  # the list's bad line
        local = admin.post("/api/lists/import", {"url": str(db), "category": "local"})  # never a server's file
        assert local.status_code == 400 and "only http:// and https:// URLs" in local.json()["error"]
        entries = [e for e in journal(db, "lists") if e["user"] == "web:ada"]
        assert [e["action"] for e in entries] == ["lists import", "lists update"]
    finally:
        lists.close()


# `next` values that a browser would follow to another host (or run): the login must send each to "/"
HOSTILE_NEXT = ["//x.example", "/%09/x.example", "/\t/x.example", "/\\x.example", "/%5cx.example", "%2f%2fx.example",
                "/%2f/x.example", "/%252f/x.example", "https://x.example", "javascript:alert(1)", " //x.example",
                "/\r\n/x.example", "/%0d%0a/x.example", "/%20/x.example"]


def _login_form(http: httpx.Client, next_value: str) -> tuple[str, str]:
    """The login page for `next_value`: its form token and the `next` it will post back."""
    page = http.get("/login", params={"next": next_value})
    assert page.status_code == 200, page.text
    token = re.search(r'name="token" value="([^"]+)"', page.text)
    kept = re.search(r'name="next" value="([^"]*)"', page.text)
    assert token and kept
    return token.group(1), html.unescape(kept.group(1))


def test_login_sends_a_hostile_next_to_the_start_page_and_a_path_of_this_site_to_itself(console) -> None:
    signed_in = Client(console, "vic")
    for value in HOSTILE_NEXT:  # already signed in: /login redirects at once
        r = signed_in.http.get("/login", params={"next": value})
        assert r.status_code == 303 and r.headers["location"] == "/", (value, r.headers.get("location"))
    http = httpx.Client(base_url=base_url(console), follow_redirects=False, timeout=30)
    for value in HOSTILE_NEXT:  # the form keeps "/" in place of the value
        assert _login_form(http, value)[1] == "/", value
    # posted straight to the form (as another site's page could): still "/"; logins are rate limited, so
    # the six that matter most and one path of this site
    for value in ["//x.example", "/%09/x.example", "/\\x.example", "%2f%2fx.example", "https://x.example",
                  "javascript:alert(1)", "/log?domain=a%20b.example"]:
        http.cookies.clear()
        token, _ = _login_form(http, "/")
        r = http.post("/login", data={"token": token, "next": value, "name": "vic", "password": PASSWORDS["vic"]})
        assert r.status_code == 303, (value, r.status_code, r.text)
        expected = value if value.startswith("/log") else "/"
        assert r.headers["location"] == expected, (value, r.headers["location"])


def test_logins_and_logouts_make_no_new_policy_version(console, db: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from sinkhole.store.db import Store

    caplog.set_level(logging.INFO, logger="sinkhole.service.server")
    assert console.server is not None
    start = console.server.policy.version
    with Store(db) as store:
        assert store.policy_version() == start
    for name in ("vic", "aud"):
        client = Client(console, name)
        assert client.post("/api/logout").status_code == 200
    assert Client(console).login("vic", "a wrong password").status_code == 401
    assert len(journal(db, "web log")) == 5  # journaled: two logins, two logouts, one failure ...
    with Store(db) as store:
        assert store.policy_version() == start  # ... but none of them is a change of the policy
    # a real change after them: once it is answered, every poll of the journal since the logins has run
    admin = Client(console, "ada")
    assert admin.post("/api/rules", {"kind": "block", "names": ["after-logins.example"]}).status_code == 200
    changed = journal(db, "block add")[-1]["id"]
    assert wait_for(lambda: ask(console, "after-logins.example").answer[0][0].to_text() == "0.0.0.0", 10.0)
    assert console.server.policy.version == changed
    versions = [r.getMessage() for r in caplog.records if "in force:" in r.getMessage()]
    assert versions and all(m.startswith(f"policy version {changed} in force") for m in versions), versions


def _http_get(port: int, path: str = "/login", timeout: float = 30) -> tuple[int, dict[str, str], str]:
    """One request on a new connection, read to its end: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        resp = http.client.HTTPResponse(sock, method="GET")
        resp.begin()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()


def test_over_the_connection_cap_the_console_answers_429_with_retry_after(console) -> None:
    from sinkhole.web.console import LIMITS

    port = int(base_url(console).rsplit(":", 1)[1])
    held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(LIMITS.per_address)]
    try:
        # the gate admits in the order it accepts: once these are in, the next connection is over the cap
        gate = console.server.console.app.gate  # type: ignore[union-attr]
        assert wait_for(lambda: gate.accepted >= LIMITS.per_address, 30.0)
        status, headers, body = _http_get(port)
        assert status == 429, (status, body)
        assert int(headers["retry-after"]) >= 1 and "Too many connections" in body
    finally:
        for sock in held:
            sock.close()
    # the slots free as the held connections close: the console answers again (the wait is not the test)
    assert wait_for(lambda: _http_get(port)[0] == 200, 30.0)
