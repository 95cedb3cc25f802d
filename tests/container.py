"""A Debian 12 container booted by its own systemd (systemd-nspawn), for `make systemd-test`.

The base system (debootstrap, minbase plus systemd, python3-venv, make, dig) is built once and cached
outside the repository (`$SINKHOLE_CONTAINER_CACHE`, else `$XDG_CACHE_HOME/sinkhole-systemd-test` when
XDG_CACHE_HOME is set, else /var/cache/sinkhole-systemd-test), keyed by what goes into it; so are the
wheels of sinkhole's runtime dependencies, built on the host for the container's pip. Each run boots the
cached tree with a throwaway overlay on top (`--volatile=overlay`: nothing a run writes stays) and a
private network with only a loopback interface (`--private-network`), the source tree and the wheels
bound read-only. Commands run inside through nsenter; systemd in the container needs no machined on
the host (`--register=no --keep-unit`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = "bookworm"  # Debian 12, systemd 252
# minbase has no init: systemd + systemd-sysv boot it, dbus for systemctl/systemd-run's bus; python3-venv and
# make for `make install`; dnsutils for dig; procps for ps/pgrep
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "make", "dnsutils", "procps")
# units a container does not need: fewer processes, and nothing that waits for a network it does not have
MASKED = ("apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
          "fstrim.timer", "console-getty.service", "getty@tty1.service", "systemd-timesyncd.service")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def cache_dir() -> Path:
    if os.environ.get("SINKHOLE_CONTAINER_CACHE"):
        return Path(os.environ["SINKHOLE_CONTAINER_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "sinkhole-systemd-test"
    return Path("/var/cache/sinkhole-systemd-test")


def debian_mirror() -> str:
    """$SINKHOLE_DEBIAN_MIRROR, else the Debian archive apt on this host uses, else deb.debian.org."""
    if os.environ.get("SINKHOLE_DEBIAN_MIRROR"):
        return os.environ["SINKHOLE_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":  # deb822: URIs: and Suites: in one stanza
            for stanza in text.split("\n\n"):
                uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
                if uris and suites and SUITE in suites.group(1).split():
                    return uris.group(1)
        else:
            for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s", text, re.M):
                if m.group(2) == SUITE:
                    return m.group(1)
    return "http://deb.debian.org/debian"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def _replace_older(cache: Path, prefix: str, keep: Path) -> None:
    for old in cache.glob(prefix + "*"):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def base_image(log=print) -> Path:
    """The cached Debian 12 tree (built with debootstrap the first time, ~1-2 min and ~370 MB)."""
    cache = cache_dir()
    root = cache / f"debian12-{_key(SUITE, PACKAGES, MASKED)}"
    if (root / ".sinkhole-complete").exists():
        return root
    with _locked(cache / ".lock"):
        if (root / ".sinkhole-complete").exists():
            return root
        building = cache / f".building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        mirror = debian_mirror()
        log(f"debootstrap {SUITE} from {mirror} into {building} ...")
        started = time.monotonic()
        proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                               str(building), mirror], capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(building, ignore_errors=True)
            raise RuntimeError(f"debootstrap failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        (building / "etc/machine-id").write_text("")  # made at each boot
        (building / "etc/hostname").write_text("sinkhole-test\n")
        for unit in MASKED:
            link = building / "etc/systemd/system" / unit
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
        shutil.rmtree(building / "var/cache/apt/archives", ignore_errors=True)
        (building / ".sinkhole-complete").write_text(f"{SUITE} {' '.join(PACKAGES)}\n")
        _replace_older(cache, "debian12-", root)
        building.rename(root)
        log(f"base image ready in {time.monotonic() - started:.0f} s: {root}")
    return root


def runtime_requirements() -> list[str]:
    """sinkhole's runtime requirements (pyproject's, as installed here) and what `pip install .` builds with
    (pyproject's build-system requires: setuptools, and Cython for the fast path; the container has no compiler,
    so the build there goes on without the compiled module and sinkhole runs on its pure-Python twin)."""
    import tomllib
    from importlib.metadata import requires

    reqs = [r for r in requires("sinkhole") or [] if "extra ==" not in r]
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    return [*reqs, "pip", *build, "wheel"]


def wheelhouse(log=print) -> Path:
    """Wheels of the runtime requirements for the container's Python, so that `make install` runs offline."""
    if sys.version_info[:2] != (3, 11):
        raise RuntimeError(f"the wheels are built by this Python ({sys.version.split()[0]}) for Debian 12's 3.11: "
                           "run make systemd-test from a venv of Python 3.11")
    cache = cache_dir()
    reqs = runtime_requirements()
    out = cache / f"wheels-{_key(reqs, sys.version_info[:2])}"
    if (out / ".sinkhole-complete").exists():
        return out
    with _locked(cache / ".lock"):
        if (out / ".sinkhole-complete").exists():
            return out
        building = cache / f".wheels-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        log(f"pip wheel {' '.join(reqs)} ...")
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(building), *reqs],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(building, ignore_errors=True)
            raise RuntimeError(f"pip wheel failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        (building / ".sinkhole-complete").write_text("\n".join(reqs) + "\n")
        _replace_older(cache, "wheels-", out)
        building.rename(out)
    return out


def stage_source(dest: Path) -> Path:
    """The files of this checkout as a fresh clone would have them (tracked, and new ones not ignored)."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in files:
        if not name:
            continue
        src = ROOT / os.fsdecode(name)
        if not src.is_file():  # deleted in the work tree
            continue
        target = dest / os.fsdecode(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest


class Container:
    """A booted container: `run` executes a command inside, as root, with a clean environment."""

    def __init__(self, root: Path, binds: dict[Path, str], logfile: Path) -> None:
        self.root = root
        self.binds = binds
        self.logfile = logfile
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def start(self, timeout: float = 120) -> None:
        cmd = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--private-network",
               "--volatile=overlay", "--boot", "--console=passive", f"--machine=sinkhole-test-{os.getpid()}",
               "-D", str(self.root)]
        cmd += [f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()]
        with open(self.logfile, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.proc.returncode}: {self.logfile.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no systemd in the container after {timeout} s: {self.logfile.read_text()}")
            self.leader = _child_named(self.proc.pid, "systemd")
            time.sleep(0.05)
        state = ""
        # Until systemd has made /run/systemd/system and opened its private bus, is-system-running prints
        # nothing or "offline" (it cannot tell a booting systemd from none): ask again until it knows.
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.proc.returncode}: {self.logfile.read_text()}")
            remaining = max(1.0, deadline - time.monotonic())
            state = self.run("systemctl", "is-system-running", "--wait", check=False,
                             timeout=remaining).stdout.strip()
            if state not in ("", "offline"):
                break
            time.sleep(0.1)
        if state not in ("running", "degraded"):
            failed = self.run("systemctl", "--failed", check=False)
            raise RuntimeError(f"the container's systemd is {state!r} after {timeout} s: "
                               f"{failed.stdout}{failed.stderr}\n{self.logfile.read_text()[-4000:]}")

    def run(self, *cmd: str, input: str | None = None, check: bool = True, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`cmd` inside the container (every namespace of its init), as root, with only PATH, HOME, LANG set."""
        base = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        full = ["nsenter", f"--target={self.leader}", "--all", "--root", "--wd", "env", "-i",
                *[f"{k}={v}" for k, v in base.items()], *cmd]
        proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, **kw)

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.run("systemctl", "poweroff", "--no-block", check=False, timeout=30)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)  # the nspawn we started; the kernel ends its namespace
            self.proc.wait(30)


def _child_named(parent: int, comm: str) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == parent and name == comm:
            return int(entry.name)
    return 0


@contextlib.contextmanager
def booted(log=print) -> Iterator[tuple[Container, dict[str, float]]]:
    """The base image booted with this checkout at /mnt/src and the wheels at /mnt/wheels; yields the container
    and the seconds each step took."""
    times: dict[str, float] = {}
    started = time.monotonic()
    root = base_image(log)
    times["base image (cached after the first run)"] = time.monotonic() - started
    started = time.monotonic()
    wheels = wheelhouse(log)
    times["wheels (cached)"] = time.monotonic() - started
    with tempfile.TemporaryDirectory(prefix="sinkhole-systemd-test-") as tmp:
        src = stage_source(Path(tmp) / "src")
        started = time.monotonic()
        box = Container(root, {src: "/mnt/src", wheels: "/mnt/wheels"}, Path(tmp) / "nspawn.log")
        try:
            box.start()
            times["boot"] = time.monotonic() - started
            yield box, times
        finally:
            box.stop()
