"""Garbage-collector settings for the worker and its decode helper.

Why: the worker holds large long-lived structures (per-partition state tables, interners,
sample lists) and allocates container objects in bursts (a decoded batch, a flush's
encoded items). With CPython's default thresholds (700, 10, 10) a catch-up of a million
events ran 6 full collections of ~100 ms each in the worker, every one holding the GIL
and stopping the fold, and ~1,000 young ones; the decode helper spent 0.46 s more
(`bench/stream_e2e.py`, scenario 1, timed with `gc.callbacks`: 1.25 s in all, 0.09 s
with these settings). The code makes few reference cycles, so collecting young objects
every 50,000 allocations instead of 700 holds little garbage for long; what exists at
start (imports, the Faust app) is frozen out of every collection.
"""

from __future__ import annotations

import gc

THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Freeze what exists now and collect less often (call once, after start-up)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
