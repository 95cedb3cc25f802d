"""Prometheus metrics and /healthz over real HTTP, after real DNS queries to a running server."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import urllib.error
import urllib.request

import dns.message
import dns.query
from prometheus_client.parser import text_string_to_metric_families

from sinkhole.dns.upstream import LATENCY_BUCKETS
from sinkhole.service import metrics
from tests.conftest import ROOT, ask, audit_rows, wait_for
from tests.service.test_workers import children


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample: (sample name, sorted labels) -> value."""
    status, text = get(port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def queries(samples: dict, **labels: str) -> float:
    """sinkhole_queries_total summed over the labels not given."""
    return sum(v for (name, lab), v in samples.items() if name == "sinkhole_queries_total"
               and all(dict(lab).get(k) == want for k, want in labels.items()))


def test_counters_equal_what_was_sent(make_server, stub):
    s = make_server(upstream=(stub.address,), metrics="127.0.0.1:0")
    port = s.server.exporter.port
    for _ in range(3):
        assert ask(s, "chat.deepseek.com").answer[0][0].to_text() == "0.0.0.0"
    assert not ask(s, "chat.deepseek.com", "AAAA", tcp=True).answer[0][0].to_text().strip(":")
    for _ in range(2):  # forwarded once, then from the cache
        assert ask(s, "www.example.test").answer
    up = stub.address
    m = scrape(port)
    assert queries(m, action="blocked", qtype="A", transport="udp", group="default") == 3
    assert queries(m, action="blocked", qtype="AAAA", transport="tcp", group="default") == 1
    assert queries(m, action="forwarded", qtype="A", transport="udp") == 1
    assert queries(m, action="cached", qtype="A", transport="udp") == 1
    assert queries(m) == 6
    assert value(m, "sinkhole_cache_hits_total") == 1 and value(m, "sinkhole_cache_misses_total") == 1
    assert value(m, "sinkhole_cache_entries") == 1
    assert value(m, "sinkhole_upstream_latency_seconds_count", upstream=up) == 1
    assert value(m, "sinkhole_upstream_latency_seconds_bucket", upstream=up, le="+Inf") == 1
    assert 0 < value(m, "sinkhole_upstream_latency_seconds_sum", upstream=up) < 2
    assert value(m, "sinkhole_upstream_failures_total", upstream=up) == 0
    policy = s.server.policy
    assert value(m, "sinkhole_policy_version") == policy.version > 0
    assert value(m, "sinkhole_policy_rules", kind="block") == policy.blocks > 100
    assert value(m, "sinkhole_policy_groups") == 1
    assert value(m, "sinkhole_audit_writers_up") == 1 and value(m, "sinkhole_processes") == 1
    assert value(m, "process_resident_memory_bytes") > 0 and value(m, "sinkhole_resident_memory_bytes") > 0
    # the writer stores the 4 blocked answers (log_queries = blocked) in two rows (audit_window: the three
    # identical ones are one row): the counters follow
    assert wait_for(lambda: value(scrape(port), "sinkhole_audit_answers_written_total") == 4)
    m = scrape(port)
    assert value(m, "sinkhole_audit_rows_written_total") == 2
    assert sorted(r["count"] for r in audit_rows(s.db)) == [1, 3]
    m = scrape(port)
    assert value(m, "sinkhole_audit_rows_dropped_total", reason="queue_full") == 0
    assert value(m, "sinkhole_audit_queue_depth") == 0


def test_upstream_failures_are_counted_per_upstream(make_server):
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{dead.getsockname()[1]}"
    dead.close()  # nothing listens there now: the kernel refuses at once
    s = make_server(upstream=(address,), metrics="127.0.0.1:0", timeout=0.5)
    assert ask(s, "www.example.test").rcode() == 2  # SERVFAIL
    m = scrape(s.server.exporter.port)
    assert value(m, "sinkhole_upstream_failures_total", upstream=address) >= 1
    assert value(m, "sinkhole_upstream_latency_seconds_count", upstream=address) == 0
    assert queries(m, action="servfail") == 1


def test_healthz_is_ok_then_503_with_the_reason_when_the_audit_writer_stops(make_server, stub):
    s = make_server(upstream=(stub.address,), metrics="127.0.0.1:0")
    port = s.server.exporter.port
    assert get(port, "/healthz") == (200, "ok\n")
    s.server.audit.close()
    status, body = get(port, "/healthz")
    assert status == 503 and "audit writer not running" in body
    assert value(scrape(port), "sinkhole_audit_writers_up") == 0
    assert get(port, "/nothing")[0] == 404


def test_metrics_are_off_by_default(make_server, stub):
    assert make_server(upstream=(stub.address,)).server.exporter is None


def test_merge_adds_up_workers_and_keeps_counters_of_exited_ones():
    def snap(blocked: int, hits: int, bucket: int, version: int, queue: int) -> dict:
        buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        buckets[bucket] = 2
        return {"queries": [["blocked", 1, "udp", "", blocked], ["forwarded", 28, "tcp", "lab", 1]],
                "dropped_packets": 1, "upstreams": {"10.0.0.53:53": {"buckets": buckets, "sum": 0.5, "failures": 1}},
                "inflight": 1, "cache": {"hits": hits, "misses": 1, "entries": 5},
                "audit": {"queue": queue, "written": blocked, "rows": blocked, "queue_dropped": 0, "write_dropped": 1,
                          "gaps": 0},
                "policy": {"version": version, "blocks": version * 10, "allows": 0, "groups": 1},
                "process": {"rss": 100, "cpu": 1.0}, "problems": []}

    snaps = metrics.WorkerSnapshots()
    snaps.expected = 2
    snaps.update(1, snap(5, 3, 0, 7, 2))
    snaps.update(2, snap(7, 4, 3, 8, 1))
    m = metrics.merge(snaps.snapshots())
    assert sorted(map(tuple, m["queries"])) == [("blocked", 1, "udp", "", 12), ("forwarded", 28, "tcp", "lab", 2)]
    assert m["cache"] == {"hits": 7, "misses": 2, "entries": 10}
    assert m["upstreams"]["10.0.0.53:53"]["buckets"][0] == 2 and m["upstreams"]["10.0.0.53:53"]["buckets"][3] == 2
    assert m["upstreams"]["10.0.0.53:53"]["failures"] == 2
    assert m["policy"] == {"version": 8, "blocks": 80, "allows": 0, "groups": 1}
    assert m["audit"]["queue"] == 3 and m["processes"] == 2 and snaps.problems() == []
    snaps.exited(1)  # counters stay, gauges go
    m = metrics.merge(snaps.snapshots())
    assert sorted(map(tuple, m["queries"]))[0] == ("blocked", 1, "udp", "", 12)
    assert m["cache"] == {"hits": 7, "misses": 2, "entries": 5} and m["audit"]["queue"] == 1
    assert m["processes"] == 1 and snaps.problems() == ["1 of 2 workers serving"]
    snaps.update(3, snap(1, 0, 0, 8, 0))  # its replacement
    snaps.exited(2)
    m = metrics.merge(snaps.snapshots())
    assert sorted(map(tuple, m["queries"]))[0] == ("blocked", 1, "udp", "", 13)


def test_workers_counters_add_up_in_the_supervisor(server_process, stub, db):
    p = server_process("--upstream", stub.address, "--workers", "2", "--metrics", "127.0.0.1:0")
    port = wait_for(lambda: next((int(m.group(1)) for line in p.lines
                                  if (m := re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line))), 0))
    assert port
    assert wait_for(lambda: get(port, "/healthz") == (200, "ok\n"))
    n = 0
    for i in range(600):  # one socket (source port) a query: the kernel spreads them over both workers, once both run
        r = dns.query.udp(dns.message.make_query(f"w{i}.chat.deepseek.com", "A"), p.host, port=p.port, timeout=5)
        assert r.answer[0][0].to_text() == "0.0.0.0"
        n += 1
        if n >= 40 and n % 20 == 0 and len({r["chain"] for r in audit_rows(db)}) == 2:
            break
    assert wait_for(lambda: queries(scrape(port), action="blocked") == n)
    m = scrape(port)
    assert value(m, "sinkhole_processes") == 2
    # each worker froze what it had built once it started serving (heap.settle): tens of thousands of objects
    assert value(m, "sinkhole_gc_frozen_objects") > 2 * 1000
    assert value(m, "sinkhole_gc_collections_total", generation="full") >= 2
    assert wait_for(lambda: value(scrape(port), "sinkhole_audit_rows_written_total") == n)
    chains = sqlite3.connect(db).execute("SELECT count(DISTINCT chain) FROM audit").fetchone()[0]
    assert chains == 2, "both workers answered some of them, so the sum is a real sum"
    # a worker killed: its counters stay in the sums, and its replacement adds to them
    first = wait_for(lambda: len(children(p.proc.pid)) == 2 and children(p.proc.pid))
    os.kill(first[0], signal.SIGKILL)
    assert wait_for(lambda: value(scrape(port), "sinkhole_worker_restarts_total") == 1
                    and value(scrape(port), "sinkhole_processes") == 2)
    for i in range(40):
        dns.query.udp(dns.message.make_query(f"v{i}.chat.deepseek.com", "A"), p.host, port=p.port, timeout=5)
    assert wait_for(lambda: queries(scrape(port), action="blocked") == n + 40)
    assert p.terminate() == 0


