"""The running server's control socket: `sinkhole reload` asks it to read its settings again and waits
for the answer.

A Unix stream socket next to the database (`sinkhole.db.control`, mode 0600: the service's user and
root may use it), so that the CLI finds the server it shares the database with, as `--db` already
does, with or without systemd. One request a connection: the client writes `reload\\n`; the server
reads its settings after that request came in, applies them in every worker (or refuses them) and
writes one JSON line (`Outcome`) back. A request that comes in while a reload is being applied waits
for the next one, which reads the file again: an answer never describes a file older than the request.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sinkhole.errors import SinkholeError

log = logging.getLogger(__name__)

REQUEST = b"reload\n"
MAX_LINE = 65536
_SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, less the final NUL


class ControlError(SinkholeError):
    """No server answers on the control socket (not running, another database, no answer in time)."""


@dataclass
class Outcome:
    """The answer to one reload: applied in `workers` processes, or refused (and why)."""

    refused: str = ""  # empty: applied
    applied: list[str] = field(default_factory=list)  # "block_ttl = 30"
    restart: list[str] = field(default_factory=list)  # settings that changed but need a restart
    workers: int = 1

    @property
    def ok(self) -> bool:
        return not self.refused

    def to_line(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Outcome:
        data = json.loads(line)
        return cls(str(data.get("refused", "")), list(data.get("applied", [])), list(data.get("restart", [])),
                   int(data.get("workers", 1)))

    def describe(self) -> str:
        """One line for the operator, e.g. 'applied block_ttl = 30 in 2 workers; needs a restart: node'."""
        if self.refused:
            return f"refused, the running settings stay: {self.refused}"
        text = f"applied {', '.join(self.applied)}" if self.applied else "no change to apply"
        text += f" in {self.workers} worker{'s' if self.workers != 1 else ''}"
        return text + (f"; needs a restart: {', '.join(self.restart)}" if self.restart else "")


def path_for(db: str | os.PathLike[str]) -> Path:
    """The control socket of the server that uses the database `db`."""
    db = Path(db)
    return db.with_name(db.name + ".control")


class _Short:
    """A socket address for `path` that fits sun_path: the path itself, or /proc/self/fd/N/NAME through
    a descriptor of its directory when the path is too long (pytest's, or a deep state directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dir_fd: int | None = None

    def __enter__(self) -> str:
        if len(os.fsencode(self.path)) <= _SUN_PATH_MAX:
            return str(self.path)
        self.dir_fd = os.open(self.path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        short = f"/proc/self/fd/{self.dir_fd}/{self.path.name}"
        if len(os.fsencode(short)) > _SUN_PATH_MAX:
            raise OSError(f"{self.path}: the file name is too long for a Unix socket")
        return short

    def __exit__(self, *exc: object) -> None:
        if self.dir_fd is not None:
            os.close(self.dir_fd)


class ControlSocket:
    """The listening control socket and the file it is bound to."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.path = path
        self.inode = path.lstat().st_ino

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close it and remove its file, unless another server has bound that name since."""
        try:
            if self.path.lstat().st_ino == self.inode:
                self.path.unlink()
        except OSError:
            pass
        self.sock.close()


def listen(db: str | os.PathLike[str]) -> ControlSocket | None:
    """Bind the control socket of `db` (non-blocking, mode 0600), or None with a warning when it cannot be
    (`sinkhole reload` then says that no server answers; SIGHUP still reloads). A socket file left by a
    server that died is replaced; one that a running server answers on is left to it."""
    path = path_for(db)
    try:
        with _Short(path) as address:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(address)
            except (ConnectionRefusedError, FileNotFoundError):
                pass
            else:
                log.warning("another server on %s answers on %s: `sinkhole reload` reaches that one", db, path)
                return None
            finally:
                probe.close()
            try:
                if stat.S_ISSOCK(os.lstat(address).st_mode):
                    os.unlink(address)  # left by a server that died
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(address)
                os.chmod(address, 0o600)
                sock.listen(16)
                control = ControlSocket(sock, path)
            except OSError:
                sock.close()
                raise
    except OSError as exc:
        log.warning("no control socket at %s (`sinkhole reload` will not reach this server; SIGHUP reloads): %s",
                    path, exc.strerror or exc)
        return None
    sock.setblocking(False)
    return control


def request_reload(db: str | os.PathLike[str], timeout: float) -> Outcome:
    """Ask the server of `db` to reload and wait for its answer (`timeout` seconds in all)."""
    path = path_for(db)
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            with _Short(path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no server is running on {db} (nothing answers on {path})") from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied (run as the server's user, or root)") from None
        sock.sendall(REQUEST)
        data = b""
        while not data.endswith(b"\n"):
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                raise ControlError(f"no answer from the server on {db} within {timeout:g} s; it may still apply "
                                   "the settings (see its log)") from None
            if not chunk:
                raise ControlError(f"the server on {db} closed the connection without an answer (stopping?)")
            data += chunk
            if len(data) > MAX_LINE:
                raise ControlError("the server's answer is too long")
    finally:
        sock.close()
    try:
        return Outcome.from_line(data)
    except (ValueError, TypeError) as exc:
        raise ControlError(f"the server's answer is not understood: {exc}") from None
