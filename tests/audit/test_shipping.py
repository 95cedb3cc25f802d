"""Shipping to a SIEM: every stored audit row, as RFC 5424 syslog (UDP, TCP) or JSON Lines on stdout, and the
chains' heads as anchors; real collectors on 127.0.0.1 (loopback listeners, and rsyslogd when installed)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import dns.message
import dns.query
import pytest
from click.testing import CliRunner

from sinkhole.audit import shipping
from sinkhole.cli import cli
from sinkhole.errors import ConfigError
from sinkhole.service import build
from tests.conftest import ask, audit_rows, wait_for

# RFC 5424 section 6, strictly: HEADER SP STRUCTURED-DATA [SP MSG]
_PARAM = r'(?P<name>[!#-<>-\\^-~]{1,32})="(?P<value>(?:[^"\\\]]|\\["\\\]])*)"'
SYSLOG = re.compile(
    r'<(?P<pri>\d{1,3})>1 '
    r'(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) '
    r'(?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) '
    r'(?P<sd>-|(?:\[[!#-<>-\\^-~]{1,32}(?: [!#-<>-\\^-~]{1,32}="(?:[^"\\\]]|\\["\\\]])*")*\])+)'
    r'(?: (?P<msg>.*))?\Z', re.S)
PARAM = re.compile(" " + _PARAM)


def parse(message: bytes) -> dict:
    """One RFC 5424 message -> its parts and its sinkhole@32473 parameters (unescaped); fails if malformed."""
    text = message.decode("utf-8")
    m = SYSLOG.match(text)
    assert m, f"not RFC 5424: {text!r}"
    assert 0 <= int(m["pri"]) <= 191
    assert m["sd"].startswith("[sinkhole@32473 ")
    params = {p["name"]: re.sub(r'\\(["\\\]])', r"\1", p["value"]) for p in PARAM.finditer(m["sd"])}
    return {**m.groupdict(), "facility": int(m["pri"]) // 8, "severity": int(m["pri"]) % 8, "params": params}


def expected_params(row: dict) -> dict:
    """What a stored row must look like in the structured data: every non-NULL column but rname, as text."""
    return {k: str(v) for k, v in row.items() if v is not None and k != "rname"}


class UdpCollector:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                self.messages.append(self.sock.recv(65535))
            except TimeoutError:
                continue

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


class TcpCollector:
    """A TCP syslog collector that reads octet-counted frames (RFC 6587 3.4.1) and nothing else."""

    def __init__(self, port: int = 0) -> None:
        self.messages: list[bytes] = []
        self.connections = 0
        self.bad: list[bytes] = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(0.2)
        while self.running:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            while True:
                m = re.match(rb"([1-9][0-9]*) ", buf)
                if not m:
                    if buf and not re.match(rb"[0-9]*\Z", buf):
                        self.bad.append(buf)
                        buf = b""
                    break
                end = m.end() + int(m.group(1))
                if len(buf) < end:
                    break
                self.messages.append(buf[m.end():end])
                buf = buf[end:]

    def close(self) -> None:
        """Go away as a collector does when stopped: the listener and every connection closed."""
        self.running = False
        self.thread.join(5)
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


def rows_by_link(messages: list[bytes]) -> dict[tuple[str, str], list[dict]]:
    """The parsed row messages (not anchors), grouped by (chain, link): a row shipped twice shows as two."""
    out: dict[tuple[str, str], list[dict]] = {}
    for m in messages:
        p = parse(m)
        if p["msgid"] != "anchor":
            out.setdefault((p["params"]["chain"], p["params"]["link"]), []).append(p)
    return out


def assert_every_row_shipped_once(messages: list[bytes], stored: list[dict]) -> None:
    got = rows_by_link(messages)
    assert set(got) == {(r["chain"], str(r["link"])) for r in stored}
    for r in stored:
        [p] = got[(r["chain"], str(r["link"]))]  # exactly once
        assert p["params"] == expected_params(r)  # client, qname, rule, mac ... and seq, as stored
        assert p["msgid"] == r["action"] and p["app"] == "sinkhole" and p["time"] == r["time"]
        assert p["facility"] == 16 and p["severity"] == 5  # local0.notice: a blocked query
        times = f" ({r['count']} times)" if r["count"] != 1 else ""
        assert p["msg"] == (f"blocked {r['qname']} {r['qtype']} from {r['client']}{times} by rule {r['rule']}"
                            f" ({r['category']})")


def cli_anchor(db: Path) -> list[str]:
    result = CliRunner().invoke(cli, ["--db", str(db), "log", "anchor"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


# ---------------------------------------------------------------------------- formats and settings


def test_sd_values_are_escaped_and_the_message_parses_strictly():
    row = {"seq": 7, "time": "2026-11-22T18:03:04.123456Z", "client": "10.1.2.3", "qname": 'we"ird]\\.example',
           "action": "blocked", "rule": "x", "node": "n", "upstream": None}
    msg = shipping.format_row(row, 16, "host", "42")
    assert b'qname="we\\"ird\\]\\\\.example"' in msg
    p = parse(msg)
    assert p["params"]["qname"] == 'we"ird]\\.example'
    assert "upstream" not in p["params"]  # NULL: left out, not ""
    assert p["pri"] == "133" and p["procid"] == "42" and p["msgid"] == "blocked"
    assert shipping.octet_frame(b"abc") == b"3 abc"


def test_a_long_row_is_cut_to_one_safe_datagram_keeping_who_what_and_the_mac():
    row = {"seq": 1, "time": "2026-11-22T18:03:04.123456Z", "client": "10.1.2.3", "qname": "a" * 60 + ".example",
           "qtype": "A", "action": "cname-blocked", "rule": "cname:x.example", "answer": "b" * 3000,
           "mac": "f" * 64, "chain": "n#0#abcd", "link": 3}
    msg = shipping.format_row(row, 16, "host", "1", shipping.UDP_MAX)
    assert len(msg) <= shipping.UDP_MAX
    p = parse(msg)
    assert p["params"]["truncated"] == "1" and p["params"]["answer"].endswith("...")
    assert {k: p["params"][k] for k in ("client", "qname", "rule", "mac", "link")} == {
        "client": "10.1.2.3", "qname": row["qname"], "rule": "cname:x.example", "mac": "f" * 64, "link": "3"}


@pytest.mark.parametrize("text,want", [
    ("127.0.0.1:5514", ("udp", "127.0.0.1", 5514)),
    ("tcp://siem.agency.example:6514", ("tcp", "siem.agency.example", 6514)),
    ("udp://[::1]:514", ("udp", "::1", 514)),
    ("10.0.0.9", ("udp", "10.0.0.9", 514)),
])
def test_syslog_targets(text, want):
    t = shipping.parse_target(text)
    assert (t.transport, t.host, t.port) == want


@pytest.mark.parametrize("settings,message", [
    ({"syslog": "http://x:1"}, "udp:// or tcp://"),
    ({"syslog": "127.0.0.1:99999"}, "port must be"),
    ({"syslog": "bad host:514"}, "neither an IP address nor a host name"),
    ({"syslog_facility": "local9"}, "syslog_facility must be one of"),
    ({"anchor_interval": 0}, "anchor_interval"),
])
def test_bad_shipping_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        build.load(env={}, flags=settings)


def test_shipping_settings_from_file_env_and_flags(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('syslog = "tcp://127.0.0.1:6514"\nsyslog_facility = "authpriv"\nanchor_interval = 300\n')
    cfg = build.load(f, env={"SINKHOLE_JSON_LOG": "true"}, flags={"anchor_interval": 30})
    assert (cfg.shipping.syslog, cfg.shipping.syslog_facility, cfg.shipping.json_log, cfg.shipping.anchor_interval) == (
        "tcp://127.0.0.1:6514", "authpriv", True, 30.0)
    assert build.shipper(build.load(env={})) is None  # nothing configured: nothing started


@pytest.mark.timeout(20)
def test_a_full_queue_drops_and_counts_and_says_so_once_per_interval(caplog):
    """The writer's side never waits: what does not fit a destination's queue is dropped and counted."""
    shipper = shipping.Shipper([], node="n")
    sink = shipping.SyslogSink(shipper, shipping.parse_target("tcp://127.0.0.1:9"), 16, 60.0, max_rows=10)
    shipper.sinks.append(sink)  # not started: nothing takes from the queue
    row = ("2026-11-22T18:03:04.123456Z",) + (None,) * (len(shipping.ROW_KEYS) - 5) + ("n#0#ab", 0, "ff")
    for seq in (1, 9):  # a ship() that waited for room would hang here, nothing takes from the queue
        shipper.ship([row] * 8, seq + 7)
    assert (sink.queued, sink.dropped) == (10, 6)
    assert shipper.heads["n#0#ab"] == {"chain": "n#0#ab", "link": 0, "seq": 16, "mac": "ff",
                                       "time": "2026-11-22T18:03:04.123456Z"}
    with caplog.at_level("WARNING", logger="sinkhole.audit.shipping"):
        sink.log_loss()
        shipper.ship([row], 17)
        sink.log_loss()
    assert [r.getMessage() for r in caplog.records] == [
        "shipping to tcp://127.0.0.1:9: 6 audit rows not shipped (6 since start; queue of 10 rows full); "
        "they are in the database"]


# ---------------------------------------------------------------------------- a real server, real collectors


def test_every_blocked_row_reaches_a_udp_collector_once_as_stored(make_server, stub, db):
    c = UdpCollector()
    try:
        s = make_server(upstream=(stub.address,), syslog=f"127.0.0.1:{c.port}")
        names = [f"u{i}.chat.deepseek.com" for i in range(20)] + ["chatgpt.com", "claude.ai"]
        for name in names:
            assert ask(s, name).answer
        ask(s, "www.example.org")  # forwarded: not a row in `blocked` mode, so nothing is shipped
        assert wait_for(lambda: len(c.messages) >= len(names))
        stored = audit_rows(db)
        assert [r["qname"] for r in stored] == names
        assert_every_row_shipped_once(c.messages, stored)
        by_qname = {p["params"]["qname"]: p for v in rows_by_link(c.messages).values() for p in v}
        assert by_qname["claude.ai"]["params"]["rule"] == "claude.ai"
        assert by_qname["u3.chat.deepseek.com"]["params"]["client"] == "127.0.0.1"
    finally:
        c.close()


def test_a_row_that_stands_for_several_answers_is_shipped_with_its_count(make_server, stub, db):
    """audit_window: five identical answers are one row of count 5; the collector gets count="5" and a summary that
    says so, as `log --format json` would show it."""
    c = UdpCollector()
    try:
        s = make_server(upstream=(stub.address,), syslog=f"127.0.0.1:{c.port}", audit_window=30.0)
        for _ in range(5):
            assert ask(s, "chatgpt.com").answer
        assert ask(s, "claude.ai").answer
        s.stop()  # the rows being counted are written (and shipped) at stop
        assert wait_for(lambda: len([m for m in c.messages if b" anchor " not in m]) >= 2)
        stored = audit_rows(db)
        assert [(r["qname"], r["count"]) for r in stored] == [("chatgpt.com", 5), ("claude.ai", 1)]
        shipped = {p["params"]["qname"]: p for p in map(parse, c.messages) if p["msgid"] != "anchor"}
        assert shipped["chatgpt.com"]["params"]["count"] == "5" and shipped["claude.ai"]["params"]["count"] == "1"
        assert shipped["chatgpt.com"]["msg"] == ("blocked chatgpt.com A from 127.0.0.1 (5 times) by rule chatgpt.com"
                                                 " (genai)")
        assert "times" not in shipped["claude.ai"]["msg"]
        assert_every_row_shipped_once(c.messages, stored)
    finally:
        c.close()


def test_tcp_collector_down_then_up_gets_everything_and_dns_never_waits(make_server, stub, db):
    c = TcpCollector()
    port = c.port
    s = make_server(upstream=(stub.address,), syslog=f"tcp://127.0.0.1:{port}")
    sink = s.server.audit.shipper.sinks[0]
    sink.backoff_cap = 0.2  # reconnect within the test's patience
    try:
        for i in range(5):
            ask(s, f"before{i}.chat.deepseek.com")
        assert wait_for(lambda: len(c.messages) == 5)
        c.close()  # the collector goes away
        for i in range(30):  # answered while the collector is down (the shipper never holds the event loop)
            reply = ask(s, f"during{i}.chat.deepseek.com", timeout=2)
            assert reply.answer[0][0].address == "0.0.0.0"
        assert wait_for(lambda: len(audit_rows(db)) == 35)  # stored whatever happens to the collector
        assert wait_for(lambda: sink.down_since is not None)
        c = TcpCollector(port)  # back on the same port
        assert wait_for(lambda: len(c.messages) == 30, timeout=10), len(c.messages)
        stored = audit_rows(db)
        assert_every_row_shipped_once(c.messages, stored[5:])
        assert sink.connects == 2 and sink.dropped == 0 and not c.bad
    finally:
        c.close()


def test_anchors_carry_the_chain_head_and_make_an_anchor_file_for_verify(make_server, stub, db, tmp_path):
    key = tmp_path / "offline.key"
    result = CliRunner().invoke(cli, ["--db", str(db), "log", "anchor", "--export-key", str(key)])
    assert result.exit_code == 0, result.output
    c = UdpCollector()
    try:
        s = make_server(upstream=(stub.address,), syslog=f"127.0.0.1:{c.port}", anchor_interval=0.2)
        for i in range(6):
            ask(s, f"a{i}.chat.deepseek.com")
        assert wait_for(lambda: len(audit_rows(db)) == 6)

        def head_anchored():
            last = audit_rows(db)[-1]
            return [p for p in map(parse, c.messages) if p["msgid"] == "anchor" and p["params"]["mac"] == last["mac"]]

        anchors = wait_for(head_anchored)  # within an anchor interval, while the server runs
        assert anchors
        last = audit_rows(db)[-1]
        a = anchors[0]
        assert a["params"] == {"chain": last["chain"], "link": "5", "seq": str(last["seq"]), "mac": last["mac"],
                               "time": last["time"]}
        assert a["severity"] == 5 and a["facility"] == 16
        assert json.loads(a["msg"]) == json.loads(cli_anchor(db)[0])
        s.stop()
        final = [p for p in map(parse, c.messages) if p["msgid"] == "anchor"][-1]  # sent at shutdown
        assert final["msg"] == cli_anchor(db)[0]  # the very line `sinkhole log anchor` prints
    finally:
        c.close()
    # the SIEM's copy of the anchors is an anchor file: an intact log verifies, a cut tail does not
    anchor_file = tmp_path / "anchors.jsonl"
    anchor_file.write_text("".join(p["msg"] + "\n" for p in map(parse, c.messages) if p["msgid"] == "anchor"))
    verify = ["--db", str(db), "log", "verify", "--key-file", str(key), "--anchor", str(anchor_file)]
    result = CliRunner().invoke(cli, verify, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    import sqlite3

    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit WHERE seq = (SELECT max(seq) FROM audit)")
    conn.close()
    result = CliRunner().invoke(cli, verify, catch_exceptions=False)
    assert result.exit_code == 1 and "truncated" in result.output, result.output


def test_json_log_and_syslog_from_a_two_worker_process(server_process, stub, db):
    """The console script, two workers: JSON lines on stdout equal the stored rows, the human log stays on
    stderr, and each worker ships its own rows and, at SIGTERM, its own chain's head."""
    c = UdpCollector()
    try:
        p = server_process("--upstream", stub.address, "--workers", "2", "--json-log",
                           "--syslog", f"udp://127.0.0.1:{c.port}")
        assert wait_for(lambda: any("with 2 workers; audit log" in line for line in p.lines), timeout=10)
        for i in range(40):
            dns.query.udp(dns.message.make_query(f"j{i}.chat.deepseek.com", "A"), p.host, port=p.port, timeout=5)
        assert p.terminate(signal.SIGTERM) == 0, "".join(p.lines)
        assert p.proc.stdout is not None
        out = p.proc.stdout.read()
        stored = audit_rows(db)
        assert len(stored) == 40
        lines = out.splitlines()
        assert all(line.startswith("{") for line in lines)  # nothing but JSON on stdout
        shipped = sorted((json.loads(line) for line in lines), key=lambda r: r["seq"])
        assert shipped == stored  # every key of `sinkhole log --format json`, every value as stored
        assert any("listening on" in line for line in p.lines)  # the human log: stderr
        chains = {r["chain"] for r in stored}
        assert wait_for(lambda: {parse(m)["params"]["chain"] for m in c.messages if b" anchor " in m} >= chains), (
            chains, [m for m in c.messages if b" anchor " in m], "".join(p.lines))
        assert_every_row_shipped_once(c.messages, stored)
        final = {}
        for a in (parse(m) for m in c.messages):
            if a["msgid"] == "anchor":
                final[a["params"]["chain"]] = a["msg"]
        assert sorted(final.values()) == sorted(cli_anchor(db))  # one head per worker's chain
        assert len(final) == len(chains)  # usually 2; the workers share one socket, so one may take all
    finally:
        c.close()


