"""Signing in to the web console: passwords (argon2id), session cookies, CSRF tokens, login backoff.

- Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106's second recommendation: 64 MiB,
  3 passes, 4 lanes); a login for an unknown account verifies against a dummy hash, so that the time
  taken does not tell which names exist. Hashing runs on a pool of two threads: 64 MiB each at most.
- A session is a random 256-bit cookie (`HttpOnly`, `SameSite=Strict`, `Secure` over HTTPS); the database
  keeps only its SHA-256. It ends after `idle` seconds unused, `lifetime` seconds after the login, at logout,
  and when its account's password changes or the account is removed.
- CSRF: each session has its own random token; every state-changing request must carry it (form field
  `csrf` or header `X-CSRF-Token`), compared in constant time. The login form has a token of its own, bound
  to a short-lived cookie (double submit), so that no other site can sign a browser in.
- Backoff: failed logins in a row slow the next attempt for that account down (0.25 s, doubling, at most 8 s;
  attempts for one account wait their turn, so that parallel guesses gain nothing); LOCK_AFTER in a row lock
  the account (sinkhole.store.accounts); one address may try LOGIN_RATE logins a minute, whatever the accounts.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict

import argon2

from sinkhole.errors import ConfigError
from sinkhole.web.priority import lower_priority

COOKIE = "sinkhole_session"
LOGIN_COOKIE = "sinkhole_login"  # the login form's double-submit token
MIN_PASSWORD = 10
MAX_PASSWORD = 1024
BACKOFF_BASE = 0.25  # seconds after the first failure in a row; doubled for each further one ...
BACKOFF_MAX = 8.0  # ... up to this
LOGIN_RATE = (10, 60.0)  # login attempts per address, per this many seconds
HASH_THREADS = 2  # argon2 verifications at once (64 MiB each)

_hasher = argon2.PasswordHasher(type=argon2.Type.ID)
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_dummy: str | None = None


class PasswordError(ConfigError):
    """A new password that cannot be used (too short, too long)."""


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise PasswordError(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise PasswordError(f"a password has at most {MAX_PASSWORD} characters")
    return password


def hash_password(password: str) -> str:
    """The argon2id hash (PHC string) of a password that passes check_password."""
    return _hasher.hash(check_password(password))


def verify_password(stored: str | None, password: str) -> bool:
    """Whether `password` matches the hash `stored`; with no hash (an unknown account) a dummy one is checked,
    taking the same time, and the answer is False."""
    global _dummy
    if stored is None:
        if _dummy is None:
            _dummy = _hasher.hash(secrets.token_hex(16))
        stored, password = _dummy, password + "\0never"
    try:
        return _hasher.verify(stored, password[:MAX_PASSWORD])
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def hash_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that run argon2 (shared by every console in the process)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="argon2",
                                                          initializer=lower_priority)
        return _pool


def new_token() -> str:
    return secrets.token_urlsafe(32)


def session_id(cookie: str) -> str:
    """What the database keeps of a session cookie."""
    return hashlib.sha256(cookie.encode()).hexdigest()


def same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


def backoff(failures: int) -> float:
    """Seconds an attempt waits after `failures` failed logins in a row."""
    return 0.0 if failures <= 0 else min(BACKOFF_BASE * 2 ** (failures - 1), BACKOFF_MAX)


class Throttle:
    """Login attempts per key (an address) in a sliding window; bounded in the keys it keeps."""

    def __init__(self, rate: tuple[int, float] = LOGIN_RATE, size: int = 65536) -> None:
        self.rate = rate
        self.size = size
        self.attempts: OrderedDict[str, list[float]] = OrderedDict()

    def allow(self, key: str, now: float) -> float:
        """0 when an attempt from `key` may go ahead now (and counts it), else the seconds to wait."""
        count, window = self.rate
        times = [t for t in self.attempts.get(key, []) if now - t < window]
        if len(times) >= count:
            self.attempts[key] = times
            return window - (now - times[0])
        times.append(now)
        self.attempts[key] = times
        self.attempts.move_to_end(key)
        while len(self.attempts) > self.size:
            self.attempts.popitem(last=False)
        return 0.0


def login_token(secret: bytes, nonce: str) -> str:
    """The login form's token for the nonce in its cookie."""
    return hmac.new(secret, b"login:" + nonce.encode(), hashlib.sha256).hexdigest()
