"""Settings for `sinkhole serve`: defaults < TOML file < SINKHOLE_* environment < command-line flags.

A leaf: values and the checks that need nothing but the values (types, ranges, relations between keys). What
turns a setting into a running part, and the checks that need one (an upstream URL, a TSIG key, a CA file), is
sinkhole.service.build, which `serve` and `config check` both use.

The file is `--config FILE` (env SINKHOLE_CONFIG), else /etc/sinkhole/sinkhole.toml when it exists.
`read` also says where each effective value came from; `check_file` validates a file with the validator it is
given (build.check) and names the line of every error; `reload_plan` splits a changed configuration into what a
running server applies (RELOADABLE) and what needs a restart.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sinkhole.errors import ConfigError

# loopback, RFC 1918, RFC 6598 (carrier-grade NAT), IPv6 ULA, link-local
DEFAULT_ALLOW = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                 "fc00::/7", "169.254.0.0/16", "fe80::/10")
DEFAULT_EXEMPT = ("127.0.0.0/8", "::1/128")
MAX_RETENTION_DAYS = 36500  # a hundred years: beyond, the cut-off date is out of datetime's range


@dataclass(frozen=True)
class ServingSettings:
    """The DNS listeners and their TCP connections (sinkhole.dns.listener)."""

    listen: tuple[str, ...] = ("127.0.0.1:5353",)
    tcp_idle_timeout: float = 10.0
    tcp_max_clients: int = 1000
    tcp_max_per_client: int = 16  # open TCP connections from one client address (Unbound's tcp-connection-limit)


@dataclass(frozen=True)
class UpstreamSettings:
    """Where forwarded queries go, and how many may wait (sinkhole.dns.upstream, the pipeline's shares)."""

    upstream: tuple[str, ...] = ()  # empty: the nameservers of /etc/resolv.conf
    upstream_strategy: str = "failover"  # failover (in order) | fastest (lowest smoothed RTT) | parallel (two at once)
    upstream_ca: str = ""  # PEM CA bundle tls:// and https:// upstreams must chain to; empty: the system's CAs
    forward_zones: tuple[str, ...] = ()  # "ZONE=URL[,URL...]": names at or under ZONE go to those upstreams
    timeout: float = 2.0  # seconds until a client gets SERVFAIL when no upstream answers
    ecs: str = "strip"  # EDNS Client Subnet upstream: "strip" (none), or "V4/V6" prefix lengths, e.g. "24/56"
    max_inflight: int = 1000  # forwards waiting for an upstream at once (each holds a socket)
    max_inflight_client_share: float = 0.1  # of max_inflight, held by one client address at most
    max_inflight_network_share: float = 0.5  # of max_inflight, held by one client /24 or /56 at most


@dataclass(frozen=True)
class AnswerSettings:
    """How blocked names are answered (sinkhole.dns.answer)."""

    mode: str = "sinkhole"  # or "nxdomain"
    block_a: str = "0.0.0.0"  # "none": NODATA for A
    block_aaaa: str = "::"
    block_ttl: int = 60


@dataclass(frozen=True)
class ClientSettings:
    """Who may ask, and how fast (sinkhole.dns.guard)."""

    allow_clients: tuple[str, ...] = DEFAULT_ALLOW  # others get REFUSED
    rate_limit: float = 200.0  # queries/s per client address (0: off)
    rate_limit_burst: float = 400.0
    rate_limit_net: float = 2000.0  # queries/s per client network (/24, /56) (0: off)
    rate_limit_net_burst: float = 4000.0
    rate_limit_v4_prefix: int = 24
    rate_limit_v6_prefix: int = 56
    # over the limit: truncate = TC=1 over UDP, and TCP counted in buckets of its own at the same rates (REFUSED
    # over them); refuse = REFUSED, UDP and TCP sharing one set of buckets (sinkhole.dns.guard.Guard.check)
    rate_limit_action: str = "truncate"
    rate_limit_exempt: tuple[str, ...] = DEFAULT_EXEMPT


@dataclass(frozen=True)
class CacheSettings:
    """The reply cache (sinkhole.dns.cache)."""

    cache_size: int = 100_000  # entries (0: no cache)
    cache_min_ttl: int = 0
    cache_max_ttl: int = 86400
    cache_negative_max_ttl: int = 3600
    cache_prefetch: bool = False  # a hit in the last tenth of a TTL refreshes the entry in the background
    cache_serve_stale: float = 0.0  # seconds past expiry an entry may answer when no upstream does (0: never)


@dataclass(frozen=True)
class PolicySettings:
    """The policy in force: the shipped lists of a new database, the canaries, reloads."""

    shipped_lists: bool = True
    bypass_canaries: bool = True  # answer the DoH / Private Relay / DDR canaries so clients stay with us
    reload_interval: float = 0.25


@dataclass(frozen=True)
class AuditSettings:
    """The audit log (sinkhole.audit.writer) and its retention (sinkhole.audit.retention)."""

    log_queries: str = "blocked"  # blocked | all | none
    log_client_prefix: str = ""  # "V4/V6", e.g. "24/56": audit rows keep the client's network, not its address
    audit_synchronous: str = "normal"  # SQLite synchronous level of the audit log: off | normal | full | extra
    # seconds: identical answers within this long of the first are one audit row with a count (0: a row each)
    audit_window: float = 1.0
    # where a worker's audit writer runs: "process" (a child of its own, sinkhole.service.audit_process),
    # "thread" (in the worker), "auto": a process for each worker of a server with workers, else a thread
    audit_writer: str = "auto"
    node: str = field(default_factory=socket.gethostname)
    retention_days: int = 365  # audit rows older than this are pruned, leaving checkpoints (0: kept forever)
    prune_interval: float = 3600.0  # seconds between two prunes (and one at start)


@dataclass(frozen=True)
class ShippingSettings:
    """Shipping every audit row to a SIEM (sinkhole.audit.shipping)."""

    syslog: str = ""  # udp://HOST:PORT, tcp://HOST:PORT or HOST:PORT (UDP): every audit row and chain head, RFC 5424
    syslog_facility: str = "local0"
    json_log: bool = False  # every audit row as a JSON line on stdout (journald under systemd)
    anchor_interval: float = 60.0  # seconds between chain heads sent to syslog (and one at shutdown)


@dataclass(frozen=True)
class FleetSettings:
    """The policy as an RPZ zone, served to secondaries or pulled from a primary (sinkhole.fleet)."""

    rpz_listen: str = ""  # HOST:PORT: serve the zone (SOA, AXFR, IXFR) and take NOTIFY here; "" off
    rpz_zone: str = "rpz.sinkhole."
    rpz_group: str = "default"  # whose policy the served zone holds
    rpz_secondaries: tuple[str, ...] = ("127.0.0.0/8", "::1/128")  # may transfer; others get REFUSED
    rpz_notify: tuple[str, ...] = ()  # HOST:PORT of secondaries to NOTIFY on every change
    rpz_tsig: str = ""  # NAME:ALGORITHM:BASE64SECRET: transfers and NOTIFY must be signed with it
    rpz_refresh: int = 60  # SOA refresh of the served zone; a secondary checks the serial this often
    rpz_max_connections: int = 64  # TCP connections to rpz_listen at once (the same process serves DNS) ...
    rpz_max_per_address: int = 4  # ... and from one address
    rpz_idle_timeout: float = 30.0  # seconds to send a whole request, and to read each reply message
    policy_from: str = ""  # HOST:PORT of a primary: pull its zone into category rpz:<zone>


@dataclass(frozen=True)
class BlockpageSettings:
    """What a person whose browser asked a blocked name sees (sinkhole.web.blockpage)."""

    blockpage_listen: tuple[str, ...] = ()  # HOST:PORT (a bare HOST: ports 80 and 443), each HTTP and HTTPS; () off
    blockpage_ca: str = ""  # the CA directory (sinkhole ca init/import); empty: ca/ beside the database
    blockpage_agency: str = ""  # the agency's name, shown on the page
    blockpage_contact: str = ""  # whom to ask: a helpdesk number, a mail address
    blockpage_policy: str = ""  # a sentence on the policy (e.g. its reference), shown on the page
    blockpage_logo: str = ""  # a PNG, JPEG or SVG file (at most 256 KiB), inlined in the page
    blockpage_templates: str = "/etc/sinkhole/blockpage"  # blockpage.html here replaces the shipped one
    blockpage_language: str = "en"  # en or ko: the page's language when Accept-Language names neither
    blockpage_requests: bool = True  # the page's access request form (sinkhole requests list|approve|deny)


@dataclass(frozen=True)
class WebSettings:
    """The web console (sinkhole.web.console); accounts from `sinkhole user add`."""

    web_listen: tuple[str, ...] = ()  # HOST:PORT (a bare HOST: port 8053); () off. Plain HTTP on loopback only
    web_tls: str = "auto"  # auto: HTTPS when web_cert or the block page's CA gives a certificate; on; off (loopback)
    web_cert: str = ""  # PEM certificate (chain) for HTTPS; with web_key
    web_key: str = ""
    web_name: str = ""  # the name in a certificate minted from the CA [the first listen address]
    web_idle_timeout: int = 1800  # seconds a session may go unused
    web_session_lifetime: int = 43200  # seconds a session lasts at most after the login


@dataclass(frozen=True)
class ProcessSettings:
    """The process: privileges, workers, its log, its metrics."""

    user: str = ""  # when started as root: bind, then run as this user
    workers: int = 0  # processes serving the same sockets; 0: one per core
    log_level: str = "info"
    log_repeat_interval: float = 10.0  # a repeatable warning at most once per this many seconds per kind (0: every one)
    metrics: str = ""  # HOST:PORT serving Prometheus /metrics and /healthz; empty: off


@dataclass(frozen=True)
class Settings:
    """Every setting, one frozen section per part that consumes it; a section's fields are named by their flat
    keys (the contract: TOML keys, SINKHOLE_<KEY>, --key flags, `config show`), so `settings.cache.cache_size` is
    `cache_size` wherever it is written. `value(key)` and `replace(**keys)` are the flat views."""

    serving: ServingSettings = field(default_factory=ServingSettings)
    upstreams: UpstreamSettings = field(default_factory=UpstreamSettings)
    answers: AnswerSettings = field(default_factory=AnswerSettings)
    clients: ClientSettings = field(default_factory=ClientSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    shipping: ShippingSettings = field(default_factory=ShippingSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    blockpage: BlockpageSettings = field(default_factory=BlockpageSettings)
    web: WebSettings = field(default_factory=WebSettings)
    process: ProcessSettings = field(default_factory=ProcessSettings)

    @classmethod
    def of(cls, **values: Any) -> Settings:
        """Settings with these flat keys set, the others at their defaults."""
        return cls().replace(**values)

    def value(self, key: str) -> Any:
        """The value of one flat key."""
        return getattr(getattr(self, KEYS[key]), key)

    def replace(self, **values: Any) -> Settings:
        """A copy with these flat keys set (KeyError for a key that is not a setting)."""
        by_section: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            by_section.setdefault(KEYS[key], {})[key] = value
        return dataclasses.replace(self, **{attr: dataclasses.replace(getattr(self, attr), **changed)
                                            for attr, changed in by_section.items()})


def keys_of(section: type) -> frozenset[str]:
    """The flat keys of one section (e.g. every setting the guard takes: keys_of(ClientSettings))."""
    return frozenset(f.name for f in dataclasses.fields(section))


SECTIONS: dict[str, type] = {  # Settings' attribute -> its section
    "serving": ServingSettings, "upstreams": UpstreamSettings, "answers": AnswerSettings, "clients": ClientSettings,
    "cache": CacheSettings, "policy": PolicySettings, "audit": AuditSettings, "shipping": ShippingSettings,
    "fleet": FleetSettings, "blockpage": BlockpageSettings, "web": WebSettings, "process": ProcessSettings,
}
# flat key -> the section that holds it, in the order `config show` prints them and etc/sinkhole.toml lists them
KEYS: dict[str, str] = {
    "listen": "serving", "upstream": "upstreams", "upstream_strategy": "upstreams", "upstream_ca": "upstreams",
    "forward_zones": "upstreams", "timeout": "upstreams", "ecs": "upstreams", "mode": "answers",
    "block_a": "answers", "block_aaaa": "answers", "block_ttl": "answers", "log_queries": "audit",
    "log_client_prefix": "audit", "audit_synchronous": "audit", "audit_window": "audit", "audit_writer": "audit",
    "allow_clients": "clients",
    "rate_limit": "clients",
    "rate_limit_burst": "clients", "rate_limit_net": "clients", "rate_limit_net_burst": "clients",
    "rate_limit_v4_prefix": "clients", "rate_limit_v6_prefix": "clients", "rate_limit_action": "clients",
    "rate_limit_exempt": "clients", "cache_size": "cache", "cache_min_ttl": "cache", "cache_max_ttl": "cache",
    "cache_negative_max_ttl": "cache", "cache_prefetch": "cache", "cache_serve_stale": "cache",
    "tcp_idle_timeout": "serving", "tcp_max_clients": "serving", "tcp_max_per_client": "serving",
    "max_inflight": "upstreams", "max_inflight_client_share": "upstreams",
    "max_inflight_network_share": "upstreams", "reload_interval": "policy", "node": "audit", "user": "process",
    "workers": "process", "shipped_lists": "policy", "bypass_canaries": "policy", "log_level": "process",
    "log_repeat_interval": "process", "syslog": "shipping", "syslog_facility": "shipping", "json_log": "shipping",
    "anchor_interval": "shipping", "retention_days": "audit", "prune_interval": "audit", "metrics": "process",
    "rpz_listen": "fleet", "rpz_zone": "fleet", "rpz_group": "fleet", "rpz_secondaries": "fleet",
    "rpz_notify": "fleet", "rpz_tsig": "fleet", "rpz_refresh": "fleet", "rpz_max_connections": "fleet",
    "rpz_max_per_address": "fleet", "rpz_idle_timeout": "fleet", "policy_from": "fleet",
    "blockpage_listen": "blockpage", "blockpage_ca": "blockpage", "blockpage_agency": "blockpage",
    "blockpage_contact": "blockpage", "blockpage_policy": "blockpage", "blockpage_logo": "blockpage",
    "blockpage_templates": "blockpage", "blockpage_language": "blockpage", "blockpage_requests": "blockpage",
    "web_listen": "web", "web_tls": "web", "web_cert": "web", "web_key": "web", "web_name": "web",
    "web_idle_timeout": "web", "web_session_lifetime": "web",
}
FIELDS = {f.name: f for section in SECTIONS.values() for f in dataclasses.fields(section)}  # flat key -> its field
DEFAULT = Settings()
DEFAULT_PATH = Path("/etc/sinkhole/sinkhole.toml")
METRICS_PORT = 9153
WEB_PORT = 8053
# what a running server applies on SIGHUP; every other change is reported as needing a restart
RELOADABLE = frozenset({
    "log_queries", "log_level", "log_repeat_interval", "mode", "block_a", "block_aaaa", "block_ttl",
    "allow_clients", "rate_limit", "rate_limit_burst", "rate_limit_net", "rate_limit_net_burst",
    "rate_limit_v4_prefix", "rate_limit_v6_prefix", "rate_limit_action", "rate_limit_exempt",
    "upstream", "timeout", "max_inflight", "max_inflight_client_share", "max_inflight_network_share",
    "cache_size", "cache_min_ttl", "cache_max_ttl", "cache_negative_max_ttl", "cache_serve_stale", "reload_interval",
})


def default_file() -> Path | None:
    """/etc/sinkhole/sinkhole.toml when it exists: used when no --config / SINKHOLE_CONFIG is given."""
    return DEFAULT_PATH if DEFAULT_PATH.is_file() else None


def _coerce(name: str, value: Any, origin: str) -> Any:
    f = FIELDS[name]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if name == "forward_zones":
            return _forward_zones(value)
        if kind.startswith("tuple"):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise ValueError("expected a list of strings")
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError("expected a whole number")
            return int(value)
        if kind == "float":
            return float(value)
        if not isinstance(value, str | int | float):
            raise ValueError("expected a string")
        return str(value)
    except ValueError as exc:
        raise ConfigError(f"{origin}: {name}: {exc}") from None


def _flatten(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """TOML reads an unquoted `corp.example = [...]` as nested tables: join the keys back into the zone."""
    out: list[tuple[str, Any]] = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _forward_zones(value: Any) -> tuple[str, ...]:
    """A TOML table {"corp.example" = ["10.0.0.53", ...]} or a list of "ZONE=URL[,URL]" strings; in the
    environment and flags, such strings separated by ';' or blanks."""
    if isinstance(value, Mapping):
        out = []
        for zone, urls in _flatten(value):
            if isinstance(urls, str):
                urls = [urls]
            if not isinstance(urls, list | tuple) or not all(isinstance(u, str) for u in urls):
                raise ValueError(f"zone {zone!r}: expected an upstream or a list of upstreams")
            out.append(f"{zone}={','.join(urls)}")
        return tuple(out)
    if isinstance(value, str):
        value = value.replace(";", " ").split()
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(v.strip() for v in value if v.strip())
    raise ValueError('expected a table like {"corp.example" = ["10.0.0.53"]} or a list of "ZONE=UPSTREAM,..."')


TTL_MAX = 2**31 - 1  # RFC 2181
MAX_WORKERS = 256
# every number a setting takes has bounds (and NaN is none of them): nothing a typo sends reaches a socket call,
# a timer or SQLite out of range; the other numbers are checked below with what they mean
LIMITS: dict[str, tuple[int, int]] = {
    "rate_limit": (0, 10_000_000), "rate_limit_burst": (0, 100_000_000), "rate_limit_net": (0, 100_000_000),
    "rate_limit_net_burst": (0, 1_000_000_000), "cache_size": (0, 100_000_000), "cache_min_ttl": (0, TTL_MAX),
    "cache_max_ttl": (0, TTL_MAX), "cache_negative_max_ttl": (0, TTL_MAX), "cache_serve_stale": (0, 365 * 86400),
    "tcp_max_clients": (1, 1_000_000), "tcp_max_per_client": (1, 1_000_000), "max_inflight": (1, 1_000_000),
    "workers": (0, MAX_WORKERS), "retention_days": (0, MAX_RETENTION_DAYS),
    "rpz_max_connections": (1, 100_000), "rpz_max_per_address": (1, 100_000),
}


SYNCHRONOUS = ("off", "normal", "full", "extra")  # SQLite's levels (audit_synchronous)
AUDIT_WRITERS = ("auto", "process", "thread")
LOG_LEVELS = ("debug", "info", "warning", "error")
# a row is dated at its first answer and written when its window ends; `log verify` allows a chain's times to run
# back 60 s (sinkhole.audit.chain.TIME_SLACK), so a window stays well below that (sinkhole.audit.writer.MAX_WINDOW)
MAX_AUDIT_WINDOW = 30.0


def check_values(cfg: Settings) -> Settings:
    """ConfigError for a value that is wrong by itself or together with another, whatever runs it (build.check
    adds what needs the parts themselves: addresses, upstreams, keys, choices a part owns)."""
    if not all(0 < v < 3600 for v in (cfg.upstreams.timeout, cfg.serving.tcp_idle_timeout, cfg.policy.reload_interval)):
        raise ConfigError("timeouts and intervals must be above zero and below an hour")
    if cfg.audit.audit_synchronous.lower() not in SYNCHRONOUS:
        raise ConfigError(f"audit_synchronous must be off, normal, full or extra, not {cfg.audit.audit_synchronous!r}")
    if cfg.audit.audit_writer not in AUDIT_WRITERS:
        raise ConfigError(f"audit_writer must be auto, process or thread, not {cfg.audit.audit_writer!r}")
    if not 0 <= cfg.audit.audit_window <= MAX_AUDIT_WINDOW:  # NaN too
        raise ConfigError(f"audit_window must be from 0 (a row per answer) to {MAX_AUDIT_WINDOW:g} seconds, "
                          f"not {cfg.audit.audit_window!r}")
    if cfg.process.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"log_level must be debug, info, warning or error, not {cfg.process.log_level!r}")
    if not 0 <= cfg.process.log_repeat_interval <= 3600:
        raise ConfigError("log_repeat_interval must be from 0 (every line) to 3600 seconds")
    for name, (low, high) in LIMITS.items():
        value = cfg.value(name)
        if not low <= value <= high:  # NaN too
            raise ConfigError(f"{name} must be from {low:,} to {high:,}, not {value!r}")
    if not (0 < cfg.upstreams.max_inflight_client_share <= 1 and 0 < cfg.upstreams.max_inflight_network_share <= 1):
        raise ConfigError("max_inflight_client_share and max_inflight_network_share must be above 0 and at most 1")
    if not cfg.cache.cache_min_ttl <= cfg.cache.cache_max_ttl:
        raise ConfigError(f"cache_min_ttl <= cache_max_ttl is needed: {cfg.cache.cache_min_ttl} is above "
                          f"{cfg.cache.cache_max_ttl}")
    if not 0 <= cfg.answers.block_ttl <= 86400:
        raise ConfigError("block_ttl must be from 0 to 86400 seconds")
    if not 0 < cfg.audit.prune_interval <= 86400:
        raise ConfigError("prune_interval must be above 0 and at most 86400 s")
    if not cfg.serving.listen:
        raise ConfigError("listen: at least one address is needed")
    if not 0 < cfg.shipping.anchor_interval <= 86400:
        raise ConfigError("anchor_interval must be above zero and at most a day (86400 seconds)")
    if not 1 <= cfg.fleet.rpz_refresh <= 86400:
        raise ConfigError("rpz_refresh must be from 1 to 86400 seconds")
    if not 0 < cfg.fleet.rpz_idle_timeout <= 3600:  # NaN too
        raise ConfigError("rpz_idle_timeout must be above zero and at most 3600 seconds")
    if cfg.fleet.rpz_max_per_address > cfg.fleet.rpz_max_connections:
        raise ConfigError(f"rpz_max_per_address ({cfg.fleet.rpz_max_per_address}) must not be above "
                          f"rpz_max_connections ({cfg.fleet.rpz_max_connections})")
    if cfg.fleet.rpz_notify and not cfg.fleet.rpz_listen:
        raise ConfigError("rpz_notify needs rpz_listen: NOTIFY tells secondaries to transfer from it")
    if cfg.blockpage.blockpage_language not in ("en", "ko"):
        raise ConfigError(f"blockpage_language must be en or ko, not {cfg.blockpage.blockpage_language!r}")
    if cfg.web.web_tls not in ("auto", "on", "off"):
        raise ConfigError(f"web_tls must be auto, on or off, not {cfg.web.web_tls!r}")
    if cfg.web.web_key and not cfg.web.web_cert:
        raise ConfigError("web_key needs web_cert")
    if not 60 <= cfg.web.web_idle_timeout <= cfg.web.web_session_lifetime <= 7 * 86400:
        raise ConfigError("web_idle_timeout must be at least 60 s and at most web_session_lifetime, which is at most"
                          " a week (604800 s)")
    return cfg


def _read(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    server = data.get("server")
    return server if isinstance(server, dict) else data


def read(file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
         flags: Mapping[str, Any] | None = None) -> tuple[Settings, dict[str, str]]:
    """The effective settings (values checked by check_values) and, for each, where it came from: default,
    file, env or flag. build.load_sources adds the checks of the parts that use them."""
    values: dict[str, Any] = {}
    sources = dict.fromkeys(KEYS, "default")
    if file is not None:
        path = Path(file)
        for key, value in _read(path).items():
            name = key.replace("-", "_")
            if name not in FIELDS:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            values[name] = _coerce(name, value, str(path))
            sources[name] = "file"
    env = os.environ if env is None else env
    for name in KEYS:
        var = f"SINKHOLE_{name.upper()}"
        if var in env:
            values[name] = _coerce(name, env[var], var)
            sources[name] = "env"
    for name, value in (flags or {}).items():
        if value is None:
            continue
        values[name] = _coerce(name, value, "--" + name.replace("_", "-"))
        sources[name] = "flag"
    return check_values(Settings.of(**values)), sources


# ---------------------------------------------------------------------------- config check


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based; 0 when no line can be named
    column: int
    message: str

    def format(self, path: str | os.PathLike[str]) -> str:
        where = f"{path}:{self.line}" if self.line else str(path)
        return f"{where}:{self.column}: {self.message}" if self.column else f"{where}: {self.message}"


_TOML_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END = re.compile(r"\s*\(at end of document\)\s*$")


def _key_line(text: str, key: str) -> int:
    """The line of `key = ...` in the file (bare or quoted key, in any table), or 0."""
    pattern = re.compile(r"^[ \t]*(?:" + re.escape(key) + r"|\"" + re.escape(key) + r"\"|'" + re.escape(key)
                         + r"')[ \t]*=", re.MULTILINE)
    m = pattern.search(text)
    return text.count("\n", 0, m.start()) + 1 if m else 0


def _strip_origin(message: str) -> str:
    return message.split(": ", 1)[1] if message.startswith(("/", ".")) and ": " in message else message


def check_file(file: str | os.PathLike[str], validate: Callable[[Settings], object]) -> list[Problem]:
    """Every error in a settings file at once, each with its line (as `config check` prints them); `validate`
    (build.check: what serve builds) raises ConfigError for settings that cannot be served.

    TOML syntax errors carry tomllib's line and column (the file cannot be read further); unknown
    keys and bad values name the line of their key; a value that is wrong only together with
    another (cache_min_ttl above cache_max_ttl) names the line of the first key the message names."""
    path = Path(file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return [Problem(0, 0, exc.strerror or str(exc))]
    except UnicodeDecodeError:
        return [Problem(0, 0, "not UTF-8 text")]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        m = _TOML_AT.search(message)
        if m:
            return [Problem(int(m.group(1)), int(m.group(2)), message[:m.start()])]
        end = _TOML_END.sub("", message)
        return [Problem(text.count("\n") + 1, 0, end)]
    server = data.get("server")
    if isinstance(server, dict):
        extra = [k for k in data if k != "server"]
        data = server
        problems = [Problem(_key_line(text, k), 0, f"unknown setting {k!r} (outside [server])") for k in extra]
    else:
        problems = []
    good: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        line = _key_line(text, key)
        if name not in FIELDS:
            problems.append(Problem(line, 0, f"unknown setting {key!r}"))
            continue
        try:
            good[name] = _coerce(name, value, "")
        except ConfigError as exc:
            problems.append(Problem(line, 0, str(exc).lstrip(": ")))
            continue
        lines[name] = line

    def error_of(values: dict[str, Any]) -> str | None:
        try:
            validate(check_values(Settings.of(**values)))
        except ConfigError as exc:
            return _strip_origin(str(exc))
        return None

    if error_of(good) is not None:
        base = error_of({})  # the defaults alone (on a host whose resolv.conf names no nameserver, say)
        for name in list(good):  # each value alone over the defaults: which ones are wrong by themselves
            message = error_of({name: good[name]})
            if message is not None and message != base:
                problems.append(Problem(lines[name], 0, message))
                del good[name]
        message = error_of(good)
        if message is not None:  # wrong only together (or with the defaults)
            named = [n for n in good if re.search(r"\b" + re.escape(n) + r"\b", message)]
            problems.append(Problem(lines[named[0]] if named else 0, 0, message))
    return sorted(problems, key=lambda p: (p.line, p.column))


# ---------------------------------------------------------------------------- reload


def reload_plan(running: Settings, new: Settings) -> tuple[Settings, list[str], list[str]]:
    """(the running settings with every reloadable change applied, names applied, names needing a restart)."""
    changed = [f for f in KEYS if running.value(f) != new.value(f)]
    applied = [f for f in changed if f in RELOADABLE]
    restart = [f for f in changed if f not in RELOADABLE]
    return running.replace(**{f: new.value(f) for f in applied}), applied, restart


def to_toml(value: Any) -> str:
    """A setting's value as TOML (strings, numbers, booleans, lists of strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(to_toml(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)
