"""Settings turned into running parts: the one place that does it, for `serve`, `config check`, `check`, `export
rpz` and the reload of a running server.

sinkhole.service.config holds values and the checks that need nothing but the values; everything that parses a
setting into a runtime object (an address, an upstream, a TLS context, a TSIG key) or builds one (the guard, the
cache, the forwarder, the audit log, the shipper, the RPZ node, the pipeline) is here. `config check` validates
a file with `check`, which builds what `serve` builds (`parts`) without starting anything: no thread, no socket,
no database is opened (the parts only touch those in their start()).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sinkhole.audit import shipping
from sinkhole.audit.writer import MODES as LOG_MODES
from sinkhole.audit.writer import AuditLog
from sinkhole.dns.answer import AnswerConfig
from sinkhole.dns.cache import Cache
from sinkhole.dns.guard import Guard, Shares
from sinkhole.dns.pipeline import AuditSink, Pipeline
from sinkhole.dns.shortcut import Shortcuts
from sinkhole.dns.upstream import (
    Forwarder,
    Upstream,
    parse_hostport,
    parse_upstream,
    parse_zones,
    system_upstreams,
    tls_context,
)
from sinkhole.errors import ConfigError
from sinkhole.fleet.endpoint import Endpoint
from sinkhole.fleet.node import Node
from sinkhole.fleet.primary import Primary
from sinkhole.fleet.secondary import Secondary
from sinkhole.fleet.zone import parse_tsig, zone_name
from sinkhole.policy import lists
from sinkhole.policy.decide import Policy
from sinkhole.service import config
from sinkhole.service.audit_process import AuditProcess
from sinkhole.service.config import Settings

CHECK_DB = Path(os.devnull)  # the database `check` builds the parts for: never opened


# ---------------------------------------------------------------------------- reading settings


def load_sources(file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                 flags: Mapping[str, Any] | None = None) -> tuple[Settings, dict[str, str]]:
    """The effective settings (defaults < file < env < flags), checked as `serve` uses them, and where each
    came from."""
    cfg, sources = config.read(file, env, flags)
    check(cfg)
    return cfg, sources


def load(file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
         flags: Mapping[str, Any] | None = None) -> Settings:
    return load_sources(file, env, flags)[0]


# ---------------------------------------------------------------------------- one part each


def _address(text: str, version: int, name: str) -> Any:
    if text.lower() in ("", "none"):
        return None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not an IP address") from None
    if addr.version != version:
        raise ConfigError(f"{name}: {text!r} is not an IPv{version} address")
    return addr


def answers(cfg: Settings) -> AnswerConfig:
    """How blocked names are answered. With a block page, blocked A/AAAA answers point at its address (unless
    block_a / block_aaaa are set to something other than their defaults); a family it does not listen on gets
    no data."""
    if cfg.answers.mode not in AnswerConfig.MODES:
        raise ConfigError(f"mode must be one of {', '.join(AnswerConfig.MODES)}, not {cfg.answers.mode!r}")
    a, aaaa = cfg.answers.block_a, cfg.answers.block_aaaa
    pages = blockpage_addresses(cfg)
    if pages:
        if a == config.DEFAULT.answers.block_a:
            a = next((h for h, _ in pages if ":" not in h), "none")
        if aaaa == config.DEFAULT.answers.block_aaaa:
            aaaa = next((h for h, _ in pages if ":" in h), "none")
        for host in (a, aaaa):
            if host in ("0.0.0.0", "::"):
                raise ConfigError("blockpage_listen is a wildcard address: set block_a (and block_aaaa) to the "
                                  "address clients reach the block page at")
    return AnswerConfig(mode=cfg.answers.mode, a=_address(a, 4, "block_a"), aaaa=_address(aaaa, 6, "block_aaaa"),
                        ttl=cfg.answers.block_ttl)


def guard(cfg: Settings) -> Guard:
    c = cfg.clients
    return Guard(c.allow_clients, c.rate_limit, c.rate_limit_burst, c.rate_limit_net, c.rate_limit_net_burst,
                 c.rate_limit_v4_prefix, c.rate_limit_v6_prefix, c.rate_limit_action, c.rate_limit_exempt)


def shares(cfg: Settings) -> Shares:
    return Shares(cfg.upstreams.max_inflight_client_share, cfg.upstreams.max_inflight_network_share)


def cache(cfg: Settings) -> Cache:
    c = cfg.cache
    return Cache(c.cache_size, c.cache_min_ttl, c.cache_max_ttl, c.cache_negative_max_ttl, c.cache_prefetch,
                 c.cache_serve_stale)


def client_prefix(cfg: Settings) -> tuple[int, int] | None:
    """(IPv4 prefix, IPv6 prefix) to which audit rows truncate client addresses; None: whole addresses."""
    text = cfg.audit.log_client_prefix.strip()
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


def ecs_prefix(cfg: Settings) -> tuple[int, int] | None:
    """ecs as (IPv4 prefix, IPv6 prefix) to send upstream, or None: no Client Subnet leaves sinkhole."""
    ecs = cfg.upstreams.ecs
    text = ecs.strip().lower()
    if text == "strip":
        return None
    v4, slash, v6 = text.partition("/")
    try:
        prefix = (int(v4), int(v6))
    except ValueError:
        raise ConfigError(f'ecs: {ecs!r} is neither "strip" nor V4/V6 prefix lengths like 24/56') from None
    if not slash or not (0 < prefix[0] <= 32 and 0 < prefix[1] <= 128):
        raise ConfigError(f"ecs: {ecs!r}: IPv4 prefix 1..32, IPv6 prefix 1..128, as in 24/56")
    return prefix


def upstreams(cfg: Settings) -> list[Upstream]:
    """`upstream`, or the nameservers of /etc/resolv.conf when it is empty (as serve would ask them)."""
    if cfg.upstreams.upstream:
        try:
            return [parse_upstream(u) for u in cfg.upstreams.upstream]
        except ConfigError as exc:
            raise ConfigError(f"upstream: {exc}") from None
    return system_upstreams()


def zones(cfg: Settings) -> dict[str, list[Upstream]]:
    """forward_zones as {zone: upstreams}."""
    table: dict[str, list[str]] = {}
    try:
        for entry in cfg.upstreams.forward_zones:
            zone, eq, urls = entry.partition("=")
            if not eq or not zone.strip():
                raise ConfigError(f"{entry!r}: expected ZONE=UPSTREAM[,UPSTREAM...]")
            if zone.strip() in table:
                raise ConfigError(f"zone {zone.strip()!r} is given twice")
            table[zone.strip()] = [u for u in (x.strip() for x in urls.split(",")) if u]
        return parse_zones(table)
    except ConfigError as exc:
        raise ConfigError(f"forward_zones: {exc}") from None


def forwarder(cfg: Settings) -> Forwarder:
    u = cfg.upstreams
    if u.upstream_ca:  # checked even when no tls:// or https:// upstream would use it yet
        tls_context(u.upstream_ca)
    return Forwarder(upstreams(cfg), u.timeout, u.max_inflight, u.upstream_strategy, u.upstream_ca or None, zones(cfg))


def shipper(cfg: Settings) -> shipping.Shipper | None:
    """The shipper the settings ask for (`syslog`, `syslog_facility`, `json_log`, `anchor_interval`), or None."""
    s = cfg.shipping
    facility = shipping.facility_code(s.syslog_facility)
    sinks: list = []
    out = shipping.Shipper(sinks, node=cfg.audit.node)
    if s.syslog:
        sinks.append(shipping.SyslogSink(out, shipping.parse_target(s.syslog), facility, s.anchor_interval))
    if s.json_log:
        sinks.append(shipping.JsonSink(out))
    return out if sinks else None


def audit_log(cfg: Settings, db: Path, own_process: bool = False) -> AuditLog:
    """The audit log of a serving process; `own_process`: its writer in a process of its own (AuditProcess),
    which builds its log here with the same settings."""
    a = cfg.audit
    if a.log_queries not in LOG_MODES:
        raise ConfigError(f"log_queries must be one of {', '.join(LOG_MODES)}, not {a.log_queries!r}")
    if own_process:
        shipper(cfg)  # its settings checked here, as `config check` does; the child builds its own
        return AuditProcess((cfg, db), audit_log, db, a.node, a.log_queries, client_prefix=client_prefix(cfg),
                            window=a.audit_window)
    return AuditLog(db, a.node, a.log_queries, seed=lists.seed if cfg.policy.shipped_lists else None,
                    synchronous=a.audit_synchronous, client_prefix=client_prefix(cfg), shipper=shipper(cfg),
                    window=a.audit_window)


def pipeline(cfg: Settings, get_policy: Callable[[], Policy], forward: Forwarder, audit: AuditSink,
             kind: type[Pipeline] = Pipeline) -> Pipeline:
    """The query path with its stages' settings (`kind`: a Pipeline that keeps outcomes, for `sinkhole check`)."""
    return kind(get_policy, forward, audit, answers(cfg), guard(cfg), cache(cfg), ecs_prefix(cfg), shares(cfg))


