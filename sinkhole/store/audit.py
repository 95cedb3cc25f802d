"""The audit log's rows: inserting the writer's batches, asking the log questions (filters, the live tail,
stats), the rows the chains are verified over, and pruning with checkpoints."""

from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sinkhole.audit import chain
from sinkhole.policy.names import reverse_name
from sinkhole.store.journal import Actor, JournalQueries
from sinkhole.store.schema import AUDIT_INSERT, RBASE, iso

_N = "coalesce(sum(count), 0)"  # the answers some audit rows stand for (each row is `count` identical ones)
MAX_RETENTION_DAYS = 36500  # a hundred years: beyond, the cut-off date is out of datetime's range
PRUNE_BATCH = 2000  # rows deleted in one write transaction by a prune
PRUNE_PAUSE = 0.02  # seconds between two of them, so that the audit writer gets the lock in between
log = logging.getLogger(__name__)

_CHUNK = 256  # audit rows per INSERT statement (x 21 columns: well under SQLite's 32766 variables)


@functools.lru_cache(maxsize=16)
def _chunk_sql(rows: int) -> str:
    """INSERT of `rows` audit rows (AUDIT_INSERT columns, in order)."""
    one = f"({', '.join('?' for _ in AUDIT_INSERT)})"
    return f"INSERT INTO audit ({', '.join(AUDIT_INSERT)}) VALUES {', '.join([one] * rows)}"


_AUDIT_INSERT_SQL = _chunk_sql(1)


@dataclass
class PruneResult:
    before: str
    rows: int = 0  # rows deleted
    chains: int = 0  # chains that lost rows (each has a checkpoint)
    unchained: int = 0  # rows without a chain deleted (from before version 2, or written without a key)
    first_time: str | None = None
    last_time: str | None = None
    checkpoint_chain: str | None = None
    journal_id: int | None = None
    skipped: list[str] = field(default_factory=list)  # chains with rows missing and no checkpoint: left alone
    batches: int = 0
    max_lock_ms: float = 0.0  # the longest the write lock was held by one transaction of the prune
    seconds: float = 0.0
    stopped: bool = False  # stopped between batches: the rest goes at the next prune


