"""The shape of the code (DESIGN.md): one package per layer, imports only downward, no circles, no imports inside
functions but for optional or heavy third-party modules, dnslib only in the codec, SQL only in the store.

Whatever has not reached its place yet is listed below (PLANNED, KNOWN_*): every list only shrinks, and the
test fails when an entry is no longer needed, so the commit that pays off a debt also removes it.

`python -m tests.test_architecture` prints the import graph and the line counts per package (the closing note's
before and after); `python -m tests.test_architecture --dot | dot -Tsvg` draws the packages.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "sinkhole"

# Layers, lowest first. A module is in the layer of the longest prefix that names it (a prefix names itself and
# every module under it). A module may import a lower layer, or its own layer within its own package.
# Layer 0 holds the values and small helpers every layer shares (model, errors, file modes, the log's repeat
# filter); two of them live in the package of their subject but sit below it:
# policy.names (names as rules compare them, suffix tables, rule-text shapes) and audit.chain (MACs over rows it
# is handed, key files), with which the store seals the journal and the prune's checkpoints.
LAYERS: list[tuple[str, ...]] = [
    ("sinkhole", "sinkhole.model", "sinkhole.errors", "sinkhole.files", "sinkhole.logthrottle",
     "sinkhole.policy.names", "sinkhole.audit.chain"),
    ("sinkhole.policy",),  # what is blocked and why: decide/inspect, list formats, fetching lists; no SQL
    ("sinkhole.dns",),  # bytes in and out: codec, guard, answer, cache, upstream, pipeline, listener
    ("sinkhole.store",),  # the only place with SQL
    # over the store: the audit log, RPZ, and what an operator changes in the policy (rules, groups, lists)
    ("sinkhole.audit", "sinkhole.fleet", "sinkhole.policy.edit", "sinkhole.policy.sources"),
    ("sinkhole.service",),  # config (a leaf), build, process, server, workers, systemd, metrics, explain, control
    ("sinkhole.web",),  # the block page and the web console (the service runs them without importing them)
    ("sinkhole.cli",),
    ("sinkhole.__main__",),
]
# modules of a higher layer that must import only layer 0 all the same (the settings are plain values; turning
# them into running parts is service.build's job)
LEAVES = ("sinkhole.service.config",)

# (module, top-level name imported inside a function) -> why it may stay there
LAZY_OK: dict[tuple[str, str], str] = {
    ("sinkhole.dns.upstream", "httpx"): "heavy (~170 ms with h2): imported only for an https:// upstream",
    ("sinkhole.dns.upstream", "dns"): "dns.resolver (~120 ms): only to read resolv.conf when no upstream is given",
    ("sinkhole.dns.codec", "dns"): "dnspython's message parser: only to rebuild the rare reply that loses records",
    ("sinkhole.service.operations", "sinkhole.policy.fetch"): "urllib.request, http.client and ssl (8-23 ms): only "
    "to fetch a list; every CLI command imports operations",
}
# the CLI loads a subcommand's module by name when that command runs (LazyGroup in sinkhole/cli/__init__.py):
# `sinkhole block add` does not import the server, dnspython's resolver or prometheus_client
LAZY_COMMANDS_MODULE = "sinkhole.cli"

# third-party or stdlib modules that only these modules (or packages) may import
ONLY_IN: dict[str, tuple[str, ...]] = {
    "dnslib": ("sinkhole.dns.codec",),
    "sqlite3": ("sinkhole.store",),
    "sqlite_utils": ("sinkhole.store",),
    "click": ("sinkhole.cli",),
    "prometheus_client": ("sinkhole.service.metrics",),
    "aiohttp": ("sinkhole.web",),
    "jinja2": ("sinkhole.web",),
}

# Transitional, for the commits of the move. Every list only shrinks: the test fails when an entry is no longer
# needed, so that the commit that fixed it also removes it. All empty when the move is done.
PLANNED: dict[str, str] = {}  # module not moved yet -> where it goes: the layer rules apply as if it were there
KNOWN_SQL: set[tuple[str, str]] = set()  # (module, what) SQL run outside the store
KNOWN_CYCLES: list[set[str]] = []  # import circles not broken yet
# (module, imported module) against the layers
KNOWN_UPWARD: set[tuple[str, str]] = set()
# (module, imported module or top-level name) inside a function
KNOWN_LAZY: set[tuple[str, str]] = set()
# (module, library) outside the library's home
KNOWN_LEAKS: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # what it imports: a dotted module name (ours, the stdlib's or a third party's)
    line: int
    lazy: bool  # inside a function
    type_only: bool  # under `if TYPE_CHECKING:`


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> Iterator[Import]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:  # from .x import y
            up = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*up, base] if base else up)
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]

    def visit(node: ast.AST, lazy: bool, type_only: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in dict.fromkeys(resolve(child)):
                    yield Import(name, target, child.lineno, lazy, type_only)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from visit(child, True, type_only)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from visit(child, lazy, True)
            else:
                yield from visit(child, lazy, type_only)

    yield from visit(ast.parse(path.read_text(), str(path)), False, False)


@functools.cache
def graph() -> tuple[dict[str, Path], list[Import]]:
    known = modules()
    return known, [i for name, path in known.items() for i in imports_of(name, path, known)]


def ours(target: str, known: dict[str, Path]) -> str | None:
    """The sinkhole module an import names (for `import sinkhole.dns.codec`, that module), or None."""
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def placed(module: str) -> str:
    return PLANNED.get(module, module)


def layer_of(module: str) -> int:
    module, best, found = placed(module), -1, 0
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    return found


def package_of(module: str) -> str:
    return ".".join(placed(module).split(".")[:2])


def cycles(known: dict[str, Path], edges: list[Import]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan), over every import."""
    out: dict[str, set[str]] = {m: set() for m in known}
    for e in edges:
        dst = ours(e.target, known)
        if dst is not None and dst != e.source:
            out[e.source].add(dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(out[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = {stack.pop()}
            while v not in component:
                component.add(stack.pop())
            if len(component) > 1:
                found.append(component)

    for v in sorted(known):
        if v not in index:
            connect(v)
    return found


def upward(known: dict[str, Path], edges: list[Import]) -> dict[tuple[str, str], str]:
    bad = {}
    for e in edges:
        dst = ours(e.target, known)
        if dst is None or dst in (e.source, "sinkhole", package_of(e.source)):
            continue  # not ours; itself; __version__; its package's docstring-only __init__
        src_layer, dst_layer = layer_of(e.source), layer_of(dst)
        if dst_layer < src_layer or (dst_layer == src_layer and (package_of(e.source) == package_of(dst)
                                                                 or src_layer == 0)):
            continue
        bad[(e.source, dst)] = f"{e.source}:{e.line} imports {dst} (layer {dst_layer} from layer {src_layer})"
    return bad


def lazy_imports(known: dict[str, Path], edges: list[Import]) -> dict[tuple[str, str], int]:
    return {(e.source, ours(e.target, known) or e.target.split(".")[0]): e.line
            for e in edges if e.lazy and not e.type_only}


# ---------------------------------------------------------------------------- the tests


def test_no_import_circles() -> None:
    found = cycles(*graph())
    assert [sorted(c) for c in found if c not in KNOWN_CYCLES] == [], "an import circle: break it (DESIGN.md)"
    assert [sorted(c) for c in KNOWN_CYCLES if c not in found] == [], "broken already: remove from KNOWN_CYCLES"


def test_imports_only_go_down() -> None:
    known, edges = graph()
    bad = upward(known, edges)
    assert [text for key, text in sorted(bad.items()) if key not in KNOWN_UPWARD] == []
    leaves = {(e.source, d) for e in edges if placed(e.source) in LEAVES and (d := ours(e.target, known)) is not None}
    assert sorted(KNOWN_UPWARD - set(bad) - leaves) == [], "fixed already: remove from KNOWN_UPWARD"
    assert sorted(set(PLANNED) - set(known)) == [], "moved already: remove from PLANNED"


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_import_only_layer_0(leaf: str) -> None:
    known, edges = graph()
    bad = {(e.source, d) for e in edges if placed(e.source) == leaf and (d := ours(e.target, known)) is not None
           and layer_of(d) != 0}
    assert sorted(bad - KNOWN_UPWARD) == [], f"{leaf} is a leaf: it imports only layer 0"


def test_imports_inside_functions_are_only_optional_heavy_dependencies() -> None:
    known, edges = graph()
    lazy = lazy_imports(known, edges)
    unexpected = [f"{m}:{line} imports {t} inside a function" for (m, t), line in sorted(lazy.items())
                  if (placed(m), t) not in LAZY_OK and (m, t) not in KNOWN_LAZY]
    assert unexpected == [], "import it at the top of the module (or name an optional heavy dependency in LAZY_OK)"
    assert sorted(KNOWN_LAZY - set(lazy)) == [], "at the top already: remove from KNOWN_LAZY"


@pytest.mark.parametrize("library", sorted(ONLY_IN))
def test_libraries_stay_home(library: str) -> None:
    _, edges = graph()
    homes = ONLY_IN[library]
    users = {e.source for e in edges if e.target.split(".")[0] == library
             and not any(placed(e.source) == h or placed(e.source).startswith(h + ".") for h in homes)}
    known = {m for m, lib in KNOWN_LEAKS if lib == library}
    assert sorted(users - known) == [], f"{library} belongs to {', '.join(homes)}"
    assert sorted(known - users) == [], "fixed already: remove from KNOWN_LEAKS"


# Wire parsing (reading a DNS message's fields from its bytes by hand) is the codec's, but for these modules:
# module -> why. Found by the shape of such code: a 16-bit field read as `b[i] << 8 | b[i + 1]`, or int.from_bytes.
WIRE_OUTSIDE_CODEC: dict[str, str] = {
    "sinkhole.dns._fast": "compiled per-packet code (Cython, _fast.pyx): the header and question of a query read in "
    "C to answer a blocked name without a Python call per field; anything unusual is left to the codec, and "
    "tests/dns/test_fast_blocker.py checks every answer byte for byte against Pipeline.begin's",
    "sinkhole.dns._fastpure": "the pure-Python twin of sinkhole.dns._fast (a host without a C compiler runs it): the "
    "same reads, the same tests (SINKHOLE_PURE=1)",
}
# modules whose code has that shape but reads no DNS message: module -> what it reads
NOT_WIRE: dict[str, str] = {
    "sinkhole.dns.pool": "two random bytes as a number (query IDs and socket slots), from os.urandom",
}
_WIRE_READ = re.compile(r"<<\s*8\b|int\.from_bytes\(")


def test_wire_is_parsed_only_in_the_codec() -> None:
    home = "sinkhole.dns.codec"
    found = set()
    for path in sorted(SOURCE.rglob("*.py")) + sorted(SOURCE.rglob("*.pyx")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if name != home and _WIRE_READ.search(path.read_text()):
            found.add(name)
    named = set(WIRE_OUTSIDE_CODEC) | set(NOT_WIRE)
    assert sorted(found - named) == [], f"DNS wire is read in {home}: add a codec function"
    assert sorted(named - found) == [], "no such code there any more: remove from WIRE_OUTSIDE_CODEC or NOT_WIRE"


SQL_CALLS = frozenset({"execute", "executemany", "executescript", "set_progress_handler", "conn"})


def sql_uses(known: dict[str, Path]) -> dict[tuple[str, str], int]:
    """(module, what) -> line, for every SQL a module runs itself: a connection's execute* (or the `conn` attribute
    that leads to one), and sqlite-utils' `db.query` / `db.atomic` / `db[table]`."""
    found: dict[tuple[str, str], int] = {}
    for name, path in known.items():
        if placed(name) == "sinkhole.store" or placed(name).startswith("sinkhole.store."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            what = None
            if isinstance(node, ast.Attribute) and node.attr in SQL_CALLS:
                what = node.attr
            elif isinstance(node, ast.Attribute) and node.attr in ("query", "atomic") \
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "db":
                what = f"db.{node.attr}"
            elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "db":
                what = "db[table]"
            if what is not None:
                found.setdefault((name, what), node.lineno)
    return found


def test_sql_stays_in_the_store() -> None:
    known, _ = graph()
    found = sql_uses(known)
    assert [f"{m}:{line} runs SQL ({what})" for (m, what), line in sorted(found.items())
            if (m, what) not in KNOWN_SQL] == [], "only sinkhole.store runs SQL: add a store method"
    assert sorted(KNOWN_SQL - set(found)) == [], "fixed already: remove from KNOWN_SQL"


def test_package_inits_hold_only_a_docstring() -> None:
    """Importing policy.names or audit.chain must not import the rest of their package (an import-time circle),
    and a CLI command must load only what it uses."""
    heavy = [name for name, path in modules().items()
             if path.name == "__init__.py" and name not in ("sinkhole", LAZY_COMMANDS_MODULE)
             and any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
                     for n in ast.parse(path.read_text()).body)]
    assert heavy == [], "keep these __init__.py files to a docstring"


def test_every_package_is_installed() -> None:
    """`pip install .` (make install, the systemd unit's /opt/sinkhole) ships what the editable checkout imports:
    the editable install finds subpackages on its own, so only this test notices a package left out."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in SOURCE.rglob("__init__.py")}
    packages = setuptools.get("packages")
    if isinstance(packages, list):
        shipped = set(packages)
    else:
        find = packages["find"]
        shipped = {p for p in on_disk if any(fnmatch.fnmatch(p, pat) for pat in find.get("include", ["*"]))
                   and not any(fnmatch.fnmatch(p, pat) for pat in find.get("exclude", []))}
    assert sorted(on_disk - shipped) == [], "pyproject.toml leaves these packages out of the wheel"


# ---------------------------------------------------------------------------- the report


def report(dot: bool = False) -> str:
    known, edges = graph()
    if dot:
        pairs = {(package_of(e.source), package_of(d)) for e in edges
                 if (d := ours(e.target, known)) is not None and package_of(d) != package_of(e.source)}
        return "digraph sinkhole {\n" + "".join(f'  "{a}" -> "{b}";\n' for a, b in sorted(pairs)) + "}\n"
    lines = []
    for name in sorted(known):
        own = [e for e in edges if e.source == name]
        top = sorted({d for e in own if not e.lazy and not e.type_only
                      and (d := ours(e.target, known)) not in (None, name)})
        lazy = sorted({f"{(ours(e.target, known) or e.target).removeprefix('sinkhole.')}@{e.line}"
                       for e in own if e.lazy})
        typed = sorted({ours(e.target, known) or e.target for e in own if e.type_only})
        short = ", ".join(t.removeprefix("sinkhole.") for t in top) or "-"
        lines.append(f"{name.removeprefix('sinkhole.')} (layer {layer_of(name)}) -> {short}")
        if lazy:
            lines.append(f"    inside functions: {', '.join(lazy)}")
        if typed:
            lines.append(f"    TYPE_CHECKING: {', '.join(t.removeprefix('sinkhole.') for t in typed)}")
    found = cycles(known, edges)
    lines.append("circles: " + ("; ".join(" <-> ".join(sorted(c)) for c in found) or "none"))
    counts: dict[str, int] = {}
    for name, path in known.items():
        counts[package_of(name)] = counts.get(package_of(name), 0) + len(path.read_text().splitlines())
    lines.append("lines: " + ", ".join(f"{p.removeprefix('sinkhole.')} {n}" for p, n in sorted(counts.items()))
                 + f"; total {sum(counts.values())}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(report(dot="--dot" in sys.argv))