def fleet(cfg: Settings, db: Path) -> Node | None:
    """The RPZ primary and/or secondary the settings ask for (rpz_listen, policy_from), or None."""
    f = cfg.fleet
    origin = zone_name(f.rpz_zone)
    tsig = parse_tsig(f.rpz_tsig)
    secondaries = []
    for network in f.rpz_secondaries:
        try:
            secondaries.append(ipaddress.ip_network(network, strict=False))
        except ValueError:
            raise ConfigError(f"rpz_secondaries: {network!r} is not an address or CIDR network") from None
    notify_to = [parse_hostport(target, 53) for target in f.rpz_notify]
    secondary = primary = endpoint = None
    if f.policy_from:
        host, port = parse_hostport(f.policy_from, 53)
        secondary = Secondary(host, port, f.policy_from, origin, tsig, f.rpz_refresh, db, cfg.policy.shipped_lists)
    if f.rpz_listen:
        primary = Primary(origin, f.rpz_group, secondaries, notify_to, tsig, f.rpz_refresh, answers(cfg))
        endpoint = Endpoint(*rpz_address(cfg), tsig, primary, secondary,  # type: ignore[misc]
                            f.rpz_max_connections, f.rpz_max_per_address, f.rpz_idle_timeout)
    return Node(primary, secondary, endpoint) if primary or secondary else None