def client_prefix(network: str) -> str | None:
    """The text every client address of `network` starts with, as the log stores addresses (dotted quad;
    IPv6 in lower case, no leading zeros, '::' anywhere): for 10.1.16.0/20 '10.1.', the whole octets of the
    prefix. A superset, for a range of the (client, time) index; `in_cidr` then decides exactly.
    None when no text prefix holds: a prefix shorter than one octet (IPv4) or one hextet (IPv6), or an
    IPv6 prefix that starts with a zero hextet, which '::' may swallow."""
    net = ipaddress.ip_network(network, strict=False)
    if net.version == 4:
        sep, parts = ".", str(net.network_address).split(".")[:net.prefixlen // 8]
    else:
        sep, parts = ":", [format(int(h, 16), "x") for h in net.network_address.exploded.split(":")]
        parts = parts[:net.prefixlen // 16]
        if "0" in parts:  # '::' may swallow a zero hextet and what follows: keep the hextets before it
            parts = parts[:parts.index("0")]
    return sep.join(parts) + sep if parts else None


def _cidr_where(network: str, args: dict) -> str:
    """The condition for `client` in `network`, using the (client, time) index where the text allows."""
    net = ipaddress.ip_network(network, strict=False)
    if net.prefixlen == net.max_prefixlen:
        args["client"] = str(net.network_address)
        return "client = :client"
    args["network"] = str(net)
    prefix = client_prefix(network)
    if prefix is None:
        return "in_cidr(client, :network)"
    # '.' + 1 = '/' and ':' + 1 = ';': [prefix, next) holds exactly the texts starting with prefix
    args["client_lo"], args["client_hi"] = prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)
    whole = prefix.count(".") * 8 if net.version == 4 else prefix.count(":") * 16
    if whole == net.prefixlen:  # /8, /16, /24 (IPv6 /16, /32, ...): the prefix is the network, exactly
        return "(client >= :client_lo AND client < :client_hi)"
    return "(client >= :client_lo AND client < :client_hi AND in_cidr(client, :network))"


def _client_where(client: str, args: dict) -> str:
    """The condition for a client address or network as the log may hold it: an IPv4 client is stored as
    '10.0.0.1', or as '::ffff:10.0.0.1' when it reached an IPv6 socket that takes IPv4 too; either form given
    (address or CIDR) matches both (an address: the texts of its mapped form programs write; a CIDR: any text)."""
    net = ipaddress.ip_network(client, strict=False)
    if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
        net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    if net.version == 6:
        return _cidr_where(str(net), args)
    if net.prefixlen == net.max_prefixlen:
        # an address: its text and its mapped form's two (the socket's '::ffff:10.0.0.1', Python 3.11's
        # '::ffff:a00:1'), each a range of the (client, time) index in time order, of which SQLite reads the latest
        # rows only. Not the mapped range below, whose rows it sorts: the latest 100 rows of the busiest client
        # (433,431 rows) of a 10-million-row log took 1.36-1.52 s with it (bench/logquery.py)
        address = net.network_address
        args["client"], args["client_m"] = str(address), f"::ffff:{address}"
        args["client_mx"] = str(ipaddress.IPv6Address(args["client_m"]))
        return "client IN (:client, :client_m, :client_mx)"
    args["mapped"] = f"::ffff:{net.network_address}/{96 + net.prefixlen}"
    # the text of a mapped address varies ('::ffff:10.0.0.1', '::ffff:a00:1'): in_cidr reads it as an address
    return (f"({_cidr_where(str(net), args)} OR (client >= '::ffff:' AND client < '::ffff;'"
            " AND in_cidr(client, :mapped)))")


def domain_where(domain: str, args: dict, p: str = "d_") -> str:
    """The rows of a name and its subdomains, as a range of idx_audit_rbase (schema.RBASE, time, rname): the name's
    base (its reversed name's first two labels; every name under it has the same), then its reversed name or one
    under it. A one-label name ('com') is a range of bases. Every row with a name has its rname (the writer's, the
    dicts insert_audit takes, and since schema 7 the rows from before schema 4). For one base, SQLite reads the
    index in time order: the latest rows of a domain are found without sorting all of them. Parameters go into
    `args`, named with the prefix `p`."""
    rdomain = reverse_name(domain)
    labels = rdomain.split(".")
    args[f"{p}r"] = rdomain
    if len(labels) >= 2:
        args[f"{p}base"] = ".".join(labels[:2])
        base = f"{RBASE} = :{p}base"
    else:  # 'com', 'com.x', and what sorts between them ('com-x'), which the rname condition leaves out
        base = f"{RBASE} >= :{p}r AND {RBASE} < :{p}r || '/'"
    return f"({base} AND (rname = :{p}r OR (rname > :{p}r || '.' AND rname < :{p}r || '/')))"


def _as_tuple(row: dict) -> tuple:
    """A row given as a dict, in AUDIT_INSERT order: without a count it stands for one answer; without an rname it
    gets its qname's (a domain filter finds a row with a name by its rname only: domain_where)."""
    values = {**row, "count": row.get("count") or 1}
    if values.get("rname") is None and values.get("qname"):
        values["rname"] = reverse_name(str(values["qname"]))
    return tuple(values.get(c) for c in AUDIT_INSERT)


class AuditQueries(JournalQueries):
    """The audit log's rows: the writer's inserts, the questions `log` and `stats` ask, the chains' rows, pruning."""

    # ------------------------------------------------------------------ audit

    def insert_audit(self, rows: list[dict] | list[tuple]) -> int | None:
        """Rows as dicts with the columns of AUDIT_INSERT, or as tuples in that order (faster), in one
        transaction; returns the seq of the last row (one transaction holds the write lock, so the rows got
        consecutive seqs ending there), None for no rows."""
        if rows and isinstance(rows[0], dict):
            rows = [_as_tuple(r) for r in rows]  # type: ignore[arg-type]
        last = None
        with self.db.atomic():
            # many rows per statement: one sqlite3_step (one release of the GIL) for each chunk, where
            # executemany steps, and so hands the GIL to the event loop and back, once per row
            # chunks of 256, then 128, 64, ... 1 for the rest: nine statement texts, each prepared once
            i, n, size = 0, len(rows), _CHUNK
            while i < n:
                while n - i < size:
                    size >>= 1
                last = self.conn.execute(_chunk_sql(size), [v for r in rows[i:i + size] for v in r]).lastrowid
                i += size
        return last

    def audit_row(self, seq: int) -> dict | None:
        """One audit row by its seq."""
        return next(self._dicts("SELECT * FROM audit WHERE seq = ?", (seq,)), None)

    def tune_for_writer(self, wal_limit: int) -> None:
        """The audit writer's settings (measured on the writer alone, 2 cores: 31.7k rows/s with SQLite's
        defaults, 42k with these): a 16 MiB page cache (the indexes' pages stay in memory) and a checkpoint every
        4000 WAL pages instead of 1000 (a hot index page is copied into the database once per checkpoint, not
        four times); the WAL file cut back to `wal_limit` bytes when the log starts over.

        And temporary files in memory (temp_store): each multi-row INSERT of insert_audit keeps a statement
        journal, the pages it changes as they were, so that it alone can be undone. In a file that is a write
        system call for every page it changes, and an index that takes names in no order changes nearly a page a
        row: under load (a), with schema 6's index on rname, 83,654 writes for 50,000 rows against 19,308 (the
        WAL's own) in memory; the domain index of schema 7 still takes names under many base domains so."""
        self.conn.execute("PRAGMA cache_size=-16384")
        self.conn.execute("PRAGMA temp_store=MEMORY")
        self.conn.execute("PRAGMA wal_autocheckpoint=4000")
        self.conn.execute(f"PRAGMA journal_size_limit={int(wal_limit)}")

    def restart_wal(self) -> bool:
        """A RESTART checkpoint (it waits, within the busy timeout, for the other connections' transactions):
        True when it ran through and the WAL starts over."""
        return not self.conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0]

    def chained_rows(self) -> Iterator[dict]:
        """Every audit row (seq, mac and what the chain covers) in seq order: sinkhole.audit.chain.verify's walk."""
        return self._dicts(f"SELECT seq, mac, {', '.join(chain.ROW_COLUMNS)} FROM audit ORDER BY seq")

    def checkpoint_rows(self) -> Iterator[dict]:
        """The checkpoint rows a prune left, as chained_rows gives them."""
        return self._dicts(f"SELECT seq, mac, {', '.join(chain.ROW_COLUMNS)} FROM audit WHERE action = ?"
                           " ORDER BY seq", (chain.CHECKPOINT,))

    def chain_heads(self) -> list[dict]:
        """The last row of every chain (chain, link, seq, mac, time): what `sinkhole log anchor` prints."""
        sql = ("SELECT a.chain, a.link, a.seq, a.mac, a.time FROM audit a JOIN "
               "(SELECT chain, max(link) AS link FROM audit WHERE chain IS NOT NULL GROUP BY chain) h "
               "ON a.chain = h.chain AND a.link = h.link ORDER BY a.chain, a.seq")
        out: dict[str, dict] = {}
        for name, link, seq, mac, when in self.conn.execute(sql):
            out.setdefault(name, {"chain": name, "link": link, "seq": seq, "mac": mac, "time": when})
        return list(out.values())

    def find_dns_row(self, client: str, qname: str, since: str, until: str) -> int | None:
        """The seq of the latest DNS audit row of `client` for `qname` between the two times (ISO UTC), if any:
        the query a block page view follows."""
        row = self.conn.execute(
            "SELECT seq FROM audit WHERE client = ? AND time >= ? AND time <= ? AND qname = ? AND action != 'page'"
            " ORDER BY time DESC LIMIT 1", (client, since, until, qname)).fetchone()
        return None if row is None else int(row[0])

    # ------------------------------------------------------------------ retention

    def prune_audit(self, before: str, node: str, actor: Actor | None = None, batch: int = PRUNE_BATCH,
                    pause: float = PRUNE_PAUSE, stop: Callable[[], bool] | None = None,
                    planned: Callable[[int], Callable[[int], None] | None] | None = None) -> PruneResult:
        """Delete audit rows older than `before` (ISO UTC), leaving checkpoints so that every chain verifies.

        Per chain, a prefix of links goes (links 0..F-1; a row newer than `before` ends it). First, in one short
        transaction, a new chain of checkpoint rows (sinkhole.audit.chain.checkpoint_rows; a key generation of its own)
        records for each chain cut: F, the MAC of link F-1, how many rows and which times; checkpoints still needed
        from checkpoint rows being pruned are carried over, and the key generations of chains gone whole are
        summed up. Then the rows are deleted in transactions of `batch` rows, newest link first, with `pause`
        seconds between: the audit writer waits at most one batch, and whatever state a crash (or `stop()` turning
        true, checked between batches) leaves verifies; the next prune finishes the job.
        The audit key must be takeable: no row is deleted without its checkpoint (AuditKeyError otherwise).
        `planned` is told how many rows will go; what it returns is called with each batch's number of rows."""
        started = time.perf_counter()
        res = PruneResult(before=before)
        conn = self.conn
        with self.db.atomic():  # checkpoint rows found without a scan; costs other inserts nothing
            conn.execute("CREATE INDEX IF NOT EXISTS audit_checkpoint ON audit(seq) WHERE action = 'checkpoint'")
        conn.execute("BEGIN")  # one snapshot for the plan; readers do not hold up the writer (WAL)
        try:
            plan, entries, gone = self._prune_plan(before, res)
        finally:
            conn.rollback()
        if not plan:
            res.seconds = time.perf_counter() - started
            return res
        ch, _, _ = chain.Chain.start(self.key_path, f"{node}:prune")
        res.checkpoint_chain = ch.name
        detail = (f"pruned {res.rows} audit rows older than {before} ({res.first_time} .. {res.last_time}) "
                  f"from {res.chains} chains; checkpoint chain {ch.name}")
        t0 = time.perf_counter()
        with self.db.atomic():
            version = self._journal(actor, "log prune", None, None, [], detail) if actor else self.policy_version()
            res.journal_id = version if actor else None
            summary = {"summary": True, "before": before, "rows": res.rows, "chains": res.chains,
                       "unchained": res.unchained, "gone_generations": gone}
            rows, state = ch.seal(chain.checkpoint_rows(summary, entries, iso(time.time()), node, version))
            conn.executemany(_AUDIT_INSERT_SQL, rows)
            res.max_lock_ms = (time.perf_counter() - t0) * 1000
        ch.commit(state)
        progress = planned(sum(map(len, plan.values()))) if planned is not None else None
        for seqs in plan.values():
            for end in range(len(seqs), 0, -batch):  # the newest links first: a prefix of each chain stays whole
                if stop is not None and stop():
                    res.stopped = True
                    res.seconds = time.perf_counter() - started
                    return res
                chunk = seqs[max(0, end - batch):end]
                conn.execute("BEGIN IMMEDIATE")
                t0 = time.perf_counter()
                try:
                    conn.executemany("DELETE FROM audit WHERE seq = ?", ((s,) for s in chunk))
                    conn.commit()
                except BaseException:
                    conn.rollback()
                    raise
                res.max_lock_ms = max(res.max_lock_ms, (time.perf_counter() - t0) * 1000)
                res.batches += 1
                if progress is not None:
                    progress(len(chunk))
                if pause:
                    time.sleep(pause)
        res.seconds = time.perf_counter() - started
        return res

    def _prune_plan(self, before: str, res: PruneResult) -> tuple[dict[str | None, array], list[dict],
                                                                   list[list[int]]]:
        conn = self.conn
        cps = chain.read_checkpoints(self)  # the pruner's side: it trusts its own database
        spans = {c: (lo, hi) for c, lo, hi in conn.execute(
            "SELECT chain, min(link), max(link) FROM audit WHERE chain IS NOT NULL GROUP BY chain")}
        plan: dict[str | None, array] = {}
        entries: list[dict] = []
        times: list[str] = []
        cur = conn.execute("SELECT chain, link, seq, mac, time FROM audit WHERE time < ? ORDER BY chain, link",
                           (before,))
        for name, group in itertools.groupby(cur, key=lambda r: r[0]):
            seqs = array("q")
            if name is None:  # rows from before the chains (or written without a key): nothing to resume
                for _, _, seq, _, when in group:
                    seqs.append(seq)
                    times.append(when)
                res.unchained = len(seqs)
                plan[None] = seqs
                continue
            lo, hi = spans[name]
            start = max(cps.resume.get(name, {}), default=0)  # links below were pruned before
            if lo > start:  # rows missing at the start of the chain with no checkpoint: not ours to hide
                log.warning("audit: chain %s starts at link %d, but no checkpoint says links %d..%d were pruned: "
                            "not pruning it (run sinkhole log verify)", name, lo, start, lo - 1)
                res.skipped.append(name)
                continue
            expected, last_mac, first, last = start, None, None, None
            for _, link, seq, mac, when in group:
                if link < start:  # left by a prune that stopped midway: its checkpoint covers them
                    seqs.append(seq)
                    continue
                if link != expected:
                    break  # a newer row (or a hole) ends the prefix
                seqs.append(seq)
                expected, last_mac = link + 1, mac
                first = when if first is None else min(first, when)
                last = when if last is None else max(last, when)
            if not seqs:
                continue
            plan[name] = seqs
            if last_mac is not None:
                entries.append({"chain": name, "first_link": expected, "prev_mac": last_mac,
                                "rows": expected - start, "first_time": first, "last_time": last,
                                **({"whole": True} if expected > hi else {})})
                times += [first, last]
        cut = {e["chain"] for e in entries}
        gone = list(cps.gone)
        carried: set[tuple[str, int]] = set()
        for e in cps.entries:  # checkpoints being pruned: carry over what the verifier still needs
            name, first_link = e.get("chain"), e.get("first_link")
            if e.get("checkpoint_chain") not in plan or not isinstance(name, str) or name in cut:
                continue
            if name not in spans:  # gone whole: its key generation is all the verifier still needs
                g = chain.chain_generation(name)
                if g is not None:
                    gone.append([g, g])
            elif first_link == max(cps.resume[name]) and (name, first_link) not in carried:
                carried.add((name, first_link))
                entries.append({k: v for k, v in e.items() if k not in ("checkpoint_seq", "checkpoint_chain")}
                               | {"carried_from": e["checkpoint_seq"]})
        res.rows = sum(len(s) for s in plan.values())
        res.chains = len(cut)
        if times:
            res.first_time, res.last_time = min(times), max(times)
        return plan, entries, chain.merge_ranges(gone)

    def _log_where(self, since: str | None, until: str | None, client: str | None, domain: str | None,
                   action: str | None, *, group: str | None = None, category: str | None = None,
                   rule: str | None = None) -> tuple[str, dict]:
        where, args = [], {}
        if since:
            where.append("time >= :since")
            args["since"] = since
        if until:
            where.append("time < :until")
            args["until"] = until
        if client:
            where.append(_client_where(client, args))
        if domain:  # the name and its subdomains: a range of the domain index
            where.append(domain_where(domain, args))
        for column, value in (("action", action), ("grp", group), ("category", category), ("rule", rule)):
            if value:
                where.append(f"{column} = :{column}")
                args[column] = value
        return (" WHERE " + " AND ".join(where)) if where else "", args

    def query_log(self, since: str | None = None, until: str | None = None, client: str | None = None,
                  domain: str | None = None, action: str | None = None,
                  limit: int | None = None, *, group: str | None = None, category: str | None = None,
                  rule: str | None = None, through_seq: int | None = None) -> Iterator[dict]:
        """Matching rows oldest first; with `limit`, the latest `limit` of them; with `through_seq`, only
        rows with seq <= it (the snapshot `follow_log` then continues from)."""
        where, args = self._log_where(since, until, client, domain, action, group=group, category=category,
                                      rule=rule)
        if through_seq is not None:
            where += (" AND " if where else " WHERE ") + "seq <= :through"
            args["through"] = through_seq
        if not limit:  # oldest first, streamed from the cursor
            return iter(self.db.query(f"SELECT * FROM audit{where} ORDER BY time, seq", args))
        sql = f"SELECT * FROM audit{where} ORDER BY time DESC, seq DESC LIMIT :limit"  # workers commit out of order
        args["limit"] = limit
        rows = list(self.db.query(sql, args))
        return iter(reversed(rows))

    def count_log(self, since: str | None = None, until: str | None = None, client: str | None = None,
                  domain: str | None = None, action: str | None = None, *, group: str | None = None,
                  category: str | None = None, rule: str | None = None) -> int:
        """How many rows query_log would return (without a limit)."""
        where, args = self._log_where(since, until, client, domain, action, group=group, category=category,
                                      rule=rule)
        return int(self.conn.execute(f"SELECT count(*) FROM audit{where}", args).fetchone()[0])

    def last_seq(self) -> int:
        """The highest seq committed (0 for an empty log)."""
        return int(self.conn.execute("SELECT max(seq) FROM audit").fetchone()[0] or 0)

    def log_after(self, after_seq: int, through_seq: int, since: str | None = None, until: str | None = None,
                  client: str | None = None, domain: str | None = None, action: str | None = None, *,
                  group: str | None = None, category: str | None = None, rule: str | None = None,
                  batch: int = 5000) -> list[dict]:
        """Matching rows with after_seq < seq <= through_seq, in seq order (the first `batch`): the live tail.

        Commit order is seq order: seq is the INTEGER PRIMARY KEY, assigned as max(seq) + 1 when a writer
        inserts, inside its write transaction, and SQLite lets one write transaction run at a time; so
        once seq n is visible to a reader, no row with a lower seq can appear later (save rows inserted
        after the newest rows were deleted, which reuses their seqs). Reading `seq > last seen` misses
        nothing, whatever the number of writer processes. NOT INDEXED: the rowid range, never a filter's
        index (which would rescan a whole client's or domain's rows at every poll)."""
        where, args = self._log_where(since, until, client, domain, action, group=group, category=category,
                                      rule=rule)
        where += (" AND " if where else " WHERE ") + "seq > :after AND seq <= :through"
        args["after"], args["through"] = after_seq, through_seq
        return [dict(r) for r in self.db.query(
            f"SELECT * FROM audit NOT INDEXED{where} ORDER BY seq LIMIT {int(batch)}", args)]

    def stats(self, since: str | None = None, until: str | None = None, top: int = 10,
              progress: Callable[[int], None] | None = None) -> dict:
        """What `sinkhole stats` shows; `progress` is called with 1 after each of its STATS_QUERIES queries.
        Every number of queries, attempts or views is a number of answers: the sum of the rows' counts."""
        where, args = self._log_where(since, until, None, None, None)
        blocked = where + (" AND " if where else " WHERE ") + "action = 'blocked'"

        def rows(sql: str) -> list:
            out = self.conn.execute(sql, args).fetchall()
            if progress is not None:
                progress(1)
            return out

        def dicts(sql: str) -> list[dict]:
            out = [dict(r) for r in self.db.query(sql, args)]
            if progress is not None:
                progress(1)
            return out

        logged, stored = rows(f"SELECT {_N}, count(*) FROM audit{where}")[0]
        totals = {
            "queries_logged": logged,
            "rows": stored,  # fewer than queries_logged where rows have a count above 1 (audit_window)
            "blocked": rows(f"SELECT {_N} FROM audit{blocked}")[0][0],
            "clients": rows(f"SELECT count(DISTINCT client) FROM audit{blocked}")[0][0],
            "domains": rows(f"SELECT count(DISTINCT qname) FROM audit{blocked}")[0][0],
        }
        top_domains = dicts(
            f"SELECT rule, category, {_N} AS queries, count(DISTINCT client) AS clients FROM audit{blocked}"
            f" GROUP BY rule, category ORDER BY queries DESC, rule LIMIT {int(top)}")
        top_names = dicts(
            f"SELECT qname, {_N} AS queries FROM audit{blocked}"
            f" GROUP BY qname ORDER BY queries DESC, qname LIMIT {int(top)}")
        top_clients = dicts(
            f"SELECT client, {_N} AS queries, count(DISTINCT qname) AS names FROM audit{blocked}"
            f" GROUP BY client ORDER BY queries DESC, client LIMIT {int(top)}")
        # a bypass attempt: a canary, or a lookup of a public encrypted-DNS resolver (the doh-bypass list)
        bypass = where + (" AND " if where else " WHERE ") + "(action = 'canary' OR category = 'doh-bypass')"
        totals["bypass_attempts"] = rows(f"SELECT {_N} FROM audit{bypass}")[0][0]
        page = where + (" AND " if where else " WHERE ") + "action = 'page'"
        totals["page_views"], totals["page_clients"] = rows(
            f"SELECT {_N}, count(DISTINCT client) FROM audit{page}")[0]
        bypass_clients = dicts(
            f"SELECT client, {_N} AS attempts, group_concat(DISTINCT qname) AS canaries FROM audit{bypass}"
            f" GROUP BY client ORDER BY attempts DESC, client LIMIT {int(top)}")
        by_group = dicts(
            f"SELECT grp AS [group], {_N} AS blocked, count(DISTINCT client) AS clients FROM audit{blocked}"
            f" GROUP BY grp ORDER BY blocked DESC, grp")
        by_category = dicts(
            f"SELECT category, {_N} AS blocked, count(DISTINCT client) AS clients FROM audit{blocked}"
            f" GROUP BY category ORDER BY blocked DESC, category")
        per_hour = dict(rows(f"SELECT substr(time, 1, 13) AS hour, {_N} FROM audit{blocked} GROUP BY hour"))
        return {"totals": totals, "top_rules": top_domains, "top_names": top_names, "top_clients": top_clients,
                "bypass_clients": bypass_clients, "by_group": by_group, "by_category": by_category,
                "hourly": hourly(per_hour, since, until)}


