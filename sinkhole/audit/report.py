"""`sinkhole report`: one self-contained HTML file for a security officer.

Inline CSS and inline SVG drawn here; no script, no font, no image, nothing fetched. Every value that
comes from the database (names are chosen by whoever sends a query) goes through `esc`.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sinkhole import __version__
from sinkhole.audit import chain
from sinkhole.store.db import Store


@dataclass(frozen=True)
class ChainStatus:
    """What the report says about the hash chains: verified or not, and why."""

    state: str  # "ok", "failed" or "not verified"
    summary: str
    problems: tuple[str, ...] = ()


def chain_status(store: Store, key_file: Path | None, server_key: Path | None,
                 stage: Callable[[str, int, str], Callable[[int], None] | None] | None = None) -> ChainStatus:
    """Run sinkhole.audit.chain.verify with the operator's key copy, as `sinkhole log verify` does. `stage`:
    the CLI's Progress.stage, for a bar over the rows verified."""
    if key_file is None:
        return ChainStatus("not verified", "not verified: no operator key given (--key-file)")
    generation, secret = chain.read_key(key_file)  # AuditKeyError (a usage error) when unreadable
    current: tuple[int, bytes] | None = None
    if server_key is not None:
        try:
            current = chain.read_key(server_key)
        except chain.AuditKeyError:
            current = None
    advance = stage("verifying", store.count_log(), "rows") if stage is not None else None
    result = chain.verify(store, generation, secret, None, current, advance)
    rows = sum(w.rows for w in result.chains.values())
    before = f"; {result.before_chain} rows from before the chain started" if result.before_chain else ""
    if result.problems:
        return ChainStatus("failed", f"verification FAILED: {len(result.problems)} problems in "
                                     f"{len(result.chains)} chains{before}",
                           tuple(p for _, p in result.problems))
    return ChainStatus("ok", f"verified: {len(result.chains)} chains, {rows} rows, every MAC correct{before}"
                             " (a tail cut off the newest rows shows only against an anchor: log verify --anchor)")


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _short(text: object, width: int = 48) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= width else s[:width - 1] + "…"


def _fmt(n: float) -> str:
    return f"{int(n):,}"


# ---------------------------------------------------------------------------- charts (SVG)