def test_a_server_on_its_own_freezes_its_heap_once_started(server_process, stub):
    p = server_process("--upstream", stub.address, "--workers", "1", "--metrics", "127.0.0.1:0")
    port = wait_for(lambda: next((int(m.group(1)) for line in p.lines
                                  if (m := re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line))), 0))
    assert wait_for(lambda: get(port, "/healthz") == (200, "ok\n"))
    m = scrape(port)
    assert value(m, "sinkhole_gc_frozen_objects") > 1000  # heap.settle, after start: the modules, the policy
    assert value(m, "sinkhole_gc_collections_total", generation="full") >= 1  # settle's own
    assert p.terminate() == 0


def test_grafana_dashboard_uses_only_exported_metrics(make_server, stub):
    dashboard = json.loads((ROOT / "contrib" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 6
    s = make_server(upstream=(stub.address,), metrics="127.0.0.1:0")
    ask(s, "chat.deepseek.com")
    ask(s, "www.example.test")
    exported = {name for name, _ in scrape(s.server.exporter.port)}
    used = {name for expr in exprs for name in re.findall(r"\b(sinkhole_[a-z_]+|process_[a-z_]+)\b", expr)}
    assert used and used <= exported, used - exported
    for wanted in ("sinkhole_queries_total", "sinkhole_upstream_latency_seconds_bucket",
                   "sinkhole_cache_hits_total", "sinkhole_audit_rows_dropped_total", "sinkhole_policy_version"):
        assert wanted in used



def test_process_metrics_without_proc_stat(tmp_path):
    """sinkhole.service's ProcSubset=pid hides /proc/stat, where prometheus_client reads the boot time: a /proc
    with only this process in it (as the unit's) still gives process_start_time_seconds and the others."""
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "self").symlink_to(f"/proc/{os.getpid()}")  # no stat, uptime, meminfo ...
    upstream, ours = CollectorRegistry(), CollectorRegistry()
    ProcessCollector(proc=str(proc), registry=upstream)
    metrics.BootTimeFromClocks(proc=str(proc), registry=ours)
    assert b"process_resident_memory_bytes" not in generate_latest(upstream)  # what the unit's /metrics lacked
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(ours).decode())}
    assert families["process_resident_memory_bytes"].samples[0].value > 0
    start = families["process_start_time_seconds"].samples[0].value
    assert abs(start - start_time_from_proc_stat()) < 5


def start_time_from_proc_stat() -> float:
    """This process's start time from /proc/stat's btime and its start ticks (what prometheus_client computes)."""
    btime = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime "))
    ticks = int(open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[19])
    return btime + ticks / os.sysconf("SC_CLK_TCK")
