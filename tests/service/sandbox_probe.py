"""Import every runtime dependency of sinkhole and exercise its native parts; print what worked as JSON.

Run by the Python of an installed sinkhole, in the unit's sandbox (`systemd-run -p MemoryDenyWriteExecute=yes
-p SystemCallFilter=@system-service ...`, tests/service/test_systemd_container.py) and outside it, or under the
kernel's PR_SET_MDWE (tests/service/test_sandbox.py): the two reports must be the same, so that a dependency
that breaks under the sandbox (an old-style cffi callback, a JIT, a library mapping memory writable and
executable) is caught before an agency installs it. Stdlib only, besides the packages it probes.

    python sandbox_probe.py [--skip-imports]   # one JSON object on stdout; exit 0 unless an exercise failed

It lives in tests/service/, not in tests/: run as a script, its own folder comes first on sys.path, and there
tests/dns/ would be imported as dnspython's `dns`.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata as metadata
import json
import mmap
import os
import pkgutil
import re
import sys
import tempfile
import threading
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

_REQ = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?[^;]*(?:;(.*))?")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_distributions(root: str = "sinkhole") -> list[metadata.Distribution]:
    """`root` and every distribution its requirements reach (with the extras they ask for), as installed.
    A requirement whose distribution is not installed is for another platform, or an extra nobody asked
    for: there is nothing of it to probe."""
    seen: dict[str, metadata.Distribution] = {}
    todo: list[tuple[str, set[str]]] = [(root, set())]
    while todo:
        name, extras = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        key = _norm(dist.metadata["Name"])
        if key in seen and not extras:
            continue
        seen[key] = dist
        for req in dist.requires or []:
            m = _REQ.match(req)
            if not m:
                continue
            marker = m.group(3) or ""
            wanted = _EXTRA.findall(marker)
            if wanted and not set(wanted) & extras:
                continue
            todo.append((m.group(1), {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}))
    return sorted(seen.values(), key=lambda d: _norm(d.metadata["Name"]))


def top_level_modules(dist: metadata.Distribution) -> tuple[list[str], list[str]]:
    """(top-level modules and packages, extension modules as dotted names) of an installed distribution."""
    tops: set[str] = set()
    native: set[str] = set()
    for f in dist.files or []:
        parts = f.parts
        if not parts or parts[0].endswith((".dist-info", ".egg-info", ".data")) or parts[0] in ("..", "__pycache__"):
            continue
        name = parts[-1]
        if name.endswith(".py") or ".so" in name or name.endswith(".pyd"):
            tops.add(parts[0].split(".")[0] if len(parts) == 1 else parts[0])
        if name.endswith(".so") or ".so." in name or name.endswith(".pyd"):
            stem = name.split(".")[0]
            native.add(".".join([*parts[:-1], stem]))
    tops.discard("_distutils_hack")
    return sorted(tops), sorted(native)


def import_everything() -> dict:
    """Import each runtime distribution's modules, submodules (but no __main__) and extension modules."""
    out: dict = {"distributions": {}, "imported": [], "failed": {}, "native": []}

    def attempt(name: str) -> None:
        if name in out["failed"] or name in out["imported"] or name.endswith("__main__") or ".__main__." in name:
            return
        try:
            importlib.import_module(name)
        except BaseException as exc:  # a SystemExit or an OSError under the sandbox is a finding
            out["failed"][name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        else:
            out["imported"].append(name)

    for dist in runtime_distributions():
        tops, native = top_level_modules(dist)
        out["distributions"][dist.metadata["Name"]] = dist.version
        for top in tops:
            attempt(top)
            module = sys.modules.get(top)
            path = getattr(module, "__path__", None)
            if path is None:
                continue
            for info in pkgutil.walk_packages(path, top + ".", onerror=lambda name: None):
                attempt(info.name)
        for name in native:
            attempt(name)
            if name in out["imported"]:
                out["native"].append(name)
    # the standard library's extension modules (ssl, sqlite3, ctypes, hashlib, zlib ...)
    dynload = Path(os.__file__).parent / "lib-dynload"
    for so in sorted(dynload.glob("*.so")):
        name = so.name.split(".")[0]
        attempt(name)
        if name in out["imported"]:
            out["native"].append(name)
    out["imported"].sort()
    out["native"].sort()
    return out


# ---------------------------------------------------------------------------- exercises


def ex_uvloop() -> str:
    """UDP and TCP on loopback through uvloop's libuv, as the server's listeners use it."""
    import uvloop

    async def main() -> str:
        loop = asyncio.get_running_loop()

        class Echo(asyncio.DatagramProtocol):
            def connection_made(self, transport):  # type: ignore[no-untyped-def]
                self.transport = transport

            def datagram_received(self, data, addr):  # type: ignore[no-untyped-def]
                self.transport.sendto(b"udp:" + data, addr)

        server_t, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        got: asyncio.Future[bytes] = loop.create_future()

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):  # type: ignore[no-untyped-def]
                got.set_result(data)

        client_t, _ = await loop.create_datagram_endpoint(Client, remote_addr=server_t.get_extra_info("sockname"))
        client_t.sendto(b"ping")
        udp = await asyncio.wait_for(got, 10)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"tcp:" + await reader.readline())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.write(b"ping\n")
        tcp = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        server.close()
        client_t.close()
        server_t.close()
        assert (udp, tcp) == (b"udp:ping", b"tcp:ping\n"), (udp, tcp)
        return f"uvloop {uvloop.__version__}: UDP and TCP echo on 127.0.0.1"

    return uvloop.run(main())


