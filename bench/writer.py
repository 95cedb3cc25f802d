"""The audit writer alone: CPU time of its thread per row, for distinct answers (load (a)'s worst case).

    .venv/bin/python bench/writer.py [--rows 100000] [--window 1.0] [--profile]

Opens an AuditLog on a fresh database in a temporary directory, submits --rows events of distinct blocked
names (from this thread, before the clock starts for the writer), then closes the log, which writes them all.
Prints the writer thread's CPU time per row (read from the thread's own clock, so the submitting thread is
not counted) and the wall time. --window: the counting window (sinkhole.audit.writer.Aggregator; 0: a row
each). --profile: the writer thread under cProfile, its 25 most expensive functions. Not a test: nothing
is asserted. The figures quoted in sinkhole/audit/writer.py come from here.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this checkout's package, not bench/ first on the path: bench/profile.py would hide the standard library's
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from sinkhole.audit.writer import AuditLog  # noqa: E402
from sinkhole.model import AuditEvent  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--window", type=float, default=1.0)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sinkhole-writer-") as tmp:
        log = AuditLog(Path(tmp) / "audit.db", "bench", "blocked", queue_size=args.rows + 1, seed=None,
                       window=args.window)
        cpu: dict[str, float] = {}
        profiler = cProfile.Profile() if args.profile else None
        run = log._run

        def measured() -> None:  # the writer thread's body, on its own CPU clock
            started = time.thread_time()
            if profiler is not None:
                profiler.enable()
            try:
                run()
            finally:
                if profiler is not None:
                    profiler.disable()
                cpu["writer"] = time.thread_time() - started

        log._run = measured  # type: ignore[method-assign]
        now = time.time()
        events = [AuditEvent(now + i * 1e-5, f"10.0.{i // 250 % 250}.{i % 250}", "udp", f"n{i}.chat.example",
                             1, "blocked", "chat.example", "genai", 0, "0.0.0.0", 1) for i in range(args.rows)]
        for e in events:
            log.submit(e)
        started = time.perf_counter()
        log.start()
        log.close(timeout=600)
        wall = time.perf_counter() - started
        print(f"rows {log.rows_written:,} (window {args.window:g} s): writer CPU {cpu['writer'] * 1e6 / args.rows:.1f} "
              f"us a row, wall {wall:.2f} s, dropped {log.dropped}")
        if profiler is not None:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
            print(out.getvalue())


if __name__ == "__main__":
    main()
