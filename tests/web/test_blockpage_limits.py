"""The block page's limits, each driven over real sockets until it bites: page views per client (VIEW_RATE),
new connections per client (the gate's token bucket), access requests per client (REQUEST_RATE), the sizes
of a request (line, headers, body) and of the logo (LOGO_MAX).

The two rates refill with time; they are tested with the refill slowed to nothing (the module's constants,
patched before the server starts), so that what the test sees never depends on how fast the machine is.
"""

from __future__ import annotations

import base64
import re
import socket
from pathlib import Path

import pytest

from sinkhole.errors import ConfigError
from sinkhole.web import blockpage
from sinkhole.web.limits import Limits
from tests.conftest import RunningServer, query
from tests.web import test_blockpage
from tests.web.test_blockpage import PAGE_HOST, _form, fetch, page_port

ca = test_blockpage.ca  # the fixture: a CA made by `sinkhole ca init`
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def serve(make_server, stub, **settings: object) -> RunningServer:
    return make_server(upstream=(stub.address,), blockpage_listen=(f"{PAGE_HOST}:0",), **settings)


def raw_request(server: RunningServer, data: bytes) -> bytes:
    """Bytes sent as they are on a new plain-HTTP connection; everything the page answers."""
    with socket.create_connection((PAGE_HOST, page_port(server)), timeout=30) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_page_views_over_the_burst_get_a_bare_403_and_other_clients_are_served(make_server, stub, ca,
                                                                                monkeypatch) -> None:
    monkeypatch.setattr(blockpage, "VIEW_RATE", (1e-6, 3.0))  # a burst of 3, refilled never (in a test's time)
    s = serve(make_server, stub)
    texts = [fetch(s, "chat.deepseek.com", ca=ca)[1] for _ in range(3)]
    assert all("Access to this site is restricted" in t for t in texts)
    resp, text = fetch(s, "chat.deepseek.com", ca=ca)
    assert resp.status == 403 and text == "403 Forbidden: too many requests\n"  # no page, no audit row, no minting
    resp, text = fetch(s, "chat.deepseek.com", ca=ca, source="127.0.0.2")  # the limit is per client address
    assert resp.status == 403 and "Access to this site is restricted" in text
    assert s.server.blockpage.page.counts["limited"] == 1  # type: ignore[union-attr]


def test_new_connections_over_the_rate_are_closed_before_a_byte_is_read(make_server, stub, ca, monkeypatch) -> None:
    monkeypatch.setattr(blockpage, "Limits", lambda: Limits(rate=1e-6, burst=3.0))
    s = serve(make_server, stub)
    for _ in range(3):
        assert fetch(s, "chat.deepseek.com", ca=ca)[0].status == 403  # the page
    with pytest.raises(ConnectionError):  # the fourth: closed (reset) at accept, unanswered
        raw = raw_request(s, b"GET / HTTP/1.1\r\nHost: chat.deepseek.com\r\nConnection: close\r\n\r\n")
        if raw == b"":
            raise ConnectionResetError("closed without an answer")
    assert s.server.blockpage.page.gate.refused >= 1  # type: ignore[union-attr]
    assert fetch(s, "chat.deepseek.com", ca=ca, source="127.0.0.2")[0].status == 403  # another client: served


def test_a_client_files_at_most_three_access_requests(make_server, stub, ca, db: Path) -> None:
    s = serve(make_server, stub)
    answers = []
    for i, host in enumerate(["chat.deepseek.com", "chatgpt.com", "claude.ai", "gemini.google.com"]):
        _, text = fetch(s, host, ca=ca)
        form = _form(text)
        body = f"ref={form['ref']}&token={form['token']}&name=Kim&reason=ticket+{i}".encode()
        _, text = fetch(s, host, blockpage.REQUEST_PATH, "POST", ca=ca, body=body, headers=FORM)
        answers.append(text)
    assert [("was recorded" in t) for t in answers] == [True, True, True, False]
    assert "too many requests from this computer" in answers[3]
    assert [r["host"] for r in query(db, "SELECT host FROM access_requests ORDER BY id")] == [
        "chat.deepseek.com", "chatgpt.com", "claude.ai"]


def test_request_line_headers_and_body_over_their_limits_are_refused(make_server, stub, ca, db: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG, logger="sinkhole.web.http")
    s = serve(make_server, stub)
    lim = s.server.blockpage.page.limits  # type: ignore[union-attr]
    long_line = raw_request(s, f"GET /{'a' * (lim.max_line + 10)} HTTP/1.1\r\nHost: chatgpt.com\r\n\r\n".encode())
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", long_line), long_line[:80]
    many = "".join(f"X-H{i}: v\r\n" for i in range(lim.max_headers + 1))
    too_many = raw_request(s, f"GET / HTTP/1.1\r\nHost: chatgpt.com\r\n{many}\r\n".encode())
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", too_many), too_many[:80]
    _, text = fetch(s, "chatgpt.com", ca=ca)
    form = _form(text)
    body = f"ref={form['ref']}&token={form['token']}&name=Kim&reason=".encode() + b"a" * (lim.max_body + 1)
    resp, text = fetch(s, "chatgpt.com", blockpage.REQUEST_PATH, "POST", ca=ca, body=body, headers=FORM)
    assert resp.status == 403 and "could not be recorded" in text
    assert query(db, "SELECT count(*) AS n FROM access_requests") == [{"n": 0}]
    assert fetch(s, "chatgpt.com", ca=ca)[0].status == 403  # and it keeps serving
    # a client's malformed request is not an error of the server: one DEBUG line, no traceback, no ERROR
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    said = [r.getMessage() for r in caplog.records if r.name == "sinkhole.web.http"]
    assert len(said) == 2 and all(m.startswith("a request that is not valid HTTP from 127.0.0.1: ") for m in said)


def test_a_logo_is_inlined_up_to_its_limit_and_a_larger_one_is_refused(make_server, stub, ca,
                                                                      tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n"
    fits, over = tmp_path / "fits.png", tmp_path / "over.png"
    fits.write_bytes(png + b"\0" * (blockpage.LOGO_MAX - len(png)))
    over.write_bytes(png + b"\0" * (blockpage.LOGO_MAX + 1 - len(png)))
    with pytest.raises(ConfigError, match=rf"over.png is {blockpage.LOGO_MAX + 1} bytes, over {blockpage.LOGO_MAX}"):
        serve(make_server, stub, blockpage_logo=str(over))
    s = serve(make_server, stub, blockpage_logo=str(fits))
    _, text = fetch(s, "chat.deepseek.com", ca=ca)
    logo = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert logo and base64.b64decode(logo.group(1)) == fits.read_bytes()