def ex_sqlite(tmp: Path) -> str:
    """sqlite3 with WAL and JSON, and sqlite-utils with FTS, on a file."""
    import sqlite3

    import sqlite_utils

    db = sqlite_utils.Database(tmp / "probe.db")
    db.enable_wal()
    db["rows"].insert_all(({"id": i, "qname": f"q{i}.example", "detail": json.dumps({"n": i})} for i in range(2000)),
                          pk="id")
    db["rows"].enable_fts(["qname"])
    hits = list(db["rows"].search("q7"))
    total = db.execute("SELECT sum(json_extract(detail, '$.n')) FROM rows").fetchone()[0]
    db.close()
    assert total == sum(range(2000)) and hits, (total, hits)
    return f"SQLite {sqlite3.sqlite_version}: WAL, JSON, FTS"


def ex_ssl() -> str:
    """OpenSSL through ssl: a client context with the CA bundle httpx uses, random bytes, a digest."""
    import hashlib
    import hmac
    import ssl

    import certifi

    ctx = ssl.create_default_context(cafile=certifi.where())
    assert ctx.cert_store_stats()["x509_ca"] > 10
    mac = hmac.new(ssl.RAND_bytes(32), b"row", hashlib.sha256).hexdigest()
    assert len(mac) == 64
    return f"{ssl.OPENSSL_VERSION}: context with {ctx.cert_store_stats()['x509_ca']} CAs, HMAC-SHA256"


def ex_ctypes() -> str:
    """What sinkhole calls through ctypes (prctl, malloc_trim), and a libffi callback (qsort)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(1, 0, 0, 0, 0) == 0  # PR_SET_PDEATHSIG 0: the call the supervisor's workers make
    libc.malloc_trim(0)
    values = (ctypes.c_int * 5)(5, 1, 4, 2, 3)
    compare = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))(
        lambda a, b: a[0] - b[0])
    libc.qsort(values, 5, ctypes.sizeof(ctypes.c_int), compare)
    assert list(values) == [1, 2, 3, 4, 5]
    return "prctl, malloc_trim, qsort with a Python callback"


def ex_priority() -> str:
    """What the web console does to its threads (web/priority.lower_priority: setpriority on one thread), so that
    its pages give way to DNS: the thread must end up nicer, not be refused silently."""
    from sinkhole.web.priority import NICE, lower_priority

    seen: list[int] = []

    def nicer() -> None:
        before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        lower_priority()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) - before)

    t = threading.Thread(target=nicer)
    t.start()
    t.join()
    assert seen == [NICE], f"the thread's nice value rose by {seen}, not {NICE} (setpriority refused?)"
    return f"a console thread made nicer by {NICE} (setpriority)"


def ex_http() -> str:
    """httpx over HTTP/1.1 (h11) to a loopback server, sync and on uvloop; an HTTP/2 (h2) handshake."""
    import http.server

    import h2.config
    import h2.connection
    import httpx
    import uvloop

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        assert httpx.get(url, timeout=10).text == "ok"

        async def get() -> str:
            async with httpx.AsyncClient(http2=True, timeout=10) as client:
                return (await client.get(url)).text

        assert uvloop.run(get()) == "ok"
    finally:
        server.shutdown()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    assert conn.data_to_send().startswith(b"PRI * HTTP/2.0")
    return f"httpx {httpx.__version__}: GET sync and async on uvloop; h2 preface"


def ex_dns() -> str:
    """dnslib and dnspython: a query and an answer to and from wire, a zone; IDNA 2008."""
    import dns.message
    import dns.zone
    import dnslib
    import idna

    q = dns.message.make_query("chat.deepseek.com", "A", use_edns=0)
    parsed = dnslib.DNSRecord.parse(q.to_wire())
    reply = parsed.reply()
    reply.add_answer(dnslib.RR("chat.deepseek.com", rdata=dnslib.A("0.0.0.0"), ttl=60))
    back = dns.message.from_wire(bytes(reply.pack()))
    zone = dns.zone.from_text("@ 60 SOA ns. host. 1 2 3 4 5\n@ 60 NS ns.\nchat 60 A 0.0.0.0\n", "rpz.sinkhole.")
    assert back.answer[0][0].to_text() == "0.0.0.0" and len(zone.nodes) == 2
    assert idna.encode("straße.de") == b"xn--strae-oqa.de"
    return "dnslib and dnspython wire round trip, zone from text, IDNA 2008"


def ex_metrics() -> str:
    """/metrics as sinkhole makes it: prometheus_client's exposition, process_* from /proc/self."""
    import prometheus_client

    from sinkhole.service.metrics import registry_for

    class Nothing:
        def collect(self) -> list:
            return []

    text = prometheus_client.generate_latest(registry_for(Nothing())).decode()  # type: ignore[arg-type]
    assert "process_resident_memory_bytes" in text and "process_start_time_seconds" in text, "no process metrics"
    return "prometheus_client exposition with process metrics"


