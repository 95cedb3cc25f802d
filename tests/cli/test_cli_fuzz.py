"""Every CLI command under random arguments (hypothesis): never a traceback, always exit 0, 1 or 2, and a
usage error (exit 2) makes no database. Commands and their options are read from the click tree, so a new
command or option is driven too. In-process through `sinkhole.cli.main`, the console script's own entry point,
for speed; what would leave the process is stubbed: `serve` returns after its settings are checked, `log
--follow` after its first read, list URLs are never fetched, and a password prompt is left (as Ctrl-C does).
Every path is relative to a scratch directory."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sinkhole.cli import cli, main
from sinkhole.cli import log as cli_log
from sinkhole.policy import fetch
from sinkhole.service import config, process

SIDE = ("-wal", "-shm", "-journal", ".lock")
# paths the arguments may name, all in the scratch directory: a database, its key, a list, a settings
# file, a directory, a file in a missing directory, an SQLite URI, names that are not there
PATHS = ["s.db", "s.db.key", "new.db", "list.txt", "conf.toml", "dir", "missing/x.db", "file:x.db", "out.html",
         "k.key", "anchor.json", "", "-", "..x"]
NUMBERS = ["0", "-1", "1", "7", "99999999999999999999", "-99999999999999999999", "1e999", "-1e999", "nan", "inf",
           "0.5", "1e-9", "3600", "86400", "2147483648", "0x10", "١٢", " 5", "5 "]
WORDS = ["chat.deepseek.com", "deepseek.com", "bad..name", "/(x+x+)+y/", r"/(a)\1/", "/[z-a]/", "10.0.0.0/8",
         "::ffff:127.0.0.1", "127.0.0.1", "default", "manual", "genai", "none", "inherit", "a,b", "rpz:x",
         "24/56", "127.0.0.1:0", "tcp://127.0.0.1:9", "https://127.0.0.1/dns-query", "http://127.0.0.1:9/x.txt",
         "7d", "2026-01-01", "-1d", "A", "HTTPS", "TYPE65535", "*.x.example", "xn--", "é.example", "."]
text = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), max_size=30)
token = st.one_of(st.sampled_from(WORDS), st.sampled_from(NUMBERS), st.sampled_from(PATHS), text)


def commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    out: list[tuple[tuple[str, ...], click.Command]] = []
    ctx = click.Context(group)
    for name in sorted(group.list_commands(ctx)):  # the top level loads each command's module by name
        sub = group.get_command(ctx, name)
        assert sub is not None
        if isinstance(sub, click.Group):
            out += commands(sub, (*path, name))
            if sub.invoke_without_command:
                out.append(((*path, name), sub))
        else:
            out.append(((*path, name), sub))
    return out


COMMANDS = commands(cli)


def value(param: click.Parameter) -> st.SearchStrategy[str]:
    kind = param.type
    # mostly values of the right kind, so that the other options of a command let it get far
    if isinstance(kind, click.Choice):
        return st.one_of(st.sampled_from(list(kind.choices)), st.sampled_from(list(kind.choices)), token)
    if isinstance(kind, click.types._NumberParamTypeBase):
        return st.one_of(st.sampled_from(NUMBERS), st.integers(-(10**25), 10**25).map(str),
                         st.integers(0, 100).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                         token)
    if isinstance(kind, click.Path):
        return st.one_of(st.sampled_from(PATHS), st.sampled_from(PATHS), text)
    return st.one_of(st.sampled_from(WORDS), token)


@st.composite
def invocation(draw: st.DrawFn) -> list[str]:
    path, command = draw(st.sampled_from(COMMANDS))
    argv: list[str] = []
    if draw(st.booleans()):
        argv += ["--db", draw(st.sampled_from(["s.db", "s.db", "new.db", "dir", "missing/x.db", "file:x.db", ""]))]
    argv += list(path)
    for param in command.params:
        if isinstance(param, click.Argument):
            count = 1 if param.nargs == 1 else draw(st.integers(0 if not param.required else 1, 3))
            if param.nargs == 1 and not param.required and draw(st.booleans()):
                count = 0
            argv += [draw(value(param)) for _ in range(count)]
        elif draw(st.integers(0, 3)) == 0:  # an option a quarter of the time
            if param.is_flag:
                argv.append(draw(st.sampled_from(param.opts + param.secondary_opts)))
            else:
                argv += [draw(st.sampled_from(param.opts)), draw(value(param))]
    if draw(st.integers(0, 7)) == 0:  # now and then a stray word or an option nobody has
        argv.insert(draw(st.integers(0, len(argv))), draw(st.one_of(token, st.sampled_from(["--nope", "-x"]))))
    return argv


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.name.endswith(SIDE)}


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "seed.txt").write_text("# category: seeded\nseeded.example\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "dir").mkdir()
    (work / "list.txt").write_text("||ai.example^\n/^chat[0-9]+\\.ai\\.example$/\n")
    (work / "conf.toml").write_text("block_ttl = 30\nrate_limit = 5\n")
    (work / "anchor.json").write_text("{}\n")
    monkeypatch.chdir(work)
    for name in ("SINKHOLE_DB", "SINKHOLE_CONFIG", "SINKHOLE_AUDIT_KEY", "SINKHOLE_BLOCKPAGE_CA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SINKHOLE_BLOCKLISTS", str(lists))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "no-such.toml")
    monkeypatch.setattr(process, "run", lambda *a, **kw: 0)  # `serve` checks everything, then does not serve
    monkeypatch.setattr(cli_log, "_follow", lambda *a, **kw: None)
    monkeypatch.setattr(click, "prompt", lambda *a, **kw: (_ for _ in ()).throw(click.Abort()))  # no one types

    def no_network(*a: object, **kw: object) -> None:
        raise fetch.FetchError("no network in this test")

    monkeypatch.setattr(fetch, "fetch_url", no_network)
    assert run(["--db", "s.db", "block", "add", "kept.example"])[0] == 0
    assert run(["--db", "s.db", "log", "anchor", "--export-key", "k.key"])[0] == 0
    return work


def run(argv: list[str]) -> tuple[int, str, str]:
    """`sinkhole ARGV` through the console script's entry point: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = ["sinkhole", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    else:
        code = 0
    finally:
        sys.argv = old_argv
    return code, out.getvalue(), err.getvalue()


def test_every_command_lists_its_options():
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"serve", "block add", "log", "log verify", "report", "stats", "check", "lists import"} <= names


@settings(max_examples=int(os.environ.get("SINKHOLE_FUZZ_EXAMPLES", "600")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(argv=invocation())
def test_random_arguments_never_make_a_traceback(scratch, argv):
    before = files(scratch)
    code, out, err = run(argv)  # an exception other than SystemExit fails the test with its traceback
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err + out, (argv, err)
    if code != 0:
        assert err.strip() or out.strip(), (argv, "failed without a word")
    if code == 2:
        assert files(scratch) <= before, (argv, "a usage error made", files(scratch) - before)
