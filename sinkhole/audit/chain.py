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
`link`, which is covered. Columns added later are appended only when they hold something else than what
older rows hold (EXTRA_COLUMNS when set, `count` when not 1), so rows sealed before them still verify.

An auditor holding an earlier key (the operator's copy, `sinkhole log anchor --export-key`) evolves it to
each chain's generation and walks every chain: `verify`.

Retention. A prune deletes, for each chain, a prefix of its links (links 0..F-1) and first writes, as rows of a new
chain of its own (action `checkpoint`, one key generation), what the verifier needs to resume each chain: the chain,
F (`first_link`), the MAC of link F-1 (`prev_mac`), how many rows and which time range went. `verify` lets a chain
jump to a checkpointed F (from any link below it: links below F were declared pruned) with that MAC as the previous
one, and nowhere else; the checkpoint rows are verified like any row, so a forged or edited checkpoint is itself
reported and resumes nothing. The first row of each checkpoint chain also carries the key generations whose chains
are gone whole (cumulative), so the generation check still holds after old chains are pruned away.

The change journal is chained too: each entry (by id) has `link` = the key generation its writer took (one per
Store that writes: a CLI command, a first start) and `mac = HMAC(chain_key(K_link, "journal"), mac_prev ||
canonical(entry))` where mac_prev is the MAC of the sealed entry before it (32 zero bytes before the first) and the
entry's id is covered, so an edited, deleted, inserted or reordered entry shows: `verify_journal`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import json.encoder
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from sinkhole import files
from sinkhole.errors import ConfigError
from sinkhole.policy.names import reverse_name

EPOCH_ROWS = 1000  # the chain key evolves every this many rows of a chain
PROGRESS_ROWS = 10_000  # rows walked between two progress reports of verify
TIME_SLACK = 60.0  # seconds a row may be dated before an earlier one of its chain (audit queue, clock steps)
GAP = "gap"  # the action of a row that counts lost rows (sinkhole.audit): dated at the first of them
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
# schema version 6: how many answers a row stands for. A row of count 1 (every row written before it) is sealed as
# before; any other count is appended after the EXTRA_COLUMNS (all three, set or not), so the MAC input of a row
# with a count is one value longer than any without, and a count changed either way breaks the MAC
COUNT = "count"


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
        text = path.read_text()
    except OSError as exc:
        raise AuditKeyError(f"cannot read the audit key {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise AuditKeyError(f"{path} is not a sinkhole audit key file") from None
    return parse_key(text, str(path))


def parse_key(text: str, where: str = "the key") -> tuple[int, bytes]:
    """(generation, key) from a key file's text; `where` names it in the error."""
    fields = text.split()
    if len(fields) != 3 or fields[0] != _MAGIC or not fields[1].isdigit():
        raise AuditKeyError(f"{where} is not a sinkhole audit key file")
    try:
        key = bytes.fromhex(fields[2])
    except ValueError:
        raise AuditKeyError(f"{where} is not a sinkhole audit key file") from None
    if len(key) != 32:
        raise AuditKeyError(f"{where} is not a sinkhole audit key file")
    return int(fields[1]), key


def write_key(path: Path, generation: int, key: bytes) -> None:
    """Write atomically (a new file of an unpredictable name, fsync, rename), mode 0600; a key file of the
    service user replaced by root (a CLI run with sudo) stays the service user's."""
    files.private_dirs(path.parent)
    files.write_private(path, f"{_MAGIC} {generation} {key.hex()}\n".encode(), keep_owner=True)


def is_key_of(path: Path, generation: int, key: bytes) -> bool:
    """The key file at `path` holds `key` at `generation` or an earlier generation of it (an older export of
    the same database's key): evolving it forward gives `key`. False for any other file."""
    try:
        have_generation, have = read_key(path)
    except AuditKeyError:
        return False
    if have_generation > generation:
        return False
    for _ in range(generation - have_generation):
        have = evolve(have)
    return hmac.compare_digest(have, key)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    files.private_dirs(path.parent)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, files.FILE_MODE)
    try:
        try:  # made by root: leave it to the key file's owner, as write_key does
            st = os.stat(path)
            if st.st_uid != os.fstat(fd).st_uid:
                os.fchown(fd, st.st_uid, st.st_gid)
        except (FileNotFoundError, PermissionError):
            pass
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


def _compact_encoder() -> Callable[[object], str]:
    """JSONEncoder(separators=(",", ":")).encode, the same text: with CPython's C encoder made once, not at
    every call as encode() does (1.6 us a row instead of 3.9); the pure-Python encoder where there is none."""
    enc = json.JSONEncoder(separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return enc.encode
    # no circular check: the values are flat lists of str, int, float and None
    it = make(None, enc.default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)
    return lambda values: "".join(it(values, 0))


_ENCODE = _compact_encoder()


def canonical(values: list[object]) -> bytes:
    """The MAC input for one row: its MAC_COLUMNS values, as SQLite gives them back, as compact JSON."""
    return _ENCODE(values).encode()


def normalized(row: dict) -> list[object]:
    out: list[object] = []
    for name, kind in MAC_COLUMNS:
        v = row.get(name)
        out.append(None if v is None else kind(v))
    extras = [row.get(name) for name, _ in EXTRA_COLUMNS]
    count = row.get(COUNT)
    counted = count is not None and count != 1
    if counted or any(v is not None for v in extras):
        out.extend(None if v is None else kind(v) for v, (_, kind) in zip(extras, EXTRA_COLUMNS, strict=True))
    if counted:
        out.append(count)  # an int as SQLite gives it back; anything else an edit put there is sealed as it is
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
        qname, not covered: verify checks it against qname instead), then `count` (see COUNT); a row of 18
        values, or a count of None, stands for one answer. The sealed row is in AUDIT_INSERT order: ..., rname, count,
        chain, link, mac."""
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
            count = (r[18] if len(r) > 18 else None) or 1
            if count != 1:
                values.extend(extras)
                values.append(count)
            elif extras[0] is not None or extras[1] is not None or extras[2] is not None:
                values.extend(extras)
            prev = mac(prev + encode(values).encode())
            out.append((*values[:14], *extras, r[17], count, name, link, prev.hex()))
            link += 1
        return out, (link, prev, key)

    def commit(self, state: tuple[int, bytes, bytes]) -> None:
        self.link, self.prev, self.key = state


# ---------------------------------------------------------------------------- checkpoints (retention)

CHECKPOINT = "checkpoint"  # the action of a checkpoint row (model.Action.CHECKPOINT)
JOURNAL = "journal"


def merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    """[[lo, hi], ...] (inclusive) -> sorted, overlapping and adjacent ones merged."""
    out: list[list[int]] = []
    for lo, hi in sorted([int(a), int(b)] for a, b in ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def checkpoint_rows(summary: dict, entries: list[dict], when: str, node: str, policy_version: int) -> list[tuple]:
    """The checkpoint rows of one prune, in Chain.seal's input layout: the summary first (link 0), then one row
    per chain entry; the data is JSON in `answer`. Every row has the same time, so they are pruned together."""
    data = [{**summary, "of": len(entries) + 1}, *entries]
    return [(when, "", "", "", "", CHECKPOINT, None, None, "", _ENCODE(d), policy_version, None, None, node,
             None, None, None, None, 1) for d in data]


@dataclass
class Checkpoints:
    resume: dict[str, dict[int, tuple[bytes, int]]]  # chain -> first_link -> (MAC of link first_link-1, seq)
    gone: list[list[int]]  # key generations whose chains were pruned whole: [lo, hi] ranges
    problems: list[tuple[str | None, str]]
    entries: list[dict]  # every verified checkpoint entry, with the seq and chain of the row that holds it


# the audit columns a verifier reads, besides seq and mac
ROW_COLUMNS = [name for name, _ in MAC_COLUMNS + EXTRA_COLUMNS] + ["rname", COUNT]


class Rows(Protocol):
    """Where the rows to verify come from (sinkhole.store.Store): this module runs no SQL."""

    def chained_rows(self) -> Iterable[dict]:
        """Every audit row (seq, mac and ROW_COLUMNS) in seq order."""

    def checkpoint_rows(self) -> Iterable[dict]:
        """The checkpoint rows (action CHECKPOINT), as chained_rows gives them, in seq order."""

    def journal_rows(self) -> Iterable[dict]:
        """Every journal entry (JOURNAL_COLUMNS and mac) in id order."""

    def journal_generations(self) -> dict[int, str]:
        """Key generation -> the time of the first journal entry sealed with it ({} without a journal)."""


def read_checkpoints(log: Rows, key_generation: int | None = None, key: bytes | None = None) -> Checkpoints:
    """The checkpoint rows whose MACs verify under the key given (each checkpoint chain from link 0, up to its
    first bad row: the main walk reports that one). With no key (the pruner's side): every checkpoint row."""
    out = Checkpoints({}, [], [], [])
    by_chain: dict[str, list[dict]] = {}
    for row in log.checkpoint_rows():
        if row["chain"] is not None and row["mac"] is not None and row["link"] is not None:
            by_chain.setdefault(row["chain"], []).append(row)
    for name, rows in by_chain.items():
        valid: list[tuple[int, object]] = []
        if key is None or key_generation is None:
            valid = [(r["seq"], _json(r["answer"])) for r in rows]
        else:
            w = _new_walk(name, key_generation, key)
            if w.key is None:
                continue
            for row in rows:
                if row["link"] != w.expected:
                    break
                good = w.mac_for(row["link"])(w.prev + canonical(normalized(row)))
                if not hmac.compare_digest(good.hex(), str(row["mac"])):
                    break
                w.prev, w.expected = good, row["link"] + 1
                valid.append((row["seq"], _json(row["answer"])))
            if not valid:
                continue
            of = valid[0][1].get("of") if isinstance(valid[0][1], dict) else None
            if len(valid) == len(rows) and isinstance(of, int) and len(rows) < of:
                out.problems.append((name, f"checkpoint chain {name}: truncated: {len(rows)} of its {of} rows "
                                           "are left (checkpoints deleted)"))
        for seq, data in valid:
            if not isinstance(data, dict):
                continue
            for pair in data.get("gone_generations") or []:
                if isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, int) for x in pair):
                    out.gone.append(pair)
            c, f, prev = data.get("chain"), data.get("first_link"), data.get("prev_mac")
            if isinstance(c, str) and isinstance(f, int) and isinstance(prev, str):
                try:
                    out.resume.setdefault(c, {})[f] = (bytes.fromhex(prev), seq)
                except ValueError:
                    continue
            out.entries.append({**data, "checkpoint_seq": seq, "checkpoint_chain": name})
    out.gone = merge_ranges(out.gone)
    return out


