"""The cyclic garbage collector's settings for a serving process.

A server's heap is mostly long-lived: the modules, the policy's tables, the answers cached. CPython's collector
walks every object it tracks at each full collection (50-170 ms on a worker's event loop, measured), and starts
a young collection every 700 allocations of tracked objects: a forwarded query makes dozens (its task,
coroutines, futures, timer), so under cache misses at full speed one worker ran about 160 young collections a
second, each walking the queries in flight. Neither finds much: nothing the policy builds is in a reference
cycle, and a query leaves at most a few cycles behind (a task and its future).

So, once the server has started (its policy loaded, its listeners up: `settle`, from server.serve):
- what is alive is collected once, then frozen (gc.freeze): the collector never walks it again. It is still
  freed as usual when its last reference goes (a reloaded policy's old tables), only a reference cycle among
  frozen objects would stay;
- a young collection starts every YOUNG_THRESHOLD allocations, not 700, so most of a query's objects are freed
  (by reference counting) before any collection sees them. The older generations keep their thresholds.

A policy read anew later is not frozen: it is few objects to the collector, its names mapping to shared tuples
(tried: a reload with 3000 names more, then frozen, left 104 objects more frozen than before it).

Not in `Server.start`: the tests run servers inside pytest's own process.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Collect, freeze what is alive now, and make young collections rarer (see the module's docstring)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def state() -> dict[str, object]:
    """What the collector did in this process: objects frozen, collections per generation (the metrics)."""
    return {"frozen": gc.get_freeze_count(), "collections": [g["collections"] for g in gc.get_stats()]}
