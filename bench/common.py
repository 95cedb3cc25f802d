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


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
    """Signal a process we started and reap it; kill it if it does not go in time."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Unbound:
    """A local Unbound that answers every name under example.test itself and never recurses anywhere.

    `body` replaces the configuration after `do-not-query-localhost` (`extra` goes into the default
    body only), so the same class also runs Unbound as a server under test (`unbound_forwarder_body`).
    """

    def __init__(self, workdir: Path, threads: int = 1, port: int | None = None, extra: str = "",
                 body: str | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.conf = workdir / f"unbound-{self.port}.conf"
        if body is None:
            body = f"""  module-config: "iterator"
  msg-cache-size: 64m
  rrset-cache-size: 128m
  local-zone: "." refuse
  local-zone: "example.test." redirect
  local-data: "example.test. 300 IN A 192.0.2.1"
{extra}
forward-zone:
  name: "."
  forward-addr: 127.0.0.1@9
"""
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
{body}""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Unbound:
        exe = shutil.which("unbound") or "/usr/sbin/unbound"
        self.proc = subprocess.Popen([exe, "-d", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            wait_port(self.port)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_process(self.proc)


def unbound_forwarder_body(upstream_port: int, blocked: list[str]) -> str:
    """Unbound as a caching forwarder to 127.0.0.1@upstream_port, answering 0.0.0.0 / :: for blocked domains."""
    zones = "".join(f'  local-zone: "{d}." always_null\n' for d in blocked)
    # Unbound answers the RFC 6761 names (test., invalid., ...) itself unless told not to: forward test.
    return f"""  module-config: "iterator"
  msg-cache-size: 64m
  rrset-cache-size: 128m
  local-zone: "test." nodefault
{zones}
forward-zone:
  name: "."
  forward-addr: 127.0.0.1@{upstream_port}
"""


class Dnsmasq:
    """dnsmasq forwarding to a local upstream, blocking each domain with address=/d/0.0.0.0 and address=/d/::."""

    def __init__(self, workdir: Path, upstream_port: int, blocked: list[str], port: int | None = None,
                 cache_size: int = 10000) -> None:
        self.port = port or free_port()
        self.conf = workdir / f"dnsmasq-{self.port}.conf"
        self.log = workdir / f"dnsmasq-{self.port}.log"
        with self.conf.open("w") as f:
            for d in blocked:
                f.write(f"address=/{d}/0.0.0.0\naddress=/{d}/::\n")
        user = "nobody" if os.geteuid() == 0 else (os.environ.get("USER") or str(os.geteuid()))
        exe = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        self.cmd = [exe, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--listen-address=127.0.0.1",
                    "--bind-interfaces", f"--port={self.port}", f"--server=127.0.0.1#{upstream_port}",
                    f"--cache-size={cache_size}", f"--user={user}", "--pid-file=", "--log-facility=-",
                    f"--conf-file={self.conf}"]
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Dnsmasq:
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=log)
        if wait:
            try:
                wait_dns(self.port, proc=self.proc)
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass
class Sinkhole:
    db: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    lines: list[str] = field(default_factory=list)
    # None: wait until the port answers a DNS query (works at any --log-level and with worker processes)
    ready_line: str | None = "forwarding to"

    def start(self) -> Sinkhole:
        exe = str(Path(sys.executable).parent / "sinkhole")
        self.port = self.port or free_port()
        self.proc = subprocess.Popen(
            [exe, "--db", str(self.db), "serve", "--listen", f"127.0.0.1:{self.port}", *self.args],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, **self.env})
        assert self.proc.stderr is not None
        if self.ready_line is None:
            threading.Thread(target=self._drain, daemon=True).start()
            try:
                wait_dns(self.port, timeout=120, proc=self.proc)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}; sinkhole said: {''.join(self.lines[-5:]).strip()}") from None
            return self
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

    def kill(self) -> None:
        """Best-effort stop for cleanup paths: SIGTERM, then SIGKILL after 60 s."""
        stop_process(self.proc, timeout=60)

    def counts(self) -> dict[str, int]:
        """The per-action counts of the server's 'stopped:' line."""
        for line in reversed(self.lines):
            # "audit answers written N in R rows" (rows with counts), "audit rows written N" before them
            m = re.search(r"stopped: (.*?); audit (?:rows|answers) written (\d+)(?: in \d+ rows)?, dropped (\d+)", line)
            if m:
                pairs = (p.rsplit(" ", 1) for p in m.group(1).split(", ") if " " in p)
                out = {k: int(v) for k, v in pairs if v.isdigit()}  # "no queries": none
                out["audit_written"], out["audit_dropped"] = int(m.group(2)), int(m.group(3))
                return out
        return {}


