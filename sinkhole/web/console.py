"""The web console: security officers and DNS admins work in a browser (`web_listen`).

Pages rendered on the server (Jinja2, autoescaped; no script at all: the Content-Security-Policy forbids it)
and a JSON API under /api/ with the same roles, both calling sinkhole.web.api, which calls the library the CLI
uses. Roles are checked on the server for every page and endpoint: viewer (the dashboard), auditor (+ the log,
exports, verification, reports, and reading the policy), admin (+ changing the policy, and accounts).

Sign-in, sessions, CSRF and backoff: sinkhole.web.sessions; accounts and the login journal: sinkhole.store.accounts.

It runs like the block page: on its own event loop in a thread (sinkhole.web.limits.Service) of the single
server, or of the supervisor when there are workers, behind the same Gate (connection caps per address). The
database is read on a pool of threads (READ_THREADS, each query stopped after QUERY_SECONDS), written on one
thread; at most MAX_PENDING calls wait at once (beyond: 503). Exports, verification and list downloads have
threads of their own. So the DNS event loops never wait for the console, nor the console for a long query.

Plain HTTP is served only on loopback addresses; elsewhere HTTPS with `web_cert`/`web_key` or a certificate
minted from the block page's CA (`sinkhole ca init`), and plain HTTP requests are redirected to HTTPS.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ipaddress
import json
import logging
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import jinja2
from aiohttp import web

from sinkhole import __version__
from sinkhole.audit import chain, report
from sinkhole.errors import ConfigError, DomainError, ListFormatError
from sinkhole.service import build, metrics, operations
from sinkhole.store import browse
from sinkhole.store.accounts import LOCK_AFTER, LOCK_SECONDS, Accounts, Session, may
from sinkhole.store.db import Store
from sinkhole.store.schema import iso
from sinkhole.web import api, certs, sessions
from sinkhole.web.blockpage import host_of, plain_address
from sinkhole.web.limits import Gate, Limits
from sinkhole.web.priority import lower_priority

log = logging.getLogger(__name__)

READ_THREADS = 3
MAX_PENDING = 32  # database calls waiting at once; beyond, 503
QUERY_SECONDS = 15.0  # a page's query is stopped after this (an export's is not)
EXPORTS = 2  # exports at once
STATS_TTL = 60.0  # seconds the dashboard's figures are reused before they are computed again
SAMPLE_EVERY = 5.0  # seconds between two samples of the live counters (queries per second)
STATIC = {"console.css": "text/css"}
LIMITS = Limits(max_connections=256, per_address=32, rate=20.0, burst=60.0, lifetime=1800.0, keepalive=15.0,
                max_body=65536, answer_refused=True)  # a person over a cap reads a 429, not a reset
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self';"
                               " frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
REPORT_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'none';"
              " frame-ancestors 'none'; base-uri 'none'")
USER_ERRORS = (ConfigError, DomainError, ListFormatError)
# what a request carries between the checks and its handler (typed keys where aiohttp has them, 3.12 and later)
_KEY = getattr(web, "RequestKey", None)
SESSION: Any = _KEY("session", object) if _KEY else "session"
PARAMS: Any = _KEY("params", dict) if _KEY else "params"
PERIODS = {"1h": 1, "24h": 24, "7d": 24 * 7, "30d": 24 * 30}


# what every failed sign-in reads, whatever failed (no such account, a wrong password, a locked account): the
# answer must not tell which names exist or are locked; the journal and the server log say which it was
FAILED_LOGIN = (f"Wrong name or password. After {LOCK_AFTER} failed sign-ins in a row an account is locked for "
                f"{LOCK_SECONDS // 60} minutes; an admin can unlock it sooner.")


class Refused(Exception):
    """A request refused before it ran: status and message (JSON for the API, a page otherwise)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return plain_address(peer[0]) if peer else ""


