"""Shared pieces of the benchmarks: local Unbound upstream, sinkhole process, dnsperf runs, RSS sampling.

Everything listens on and sends to 127.0.0.1 only. Every load is bounded by dnsperf's
-l (seconds) and -Q (queries per second).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None and not Path(f"/usr/sbin/{p}").exists()]
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)}: apt-get install dnsperf unbound dnsmasq-base")


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


class Unbound:
    """A local Unbound that answers every name under example.test itself and never recurses anywhere."""

    def __init__(self, workdir: Path, threads: int = 1, port: int | None = None, extra: str = "") -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.conf = workdir / f"unbound-{self.port}.conf"
        self.conf.write_text(f"""server:
  interface: 127.0.0.1
  port: {self.port}
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{workdir}"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  num-threads: {threads}
  so-reuseport: yes
  access-control: 127.0.0.0/8 allow
  do-ip6: no
  do-not-query-localhost: no
  module-config: "iterator"
  msg-cache-size: 64m
  rrset-cache-size: 128m
  local-zone: "." refuse
  local-zone: "example.test." redirect
  local-data: "example.test. 300 IN A 192.0.2.1"
{extra}
forward-zone:
  name: "."
  forward-addr: 127.0.0.1@9
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Unbound:
        exe = shutil.which("unbound") or "/usr/sbin/unbound"
        self.proc = subprocess.Popen([exe, "-d", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Sinkhole:
    db: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    lines: list[str] = field(default_factory=list)

    def start(self) -> Sinkhole:
        exe = str(Path(sys.executable).parent / "sinkhole")
        self.port = self.port or free_port()
        self.proc = subprocess.Popen(
            [exe, "--db", str(self.db), "serve", "--listen", f"127.0.0.1:{self.port}", *self.args],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, **self.env})
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "forwarding to" in line:
                break
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        time.sleep(0.2)
        return code

    def counts(self) -> dict[str, int]:
        """The per-action counts of the server's 'stopped:' line."""
        for line in reversed(self.lines):
            m = re.search(r"stopped: (.*?); audit rows written (\d+), dropped (\d+)", line)
            if m:
                out = {k: int(v) for k, v in (p.rsplit(" ", 1) for p in m.group(1).split(", ") if " " in p)}
                out["audit_written"], out["audit_dropped"] = int(m.group(2)), int(m.group(3))
                return out
        return {}


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.stopping = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.samples.append((round(time.monotonic() - self.t0, 1), rss_kb(self.pid)))


def dnsperf(port: int, datafile: Path, seconds: int, qps: int | None = None, clients: int = 4,
            outstanding: int = 100, extra: list[str] | None = None) -> dict:
    """Run dnsperf (bounded by -l and, when given, -Q) and parse its summary."""
    cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(datafile), "-l", str(seconds),
           "-c", str(clients), "-T", "2", "-q", str(outstanding), "-t", "3", *(extra or [])]
    if qps:
        cmd += ["-Q", str(qps)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    return parse_dnsperf(out)


def parse_dnsperf(out: str) -> dict:
    def num(pattern: str, cast=float) -> float | int | None:
        m = re.search(pattern, out)
        return cast(m.group(1)) if m else None

    codes = {}
    m = re.search(r"Response codes:\s*(.*)", out)
    if m:
        for code, n in re.findall(r"([A-Z]+) (\d+)", m.group(1)):
            codes[code] = int(n)
    return {
        "sent": num(r"Queries sent:\s+(\d+)", int), "completed": num(r"Queries completed:\s+(\d+)", int),
        "lost": num(r"Queries lost:\s+(\d+)", int), "qps": num(r"Queries per second:\s+([\d.]+)"),
        "avg_latency_ms": (num(r"Average Latency \(s\):\s+([\d.]+)") or 0) * 1000,
        "latency_stddev_ms": (num(r"Latency StdDev \(s\):\s+([\d.]+)") or 0) * 1000,
        "codes": codes, "raw": out,
    }
