"""Named regions of the shaping hook, for measurement tools (nothing is recorded by default).

The package marks three regions with :func:`marked`:

* ``HOOK``  ``DeepSpeedShaping.shape``: the whole pre-step hook (slices, statistics, shaper
  update, application, callbacks);
* ``STATS`` ``SliceSet.compute``: one statistics pass (local sums and their all-reduce);
* ``APPLY`` ``SliceSet.apply``: the factors and elementwise maps written into the gradient.

A tool installs a *recorder*, any object with a ``region(name)`` method returning a context
manager, for the span it measures::

    with profiling.recording(my_recorder):
        engine.step()          # my_recorder.region("hook") / ("stats") / ("apply") entered

Without a recorder a marked function costs one global read and one extra Python call: 0.25-0.3
us per call on the 2-core CPU host of docs/BENCHMARKS.md, 3-5 calls per optimizer step.
``tools/bench_overhead.py`` is the user: it times the regions and brackets them for its memory
profile and its host-sync and collective counters. Leaf module: imports nothing of ours.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional

HOOK = "hook"
STATS = "stats"
APPLY = "apply"
REGIONS = (HOOK, STATS, APPLY)

_recorder: Optional[Any] = None


def install(recorder: Optional[Any]) -> Optional[Any]:
    """Make ``recorder`` (None: none) receive the regions; returns the previous one."""
    global _recorder
    previous, _recorder = _recorder, recorder
    return previous


@contextlib.contextmanager
def recording(recorder: Any) -> Iterator[Any]:
    """Install ``recorder`` for the block, then restore the previous one."""
    previous = install(recorder)
    try:
        yield recorder
    finally:
        install(previous)


def marked(name: str) -> Callable[[Callable], Callable]:
    """Decorator: run the function inside the installed recorder's ``region(name)`` (none installed: just
    the function)."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def in_region(*args, **kwargs):
            rec = _recorder
            if rec is None:
                return fn(*args, **kwargs)
            with rec.region(name):
                return fn(*args, **kwargs)
        return in_region
    return decorate
