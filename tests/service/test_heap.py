"""The collector's settings of a serving process (sinkhole.service.heap), in a process of their own: settle()
changes the interpreter's global state, which pytest's process must keep."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_settle_freezes_what_is_alive_and_garbage_is_still_freed():
    out = run("""
        import gc, weakref
        from sinkhole.service import heap

        class Thing:
            pass

        gc.collect()
        before = gc.get_threshold()
        assert gc.get_freeze_count() == 0
        old = Thing()
        old_ref = weakref.ref(old)
        heap.settle()
        assert gc.get_freeze_count() > 1000, gc.get_freeze_count()  # the modules' objects, among them
        assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, *before[1:]), gc.get_threshold()
        del old  # frozen, and freed all the same when its last reference goes
        assert old_ref() is None
        a, b = Thing(), Thing()  # a reference cycle made after: the collector still finds it
        a.other, b.other = b, a
        cycle_ref = weakref.ref(a)
        del a, b
        assert cycle_ref() is not None
        gc.collect()
        assert cycle_ref() is None
        state = heap.state()
        assert state["frozen"] == gc.get_freeze_count() and len(state["collections"]) == 3
        print("ok", state["collections"][2])
    """)
    assert out.startswith("ok ")
    assert int(out.split()[1]) >= 2  # settle's collection and the test's: both full ones, counted