# ---------------------------------------------------------------------------- interop: rsyslogd

RSYSLOGD = shutil.which("rsyslogd") or shutil.which("rsyslogd", path="/usr/sbin:/sbin")


@pytest.mark.skipif(RSYSLOGD is None, reason="rsyslogd not installed (apt-get install rsyslog; .ci/run does)")
def test_rsyslog_parses_what_is_shipped_and_keeps_an_anchor_file(make_server, stub, db, tmp_path):
    """rsyslogd, as an agency's collector: imtcp on a loopback port, its RFC 5424 parser, one file of the
    fields as it parsed them, and one file of anchor lines that `sinkhole log verify --anchor` reads."""
    work = tmp_path / "rsyslog"
    work.mkdir()
    conf = work / "rsyslog.conf"
    conf.write_text(f"""
global(workDirectory="{work}")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="0" listenPortFileName="{work}/port")
template(name="fields" type="list" option.json="on") {{
  constant(value="{{\\"host\\":\\"") property(name="hostname") constant(value="\\",\\"app\\":\\"")
  property(name="app-name") constant(value="\\",\\"msgid\\":\\"") property(name="msgid")
  constant(value="\\",\\"pri\\":\\"") property(name="pri") constant(value="\\",\\"sd\\":\\"")
  property(name="structured-data") constant(value="\\",\\"msg\\":\\"") property(name="msg")
  constant(value="\\"}}\\n")
}}
template(name="anchor" type="string" string="%msg%\\n")
if $app-name == "sinkhole" then {{
  action(type="omfile" file="{work}/all.jsonl" template="fields")
  if $msgid == "anchor" then action(type="omfile" file="{work}/anchors.jsonl" template="anchor")
}}
""")
    check = subprocess.run([RSYSLOGD, "-N1", "-f", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(conf), "-i", str(work / "pid")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port_file = work / "port"
        assert wait_for(lambda: port_file.exists() and port_file.read_text().strip(), timeout=10), "no port"
        port = int(port_file.read_text())
        s = make_server(upstream=(stub.address,), syslog=f"tcp://127.0.0.1:{port}")
        for i in range(10):
            ask(s, f"r{i}.chat.deepseek.com")
        assert wait_for(lambda: len(audit_rows(db)) == 10)
        s.stop()  # sends the last anchor
        out = work / "all.jsonl"

        def parsed():
            if not out.exists():
                return []
            got = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
            return got if any(g["msgid"] == "anchor" for g in got) and len(got) >= 11 else []

        got = wait_for(parsed, timeout=10)
        assert got, out.read_text() if out.exists() else "nothing written"
        stored = audit_rows(db)
        rows = [g for g in got if g["msgid"] != "anchor"]
        assert len(rows) == 10
        for g, r in zip(rows, stored, strict=True):
            assert g["host"] == "test-node" and g["app"] == "sinkhole" and g["msgid"] == "blocked"
            assert g["pri"] == "133"
            params = {m["name"]: re.sub(r'\\(["\\\]])', r"\1", m["value"]) for m in PARAM.finditer(g["sd"])}
            assert params == expected_params(r)
            assert g["msg"].startswith(f"blocked {r['qname']} A from 127.0.0.1")
        anchor_file = work / "anchors.jsonl"  # rsyslog's second action: written just after the first one

        def anchors() -> list[str]:
            return anchor_file.read_text().splitlines() if anchor_file.exists() else []

        assert wait_for(lambda: anchors() and anchors()[-1] == cli_anchor(db)[0], timeout=10), anchors()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
