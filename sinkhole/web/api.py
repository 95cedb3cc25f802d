"""What each endpoint of the web console does: one function per endpoint, over the library the CLI uses.

The console (sinkhole.web.console) routes `/api/...` requests and the pages to these functions, on a database
thread, with a `Call` (the database connection, the account and its address) and the request's parameters (a
query string, a form or a JSON body, all as a dict of strings or lists of strings); the JSON API returns what
they return, and the pages render it. `ENDPOINTS` says which role each needs; the console enforces it on every
request before a function runs.

Errors: operations.BadValue, ConfigError, DomainError, ListFormatError -> 400 with the message.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import dns.rdatatype

from sinkhole.model import RuleKind
from sinkhole.policy.names import normalize
from sinkhole.service import operations
from sinkhole.service.explain import explain
from sinkhole.service.operations import BadValue
from sinkhole.store import accounts as acc
from sinkhole.store import browse
from sinkhole.store.db import Store
from sinkhole.store.journal import Actor

Params = dict[str, Any]


@dataclass
class Call:
    store: Store
    account: str
    role: str
    address: str
    what: str  # the request, e.g. "POST /api/rules": the journal's command for changes made by it
    cfg: Any = None  # the server's settings (check NAME answers as the server would)

    def actor(self) -> Actor:
        return acc.web_actor(self.account, self.address, self.what)

    def accounts(self) -> acc.Accounts:
        return acc.Accounts(self.store)


# (method, path, least role, what): every endpoint of the JSON API; the pages call the same functions with the
# same roles (console.PAGES)
ENDPOINTS: list[tuple[str, str, str, str]] = [
    ("GET", "/api/session", "viewer", "who is signed in, the role, the CSRF token"),
    ("POST", "/api/logout", "viewer", "end this session"),
    ("POST", "/api/password", "viewer", "change one's own password (current, new)"),
    ("GET", "/api/dashboard", "viewer", "totals, blocked per hour, tops, queries/s, upstreams, chains"),
    ("GET", "/api/log", "auditor", "a page of the audit log (filters, before, size)"),
    ("GET", "/api/log/{seq}", "auditor", "one row: why, and its place in its chain"),
    ("GET", "/api/log/export", "auditor", "every filtered row as CSV or JSON Lines (format)"),
    ("GET", "/api/verify", "auditor", "the last verification and whether one runs"),
    ("POST", "/api/verify", "auditor", "verify the chains with the operator's key copy (key; never stored)"),
    ("GET", "/api/report", "auditor", "the HTML report (since, until)"),
    ("GET", "/api/changes", "auditor", "the change journal (since, until, user, action, before)"),
    ("GET", "/api/rules", "auditor", "rules (kind, category, q, after)"),
    ("GET", "/api/lists", "auditor", "categories and list sources"),
    ("GET", "/api/groups", "auditor", "client groups"),
    ("GET", "/api/check", "auditor", "the decision and exact answer for a name (name, type, client)"),
    ("GET", "/api/requests", "auditor", "access requests from the block page (status)"),
    ("POST", "/api/rules", "admin", "add block or allow rules (kind, names, category|group, note, expires)"),
    ("POST", "/api/rules/remove", "admin", "remove rules (kind, names, category|group)"),
    ("POST", "/api/lists/enable", "admin", "put a category in force (category)"),
    ("POST", "/api/lists/disable", "admin", "take a category out of force (category)"),
    ("POST", "/api/lists/import", "admin", "import a list from a URL (url, category, format)"),
    ("POST", "/api/lists/update", "admin", "fetch the recorded sources again (categories)"),
    ("POST", "/api/groups", "admin", "create or change a group (name, networks, categories, note)"),
    ("POST", "/api/groups/remove", "admin", "remove a group or some of its networks (name, networks)"),
    ("POST", "/api/requests/approve", "admin", "approve an access request (id, expires, group, name)"),
    ("POST", "/api/requests/deny", "admin", "deny an access request (id)"),
    ("GET", "/api/users", "admin", "the console's accounts"),
    ("POST", "/api/users", "admin", "add an account (name, role, password)"),
    ("POST", "/api/users/password", "admin", "set an account's password (name, password)"),
    ("POST", "/api/users/role", "admin", "change an account's role (name, role)"),
    ("POST", "/api/users/unlock", "admin", "clear an account's failed logins (name)"),
    ("POST", "/api/users/remove", "admin", "remove an account (name)"),
]


# ---------------------------------------------------------------------------- parameters


def text(p: Params, key: str, default: str | None = None, limit: int = 2000) -> str | None:
    value = p.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return default
    value = str(value).strip()
    if len(value) > limit:
        raise BadValue(key, f"at most {limit} characters")
    return value or default


def words(p: Params, key: str, limit: int = 10_000) -> list[str]:
    """A list given as repeated fields, a JSON list, or one field of names split by blanks and commas."""
    value = p.get(key)
    items = value if isinstance(value, list) else [] if value is None else [value]
    out: list[str] = []
    for item in items:
        out += [w for w in str(item).replace(",", " ").split() if w]
    if len(out) > limit:
        raise BadValue(key, f"at most {limit} at once")
    return out


def number(p: Params, key: str, default: int | None = None, lo: int = 0, hi: int = 2**62) -> int | None:
    value = text(p, key)
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        raise BadValue(key, f"{value!r} is not a whole number") from None
    if not lo <= n <= hi:
        raise BadValue(key, f"must be from {lo} to {hi}")
    return n


def kind_of(p: Params) -> RuleKind:
    kind = text(p, "kind", "block")
    if kind not in ("block", "allow"):
        raise BadValue("kind", "block or allow")
    return RuleKind(kind)


def cursor(value: str | None) -> tuple[str, int] | None:
    """`before` of a log page: 'TIME,SEQ'."""
    if not value:
        return None
    when, _, seq = value.rpartition(",")
    if not when or not seq.isdigit() or len(when) > 40:
        raise BadValue("before", f"{value[:60]!r} is not a cursor from a page of the log")
    return when, int(seq)


def log_filter(p: Params) -> operations.LogFilter:
    return operations.LogFilter.parse(text(p, "since"), text(p, "until"), text(p, "client"), text(p, "domain"),
                                      text(p, "action"), text(p, "group"), text(p, "category"), text(p, "rule"))


# ---------------------------------------------------------------------------- the log


def log(call: Call, p: Params) -> dict:
    f = log_filter(p)
    page = browse.log_page(call.store, f, cursor(text(p, "before")), number(p, "size", 50, 1, browse.PAGE_MAX) or 50)
    return {"filter": f.kwargs(), "rows": page.rows, "next": f"{page.next[0]},{page.next[1]}" if page.next else None,
            "searched_to": page.searched_to, "plan": page.plan}


def log_row(call: Call, seq: int) -> dict | None:
    return browse.log_row(call.store, seq)


# ---------------------------------------------------------------------------- policy


def rules(call: Call, p: Params) -> dict:
    kind = text(p, "kind")
    if kind not in (None, "block", "allow"):
        raise BadValue("kind", "block or allow")
    after = text(p, "after")
    key = tuple(after.split("\n", 1)) if after and "\n" in after else None
    rows, more = browse.rules_page(call.store, kind, text(p, "category"), text(p, "q", limit=253),
                                   key, number(p, "size", 100, 1, browse.PAGE_MAX) or 100)  # type: ignore[arg-type]
    return {"rules": rows, "after": "\n".join(more) if more else None,
            "categories": [r["category"] for r in call.store.categories()],
            "groups": [g["name"] for g in call.store.groups()]}


def rule_add(call: Call, p: Params) -> dict:
    kind = kind_of(p)
    names = words(p, "names")
    expires = operations.parse_expiry(text(p, "expires"))
    category, added, present = operations.add_rules(
        call.store, kind, names, operations.check_category(text(p, "category")),
        operations.check_category(text(p, "group"), "group"), text(p, "note", limit=500), expires, call.actor())
    return {"kind": kind.value, "category": category, "added": added, "present": present, "expires": expires}


def rule_remove(call: Call, p: Params) -> dict:
    kind = kind_of(p)
    removed, missing = operations.remove_rules(
        call.store, kind, words(p, "names"), operations.check_category(text(p, "category")),
        operations.check_category(text(p, "group"), "group"), call.actor())
    return {"kind": kind.value, "removed": removed, "missing": missing}


def lists(call: Call, p: Params) -> dict:
    return {"lists": operations.list_rows(call.store), "sources": call.store.sources()}


def _category(p: Params) -> str:
    category = operations.check_category(text(p, "category"))
    if category is None:
        raise BadValue("category", "give one")
    return category


def list_enable(call: Call, p: Params) -> dict:
    category = _category(p)
    changed, loaded, source = operations.enable_list(call.store, category, call.actor())
    return {"category": category, "changed": changed, "loaded": loaded, "source": source}


def list_disable(call: Call, p: Params) -> dict:
    category = _category(p)
    return {"category": category, "changed": operations.disable_list(call.store, category, call.actor())}


def list_import(call: Call, p: Params) -> dict:
    url = text(p, "url")
    if not url:
        raise BadValue("url", "give the list's http:// or https:// URL")
    fmt = text(p, "format", "auto") or "auto"
    read = operations.read_list(url, operations.check_category(text(p, "category")), fmt, files=False)
    count = operations.store_list(call.store, read, fmt, call.actor())
    return {"category": read.category, "format": read.format, "rules": count, "summary": read.summary}


def lists_update(call: Call, p: Params) -> dict:
    cats = [operations.check_category(c) or "" for c in words(p, "categories")]
    results = [vars(r) for r in operations.update_lists(call.store, cats, call.actor())]
    return {"results": results, "failed": sum(not r["ok"] for r in results)}


def groups(call: Call, p: Params) -> dict:
    return {"groups": operations.group_rows(call.store), "categories": [r["category"] for r in
                                                                         call.store.categories()]}


def group_save(call: Call, p: Params) -> dict:
    name = operations.check_category(text(p, "name"), "name")
    if not name:
        raise BadValue("name", "give the group's name")
    nets = operations.networks(words(p, "networks"))
    cats = operations.group_categories(text(p, "categories"))
    created, added = call.store.save_group(name, nets, cats, text(p, "note", limit=500), call.actor())
    return {"name": name, "created": created, "networks_added": added}


def group_remove(call: Call, p: Params) -> dict:
    name = operations.check_category(text(p, "name"), "name")
    if not name:
        raise BadValue("name", "give the group's name")
    nets = operations.networks(words(p, "networks")) or None
    return {"name": name, "removed": call.store.remove_group(name, nets, call.actor()), "whole": nets is None}


def changes(call: Call, p: Params) -> dict:
    before = number(p, "before")
    rows, more = browse.journal_page(call.store, operations.parse_when(text(p, "since"), "since"),
                                     operations.parse_when(text(p, "until"), "until"), text(p, "user"),
                                     text(p, "action"), before, number(p, "size", 100, 1, browse.PAGE_MAX) or 100)
    return {"changes": [operations.change_row(r) for r in rows], "before": more}


def check(call: Call, p: Params) -> dict:
    name = text(p, "name")
    if not name:
        raise BadValue("name", "give a name")
    qtype = (text(p, "type", "A") or "A").upper()
    client = text(p, "client", "127.0.0.1") or "127.0.0.1"
    try:
        dns.rdatatype.from_text(qtype)
    except (ValueError, dns.rdatatype.UnknownRdatatype):
        raise BadValue("type", f"{qtype!r} is not a query type") from None
    try:
        ipaddress.ip_address(client)
    except ValueError:
        raise BadValue("client", f"{client!r} is not an IP address") from None
    return explain(call.store, call.cfg, normalize(name), qtype, client)


def requests(call: Call, p: Params) -> dict:
    status = text(p, "status", "pending")
    if status not in ("pending", "approved", "denied", "all"):
        raise BadValue("status", "pending, approved, denied or all")
    return {"status": status, "requests": call.store.requests(None if status == "all" else status),
            "groups": [g["name"] for g in call.store.groups()]}


def request_approve(call: Call, p: Params) -> dict:
    ident = number(p, "id", None, 1)
    if ident is None:
        raise BadValue("id", "give the request's number")
    expires = operations.parse_expiry(text(p, "expires", "7d"))
    assert expires is not None
    done, group, name = operations.approve_request(call.store, ident, expires,
                                                   operations.check_category(text(p, "group"), "group"),
                                                   text(p, "name"), call.actor())
    return {"request": done, "group": group, "name": name}


def request_deny(call: Call, p: Params) -> dict:
    ident = number(p, "id", None, 1)
    if ident is None:
        raise BadValue("id", "give the request's number")
    return {"request": call.store.decide_request(ident, False, call.actor())}


# ---------------------------------------------------------------------------- accounts


def users(call: Call, p: Params) -> dict:
    return {"users": call.accounts().users()}


def _name(p: Params) -> str:
    name = text(p, "name")
    if not name:
        raise BadValue("name", "give the account's name")
    return acc.check_name(name)


def user_add(call: Call, p: Params, hashed: str) -> dict:
    name, role = _name(p), acc.check_role(text(p, "role") or "")
    call.accounts().add_user(name, role, hashed, call.actor())
    return {"name": name, "role": role}


def user_password(call: Call, p: Params, hashed: str) -> dict:
    name = _name(p)
    return {"name": name, "sessions_ended": call.accounts().set_password(name, hashed, call.actor())}


def user_role(call: Call, p: Params) -> dict:
    name = _name(p)
    role = acc.check_role(text(p, "role") or "")
    call.accounts().set_role(name, role, call.actor())
    return {"name": name, "role": role}


def user_unlock(call: Call, p: Params) -> dict:
    name = _name(p)
    return {"name": name, "was_locked": call.accounts().unlock(name, call.actor())}


def user_remove(call: Call, p: Params) -> dict:
    name = _name(p)
    if name == call.account:
        raise BadValue("name", "an account cannot remove itself")
    users_ = {u["name"]: u for u in call.accounts().users()}
    if name in users_ and users_[name]["role"] == "admin" and sum(u["role"] == "admin" for u in users_.values()) == 1:
        raise BadValue("name", f"{name} is the last admin account")
    return {"name": name, "sessions_ended": call.accounts().remove_user(name, call.actor())}
