"""Dropping root after binding port 53, for `sinkhole serve --user NAME` without systemd."""

from __future__ import annotations

import logging
import os
import pwd

from sinkhole.errors import ConfigError

log = logging.getLogger(__name__)


def _lookup(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise ConfigError(f"user {user!r}: no such user") from None


def drop_to(user: str) -> None:
    """Become `user` (name or uid) for good: no supplementary groups, its group, its uid.

    As root: switches real, effective and saved ids, then checks that root cannot be regained.
    Not as root: nothing to do when `user` is who we already are; ConfigError otherwise.
    Call it after the listening sockets are bound and before any file (the database) is opened,
    so that the files the server creates belong to `user`.
    """
    pw = _lookup(user)
    if os.geteuid() != 0:
        if pw.pw_uid == os.getuid() == os.geteuid():
            return
        raise ConfigError(f"user {user!r}: only root can switch to another user (running as uid {os.geteuid()})")
    if pw.pw_uid == 0:
        raise ConfigError(f"user {user!r} is root: name an unprivileged user, such as 'sinkhole'")
    try:
        os.setgroups([])
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    except OSError as exc:
        raise ConfigError(f"user {user!r}: cannot switch to it: {exc.strerror}") from None
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - the kernel would have to be broken
        raise ConfigError(f"user {user!r}: root could be regained after switching; refusing to serve")
    os.environ.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    log.info("running as user %s (uid %d, gid %d)", pw.pw_name, pw.pw_uid, pw.pw_gid)
