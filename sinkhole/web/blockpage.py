"""The block page: what a person sees when their browser asks a blocked name.

With `blockpage_listen`, blocked A/AAAA answers point at the page's address. The browser connects there,
asks (in TLS, by SNI) for the name it wanted, and gets a certificate for it minted by the agency's CA, but
only when the policy in force blocks that name for the client's group: any other name gets no
certificate, so the page can never stand in for an allowed site. Over plain HTTP it gets the page too.

Every path and method gets status 403 and the page: the blocked host, the rule, its category and list,
the agency's name, logo, contact and policy text, the time and a short reference code; in Korean or
English by `Accept-Language`; JSON for `Accept: application/json`. Nothing is loaded from elsewhere
(the Content-Security-Policy says so), nothing is proxied, nothing redirects. Each view is an audit row
(action `page`: client, host, rule, the reference code and the DNS row it follows when one is found;
never the path, the query string or the form's text). With `blockpage_requests` the page carries a form
to ask for access; requests wait for `sinkhole requests approve|deny`.

The page runs on an event loop of its own, in a thread of the server process (worker 0's, with several
workers): TLS handshakes, minting and templates never hold up the DNS loop.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
from aiohttp import web

from sinkhole.errors import ConfigError, DomainError
from sinkhole.model import Action, AuditEvent
from sinkhole.policy.decide import Policy
from sinkhole.policy.names import is_ip_address, normalize
from sinkhole.store.db import Store
from sinkhole.store.schema import iso
from sinkhole.web import certs, limits
from sinkhole.web.limits import Gate, Limits
from sinkhole.web.refs import make_ref, parse_ref

log = logging.getLogger(__name__)

REQUEST_PATH = "/.well-known/sinkhole/access-request"
LANGUAGES = ("en", "ko")
MAX_NAME = 100  # characters of the requester's name
MAX_REASON = 1000  # characters of the reason
LOGO_MAX = 256 * 1024
LOGO_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
FOLLOW_WINDOW = 600  # seconds back a page view looks for the DNS row it follows
FOLLOW_WAIT = (0.0, 0.3, 0.8, 1.5, 2.5)  # when to look (seconds after the view): the writer batches rows
MAX_PENDING_AUDIT = 1024  # page views waiting for their DNS row; past it they are written without one
REQUEST_RATE = (3, 600.0)  # access requests per client address: at most 3 in 10 minutes
VIEW_RATE = (5.0, 20.0)  # page views per second per client address, and the burst (more get a bare 403)
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

MESSAGES: dict[str, dict[str, str]] = {
    "en": {
        "title": "Access to this site is restricted",
        "lead": "{host} is blocked on this network by the agency's policy.",
        "lead_unblocked": "{host} is not blocked now. If you just got access, try again in a minute.",
        "rule": "Rule", "category": "Category", "list": "List", "group": "Group", "time": "Time",
        "reference": "Reference", "agency": "Agency", "contact": "Contact", "policy": "Policy",
        "reference_help": "Give this reference to the helpdesk: it finds the record of this attempt.",
        "request_title": "Need this site for work?",
        "request_help": "Ask for access. Your request, with your computer's address, goes to the administrators.",
        "name": "Your name", "reason": "Why you need it", "send": "Request access",
        "request_sent": "Your request number {id} was recorded; the administrators will decide on it.",
        "request_pending": "A request for this site from your computer is already waiting (number {id}).",
        "request_refused": "The request could not be recorded: {why}",
        "why_missing": "please give your name and a reason",
        "why_stale": "the form has expired; reload the page and send it again",
        "why_rate": "too many requests from this computer; try again later",
        "why_full": "too many requests are waiting; ask the helpdesk",
        "footer": "This page is shown by the agency's DNS resolver (sinkhole). No data of the site was loaded.",
    },
    "ko": {
        "title": "이 사이트에 대한 접속이 제한되었습니다",
        "lead": "{host}은(는) 기관 정책에 따라 이 네트워크에서 차단되어 있습니다.",
        "lead_unblocked": "{host}은(는) 현재 차단되어 있지 않습니다. 방금 허용되었다면 잠시 후 다시 시도하십시오.",
        "rule": "규칙", "category": "분류", "list": "목록", "group": "그룹", "time": "시각",
        "reference": "참조 번호", "agency": "기관", "contact": "문의처", "policy": "정책",
        "reference_help": "헬프데스크에 이 참조 번호를 알려 주십시오. 이번 접속 시도의 기록을 찾을 수 있습니다.",
        "request_title": "업무에 이 사이트가 필요합니까?",
        "request_help": "접속을 요청하십시오. 요청은 이 컴퓨터의 주소와 함께 관리자에게 전달됩니다.",
        "name": "이름", "reason": "필요한 이유", "send": "접속 요청",
        "request_sent": "요청 {id}번이 접수되었습니다. 관리자가 결정합니다.",
        "request_pending": "이 컴퓨터에서 이 사이트에 대한 요청이 이미 대기 중입니다 ({id}번).",
        "request_refused": "요청을 접수할 수 없습니다: {why}",
        "why_missing": "이름과 이유를 입력하십시오",
        "why_stale": "양식이 만료되었습니다. 페이지를 새로 고친 뒤 다시 보내십시오",
        "why_rate": "이 컴퓨터의 요청이 너무 많습니다. 나중에 다시 시도하십시오",
        "why_full": "대기 중인 요청이 너무 많습니다. 헬프데스크에 문의하십시오",
        "footer": "이 페이지는 기관의 DNS 리졸버(sinkhole)가 표시합니다. 사이트의 데이터는 불러오지 않았습니다.",
    },
}


# ---------------------------------------------------------------------------- the page


@dataclass(frozen=True)
class Look:
    """What the configuration says the page shows."""

    agency: str = ""
    contact: str = ""
    policy: str = ""
    logo: str = ""  # a data: URI, or ""
    language: str = "en"
    requests: bool = True


def read_logo(path: str) -> str:
    """The logo file as a data: URI (the page loads nothing from elsewhere)."""
    if not path:
        return ""
    p = Path(path)
    kind = LOGO_TYPES.get(p.suffix.lower())
    if kind is None:
        raise ConfigError(f"blockpage_logo: {path}: a .png, .jpg or .svg file, please")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"blockpage_logo: {path}: {exc.strerror or exc}") from None
    if len(data) > LOGO_MAX:
        raise ConfigError(f"blockpage_logo: {path} is {len(data)} bytes, over {LOGO_MAX}")
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def templates(override_dir: str) -> jinja2.Environment:
    """The shipped templates, each replaceable by a file of the same name in `override_dir`; autoescaped."""
    loaders: list[jinja2.BaseLoader] = []
    if override_dir and Path(override_dir).is_dir():
        loaders.append(jinja2.FileSystemLoader(override_dir))
    loaders.append(jinja2.PackageLoader("sinkhole.web", "templates"))
    return jinja2.Environment(loader=jinja2.ChoiceLoader(loaders), autoescape=True, trim_blocks=True,
                              lstrip_blocks=True)


def language(accept: str, default: str) -> str:
    """The first of LANGUAGES the Accept-Language header prefers (q-values honoured), else `default`."""
    best, best_q = default, 0.0
    for i, part in enumerate(accept.split(",")[:32]):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        base = tag.strip().lower().split("-")[0]
        q -= i * 1e-6  # at equal q, the first named wins
        if base in LANGUAGES and q > best_q:
            best, best_q = base, q
    return best


def host_of(header: str) -> str:
    """The name in a Host header (no port, no brackets), as given."""
    text = header.strip()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else ""
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class _Buckets:
    """Token buckets per client address (bounded: the oldest go first past 65536)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.state: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float) -> bool:
        tokens, stamp = self.state.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        if len(self.state) >= 65536 and key not in self.state:
            self.state.pop(next(iter(self.state)))
        if tokens < 1.0:
            self.state[key] = (tokens, now)
            return False
        self.state[key] = (tokens - 1.0, now)
        return True


