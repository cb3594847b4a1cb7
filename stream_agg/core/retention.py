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


def unmarked(max_event_times: Mapping[int, float | None], partitions: int) -> list[int]:
    """Partitions that have no stored max event time (and so hold the floor back).

    The topic has at least `partitions` partitions, and at least one past the highest stored
    one: a stored partition the caller's partition count does not cover means that count is
    stale (the topic grew), so it is raised rather than trusted."""
    n = max([partitions, *(p + 1 for p in max_event_times)])
    return [p for p in range(n) if not _finite(max_event_times.get(p))]


def prune_floor(max_event_times: Mapping[int, float | None], partitions: int,
                policy: WatermarkPolicy) -> float | None:
    """The event time before which nothing can be folded any more, or None while some
    partition has no stored max event time (`unmarked`: it would accept anything).

    The policy must be the one every worker of the stream classifies with: a worker with a
    shorter horizon would move the floor past what the others still accept."""
    if partitions <= 0 or unmarked(max_event_times, partitions):
        return None
    return min(t for t in max_event_times.values() if t is not None) - policy.out_of_orderness - policy.horizon


def _finite(t: float | None) -> bool:
    return t is not None and math.isfinite(t)


def last_prunable_starts(floor: float) -> dict[str, int]:
    """Per granularity, the latest bucket start (whole seconds, like every bucket start)
    whose bucket ends at or before `floor`: start <= this <=> start + span <= floor."""
    return {g: math.floor(floor) - SPAN[g] for g in GRANULARITIES}


def advance(stored: float | None, computed: float | None) -> float | None:
    """The floor never moves back: a worker with a stale view must not undo a prune."""
    if computed is None:
        return stored
    return computed if stored is None else max(stored, computed)
