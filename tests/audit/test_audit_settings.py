"""Audit settings an agency's privacy and durability rules ask for: clients stored as networks, and the
SQLite synchronous level."""

from __future__ import annotations

import pytest

from sinkhole.audit.writer import AuditLog
from sinkhole.errors import ConfigError
from sinkhole.model import AuditEvent
from sinkhole.service import build
from tests.conftest import ask, audit_rows, wait_for


def test_clients_are_stored_as_their_networks_when_the_law_requires_it(make_server, stub, db):
    s = make_server(upstream=(stub.address,), log_client_prefix="24/56")
    assert ask(s, "chat.deepseek.com").answer
    rows = wait_for(lambda: audit_rows(db))
    assert [r["client"] for r in rows] == ["127.0.0.0/24"]
    assert "127.0.0.1" not in str(rows)


def test_ipv6_clients_keep_their_v6_prefix(tmp_path):
    log = AuditLog(tmp_path / "a.db", "n", client_prefix=(24, 56), seed=None)
    event = AuditEvent(0.0, "2001:db8:1:2:3::7", "udp", "x.example", 1, "blocked", "x.example", "manual", 0,
                       None, 1)
    assert log._row(event)[1] == "2001:db8:1::/56"
    assert log._row(AuditEvent(0.0, "192.0.2.77", "udp", "x.example", 1, "blocked", None, None, 0, None, 1))[1] \
        == "192.0.2.0/24"
    assert AuditLog(tmp_path / "b.db", "n", seed=None)._row(event)[1] == "2001:db8:1:2:3::7"


def test_a_v4_mapped_client_is_truncated_as_ipv4(tmp_path):
    """A dual-stack listener (::) sees IPv4 clients as ::ffff:a.b.c.d: their /24 is stored, not ::/56."""
    log = AuditLog(tmp_path / "a.db", "n", client_prefix=(24, 56), seed=None)
    for client in ("::ffff:192.0.2.77", "fe80::1%eth0"):
        event = AuditEvent(0.0, client, "udp", "x.example", 1, "blocked", None, None, 0, None, 1)
        assert log._row(event)[1] == {"::ffff:192.0.2.77": "192.0.2.0/24", "fe80::1%eth0": "fe80::/56"}[client]


@pytest.mark.parametrize("level, expected", [("full", 2), ("off", 0), ("normal", 1)])
def test_synchronous_level_is_the_writers(make_server, stub, db, level, expected):
    s = make_server(upstream=(stub.address,), audit_synchronous=level)
    assert ask(s, "chat.deepseek.com").answer
    wait_for(lambda: audit_rows(db))
    store = wait_for(lambda: s.server.audit.writer_store)
    assert store.synchronous() == expected


@pytest.mark.parametrize("settings, message", [
    ({"log_client_prefix": "33/56"}, "IPv4 prefix 0..32"),
    ({"log_client_prefix": "x"}, "not V4/V6 prefix lengths"),
    ({"audit_synchronous": "sometimes"}, "audit_synchronous must be"),
    ({"audit_writer": "fork"}, "audit_writer must be auto, process or thread, not 'fork'"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        build.load(env={}, flags=settings)


def test_settings_come_from_the_environment_too():
    cfg = build.load(env={"SINKHOLE_LOG_CLIENT_PREFIX": "16/48", "SINKHOLE_AUDIT_SYNCHRONOUS": "full"})
    assert build.client_prefix(cfg) == (16, 48) and cfg.audit.audit_synchronous == "full"
