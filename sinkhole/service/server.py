"""One serving process: the parts wired together on sockets bound for it (service.process binds them), the
policy reloaded when the database changes, reloads of the settings, and a shutdown that drains and flushes.

The process runs as a server on its own (`worker` None: it speaks to systemd, serves `sinkhole reload`, /metrics
and the console) or as a worker of a supervisor (service.workers), which does those for every worker.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sinkhole import logthrottle
from sinkhole.audit.retention import Pruner
from sinkhole.dns.answer import AnswerConfig
from sinkhole.dns.guard import Guard
from sinkhole.dns.listener import Bound as DnsSockets
from sinkhole.dns.listener import Listener, _Tasks
from sinkhole.dns.upstream import Upstream
from sinkhole.policy.decide import Policy
from sinkhole.service import build, config, control, heap, metrics, systemd
from sinkhole.service.config import Settings
from sinkhole.store.db import Store, open_store
from sinkhole.store.journal import Actor
from sinkhole.store.schema import iso

try:
    import uvloop
except ImportError:  # an optional dependency (pyproject: not on Windows): asyncio's own loop then
    uvloop = None

log = logging.getLogger(__name__)


@dataclass
class Bound:
    """The sockets a server serves, bound by service.process before root was dropped."""

    dns: list[DnsSockets]  # (host, port, udp, tcp) per listen address
    from_systemd: bool = False  # socket activation: the DNS sockets are systemd's
    rpz: tuple[socket.socket, socket.socket] | None = None  # rpz_listen's (udp, tcp)
    blockpage: list[socket.socket] = field(default_factory=list)  # blockpage_listen's
    web: list[socket.socket] = field(default_factory=list)  # web_listen's

    def close(self) -> None:
        for _, _, udp, tcp in self.dns:
            for sock in (udp, tcp):
                if sock is not None:
                    sock.close()
        for sock in [*(self.rpz or ()), *self.blockpage, *self.web]:
            sock.close()


class Running(Protocol):
    def stop(self) -> None: ...


class Front(Protocol):
    """The block page and the console, as the web layer hands them over (sinkhole.web.front.Front): the service
    runs them without importing them."""

    def console_tls(self, settings: Settings, db: Path) -> Any: ...

    def blockpage(self, settings: Settings, db: Path, get_policy: Callable[[], Policy], audit: Any,
                  sockets: list[socket.socket]) -> Running: ...

    def console(self, settings: Settings, db: Path, sockets: list[socket.socket], tls: Any,
                live: Callable[[], list[dict]], health: Callable[[], list[str]]) -> Running: ...


def _give_back_memory() -> None:
    """After a large policy is replaced: return the freed heap to the system (glibc malloc_trim),
    so that RSS after a reload of a million rules is that of one policy, not two."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PolicyReloader(threading.Thread):
    """Polls the change journal; a new policy version is loaded off the event loop and swapped in whole."""

    def __init__(self, server: Server, db: Path, interval: float) -> None:
        super().__init__(name="policy-reloader", daemon=True)
        self.server = server
        self.db = db
        self.interval = interval
        self.stopping = threading.Event()

    def run(self) -> None:
        store: Store | None = None
        replaced = False
        try:
            while not self.stopping.wait(self.interval):
                try:
                    if store is not None and store.replaced():  # rules added from now on go to the new file
                        log.warning("the database at %s was replaced: reading the policy from the new one", self.db)
                        store.close()
                        store, replaced = None, True
                    if store is None:
                        # as any first opener of a new file does: it may be us, and then it must be seeded
                        store = open_store(self.db, self.server.cfg.policy.shipped_lists)
                        if replaced:
                            self.server.load_policy(store)
                            replaced = False
                            continue
                    if self.server.worker in (None, 0):  # one sweeper: the single server or worker 0
                        expire_due_rules(store)
                    version = store.policy_version()
                    if version != self.server.policy.version:
                        self.server.load_policy(store, incremental=True)
                except Exception as exc:  # a locked, broken or vanished database must not stop DNS or this thread
                    log.warning("policy reload failed, keeping version %d: %s", self.server.policy.version, exc)
        finally:
            if store is not None:
                store.close()


