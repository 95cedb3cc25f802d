"""Running as a service: sd_notify, socket activation, the watchdog, dropping root, the unit files, make install.

Real processes and sockets on loopback; systemd itself is not needed (none runs in CI): a small
launcher passes sockets the way systemd does, and systemd-analyze checks the unit files offline.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from sinkhole.errors import ConfigError
from sinkhole.service import systemd
from sinkhole.service.privileges import drop_to
from tests.conftest import ROOT

UNITS = ROOT / "systemd"
IS_ROOT = os.geteuid() == 0


def run_python(code: str, *args: str, timeout: float = 10, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)  # type: ignore[call-overload]


# ---------------------------------------------------------------------------- notify


@pytest.fixture
def notify_receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A datagram socket standing in for systemd's notification socket; yields a bind-address setter."""
    receivers: list[socket.socket] = []

    def bind(address: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + address[1:] if address.startswith("@") else address)
        sock.settimeout(5)
        receivers.append(sock)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        return sock

    yield bind
    for sock in receivers:
        sock.close()


def test_notify_sends_state_to_a_socket_path(notify_receiver, tmp_path: Path) -> None:
    receiver = notify_receiver(str(tmp_path / "notify"))
    assert systemd.notify("READY=1") is True
    assert receiver.recv(4096) == b"READY=1"
    assert systemd.notify("STATUS=serving on 2 addresses\nWATCHDOG=1") is True
    assert receiver.recv(4096) == b"STATUS=serving on 2 addresses\nWATCHDOG=1"


def test_notify_abstract_namespace(notify_receiver) -> None:
    receiver = notify_receiver(f"@sinkhole-test-{uuid.uuid4().hex}")
    assert systemd.notify("STOPPING=1") is True
    assert receiver.recv(4096) == b"STOPPING=1"


def test_notify_without_systemd_or_with_a_dead_socket_returns_false(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens-here"))
    assert systemd.notify("READY=1") is False  # no exception either
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False


# ---------------------------------------------------------------------------- socket activation

# What systemd does for a socket unit: the sockets become fds 3, 4, ... of the service process,
# LISTEN_PID is that process's id, LISTEN_FDS their count. The launcher does the same, then execs.
LAUNCHER = """
    import fcntl, os, sys
    passed = [int(fd) for fd in sys.argv[1].split(",")]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in passed]
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)  # inheritable
        os.close(fd)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(high)), LISTEN_FDNAMES="dns:dns")
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[2]])
"""

ACTIVATED = """
    import json, os, socket
    from sinkhole.service import systemd
    socks = systemd.listen_sockets()
    groups = systemd.group_by_address(socks)
    print(json.dumps({
        "sockets": [{"fd": s.fileno(), "family": s.family.name, "type": s.type.name, "port": s.getsockname()[1],
                     "blocking": s.getblocking(), "inheritable": s.get_inheritable()} for s in socks],
        "groups": {f"{h}:{p}": {k: s.type.name if s else None for k, s in pair.items()}
                   for (h, p), pair in groups.items()},
        "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }), flush=True)
    # serve one datagram and one connection on the passed sockets, as the resolver would
    pair = next(iter(groups.values()))
    udp, tcp = pair["udp"], pair["tcp"]
    udp.setblocking(True)
    data, peer = udp.recvfrom(512)
    udp.sendto(b"udp:" + data, peer)
    tcp.setblocking(True)
    conn, _ = tcp.accept()
    conn.sendall(b"tcp:" + conn.recv(512))
    conn.close()
"""


def _udp_and_tcp_on_one_port(host: str = "127.0.0.1") -> tuple[socket.socket, socket.socket]:
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((host, 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind((host, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        return udp, tcp
    raise OSError("no port free for both UDP and TCP")


def test_listen_sockets_takes_the_sockets_systemd_passes() -> None:
    udp, tcp = _udp_and_tcp_on_one_port()
    port = udp.getsockname()[1]
    with udp, tcp:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(LAUNCHER), f"{udp.fileno()},{tcp.fileno()}",
             textwrap.dedent(ACTIVATED)],
            pass_fds=(udp.fileno(), tcp.fileno()), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT)
    # the parent's copies are closed: only the child holds the port now
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        seen = json.loads(line)
        assert seen["sockets"] == [
            {"fd": 3, "family": "AF_INET", "type": "SOCK_DGRAM", "port": port, "blocking": False,
             "inheritable": False},
            {"fd": 4, "family": "AF_INET", "type": "SOCK_STREAM", "port": port, "blocking": False,
             "inheritable": False},
        ]
        assert seen["groups"] == {f"127.0.0.1:{port}": {"udp": "SOCK_DGRAM", "tcp": "SOCK_STREAM"}}
        assert seen["env"] == []  # LISTEN_* removed: children of the server will not take the sockets

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"hello", ("127.0.0.1", port))
            assert client.recvfrom(512)[0] == b"udp:hello"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(b"hello")
            assert client.recv(512) == b"tcp:hello"
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_listen_sockets_ignores_variables_meant_for_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "dns:dns")
    assert systemd.listen_sockets() == []
    assert not any(k in os.environ for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert systemd.listen_sockets() == []  # not socket-activated at all


def test_group_by_address_pairs_udp_and_tcp_per_address() -> None:
    udp, tcp = _udp_and_tcp_on_one_port()
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    socks = [udp, tcp, other, unix]
    if socket.has_ipv6:
        try:
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            v6.bind(("::1", 0))
            socks.append(v6)
        except OSError:  # no IPv6 loopback here
            pass
    try:
        groups = systemd.group_by_address(socks)
        assert groups[("127.0.0.1", udp.getsockname()[1])] == {"udp": udp, "tcp": tcp}
        assert groups[("127.0.0.1", other.getsockname()[1])] == {"udp": other, "tcp": None}
        expected = 3 if len(socks) == 5 else 2
        if len(socks) == 5:
            assert groups[("::1", socks[4].getsockname()[1])] == {"udp": None, "tcp": socks[4]}
        assert len(groups) == expected  # the AF_UNIX socket is not a DNS listener
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    (None, None, None),
    ("30000000", None, 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "other", None),
    ("0", None, None),
    ("soon", None, None),
])
def test_watchdog_interval_is_half_of_watchdogsec(monkeypatch: pytest.MonkeyPatch, usec: str | None,
                                                  pid: str | None, expected: float | None) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(name, value)
    assert systemd.watchdog_interval() == expected


