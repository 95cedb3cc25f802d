"""Files that hold personal data (the database and its WAL and SHM, audit keys, reports): made with explicit
modes whatever the umask, never written over by accident, and the database path checked before anything is
made.

SQLite makes the -wal and -shm files with the mode of the database file, so a database made here 0600 keeps
its WAL and SHM 0600 too.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from sinkhole.errors import ConfigError

FILE_MODE = 0o600
DIR_MODE = 0o700
_SIDE_FILES = ("-wal", "-shm", "-journal")


def private_dirs(path: Path) -> None:
    """Make `path` and its missing parents, each 0700 whatever the umask; directories already there stay as
    they are."""
    missing = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made meanwhile by another process
            continue
        os.chmod(directory, DIR_MODE)


def create_private(path: Path) -> bool:
    """Make an empty file 0600 (whatever the umask) if there is none; True when this call made it."""
    private_dirs(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return True


def write_private(path: Path, data: bytes, keep_owner: bool = False) -> None:
    """Write `data` to `path` through a new 0600 file renamed over it, so that a reader never sees half a file
    and the result is 0600 whatever the file there had. The new file gets an unpredictable name, made with
    O_EXCL in the target's directory (tempfile.mkstemp): a link planted there beforehand is never followed.
    `keep_owner`: a file there owned by someone else (the service user, when root runs the CLI) stays theirs."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes it 0600 already; explicit, whatever it does
        if keep_owner:
            try:
                st = os.stat(path)
                if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                    os.fchown(fd, st.st_uid, st.st_gid)
            except (FileNotFoundError, PermissionError):
                pass
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def check_db_path(path: Path, option: str = "--db") -> Path:
    """A database path must be a regular file, or name none yet in a directory (or where one can be made):
    an SQLite URI or a special file (/dev/null, a directory, a FIFO) is a ConfigError, before anything is made."""
    text = os.fspath(path)
    if text.lower().startswith("file:"):
        raise ConfigError(f"{option} {text}: a file path, not an SQLite URI")
    if not text.strip():
        raise ConfigError(f"{option}: empty path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:  # a parent that is a file, a name too long, no permission to look
        raise ConfigError(f"{option} {text}: {exc.strerror}") from None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{option} {text}: not a regular file ({_kind(st.st_mode)})")
        return path
    for parent in Path(os.path.abspath(path)).parents:  # the nearest ancestor there is must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {text}: {parent} is not a directory")
            break
    return path


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def guard_output(path: Path, force: bool, protected: list[Path], option: str, new_dirs: bool = False) -> None:
    """An output file may not be one of `protected` (the database, its side files, its audit key), even with
    --force; an existing file is written over only with --force; its directory must be there (`new_dirs`: or
    it is made later, 0700). ConfigError otherwise."""
    text = os.fspath(path)
    mine = os.path.realpath(path)
    for p in protected:
        for candidate in (p, *(Path(f"{p}{side}") for side in _SIDE_FILES)):
            if mine == os.path.realpath(candidate) or (candidate.exists() and path.exists()
                                                       and os.path.samefile(path, candidate)):
                raise ConfigError(f"{option} {text}: that is {candidate}, never written over")
    parent = Path(os.path.abspath(path)).parent
    if not new_dirs and not parent.is_dir():  # a typo in the directory is an error, not a new tree
        raise ConfigError(f"{option} {text}: no directory {parent}")
    if path.exists() and not path.is_file():  # /dev/null, a FIFO: a file is renamed over the path, never into it
        raise ConfigError(f"{option} {text}: not a regular file")
    if path.exists() and not force:
        raise ConfigError(f"{option} {text}: the file exists; --force writes over it")
