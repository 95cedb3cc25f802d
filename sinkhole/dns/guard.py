"""Who may ask, and how fast: the client ACL and per-client / per-network token buckets."""

from __future__ import annotations

import enum
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable

from sinkhole import logthrottle
from sinkhole.errors import ConfigError
from sinkhole.policy.names import client_address

log = logging.getLogger(__name__)

_CACHE_MAX = 65536
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Admission(enum.Enum):
    """What the guard says of one packet: answer it, refuse it, or limit it."""

    OK = "ok"
    REFUSED = "refused"  # not an allowed client, or over the limit with action "refuse"
    LIMITED = "limited"  # over the limit over UDP with action "truncate": answer TC=1 to push it to TCP


def parse_networks(items: Iterable[str], setting: str) -> tuple[Network, ...]:
    nets = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{setting}: {item!r} is not an IP network (CIDR)") from None
    return tuple(nets)


class _Buckets:
    """Token buckets keyed by address or prefix; idle full buckets are forgotten."""

    __slots__ = ("burst", "last_sweep", "rate", "state")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.state: dict[object, list[float]] = {}
        self.last_sweep = now

    def take(self, key: object, now: float) -> bool:
        st = self.state.get(key)
        if st is None:
            self.state[key] = [self.burst - 1.0, now]
            return True
        tokens = min(self.burst, st[0] + (now - st[1]) * self.rate)
        st[1] = now
        if tokens >= 1.0:
            st[0] = tokens - 1.0
            return True
        st[0] = tokens
        return False

    def wait(self, key: object, now: float) -> float:
        """Seconds until the bucket of `key` holds a whole token again (0: it does now)."""
        st = self.state.get(key)
        if st is None or not self.rate:
            return 0.0
        tokens = min(self.burst, st[0] + (now - st[1]) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def sweep(self, now: float) -> None:
        if now - self.last_sweep < 10.0:
            return
        self.last_sweep = now
        full = (self.burst - 1.0) / self.rate if self.rate else 0.0
        self.state = {k: v for k, v in self.state.items() if now - v[1] < full}


class Guard:
    def __init__(self, allow_clients: Iterable[str], rate_limit: float = 200.0,
                 rate_limit_burst: float = 400.0, net_rate_limit: float = 2000.0, net_rate_limit_burst: float = 4000.0,
                 v4_prefix: int = 24, v6_prefix: int = 56, action: str = "truncate",
                 exempt: Iterable[str] = (), clock: Callable[[], float] = time.monotonic) -> None:
        """`allow_clients` and `exempt`: networks (their defaults are the settings', service.config); `clock`: the
        seconds the token buckets fill by (a test's may be moved by hand)."""
        self.clock = clock
        if action not in ("truncate", "refuse"):
            raise ConfigError(f"rate_limit_action must be truncate or refuse, not {action!r}")
        if not (0 <= v4_prefix <= 32 and 0 <= v6_prefix <= 128):
            raise ConfigError("rate_limit prefixes must be 0-32 (IPv4) and 0-128 (IPv6)")
        self.allow = parse_networks(allow_clients, "allow_clients")
        self.exempt = parse_networks(exempt, "rate_limit_exempt")
        self.client = _Buckets(rate_limit, rate_limit_burst, clock()) if rate_limit > 0 else None
        self.network = _Buckets(net_rate_limit, net_rate_limit_burst, clock()) if net_rate_limit > 0 else None
        self.v4_prefix = v4_prefix
        self.v6_prefix = v6_prefix
        self.action = action
        # client address text -> (allowed, exempt, network key), so each address is parsed once
        self._known: dict[str, tuple[bool, bool, object]] = {}
        self.refused = 0
        self.limited = 0

    def _classify(self, client: str) -> tuple[bool, bool, object]:
        known = self._known.get(client)
        if known is not None:
            return known
        addr = client_address(client)
        if addr is None:
            info: tuple[bool, bool, object] = (False, False, client)
        else:
            prefix = self.v4_prefix if addr.version == 4 else self.v6_prefix
            # the network as text ("10.20.3.0/24"): a key whose hash Python keeps, where an IPv4Network's is
            # computed in Python at every dict lookup (the rate limits' buckets and the forwards' shares)
            net = str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))
            info = (any(addr in n for n in self.allow), any(addr in n for n in self.exempt), net)
        if len(self._known) >= _CACHE_MAX:
            self._known.clear()
        self._known[client] = info
        return info

    def allows(self, client: str) -> bool:
        """`client` is in allow_clients (checked at TCP accept: a refused address never holds a connection)."""
        return self._classify(client)[0]

    def check(self, client: str, proto: str) -> Admission:
        """OK, or REFUSED / LIMITED. Over UDP a client takes from its address's and its network's buckets; over
        TCP too, from buckets of its own at the same rates (TCP cannot be spoofed: with action truncate, a client
        over its UDP limit is still answered over TCP, at up to the same rate again); action refuse shares one
        set of buckets between UDP and TCP. Over the limit over TCP is REFUSED (TC=1 means nothing there)."""
        allowed, exempt, net = self._classify(client)
        if not allowed:
            self.refused += 1
            logthrottle.warning(log, "refused queries from %s: not in allow_clients", client)
            return Admission.REFUSED
        if exempt:
            return Admission.OK
        now = self.clock()
        ok = True
        separate = proto != "udp" and self.action == "truncate"
        if self.client is not None:
            ok = self.client.take(("tcp", client) if separate else client, now)
            self.client.sweep(now)
        if ok and self.network is not None:
            ok = self.network.take(("tcp", net) if separate else net, now)
            self.network.sweep(now)
        if ok:
            return Admission.OK
        logthrottle.warning(log, "rate limit: %s (or its network %s) is over the limit over %s", client, net,
                            proto.upper())
        if self.action == "refuse" or proto != "udp":
            self.refused += 1
            return Admission.REFUSED
        self.limited += 1
        return Admission.LIMITED

    def tcp_wait(self, client: str) -> float:
        """Seconds until a TCP query of `client` would be within its rate limits again: the connection is not
        read from meanwhile, so that a client pipelining over its limit costs nothing but its own wait (TCP
        flow control slows it down) rather than a REFUSED answer per query."""
        allowed, exempt, net = self._classify(client)
        if exempt or not allowed:
            return 0.0
        now = self.clock()
        separate = self.action == "truncate"
        wait = self.client.wait(("tcp", client) if separate else client, now) if self.client is not None else 0.0
        if self.network is not None:
            wait = max(wait, self.network.wait(("tcp", net) if separate else net, now))
        return wait

    def network_of(self, client: str) -> object:
        """The rate limits' network of `client` (its /24 or /56), as a key."""
        return self._classify(client)[2]


class Shares:
    """Forwards waiting for an upstream, per client address and per client network: one client (or one /24,
    /56) holds at most a share of `max_inflight`, so that its unanswerable names cannot take every slot."""

    def __init__(self, client_share: float = 0.1, network_share: float = 0.5) -> None:
        self.client_share = client_share
        self.network_share = network_share
        self.held: dict[object, int] = {}

    def take(self, client: str, network: object, max_inflight: int) -> tuple[str, object] | None:
        """A place for one more forward of `client`: a token for give_back, or None when it (or its network)
        holds its share already."""
        held = self.held
        if held.get(client, 0) >= max(1, int(max_inflight * self.client_share)):
            return None
        if held.get(network, 0) >= max(1, int(max_inflight * self.network_share)):
            return None
        held[client] = held.get(client, 0) + 1
        held[network] = held.get(network, 0) + 1
        return client, network

    def give_back(self, token: tuple[str, object]) -> None:
        for key in token:
            left = self.held[key] - 1
            if left:
                self.held[key] = left
            else:
                del self.held[key]