def query(port: int, qname: str, qtype: str = "A", timeout: float = 1.0) -> tuple[str, list[str]]:
    """(rcode, answer addresses) of one UDP query to 127.0.0.1:port."""
    import dns.message
    import dns.query
    import dns.rcode

    reply = dns.query.udp(dns.message.make_query(qname, qtype), "127.0.0.1", port=port, timeout=timeout)
    addresses = [rr.to_text() for rrset in reply.answer for rr in rrset if rrset.rdtype in (1, 28)]
    return dns.rcode.to_text(reply.rcode()), addresses


def wait_dns(port: int, qname: str = "ready-probe.example.test", timeout: float = 30.0,
             proc: subprocess.Popen | None = None, want: str | None = None) -> float:
    """Wait until 127.0.0.1:port answers qname (with address `want`, when given); seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{Path(str(proc.args[0])).name} exited with {proc.returncode} before answering")
        try:
            _, addresses = query(port, qname, timeout=0.2)
            if want is None or want in addresses:
                return time.monotonic() - t0
        except Exception:  # timeout, connection refused: not up yet
            pass
        time.sleep(0.02)
    raise RuntimeError(f"127.0.0.1:{port} did not answer {qname} within {timeout:.0f} s")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (worker processes), from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid and its descendants (all threads), in seconds."""
    ticks = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine used since boot: user + nice + system of /proc/stat.

    Interrupt and softirq time (where loopback packets are processed) is left out: the kernel
    does not charge it to any process's utime/stime either.
    """
    user, nice, system = (int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def udp_rcvbuf_errors() -> int:
    """Datagrams the kernel dropped because a UDP socket's receive buffer was full (/proc/net/snmp)."""
    head, values = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
                    if line.startswith("Udp:")][:2]
    return int(values[head.index("RcvbufErrors")])


def status_kb(pid: int, key: str = "VmRSS", tree: bool = True) -> int:
    """A /proc/PID/status memory field (VmRSS, VmHWM) in KiB, summed over the process tree."""
    total = 0
    for p in process_tree(pid) if tree else [pid]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def per_process_kb(pid: int, key: str = "VmRSS") -> list[int]:
    """A /proc/PID/status memory field in KiB for pid and each of its descendants."""
    return [status_kb(p, key, tree=False) for p in process_tree(pid)]


def pss_kb(pid: int) -> int:
    """Proportional set size of the process tree in KiB: pages shared by forked workers counted once."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM of pid and its descendants (write 5 to clear_refs, Linux >= 4.0)."""
    ok = True
    for p in process_tree(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


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
            self.samples.append((round(time.monotonic() - self.t0, 1), status_kb(self.pid)))  # whole tree


def dnsperf_cmd(port: int, datafile: Path, seconds: float, qps: int | None = None, clients: int = 4,
                outstanding: int = 100, extra: list[str] | None = None, threads: int = 2) -> list[str]:
    cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(datafile), "-l", str(seconds),
           "-c", str(clients), "-T", str(threads), "-q", str(outstanding), "-t", "3", *(extra or [])]
    if qps:
        cmd += ["-Q", str(qps)]
    return cmd


def dnsperf(port: int, datafile: Path, seconds: float, qps: int | None = None, clients: int = 4,
            outstanding: int = 100, extra: list[str] | None = None, threads: int = 2) -> dict:
    """Run dnsperf (bounded by -l and, when given, -Q) and parse its summary."""
    cmd = dnsperf_cmd(port, datafile, seconds, qps, clients, outstanding, extra, threads)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    return parse_dnsperf(out)


def latencies_ms(out: str) -> list[float]:
    """Per-query latencies from `dnsperf -v` output (lines '> RCODE qname qtype seconds'), sorted."""
    return sorted(float(m) * 1000 for m in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M))


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * p // 100))  # ceil(n * p / 100)
    return sorted_values[int(rank) - 1]


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
        "max_latency_ms": (num(r"Average Latency \(s\):.*max ([\d.]+)") or 0) * 1000,
        "codes": codes, "raw": out,
    }