STATS_QUERIES = 13  # the queries of Store.stats (the total of its progress)


MAX_HOURS = 24 * 400  # a histogram longer than this starts at the first hour with a blocked row


def hourly(per_hour: dict[str, int], since: str | None, until: str | None,
           now: datetime | None = None) -> list[dict]:
    """{'2026-11-22T18': 3, ...} -> [{'hour': '2026-11-22T18:00:00Z', 'blocked': 3}, ...] for every hour
    from `since` (or the first hour with rows, when since is missing or far back) to `until` (or now),
    the hours without a row as 0."""
    def parse(text: str) -> datetime:
        return datetime.fromisoformat(text[:13].replace("Z", "") + ":00:00+00:00")

    end = parse(until) if until else (now or datetime.now(UTC)).replace(minute=0, second=0, microsecond=0)
    if until and until[13:] not in ("", ":00:00.000000Z"):  # an end inside an hour: that hour is drawn
        end += timedelta(hours=1)
    else:
        end += timedelta(hours=0 if until else 1)
    seen = sorted(per_hour)
    if seen:  # rows stamped outside [since, until) cannot be here; rows after `now` (clock skew) widen it
        end = max(end, parse(seen[-1]) + timedelta(hours=1))
    start = parse(since) if since else (parse(seen[0]) if seen else end - timedelta(hours=1))
    if (end - start) > timedelta(hours=MAX_HOURS):
        start = max(start, parse(seen[0]) if seen else end - timedelta(hours=1))
        start = max(start, end - timedelta(hours=MAX_HOURS))
    out = []
    t = start
    while t < end:
        key = t.strftime("%Y-%m-%dT%H")
        out.append({"hour": key + ":00:00Z", "blocked": per_hour.get(key, 0)})
        t += timedelta(hours=1)
    return out