def ex_tls(tmp: Path) -> str:
    """The block page's certificates (cryptography: a P-256 CA, a leaf minted for a name, loaded through a
    memfd) and a TLS handshake with it over loopback, the client trusting only that CA."""
    import socket
    import ssl

    from sinkhole.web import certs

    ca = certs.init_ca(tmp / "ca", "probe CA")
    server_ctx = certs.Minter(ca).context("chat.deepseek.com")
    assert server_ctx is not None
    client_ctx = ssl.create_default_context(cadata=ca.pem().decode())
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"hello " + tls.recv(64))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            client_ctx.wrap_socket(raw, server_hostname="chat.deepseek.com") as tls:
        tls.sendall(b"probe")
        got = tls.recv(64)
        version = tls.version()
    thread.join(10)
    listener.close()
    assert got == b"hello probe", got
    return f"CA and leaf for chat.deepseek.com (cryptography), {version} handshake verified"


def ex_aiohttp() -> str:
    """aiohttp's server and client (its C HTTP parser) on uvloop over loopback, a Jinja2 page (MarkupSafe)."""
    import aiohttp
    import jinja2
    import uvloop
    from aiohttp import web

    page = jinja2.Environment(autoescape=True).from_string("<p>{{ name }} is blocked</p>")

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=page.render(name=request.query["name"]), content_type="text/html")

    async def main() -> str:
        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as session, \
                    session.get(f"http://127.0.0.1:{port}/", params={"name": "<b>x</b>"}) as resp:
                return await resp.text()
        finally:
            await runner.cleanup()

    text = uvloop.run(main())
    assert text == "<p>&lt;b&gt;x&lt;/b&gt; is blocked</p>", text
    return f"aiohttp {aiohttp.__version__} server and client on uvloop, Jinja2 autoescape"


def ex_argon2() -> str:
    """The web console's passwords: argon2id through argon2-cffi's compiled bindings (hash, verify, reject)."""
    import argon2

    hasher = argon2.PasswordHasher(type=argon2.Type.ID)
    digest = hasher.hash("a long enough password")
    assert hasher.verify(digest, "a long enough password")
    try:
        hasher.verify(digest, "another password")
    except argon2.exceptions.VerifyMismatchError:
        pass
    else:
        raise AssertionError("a wrong password verified")
    return f"argon2-cffi {metadata.version('argon2-cffi')}: {digest[:digest.index('$', 10)]} hashed and verified"


def ex_sinkhole(tmp: Path) -> str:
    """sinkhole's own store: a new database seeded with the shipped lists, the policy loaded."""
    from sinkhole.store.db import open_store

    store = open_store(tmp / "sinkhole.db")
    try:
        policy = store.load_policy(True)
    finally:
        store.close()
    return f"sinkhole store: policy version {policy.version}, {policy.blocks} block rules"


def wx_mapping() -> str:
    """Whether memory can be mapped writable and executable at once: 'refused' under MemoryDenyWriteExecute."""
    try:
        m = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError as exc:
        return f"refused ({exc.strerror})"
    m.close()
    return "allowed"


def status() -> dict[str, str]:
    fields = ("Uid", "NoNewPrivs", "Seccomp", "CapEff", "CapBnd")
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            out[key] = value.split()[0] if key == "Uid" else value.strip()
    return out


def main() -> int:
    warnings.simplefilter("ignore")  # deprecations from importing everything: not what this looks for
    report: dict = {"python": sys.version.split()[0], "status": status(), "wx_mapping": wx_mapping()}
    if "--skip-imports" not in sys.argv:
        report.update(import_everything())
    exercises: dict[str, str] = {}
    failed = 0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        steps: list[tuple[str, Callable[[], str]]] = [
            ("uvloop", ex_uvloop), ("sqlite", lambda: ex_sqlite(tmp)), ("ssl", ex_ssl), ("ctypes", ex_ctypes),
            ("priority", ex_priority), ("http", ex_http), ("dns", ex_dns), ("metrics", ex_metrics),
            ("tls", lambda: ex_tls(tmp)), ("aiohttp", ex_aiohttp), ("argon2", ex_argon2),
            ("sinkhole", lambda: ex_sinkhole(tmp))]
        for name, step in steps:
            try:
                exercises[name] = "ok: " + step()
            except BaseException:  # reported, and the exit code says so
                failed += 1
                exercises[name] = "FAILED: " + traceback.format_exc().strip().splitlines()[-1]
    report["exercises"] = exercises
    print(json.dumps(report, indent=1, sort_keys=True))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
