"""Prometheus metrics and a health check over HTTP (`metrics = "HOST:PORT"`, off by default).

The hot path pays no prometheus-client call: the pipeline, forwarder, cache and audit log keep
plain counters (ints in dicts), and a custom collector reads them when Prometheus scrapes.

Each process turns its counters into a *snapshot*: a small JSON-able dict. With one process the
exporter takes a snapshot of its own server at each scrape. With several workers the supervisor
serves HTTP alone: every worker sends it a snapshot over the pipe it already has (every
SNAPSHOT_INTERVAL seconds, and a last one when it stops), and a scrape adds up the latest
snapshot of every worker plus the counters of workers that exited (so counters never go back
when a worker is replaced). A scrape is thus at most SNAPSHOT_INTERVAL seconds behind in that
mode; the queries a crashed worker answered after its last snapshot are missing from the sums.

`/healthz` answers 200 "ok" when the policy is loaded, the listeners are up and the audit writer
is alive in every process; otherwise 503 with the reasons, one a line.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from sinkhole.dns import codec
from sinkhole.dns.upstream import LATENCY_BUCKETS
from sinkhole.service import heap

log = logging.getLogger(__name__)

SNAPSHOT_INTERVAL = 0.5  # seconds between two snapshots a worker sends to the supervisor
STALE_AFTER = 5.0  # seconds without a snapshot after which a worker counts as unhealthy
Snapshot = dict[str, Any]


# ---------------------------------------------------------------------------- one process


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _collector() -> dict[str, int]:
    """The garbage collector's objects frozen (a gauge) and collections per generation (counters): heap.state."""
    state = heap.state()
    young, middle, full = state["collections"]
    return {"gc_frozen": state["frozen"], "gc_young": young, "gc_middle": middle, "gc_full": full}


def problems(server: Any) -> list[str]:
    """Why this server is not healthy; empty when it is."""
    out = []
    if not server.policy_loaded:
        out.append("policy not loaded")
    if not server.listeners or server.stopping:
        out.append("listeners not up" if not server.listeners else "stopping")
    if not server.audit.writer_alive:
        out.append("audit writer not running")
    return out


def snapshot(server: Any) -> Snapshot:
    """The counters of one server process, as plain data. Called from the scrape thread (or a worker's
    event loop): the dicts are copied first (one C call under the GIL, safe while the loop writes)."""
    p, fw, a, policy = server.pipeline, server.forwarder, server.audit, server.policy
    detail = p.detail.copy()
    counts = p.counts.copy()
    latency = fw.latency.copy()
    sums = fw.latency_sum.copy()
    failures = fw.failures.copy()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "queries": [[action, qtype, transport, group or "", n] for (action, qtype, transport, group), n
                    in detail.items()],
        "dropped_packets": counts.get("dropped", 0),
        "upstreams": {str(u): {"buckets": list(latency.get(u) or ()), "sum": sums.get(u, 0.0),
                               "failures": failures.get(u, 0)} for u in set(latency) | set(failures)},
        "inflight": fw.inflight,
        "cache": {"hits": p.cache.hits, "misses": p.cache.misses, "entries": len(p.cache)},
        "audit": {"queue": a.queue_depth, "written": a.written, "rows": a.rows_written,
                  "queue_dropped": a.queue_dropped, "write_dropped": a.write_dropped, "gaps": a.gaps},
        "policy": {"version": policy.version, "blocks": policy.blocks, "allows": policy.allows,
                   "groups": len(policy.groups)},
        "process": {"rss": _rss_bytes(), "cpu": usage.ru_utime + usage.ru_stime, **_collector()},
        "problems": problems(server),
    }


# ---------------------------------------------------------------------------- adding up


def retire(snap: Snapshot) -> Snapshot:
    """The counters of a process that exited: kept in the sums; its gauges are gone with it."""
    return {**snap, "inflight": 0, "cache": {**snap["cache"], "entries": 0}, "audit": {**snap["audit"], "queue": 0},
            "process": {**snap["process"], "rss": 0, "gc_frozen": 0}, "problems": [], "retired": True}


