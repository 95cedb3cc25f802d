"""sinkhole stats: totals and tops of the audit log, and blocked queries per hour as a histogram."""

from __future__ import annotations

import json
import shutil

import click

from sinkhole.cli.common import MAX_TOP, Env, emit, output_options, parse_when, pass_env
from sinkhole.cli.progress import Progress, quiet_option
from sinkhole.store.audit import STATS_QUERIES


@click.command()
@click.option("--since", default="24h", show_default=True, help="Duration back from now or ISO 8601 time.")
@click.option("--until", help="End (exclusive).")
@click.option("--top", type=click.IntRange(min=1, max=MAX_TOP), default=10, show_default=True)
@output_options(("table", "json"))
@quiet_option
@pass_env
def stats(env: Env, since: str, until: str | None, top: int, fmt: str, quiet: bool) -> None:
    """Totals, top blocked rules and names, top clients, bypass attempts, groups, categories, blocked per hour."""
    since_iso, until_iso = parse_when(since, "--since"), parse_when(until, "--until")
    with env.existing_store() as store, Progress.for_command(quiet) as progress:
        result = store.stats(since_iso, until_iso, top, progress.stage("counting", STATS_QUERIES, "queries"))
    if fmt == "json":
        click.echo(json.dumps({"since": since_iso, **result}, indent=2))
        return
    t = result["totals"]
    click.echo(f"since {since_iso}: {t['blocked']} blocked queries from {t['clients']} clients "
               f"for {t['domains']} names ({t['queries_logged']} answers in the log, in {t['rows']} rows)")
    click.echo(f"block page views: {t.get('page_views', 0)} from {t.get('page_clients', 0)} clients")
    for title, rows, cols in (("top blocked rules", result["top_rules"], ["rule", "category", "queries", "clients"]),
                              ("top blocked names", result["top_names"], ["qname", "queries"]),
                              ("top clients", result["top_clients"], ["client", "queries", "names"]),
                              (f"bypass attempts ({t['bypass_attempts']}: canaries and public DoH/DoT resolvers)",
                               result["bypass_clients"], ["client", "attempts", "canaries"]),
                              ("blocked by client group", result["by_group"], ["group", "blocked", "clients"]),
                              ("blocked by category", result["by_category"], ["category", "blocked", "clients"])):
        click.echo(f"\n{title}:")
        emit(rows, cols, "table")

    width = min(max(shutil.get_terminal_size((100, 24)).columns - 12, 24), 120)
    click.echo("\nblocked per hour (UTC):")
    for line in histogram(result["hourly"], width):
        click.echo(line)


BLOCKS = " ▁▂▃▄▅▆▇█"


def histogram(hourly: list[dict], width: int = 72, height: int = 8) -> list[str]:
    """Blocked per hour as Unicode block columns, at most `width` columns (several hours a column when
    the range is longer), `height` rows high, each cell in eighths; a scale on the left, times below."""
    if not hourly:
        return ["(no hours in the range)"]
    per = -(-len(hourly) // width)  # hours a column, rounded up
    columns = [sum(h["blocked"] for h in hourly[i:i + per]) for i in range(0, len(hourly), per)]
    peak = max(columns)
    label_w = len(f"{peak:,}")
    lines = []
    for row in range(height, 0, -1):
        cells = []
        for value in columns:
            eighths = round(value * height * 8 / peak) if peak else 0
            cells.append(BLOCKS[min(max(eighths - (row - 1) * 8, 0), 8)])
        scale = f"{peak:,}" if row == height else ("0" if row == 1 else "")
        lines.append(f"{scale:>{label_w}} ┤{''.join(cells)}".rstrip())
    first, last = hourly[0]["hour"], hourly[-1]["hour"]
    unit = "1 hour" if per == 1 else f"{per} hours"
    axis = f"{first[:13].replace('T', ' ')}h"
    end = f"{last[:13].replace('T', ' ')}h"
    gap = max(len(columns) - len(axis) - len(end), 1)
    lines.append(f"{'':>{label_w}}  {axis}{' ' * gap}{end}")
    lines.append(f"{'':>{label_w}}  one column = {unit}; peak {peak:,} blocked")
    return lines
