"""Settings: defaults < TOML file < SINKHOLE_* environment < flags; bad values are ConfigErrors."""

from __future__ import annotations

import dataclasses
import re

import pytest

from sinkhole.errors import ConfigError
from sinkhole.service import build
from tests.conftest import ROOT


def test_defaults_match_the_contract():
    cfg = build.load(env={})
    assert cfg.serving.listen == ("127.0.0.1:5353",) and cfg.upstreams.timeout == 2.0 and cfg.answers.mode == "sinkhole"
    assert cfg.audit.log_queries == "blocked" and cfg.answers.block_ttl == 60
    a = build.answers(cfg)
    assert str(a.a) == "0.0.0.0" and str(a.aaaa) == "::"


def test_precedence_file_env_flags(tmp_path):
    f = tmp_path / "sinkhole.toml"
    f.write_text('listen = ["127.0.0.1:5400"]\nupstream = ["127.0.0.1:5301"]\nblock_ttl = 30\nmode = "nxdomain"\n')
    cfg = build.load(f, env={})
    assert cfg.serving.listen == ("127.0.0.1:5400",) and cfg.answers.block_ttl == 30 and cfg.answers.mode == "nxdomain"
    cfg = build.load(f, env={"SINKHOLE_BLOCK_TTL": "20", "SINKHOLE_LISTEN": "127.0.0.1:1,[::1]:2"})
    assert cfg.answers.block_ttl == 20 and cfg.serving.listen == ("127.0.0.1:1", "[::1]:2")
    cfg = build.load(f, env={"SINKHOLE_BLOCK_TTL": "20"}, flags={"block_ttl": 10, "listen": None})
    assert cfg.answers.block_ttl == 10 and cfg.serving.listen == ("127.0.0.1:5400",)
    assert [str(u) for u in build.upstreams(cfg)] == ["127.0.0.1:5301"]


@pytest.mark.parametrize("content,message", [
    ("bogus = 1\n", "unknown setting 'bogus'"),
    ("mode = 'drop'\n", "mode must be one of"),
    ("block_ttl = 'x'\n", "block_ttl"),
    ("listen = 'nowhere:53'\n", "not an IP address"),
    ("block_a = '::1'\n", "not an IPv4 address"),
    ("timeout = 0\n", "above zero"),
    ("[server\n", "sinkhole.toml"),
])
def test_bad_config_file_is_rejected_with_reason(tmp_path, content, message):
    f = tmp_path / "sinkhole.toml"
    f.write_text(content)
    with pytest.raises(ConfigError) as err:
        build.load(f, env={})
    assert message in str(err.value)


def test_server_table_is_accepted(tmp_path):
    f = tmp_path / "sinkhole.toml"
    f.write_text("[server]\nlog_queries = 'all'\n")
    assert build.load(f, env={}).audit.log_queries == "all"


def test_bad_env_value(tmp_path):
    with pytest.raises(ConfigError, match="SINKHOLE_TIMEOUT"):
        build.load(env={"SINKHOLE_TIMEOUT": "soon"})


@pytest.mark.parametrize("env,message", [
    ({"SINKHOLE_LOG_LEVEL": "verbose"}, "log_level"),
    ({"SINKHOLE_TIMEOUT": "nan"}, "timeouts"),
    ({"SINKHOLE_TCP_MAX_CLIENTS": "0"}, "tcp_max_clients"),
    ({"SINKHOLE_ECS": "forward"}, "ecs: 'forward' is neither"),
    ({"SINKHOLE_ECS": "24"}, "neither"),
    ({"SINKHOLE_ECS": "0/56"}, "IPv4 prefix 1..32"),
    ({"SINKHOLE_ECS": "24/129"}, "IPv6 prefix 1..128"),
])
def test_more_bad_values(env, message):
    with pytest.raises(ConfigError, match=message):
        build.load(env=env)


def test_ecs_is_strip_unless_prefixes_are_given():
    assert build.ecs_prefix(build.load(env={})) is None
    assert build.ecs_prefix(build.load(env={"SINKHOLE_ECS": "24/56"})) == (24, 56)


def test_bad_log_level_from_the_console_script_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sinkhole", "--db", str(tmp_path / "a.db"), "serve"],
                         capture_output=True, text=True, timeout=20,
                         env={**os.environ, "SINKHOLE_LOG_LEVEL": "verbose"})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "log_level" in out.stderr


def test_every_key_is_in_exactly_one_section():
    """The flat keys are the contract (TOML, SINKHOLE_*, --flags, `config show`, whose order is KEYS'); the
    sections group them by the part that consumes them."""
    from sinkhole.service import config

    in_sections = [f for section in config.SECTIONS.values() for f in config.keys_of(section)]
    assert sorted(in_sections) == sorted(config.KEYS) and len(in_sections) == len(set(in_sections))
    assert all(key in config.keys_of(config.SECTIONS[attr]) for key, attr in config.KEYS.items())
    listed = {m.group(1) for m in re.finditer(r"^#?(\w+) = ", (ROOT / "etc" / "sinkhole.toml").read_text(), re.M)}
    assert listed == set(config.KEYS)


def test_flat_views_of_the_sections():
    from sinkhole.service import config

    s = config.Settings.of(cache_size=5, rate_limit=7.0)
    assert s.cache.cache_size == 5 == s.value("cache_size") and s.clients.rate_limit == 7.0
    t = s.replace(cache_size=6)
    assert (t.cache.cache_size, s.cache.cache_size) == (6, 5) and t.clients is s.clients  # untouched sections shared
    assert config.Settings() == config.DEFAULT
    with pytest.raises(KeyError):
        s.replace(colour="blue")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.cache.cache_size = 9  # type: ignore[misc]


def test_settings_are_a_leaf_the_service_builds_from():
    """config imports nothing of sinkhole but errors; the checks that need a part live in service.build."""
    import ast

    from sinkhole.service import config

    tree = ast.parse(open(config.__file__).read())
    ours = {n.module for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("sinkhole")}
    assert ours == {"sinkhole.errors"}
    with pytest.raises(ConfigError, match="upstream"):
        build.check(config.Settings.of(upstream=("tls://10.0.0.53:853#",)))
    config.check_values(config.Settings.of(upstream=("tls://10.0.0.53:853#",)))  # values alone: nothing wrong
