"""sinkhole config check|show: the settings file checked as serve would build it, and the settings in force."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from sinkhole.cli.common import output_options
from sinkhole.errors import ConfigError
from sinkhole.service import build, config


@click.group("config")
def config_group() -> None:
    """Check the settings file, and show the settings a server would run with."""


@config_group.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path), envvar="SINKHOLE_CONFIG")
def config_check(file: Path | None) -> None:
    """Validate FILE [SINKHOLE_CONFIG, else /etc/sinkhole/sinkhole.toml]: every error, each with its
    line; exit 2 if there is any."""
    file = file or config.default_file()
    if file is None:
        raise ConfigError(f"no settings file: give FILE, set SINKHOLE_CONFIG, or create {config.DEFAULT_PATH}")
    problems = config.check_file(file, build.check)
    for problem in problems:
        click.echo(problem.format(file), err=True)
    if problems:
        sys.exit(2)
    click.echo(f"{file}: ok")


@config_group.command("show")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), envvar="SINKHOLE_CONFIG",
              help="The settings file [default: /etc/sinkhole/sinkhole.toml if it exists].")
@output_options(("toml", "json"))
def config_show(config_file: Path | None, fmt: str) -> None:
    """The effective settings (defaults < file < SINKHOLE_* environment), each with where it came from."""
    config_file = config_file or config.default_file()
    cfg, sources = build.load_sources(config_file)
    if fmt == "json":
        click.echo(json.dumps({"file": str(config_file) if config_file else None, "settings": {
            name: {"value": list(v) if isinstance(v := cfg.value(name), tuple) else v, "source": sources[name]}
            for name in config.KEYS}}, indent=2))
        return
    click.echo(f"# effective settings: defaults < {config_file or '(no file)'} < SINKHOLE_* environment")
    for name in config.KEYS:
        source = sources[name]
        if source == "env":
            source = f"env SINKHOLE_{name.upper()}"
        elif source == "file":
            source = f"file {config_file}"
        line = f"{name} = {config.to_toml(cfg.value(name))}"
        click.echo(f"{line}  # {source}")