def bars_over_time(points: list[tuple[str, int]], unit: str, width: int = 920, height: int = 220) -> str:
    """Vertical bars, one per hour or day; a tooltip (<title>) on each; first/middle/last labels."""
    if not points:
        return '<p class="none">no rows in this period</p>'
    left, bottom, top = 48, 28, 12
    plot_w, plot_h = width - left - 8, height - bottom - top
    peak = max(v for _, v in points) or 1
    step = plot_w / len(points)
    bar = max(step - (1 if step > 3 else 0), 0.5)
    out = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
           f' aria-label="blocked queries per {unit}">',
           f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" class="axis"/>',
           f'<text x="{left - 6}" y="{top + 4}" class="tick" text-anchor="end">{_fmt(peak)}</text>',
           f'<text x="{left - 6}" y="{top + plot_h}" class="tick" text-anchor="end">0</text>']
    for i, (label, value) in enumerate(points):
        h = plot_h * value / peak
        x = left + i * step
        out.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar:.1f}" height="{h:.1f}" class="bar">'
                   f'<title>{esc(label)}: {_fmt(value)}</title></rect>')
    for i in sorted({0, len(points) // 2, len(points) - 1}):
        x = left + i * step + bar / 2
        anchor = "start" if i == 0 else "end" if i == len(points) - 1 else "middle"
        out.append(f'<text x="{x:.1f}" y="{height - 8}" class="tick" text-anchor="{anchor}">'
                   f'{esc(points[i][0])}</text>')
    out.append("</svg>")
    return "".join(out)


def bars_across(rows: list[tuple[str, int]], width: int = 920, cls: str = "bar") -> str:
    """Horizontal bars with their labels and values; nothing when there are no rows."""
    if not rows:
        return '<p class="none">none in this period</p>'
    label_w, value_w, row_h = 330, 90, 22
    plot_w = width - label_w - value_w
    peak = max(v for _, v in rows) or 1
    height = row_h * len(rows) + 4
    out = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    for i, (label, value) in enumerate(rows):
        y = i * row_h + 2
        w = max(plot_w * value / peak, 1)
        out.append(f'<text x="{label_w - 8}" y="{y + 15}" class="label" text-anchor="end">{esc(_short(label))}'
                   f'<title>{esc(label)}</title></text>'
                   f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" class="{cls}"/>'
                   f'<text x="{label_w + w + 6:.1f}" y="{y + 15}" class="value">{_fmt(value)}</text>')
    out.append("</svg>")
    return "".join(out)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    if not rows:
        return '<p class="none">none in this period</p>'
    head = "".join(f"<th>{esc(title)}</th>" for _, title in columns)
    body = "".join("<tr>" + "".join(
        f'<td class="{"num" if isinstance(r.get(key), int | float) else "txt"}">'
        f'{esc(_fmt(r[key]) if isinstance(r.get(key), int | float) else r.get(key))}</td>'
        for key, _ in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------------------- the page


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;margin:2rem auto;
max-width:960px;padding:0 1rem}
h1{font-size:1.6rem;margin:0 0 .25rem}h2{font-size:1.15rem;margin:2rem 0 .5rem;border-bottom:1px solid #d0d7de;
padding-bottom:.25rem}.meta{color:#57606a}.none{color:#57606a;font-style:italic}
.totals{display:flex;flex-wrap:wrap;gap:.75rem;margin:1rem 0}.totals div{border:1px solid #d0d7de;border-radius:6px;
padding:.5rem .9rem;min-width:8rem}.totals b{display:block;font-size:1.4rem}
table{border-collapse:collapse;margin:.5rem 0;width:100%}th,td{border-bottom:1px solid #d8dee4;padding:.25rem .5rem;
text-align:left;vertical-align:top}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.txt{word-break:break-all}
.chart{max-width:100%;height:auto;display:block}.bar{fill:#0969da}.warn{fill:#bf3989}.axis{stroke:#8c959f}
.tick,.value{font-size:11px;fill:#57606a}.label{font-size:12px;fill:#1b1f24}
.status{border-radius:6px;padding:.6rem .9rem;margin:.5rem 0;font-weight:600}
.ok{background:#dafbe1;border:1px solid #4ac26b}.failed{background:#ffebe9;border:1px solid #ff8182}
.unverified{background:#fff8c5;border:1px solid #d4a72c}
@media print{body{margin:0}h2{break-after:avoid}}
"""


def over_time(hourly: list[dict]) -> tuple[list[tuple[str, int]], str]:
    """Per hour up to 3 days, else per day (UTC)."""
    if len(hourly) <= 72:
        return [(h["hour"][:13].replace("T", " ") + ":00", h["blocked"]) for h in hourly], "hour"
    days: dict[str, int] = {}
    for h in hourly:
        days[h["hour"][:10]] = days.get(h["hour"][:10], 0) + h["blocked"]
    return list(days.items()), "day"


def render(stats: dict, since: str, until: str | None, status: ChainStatus, db: str,
           generated: datetime | None = None) -> str:
    """The report as one HTML document. `stats` is what Store.stats returns."""
    generated = generated or datetime.now(UTC)
    t = stats["totals"]
    points, unit = over_time(stats["hourly"])
    services = [(f"{r['category'] or '(none)'}", r["blocked"]) for r in stats["by_category"]]
    rules = [(f"{r['rule']} ({r['category']})", r["queries"]) for r in stats["top_rules"]]
    clients = [(r["client"], r["queries"]) for r in stats["top_clients"]]
    bypass = [(r["client"], r["attempts"]) for r in stats["bypass_clients"]]
    groups = [(r["group"] if r["group"] is not None else "(no group)", r["blocked"]) for r in stats["by_group"]]
    status_cls = {"ok": "ok", "failed": "failed"}.get(status.state, "unverified")
    problems = "".join(f"<li>{esc(p)}</li>" for p in status.problems)
    until_text = until or generated.isoformat(timespec="seconds").replace("+00:00", "Z") + " (now)"
    cards = "".join(f'<div><b>{_fmt(v)}</b>{esc(k)}</div>' for k, v in (
        ("blocked queries", t["blocked"]), ("clients blocked", t["clients"]), ("names blocked", t["domains"]),
        ("bypass attempts", t["bypass_attempts"]), ("block page views", t.get("page_views", 0)),
        ("answers in the log", t["queries_logged"]), ("rows in the log", t.get("rows", t["queries_logged"]))))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sinkhole audit report {esc(since[:10])} to {esc(until_text[:10])}</title>
<style>{CSS}</style>
</head>
<body>
<h1>Blocked generative-AI lookups</h1>
<p class="meta">Period: <b id="since">{esc(since)}</b> to <b id="until">{esc(until_text)}</b> (UTC).
Database: {esc(db)}. Generated {esc(generated.isoformat(timespec="seconds"))} by sinkhole {esc(__version__)}.</p>

<h2>Audit chain</h2>
<div id="chain" class="status {status_cls}">{esc(status.summary)}</div>
{f"<ul id='chain-problems'>{problems}</ul>" if problems else ""}

<h2>Totals</h2>
<div class="totals" id="totals">{cards}</div>

<h2>Blocked attempts per {unit}</h2>
{bars_over_time(points, unit)}

<h2>Top clients</h2>
{bars_across(clients)}
{table(stats["top_clients"], [("client", "client"), ("queries", "blocked queries"), ("names", "names")])}

<h2>Top services</h2>
<h3>By category</h3>
{bars_across(services)}
<h3>By rule</h3>
{bars_across(rules)}
{table(stats["top_names"], [("qname", "most blocked names"), ("queries", "queries")])}

<h2>Bypass attempts</h2>
<p>Bypass canaries (DoH canary, iCloud Private Relay, DDR) and lookups of public DoH/DoT resolvers:
<b id="bypass-total">{_fmt(t["bypass_attempts"])}</b>.</p>
{bars_across(bypass, cls="warn")}
{table(stats["bypass_clients"], [("client", "client"), ("attempts", "attempts"), ("canaries", "names asked")])}

<h2>Per client group</h2>
{bars_across(groups)}
{table(stats["by_group"], [("group", "group"), ("blocked", "blocked queries"), ("clients", "clients")])}
</body>
</html>
"""