def rpz_address(cfg: Settings) -> tuple[str, int] | None:
    """Where rpz_listen is (None: nowhere)."""
    return parse_hostport(cfg.fleet.rpz_listen, 53) if cfg.fleet.rpz_listen else None


def listen_addresses(cfg: Settings) -> list[tuple[str, int]]:
    return [parse_hostport(x, 53) for x in cfg.serving.listen]


def metrics_address(cfg: Settings) -> tuple[str, int] | None:
    return parse_hostport(cfg.process.metrics, config.METRICS_PORT) if cfg.process.metrics.strip() else None


def blockpage_addresses(cfg: Settings) -> list[tuple[str, int]]:
    """Where the block page listens: HOST:PORT each, a bare HOST as HOST:80 and HOST:443."""
    out: list[tuple[str, int]] = []
    for text in cfg.blockpage.blockpage_listen:
        host, port = parse_hostport(text, -1)  # -1: no port given
        out += [(host, 80), (host, 443)] if port == -1 else [(host, port)]
    return list(dict.fromkeys(out))


def web_addresses(cfg: Settings) -> list[tuple[str, int]]:
    """Where the web console listens (a bare HOST: port 8053)."""
    return list(dict.fromkeys(parse_hostport(text, config.WEB_PORT) for text in cfg.web.web_listen))


# ---------------------------------------------------------------------------- what serve builds


@dataclass
class Parts:
    """What one serving process runs (none of it started): Server.__init__ takes them from `parts`."""

    audit: AuditLog
    forwarder: Forwarder
    pipeline: Pipeline
    fleet: Node | None  # RPZ: one per server, so with several workers only worker 0 has one


def parts(cfg: Settings, db: Path, get_policy: Callable[[], Policy], worker: int | None = None) -> Parts:
    writer = cfg.audit.audit_writer
    audit = audit_log(cfg, db, own_process=writer == "process" or (writer == "auto" and worker is not None))
    forward = forwarder(cfg)
    path = pipeline(cfg, get_policy, forward, audit)
    # the fast path (sinkhole.dns.shortcut, sinkhole.dns.fast): the listeners answer the UDP packets the pipeline
    # answered before (blocked answers, cache hits) without it, and tally their audit rows within audit_window
    path.shortcuts = Shortcuts(path, cfg.audit.audit_window)
    return Parts(audit, forward, path, fleet(cfg, db) if not worker else None)


def check(cfg: Settings) -> None:
    """ConfigError unless `serve` could start with `cfg`: the parts it builds, built (nothing started), and the
    addresses it binds parsed (nothing bound). With no `upstream`, /etc/resolv.conf is read as serve reads it."""
    parts(cfg, CHECK_DB, Policy)
    listen_addresses(cfg)
    metrics_address(cfg)
    web_addresses(cfg)
    for name in ("blockpage_logo", "web_cert", "web_key"):
        if cfg.value(name) and not Path(cfg.value(name)).is_file():
            raise ConfigError(f"{name}: {cfg.value(name)}: no such file")