def merge(snaps: Iterable[Snapshot]) -> Snapshot:
    """Counters and gauges added up over processes; the policy of the newest version any process has."""
    queries: dict[tuple, int] = {}
    upstreams: dict[str, dict[str, Any]] = {}
    total: Snapshot = {"dropped_packets": 0, "inflight": 0, "cache": {"hits": 0, "misses": 0, "entries": 0},
                       "audit": {"queue": 0, "written": 0, "rows": 0, "queue_dropped": 0, "write_dropped": 0,
                                 "gaps": 0, "writers_up": 0},
                       "policy": {"version": 0, "blocks": 0, "allows": 0, "groups": 0},
                       "process": {"rss": 0, "cpu": 0.0}, "processes": 0, "problems": []}
    for s in snaps:
        for action, qtype, transport, group, n in s["queries"]:
            key = (action, qtype, transport, group)
            queries[key] = queries.get(key, 0) + n
        total["dropped_packets"] += s["dropped_packets"]
        total["inflight"] += s["inflight"]
        for name, up in s["upstreams"].items():
            mine = upstreams.setdefault(name, {"buckets": [0] * (len(LATENCY_BUCKETS) + 1), "sum": 0.0,
                                               "failures": 0})
            if up["buckets"]:
                mine["buckets"] = [x + y for x, y in zip(mine["buckets"], up["buckets"], strict=True)]
            mine["sum"] += up["sum"]
            mine["failures"] += up["failures"]
        for group in ("cache", "audit", "process"):
            for k, v in s[group].items():
                total[group][k] = total[group].get(k, 0) + v
        if not s.get("retired"):
            total["processes"] += 1
            total["audit"]["writers_up"] += "audit writer not running" not in s["problems"]
            if s["policy"]["version"] >= total["policy"]["version"]:
                total["policy"] = dict(s["policy"])
            total["problems"].extend(s["problems"])
    total["queries"] = [[*k, n] for k, n in queries.items()]
    total["upstreams"] = upstreams
    return total


# ---------------------------------------------------------------------------- export