class BlockPage:
    """The page's aiohttp app, its TLS (a leaf per blocked name), its audit rows and access requests.

    `get_policy` returns the policy in force (read on every request: a change is seen at once); `audit`
    is the server's AuditLog (submit is thread-safe); `db` the database for access requests and for the
    DNS row a view follows (read and written on a thread of its own)."""

    def __init__(self, get_policy: Callable[[], Policy], audit, db: Path, look: Look, env: jinja2.Environment,
                 ca: certs.CA | None, limits: Limits | None = None) -> None:
        self.get_policy = get_policy
        self.audit = audit
        self.db = db
        self.look = look
        self.env = env
        self.limits = limits or Limits()
        self.minter = certs.Minter(ca) if ca is not None else None
        self.secret = secrets.token_bytes(32)  # form tokens: valid while this process runs
        self.views = _Buckets(*VIEW_RATE)
        self.request_times: dict[str, list[float]] = {}
        self._group_contexts: dict[str, ssl.SSLContext] = {}
        self._db_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="blockpage-db")
        self._store: Store | None = None
        self._pending: dict[asyncio.Task[None], AuditEvent] = {}
        self.gate = Gate(self.app(), self.limits, self.tls_for if self.minter is not None else None, "block page")
        self.counts = {"views": 0, "limited": 0, "requests": 0, "tls_refused": 0}

    # ------------------------------------------------------------------ TLS

    def tls_for(self, peer: str) -> ssl.SSLContext:
        """The handshake context for a client: its SNI callback mints (or finds) the leaf for a name the
        policy blocks for the client's group, and refuses every other name."""
        group = self.get_policy().group_of(peer).name
        ctx = self._group_contexts.get(group)
        if ctx is None:
            ctx = certs.server_context()
            ctx.sni_callback = self._sni(group)
            if len(self._group_contexts) > 1024:
                self._group_contexts.clear()
            self._group_contexts[group] = ctx
        return ctx

    def _sni(self, group_name: str) -> Callable:
        def callback(sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> int | None:
            assert self.minter is not None
            name = _blockable(server_name or "")
            policy = self.get_policy()
            group = policy.groups.get(group_name, policy.default)
            if not name or policy.decide_name(name, group).action is not Action.BLOCKED:
                self.counts["tls_refused"] += 1
                log.debug("block page: no certificate for %r (not blocked for group %s)", server_name, group_name)
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            try:
                leaf = self.minter.context(name)
            except Exception:
                log.exception("block page: minting a certificate for %s failed", name)
                return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
            if leaf is None:
                self.counts["tls_refused"] += 1
                log.warning("block page: the CA's name constraints do not cover %s: no certificate", name)
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            sslobj.context = leaf
            return None

        return callback

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        @web.middleware
        async def every_request(request: web.Request, handler: Callable) -> web.StreamResponse:
            return await self.respond(request)  # every path and method: never the router's 404 or 405

        return web.Application(middlewares=[every_request], client_max_size=self.limits.max_body)

    async def respond(self, request: web.Request) -> web.StreamResponse:
        now = time.time()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client = plain_address(peer[0]) if peer else ""
        if not self.views.take(client, time.monotonic()):
            self.counts["limited"] += 1
            return web.Response(status=403, text="403 Forbidden: too many requests\n", headers=HEADERS)
        self.counts["views"] += 1
        tls = request.transport.get_extra_info("sslcontext") is not None if request.transport else False
        asked = host_of(request.headers.get("Host", ""))
        host = _blockable(asked)
        policy = self.get_policy()
        group = policy.group_of(client)
        verdict = policy.decide_name(host, group) if host else None
        rule = verdict.rule if verdict is not None and verdict.action is Action.BLOCKED else None
        ref = make_ref(now)
        lang = language(request.headers.get("Accept-Language", ""), self.look.language)
        t = MESSAGES[lang]
        notice = None
        if request.method == "POST" and request.path == REQUEST_PATH and self.look.requests and rule is not None:
            notice = await self._file_request(request, client, group.name, host, rule, t)
        self._audit(AuditEvent(now, client, "https" if tls else "http", host or "", request.method[:10],
                               Action.PAGE.value, rule.domain if rule else None, rule.category if rule else None,
                               "403", f"ref {ref}", policy.version, group=group.name,
                               source=rule.source if rule else None))
        local = datetime.fromtimestamp(now).astimezone()
        facts = {
            "blocked": rule is not None, "host": host or asked[:253], "rule": rule.domain if rule else None,
            "category": rule.category if rule else None, "list": rule.source if rule else None,
            "group": group.name, "reference": ref, "time": iso(now),
            "agency": self.look.agency or None, "contact": self.look.contact or None,
            "policy": self.look.policy or None,
        }
        headers = {**HEADERS, "Content-Language": lang, "Vary": "Accept, Accept-Language"}
        if _wants_json(request.headers.get("Accept", "")):
            facts["message"] = (t["lead"] if rule else t["lead_unblocked"]).format(host=facts["host"])
            if notice is not None:
                facts["request"] = notice
            return web.Response(status=403, text=json.dumps(facts, ensure_ascii=False), headers=headers,
                                content_type="application/json")
        page = self.env.get_template("blockpage.html").render(
            t=t, lang=lang, look=self.look, local_time=local.strftime("%Y-%m-%d %H:%M:%S (UTC%z)"),
            request_path=REQUEST_PATH, token=self._token(ref, host or "", client), notice=notice,
            form=self.look.requests and rule is not None and notice is None, **facts)
        return web.Response(status=403, text=page, content_type="text/html", charset="utf-8", headers=headers)

    # ------------------------------------------------------------------ access requests

    def _token(self, ref: str, host: str, client: str) -> str:
        """The form's token: ties a request to the page view it came from (this host, this client)."""
        return hmac.new(self.secret, f"{ref}|{host}|{client}".encode(), hashlib.sha256).hexdigest()[:32]

    async def _file_request(self, request: web.Request, client: str, group: str, host: str, rule, t: dict) -> dict:
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            return {"recorded": False, "text": t["request_refused"].format(why=t["why_missing"])}
        name = str(form.get("name", "")).strip()[:MAX_NAME]
        reason = str(form.get("reason", "")).strip()[:MAX_REASON]
        ref = str(form.get("ref", ""))
        try:
            code, second = parse_ref(ref)
        except ValueError:
            code, second = "", 0
        token = str(form.get("token", ""))
        if not code or not hmac.compare_digest(token, self._token(code, host, client)) or time.time() - second > 3600:
            return {"recorded": False, "text": t["request_refused"].format(why=t["why_stale"])}
        if not name or not reason:
            return {"recorded": False, "text": t["request_refused"].format(why=t["why_missing"])}
        now = time.monotonic()
        times = [x for x in self.request_times.get(client, []) if now - x < REQUEST_RATE[1]]
        if len(times) >= REQUEST_RATE[0]:
            return {"recorded": False, "text": t["request_refused"].format(why=t["why_rate"])}
        self.request_times[client] = [*times, now]
        if len(self.request_times) > 65536:
            self.request_times.clear()
        loop = asyncio.get_running_loop()
        try:
            ident, new = await loop.run_in_executor(self._db_thread, lambda: self._db().add_request(
                client, group, host, rule.domain, rule.category, name, reason, code))
        except ConfigError:
            return {"recorded": False, "text": t["request_refused"].format(why=t["why_full"])}
        self.counts["requests"] += new
        log.info("block page: access request %d from %s for %s%s", ident, client, host, "" if new else " (pending)")
        return {"recorded": True, "id": ident, "text": t["request_sent" if new else "request_pending"].format(id=ident)}

    def _db(self) -> Store:
        """The page's own connection (on its database thread)."""
        if self._store is None or self._store.replaced():
            if self._store is not None:
                self._store.close()
            self._store = Store(self.db)
        return self._store

    # ------------------------------------------------------------------ audit

    def _audit(self, event: AuditEvent) -> None:
        """Submit the view's row once the DNS row it follows is found (or not, within a few seconds)."""
        if len(self._pending) >= MAX_PENDING_AUDIT or not event.qname:
            self.audit.submit(event)
            return
        task = asyncio.get_running_loop().create_task(self._follow(event))
        self._pending[task] = event
        task.add_done_callback(lambda t: self._pending.pop(t, None))

    async def _follow(self, event: AuditEvent) -> None:
        loop = asyncio.get_running_loop()
        client = self.audit.stored_client(event.client)
        since, until = iso(event.time - FOLLOW_WINDOW), iso(event.time + 1)
        seq = None
        started = time.monotonic()
        for at in FOLLOW_WAIT:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            try:
                seq = await loop.run_in_executor(self._db_thread, lambda: self._db().find_dns_row(
                    client, event.qname, since, until))
            except Exception as exc:  # a locked or replaced database: the row goes without it
                log.debug("block page: looking up the DNS row failed: %s", exc)
            if seq is not None:
                break
        self._submit(event, seq)

    def _submit(self, event: AuditEvent, seq: int | None) -> None:
        if seq is not None:
            event = dataclasses.replace(event, answer=f"{event.answer}; dns seq {seq}")
        self.audit.submit(event)

    # ------------------------------------------------------------------ running

    async def start(self, sockets: list[socket.socket]) -> None:
        await self.gate.serve(sockets)

    async def stop(self) -> None:
        """Close the listeners; page views still looking for their DNS row are written without it."""
        await self.gate.close()
        for task, event in list(self._pending.items()):
            task.cancel()
            self._submit(event, None)
        self._pending.clear()
        self._db_thread.submit(self._close_db).result(5)
        self._db_thread.shutdown(wait=True)

    def _close_db(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def plain_address(address: str) -> str:
    """A v4-mapped address (dual-stack socket) as its IPv4 form, as the DNS side logs clients."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


def _blockable(text: str) -> str:
    """A host name as the policy compares it, or '' (an IP literal, garbage)."""
    if not text or is_ip_address(text):
        return ""
    try:
        return normalize(text)
    except DomainError:
        return ""


def _wants_json(accept: str) -> bool:
    """Accept prefers application/json over text/html (absent q-values: the first named)."""
    prefs = {}
    for i, part in enumerate(accept.lower().split(",")[:32]):
        kind, _, params = part.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        prefs.setdefault(kind.strip(), q - i * 1e-6)
    return prefs.get("application/json", -1.0) > prefs.get("text/html", -1.0)


# ---------------------------------------------------------------------------- in a server


class Service(limits.Service):
    """The block page on an event loop in a thread of its own, for a Server (see the module's text)."""

    def __init__(self, page: BlockPage, sockets: list[socket.socket]) -> None:
        super().__init__(page, sockets, "blockpage")
        self.page = page


def from_config(cfg, db: Path, get_policy: Callable[[], Policy], audit) -> BlockPage:
    """The block page a server with settings `cfg` runs (the CA, when there is one, from blockpage_ca)."""
    directory = certs.ca_directory(db, cfg.blockpage.blockpage_ca)
    ca = None
    try:
        ca = certs.load_ca(directory)
    except certs.CertError as exc:
        log.warning("block page: HTTPS is off (%s); plain HTTP only", exc)
    else:
        log.info("block page: HTTPS with CA %s", ca.describe())
    b = cfg.blockpage
    look = Look(b.blockpage_agency, b.blockpage_contact, b.blockpage_policy, read_logo(b.blockpage_logo),
                b.blockpage_language, b.blockpage_requests)
    return BlockPage(get_policy, audit, db, look, templates(b.blockpage_templates), ca)