# ---------------------------------------------------------------------------- dropping root

DROP = """
    import json, os, socket, sys
    from sinkhole.errors import ConfigError
    from sinkhole.service.privileges import drop_to
    out = {}
    drop_to(sys.argv[1])
    out["resuid"] = os.getresuid()
    out["resgid"] = os.getresgid()
    out["groups"] = os.getgroups()
    out["env_user"] = os.environ["USER"]
    try:
        os.setuid(0)
        out["regain"] = "root regained"
    except PermissionError:
        out["regain"] = "refused"
    try:
        socket.socket().bind(("127.0.0.1", 1023))
        out["bind_low_port"] = "bound"
    except PermissionError:
        out["bind_low_port"] = "refused"
    drop_to(sys.argv[1])  # already that user: nothing to do
    try:
        drop_to("root")
    except ConfigError as exc:
        out["back_to_root"] = str(exc)
    print(json.dumps(out))
"""


@pytest.mark.skipif(not IS_ROOT, reason="switching users needs root")
@pytest.mark.parametrize("user", ["nobody", "65534"])
def test_drop_to_leaves_root_for_good(user: str) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' here")
    proc = run_python(DROP, user)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["resuid"] == [nobody.pw_uid] * 3  # real, effective and saved: no way back
    assert out["resgid"] == [nobody.pw_gid] * 3
    assert out["groups"] == []
    assert out["env_user"] == "nobody"
    assert out["regain"] == "refused"
    unprivileged_start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if unprivileged_start.exists() and int(unprivileged_start.read_text()) > 1023:
        assert out["bind_low_port"] == "refused"  # hence: bind port 53 first, then drop
    assert "only root can switch" in out["back_to_root"]


def test_drop_to_unknown_user_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no such user") as exc:
        drop_to("no-such-user-" + uuid.uuid4().hex[:8])
    assert "\n" not in str(exc.value)


def test_drop_to_root_or_to_another_user_without_root_is_refused() -> None:
    if IS_ROOT:
        with pytest.raises(ConfigError, match="is root"):
            drop_to("root")  # refused before anything changes
        assert os.geteuid() == 0
    else:
        drop_to(pwd.getpwuid(os.getuid()).pw_name)  # already that user: nothing to do
        with pytest.raises(ConfigError, match="only root can switch"):
            drop_to("root")


# ---------------------------------------------------------------------------- unit files


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing in CI: .ci/run must install the systemd package")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return exe


def units_with_existing_binary(tmp_path: Path) -> Path:
    """The unit files, with ExecStart pointed at this checkout's `sinkhole` (verify wants it to exist)."""
    exe = shutil.which("sinkhole", path=str(Path(sys.executable).parent)) or sys.executable
    service = (UNITS / "sinkhole.service").read_text()
    assert "\nExecStart=/usr/local/bin/sinkhole serve\n" in service
    assert "\nExecReload=/usr/local/bin/sinkhole reload\n" in service
    (tmp_path / "sinkhole.service").write_text(service.replace("=/usr/local/bin/sinkhole ", f"={exe} "))
    shutil.copy(UNITS / "sinkhole.socket", tmp_path / "sinkhole.socket")
    shutil.copy(UNITS / "sinkhole-blockpage.socket", tmp_path / "sinkhole-blockpage.socket")
    return tmp_path


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    exe = systemd_analyze()
    units = units_with_existing_binary(tmp_path)
    proc = subprocess.run([exe, "verify", str(units / "sinkhole.service"), str(units / "sinkhole.socket"),
                           str(units / "sinkhole-blockpage.socket")], capture_output=True, text=True, timeout=30)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if "sinkhole" in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr


