"""Tamper evidence for the audit log: every row carries an HMAC chained to the previous row of its chain.

Keys. The audit key file (`<db>.key` unless SINKHOLE_AUDIT_KEY names another, mode 0600) holds one key and
its generation number. Every writer that starts a chain takes the current key K_g under a lock, writes
K_{g+1} = HMAC(K_g, "next") over it (atomically) and derives its chain key from K_g; so the file only ever
holds a key newer than every chain already started, and K_g cannot be computed back from K_{g+1}.

Chains. A chain is named `<node>#<generation>#<random>`; its rows have link 0, 1, 2, ... and
    mac_n = HMAC-SHA256(key_e, mac_{n-1} || canonical(row_n))    (mac_{-1} = 32 zero bytes)
where key_0 = HMAC(K_g, "chain:" + chain) and key_{e+1} = HMAC(key_e, "next") every EPOCH_ROWS links. The
chain keys live only in the writer's memory and are forgotten as they evolve.

canonical(row) is JSON of every stored column but `seq` and `mac` (including `chain` and `link`). `seq` is
left out because SQLite assigns it at insert and several chains share it; the order within a chain is
`link`, which is covered.

An auditor holding an earlier key (the operator's copy, `sinkhole log anchor --export-key`) evolves it to
each chain's generation and walks every chain: `verify`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sinkhole.errors import ConfigError

EPOCH_ROWS = 1000  # the chain key evolves every this many rows of a chain
ZERO = bytes(32)
_MAGIC = "sinkhole-audit-key"
# the columns a MAC covers, in this order, with the type SQLite gives them back as
MAC_COLUMNS: list[tuple[str, type]] = [
    ("time", str), ("client", str), ("transport", str), ("qname", str), ("qtype", str), ("action", str),
    ("rule", str), ("category", str), ("rcode", str), ("answer", str), ("policy_version", int),
    ("upstream", str), ("latency_ms", float), ("node", str), ("chain", str), ("link", int),
]
# columns added in schema version 4: appended to the MAC input when any is set, so that rows written
# before them still verify, and a value set or cleared later still breaks the MAC
EXTRA_COLUMNS: list[tuple[str, type]] = [("grp", str), ("asked", str), ("list", str)]


class AuditKeyError(ConfigError):
    """The audit key file is missing, unreadable or malformed."""


def default_key_path(db: str | os.PathLike[str]) -> Path:
    env = os.environ.get("SINKHOLE_AUDIT_KEY")
    return Path(env) if env else Path(f"{os.fspath(db)}.key")


class _Mac:
    """HMAC-SHA256 under one key with the padded key hashed once: a third of hmac.digest's cost per row."""

    def __init__(self, key: bytes) -> None:
        padded = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def __call__(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def evolve(key: bytes) -> bytes:
    return hmac.digest(key, b"next", "sha256")


def fingerprint(key: bytes) -> str:
    return hashlib.sha256(b"fingerprint:" + key).hexdigest()[:16]


def chain_key(file_key: bytes, chain: str) -> bytes:
    return hmac.digest(file_key, b"chain:" + chain.encode(), "sha256")


def chain_generation(chain: str) -> int | None:
    parts = chain.rsplit("#", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


# ---------------------------------------------------------------------------- key files


def read_key(path: Path) -> tuple[int, bytes]:
    try:
        text = path.read_text().split()
    except OSError as exc:
        raise AuditKeyError(f"cannot read the audit key {path}: {exc.strerror or exc}") from None
    if len(text) != 3 or text[0] != _MAGIC or not text[1].isdigit():
        raise AuditKeyError(f"{path} is not a sinkhole audit key file")
    try:
        key = bytes.fromhex(text[2])
    except ValueError:
        raise AuditKeyError(f"{path} is not a sinkhole audit key file") from None
    if len(key) != 32:
        raise AuditKeyError(f"{path} is not a sinkhole audit key file")
    return int(text[1]), key


def write_key(path: Path, generation: int, key: bytes) -> None:
    """Write atomically (temporary file, fsync, rename), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{_MAGIC} {generation} {key.hex()}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_key(path: Path) -> tuple[int, bytes, bool]:
    """The current key, made (generation 0) if there is none; returns (generation, key, created)."""
    with _locked(path):
        if path.exists():
            return (*read_key(path), False)
        key = secrets.token_bytes(32)
        write_key(path, 0, key)
        return 0, key, True


def take_key(path: Path) -> tuple[int, bytes, bool]:
    """Take the current key for a new chain and move the file one generation forward, under a lock."""
    with _locked(path):
        created = not path.exists()
        if created:
            generation, key = 0, secrets.token_bytes(32)
        else:
            generation, key = read_key(path)
        write_key(path, generation + 1, evolve(key))
        return generation, key, created


# ---------------------------------------------------------------------------- writing


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # made once: json.dumps(separators=) makes one a call


def canonical(values: list[object]) -> bytes:
    """The MAC input for one row: its MAC_COLUMNS values, as SQLite gives them back, as compact JSON."""
    return _ENCODE(values).encode()


def normalized(row: dict) -> list[object]:
    out: list[object] = []
    for name, kind in MAC_COLUMNS:
        v = row.get(name)
        out.append(None if v is None else kind(v))
    extras = [row.get(name) for name, _ in EXTRA_COLUMNS]
    if any(v is not None for v in extras):
        out.extend(None if v is None else kind(v) for v, (_, kind) in zip(extras, EXTRA_COLUMNS, strict=True))
    return out


@dataclass
class Chain:
    """The writer's side of one chain: its name, next link, last MAC and current key (in memory only)."""

    name: str
    generation: int
    key: bytes
    link: int = 0
    prev: bytes = ZERO

    @classmethod
    def start(cls, key_path: Path, node: str) -> tuple[Chain, bool, str]:
        generation, file_key, created = take_key(key_path)
        name = f"{node}#{generation}#{secrets.token_hex(4)}"
        return cls(name, generation, chain_key(file_key, name)), created, fingerprint(file_key)

    def seal(self, rows: list[tuple]) -> tuple[list[tuple], tuple[int, bytes, bytes]]:
        """Rows in AUDIT_INSERT order without (chain, link, mac) -> with them; and the state after them,
        to `commit` once they are stored (a failed write is retried with the same links).

        A row is the 14 MAC_COLUMNS before `chain`, then the EXTRA_COLUMNS, then `rname` (derived from
        qname, not covered: verify checks it against qname instead)."""
        link, prev, key, name = self.link, self.prev, self.key, self.name
        out = []
        encode, mac = _ENCODE, _Mac(key)
        for r in rows:
            if link and link % EPOCH_ROWS == 0:
                key = evolve(key)
                mac = _Mac(key)
            values = [*r[:14], name, link]
            if values[12] is not None and type(values[12]) is not float:  # latency_ms comes back as REAL
                values[12] = float(values[12])
            extras = r[14:17]
            if extras[0] is not None or extras[1] is not None or extras[2] is not None:
                values.extend(extras)
            prev = mac(prev + encode(values).encode())
            out.append((*values[:14], *extras, r[17], name, link, prev.hex()))
            link += 1
        return out, (link, prev, key)

    def commit(self, state: tuple[int, bytes, bytes]) -> None:
        self.link, self.prev, self.key = state


# ---------------------------------------------------------------------------- verifying


@dataclass
class _Walk:
    name: str
    key: bytes | None
    epoch: int = 0
    expected: int = 0
    prev: bytes = ZERO
    rows: int = 0
    last_seq: int | None = None
    last_time: str | None = None
    problem: str | None = None
    pending: tuple[int, str, int] | None = None  # (seq, problem, link) waiting for the next row to refine it
    at_anchor: str | None = None  # the MAC of the row at the anchor's link, when seen
    mac: _Mac | None = None

    def mac_for(self, link: int) -> _Mac:
        """The MAC under the key of the epoch of `link` (links only grow while a chain verifies)."""
        assert self.key is not None
        epoch = link // EPOCH_ROWS
        if self.mac is None or self.epoch < epoch:
            while self.epoch < epoch:
                self.key = evolve(self.key)
                self.epoch += 1
            self.mac = _Mac(self.key)
        return self.mac


@dataclass
class Report:
    chains: dict[str, _Walk]
    before_chain: int
    problems: list[tuple[str | None, str]]  # (chain or None, what is wrong)
    anchored: bool

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(conn: sqlite3.Connection, key_generation: int, key: bytes,
           anchor: dict[str, dict] | None = None, current: tuple[int, bytes] | None = None) -> Report:
    """Walk every chain in seq order with the operator's key (of `key_generation`); report what is wrong.

    `current` is the server's key file now (generation, key), when it can be read: it must descend from the
    operator's key, and every generation before it must have a chain in the log (each chain start takes one),
    so that a chain deleted whole, or rewritten under a newer generation with a stolen key, shows."""
    cols = ", ".join([name for name, _ in MAC_COLUMNS + EXTRA_COLUMNS] + ["rname"])
    cur = conn.execute(f"SELECT seq, mac, {cols} FROM audit ORDER BY seq")
    names = [d[0] for d in cur.description]
    walks: dict[str, _Walk] = {}
    problems: list[tuple[str | None, str]] = []
    before = 0
    chained_seen = False
    unchained: list[int] = []
    for tup in cur:
        row = dict(zip(names, tup, strict=True))
        seq, name = row["seq"], row["chain"]
        if name is None or row["mac"] is None or row["link"] is None:
            if name is None and not chained_seen:
                before += 1
            elif name is None:
                unchained.append(seq)
            else:
                w = walks.get(name)
                if w is not None and w.problem is None:
                    _finish_pending(w)
                    w.problem = f"seq {seq}: inserted (row of chain {name} without a link or MAC)"
                elif w is None:
                    unchained.append(seq)
            continue
        chained_seen = True
        w = walks.get(name)
        if w is None:
            w = walks[name] = _new_walk(name, key_generation, key)
        link = row["link"]
        mac = str(row["mac"])
        if anchor and name in anchor and link == anchor[name].get("link"):
            w.at_anchor = mac
        w.rows += 1
        if w.problem is not None:
            continue
        if w.pending is not None:
            _refine(w, link, mac, normalized(row))
            continue
        if w.key is None:
            continue  # a chain this key cannot verify: already a problem
        if link == w.expected:
            values = normalized(row)
            good = w.mac_for(link)(w.prev + canonical(values))
            if hmac.compare_digest(good.hex(), mac):
                w.prev, w.expected, w.last_seq, w.last_time = good, link + 1, seq, row["time"]
                rname = row["rname"]
                if rname is not None and rname != ".".join(reversed(str(row["qname"]).split("."))):
                    w.problem = f"seq {seq}: edited (rname {rname!r} does not match qname {row['qname']!r})"
            else:
                w.pending = (seq, "edited or forged (MAC mismatch)", link)
        elif link > w.expected:
            w.pending = (seq, f"deleted: links {w.expected}..{link - 1} are missing before it", link)
        else:
            w.problem = (f"seq {seq}: inserted or reordered (link {link} comes after link {w.expected - 1}"
                         f" of chain {name})")
    for w in walks.values():
        _finish_pending(w)
    for w in walks.values():
        if w.problem:
            problems.append((w.name, f"chain {w.name}: {w.problem}"))
    if unchained:
        more = f" (and {len(unchained) - 1} more)" if len(unchained) > 1 else ""
        problems.append((None, f"seq {unchained[0]}: inserted (a row without a chain or MAC after the chains "
                               f"started){more}"))
    _check_generations(walks, key_generation, key, current, problems)
    if anchor:
        for name, head in anchor.items():
            w = walks.get(name)
            want = head.get("link")
            if w is None:
                problems.append((name, f"chain {name}: truncated: every row is gone since the anchor"
                                       f" (it had link {want}, seq {head.get('seq')})"))
            elif w.at_anchor is None:
                last = w.expected - 1
                problems.append((name, f"chain {name}: truncated: it ends at link {last} (seq {w.last_seq}), "
                                       f"the anchor has link {want} (seq {head.get('seq')})"))
            elif w.at_anchor != head.get("mac"):
                problems.append((name, f"chain {name}: the row at link {want} is not the one anchored"
                                       " (MAC differs)"))
    return Report(walks, before, problems, anchor is not None)


def _check_generations(walks: dict[str, _Walk], key_generation: int, key: bytes,
                       current: tuple[int, bytes] | None, problems: list[tuple[str | None, str]]) -> None:
    seen = {g for name in walks if (g := chain_generation(name)) is not None}
    top = max(seen, default=key_generation - 1) + 1
    if current is not None:
        generation, now = current
        k = key
        for _ in range(generation - key_generation):
            k = evolve(k)
        if generation < key_generation or not hmac.compare_digest(k, now):
            problems.append((None, f"the server's audit key (generation {generation}) does not descend from the "
                                   f"key given (generation {key_generation}): replaced, or the wrong key file"))
        else:
            top = max(top, generation)
    missing = [g for g in range(key_generation, top) if g not in seen]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        problems.append((None, f"key generations {shown} have no chain in the log: a chain was deleted whole "
                               "(or its writer stopped before storing a row, or its database file was deleted)"))


def _new_walk(name: str, key_generation: int, key: bytes) -> _Walk:
    generation = chain_generation(name)
    if generation is None:
        return _Walk(name, None, problem="not a chain name this writer makes (forged?)")
    if generation < key_generation:
        return _Walk(name, None, problem=f"started with key generation {generation}, before the key given "
                                         f"(generation {key_generation}): cannot verify it")
    file_key = key
    for _ in range(generation - key_generation):
        file_key = evolve(file_key)
    return _Walk(name, chain_key(file_key, name))


def _refine(w: _Walk, link: int, mac: str, values: list[object]) -> None:
    """The row after a suspicious one tells what happened to it."""
    assert w.pending is not None
    seq, problem, bad_link = w.pending
    if problem.startswith("edited") and link == bad_link and w.key is not None:
        good = w.mac_for(link)(w.prev + canonical(values))
        if hmac.compare_digest(good.hex(), mac):
            problem = f"inserted (a forged row before the real link {link})"
    elif problem.startswith("deleted") and w.expected <= link < bad_link:
        problem = f"reordered (link {bad_link} comes before link {link})"
    w.pending = None
    w.problem = f"seq {seq}: {problem}"


def _finish_pending(w: _Walk) -> None:
    if w.pending is not None:
        seq, problem, _ = w.pending
        w.pending = None
        w.problem = f"seq {seq}: {problem}"


def heads(conn: sqlite3.Connection) -> list[dict]:
    """The last row of every chain: what `sinkhole log anchor` prints."""
    sql = ("SELECT a.chain, a.link, a.seq, a.mac, a.time FROM audit a JOIN "
           "(SELECT chain, max(link) AS link FROM audit WHERE chain IS NOT NULL GROUP BY chain) h "
           "ON a.chain = h.chain AND a.link = h.link ORDER BY a.chain, a.seq")
    out: dict[str, dict] = {}
    for chain, link, seq, mac, when in conn.execute(sql):
        out.setdefault(chain, {"chain": chain, "link": link, "seq": seq, "mac": mac, "time": when})
    return list(out.values())


def read_anchor(path: Path) -> dict[str, dict]:
    """An anchor file (JSON Lines from `sinkhole log anchor`) -> chain -> head."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise AuditKeyError(f"cannot read the anchor {path}: {exc.strerror or exc}") from None
    out: dict[str, dict] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            head = json.loads(line)
            out[str(head["chain"])] = head
        except (ValueError, KeyError, TypeError):
            raise AuditKeyError(f"{path} line {n}: not an anchor line from `sinkhole log anchor`") from None
    return out
