"""The web console as officers and admins use it: Debian's Chromium driven by Playwright (one browser for the
module, a fresh context per test), against a real server on loopback, with `dig` (a client nobody here wrote)
asking the DNS side. Downloads and screenshots go to pytest's temporary directory, never into the repository.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.name
import dns.query
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.conftest import RunningServer, audit_rows, query, wait_for
from tests.web.test_console_api import PASSWORDS, ROLES, add_user, base_url, cli_ok


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    exe = shutil.which("chromium")
    assert exe, "chromium is missing: .ci/run installs it"
    args = ["--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=args)
        yield b
        b.close()


@pytest.fixture
def context(browser: Browser, tmp_path: Path) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    yield ctx
    ctx.close()


@pytest.fixture
def console(make_server, stub, db: Path) -> RunningServer:
    server = make_server(upstream=(stub.address,), web_listen=("127.0.0.1:0",))
    for name, password in PASSWORDS.items():
        add_user(db, name, ROLES[name], password)
    return server


def sign_in(tab: Page, server: RunningServer, name: str, password: str | None = None) -> None:
    tab.goto(base_url(server) + "/login")
    tab.fill("#name", name)
    tab.fill("#password", password or PASSWORDS[name])
    with tab.expect_navigation():
        tab.click("#signin")


def dig(server: RunningServer, name: str, source: str = "127.0.0.1") -> str:
    out = subprocess.run(["dig", f"@{server.host}", "-p", str(server.port), "-b", source, name, "A", "+short",
                          "+time=2", "+tries=1"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


def test_an_admin_blocks_a_name_then_finds_and_exports_the_queries_of_one_address(console, context, db: Path,
                                                                                   tmp_path: Path) -> None:
    tab = context.new_page()
    sign_in(tab, console, "ada")
    assert tab.inner_text("#account") == "ada" and tab.inner_text("#role") == "admin"
    assert "blocked queries" in tab.inner_text("#totals")
    tab.goto(base_url(console) + "/rules")
    tab.fill("#add-names", "tour-ai.example")
    tab.fill("#add-note", "ticket 4711")
    with tab.expect_navigation():
        tab.click("#add")
    assert "block: tour-ai.example (category manual)" in tab.inner_text("#flash")
    # in force within a second: dig is asked until it answers the sinkhole address (the wait is not the test)
    assert wait_for(lambda: dig(console, "api.tour-ai.example") == "0.0.0.0", 5.0)
    assert dig(console, "chat.tour-ai.example", source="127.0.0.2") == "0.0.0.0"
    assert wait_for(lambda: any(r["client"] == "127.0.0.2" for r in audit_rows(db)), 5.0)

    tab.goto(base_url(console) + "/log")
    tab.fill("input[name=client]", "127.0.0.2")
    with tab.expect_navigation():
        tab.click("#apply")
    assert "client=127.0.0.2" in tab.url  # the filter lives in the URL: a bookmark shows the same rows
    clients = tab.locator("#rows td.client").all_inner_texts()
    assert clients and set(clients) == {"127.0.0.2"}
    assert "chat.tour-ai.example" in tab.locator("#rows td.qname").all_inner_texts()
    with tab.expect_download() as got:
        tab.click("#export-csv")
    exported = tmp_path / "export.csv"
    got.value.save_as(exported)
    assert exported.read_text() == cli_ok(db, "log", "--format", "csv", "--client", "127.0.0.2")

    tab.click("#rows a >> nth=0")  # the row's page: why it was blocked, and where it sits in its chain
    assert tab.inner_text("#rule") == "tour-ai.example"
    assert tab.inner_text("#source") == "ticket 4711"
    assert tab.inner_text("#link").isdigit()

    tab.goto(base_url(console) + "/changes")
    assert "web:ada" in tab.inner_text("#changes")  # journaled with the web account as the actor

    assert dig(console, "www.example.test")  # forwarded: the dashboard has an upstream to show
    for width, path in ((375, "/log?client=127.0.0.2"), (375, "/"), (1280, "/")):  # narrow screens too
        tab.set_viewport_size({"width": width, "height": 800})
        tab.goto(base_url(console) + path)
        assert tab.evaluate("document.documentElement.scrollWidth") <= width, (width, path)
    # at 1280 px every table of the dashboard shows whole: none is cut to a scroll box of its own
    assert tab.locator("#upstreams table").count() == 1
    cut = tab.evaluate("[...document.querySelectorAll('.scroll')].filter(e => e.scrollWidth > e.clientWidth + 1)"
                       ".map(e => (e.closest('section') || {}).id || e.closest('section').querySelector('h2')"
                       ".textContent)")
    assert cut == [], cut
    tab.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)


def test_an_auditor_reads_the_policy_but_cannot_add_a_rule(console, context, db: Path) -> None:
    tab = context.new_page()
    sign_in(tab, console, "aud")
    tab.goto(base_url(console) + "/rules")
    assert tab.locator("#rules").count() == 1 and tab.locator("#add-rule").count() == 0
    csrf = tab.get_attribute("input[name=csrf]", "value")  # the session's own token, from the sign-out form
    response = tab.request.post(base_url(console) + "/rules", form={"csrf": csrf or "", "kind": "block",
                                                                   "names": "auditor-ai.example"})
    assert response.status == 403
    assert not query(db, "SELECT * FROM rules WHERE domain = 'auditor-ai.example'")
    assert tab.locator("nav.main a", has_text="Accounts").count() == 0
    tab.goto(base_url(console) + "/users")
    assert "needs the admin role" in tab.inner_text("#message")


def test_five_wrong_passwords_lock_the_account(console, context, db: Path) -> None:
    tab = context.new_page()
    seen = set()
    for _ in range(5):
        sign_in(tab, console, "vic", "guessing wrong")
        seen.add(tab.inner_text("#error"))
    sign_in(tab, console, "vic")  # the right password: locked all the same
    seen.add(tab.inner_text("#error"))
    assert tab.locator("#account").count() == 0
    sign_in(tab, console, "no-such-account", "guessing wrong")
    seen.add(tab.inner_text("#error"))
    # one message for all: a locked account reads as a wrong password, and neither tells that the account exists
    assert len(seen) == 1 and "Wrong name or password" in seen.pop()
    assert len([r for r in query(db, "SELECT action FROM journal") if r["action"] == "web login failed"]) == 7


def test_text_carrying_script_is_shown_escaped_and_never_runs(console, context, db: Path) -> None:
    payload = "<script>window.__xss=1</script><img src=x onerror=window.__xss=2>"
    name = dns.name.Name([b"<script>__xss=3</script>", b"deepseek", b"com", b""])
    dns.query.udp(dns.message.make_query(name, "A"), console.host, port=console.port, timeout=5)
    tab = context.new_page()
    sign_in(tab, console, payload[:60], "any password")  # a failed login: the name goes into the journal as typed
    with sqlite3.connect(db) as conn:  # as the block page's request form stores them: raw text
        conn.execute("INSERT INTO access_requests (time, client, grp, host, rule, category, name, reason, ref, status)"
                     " VALUES ('2026-01-01T00:00:00Z', '127.0.0.1', 'default', 'chat.deepseek.com', 'deepseek.com',"
                     " 'deepseek', ?, ?, 'AAAAA-BBBBB', 'pending')", (payload, payload))
    wait_for(lambda: audit_rows(db), 5.0)
    seq = audit_rows(db)[-1]["seq"]
    sign_in(tab, console, "ada")
    pages = {"/?fresh=1": "\\060script\\062", "/log": "\\060script\\062", f"/log/{seq}": "\\060script\\062",
             "/changes": "<script>window.__xss=1</script>", "/requests": "<script>window.__xss=1</script>"}
    for path, shown in pages.items():
        tab.goto(base_url(console) + path)
        assert tab.evaluate("window.__xss === undefined"), path
        assert tab.evaluate("document.scripts.length") == 0, path  # no script element was made from the text
        assert tab.locator("img").count() == 0, path
        assert shown in tab.inner_text("main"), path  # shown, as text
