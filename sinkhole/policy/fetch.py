"""Fetching list sources over HTTP(S) with conditional requests (ETag / Last-Modified), and from files."""

from __future__ import annotations

import hashlib
import http.client
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sinkhole import __version__
from sinkhole.errors import SinkholeError

MAX_BYTES = 200 * 1024 * 1024  # a list larger than this is refused, not read into memory
TIMEOUT_S = 30.0
CHUNK = 1 << 16


class FetchError(SinkholeError):
    """A list source could not be read (network failure, HTTP error, missing file): exit code 1."""


@dataclass(frozen=True)
class Fetched:
    """What a fetch got: the body (None on 304 Not Modified) and the validators to send next time."""

    location: str
    status: int  # 200, or 304 when the server says the copy we hold is current
    body: bytes | None
    etag: str | None = None
    last_modified: str | None = None

    @property
    def sha256(self) -> str | None:
        return None if self.body is None else hashlib.sha256(self.body).hexdigest()


def is_url(location: str) -> bool:
    return urlsplit(location).scheme.lower() in ("http", "https")


def has_scheme(location: str) -> bool:
    """`ftp://...`, `file:...`: a scheme we do not fetch (a Windows drive letter is no scheme here)."""
    return "://" in location


def fetch_url(url: str, etag: str | None = None, last_modified: str | None = None, *,
              timeout: float | None = None, max_bytes: int | None = None) -> Fetched:
    """GET `url` (certificates verified), conditional when validators are given; FetchError on any failure."""
    timeout = TIMEOUT_S if timeout is None else timeout
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    headers = {"User-Agent": f"sinkhole/{__version__} (+list update)", "Accept-Encoding": "identity"}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    request = urllib.request.Request(url, headers=headers)
    context = ssl.create_default_context()  # verifies the certificate chain and the host name
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise FetchError(f"{url}: {int(length):,} bytes, over the {max_bytes:,}-byte limit")
            chunks, size = [], 0
            while chunk := response.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"{url}: over the {max_bytes:,}-byte limit")
                chunks.append(chunk)
            return Fetched(url, response.status, b"".join(chunks), response.headers.get("ETag"),
                           response.headers.get("Last-Modified"))
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return Fetched(url, 304, None, exc.headers.get("ETag") or etag,
                           exc.headers.get("Last-Modified") or last_modified)
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            reason = f"certificate not trusted: {reason.verify_message}"
        elif isinstance(reason, OSError) and reason.strerror:
            reason = reason.strerror  # "Connection refused", not "[Errno 111] Connection refused"
        raise FetchError(f"{url}: {reason}") from None
    except (TimeoutError, OSError, http.client.HTTPException) as exc:  # a timeout or a cut while reading
        raise FetchError(f"{url}: {exc or type(exc).__name__}") from None
    except ValueError as exc:  # a malformed URL
        raise FetchError(f"{url}: {exc}") from None


def read_file(path: str | Path, max_bytes: int | None = None) -> Fetched:
    """A list file's bytes; FetchError when it cannot be read."""
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise FetchError(f"{p}: {size:,} bytes, over the {max_bytes:,}-byte limit")
        return Fetched(str(p), 200, p.read_bytes())
    except IsADirectoryError:
        raise FetchError(f"{p}: is a directory, not a list file") from None
    except OSError as exc:
        raise FetchError(f"{p}: {exc.strerror or exc}") from None