class Collector:
    """Turns the merged snapshot into metric families at scrape time."""

    def __init__(self, source: Callable[[], list[Snapshot]], restarts: Callable[[], int] = lambda: 0) -> None:
        self.source = source
        self.restarts = restarts

    def describe(self) -> list[Metric]:
        return []  # nothing at registration: the families are only known at scrape time

    def collect(self) -> Iterator[Metric]:
        m = merge(self.source())
        q = CounterMetricFamily("sinkhole_queries", "Queries answered, by action, query type, transport and "
                                "client group.", labels=["action", "qtype", "transport", "group"])
        for action, qtype, transport, group, n in sorted(m["queries"], key=lambda r: tuple(map(str, r))):
            q.add_metric([action, codec.qtype_name(qtype) if qtype else "", transport, group], n)
        yield q
        yield CounterMetricFamily("sinkhole_dropped_packets", "Packets dropped unanswered (too short for a "
                                  "header, or a response).", value=m["dropped_packets"])
        lat = HistogramMetricFamily("sinkhole_upstream_latency_seconds", "Time an upstream took to answer a "
                                    "forwarded query (one attempt, TCP retry included).", labels=["upstream"])
        fail = CounterMetricFamily("sinkhole_upstream_failures", "Attempts an upstream did not answer (timeout, "
                                   "error).", labels=["upstream"])
        for name, up in sorted(m["upstreams"].items()):
            cumulative, buckets = 0, []
            for bound, n in zip([*map(_bound, LATENCY_BUCKETS), "+Inf"], up["buckets"], strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            lat.add_metric([name], buckets, up["sum"])
            fail.add_metric([name], up["failures"])
        yield lat
        yield fail
        yield GaugeMetricFamily("sinkhole_upstream_inflight", "Forwards waiting for an upstream now.",
                                value=m["inflight"])
        c = m["cache"]
        yield CounterMetricFamily("sinkhole_cache_hits", "Queries answered from the cache.", value=c["hits"])
        yield CounterMetricFamily("sinkhole_cache_misses", "Cache look-ups that found nothing.", value=c["misses"])
        yield GaugeMetricFamily("sinkhole_cache_entries", "Replies in the cache.", value=c["entries"])
        a = m["audit"]
        yield GaugeMetricFamily("sinkhole_audit_queue_depth", "Audit rows waiting for the writer.", value=a["queue"])
        yield CounterMetricFamily("sinkhole_audit_rows_written", "Audit rows stored (gap rows not included); a row "
                                  "stands for its count of identical answers (audit_window).", value=a.get("rows", 0))
        yield CounterMetricFamily("sinkhole_audit_answers_written", "Answers the audit log stored: the sum of the "
                                  "stored rows' counts.", value=a["written"])
        lost = CounterMetricFamily("sinkhole_audit_rows_dropped", "Answers the audit log lost: the queue was full, "
                                   "or the database could not be written in time.", labels=["reason"])
        lost.add_metric(["queue_full"], a["queue_dropped"])
        lost.add_metric(["unwritable"], a["write_dropped"])
        yield lost
        yield CounterMetricFamily("sinkhole_audit_gap_rows", "Gap rows written (each records rows lost).",
                                  value=a["gaps"])
        yield GaugeMetricFamily("sinkhole_audit_writers_up",
                                "Audit writers running (one per worker: a thread, or a process of its own).",
                                value=a["writers_up"])
        p = m["policy"]
        yield GaugeMetricFamily("sinkhole_policy_version", "Change-journal version of the policy in force.",
                                value=p["version"])
        rules = GaugeMetricFamily("sinkhole_policy_rules", "Rules in the policy in force.", labels=["kind"])
        rules.add_metric(["block"], p["blocks"])
        rules.add_metric(["allow"], p["allows"])
        yield rules
        yield GaugeMetricFamily("sinkhole_policy_groups", "Client groups (default included).", value=p["groups"])
        yield GaugeMetricFamily("sinkhole_processes", "Processes serving DNS (workers).", value=m["processes"])
        yield CounterMetricFamily("sinkhole_worker_restarts", "Workers that died and were started again.",
                                  value=self.restarts())
        yield GaugeMetricFamily("sinkhole_resident_memory_bytes", "Resident memory of every serving process.",
                                value=m["process"]["rss"])
        yield CounterMetricFamily("sinkhole_cpu_seconds", "CPU time of every serving process (exited workers "
                                  "included).", value=m["process"]["cpu"])
        yield GaugeMetricFamily("sinkhole_gc_frozen_objects", "Objects the garbage collector never walks (frozen "
                                "once a process has started), in every serving process.",
                                value=m["process"].get("gc_frozen", 0))
        collections = CounterMetricFamily("sinkhole_gc_collections", "Garbage collections in every serving process "
                                          "(exited workers included), per generation.", labels=["generation"])
        for generation, key in (("young", "gc_young"), ("middle", "gc_middle"), ("full", "gc_full")):
            collections.add_metric([generation], m["process"].get(key, 0))
        yield collections


def _bound(x: float) -> str:
    return repr(float(x))


class BootTimeFromClocks(ProcessCollector):
    """prometheus_client's process_* collector, which reads the boot time from /proc/stat and reports
    nothing without it; sinkhole.service's ProcSubset=pid hides that file. The clocks tell it too."""

    def _boot_time(self) -> float:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def registry_for(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    BootTimeFromClocks(registry=registry)  # process_* of the process serving HTTP
    registry.register(collector)
    return registry


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        exporter = self.server.exporter
        if path == "/metrics":
            try:
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                body = encoder(exporter.registry)
                code = 200
            except Exception as exc:  # a broken collector must not kill the thread; say what broke
                log.exception("metrics scrape failed")
                body, code, content_type = f"scrape failed: {exc}\n".encode(), 500, "text/plain; charset=utf-8"
        elif path == "/healthz":
            reasons = exporter.health()
            body = ("ok\n" if not reasons else "".join(r + "\n" for r in reasons)).encode()
            code, content_type = (200 if not reasons else 503), "text/plain; charset=utf-8"
        else:
            body, code, content_type = b"not found: /metrics or /healthz\n", 404, "text/plain; charset=utf-8"
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: %s %s", self.address_string(), format % args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    exporter: Exporter


class Exporter:
    """`/metrics` and `/healthz` on HOST:PORT, served from a thread."""

    def __init__(self, address: tuple[str, int], collector: Collector, health: Callable[[], list[str]]) -> None:
        self.registry = registry_for(collector)
        self.health = health
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("_HTTPServerV6" if family == socket.AF_INET6 else "_HTTPServerV4", (_HTTPServer,),
                            {"address_family": family})
        self.httpd: _HTTPServer = server_class((host, port), _Handler)
        self.httpd.exporter = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="metrics-http", daemon=True)

    @property
    def address(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> Exporter:
        self.thread.start()
        log.info("metrics on http://%s/metrics, health on http://%s/healthz", self.address, self.address)
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def for_server(server: Any, address: tuple[str, int]) -> Exporter:
    """The exporter of a single-process server: a snapshot of it at every scrape."""
    return Exporter(address, Collector(lambda: [snapshot(server)]), lambda: problems(server)).start()


class WorkerSnapshots:
    """The supervisor's side: the latest snapshot of each worker, and the counters of exited ones."""

    def __init__(self) -> None:
        self.latest: dict[int, tuple[float, Snapshot]] = {}  # worker pid -> (monotonic time, snapshot)
        self.retired: Snapshot | None = None
        self.expected = 0  # workers that should be running
        self.restarts = 0
        self.lock = threading.Lock()

    def update(self, pid: int, snap: Snapshot) -> None:
        with self.lock:
            self.latest[pid] = (time.monotonic(), snap)

    def exited(self, pid: int) -> None:
        with self.lock:
            entry = self.latest.pop(pid, None)
            if entry is not None:
                gone = retire(entry[1])
                self.retired = gone if self.retired is None else retire(merge([self.retired, gone]))

    def snapshots(self) -> list[Snapshot]:
        with self.lock:
            out = [s for _, s in self.latest.values()]
            if self.retired is not None:
                out.append(self.retired)
        return out

    def problems(self) -> list[str]:
        now = time.monotonic()
        with self.lock:
            out = [f"worker pid {pid}: {r}" for pid, (_, s) in self.latest.items() for r in s["problems"]]
            out += [f"worker pid {pid}: no snapshot for {now - t:.0f} s" for pid, (t, _) in self.latest.items()
                    if now - t > STALE_AFTER]
            if len(self.latest) < self.expected:
                out.append(f"{len(self.latest)} of {self.expected} workers serving")
        return out

    def exporter(self, address: tuple[str, int]) -> Exporter:
        return Exporter(address, Collector(self.snapshots, lambda: self.restarts), self.problems).start()
