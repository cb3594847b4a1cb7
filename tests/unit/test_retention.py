"""The prune floor: nothing a partition can still fold lands in a bucket it lets go."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stream_agg.core.buckets import GRANULARITIES, SPAN, bucket_start
from stream_agg.core.retention import advance, last_prunable_starts, prune_floor, unmarked
from stream_agg.core.watermark import Watermark, WatermarkPolicy

P = WatermarkPolicy(out_of_orderness=30.0, grace=60.0, horizon=7 * 86400.0, idle_timeout=60.0)
T0 = 1_772_000_000.0  # 2026-02-25


def test_floor_is_the_lowest_partition_too_late_line() -> None:
    rng = np.random.default_rng(3)
    marks = T0 + rng.uniform(0, 20 * 86400, 6)
    floor = prune_floor(dict(enumerate(marks.tolist())), 6, P)
    assert floor == marks.min() - 30.0 - 7 * 86400.0
    # a stored partition past the caller's count: the count is stale (the topic grew), so the
    # partitions in between count as unmarked, and once they are marked the lowest mark decides
    stale = {**dict(enumerate(marks.tolist())), 9: T0 - 86400}
    assert unmarked(stale, 6) == [6, 7, 8] and prune_floor(stale, 6, P) is None
    full = {**stale, 6: T0, 7: T0, 8: T0}
    assert unmarked(full, 6) == [] and prune_floor(full, 6, P) == T0 - 86400 - 30.0 - 7 * 86400.0


@pytest.mark.parametrize("marks", [{0: T0, 1: T0}, {0: T0, 1: T0, 2: None}, {0: T0, 2: T0, 3: T0}])
def test_no_floor_while_a_topic_partition_has_no_watermark(marks: dict[int, float | None]) -> None:
    assert prune_floor(marks, 3, P) is None
    assert unmarked(marks, 3) == sorted({0, 1, 2} - {p for p, t in marks.items() if t is not None})
    assert prune_floor({0: T0, 1: -math.inf, 2: T0}, 3, P) is None
    assert prune_floor({}, 0, P) is None


def test_floor_never_moves_back() -> None:
    assert advance(None, None) is None
    assert advance(None, 5.0) == 5.0
    assert advance(7.0, 5.0) == 7.0
    assert advance(7.0, None) == 7.0
    assert advance(7.0, 9.0) == 9.0


def test_no_event_a_partition_accepts_falls_in_a_prunable_bucket() -> None:
    """Random partitions fold random batches; whatever their too-late rule lets through, no
    bucket (hour, day or ISO week) holding it is one the floor from their stored maxima prunes."""
    rng = np.random.default_rng(11)
    for _ in range(200):
        n = int(rng.integers(1, 5))
        wms = [Watermark(P, max_event_time=T0 + float(rng.uniform(0, 30 * 86400))) for _ in range(n)]
        floor = prune_floor({p: w.max_event_time for p, w in enumerate(wms)}, n, P)
        assert floor is not None
        last = last_prunable_starts(floor)
        for w in wms:
            ts = w.max_event_time + rng.uniform(-9 * 86400, 3600, 50)  # many older than the horizon
            accepted = ts[~w.classify(ts).too_late]
            for g in GRANULARITIES:
                starts = np.array([bucket_start(float(t), g) for t in accepted])
                assert not (starts <= last[g]).any()
                # and the rule is tight: the bucket holding the floor itself is kept, the one before it goes
                held = bucket_start(floor, g)
                assert held > last[g] and held - SPAN[g] <= last[g]


def test_a_partition_without_watermark_obeys_the_floor() -> None:
    w = Watermark(P)  # new partition: no max event time, so its own rule lets anything through
    ts = np.array([T0 - 30 * 86400, T0 - 86400, T0, T0 - 86400 - 1])
    assert not w.classify(ts).too_late.any()
    w.floor = T0 - 86400
    assert w.classify(ts).too_late.tolist() == [True, False, False, True]


@pytest.mark.parametrize("shift", [-0.5, 0.0, 0.5])
def test_a_bucket_goes_exactly_when_it_ends_at_or_before_the_floor(shift: float) -> None:
    """Floors on and next to bucket boundaries: the bucket ending at the boundary goes iff
    its end (start + span, from datetime arithmetic here) is at or before the floor."""
    from datetime import UTC, datetime, timedelta

    boundary = datetime(2026, 3, 9, tzinfo=UTC)  # a Monday: an hour, day and week boundary at once
    floor = boundary.timestamp() + shift
    last = last_prunable_starts(floor)
    for g, span in (("hour", timedelta(hours=1)), ("day", timedelta(days=1)), ("week", timedelta(days=7))):
        for k in range(-2, 3):
            start = boundary + k * span - span
            gone = start.timestamp() <= last[g]
            assert gone == ((start + span).timestamp() <= floor), (g, k, shift)
