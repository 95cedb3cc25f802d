"""sinkhole under a real systemd: `make install` into a Debian 12 container booted by systemd-nspawn, then
what an operator does with it. `make systemd-test` (root; tests/container.py builds and caches the image).

Marked `container`: `make test` leaves these out (pyproject's addopts), .ci/run runs them after it. The
tests run in order against one container, each from the state the one before left.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest

from tests.container import Container, booted

pytestmark = pytest.mark.container

DB = "/var/lib/sinkhole/sinkhole.db"
TOML = "/etc/sinkhole/sinkhole.toml"
# the service's settings for the test: an upstream stub on loopback (the container has no other network),
# two workers whatever the number of cores (one to stop for the watchdog)
DEFAULTS = "SINKHOLE_UPSTREAM={upstream}\nSINKHOLE_WORKERS=2\n"
# WatchdogSec=30s would make the watchdog test wait half a minute; the mechanism is the same at 5 s
WATCHDOG_DROP_IN = "[Service]\nWatchdogSec=5s\n"
# the upstream: tests/dnsstub.py (dnslib only) with the installed venv's Python, as a transient service
STUB = """
import pathlib, time
from tests.dnsstub import StubResolver
with StubResolver() as stub:
    pathlib.Path("/run/stub-upstream").write_text(stub.address)
    while True:
        time.sleep(3600)
