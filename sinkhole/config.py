"""Settings for `sinkhole serve`: defaults < TOML file < SINKHOLE_* environment < command-line flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sinkhole import guard, rpz, shipping
from sinkhole.answer import AnswerConfig
from sinkhole.audit import MODES as LOG_MODES
from sinkhole.cache import Cache
from sinkhole.errors import ConfigError
from sinkhole.upstream import Upstream, parse_hostport, parse_upstream, system_upstreams


@dataclass(frozen=True)
class ServeConfig:
    listen: tuple[str, ...] = ("127.0.0.1:5353",)
    upstream: tuple[str, ...] = ()  # empty: the nameservers of /etc/resolv.conf
    timeout: float = 2.0  # seconds until a client gets SERVFAIL when no upstream answers
    mode: str = "sinkhole"  # or "nxdomain"
    block_a: str = "0.0.0.0"  # "none": NODATA for A
    block_aaaa: str = "::"
    block_ttl: int = 60
    log_queries: str = "blocked"  # blocked | all | none
    log_client_prefix: str = ""  # "V4/V6", e.g. "24/56": audit rows keep the client's network, not its address
    audit_synchronous: str = "normal"  # SQLite synchronous level of the audit log: off | normal | full | extra
    allow_clients: tuple[str, ...] = guard.DEFAULT_ALLOW  # others get REFUSED
    rate_limit: float = 200.0  # queries/s per client address (0: off)
    rate_limit_burst: float = 400.0
    rate_limit_net: float = 2000.0  # queries/s per client network (/24, /56) (0: off)
    rate_limit_net_burst: float = 4000.0
    rate_limit_v4_prefix: int = 24
    rate_limit_v6_prefix: int = 56
    rate_limit_action: str = "truncate"  # truncate: TC=1 over UDP (TCP is not limited); refuse: REFUSED
    rate_limit_exempt: tuple[str, ...] = guard.DEFAULT_EXEMPT
    cache_size: int = 100_000  # entries (0: no cache)
    cache_min_ttl: int = 0
    cache_max_ttl: int = 86400
    cache_negative_max_ttl: int = 3600
    tcp_idle_timeout: float = 10.0
    tcp_max_clients: int = 1000
    max_inflight: int = 1000  # forwards waiting for an upstream at once (each holds a socket)
    reload_interval: float = 0.25
    node: str = field(default_factory=socket.gethostname)
    user: str = ""  # when started as root: bind, then run as this user
    workers: int = 0  # processes serving the same sockets; 0: one per core
    shipped_lists: bool = True
    bypass_canaries: bool = True  # answer the DoH / Private Relay / DDR canaries so clients stay with us
    log_level: str = "info"
    syslog: str = ""  # udp://HOST:PORT, tcp://HOST:PORT or HOST:PORT (UDP): every audit row and chain head, RFC 5424
    syslog_facility: str = "local0"
    json_log: bool = False  # every audit row as a JSON line on stdout (journald under systemd)
    anchor_interval: float = 60.0  # seconds between chain heads sent to syslog (and one at shutdown)
    # RPZ (sinkhole.rpz): the policy as a zone served to secondaries, or pulled from a primary
    rpz_listen: str = ""  # HOST:PORT: serve the zone (SOA, AXFR, IXFR) and take NOTIFY here; "" off
    rpz_zone: str = "rpz.sinkhole."
    rpz_group: str = "default"  # whose policy the served zone holds
    rpz_secondaries: tuple[str, ...] = ("127.0.0.0/8", "::1/128")  # may transfer; others get REFUSED
    rpz_notify: tuple[str, ...] = ()  # HOST:PORT of secondaries to NOTIFY on every change
    rpz_tsig: str = ""  # NAME:ALGORITHM:BASE64SECRET: transfers and NOTIFY must be signed with it
    rpz_refresh: int = 60  # SOA refresh of the served zone; a secondary checks the serial this often
    policy_from: str = ""  # HOST:PORT of a primary: pull its zone into category rpz:<zone>

    def answers(self) -> AnswerConfig:
        return AnswerConfig(mode=self.mode, a=_addr(self.block_a, 4, "block_a"),
                            aaaa=_addr(self.block_aaaa, 6, "block_aaaa"), ttl=self.block_ttl)

    def make_guard(self) -> guard.Guard:
        return guard.Guard(self.allow_clients, self.rate_limit, self.rate_limit_burst, self.rate_limit_net,
                           self.rate_limit_net_burst, self.rate_limit_v4_prefix, self.rate_limit_v6_prefix,
                           self.rate_limit_action, self.rate_limit_exempt)

    def client_prefix(self) -> tuple[int, int] | None:
        """(IPv4 prefix, IPv6 prefix) to which audit rows truncate client addresses; None: whole addresses."""
        text = self.log_client_prefix.strip()
        if not text:
            return None
        v4, _, v6 = text.partition("/")
        try:
            prefix = (int(v4), int(v6 or "128"))
        except ValueError:
            raise ConfigError(f"log_client_prefix: {text!r} is not V4/V6 prefix lengths like 24/56") from None
        if not (0 <= prefix[0] <= 32 and 0 <= prefix[1] <= 128):
            raise ConfigError(f"log_client_prefix: {text!r}: IPv4 prefix 0..32, IPv6 prefix 0..128")
        return prefix

    def make_cache(self) -> Cache:
        return Cache(self.cache_size, self.cache_min_ttl, self.cache_max_ttl, self.cache_negative_max_ttl)

    def upstreams(self) -> list[Upstream]:
        if self.upstream:
            return [parse_upstream(u) for u in self.upstream]
        return system_upstreams()

    def listen_addresses(self) -> list[tuple[str, int]]:
        return [parse_hostport(x, 53) for x in self.listen]


FIELDS = {f.name: f for f in dataclasses.fields(ServeConfig)}


def _addr(text: str, version: int, name: str) -> Any:
    if text.lower() in ("", "none"):
        return None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not an IP address") from None
    if addr.version != version:
        raise ConfigError(f"{name}: {text!r} is not an IPv{version} address")
    return addr


def _coerce(name: str, value: Any, origin: str) -> Any:
    f = FIELDS[name]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
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


def _validate(cfg: ServeConfig) -> ServeConfig:
    if cfg.mode not in AnswerConfig.MODES:
        raise ConfigError(f"mode must be one of {', '.join(AnswerConfig.MODES)}, not {cfg.mode!r}")
    if cfg.log_queries not in LOG_MODES:
        raise ConfigError(f"log_queries must be one of {', '.join(LOG_MODES)}, not {cfg.log_queries!r}")
    if not all(0 < v < 3600 for v in (cfg.timeout, cfg.tcp_idle_timeout, cfg.reload_interval)):
        raise ConfigError("timeouts and intervals must be above zero and below an hour")
    if cfg.audit_synchronous.lower() not in ("off", "normal", "full", "extra"):
        raise ConfigError(f"audit_synchronous must be off, normal, full or extra, not {cfg.audit_synchronous!r}")
    cfg.client_prefix()
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level must be debug, info, warning or error, not {cfg.log_level!r}")
    if cfg.tcp_max_clients < 1 or cfg.max_inflight < 1 or cfg.cache_negative_max_ttl < 0:
        raise ConfigError("tcp_max_clients and max_inflight must be 1 or more, cache_negative_max_ttl 0 or more")
    if cfg.workers < 0:
        raise ConfigError("workers must be 0 (one per core) or more")
    if cfg.cache_size < 0 or not 0 <= cfg.cache_min_ttl <= cfg.cache_max_ttl:
        raise ConfigError("cache_size must be >= 0 and 0 <= cache_min_ttl <= cache_max_ttl")
    if not 0 <= cfg.block_ttl <= 86400:
        raise ConfigError("block_ttl must be from 0 to 86400 seconds")
    if not cfg.listen:
        raise ConfigError("listen: at least one address is needed")
    if cfg.syslog:
        shipping.parse_target(cfg.syslog)
    shipping.facility_code(cfg.syslog_facility)
    if not 0 < cfg.anchor_interval <= 86400:
        raise ConfigError("anchor_interval must be above zero and at most a day (86400 seconds)")
    cfg.answers()
    rpz.check_config(cfg)
    cfg.make_guard()
    cfg.listen_addresses()
    if cfg.upstream:
        cfg.upstreams()
    return cfg


def load(file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
         flags: Mapping[str, Any] | None = None) -> ServeConfig:
    values: dict[str, Any] = {}
    if file is not None:
        path = Path(file)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        data = data.get("server", data)
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in FIELDS:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            values[name] = _coerce(name, value, str(path))
    env = os.environ if env is None else env
    for name in FIELDS:
        var = f"SINKHOLE_{name.upper()}"
        if var in env:
            values[name] = _coerce(name, env[var], var)
    for name, value in (flags or {}).items():
        if value is None:
            continue
        values[name] = _coerce(name, value, "--" + name.replace("_", "-"))
    return _validate(ServeConfig(**values))
