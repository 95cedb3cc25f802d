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
    for _ in range(3):  # identical answers within the audit window (1 s) are one row with a count
        assert dig(console, "chat.tour-ai.example", source="127.0.0.2") == "0.0.0.0"
    assert wait_for(lambda: sum(r["count"] for r in audit_rows(db) if r["client"] == "127.0.0.2") == 3, 10.0)
    rows_of_client = [r for r in audit_rows(db) if r["client"] == "127.0.0.2"]

    tab.goto(base_url(console) + "/log")
    tab.fill("input[name=client]", "127.0.0.2")
    with tab.expect_navigation():
        tab.click("#apply")
    assert "client=127.0.0.2" in tab.url  # the filter lives in the URL: a bookmark shows the same rows
    clients = tab.locator("#rows td.client").all_inner_texts()
    assert clients and set(clients) == {"127.0.0.2"}
    assert "chat.tour-ai.example" in tab.locator("#rows td.qname").all_inner_texts()
    # the person sees how many answers each row stands for, and they add up to the three queries
    assert "count" in tab.locator("#rows thead th").all_inner_texts()
    counts = tab.locator("#rows td.count").all_inner_texts()
    assert sorted(map(int, counts)) == sorted(r["count"] for r in rows_of_client) and sum(map(int, counts)) == 3
    with tab.expect_download() as got:
        tab.click("#export-csv")
    exported = tmp_path / "export.csv"
    got.value.save_as(exported)
    assert exported.read_text() == cli_ok(db, "log", "--format", "csv", "--client", "127.0.0.2")

    tab.click("#rows a >> nth=0")  # the row's page: why it was blocked, and where it sits in its chain
    assert tab.inner_text("#rule") == "tour-ai.example"
    assert tab.inner_text("#source") == "ticket 4711"
    assert tab.inner_text("#link").isdigit()
    assert tab.inner_text("#count").split()[0] == counts[0]

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


# ---------------------------------------------------------------------------- every page, one flow each


def submit(tab: Page, selector: str) -> None:
    """Click a form's button and wait for the page it leads to."""
    with tab.expect_navigation():
        tab.click(selector)


def row_of(tab: Page, table: str, first_cell: str):
    return tab.locator(f"#{table} tbody tr", has=tab.locator("td:first-child", has_text=first_cell))


def test_an_admin_works_the_lists_groups_and_check_pages(console, context, db: Path) -> None:
    from tests.policy.test_lists import ListServer

    tab = context.new_page()
    sign_in(tab, console, "ada")
    base = base_url(console)
    # check: the decision and the exact answer, for a blocked name and for one that is not
    tab.goto(base + "/check")
    tab.fill("#check-name", "chat.deepseek.com")
    submit(tab, "#check")
    assert tab.inner_text("#check-decision") == "blocked" and tab.inner_text("#check-category") == "deepseek"
    assert "0.0.0.0" in tab.inner_text("#answer")
    tab.fill("#check-name", "www.example.test")
    submit(tab, "#check")
    assert tab.inner_text("#check-decision") != "blocked" and "0.0.0.0" not in tab.inner_text("#answer")

    # lists: take a category out of force and back; import one from a URL
    tab.goto(base + "/lists")
    assert row_of(tab, "lists", "deepseek").locator("td").nth(1).inner_text() == "yes"
    submit(tab, "#lists tr:has(td:first-child:text-is('deepseek')) button")
    assert tab.inner_text("#flash") == "category deepseek is out of force"
    assert row_of(tab, "lists", "deepseek").locator("td").nth(1).inner_text() == "no"
    assert wait_for(lambda: dig(console, "chat.deepseek.com") not in ("0.0.0.0", ""), 30.0)
    submit(tab, "#lists tr:has(td:first-child:text-is('deepseek')) button")
    assert tab.inner_text("#flash") == "category deepseek is in force"
    served = ListServer()
    try:
        url = served.put("/ai.txt", "# category: browser-ai\nbrowser-imported.example\n")
        tab.fill("form[action='/lists/import'] input[name=url]", url)
        submit(tab, "form[action='/lists/import'] button")
    finally:
        served.close()
    assert tab.inner_text("#flash").startswith("imported ") and "into category browser-ai" in tab.inner_text("#flash")
    assert row_of(tab, "lists", "browser-ai").locator("td").nth(2).inner_text() == "1"
    assert wait_for(lambda: dig(console, "x.browser-imported.example") == "0.0.0.0", 30.0)

    # groups: a group of one address with no category in force gets the name answered; removed, blocked again
    tab.goto(base + "/groups")
    tab.fill("form[action='/groups'] input[name=name]", "lab")
    tab.fill("form[action='/groups'] input[name=networks]", "127.0.0.2/32")
    tab.fill("form[action='/groups'] input[name=categories]", "none")
    submit(tab, "form[action='/groups'] button")
    assert tab.inner_text("#flash") == "created group lab"
    assert "127.0.0.2/32" in row_of(tab, "groups", "lab").inner_text()
    assert wait_for(lambda: dig(console, "chat.deepseek.com", source="127.0.0.2") not in ("0.0.0.0", ""), 30.0)
    assert dig(console, "chat.deepseek.com") == "0.0.0.0"  # everyone else: still blocked
    submit(tab, "#groups tr:has(td:first-child:text-is('lab')) button")
    assert tab.inner_text("#flash") == "removed group lab" and row_of(tab, "groups", "lab").count() == 0
    assert wait_for(lambda: dig(console, "chat.deepseek.com", source="127.0.0.2") == "0.0.0.0", 30.0)


