"""Which stream state can never change again, so the worker may delete it.

A partition's too-late rule (`Watermark.classify`) rejects every event older than its
running max event time - out-of-orderness - horizon, and that max only grows. So once
*every* partition of the topic has a stored max, no worker can fold an event older than

    floor = min over partitions of (stored max event time) - out_of_orderness - horizon

and a bucket that ends at or before the floor never changes again: its partial blobs,
deltas and cap cuts can go (its `metrics_aggregates` rows stay: they are the product).

A partition with no stored max (new, or never flushed) would accept any event, so the
floor does not move until every partition has one, and once it has moved it is also a
too-late rule of its own for every partition (`Watermark.floor`): a partition added to the
topic later cannot fold into a pruned bucket and re-merge its row from its partial alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from stream_agg.core.buckets import GRANULARITIES, SPAN
from stream_agg.core.watermark import WatermarkPolicy


def prune_floor(max_event_times: Mapping[int, float | None], partitions: int,
                policy: WatermarkPolicy) -> float | None:
    """The event time before which nothing can be folded any more, or None while some
    partition `0..partitions-1` has no stored max event time (it would accept anything).

    `max_event_times`: every stored partition of the stream, topic partitions or not (a
    stored partition beyond `partitions` counts too: the lower floor is the safe one)."""
    if partitions <= 0 or any(max_event_times.get(p) is None for p in range(partitions)):
        return None
    known = [t for t in max_event_times.values() if t is not None]
    if not all(math.isfinite(t) for t in known):
        return None
    return min(known) - policy.out_of_orderness - policy.horizon


def last_prunable_starts(floor: float) -> dict[str, float]:
    """Per granularity, the latest bucket start whose bucket ends at or before `floor`
    (bucket start <= this <=> start + span <= floor <=> the bucket can be deleted)."""
    return {g: floor - SPAN[g] for g in GRANULARITIES}


def advance(stored: float | None, computed: float | None) -> float | None:
    """The floor never moves back: a worker with a stale view must not undo a prune."""
    if computed is None:
        return stored
    return computed if stored is None else max(stored, computed)