class Console:
    """The console's aiohttp app and everything it keeps (see the module's text).

    `live()` returns the metrics snapshots of the serving processes (sinkhole.service.metrics) and `health()` their
    problems; `tls` is a function returning the TLS context for a connection, or None for plain HTTP."""

    def __init__(self, cfg: Any, db: Path, live: Callable[[], list[dict]] = list,
                 health: Callable[[], list[str]] = list, tls: Callable[[str], ssl.SSLContext] | None = None,
                 limits: Limits = LIMITS) -> None:
        self.cfg = cfg
        self.db = Path(db)
        self.live = live
        self.health = health
        self.tls = tls
        self.limits = limits
        self.started = time.time()
        self.idle = float(cfg.web.web_idle_timeout)
        self.lifetime = float(cfg.web.web_session_lifetime)
        self.secret = secrets.token_bytes(32)
        self.env = jinja2.Environment(loader=jinja2.PackageLoader("sinkhole.web", "templates/console"),
                                      autoescape=True, trim_blocks=True, lstrip_blocks=True)
        self.env.globals.update(may=may, version=__version__, urlencode=urlencode)
        self._local = threading.local()
        pool = concurrent.futures.ThreadPoolExecutor
        self._readers = pool(READ_THREADS, thread_name_prefix="console-db", initializer=lower_priority)
        self._writer = pool(1, thread_name_prefix="console-write", initializer=lower_priority)
        self._slow = pool(1, thread_name_prefix="console-jobs", initializer=lower_priority)
        self._exports = pool(EXPORTS, thread_name_prefix="console-export", initializer=lower_priority)
        self._stores: list[Store] = []
        self._stores_lock = threading.Lock()
        self._pending = 0
        self._export_slots = asyncio.Semaphore(EXPORTS)
        self.throttle = sessions.Throttle()
        self._login_locks: collections.OrderedDict[str, asyncio.Lock] = collections.OrderedDict()
        self.flashes: dict[str, tuple[str, str]] = {}
        self.stats_cache: dict[str, tuple[float, dict]] = {}
        self._stats_running: dict[str, asyncio.Task] = {}
        self.samples: collections.deque[tuple[float, dict[str, int]]] = collections.deque(maxlen=240)
        self.verification: dict | None = None  # the last verification: who, when, the result (never the key)
        self._verifying = False
        self._tasks: set[asyncio.Task] = set()
        self.gate = Gate(self.app(), self.limits, self.tls, "web console")

    # ------------------------------------------------------------------ the database, off the event loop

    def _store(self) -> Store:
        store = getattr(self._local, "store", None)
        if store is None or store.replaced():
            if store is not None:
                store.close()
            store = Store(self.db)
            local = self._local
            # a query running past its thread's deadline is interrupted (DatabaseError: interrupted)
            store.interrupt_when(lambda: bool((d := getattr(local, "deadline", None)) and time.monotonic() > d))
            self._local.store = store
            with self._stores_lock:
                self._stores.append(store)
        return store

    def _in_thread(self, fn: Callable, args: tuple, seconds: float | None) -> Any:
        store = self._store()
        self._local.deadline = time.monotonic() + seconds if seconds else None
        try:
            return fn(store, *args)
        finally:
            self._local.deadline = None

    async def run(self, fn: Callable, *args: Any, pool: str = "read", seconds: float | None = QUERY_SECONDS) -> Any:
        """fn(store, *args) on a database thread: `read` (the pool), `write` (one thread) or `slow` (downloads)."""
        if self._pending >= MAX_PENDING:
            raise Refused(503, "the console is busy; try again in a moment")
        executor = {"read": self._readers, "write": self._writer, "slow": self._slow, "export": self._exports}[pool]
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, self._in_thread, fn, args, seconds)
        except Exception as exc:
            if "interrupted" in str(exc):
                raise Refused(503, f"the query took longer than {QUERY_SECONDS:.0f} s: narrow the filter") from None
            raise
        finally:
            self._pending -= 1

    # ------------------------------------------------------------------ sessions

    async def session_of(self, request: web.Request) -> Session | None:
        if SESSION in request:
            return request[SESSION]
        request[SESSION] = None
        cookie = request.cookies.get(sessions.COOKIE, "")
        if not cookie or len(cookie) > 128:
            return None
        ident = sessions.session_id(cookie)
        sess = await self.run(lambda st: Accounts(st).session(ident))
        if sess is None:
            return None
        now = time.time()
        if now - sess.seen > self.idle or now - sess.created > self.lifetime:
            await self.run(lambda st: Accounts(st).end_session(ident), pool="write")
            return None
        if now - sess.seen > 30:  # the last use, a write at most every 30 s per session
            await self.run(lambda st: Accounts(st).touch(ident, now), pool="write")
        request[SESSION] = sess
        return sess

    def _cookie(self, response: web.StreamResponse, request: web.Request, name: str, value: str,
                max_age: int | None = None) -> None:
        response.set_cookie(name, value, path="/", httponly=True, samesite="Strict", secure=request.secure,
                            max_age=max_age)

    async def params(self, request: web.Request) -> dict[str, Any]:
        """The request's parameters: the query string, and for POST the form (multipart too) or JSON body."""
        if PARAMS in request:
            return request[PARAMS]
        out: dict[str, Any] = {}
        for key, value in request.query.items():
            out.setdefault(key, []).append(value)
        if request.method == "POST":
            if request.content_type == "application/json":
                try:
                    body = await request.json()
                except ValueError:
                    raise Refused(400, "the body is not JSON") from None
                if not isinstance(body, dict):
                    raise Refused(400, "the body must be a JSON object")
                for key, value in body.items():
                    out[key] = [str(v) for v in value] if isinstance(value, list) else (
                        None if value is None else str(value))
            else:
                try:
                    form = await request.post()
                except web.HTTPRequestEntityTooLarge:
                    raise Refused(413, f"a request body has at most {self.limits.max_body} bytes") from None
                for key, value in form.items():
                    if isinstance(value, web.FileField):
                        value = value.file.read(self.limits.max_body).decode("utf-8", "replace")
                    out.setdefault(key, []).append(value)
        flat = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v) for k, v in out.items()}
        request[PARAMS] = flat
        return flat

    def csrf_ok(self, request: web.Request, sess: Session, params: dict) -> bool:
        given = request.headers.get("X-CSRF-Token") or api.text(params, "csrf", limit=200)
        return sessions.same(given, sess.csrf)

    def flash(self, sess: Session, kind: str, message: str) -> None:
        if len(self.flashes) > 10000:
            self.flashes.clear()
        self.flashes[sess.id] = (kind, message)

    # ------------------------------------------------------------------ the app

    def app(self) -> web.Application:
        @web.middleware
        async def guard(request: web.Request, handler: Callable) -> web.StreamResponse:
            api_call = request.path.startswith("/api/")
            try:
                if self.tls is not None and not request.secure:  # HTTPS only: never a password in clear
                    raise web.HTTPPermanentRedirect(self._https_url(request))
                origin = request.headers.get("Origin")
                if request.method == "POST" and origin and origin != "null" and not self._same_origin(request, origin):
                    raise Refused(403, "a request from another site")
                response = await handler(request)
            except Refused as exc:
                response = self._refusal(request, exc.status, exc.message, api_call)
            except web.HTTPException as exc:
                if exc.status >= 400 and api_call:
                    response = web.json_response({"error": exc.reason}, status=exc.status)
                else:  # a redirect (or aiohttp's own 404/405): with the same headers as every response
                    for key, value in HEADERS.items():
                        exc.headers.setdefault(key, value)
                    if request.secure:
                        exc.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
                    raise
            for key, value in HEADERS.items():
                response.headers.setdefault(key, value)
            if request.secure:
                response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
            return response

        app = web.Application(middlewares=[guard], client_max_size=self.limits.max_body)
        r = app.router
        r.add_get("/static/{name}", self.static)
        r.add_get("/login", self.login_page)
        r.add_post("/login", self.login_form)
        r.add_post("/api/login", self.login_api)
        r.add_post("/logout", self.page("viewer", self.logout))
        r.add_post("/api/logout", self.endpoint("viewer", self.logout))
        r.add_get("/api/session", self.endpoint("viewer", self.session_info))
        r.add_post("/api/password", self.endpoint("viewer", self.own_password))
        r.add_get("/password", self.page("viewer", self.password_page))
        r.add_post("/password", self.page("viewer", self.own_password))
        r.add_get("/", self.page("viewer", self.dashboard))
        r.add_get("/api/dashboard", self.endpoint("viewer", self.dashboard))
        r.add_get("/log", self.page("auditor", self.log))
        r.add_get("/api/log", self.endpoint("auditor", self.log))
        r.add_get("/log/export", self.page("auditor", self.export))
        r.add_get("/api/log/export", self.endpoint("auditor", self.export))
        r.add_get("/log/{seq:[0-9]{1,18}}", self.page("auditor", self.log_row))
        r.add_get("/api/log/{seq:[0-9]{1,18}}", self.endpoint("auditor", self.log_row))
        r.add_get("/verify", self.page("auditor", self.verify))
        r.add_post("/verify", self.page("auditor", self.verify_start))
        r.add_get("/api/verify", self.endpoint("auditor", self.verify))
        r.add_post("/api/verify", self.endpoint("auditor", self.verify_start))
        r.add_get("/report", self.page("auditor", self.report))
        r.add_get("/api/report", self.endpoint("auditor", self.report))
        # the policy: read by auditors, changed by admins; each page posts to its JSON twin's function
        for name, fn, role in (("changes", api.changes, "auditor"), ("rules", api.rules, "auditor"),
                               ("lists", api.lists, "auditor"), ("groups", api.groups, "auditor"),
                               ("check", api.check, "auditor"), ("requests", api.requests, "auditor"),
                               ("users", api.users, "admin")):
            r.add_get(f"/api/{name}", self.endpoint(role, self.reader(fn)))
            r.add_get(f"/{name}", self.page(role, self.reader(fn, f"{name}.html")))
        for path, fn, back in (("rules", api.rule_add, "rules"), ("rules/remove", api.rule_remove, "rules"),
                               ("lists/enable", api.list_enable, "lists"),
                               ("lists/disable", api.list_disable, "lists"),
                               ("lists/import", api.list_import, "lists"), ("lists/update", api.lists_update, "lists"),
                               ("groups", api.group_save, "groups"), ("groups/remove", api.group_remove, "groups"),
                               ("requests/approve", api.request_approve, "requests"),
                               ("requests/deny", api.request_deny, "requests"),
                               ("users/role", api.user_role, "users"), ("users/unlock", api.user_unlock, "users"),
                               ("users/remove", api.user_remove, "users")):
            slow = path in ("lists/import", "lists/update")
            r.add_post(f"/api/{path}", self.endpoint("admin", self.changer(fn, slow=slow)))
            r.add_post(f"/{path}", self.page("admin", self.changer(fn, back, slow=slow)))
        for path, fn in (("users", api.user_add), ("users/password", api.user_password)):
            r.add_post(f"/api/{path}", self.endpoint("admin", self.with_password(fn)))
            r.add_post(f"/{path}", self.page("admin", self.with_password(fn, "users")))
        return app

    def _https_url(self, request: web.Request) -> str:
        """The same page over HTTPS, on the same port: at the name the Host header gives when it is this console's
        (web_name or the address the request came in on), else at web_name or that address. Never a host the
        request chose: a forged Host cannot turn the console into a redirect to another site."""
        local = request.transport.get_extra_info("sockname") if request.transport else None
        address, port = (plain_address(local[0]), local[1]) if local else ("localhost", 443)
        ours = {address.lower(), "localhost" if is_loopback(address) else address.lower()}
        if self.cfg.web.web_name:
            ours.add(self.cfg.web.web_name.lower())
        asked = host_of(request.headers.get("Host", ""))
        name = asked.lower() if asked.lower() in ours else (self.cfg.web.web_name or address)
        try:
            literal = ipaddress.ip_address(name).version == 6
        except ValueError:
            literal = False
        return f"https://{f'[{name}]' if literal else name}:{port}{request.path_qs}"

    def _same_origin(self, request: web.Request, origin: str) -> bool:
        return origin == f"{request.scheme}://{request.headers.get('Host', '')}"

    def _refusal(self, request: web.Request, status: int, message: str, api_call: bool) -> web.Response:
        if api_call:
            return web.json_response({"error": message}, status=status)
        return self.render(request, "error.html", {"status": status, "message": message}, status=status)

    def endpoint(self, role: str, handler: Callable[..., Awaitable[Any]]) -> Callable:
        """A JSON endpoint that needs `role`: 401 without a session, 403 below the role or (POST) without the
        session's CSRF token."""
        async def wrapped(request: web.Request) -> web.StreamResponse:
            sess = await self.session_of(request)
            if sess is None:
                raise Refused(401, "sign in first (POST /api/login)")
            if not may(sess.role, role):
                raise Refused(403, f"needs the {role} role (this account is {sess.role})")
            params = await self.params(request)
            if request.method == "POST" and not self.csrf_ok(request, sess, params):
                raise Refused(403, "the CSRF token is missing or wrong (header X-CSRF-Token, from /api/session)")
            try:
                result = await handler(request, sess, params, True)
            except USER_ERRORS as exc:
                raise Refused(400, str(exc)) from None
            if isinstance(result, web.StreamResponse):
                return result
            return web.json_response(result, dumps=lambda o: json.dumps(o, ensure_ascii=False, default=str))

        return wrapped

    def page(self, role: str, handler: Callable[..., Awaitable[Any]]) -> Callable:
        """A page that needs `role`: to the login page without a session, 403 below the role or (POST) without
        the form's CSRF token."""
        async def wrapped(request: web.Request) -> web.StreamResponse:
            sess = await self.session_of(request)
            if sess is None:
                raise web.HTTPSeeOther("/login?" + urlencode({"next": request.path_qs}))
            if not may(sess.role, role):
                raise Refused(403, f"This page needs the {role} role; your account is {sess.role}.")
            params = await self.params(request)
            if request.method == "POST" and not self.csrf_ok(request, sess, params):
                raise Refused(403, "The form's security token is missing or out of date: reload the page and "
                                   "send it again.")
            return await handler(request, sess, params, False)

        return wrapped

    def render(self, request: web.Request, template: str, data: dict, status: int = 200,
               sess: Session | None = None) -> web.Response:
        sess = sess or request.get(SESSION)
        flash = self.flashes.pop(sess.id, None) if sess is not None else None
        page = self.env.get_template(template).render(
            **data, session=sess, flash=flash, path=request.path, tls=request.secure,
            node=self.cfg.audit.node)
        return web.Response(text=page, content_type="text/html", charset="utf-8", status=status)

    def call(self, request: web.Request, sess: Session) -> Callable[[Store], api.Call]:
        address, what = _peer(request), f"{request.method} {request.path}"
        return lambda store: api.Call(store, sess.user, sess.role, address, what, self.cfg)

    # ------------------------------------------------------------------ generic readers and changers

    def reader(self, fn: Callable[[api.Call, dict], dict], template: str | None = None) -> Callable:
        async def handler(request: web.Request, sess: Session, params: dict, as_api: bool) -> Any:
            make = self.call(request, sess)
            try:
                data = await self.run(lambda st: fn(make(st), params))
            except USER_ERRORS as exc:
                if as_api:
                    raise
                data = {"error": str(exc)}
            if as_api:
                return data
            assert template is not None
            return self.render(request, template, {"data": data, "params": params, "csrf": sess.csrf})

        return handler

    def changer(self, fn: Callable[[api.Call, dict], dict], back: str | None = None, slow: bool = False) -> Callable:
        async def handler(request: web.Request, sess: Session, params: dict, as_api: bool) -> Any:
            make = self.call(request, sess)
            if slow:  # a download: its own thread, so that logins and other changes do not wait for it
                job = lambda st: fn(make(st), params)  # noqa: E731
                runner = self.run(job, pool="slow", seconds=None)
            else:
                runner = self.run(lambda st: fn(make(st), params), pool="write")
            try:
                result = await runner
            except USER_ERRORS as exc:
                if as_api:
                    raise
                self.flash(sess, "error", str(exc))
            else:
                if as_api:
                    return result
                self.flash(sess, "ok", describe(request.path, result))
            assert back is not None
            raise web.HTTPSeeOther(f"/{back}" + (f"?{urlencode(_keep(params))}" if _keep(params) else ""))

        return handler

    def with_password(self, fn: Callable[[api.Call, dict, str], dict], back: str | None = None) -> Callable:
        async def handler(request: web.Request, sess: Session, params: dict, as_api: bool) -> Any:
            try:
                hashed = await self._hash(api.text(params, "password", "", limit=sessions.MAX_PASSWORD + 1) or "")
                make = self.call(request, sess)
                result = await self.run(lambda st: fn(make(st), params, hashed), pool="write")
            except (*USER_ERRORS, sessions.PasswordError) as exc:
                if as_api:
                    raise Refused(400, str(exc)) from None
                self.flash(sess, "error", str(exc))
            else:
                if as_api:
                    return result
                self.flash(sess, "ok", describe(request.path, result))
            raise web.HTTPSeeOther(f"/{back}")

        return handler

    async def _hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(sessions.hash_pool(), sessions.hash_password,
                                                                password)

    # ------------------------------------------------------------------ signing in and out

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        data = (Path(__file__).parent / "static" / name).read_bytes()
        return web.Response(body=data, content_type=STATIC[name], headers={"Cache-Control": "max-age=3600"})

    async def login_page(self, request: web.Request, error: str | None = None, status: int = 200) -> web.Response:
        sess = await self.session_of(request)
        target = _next(request.query.get("next"))
        if sess is not None and error is None:
            raise web.HTTPSeeOther(target)
        nonce = secrets.token_urlsafe(24)
        response = self.render(request, "login.html", {"token": sessions.login_token(self.secret, nonce),
                                                       "next": target, "error": error,
                                                       "plain": not request.secure}, status=status)
        self._cookie(response, request, sessions.LOGIN_COOKIE, nonce, max_age=3600)
        return response

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        params = await self.params(request)
        nonce = request.cookies.get(sessions.LOGIN_COOKIE, "")
        if not nonce or not sessions.same(api.text(params, "token", limit=200),
                                          sessions.login_token(self.secret, nonce)):
            return await self.login_page(request, "The form has expired: please sign in again.", 403)
        outcome = await self._login(request, api.text(params, "name", "", limit=200) or "",
                                    api.text(params, "password", "", limit=sessions.MAX_PASSWORD) or "")
        if isinstance(outcome, str):
            return await self.login_page(request, outcome, 401)
        cookie, _ = outcome
        response = web.HTTPSeeOther(_next(api.text(params, "next")))
        self._cookie(response, request, sessions.COOKIE, cookie)
        response.del_cookie(sessions.LOGIN_COOKIE, path="/")
        raise response

    async def login_api(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/json":  # a form from another site cannot send JSON
            raise Refused(415, 'send JSON: {"name": ..., "password": ...} with Content-Type: application/json')
        params = await self.params(request)
        outcome = await self._login(request, api.text(params, "name", "", limit=200) or "",
                                    api.text(params, "password", "", limit=sessions.MAX_PASSWORD) or "")
        if isinstance(outcome, str):
            raise Refused(401, outcome)
        cookie, sess = outcome
        response = web.json_response({"account": sess.user, "role": sess.role, "csrf": sess.csrf})
        self._cookie(response, request, sessions.COOKIE, cookie)
        return response

    async def _login(self, request: web.Request, name: str, password: str) -> tuple[str, Session] | str:
        """(cookie, session), or why not (for the person signing in)."""
        address = _peer(request)
        wait = self.throttle.allow(address, time.monotonic())
        if wait:
            raise Refused(429, f"too many sign-in attempts from {address}: try again in {wait:.0f} s")
        name = name.strip().lower()[:64]
        lock = self._login_locks.get(name)
        if lock is None:
            lock = self._login_locks[name] = asyncio.Lock()
            while len(self._login_locks) > 4096:
                self._login_locks.popitem(last=False)
        async with lock:  # attempts for one account wait their turn: the backoff cannot be run around
            user = await self.run(lambda st: Accounts(st).user(name))
            now = time.time()
            locked = user is not None and user["locked_until"] is not None and user["locked_until"] > now
            await asyncio.sleep(sessions.backoff(user["failures"] if user else 0))
            # a locked account is checked against the dummy hash: it takes the time any other attempt takes
            good = await asyncio.get_running_loop().run_in_executor(
                sessions.hash_pool(), sessions.verify_password, user["hash"] if user and not locked else None, password)
            if not good:
                reason = "unknown account" if user is None else "locked" if locked else "wrong password"
                await self.run(lambda st: Accounts(st).login_failed(name, address, reason, user is not None),
                               pool="write")
                log.info("web console: failed sign-in for %r from %s (%s)", name, address, reason)
                return FAILED_LOGIN
            cookie = sessions.new_token()
            sess = Session(sessions.session_id(cookie), name, user["role"], sessions.new_token(), now, now, address)
            await self.run(lambda st: Accounts(st).login_succeeded(name, address, sess, request.secure),
                           pool="write")
            log.info("web console: %s (%s) signed in from %s", name, user["role"], address)
            return cookie, sess

    async def logout(self, request: web.Request, sess: Session, params: dict, as_api: bool) -> Any:
        address = _peer(request)
        await self.run(lambda st: Accounts(st).logout(sess, address), pool="write")
        response: web.StreamResponse = web.json_response({"signed_out": sess.user}) if as_api else web.HTTPSeeOther(
            "/login")
        response.del_cookie(sessions.COOKIE, path="/")
        if as_api:
            return response
        raise response  # type: ignore[misc]

    async def session_info(self, request: web.Request, sess: Session, params: dict, as_api: bool) -> dict:
        return {"account": sess.user, "role": sess.role, "csrf": sess.csrf, "since": iso(sess.created),
                "idle_timeout": self.idle, "lifetime": self.lifetime}

    async def password_page(self, request: web.Request, sess: Session, params: dict, as_api: bool) -> web.Response:
        return self.render(request, "password.html", {"csrf": sess.csrf, "params": params})

    async def own_password(self, request: web.Request, sess: Session, params: dict, as_api: bool) -> Any:
        """Change one's own password: the current one is checked first (as a login would be)."""
        current = api.text(params, "current", "", limit=sessions.MAX_PASSWORD) or ""
        new = api.text(params, "password", "", limit=sessions.MAX_PASSWORD + 1) or ""
        user = await self.run(lambda st: Accounts(st).user(sess.user))
        good = user is not None and await asyncio.get_running_loop().run_in_executor(
            sessions.hash_pool(), sessions.verify_password, user["hash"], current)
        problem = None if good else "the current password is wrong"
        hashed = None
        if problem is None:
            try:
                hashed = await self._hash(new)
            except sessions.PasswordError as exc:
                problem = str(exc)
        if problem is not None:
            if as_api:
                raise Refused(400, problem)
            self.flash(sess, "error", problem)
            raise web.HTTPSeeOther("/password")
        make = self.call(request, sess)
        await self.run(lambda st: api.user_password(make(st), {"name": sess.user}, hashed or ""), pool="write")
        if as_api:
            return {"name": sess.user, "signed_out": True}
        raise web.HTTPSeeOther("/login")  # every session of the account ended, this one too

    # ------------------------------------------------------------------ the dashboard

    async def _stats(self, period: str, fresh: bool = False) -> tuple[float, dict]:
        """Store.stats for the period, computed at most every STATS_TTL seconds (older figures are shown while
        new ones are computed); `fresh`: wait for figures computed from now on (one computation at a time)."""
        cached = self.stats_cache.get(period)
        now = time.time()
        if cached is not None and now - cached[0] < STATS_TTL and not fresh:
            return cached
        task = self._stats_running.get(period)
        if task is None:
            since = iso(now - PERIODS[period] * 3600)

            async def compute() -> tuple[float, dict]:
                try:
                    result = await self.run(lambda st: st.stats(since, None, 10), seconds=120)
                    self.stats_cache[period] = (time.time(), result)
                    return self.stats_cache[period]
                finally:
                    self._stats_running.pop(period, None)

            task = self._stats_running[period] = asyncio.get_running_loop().create_task(compute())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif fresh:  # the one running may have started before the caller's rows were written: the next one
            await asyncio.shield(task)
            return await self._stats(period, fresh=True)
        if cached is not None and not fresh:
            return cached
        return await asyncio.shield(task)

    def _rates(self) -> dict:
        """Queries per second by action over the last minute, from the samples of the live counters."""
        if len(self.samples) < 2:
            return {}
        end_t, end = self.samples[-1]
        start_t, start = next(((t, c) for t, c in self.samples if end_t - t <= 65), self.samples[0])
        if end_t <= start_t:
            start_t, start = self.samples[0]
        span = end_t - start_t or 1.0
        return {k: round((v - start.get(k, 0)) / span, 2) for k, v in sorted(end.items())}

    def _sample(self) -> None:
        counts: dict[str, int] = {}
        for snap in self.live():
            for action, _, _, _, n in snap.get("queries", []):
                counts[action] = counts.get(action, 0) + n
        self.samples.append((time.monotonic(), counts))

    async def _sampler(self) -> None:
        while True:
            try:
                self._sample()
            except Exception:  # a snapshot that cannot be read now: the next one
                log.debug("web console: sampling the counters failed", exc_info=True)
            await asyncio.sleep(SAMPLE_EVERY)

    async def dashboard(self, request: web.Request, sess: Session, params: dict, as_api: bool) -> Any:
        period = api.text(params, "period", "24h") or "24h"
        if period not in PERIODS:
            raise Refused(400, f"period: one of {', '.join(PERIODS)}")
        computed, stats = await self._stats(period, fresh=api.text(params, "fresh") in ("1", "true", "yes"))
        snaps = self.live()
        merged = metrics.merge(snaps) if snaps else None
        upstreams = []
        for name, up in sorted((merged or {}).get("upstreams", {}).items()):
            answered = sum(up["buckets"])
            upstreams.append({"upstream": name, "answers": answered, "failures": up["failures"],
                              "avg_ms": round(up["sum"] / answered * 1000, 1) if answered else None,
                              "failed_share": round(up["failures"] / (answered + up["failures"]), 3)
                              if answered + up["failures"] else 0.0})
        verification = self.verification
        data = {
            "period": period, "computed_at": iso(computed), "version": __version__,
            "uptime_s": round(time.time() - self.started), "node": self.cfg.audit.node,
            "totals": stats["totals"], "hourly": stats["hourly"], "top_rules": stats["top_rules"],
            "top_names": stats["top_names"], "top_clients": stats["top_clients"], "by_group": stats["by_group"],
            "by_category": stats["by_category"], "bypass_clients": stats["bypass_clients"],
            "queries_per_second": self._rates(), "upstreams": upstreams,
            "inflight": (merged or {}).get("inflight"),
            "policy": (merged or {}).get("policy"), "processes": (merged or {}).get("processes"),
            "audit": (merged or {}).get("audit"), "health": self.health(),
            "chain": {"last_verification": None if verification is None else {
                k: verification[k] for k in ("started", "finished", "by", "ok", "summary") if k in verification}},
        }
        if as_api:
            return data
        points, unit = report.over_time(stats["hourly"])
        chart = report.bars_over_time(points, unit)  # SVG, every value escaped (report.esc)
        return self.render(request, "dashboard.html", {"d": data, "chart": chart, "unit": unit,
                                                       "periods": list(PERIODS), "csrf": sess.csrf})

    # ------------------------------------------------------------------ the log

    async def log(self, request: web.Request, sess: Session, params: dict, as_api: bool) -> Any:
        make = self.call(request, sess)
        try:
            data = await self.run(lambda st: api.log(make(st), params))
        except USER_ERRORS as exc:
            if as_api:
                raise
            data = {"error": str(exc), "rows": [], "next": None, "searched_to": None, "plan": ""}
        if as_api:
            return data
        keep = {k: v for k, v in params.items() if k in (*FILTERS, "before") and isinstance(v, str) and v}
        base = {k: v for k, v in keep.items() if k in FILTERS and k != "size"}  # the filter alone
        return self.render(request, "log.html", {"data": data, "params": keep, "base": base,
                                                 "actions": operations.ACTIONS, "csrf": sess.csrf})

    async def log_row(self, request: web.Request, sess: Session, params: dict, as_api: bool) -> Any:
        seq = int(request.match_info["seq"])
        data = await self.run(lambda st: browse.log_row(st, seq))
        if data is None:
            raise Refused(404, f"no audit row {seq}")
        if as_api:
            return data
        return self.render(request, "row.html", {"d": data, "csrf": sess.csrf})

    async def export(self, request: web.Request, sess: Session, params: dict, as_api: bool) -> web.StreamResponse:
        """Every row matching the filter, oldest first, exactly as `sinkhole log --format csv|json` writes them."""
        fmt = api.text(params, "format", "csv")
        if fmt not in ("csv", "json"):
            raise Refused(400, "format: csv or json (JSON Lines)")
        try:
            f = api.log_filter(params)
        except USER_ERRORS as exc:
            raise Refused(400, str(exc)) from None
        if self._export_slots.locked():
            raise Refused(503, f"{EXPORTS} exports are running; try again when one is done")
        async with self._export_slots:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            kind, ext = ("text/csv", "csv") if fmt == "csv" else ("application/x-ndjson", "jsonl")
            response = web.StreamResponse(headers={
                "Content-Type": f"{kind}; charset=utf-8",
                "Content-Disposition": f'attachment; filename="sinkhole-log-{stamp}.{ext}"', **HEADERS})
            await response.prepare(request)
            # one connection and one cursor for the whole export, read 2000 rows at a time on an export thread
            state: dict[str, Any] = {}

            def chunk(_: Store) -> str | None:
                if "rows" not in state:
                    state["store"] = Store(self.db)
                    state["rows"] = state["store"].query_log(**f.kwargs())
                rows = [r for _, r in zip(range(2000), state["rows"], strict=False)]
                if not rows:
                    return None
                if fmt == "csv":
                    return operations.csv_text(rows, operations.LOG_COLUMNS, header=False)
                return "".join(operations.json_line(r) + "\n" for r in rows)

            def close(_: Store) -> None:
                if "store" in state:
                    state["store"].close()

            try:
                if fmt == "csv":
                    await response.write(operations.csv_text([], operations.LOG_COLUMNS).encode())
                while True:
                    text = await self.run(chunk, pool="export", seconds=None)
                    if text is None:
                        break
                    await response.write(text.encode())
            finally:
                await self.run(close, pool="export", seconds=None)
            await response.write_eof()
            log.info("web console: %s exported the log (%s, %s)", sess.user, fmt, f.kwargs())
            return response

    # ------------------------------------------------------------------ verification

    async def verify(self, request: web.Request, sess: Session, params: dict, as_api: bool) -> Any:
        data = {"running": self._verifying, "last": self.verification}
        if as_api:
            return data
        return self.render(request, "verify.html", {"d": data, "csrf": sess.csrf})

    async def verify_start(self, request: web.Request, sess: Session, params: dict, as_api: bool) -> Any:
        """Verify every chain with the operator's key copy, uploaded now: held in memory for the walk only."""
        text = api.text(params, "key", "", limit=4096) or ""
        try:
            generation, secret = chain.parse_key(text, "the uploaded file")
        except chain.AuditKeyError as exc:
            if as_api:
                raise Refused(400, str(exc)) from None
            self.flash(sess, "error", str(exc))
            raise web.HTTPSeeOther("/verify") from None
        if self._verifying:
            raise Refused(409, "a verification is running: wait for its result")
        self._verifying = True
        params.pop("key", None)
        started = iso(time.time())
        key_path = chain.default_key_path(self.db)

        def walk(store: Store) -> operations.Verification:
            try:
                current: tuple[int, bytes] | None = chain.read_key(key_path)
            except chain.AuditKeyError:
                current = None
            return operations.verify(store, generation, secret, None, current)

        async def job() -> None:
            try:
                result = await self.run(walk, pool="slow", seconds=None)
                self.verification = {"started": started, "finished": iso(time.time()), "by": sess.user,
                                     "ok": result.ok, "summary": result.summary, "lines": result.lines,
                                     "first_bad": result.first_bad, "generation": generation}
                log.info("web console: %s verified the audit chains: %s", sess.user, result.summary)
            except Exception as exc:
                self.verification = {"started": started, "finished": iso(time.time()), "by": sess.user,
                                     "ok": False, "summary": f"verification could not run: {exc}", "lines": [],
                                     "first_bad": {}, "generation": generation}
            finally:
                self._verifying = False

        task = asyncio.get_running_loop().create_task(job())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if as_api:
            wait = api.text(params, "wait")
            if wait in ("1", "true", "yes"):
                await asyncio.shield(task)
                return {"running": False, "last": self.verification}
            return {"running": True, "started": started}
        self.flash(sess, "ok", "Verification started: this page shows the result when it is done.")
        raise web.HTTPSeeOther("/verify")

    # ------------------------------------------------------------------ the report

    async def report(self, request: web.Request, sess: Session, params: dict, as_api: bool) -> web.StreamResponse:
        """The same self-contained HTML report as `sinkhole report` (as a page to read, print or save)."""
        if not as_api and "since" not in params:
            return self.render(request, "report.html", {"csrf": sess.csrf})
        since = operations.parse_when(api.text(params, "since", "7d"), "since")
        until = operations.parse_when(api.text(params, "until"), "until")
        assert since is not None
        stats = await self.run(lambda st: st.stats(since, until, 10), seconds=120)
        last = self.verification
        if last is not None and last.get("finished"):
            status = report.ChainStatus("ok" if last["ok"] else "failed", f"{last['summary']} (verified in the web "
                                        f"console by {last['by']} at {last['finished']})",
                                        tuple(last["first_bad"].values()))
        else:
            status = report.ChainStatus("not verified", "not verified: no operator key given (the console's "
                                                        "Verify page, or sinkhole report --key-file)")
        html = report.render(stats, since, until, status, str(self.db))
        return web.Response(text=html, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": REPORT_CSP})

    # ------------------------------------------------------------------ running

    async def start(self, sockets: list[socket.socket]) -> None:
        lower_priority()  # the console's own event loop thread
        await self.gate.serve(sockets)
        loop = asyncio.get_running_loop()
        for job in (self._sampler(), self._warm()):
            task = loop.create_task(job)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _warm(self) -> None:
        """The dashboard's figures for the last 24 hours, computed once at start: the first person to open it does
        not wait for them (on a 10M-row log they take seconds)."""
        try:
            await self._stats("24h")
        except Exception as exc:  # a locked or missing database now: the first request computes them
            log.debug("web console: dashboard figures not ready at start: %s", exc)

    async def stop(self) -> None:
        await self.gate.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for executor in (self._readers, self._writer, self._slow, self._exports):
            executor.shutdown(wait=True, cancel_futures=True)
        with self._stores_lock:
            for store in self._stores:
                store.close()
            self._stores.clear()


FILTERS = ("since", "until", "client", "domain", "action", "group", "category", "rule", "size")


def _keep(params: dict) -> dict:
    """What a form post goes back to: the page's own filters (kind, status, category)."""
    return {k: v for k, v in params.items() if k in ("kind", "status") and isinstance(v, str) and v}


_INVISIBLE = re.compile(r"[\x00-\x20\x7f]")  # browsers drop tabs and new lines in a URL, and trim the rest


def _next(target: str | None) -> str:
    """Where to go after signing in: a path of this site only, else "/".

    A browser reads `/%09/evil.example` (decoded, the tab dropped) and `/\\evil.example` as `//evil.example`, a
    URL of another host; so the value is judged as it reads once decoded (up to three times: `%252f`) and stripped
    of spaces and control characters: it must be a path (one `/`, then neither `/` nor `\\`), with no scheme and
    no host; and the value itself must start with `/` and carry no space, control character or backslash at all."""
    if (not target or len(target) > 2000 or not target.startswith("/") or "\\" in target
            or _INVISIBLE.search(target)):
        return "/"
    decoded = target
    for _ in range(3):
        decoded, before = unquote(decoded), decoded
        if decoded == before:
            break
    seen = _INVISIBLE.sub("", decoded)
    if not seen.startswith("/") or seen[1:2] in ("/", "\\"):
        return "/"
    parts = urlsplit(seen)
    if parts.scheme or parts.netloc:
        return "/"
    return target


def describe(path: str, result: dict) -> str:
    """One line saying what a change did, for the page it returns to."""
    if path == "/rules":
        text = f"{result['kind']}: {', '.join(result['added']) or 'nothing new'} (category {result['category']})"
        if result["present"]:
            text += f"; already there: {', '.join(result['present'])}"
        return text + (f"; until {result['expires']}" if result.get("expires") else "")
    if path == "/rules/remove":
        text = f"removed {result['kind']} rules: {', '.join(result['removed']) or 'none'}"
        return text + (f"; no such rule: {', '.join(result['missing'])}" if result["missing"] else "")
    if path in ("/lists/enable", "/lists/disable"):
        state = "in force" if path.endswith("enable") else "out of force"
        return f"category {result['category']} is {state}" + ("" if result["changed"] else " (it was already)")
    if path == "/lists/import":
        return f"imported {result['summary']} ({result['format']}) into category {result['category']}"
    if path == "/lists/update":
        return "; ".join(f"{r['category']}: {r['text']}" for r in result["results"]) or "no list sources recorded"
    if path == "/groups":
        return f"{'created' if result['created'] else 'changed'} group {result['name']}"
    if path == "/groups/remove":
        return f"removed {'group ' + result['name'] if result['whole'] else ', '.join(result['removed'])}"
    if path.startswith("/requests/"):
        req = result["request"]
        return f"request {req['id']} {req['status']}" + (f": {req['allow_rule']} until {req['expires_at']}"
                                                         if req.get("allow_rule") else "")
    if path.startswith("/users"):
        return f"account {result['name']}: done" + (f", {result['sessions_ended']} sessions ended"
                                                    if result.get("sessions_ended") else "")
    return "done"


# ---------------------------------------------------------------------------- in a server


def tls_from_config(cfg: Any, db: Path) -> Callable[[str], ssl.SSLContext] | None:
    """The console's TLS: web_cert/web_key when given, else a leaf from the block page's CA for the listen
    address (or web_name), else None: plain HTTP, which only loopback addresses may serve (ConfigError)."""
    hosts = [h for h, _ in build.web_addresses(cfg)]
    mode = cfg.web.web_tls
    ctx: ssl.SSLContext | None = None
    if mode != "off" and cfg.web.web_cert:
        ctx = certs.server_context()
        try:
            ctx.load_cert_chain(cfg.web.web_cert, cfg.web.web_key or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"web_cert/web_key: {exc}") from None
        fixed = ctx
        return lambda peer: fixed
    if mode != "off":
        try:
            ca = certs.load_ca(certs.ca_directory(db, cfg.blockpage.blockpage_ca))
        except certs.CertError as exc:
            if mode == "on":
                raise ConfigError(f"web_tls = on, but there is no certificate: {exc}") from None
        else:
            name = cfg.web.web_name or next((h for h in hosts if h not in ("0.0.0.0", "::")), "localhost")
            minter = certs.Minter(ca)
            if minter.context(name) is None:
                raise ConfigError(f"the CA's name constraints do not cover {name}: set web_cert/web_key")
            log.info("web console: HTTPS with a certificate for %s from CA %s", name, ca.describe())
            return lambda peer: minter.context(name)  # type: ignore[return-value]
    public = [h for h in hosts if not is_loopback(h)]
    if public:
        raise ConfigError(f"web_listen {', '.join(public)}: plain HTTP is served on loopback only; give the console "
                          "a certificate (web_cert and web_key, or `sinkhole ca init`)")
    return None

