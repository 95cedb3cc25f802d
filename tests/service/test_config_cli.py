"""The settings file: the shipped example, `config check`, `config show`, and SIGHUP reloads."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import textwrap

import dns.message
import dns.query
import pytest
from click.testing import CliRunner

from sinkhole.cli import cli
from sinkhole.errors import ConfigError
from sinkhole.service import build, config
from tests.conftest import ROOT, audit_rows, wait_for
from tests.dnsstub import address_for

EXAMPLE = ROOT / "etc" / "sinkhole.toml"
SETTING = re.compile(r"^#(\w+) = (.*)$")


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


# ---------------------------------------------------------------------------- the shipped example


def test_example_lists_every_setting_at_its_default():
    text = EXAMPLE.read_text()
    shown = [m.group(1) for line in text.splitlines() if (m := SETTING.match(line))]
    assert sorted(shown) == sorted(config.FIELDS), "every Settings field, once"
    assert build.load(EXAMPLE, env={}) == config.Settings()  # as shipped, it changes nothing


def test_example_values_are_the_defaults(tmp_path):
    """Every value it shows is the default: uncommented, it still changes nothing (node: the host name)."""
    uncommented = re.sub(r"^#(\w+ = )", r"\1", EXAMPLE.read_text(), flags=re.MULTILINE)
    f = tmp_path / "all.toml"
    f.write_text(uncommented)
    loaded = build.load(f, env={})
    assert loaded == config.Settings().replace(node=loaded.audit.node)
    assert config.check_file(f, build.check) == []


def test_example_marks_exactly_the_reloadable_settings():
    marked, comment, last_was_setting = set(), "", False
    for line in EXAMPLE.read_text().splitlines():
        m = SETTING.match(line)
        if m:
            if "[reload]" in comment:
                marked.add(m.group(1))
            last_was_setting = True
        elif line.startswith("# "):
            if last_was_setting:
                comment = ""
            comment += line
            last_was_setting = False
        elif not line.strip():
            comment, last_was_setting = "", False
    assert marked == config.RELOADABLE


# ---------------------------------------------------------------------------- config check


def test_config_check_names_the_line_of_every_error(tmp_path):
    f = tmp_path / "sinkhole.toml"
    f.write_text(textwrap.dedent("""\
        # agency settings
        block_ttl = 99999
        mode = "drop"
        upstream = ["10.0.0.53"]
        colour = "blue"

        timeout = "soon"
        """))
    r = run("config", "check", str(f))
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"{f}:2: block_ttl must be from 0 to 86400 seconds",
        f"{f}:3: mode must be one of sinkhole, nxdomain, not 'drop'",
        f"{f}:5: unknown setting 'colour'",
        f"{f}:7: timeout: could not convert string to float: 'soon'",
    ]


def test_config_check_values_wrong_only_together_and_in_a_server_table(tmp_path):
    f = tmp_path / "sinkhole.toml"
    f.write_text("[server]\ncache_min_ttl = 600\ncache_max_ttl = 300\n  'metrics' = \"localhost:9153\"\n")
    r = run("config", "check", str(f))
    assert r.exit_code == 2
    lines = r.stderr.splitlines()
    assert lines[0].startswith(f"{f}:2: ") and "cache_min_ttl <= cache_max_ttl" in lines[0]
    assert lines[1] == f"{f}:4: bad address 'localhost:9153': 'localhost' is not an IP address"


def test_config_check_reports_toml_syntax_with_line_and_column(tmp_path):
    f = tmp_path / "sinkhole.toml"
    f.write_text('block_ttl = 30\nlog_queries = "all\n')
    r = run("config", "check", str(f))
    assert r.exit_code == 2 and re.fullmatch(rf"{re.escape(str(f))}:2:\d+: .+\n", r.stderr)


def test_config_check_ok(tmp_path):
    f = tmp_path / "sinkhole.toml"
    f.write_text('block_ttl = 30\nmetrics = "127.0.0.1:9153"\n')
    r = run("config", "check", str(f))
    assert r.exit_code == 0 and r.stdout == f"{f}: ok\n"
    assert run("config", "check", str(tmp_path / "missing.toml")).exit_code == 2
    assert run("config", "check", str(EXAMPLE)).exit_code == 0


@pytest.mark.parametrize("line,words", [
    ('rpz_listen = "127.0.0.1:0"\nrpz_tsig = "k:hmac-nope:c2VjcmV0"', "rpz_tsig: algorithm 'hmac-nope'"),
    ('syslog = "ftp://10.0.0.1:514"', "the scheme must be udp:// or tcp://"),
    ('upstream_ca = "/nonexistent/ca.pem"', "upstream_ca: cannot load"),
    ('mode = "drop"', "mode must be one of sinkhole, nxdomain, not 'drop'"),
    ('blockpage_listen = ["0.0.0.0"]', "blockpage_listen is a wildcard address"),
    ('log_client_prefix = "24"', None),  # fine: the IPv4 prefix alone
])
def test_config_check_refuses_exactly_what_serve_refuses(tmp_path, line, words):
    """`config check` validates by building what `serve` builds (service.build.check): serve starts with
    build.load, so a file it would refuse at start is refused by the check, with the same words; one it takes
    passes."""
    f = tmp_path / "sinkhole.toml"
    f.write_text(f'upstream = ["127.0.0.1:5301"]\n{line}\n')
    checked = run("config", "check", str(f))
    if words is None:
        assert checked.exit_code == 0
        assert build.load(f, env={}).audit.log_client_prefix == "24"
        return
    assert checked.exit_code == 2 and words in checked.stderr
    with pytest.raises(ConfigError) as refused:
        build.load(f, env={})
    assert words in str(refused.value)


def test_serve_refuses_a_bad_file_before_binding_or_making_a_database(tmp_path):
    f = tmp_path / "sinkhole.toml"
    f.write_text('upstream = ["127.0.0.1:5301"]\nmode = "drop"\n')
    served = run("--db", str(tmp_path / "s.db"), "serve", "--config", str(f), "--listen", "127.0.0.1:0")
    assert served.exit_code == 2 and "mode must be one of sinkhole, nxdomain, not 'drop'" in served.stderr
    assert not (tmp_path / "s.db").exists()


def test_config_check_without_a_file_uses_the_default_path(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "sinkhole.toml")
    r = run("config", "check", env={"SINKHOLE_CONFIG": None})
    assert r.exit_code == 2 and "no settings file" in r.stderr
    (tmp_path / "sinkhole.toml").write_text("mode = 'nxdomain'\n")
    assert run("config", "check", env={"SINKHOLE_CONFIG": None}).exit_code == 0


# ---------------------------------------------------------------------------- config show


def test_config_show_says_where_each_setting_came_from(tmp_path):
    f = tmp_path / "sinkhole.toml"
    f.write_text('block_ttl = 30\nmode = "nxdomain"\nallow_clients = ["10.0.0.0/8"]\n')
    r = run("config", "show", "--config", str(f), env={"SINKHOLE_BLOCK_TTL": "20"})
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "block_ttl = 20  # env SINKHOLE_BLOCK_TTL" in lines
    assert f"mode = \"nxdomain\"  # file {f}" in lines
    assert f"allow_clients = [\"10.0.0.0/8\"]  # file {f}" in lines
    assert "log_queries = \"blocked\"  # default" in lines
    assert len([x for x in lines if not x.startswith("#")]) == len(config.FIELDS)
    r = run("config", "show", "--config", str(f), "--format", "json", env={"SINKHOLE_BLOCK_TTL": "20"})
    shown = json.loads(r.stdout)
    assert shown["file"] == str(f) and set(shown["settings"]) == set(config.FIELDS)
    assert shown["settings"]["block_ttl"] == {"value": 20, "source": "env"}
    assert shown["settings"]["allow_clients"] == {"value": ["10.0.0.0/8"], "source": "file"}
    assert shown["settings"]["timeout"] == {"value": 2.0, "source": "default"}


def test_config_show_output_is_a_config_file_that_loads_the_same(tmp_path):
    f = tmp_path / "sinkhole.toml"
    f.write_text('block_a = "192.0.2.80"\nrate_limit = 50.5\nbypass_canaries = false\n')
    r = run("config", "show", "--config", str(f), env={})
    again = tmp_path / "shown.toml"
    again.write_text(r.stdout)
    assert build.load(again, env={}) == build.load(f, env={})


def test_config_show_reads_the_default_path_and_refuses_a_bad_file(tmp_path, monkeypatch):
    default = tmp_path / "sinkhole.toml"
    monkeypatch.setattr(config, "DEFAULT_PATH", default)
    default.write_text("block_ttl = 42\n")
    r = run("config", "show", "--format", "json", env={"SINKHOLE_CONFIG": None})
    assert json.loads(r.stdout)["settings"]["block_ttl"] == {"value": 42, "source": "file"}
    default.write_text("block_ttl = -1\n")
    r = run("config", "show", env={"SINKHOLE_CONFIG": None})
    assert r.exit_code == 2 and "block_ttl" in r.stderr


def test_reload_plan_splits_what_applies_from_what_needs_a_restart():
    old = config.Settings.of(node="n")
    new = old.replace(block_ttl=5, log_queries="all", listen=("127.0.0.1:53",), workers=3)
    running, applied, restart = config.reload_plan(old, new)
    assert applied == ["block_ttl", "log_queries"] and restart == ["listen", "workers"]
    assert running == old.replace(block_ttl=5, log_queries="all")


# ---------------------------------------------------------------------------- SIGHUP


def ask(p, name: str, qtype: str = "A") -> dns.message.Message:
    # a new socket (source port) every time: with workers, the kernel spreads them
    return dns.query.udp(dns.message.make_query(name, qtype), p.host, port=p.port, timeout=5)


def lines_with(p, text: str) -> int:
    return sum(text in line for line in list(p.lines))


def journal_entries(db, action: str) -> list[dict]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM journal WHERE action = ?", (action,))]
    finally:
        conn.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_applies_a_new_file_and_refuses_a_broken_one(server_process, stub, db, tmp_path, workers):
    f = tmp_path / "sinkhole.toml"
    f.write_text(f'upstream = ["{stub.address}"]\nblock_ttl = 60\n')
    p = server_process("--config", str(f), "--workers", workers)
    reloaded = "config reloaded" if workers == "1" else "worker 1: config reloaded"
    assert ask(p, "chat.deepseek.com").answer[0].ttl == 60
    assert ask(p, "www.example.test").answer[0][0].to_text() == address_for("www.example.test")
    assert not [r for r in audit_rows(db) if r["action"] == "forwarded"]

    f.write_text(f'upstream = ["{stub.address}"]\nblock_ttl = 30\nlog_queries = "all"\nnode = "elsewhere"\n')
    p.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: lines_with(p, reloaded) == 1)
    line = next(x for x in p.lines if reloaded in x)
    assert "block_ttl = 30" in line and 'log_queries = "all"' in line and "needs a restart: node" in line
    if workers == "2":
        assert wait_for(lambda: lines_with(p, "worker 0: config reloaded") == 1)
    for i in range(10):  # every worker answers with the new TTL
        assert ask(p, f"r{i}.chat.deepseek.com").answer[0].ttl == 30
    assert ask(p, "www2.example.test").answer
    forwarded = wait_for(lambda: [r for r in audit_rows(db) if r["action"] == "forwarded"])
    assert [r["qname"] for r in forwarded] == ["www2.example.test"]  # log_queries = "all" from now on
    assert "elsewhere" not in {r["node"] for r in audit_rows(db)}  # node needs a restart
    # the applied settings are in the change journal, once whatever the number of workers
    entries = wait_for(lambda: journal_entries(db, "settings reload"))
    assert len(entries) == 1
    assert json.loads(entries[0]["detail"]) == {"block_ttl": "30", "log_queries": '"all"'}
    assert entries[0]["command"].startswith("SIGHUP")

    f.write_text('block_ttl = "soon"\n')
    p.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: lines_with(p, "config reload refused") >= 1)
    refused = next(x for x in p.lines if "config reload refused" in x)
    assert "block_ttl" in refused and str(f) in refused
    for i in range(10):  # still serving, with the settings that were running
        assert ask(p, f"s{i}.chat.deepseek.com").answer[0].ttl == 30
    assert ask(p, "www3.example.test").answer[0][0].to_text() == address_for("www3.example.test")
    assert p.terminate() == 0


def test_serve_reads_the_default_config_path(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "sinkhole.toml")
    assert config.default_file() is None
    (tmp_path / "sinkhole.toml").write_text("block_ttl = 7\n")
    assert config.default_file() == tmp_path / "sinkhole.toml"
    # `serve` and `check` call default_file() when no --config / SINKHOLE_CONFIG is given
    assert run("--db", str(tmp_path / "s.db"), "block", "add", "other.example").exit_code == 0
    r = run("--db", str(tmp_path / "s.db"), "check", "chat.deepseek.com", "--format", "json",
            env={"SINKHOLE_CONFIG": None})
    assert r.exit_code == 0 and " 7 IN A 0.0.0.0" in json.loads(r.stdout)["answer"]