def test_an_admin_approves_one_access_request_and_denies_another(console, context, db: Path) -> None:
    with sqlite3.connect(db) as conn:  # as the block page's form stores them
        for host, who in (("chat.deepseek.com", "Kim Minji"), ("claude.ai", "Lee Joon")):
            conn.execute("INSERT INTO access_requests (time, client, grp, host, rule, category, name, reason, ref,"
                         " status) VALUES ('2026-01-01T00:00:00Z', '127.0.0.1', 'default', ?, ?, 'genai', ?,"
                         " 'evaluation', 'AAAAA-BBBBB', 'pending')", (host, host, who))
    tab = context.new_page()
    sign_in(tab, console, "ada")
    tab.goto(base_url(console) + "/requests")
    assert tab.locator("#requests tbody tr").count() == 2
    first = tab.locator("#requests tbody tr", has_text="Kim Minji")
    first.locator("input[name=expires]").fill("1h")
    submit(tab, "#requests tbody tr:has-text('Kim Minji') form[action='/requests/approve'] button")
    assert tab.inner_text("#flash").startswith("request 1 approved: chat.deepseek.com (manual) until 20")
    submit(tab, "#requests tbody tr:has-text('Lee Joon') form[action='/requests/deny'] button")
    assert tab.inner_text("#flash") == "request 2 denied"
    assert tab.locator("#requests tbody tr", has_text="Kim Minji").count() == 0  # pending only, by default
    tab.select_option("select[name=status]", "all")
    submit(tab, "form[action='/requests'] button")
    statuses = tab.locator("#requests tbody tr td:nth-child(8)").all_inner_texts()
    assert sorted(s.split(":")[0] for s in statuses) == ["approved", "denied"]
    assert wait_for(lambda: dig(console, "chat.deepseek.com") not in ("0.0.0.0", ""), 30.0)  # allowed now
    assert dig(console, "claude.ai") == "0.0.0.0"  # denied: still blocked


def test_an_auditor_verifies_the_chains_with_the_key_file_and_opens_the_report(operator_key: Path, console,
                                                                               context, db: Path) -> None:
    for i in range(3):
        dig(console, f"v{i}.deepseek.com")
    assert wait_for(lambda: len(audit_rows(db)) >= 3, 30.0)
    tab = context.new_page()
    sign_in(tab, console, "aud")
    tab.goto(base_url(console) + "/verify")
    assert "No verification since the server started" in tab.inner_text("#result")
    tab.set_input_files("#key", str(operator_key))
    submit(tab, "#verify")
    assert tab.inner_text("#flash").startswith("Verification started")

    def summary() -> str:
        tab.goto(base_url(console) + "/verify")
        return tab.inner_text("#summary") if tab.locator("#summary").count() else ""

    text = wait_for(summary, 60.0, interval=0.3)  # the walk runs on its own thread: look again until it is done
    assert text.startswith("verified: 1 chains") and "status-ok" in (tab.get_attribute("#summary", "class") or "")

    tab.goto(base_url(console) + "/report")
    submit(tab, "#make-report")
    assert tab.inner_text("h1") == "Blocked generative-AI lookups"
    assert "verified in the web console by aud" in tab.inner_text("body")
    assert tab.evaluate("document.scripts.length") == 0


def test_an_admin_adds_an_account_and_a_viewer_changes_their_own_password(console, context, browser) -> None:
    tab = context.new_page()
    sign_in(tab, console, "ada")
    tab.goto(base_url(console) + "/users")
    tab.fill("form[action='/users'] input[name=name]", "newbie")
    tab.select_option("form[action='/users'] select[name=role]", "auditor")
    tab.fill("form[action='/users'] input[name=password]", "newbie password 1")
    submit(tab, "form[action='/users'] button")
    assert tab.inner_text("#flash") == "account newbie: done"
    assert row_of(tab, "users", "newbie").locator("td").nth(1).inner_text() == "auditor"
    tab.fill("form[action='/users'] input[name=name]", "short")
    tab.fill("form[action='/users'] input[name=password]", "x" * 10)
    tab.evaluate("document.querySelector(\"form[action='/users'] input[name=password]\").value = 'short'")
    submit(tab, "form[action='/users'] button")  # past the browser's own minlength: the server says why
    assert "at least 10 characters" in tab.inner_text("#flash") and row_of(tab, "users", "short").count() == 0

    other = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        viewer = other.new_page()
        sign_in(viewer, console, "newbie", "newbie password 1")
        assert viewer.inner_text("#account") == "newbie" and viewer.inner_text("#role") == "auditor"
        viewer.goto(base_url(console) + "/password")
        viewer.fill("input[name=current]", "newbie password 1")
        viewer.fill("input[name=password]", "a brand new one 2")
        submit(viewer, "form[action='/password'] button")
        assert viewer.url.endswith("/login") and viewer.locator("#account").count() == 0  # signed out
        sign_in(viewer, console, "newbie", "newbie password 1")
        assert viewer.locator("#account").count() == 0 and "Wrong name or password" in viewer.inner_text("#error")
        sign_in(viewer, console, "newbie", "a brand new one 2")
        assert viewer.inner_text("#account") == "newbie"
    finally:
        other.close()