def test_socket_unit_hands_port_53_udp_and_tcp_to_the_service() -> None:
    socket_unit = (UNITS / "sinkhole.socket").read_text()
    for line in ("ListenDatagram=0.0.0.0:53", "ListenStream=0.0.0.0:53", "ListenDatagram=[::]:53",
                 "ListenStream=[::]:53", "BindIPv6Only=ipv6-only", "Service=sinkhole.service"):
        assert f"\n{line}\n" in socket_unit
    service = (UNITS / "sinkhole.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "Requires=sinkhole.socket", "CapabilityBoundingSet=",
                 "AmbientCapabilities=", "StateDirectory=sinkhole",
                 "Environment=SINKHOLE_DB=/var/lib/sinkhole/sinkhole.db"):
        assert f"\n{line}\n" in service


def test_systemd_analyze_security_exposure_below_2(tmp_path: Path) -> None:
    exe = systemd_analyze()
    units = units_with_existing_binary(tmp_path)
    proc = subprocess.run([exe, "security", "--offline=true", str(units / "sinkhole.service")],
                          capture_output=True, text=True, timeout=30)
    m = re.search(r"Overall exposure level for sinkhole\.service: (\d+(?:\.\d+)?)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    exposure = float(m.group(1))
    print(f"systemd-analyze security --offline=true sinkhole.service: exposure {exposure}")
    assert exposure < 2.0, proc.stdout


# ---------------------------------------------------------------------------- make install


def test_make_install_files_stages_units_user_defaults_and_link(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dest = tmp_path / "root"

    def install(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["make", "-s", "-C", str(ROOT), "install-files", f"DESTDIR={dest}", *args],
                              capture_output=True, text=True, timeout=30)

    proc = install()
    assert proc.returncode == 0, proc.stderr
    assert "not calling systemctl" in proc.stdout  # staging never touches the running system
    link = dest / "usr/local/bin/sinkhole"
    assert link.is_symlink() and os.readlink(link) == "/opt/sinkhole/bin/sinkhole"
    units = dest / "etc/systemd/system"
    assert (units / "sinkhole.socket").read_text() == (UNITS / "sinkhole.socket").read_text()
    blockpage = (units / "sinkhole-blockpage.socket").read_text()
    assert blockpage == (UNITS / "sinkhole-blockpage.socket").read_text()
    assert "\nFileDescriptorName=blockpage\n" in blockpage and "\nService=sinkhole.service\n" in blockpage
    assert (units / "sinkhole.service").read_text() == (UNITS / "sinkhole.service").read_text()
    defaults = dest / "etc/default/sinkhole"
    assert "#SINKHOLE_UPSTREAM=" in defaults.read_text()

    defaults.write_text("SINKHOLE_UPSTREAM=192.0.2.1\n")  # an operator's settings survive a reinstall
    proc = install("BINDIR=/usr/bin", "PREFIX=/srv/sinkhole")
    assert proc.returncode == 0, proc.stderr
    assert defaults.read_text() == "SINKHOLE_UPSTREAM=192.0.2.1\n"
    assert os.readlink(dest / "usr/bin/sinkhole") == "/srv/sinkhole/bin/sinkhole"
    assert "\nExecStart=/usr/bin/sinkhole serve\n" in (units / "sinkhole.service").read_text()
    assert "\nExecReload=/usr/bin/sinkhole reload\n" in (units / "sinkhole.service").read_text()


# ---------------------------------------------------------------------------- the real server, activated

SERVE = """
    import sys
    from sinkhole.cli import main
    sys.argv = ["sinkhole", "--db", sys.argv[1], "serve", "--listen", "127.0.0.1:1", "--upstream", sys.argv[2]]
    main()
"""


def test_server_under_socket_activation_notifies_and_serves(tmp_path: Path) -> None:
    import dns.message
    import dns.query

    from tests.dnsstub import StubResolver, address_for

    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify"))
    receiver.settimeout(15)
    udp, tcp = _udp_and_tcp_on_one_port()
    port = udp.getsockname()[1]
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
    with StubResolver() as stub, receiver:
        with udp, tcp:
            # WATCHDOG_PID unset: the watchdog is for whichever process gets it, as after exec
            proc = subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(LAUNCHER), f"{udp.fileno()},{tcp.fileno()}",
                 textwrap.dedent(SERVE).replace("sys.argv[1]", repr(str(tmp_path / "a.db")))
                 .replace("sys.argv[2]", repr(stub.address))],
                pass_fds=(udp.fileno(), tcp.fileno()), stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        try:
            states = [receiver.recv(4096).decode()]
            assert states[0].startswith("READY=1\nSTATUS=serving on 127.0.0.1:"), states
            # --listen 127.0.0.1:1 was ignored: the passed sockets serve, UDP and TCP
            for send in (dns.query.udp, dns.query.tcp):
                r = send(dns.message.make_query("chat.deepseek.com", "A"), "127.0.0.1", port=port, timeout=5)
                assert r.answer[0][0].to_text() == "0.0.0.0"
                r = send(dns.message.make_query("www.example.test", "A"), "127.0.0.1", port=port, timeout=5)
                assert r.answer[0][0].to_text() == address_for("www.example.test")
            pings = 0
            while pings < 3:
                msg = receiver.recv(4096).decode()
                pings += msg == "WATCHDOG=1"
            proc.send_signal(signal.SIGTERM)
            while True:
                msg = receiver.recv(4096).decode()
                if msg == "STOPPING=1":
                    break
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="binding as root and dropping needs root")
def test_serve_binds_as_root_then_runs_as_the_given_user(tmp_path: Path, server_process, stub) -> None:
    import tempfile

    import dns.message
    import dns.query

    state = Path(tempfile.mkdtemp(prefix="sinkhole-drop-", dir="/tmp"))  # pytest's tmp_path is root-only
    state.chmod(0o777)
    nobody = pwd.getpwnam("nobody")
    p = server_process("--upstream", stub.address, "--user", "nobody", db=state / "a.db")
    from tests.conftest import wait_for

    def uids() -> tuple[str, ...]:
        status = Path(f"/proc/{p.proc.pid}/status").read_text()
        return re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M).groups()

    # the port is bound first (as root), the drop follows at once
    assert wait_for(lambda: uids() == (str(nobody.pw_uid),) * 3, timeout=5)
    r = dns.query.udp(dns.message.make_query("chat.deepseek.com", "A"), "127.0.0.1", port=p.port, timeout=5)
    assert r.answer[0][0].to_text() == "0.0.0.0"
    assert p.terminate() == 0
    assert (state / "a.db").stat().st_uid == nobody.pw_uid  # the database was made after the drop
    shutil.rmtree(state)