"""


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture(scope="module")
def box() -> Iterator[Container]:
    with booted() as (container, times):
        started = time.monotonic()
        out = container.sh("rm -rf /root/sinkhole && cp -a /mnt/src /root/sinkhole && cd /root/sinkhole && "
                           "make install", env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/mnt/wheels"}, timeout=600)
        times["make install"] = time.monotonic() - started
        assert "next: sudo systemctl enable --now sinkhole.socket sinkhole.service" in out.stdout, out.stdout
        assert "systemd is not running" not in out.stdout  # it called systemctl daemon-reload
        container.run("systemd-run", "--unit=stub-upstream", "--property=WorkingDirectory=/root/sinkhole",
                      "/opt/sinkhole/bin/python", "-c", STUB)
        address = wait_until(lambda: container.run("cat", "/run/stub-upstream", check=False).stdout, 30)
        assert address, container.run("journalctl", "-u", "stub-upstream", "--no-pager", check=False).stdout
        container.sh(f"printf '{DEFAULTS.format(upstream=address)}' > /etc/default/sinkhole\n"
                     "mkdir -p /etc/systemd/system/sinkhole.service.d\n"
                     f"printf '{WATCHDOG_DROP_IN}' > /etc/systemd/system/sinkhole.service.d/test-watchdog.conf\n"
                     f"cp {TOML} /root/sinkhole.toml.shipped\n"
                     "systemctl daemon-reload")
        print("\n" + ", ".join(f"{k}: {v:.1f} s" for k, v in times.items()))
        yield container


def dig(box: Container, name: str, *opts: str, server: str = "127.0.0.1") -> list[str]:
    """The answer section of one query with dig, in the container (dig's own short output)."""
    out = box.run("dig", f"@{server}", "-p", "53", name, "+noall", "+answer", "+time=5", "+tries=1", *opts,
                  check=False)
    return out.stdout.split("\n")[:-1] if out.returncode == 0 else []


def ttl(line: str) -> int:
    return int(line.split()[1])


def prop(box: Container, name: str, unit: str = "sinkhole.service") -> str:
    return box.run("systemctl", "show", "-p", name, "--value", unit).stdout.strip()


def journal(box: Container, *args: str) -> list[dict]:
    """sinkhole.service's own log entries (its processes and ExecReload's, not systemd's about it)."""
    out = box.run("journalctl", "--no-pager", "-o", "json", "-u", "sinkhole.service", "SYSLOG_IDENTIFIER=sinkhole",
                  *args, check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def set_settings(box: Container, text: str) -> None:
    box.sh(f"cp /root/sinkhole.toml.shipped {TOML} && cat >> {TOML}", input=text)


# ---------------------------------------------------------------------------- install, enable, serve


def test_enable_starts_it_and_it_answers_on_port_53_over_udp_and_tcp(box: Container) -> None:
    box.run("systemctl", "enable", "--now", "sinkhole.socket", "sinkhole.service")
    assert box.run("systemctl", "is-enabled", "sinkhole.socket", "sinkhole.service").stdout.split() == [
        "enabled", "enabled"]
    assert wait_until(lambda: prop(box, "ActiveState") == "active")
    for opts in ((), ("+tcp",)):
        answer = dig(box, "chat.deepseek.com", *opts)
        assert len(answer) == 1 and answer[0].endswith("\tA\t0.0.0.0"), answer
        assert dig(box, "chat.deepseek.com", "AAAA", *opts, server="::1")[0].endswith("\tAAAA\t::")
        forwarded = dig(box, "www.example.test", *opts)  # through the upstream stub
        assert len(forwarded) == 1 and re.search(r"\tA\t192\.0\.2\.\d+$", forwarded[0]), forwarded
    assert prop(box, "StatusText").startswith("serving on ")  # Type=notify: READY=1 with its STATUS=


def test_it_runs_as_sinkhole_with_no_capability_and_its_sandbox(box: Container) -> None:
    main = prop(box, "MainPID")
    pids = [main, *box.run("pgrep", "-P", main).stdout.split()]
    assert len(pids) == 3  # the supervisor and its two workers
    uid = box.run("id", "-u", "sinkhole").stdout.strip()
    for pid in pids:
        status = dict(line.split(":\t", 1) for line in box.run("cat", f"/proc/{pid}/status").stdout.splitlines()
                      if ":\t" in line)
        assert status["Uid"].split() == [uid] * 4, pid
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[cap], 16) == 0, (pid, cap, status[cap])
        assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"  # SystemCallFilter=
    out = box.run("systemd-analyze", "security", "--no-pager", "sinkhole.service").stdout
    exposure = float(re.search(r"Overall exposure level for sinkhole\.service: (\d+\.\d+)", out).group(1))
    print(f"systemd-analyze security sinkhole.service (online, in the container): {exposure}")
    assert exposure < 2.0


def test_a_query_starts_the_stopped_service_through_its_socket(box: Container) -> None:
    box.run("systemctl", "stop", "sinkhole.service")
    assert prop(box, "ActiveState") == "inactive"
    assert prop(box, "ActiveState", "sinkhole.socket") == "active"  # port 53 stays bound by systemd
    answer = dig(box, "chat.deepseek.com", "+tcp")
    assert answer and answer[0].endswith("\tA\t0.0.0.0")  # a worker may answer before both are ready
    assert wait_until(lambda: prop(box, "ActiveState") == "active")  # READY=1 once both are
    assert dig(box, "chat.deepseek.com")[0].endswith("\tA\t0.0.0.0")


# ---------------------------------------------------------------------------- reload


def test_reload_returns_once_the_new_settings_are_in_force(box: Container) -> None:
    set_settings(box, "block_ttl = 30\n")
    reload = box.run("systemctl", "reload", "sinkhole.service", check=False)
    assert reload.returncode == 0, reload.stderr
    # no waiting: every worker answers with the new TTL as soon as systemctl returned
    ttls = {ttl(dig(box, f"r{i}.chat.deepseek.com", *(("+tcp",) if i % 2 else ()))[0]) for i in range(12)}
    assert ttls == {30}
    said = [e["MESSAGE"] for e in journal(box, "_COMM=sinkhole") if "reloaded: " in e["MESSAGE"]]
    assert said and said[-1] == "reloaded: applied block_ttl = 30 in 2 workers"  # ExecReload's output


def test_a_refused_reload_fails_and_its_reason_is_an_error_in_the_journal(box: Container) -> None:
    main = prop(box, "MainPID")
    set_settings(box, 'block_ttl = "soon"\n')
    reload = box.run("systemctl", "reload", "sinkhole.service", check=False)
    assert reload.returncode != 0
    assert prop(box, "ActiveState") == "active" and prop(box, "MainPID") == main  # still serving, not restarted
    assert {ttl(dig(box, f"s{i}.chat.deepseek.com")[0]) for i in range(6)} == {30}  # the running settings stay
    errors = box.run("journalctl", "--no-pager", "-o", "cat", "-u", "sinkhole.service", "-p", "err").stdout
    assert f"ERROR config reload refused, the running settings stay: {TOML}: block_ttl" in errors
    assert "sinkhole: reload refused, the running settings stay: " in errors  # sinkhole reload's own line
    set_settings(box, "block_ttl = 30\n")
    assert box.run("systemctl", "reload", "sinkhole.service", check=False).returncode == 0


def test_journal_priorities_follow_the_log_levels(box: Container) -> None:
    entries = journal(box)
    by_priority: dict[str, list[str]] = {}
    for e in entries:
        by_priority.setdefault(e["PRIORITY"], []).append(e["MESSAGE"])
    assert any(m.startswith("INFO listening on ") for m in by_priority["6"])
    assert any(m.startswith("ERROR config reload refused") for m in by_priority["3"])
    assert all(m.startswith("INFO ") or m.startswith("reloaded: ") for m in by_priority["6"]), by_priority["6"]
    # `journalctl -p warning` shows exactly the warnings and errors
    shown = [e["MESSAGE"] for e in journal(box, "-p", "warning")]
    assert shown and all(m.startswith(("WARNING ", "ERROR ", "sinkhole: ")) for m in shown), shown
    assert len(shown) == sum(len(v) for k, v in by_priority.items() if int(k) <= 4)


# ---------------------------------------------------------------------------- stop


def test_stop_flushes_every_audit_row(box: Container) -> None:
    n = 300
    sent = box.run("/opt/sinkhole/bin/python", "-c", f"""
import dns.message, dns.query
for i in range({n}):
    r = dns.query.udp(dns.message.make_query(f"f{{i}}.flush.deepseek.com", "A"), "127.0.0.1", port=53, timeout=5)
    assert r.answer[0][0].to_text() == "0.0.0.0"
print("sent")
""")
    assert sent.stdout == "sent\n"
    box.run("systemctl", "stop", "sinkhole.service")  # the socket stays: nothing asks, nothing starts it again
    assert prop(box, "ActiveState") == "inactive" and prop(box, "Result") == "success"
    rows = box.run("runuser", "-u", "sinkhole", "--", "env", f"SINKHOLE_DB={DB}", "sinkhole", "log", "--domain",
                   "flush.deepseek.com", "--format", "json").stdout.splitlines()
    assert len(rows) == n
    assert {json.loads(r)["qname"] for r in rows} == {f"f{i}.flush.deepseek.com" for i in range(n)}
    stopped = [e["MESSAGE"] for e in journal(box) if e["MESSAGE"].startswith("INFO stopped: ")]
    assert re.search(r"audit answers written \d+ in \d+ rows, dropped 0 \(2 workers", stopped[-1]), stopped[-1]
    box.run("systemctl", "start", "sinkhole.service")


# ---------------------------------------------------------------------------- watchdog


def test_the_watchdog_restarts_the_service_when_a_worker_is_stopped(box: Container) -> None:
    assert wait_until(lambda: prop(box, "ActiveState") == "active")
    main, restarts = prop(box, "MainPID"), int(prop(box, "NRestarts"))
    worker = box.run("pgrep", "-P", main).stdout.split()[0]
    box.run("kill", "-STOP", worker)  # alive but stuck: no beats, so the supervisor stops pinging systemd
    assert wait_until(lambda: int(prop(box, "NRestarts")) > restarts, timeout=90)
    assert wait_until(lambda: prop(box, "ActiveState") == "active" and prop(box, "MainPID") not in ("0", main))
    said = box.run("journalctl", "--no-pager", "-o", "cat", "-u", "sinkhole.service").stdout
    assert "Watchdog timeout" in said
    assert dig(box, "chat.deepseek.com")[0].endswith("\tA\t0.0.0.0")


# ---------------------------------------------------------------------------- the sandbox


def sandbox_properties(box: Container) -> list[str]:
    """The installed unit's [Service] settings that make its sandbox, as systemd-run -p arguments."""
    lifecycle = {"Type", "NotifyAccess", "WatchdogSec", "ExecStart", "ExecReload", "KillSignal", "TimeoutStopSec",
                 "TimeoutStartSec", "Restart", "RestartSec", "Environment", "EnvironmentFile", "StateDirectory",
                 "StateDirectoryMode"}
    unit = box.run("cat", "/etc/systemd/system/sinkhole.service").stdout
    section = unit.split("[Service]", 1)[1].split("\n[", 1)[0]
    props = []
    for line in section.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key = line.split("=", 1)[0]
        if key not in lifecycle:
            props.append(f"--property={line}")
    return props


def test_every_dependency_works_inside_the_units_sandbox(box: Container) -> None:
    probe = box.run("cat", "/root/sinkhole/tests/service/sandbox_probe.py").stdout
    props = sandbox_properties(box)
    assert "--property=MemoryDenyWriteExecute=yes" in props
    assert "--property=SystemCallFilter=@system-service" in props

    def run(*extra: str) -> dict:
        out = box.run("systemd-run", "--wait", "--pipe", "--quiet", "--property=User=sinkhole", *extra,
                      "/opt/sinkhole/bin/python", "-", input=probe, check=False, timeout=300)
        try:
            report = json.loads(out.stdout)
        except ValueError:
            said = out.stdout[-3000:] + out.stderr[-3000:]
            raise AssertionError(f"the probe exited with {out.returncode}: {said}") from None
        failed = "; ".join(f"{k} {v}" for k, v in report["exercises"].items() if not v.startswith("ok: "))
        assert out.returncode == 0, f"exercises failed: {failed}"
        return report

    plain = run()
    sandboxed = run(*props)
    assert plain["wx_mapping"] == "allowed"
    assert sandboxed["wx_mapping"].startswith("refused")  # MemoryDenyWriteExecute= is in force
    assert sandboxed["status"]["Seccomp"] == "2" and int(sandboxed["status"]["CapEff"], 16) == 0
    assert sandboxed["imported"] == plain["imported"]
    assert sandboxed["failed"] == plain["failed"]  # optional extras not installed, Windows-only modules
    assert {"uvloop.loop", "_ssl", "_sqlite3", "_ctypes"} <= set(sandboxed["native"])
    assert all(v.startswith("ok: ") for v in sandboxed["exercises"].values()), sandboxed["exercises"]
    print(f"\nsandbox probe: {len(sandboxed['distributions'])} distributions, {len(sandboxed['imported'])} modules "
          f"({len(sandboxed['native'])} native) imported under {len(props)} sandbox settings; "
          + "; ".join(sandboxed["exercises"].values()))


# ---------------------------------------------------------------------------- the block page's sockets

PAGE = "127.0.0.7"  # blockpage_listen: the address blocked answers point at (sinkhole-blockpage.socket binds *:80/443)
FETCH = """
import http.client, socket, ssl, sys
name, port = sys.argv[1], int(sys.argv[2])
sock = socket.create_connection((sys.argv[3], port), timeout=60)
if port == 443:  # verified against the CA `sinkhole ca init` made, with the SNI a browser sends
    sock = ssl.create_default_context(cafile="/var/lib/sinkhole/ca/ca.pem").wrap_socket(sock, server_hostname=name)
sock.sendall(f"GET /x HTTP/1.1\\r\\nHost: {name}\\r\\nConnection: close\\r\\n\\r\\n".encode())
r = http.client.HTTPResponse(sock)
r.begin()
body = r.read().decode()
print(r.status, "Access to this site is restricted" in body, f'id="host">{name}<' in body)
"""


def fetch_page(box: Container, port: int, name: str = "chat.deepseek.com") -> str:
    """One request for `name` to the block page's address, as a browser sends it: '403 True True' for the page."""
    return box.run("/opt/sinkhole/bin/python", "-c", FETCH, name, str(port), PAGE, timeout=120).stdout.strip()


def test_the_block_page_is_served_on_the_sockets_systemd_holds_and_a_visit_starts_the_service(box: Container) -> None:
    assert wait_until(lambda: prop(box, "ActiveState") == "active")
    box.run("runuser", "-u", "sinkhole", "--", "env", f"SINKHOLE_DB={DB}", "sinkhole", "ca", "init", "--name",
            "Container test CA")
    box.sh(f"echo SINKHOLE_BLOCKPAGE_LISTEN={PAGE}:80 >> /etc/default/sinkhole")
    # what the README warns about: systemd will not start a socket for a service that is running already
    early = box.run("systemctl", "enable", "--now", "sinkhole-blockpage.socket", check=False)
    assert early.returncode != 0
    assert "Socket service sinkhole.service already active, refusing." in box.run(
        "journalctl", "--no-pager", "-o", "cat", "-u", "sinkhole-blockpage.socket").stdout
    # what it says to do instead (a service is handed its sockets when it starts)
    box.run("systemctl", "stop", "sinkhole.service")
    box.run("systemctl", "enable", "--now", "sinkhole-blockpage.socket")
    box.run("systemctl", "start", "sinkhole.service")
    assert wait_until(lambda: prop(box, "ActiveState") == "active")
    answer = dig(box, "chat.deepseek.com")
    assert len(answer) == 1 and answer[0].endswith(f"\tA\t{PAGE}"), answer
    assert fetch_page(box, 80) == "403 True True"  # plain HTTP
    assert fetch_page(box, 443) == "403 True True"  # HTTPS: a leaf minted for the name, chained to the CA
    main = prop(box, "MainPID")
    caps = [line for line in box.run("cat", f"/proc/{main}/status").stdout.splitlines() if line.startswith("CapEff")]
    assert caps and int(caps[0].split()[1], 16) == 0  # ports 80 and 443 without CAP_NET_BIND_SERVICE

    box.run("systemctl", "stop", "sinkhole.service")
    assert prop(box, "ActiveState") == "inactive"
    assert prop(box, "ActiveState", "sinkhole-blockpage.socket") == "active"  # systemd keeps 80 and 443 bound
    assert fetch_page(box, 443, "chatgpt.com") == "403 True True"  # the visit itself starts the service
    assert wait_until(lambda: prop(box, "ActiveState") == "active")

    def views() -> set[tuple[str, str]]:
        out = box.run("runuser", "-u", "sinkhole", "--", "env", f"SINKHOLE_DB={DB}", "sinkhole", "log", "--action",
                      "page", "--format", "json").stdout.splitlines()
        return {(json.loads(v)["qname"], json.loads(v)["transport"]) for v in out}

    expected = {("chat.deepseek.com", "http"), ("chat.deepseek.com", "https"), ("chatgpt.com", "https")}
    assert wait_until(lambda: views() >= expected, timeout=60), views()  # each view an audit row