def _json(text: object) -> object:
    try:
        return json.loads(str(text))
    except ValueError:
        return None


# ---------------------------------------------------------------------------- the change journal

JOURNAL_COLUMNS: list[tuple[str, type]] = [
    ("id", int), ("time", str), ("user", str), ("sudo_user", str), ("host", str), ("command", str),
    ("action", str), ("kind", str), ("category", str), ("domains", str), ("detail", str), ("link", int),
]


def journal_key(file_key: bytes) -> bytes:
    return chain_key(file_key, JOURNAL)


def journal_mac(key: bytes, prev: bytes, entry: dict) -> bytes:
    """The MAC of one journal entry (with its id and `link`, the key generation) under the journal key."""
    values = [None if entry.get(c) is None else kind(entry[c]) for c, kind in JOURNAL_COLUMNS]
    return hmac.digest(key, prev + canonical(values), "sha256")


@dataclass
class JournalReport:
    entries: int = 0
    before: int = 0  # entries from before the journal was chained (no MAC): not covered
    sealed: int = 0
    first_id: int | None = None
    last_id: int | None = None
    problem: str | None = None
    generations: set[int] = field(default_factory=set)


def verify_journal(log: Rows, key_generation: int, key: bytes) -> JournalReport:
    """Walk the journal in id order; the first entry edited, deleted, inserted, reordered or unsealed."""
    report = JournalReport()
    keys: dict[int, bytes] = {}
    prev, prev_id, started = ZERO, None, False
    for row in log.journal_rows():
        report.entries += 1
        ident = int(row["id"])
        report.first_id = ident if report.first_id is None else report.first_id
        report.last_id = ident
        if report.problem is not None:
            continue
        if prev_id is not None and ident != prev_id + 1:
            report.problem = (f"journal entry id {ident}: deleted: entries {prev_id + 1}..{ident - 1} are missing"
                              " before it" if ident > prev_id + 1 else f"journal entry id {ident}: reordered")
            continue
        prev_id = ident
        if row["mac"] is None or row["link"] is None:
            if started:
                report.problem = (f"journal entry id {ident}: written without a MAC after the journal chain "
                                  "started (its writer could not take the audit key, or it was inserted)")
            else:
                report.before += 1
            continue
        started = True
        generation = int(row["link"])
        if generation < key_generation:
            report.problem = (f"journal entry id {ident}: sealed with key generation {generation}, before the key "
                              f"given (generation {key_generation}): cannot verify it")
            continue
        if generation not in keys:  # evolve from the nearest generation already computed
            base = max((g for g in keys if g <= generation), default=None)
            file_key = keys[base] if base is not None else key
            for _ in range(generation - (base if base is not None else key_generation)):
                file_key = evolve(file_key)
            keys[generation] = file_key
        good = journal_mac(journal_key(keys[generation]), prev, row)
        if not hmac.compare_digest(good.hex(), str(row["mac"])):
            report.problem = f"journal entry id {ident}: edited, forged or inserted (MAC mismatch)"
            continue
        prev = good
        report.sealed += 1
        report.generations.add(generation)
    return report


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
    resume: dict[int, tuple[bytes, int]] = field(default_factory=dict)  # checkpointed link -> (MAC before, seq)
    pruned_below: int = 0  # links below this were pruned (a checkpoint said so)
    checkpoint_seq: int | None = None  # the checkpoint row that said so
    # times of the rows verified, gap rows left out (their time is that of the first row they count)
    first_time: str | None = None  # of link 0, when it is there: when the chain began, at the latest
    earliest: tuple[float, str, int] | None = None  # (seconds, time, seq) of the earliest row
    latest: float | None = None  # seconds of the latest row so far
    backwards: str | None = None  # the first row dated more than TIME_SLACK before one before it

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
    pruned: dict[str, tuple[int, int]] = field(default_factory=dict)  # chain pruned whole -> (links, checkpoint seq)
    gone_generations: list[list[int]] = field(default_factory=list)  # [lo, hi] of chains pruned whole long ago
    max_policy_version: int = 0  # the newest journal entry an audit row says was in force

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(log: Rows, key_generation: int, key: bytes,
           anchor: dict[str, dict] | None = None, current: tuple[int, bytes] | None = None,
           progress: Callable[[int], None] | None = None) -> Report:
    """Walk every chain in seq order with the operator's key (of `key_generation`); report what is wrong.

    `current` is the server's key file now (generation, key), when it can be read: it must descend from the
    operator's key, and every generation before it must have a chain in the log (each chain start takes one),
    so that a chain deleted whole, or rewritten under a newer generation with a stolen key, shows.
    `progress` is called with the number of rows walked since its last call (every row of `audit` in all)."""
    cps = read_checkpoints(log, key_generation, key)
    walks: dict[str, _Walk] = {}
    problems: list[tuple[str | None, str]] = []
    problems.extend(cps.problems)
    before = 0
    chained_seen = False
    unchained: list[int] = []
    max_policy = 0
    walked = 0
    for row in log.chained_rows():
        walked += 1
        if progress is not None and walked % PROGRESS_ROWS == 0:
            progress(PROGRESS_ROWS)
        seq, name = row["seq"], row["chain"]
        if row["policy_version"] is not None and row["action"] != CHECKPOINT:
            max_policy = max(max_policy, int(row["policy_version"]))
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
            w.resume = cps.resume.get(name, {})
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
        if link > w.expected and link in w.resume:  # links below were pruned: resume at the checkpoint
            w.prev, w.checkpoint_seq = w.resume[link]
            w.expected = w.pruned_below = link
        if link == w.expected:
            values = normalized(row)
            good = w.mac_for(link)(w.prev + canonical(values))
            if hmac.compare_digest(good.hex(), mac):
                w.prev, w.expected, w.last_seq, w.last_time = good, link + 1, seq, row["time"]
                if row["action"] != GAP:
                    _note_time(w, link, seq, str(row["time"]))
                rname = row["rname"]
                if rname is not None and rname != reverse_name(str(row["qname"])):
                    w.problem = f"seq {seq}: edited (rname {rname!r} does not match qname {row['qname']!r})"
            else:
                w.pending = (seq, "edited or forged (MAC mismatch)", link)
        elif link > w.expected:
            below = [f for f in w.resume if w.expected < f < link]
            if below:  # links below a checkpoint were pruned: only those after it are missing
                w.expected = w.pruned_below = max(below)
                w.prev, w.checkpoint_seq = w.resume[w.expected]
            w.pending = (seq, f"deleted: links {w.expected}..{link - 1} are missing before it", link)
        else:
            w.problem = (f"seq {seq}: inserted or reordered (link {link} comes after link {w.expected - 1}"
                         f" of chain {name})")
    if progress is not None:
        progress(walked % PROGRESS_ROWS)
    for w in walks.values():
        _finish_pending(w)
    for w in walks.values():
        if w.problem:
            problems.append((w.name, f"chain {w.name}: {w.problem}"))
    if unchained:
        more = f" (and {len(unchained) - 1} more)" if len(unchained) > 1 else ""
        problems.append((None, f"seq {unchained[0]}: inserted (a row without a chain or MAC after the chains "
                               f"started){more}"))
    pruned = {name: (max(points), max(seq for _, seq in points.values()))
              for name, points in cps.resume.items() if name not in walks}
    seen = {g for name in [*walks, *pruned] if (g := chain_generation(name)) is not None}
    journal = log.journal_generations()
    _check_generations(seen, key_generation, key, current, problems, cps.gone, set(journal))
    _check_times(journal, walks, anchor, problems)
    if anchor:
        for name, head in anchor.items():
            if name == JOURNAL:
                continue  # verify_journal's
            w = walks.get(name)
            want = head.get("link")
            points = cps.resume.get(name, {})
            below = [f for f in points if isinstance(want, int) and f > want]
            if below:  # the anchored row was pruned since, by a checkpoint that says so
                f = min(below)
                if want == f - 1 and points[f][0].hex() != head.get("mac"):
                    problems.append((name, f"chain {name}: the row at link {want} is not the one anchored (the "
                                           f"checkpoint that pruned it, seq {points[f][1]}, has another MAC)"))
                continue
            if w is None and _in_ranges(chain_generation(name), cps.gone):
                continue  # pruned whole, long ago
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
    return Report(walks, before, problems, anchor is not None, pruned, cps.gone, max_policy)