def test_serve_with_unknown_user_is_one_line_exit_2(tmp_path: Path) -> None:
    exe = shutil.which("sinkhole", path=str(Path(sys.executable).parent))
    out = subprocess.run([exe, "--db", str(tmp_path / "a.db"), "serve", "--listen", "127.0.0.1:0",
                          "--upstream", "127.0.0.1", "--user", "no-such-user-xyz"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) >= 1
    assert out.stderr.strip().splitlines()[-1].startswith("sinkhole: ")
    assert "no-such-user-xyz" in out.stderr.strip().splitlines()[-1]


def _privileged_port() -> int:
    """A port below 1024 free for UDP and TCP on 127.0.0.1 (only root may bind it)."""
    for port in range(1023, 899, -1):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
            try:
                u.bind(("127.0.0.1", port))
                t.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 900..1023")


@pytest.mark.skipif(os.geteuid() != 0, reason="binding as root and dropping needs root")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_rpz_primary_on_a_privileged_port_is_bound_before_root_is_dropped(tmp_path: Path, server_process, stub,
                                                                         workers: str) -> None:
    """--rpz-listen on a port below 1024 with --user: bound as root like the DNS port, served after the drop
    (by the only process, or by worker 0)."""
    import tempfile

    import dns.exception
    import dns.query
    import dns.zone

    unprivileged_start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    port = _privileged_port()
    if unprivileged_start.exists() and int(unprivileged_start.read_text()) <= port:
        pytest.skip("any user may bind that port here: the test would prove nothing")
    state = Path(tempfile.mkdtemp(prefix="sinkhole-drop-", dir="/tmp"))
    state.chmod(0o777)
    try:
        p = server_process("--upstream", stub.address, "--user", "nobody", "--workers", workers,
                           "--rpz-listen", f"127.0.0.1:{port}", db=state / "a.db")
        from tests.conftest import wait_for

        def zone() -> dns.zone.Zone | None:
            try:
                return dns.zone.from_xfr(dns.query.xfr("127.0.0.1", "rpz.sinkhole.", port=port, timeout=3))
            except (OSError, dns.exception.DNSException):
                return None

        z = wait_for(zone, timeout=10)
        assert z is not None, "the RPZ primary does not answer on its port"
        owners = {name.to_text() for name in z.nodes}
        assert {"deepseek.com", "*.deepseek.com"} <= owners  # a shipped rule, served as a zone
        assert p.terminate() == 0
    finally:
        shutil.rmtree(state)