def expire_due_rules(store: Store) -> None:
    """Rules whose expiry has passed (`allow add --expires`) are removed, journaled as `allow expire`: the
    change reaches every worker, and RPZ secondaries, as any removal does."""
    now = iso(time.time())
    due = store.next_expiry()
    if due is None or due > now:
        return
    gone = store.expire_rules(now, Actor(command="sinkhole serve: rules past their expiry"))
    for kind, category, domain in gone:
        log.info("%s rule %s (category %s) expired", kind, domain, category)


class Server:
    def __init__(self, cfg: Settings, db: str | Path, bound: Bound, *, worker: int | None = None,
                 reload: Callable[[], Settings] | None = None, front: Front | None = None,
                 web_tls: Any = None) -> None:
        """`bound`: the sockets to serve (a worker is given the DNS sockets, and worker 0 also rpz_listen's and
        the block page's); `reload` reads the configuration again (file < env < flags), raising ConfigError;
        `front` runs the block page and (on its own) the console, with `web_tls` (Front.console_tls)."""
        self.reload = reload
        self.policy_loaded = False
        self.exporter: metrics.Exporter | None = None
        self.bound = bound
        self.front = front
        self.web_tls = web_tls
        self.blockpage: Running | None = None  # the block page, when blockpage_listen is set
        self.console: Running | None = None  # the web console (a server on its own; else the supervisor's)
        self.worker = worker
        self.cfg = cfg
        self.db = Path(db)
        self.policy = Policy()
        self.listeners: list[Listener] = []
        self.tasks = _Tasks()
        self._stop = asyncio.Event()
        parts = build.parts(cfg, self.db, lambda: self.policy, worker)  # what `config check` builds too
        self.audit, self.forwarder, self.pipeline = parts.audit, parts.forwarder, parts.pipeline
        self.rpz = parts.fleet  # RPZ primary/secondary: one per server, so with several workers worker 0's
        self.reloader: PolicyReloader | None = None
        self.pruner: Pruner | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.control: control.ControlSocket | None = None  # `sinkhole reload` (a server on its own)
        self._control_server: asyncio.AbstractServer | None = None
        self._housekeeping: asyncio.Task[None] | None = None

    def load_policy(self, store: Store, incremental: bool = False) -> None:
        """The policy in the database, in force. `incremental`: when the journal entries since the policy in
        force only add or remove named rules, patch it (a copy of the name table, the touched names read
        again) instead of reading every rule: a `block add` on a million rules takes milliseconds."""
        started = time.perf_counter()
        policy = how = None
        if incremental and self.policy_loaded:
            policy = store.patch_policy(self.policy)
            how = "patched"
        if policy is None:
            policy, how = store.load_policy(self.cfg.policy.bypass_canaries), "loaded"
        old, self.policy = self.policy, policy  # one assignment: every query sees the old or the new policy
        self.policy_loaded = True
        if how == "loaded" and max(old.blocks + old.allows, policy.blocks + policy.allows) > 10_000:
            del old  # and the lists read to build the new one: give the heap they leave back to the system
            _give_back_memory()
        log.info("policy version %d in force: %d block and %d allow rules, %d client groups (%s in %.0f ms)",
                 policy.version, policy.blocks, policy.allows, len(policy.groups), how,
                 (time.perf_counter() - started) * 1000)
        if self.rpz is not None:  # a new zone serial and NOTIFY, from the same thread (never the event loop)
            self.rpz.policy_changed(store)

    @property
    def addresses(self) -> list[str]:
        return [str(x) for x in self.listeners]

    async def start(self) -> None:
        """Load the policy, then serve the bound sockets.

        Nothing is answered before the policy is in force: a query that arrives early waits
        in the socket's queue rather than being forwarded under an empty policy.
        """
        # first: a worker's audit writer process (audit_writer) is forked while the worker has one thread
        self.audit.start()
        store = open_store(self.db, self.cfg.policy.shipped_lists)
        try:
            self.load_policy(store)
        finally:
            store.close()
        serving = self.cfg.serving
        for host, port, udp, tcp in self.bound.dns:
            listener = Listener(host, port, udp, tcp)
            await listener.start(self.pipeline, self.tasks, serving.tcp_idle_timeout, serving.tcp_max_clients,
                                 serving.tcp_max_per_client)
            self.listeners.append(listener)
            if self.worker is None:  # a supervisor says it for its workers
                log.info("listening on %s %s%s", listener.transports, listener,
                         " (from systemd)" if self.bound.from_systemd else "")
        if self.rpz is not None:
            await self.rpz.start(self.bound.rpz)
        if self.bound.blockpage and self.front is not None:
            self.blockpage = self.front.blockpage(self.cfg, self.db, lambda: self.policy, self.audit,
                                                  self.bound.blockpage)
        if self.bound.web and self.front is not None:
            self.console = self.front.console(self.cfg, self.db, self.bound.web, self.web_tls,
                                              lambda: [metrics.snapshot(self)], lambda: metrics.problems(self))
        self._housekeeping = asyncio.get_running_loop().create_task(self._keep_house())
        self.reloader = PolicyReloader(self, self.db, self.cfg.policy.reload_interval)
        self.reloader.start()
        if self.cfg.audit.retention_days and self.worker in (None, 0):  # one pruner, not one per worker
            audit = self.cfg.audit
            self.pruner = Pruner(self.db, audit.node, audit.retention_days, audit.prune_interval)
            self.pruner.start()
        if self.worker is not None:
            return
        address = build.metrics_address(self.cfg)
        if address is not None:
            self.exporter = metrics.for_server(self, address)
        self.control = control.listen(self.db)
        if self.control is not None:
            self._control_server = await asyncio.start_unix_server(self._on_control, sock=self.control.sock)
        log.info("forwarding to %s; audit log %s in %s", ", ".join(map(str, self.forwarder.upstreams)),
                 self.cfg.audit.log_queries, self.db)
        systemd.notify("READY=1\nSTATUS=serving on " + ", ".join(self.addresses))
        interval = systemd.watchdog_interval()
        if interval:
            self._watchdog = asyncio.get_running_loop().create_task(self._ping_watchdog(interval))

    async def _ping_watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from the event loop itself: a stuck loop stops the pings and systemd restarts us."""
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _keep_house(self) -> None:
        """Once a second: say how many warnings the log held back (sinkhole.logthrottle)."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            logthrottle.flush()

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """A stop was asked for (SIGTERM, SIGINT, the supervisor gone): draining, or about to."""
        return self._stop.is_set()

    async def _on_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One `sinkhole reload`: the settings are read after its request came in; the answer says how it went."""
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            if line == control.REQUEST:
                writer.write(self.reload_announced("sinkhole reload").to_line())
                await writer.drain()
        except (OSError, TimeoutError, ValueError):
            pass  # the client went away: the reload, if any, is done all the same
        finally:
            writer.close()

    def reload_announced(self, why: str = "SIGHUP") -> control.Outcome:
        """A reload of a server on its own (SIGHUP or `sinkhole reload`), told to systemd as RELOADING=1 ...
        READY=1, so that `systemctl status` shows it and Type=notify-reload would wait for it."""
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            return self.reload_config(why=why)
        finally:
            systemd.notify("READY=1")

    def reload_config(self, new: Settings | None = None, why: str = "SIGHUP") -> control.Outcome:
        """Read the configuration again (or take `new`, read once by the supervisor for every worker) and apply
        what can change at run time; a bad one is refused with the reason and the running settings stay.
        `why` (SIGHUP, sinkhole reload) goes into the change journal."""
        who = "" if self.worker is None else f"worker {self.worker}: "
        if new is None:
            if self.reload is None:
                log.warning("%s%s: no configuration to read again", who, why, extra=logthrottle.ALWAYS)
                return control.Outcome(refused="this server has no configuration to read again")
            try:
                new = self.reload()
            except Exception as exc:  # whatever is wrong with the new file, the running settings stay
                log.error("%sconfig reload refused, the running settings stay: %s", who, exc, extra=logthrottle.ALWAYS)
                return control.Outcome(refused=str(exc))
        try:
            applied, restart = self.apply_config(new, who)
        except Exception as exc:
            log.error("%sconfig reload refused, the running settings stay: %s", who, exc, extra=logthrottle.ALWAYS)
            return control.Outcome(refused=str(exc))
        values = {k: config.to_toml(self.cfg.value(k)) for k in applied}
        if applied and not self.worker:  # one journal entry per reload: the single server or worker 0
            threading.Thread(target=self._journal_settings, args=(values, why), name="settings-journal",
                             daemon=True).start()
        return control.Outcome(applied=[f"{k} = {v}" for k, v in values.items()], restart=restart)

    def _journal_settings(self, values: dict[str, str], why: str) -> None:
        """Settings applied by a reload go into the change journal like any policy change (who: the server's
        account; command: what asked for the reload)."""
        try:
            store = open_store(self.db, self.cfg.policy.shipped_lists)
            try:
                store.journal_settings(values, Actor(command=f"{why}: sinkhole serve read its configuration again"))
            finally:
                store.close()
        except Exception as exc:  # the settings are applied whatever; the journal entry is what is missing
            log.warning("settings reload could not be journaled: %s", exc)

    def apply_config(self, new: Settings, who: str = "") -> tuple[list[str], list[str]]:
        """Apply the settings of `new` that can change at run time (config.RELOADABLE); returns
        (applied, needing a restart). Raises (and changes nothing) when they cannot be used."""
        plan = plan_reload(self.cfg, new)
        running, applied, restart = plan.running, plan.applied, plan.restart
        changed = set(applied)
        answers, guard, upstreams = plan.answers, plan.guard, plan.upstreams
        self.cfg = running
        self.audit.mode = running.audit.log_queries
        logging.getLogger().setLevel(running.process.log_level.upper())
        if "log_repeat_interval" in changed:
            logthrottle.set_interval(running.process.log_repeat_interval)
        if changed & ANSWER_SETTINGS:
            self.pipeline.set_answers(answers)
        if guard is not None:
            self.pipeline.guard = guard
        if upstreams is not None:
            self.forwarder.set_upstreams(upstreams)
        self.forwarder.timeout = running.upstreams.timeout
        self.forwarder.max_inflight = running.upstreams.max_inflight
        self.pipeline.shares.client_share = running.upstreams.max_inflight_client_share
        self.pipeline.shares.network_share = running.upstreams.max_inflight_network_share
        cache = self.pipeline.cache
        cache.max_entries, cache.min_ttl = running.cache.cache_size, running.cache.cache_min_ttl
        cache.max_ttl, cache.negative_max_ttl = running.cache.cache_max_ttl, running.cache.cache_negative_max_ttl
        cache.serve_stale = running.cache.cache_serve_stale
        if self.reloader is not None:
            self.reloader.interval = running.policy.reload_interval
        log.info("%sconfig reloaded: %s%s", who,
                 f"applied {', '.join(f'{k} = {config.to_toml(running.value(k))}' for k in applied)}"
                 if applied else "no change to apply",
                 f"; needs a restart: {', '.join(restart)}" if restart else "")
        return applied, restart

    async def wait(self) -> None:
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, answer what is in hand, flush the audit log."""
        if self.worker is None:
            systemd.notify("STOPPING=1")
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._control_server is not None:  # a reload asked for from now on finds nobody: we are stopping
            self._control_server.close()
        if self.control is not None:
            self.control.close()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        for listener in self.listeners:
            listener.stop_tcp()
        if self.rpz is not None:
            await self.rpz.stop()
        if self.blockpage is not None:  # before the audit log closes: its last page views are written
            await asyncio.get_running_loop().run_in_executor(None, self.blockpage.stop)
        if self.console is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.console.stop)
        # answer the datagrams already queued in the kernel: keep reading until a quiet moment
        deadline = time.monotonic() + 1.0
        last = -1
        while time.monotonic() < deadline:
            seen = sum(self.pipeline.counts.values())
            if seen == last:
                break
            last = seen
            await asyncio.sleep(0.05)
        for listener in self.listeners:
            listener.stop_udp()
        if self.tasks.tasks:
            await asyncio.wait(set(self.tasks.tasks), timeout=self.cfg.upstreams.timeout + 1.0)
        for listener in self.listeners:
            listener.close()
        await self.forwarder.aclose()
        if self.reloader is not None:
            self.reloader.stopping.set()
            self.reloader.join(5)
        if self.pruner is not None:  # between batches it stops at once; a batch in hand is finished first
            self.pruner.stopping.set()
        await asyncio.get_running_loop().run_in_executor(None, self.audit.close)
        if self.exporter is not None:
            self.exporter.close()
        a = self.audit
        log.info("%sstopped: %s; audit answers written %d in %d rows, dropped %d (queue full %d, unwritable %d; "
                 "%d gap rows, %d failed batches, %d reopened)",
                 "" if self.worker is None else f"worker {self.worker} ",
                 ", ".join(f"{k} {v}" for k, v in sorted(self.pipeline.counts.items())) or "no queries",
                 a.written, a.rows_written, a.dropped, a.queue_dropped, a.write_dropped, a.gaps, a.failed_batches,
                 a.reopened)
        logthrottle.flush(final=True)  # what the log held back is said before the process ends


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload changes, built (and so checked) before anything is changed."""

    running: Settings  # the running settings with every reloadable change of the new ones
    applied: list[str]  # the reloadable settings that changed
    restart: list[str]  # the settings that changed but need a restart
    answers: AnswerConfig
    guard: Guard | None  # a new guard when a guard setting changed
    upstreams: list[Upstream] | None  # new upstreams when `upstream` changed


def plan_reload(running: Settings, new: Settings) -> ReloadPlan:
    """The reload of `running` to `new`; raises when a new setting cannot be used (e.g. a bad upstream URL).
    The supervisor calls it to check the settings once before its workers apply them."""
    cfg, applied, restart = config.reload_plan(running, new)
    changed = set(applied)
    return ReloadPlan(cfg, applied, restart, build.answers(cfg), build.guard(cfg) if changed & GUARD_SETTINGS else None,
                      build.upstreams(cfg) if "upstream" in changed else None)


HOUSEKEEPING_INTERVAL = 1.0  # seconds
GUARD_SETTINGS = config.keys_of(config.ClientSettings)  # a change of any of these makes a new guard
ANSWER_SETTINGS = config.keys_of(config.AnswerSettings)


def run_loop(main: Callable[[], Awaitable[None]]) -> None:
    """Run `main()` on uvloop's event loop when it is installed (several times the queries per CPU-second of
    asyncio's own), else on asyncio's."""
    if uvloop is not None:
        uvloop.run(main())
    else:
        asyncio.run(main())


async def serve(server: Server, early: Callable[[], bool] = lambda: False,
                after_start: Callable[[Server], Awaitable[None]] | None = None,
                after_stop: Callable[[Server], Awaitable[None]] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain and flush; SIGHUP reloads a server on its own (a worker's reloads
    come from its supervisor). `early()`: a stop was asked for before the loop handled signals; `after_start` and
    `after_stop`: what a worker does around serving (its pipes to the supervisor)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    if server.worker is None:
        loop.add_signal_handler(signal.SIGHUP, server.reload_announced)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})  # a worker holds them until now
    if early():
        server.request_stop()
    await server.start()
    heap.settle()  # as soon as it serves: what start-up built is never walked by the garbage collector again
    if after_start is not None:
        await after_start(server)
    await server.wait()
    if after_stop is not None:
        await after_stop(server)