def _seconds(when: str) -> float | None:
    try:
        return datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


def _note_time(w: _Walk, link: int, seq: int, when: str) -> None:
    t = _seconds(when)
    if t is None:
        return
    if link == 0:
        w.first_time = when
    if w.latest is not None and t < w.latest - TIME_SLACK and w.backwards is None:
        w.backwards = f"seq {seq} is dated {when}, {(w.latest - t) / 60:.0f} minutes before a row before it"
    w.latest = t if w.latest is None else max(w.latest, t)
    if w.earliest is None or t < w.earliest[0]:
        w.earliest = (t, when, seq)


def _check_times(journal: dict[int, str], walks: dict[str, _Walk], anchor: dict[str, dict] | None,
                 problems: list[tuple[str | None, str]]) -> None:
    """What the MACs cannot tell, for someone who holds the current key and writes a new chain of old rows.

    Within a chain the times must not run backwards. A chain cannot have begun before an older key generation
    was first used: that is the time of link 0 of the chain that took it (when link 0 is still there) or of the
    first journal entry sealed with it, so a row dated before it (by more than TIME_SLACK: the audit queue and
    clock steps) was not written when it says. A chain that is not in the anchor began after the anchor was
    taken (it had no row then), so a row of it dated before the anchor's latest head was not either."""
    first_use: dict[int, str] = {}
    for w in walks.values():
        g = chain_generation(w.name)
        if g is not None and w.first_time is not None and w.pruned_below == 0:
            first_use[g] = min(first_use.get(g, w.first_time), w.first_time)
    for g, when in journal.items():  # the first journal entry sealed with each generation
        first_use[g] = min(first_use.get(g, when), when)
    ordered = sorted((g, t) for g, when in first_use.items() if (t := _seconds(when)) is not None)
    anchor_time = max((t for name, head in (anchor or {}).items() if name != JOURNAL
                       and (t := _seconds(str(head.get("time")))) is not None), default=None)
    for name, w in sorted(walks.items()):
        if w.key is None or w.earliest is None:
            continue
        t, when, seq = w.earliest
        if w.backwards is not None:
            problems.append((name, f"chain {name}: times run backwards: {w.backwards}"))
        g = chain_generation(name)
        older = [(og, ot) for og, ot in ordered if g is not None and og < g]
        if older:
            og, ot = max(older, key=lambda x: x[1])
            if t < ot - TIME_SLACK:
                problems.append((name, f"chain {name}: seq {seq} is dated {when}, before the chain began: it has key "
                                       f"generation {g}, and generation {og} was first used at "
                                       f"{first_use[og]}"))
        if anchor is not None and name not in anchor and anchor_time is not None and t < anchor_time - TIME_SLACK:
            problems.append((name, f"chain {name}: not in the anchor, so begun after it, but seq {seq} is dated "
                                   f"{when}, before the anchor's latest head"))


def _in_ranges(g: int | None, ranges: list[list[int]]) -> bool:
    return g is not None and any(lo <= g <= hi for lo, hi in ranges)


def _check_generations(seen: set[int], key_generation: int, key: bytes,
                       current: tuple[int, bytes] | None, problems: list[tuple[str | None, str]],
                       gone: list[list[int]] | None = None, journal: set[int] | None = None) -> None:
    """Every generation from the key given up to the current one must have been taken by a chain still in the
    log, a chain a checkpoint says was pruned, or a journal writer."""
    seen = seen | (journal or set())
    top = max(seen, default=key_generation - 1) + 1
    for _, hi in gone or []:
        top = max(top, hi + 1)
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
    missing = [g for g in range(key_generation, top) if g not in seen and not _in_ranges(g, gone or [])]
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


def read_anchor(path: Path) -> dict[str, dict]:
    """An anchor file (JSON Lines from `sinkhole log anchor`) -> chain -> head."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise AuditKeyError(f"cannot read the anchor {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise AuditKeyError(f"{path}: not an anchor file from `sinkhole log anchor` (not text)") from None
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
