"""sinkhole serve: the resolver, with whatever else the settings ask for (RPZ, metrics, block page, console)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from sinkhole.cli.common import Env, FiniteFloat, pass_env
from sinkhole.service import build, config, process, systemd
from sinkhole.store.audit import MAX_RETENTION_DAYS
from sinkhole.web.front import Front


@click.command()
@click.option("--listen", multiple=True, metavar="HOST:PORT",
              help="Address to serve UDP and TCP on; repeatable [default 127.0.0.1:5353].")
@click.option("--upstream", multiple=True, metavar="URL",
              help="Resolver to forward to: HOST[:PORT], udp://, tcp://, tls://HOST[:853][#NAME] or "
                   "https://HOST/dns-query; in order of preference; repeatable [default: /etc/resolv.conf].")
@click.option("--upstream-strategy", type=click.Choice(["failover", "fastest", "parallel"]), default=None,
              help="failover: in order; fastest: lowest measured latency; parallel: the two best at once [failover].")
@click.option("--upstream-ca", default=None, metavar="PEM",
              help="CA bundle that tls:// and https:// upstreams must chain to [the system's CAs].")
@click.option("--forward-zone", "forward_zones", multiple=True, metavar="ZONE=URL[,URL]",
              help="Names at or under ZONE go to these upstreams (most specific zone wins); repeatable.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              envvar="SINKHOLE_CONFIG", help="TOML file with settings (flags and SINKHOLE_* override it) "
                                             "[default: /etc/sinkhole/sinkhole.toml if it exists]. "
                                             "sinkhole reload (or SIGHUP) reads it again.")
@click.option("--mode", type=click.Choice(["sinkhole", "nxdomain"]), default=None,
              help="Answer blocked names with the sinkhole address (A/AAAA; NODATA otherwise) or NXDOMAIN.")
@click.option("--block-a", default=None, metavar="IPV4|none", help="Address for blocked A queries [0.0.0.0].")
@click.option("--block-aaaa", default=None, metavar="IPV6|none", help="Address for blocked AAAA queries [::].")
@click.option("--block-ttl", type=int, default=None, help="TTL of sinkhole answers in seconds [60].")
@click.option("--timeout", type=float, default=None, help="Seconds until SERVFAIL when no upstream answers [2].")
@click.option("--ecs", default=None, metavar="strip|V4/V6",
              help="EDNS Client Subnet sent upstream: none (strip), or each client's network of these prefix "
                   "lengths, e.g. 24/56, with answers cached per network [strip].")
@click.option("--log-queries", type=click.Choice(["blocked", "all", "none"]), default=None,
              help="Which queries the audit log keeps [blocked].")
@click.option("--log-client-prefix", default=None, metavar="V4/V6",
              help="Privacy: audit rows keep each client's network of these prefix lengths (e.g. 24/56), "
                   "not its address [whole addresses].")
@click.option("--audit-synchronous", type=click.Choice(["off", "normal", "full", "extra"]), default=None,
              help="SQLite synchronous level of the audit log: full loses no committed row on a power cut [normal].")
@click.option("--audit-window", type=FiniteFloat(min=0, max=config.MAX_AUDIT_WINDOW), default=None, metavar="SECONDS",
              help="Identical answers (client, name, type, action, rule, group, transport) within this long of the "
                   "first are one audit row with a count [1; 0: a row per answer].")
@click.option("--audit-writer", type=click.Choice(config.AUDIT_WRITERS), default=None,
              help="Where each worker's audit writer runs: a process of its own, or a thread in the worker; auto: "
                   "a process when there are workers, a thread in a server on its own [auto].")
@click.option("--node", default=None, help="Node name written in every audit row [host name].")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Processes serving the same sockets [0: one per core].")
@click.option("--user", default=None, metavar="NAME",
              help="Started as root: bind the ports, then run as this user (e.g. to serve port 53).")
@click.option("--shipped-lists/--no-shipped-lists", default=None,
              help="Load the shipped lists into a new database [yes].")
@click.option("--cache-prefetch/--no-cache-prefetch", default=None,
              help="Refresh popular cache entries before they expire (a hit in the last tenth of the TTL) [no].")
@click.option("--cache-serve-stale", type=FiniteFloat(min=0), default=None, metavar="SECONDS",
              help="When no upstream answers, answer from a cache entry that expired less than this long ago "
                   "(RFC 8767: TTL 30 s, EDE 3) [0: never].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
@click.option("--syslog", default=None, metavar="[udp://|tcp://]HOST:PORT",
              help="Ship every audit row and the chain heads to this syslog collector (RFC 5424; UDP unless tcp://).")
@click.option("--syslog-facility", default=None, metavar="NAME", help="Syslog facility of those messages [local0].")
@click.option("--json-log/--no-json-log", default=None,
              help="Write every audit row as a JSON line on stdout (journald under systemd) [no].")
@click.option("--anchor-interval", type=float, default=None, metavar="SECONDS",
              help="Seconds between chain heads sent to syslog; one is sent at shutdown too [60].")
@click.option("--retention-days", type=click.IntRange(min=0, max=MAX_RETENTION_DAYS), default=None,
              help="Prune audit rows older than this, hourly, leaving checkpoints [365; 0: keep forever].")
@click.option("--metrics", default=None, metavar="HOST:PORT",
              help="Serve Prometheus /metrics and /healthz here, e.g. 127.0.0.1:9153 [off].")
@click.option("--rpz-listen", default=None, metavar="HOST:PORT",
              help="Serve the policy as an RPZ zone here (SOA, AXFR, IXFR over TCP; NOTIFY in) [off].")
@click.option("--policy-from", default=None, metavar="HOST:PORT",
              help="Run as a secondary: pull the RPZ zone from this primary into category rpz:ZONE [off].")
@click.option("--blockpage-listen", multiple=True, metavar="HOST[:PORT]",
              help="Serve the block page here (HTTP and HTTPS on each port; a bare HOST: ports 80 and 443); "
                   "blocked A/AAAA answers then point at it; repeatable [off].")
@click.option("--web-listen", multiple=True, metavar="HOST[:PORT]",
              help="Serve the web console here (a bare HOST: port 8053; plain HTTP on loopback only, else HTTPS); "
                   "accounts from `sinkhole user add`; repeatable [off].")
@pass_env
def serve(env: Env, config_file: Path | None, **flags: Any) -> None:
    """Serve DNS: sinkhole listed names, forward the rest, audit every block.

    sinkhole reload (or SIGHUP) reads the configuration again and applies what can change at run time."""
    config_file = config_file or config.default_file()
    # a repeatable option given no value comes as (): not set, rather than set to nothing
    given = {k: (None if v == () else v) for k, v in flags.items()}
    cfg = build.load(config_file, flags=given)
    env.checked_path()
    # under systemd, each line carries its priority into the journal (journalctl -p warning)
    logging.basicConfig(level=cfg.process.log_level.upper(), handlers=[systemd.log_handler(sys.stderr)])
    sys.exit(process.run(cfg, env.db_path, reload=lambda: build.load(config_file, flags=given), front=Front()))
