"""The block page as a person sees it: Debian's Chromium, driven by Playwright, with the test CA trusted.

The CA (`sinkhole ca init`) is trusted in a temporary NSS database (certutil, HOME pointed at a temporary
directory, so ~/.pki/nssdb is the test's own), as group policy makes an agency's PCs trust its root. Names
reach the page through sinkhole's own answer: the test asks sinkhole for the name, and Chromium's
--host-resolver-rules maps the name to the address sinkhole answered, at the page's ephemeral port (tests
do not bind 443). The browser is Debian's `chromium` (executable_path); `playwright install` is never run.
Screenshots go to pytest's temporary directory, never into the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from playwright.sync_api import Browser, Error, Playwright, sync_playwright

from sinkhole.cli import cli
from tests.conftest import RunningServer, ask, audit_rows, query, wait_for

PAGE_HOST = "127.0.0.7"


@pytest.fixture
def ca(db: Path) -> Path:
    result = CliRunner().invoke(cli, ["--db", str(db), "ca", "init", "--name", "Test agency CA"])
    assert result.exit_code == 0, result.output
    return db.parent / "ca" / "ca.pem"


@pytest.fixture
def home(tmp_path: Path, ca: Path) -> Path:
    """A HOME whose NSS database trusts the test CA (what Chromium on Linux reads)."""
    home = tmp_path / "home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    for args in (["-N", "--empty-password"], ["-A", "-t", "C,,", "-n", "sinkhole test CA", "-i", str(ca)]):
        subprocess.run(["certutil", "-d", f"sql:{nssdb}", *args], check=True, capture_output=True, timeout=30)
    return home


@pytest.fixture
def page(make_server, stub, ca: Path) -> RunningServer:
    return make_server(upstream=(stub.address,), blockpage_listen=(f"{PAGE_HOST}:0",),
                       blockpage_agency="Ministry of Examples", blockpage_contact="helpdesk 1234")


@pytest.fixture
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


def launch(playwright: Playwright, server: RunningServer, home: Path, names: list[str],
           lang: str = "en") -> Browser:
    """Chromium that resolves each name to the address sinkhole answers for it, on the page's port."""
    assert server.server is not None
    port = server.server.bound.blockpage[0].getsockname()[1]
    rules = []
    for name in names:
        answered = ask(server, name).answer[0][0].to_text()
        if answered != PAGE_HOST:  # an allowed name: as if a stale DNS cache still held the page's address
            answered = PAGE_HOST
        rules += [f"MAP {name}:443 {answered}:{port}", f"MAP {name}:80 {answered}:{port}"]
    args = [f"--host-resolver-rules={', '.join(rules)}", f"--lang={lang}", f"--accept-lang={lang}", "--disable-quic",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    exe = shutil.which("chromium")
    assert exe, "chromium is missing: .ci/run installs it"
    # Playwright gives each launch a fresh temporary profile (user-data-dir)
    return playwright.chromium.launch(executable_path=exe, args=args, env={**os.environ, "HOME": str(home)})


def test_chromium_shows_the_page_for_blocked_names_over_https_with_no_certificate_error(
        playwright, page, home, db, tmp_path: Path) -> None:
    browser = launch(playwright, page, home, ["chat.deepseek.com", "chatgpt.com"])
    try:
        tab = browser.new_page()
        for name, category in (("chat.deepseek.com", "deepseek"), ("chatgpt.com", "genai")):
            response = tab.goto(f"https://{name}/")  # a certificate error would raise net::ERR_CERT_...
            assert response is not None and response.status == 403
            details = response.security_details()
            assert details is not None and details.get("subjectName") == name
            assert details.get("issuer") == "Test agency CA"
            assert tab.inner_text("h1") == "Access to this site is restricted"
            assert tab.inner_text("#host") == name
            assert tab.inner_text("#category") == category
            assert tab.inner_text("#contact") == "helpdesk 1234"
            assert "Ministry of Examples" in tab.inner_text("header")
            assert len(tab.inner_text("#reference")) == 11
            tab.screenshot(path=str(tmp_path / f"{name}.png"))  # pytest's tmp dir: never in git
        response = tab.goto("http://chat.deepseek.com/some/page")  # plain HTTP (or Chromium's upgrade to HTTPS)
        assert response is not None and response.status == 403 and tab.inner_text("#host") == "chat.deepseek.com"
    finally:
        browser.close()

    def views() -> list[dict]:
        return [r for r in audit_rows(db) if r["action"] == "page"]

    rows = wait_for(lambda: len(views()) >= 3 and all("dns seq" in r["answer"] for r in views()) and views(), 30.0)
    assert rows, audit_rows(db)
    assert {(r["qname"], r["transport"]) for r in rows} >= {("chat.deepseek.com", "https"), ("chatgpt.com", "https")}
    assert all(r["client"] == "127.0.0.1" and r["rcode"] == "403" for r in rows)
    assert not any("some/page" in str(v) for r in audit_rows(db) for v in r.values())


def test_chromium_with_lang_ko_gets_the_korean_page(playwright, page, home) -> None:
    browser = launch(playwright, page, home, ["chat.deepseek.com"], lang="ko")
    try:
        tab = browser.new_page()
        response = tab.goto("https://chat.deepseek.com/")
        assert response is not None and response.status == 403
        assert tab.inner_text("h1") == "이 사이트에 대한 접속이 제한되었습니다"
        assert "기관 정책에 따라" in tab.inner_text("#lead")
        assert tab.get_attribute("html", "lang") == "ko"
    finally:
        browser.close()


def test_chromium_gets_no_certificate_for_a_name_that_is_not_blocked(playwright, page, home, db) -> None:
    browser = launch(playwright, page, home, ["www.example.test", "chat.deepseek.com"])
    try:
        tab = browser.new_page()
        with pytest.raises(Error, match=r"net::ERR_(CONNECTION_CLOSED|SSL_PROTOCOL_ERROR|CONNECTION_RESET)"):
            tab.goto("https://www.example.test/")
        tab = browser.new_page()  # (the first tab goes on to Chromium's error page)
        response = tab.goto("https://chat.deepseek.com/")  # the same address, a blocked name: the page
        assert response is not None and response.status == 403
    finally:
        browser.close()
    assert wait_for(lambda: any(r["action"] == "page" for r in audit_rows(db)), 30.0)
    assert not any(r["qname"] == "www.example.test" and r["action"] == "page" for r in audit_rows(db))


def test_chromium_files_an_access_request_from_the_page(playwright, page, home, db) -> None:
    browser = launch(playwright, page, home, ["chat.deepseek.com"])
    try:
        tab = browser.new_page()
        tab.goto("https://chat.deepseek.com/")
        tab.fill("#name", "Kim Minji")
        tab.fill("#reason", "Evaluating the API for ticket 4711")
        with tab.expect_navigation():
            tab.click("button[type=submit]")
        assert "Your request number 1 was recorded" in tab.inner_text("#notice")
        assert tab.locator("form#request").count() == 0
    finally:
        browser.close()
    rows = query(db, "SELECT client, host, name, reason, status FROM access_requests")
    assert rows == [{"client": "127.0.0.1", "host": "chat.deepseek.com", "name": "Kim Minji",
                     "reason": "Evaluating the API for ticket 4711", "status": "pending"}]
