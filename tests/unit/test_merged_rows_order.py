"""The merge's two orderings: values sorted per row (for exact percentiles) and rows by value."""

from __future__ import annotations

import numpy as np
from helpers import make_events, merged_round_robin

from stream_agg.core.merged_rows import _by_segment_then_value
from stream_agg.core.registry import default_registry


def test_values_sorted_per_segment_as_lexsort_sorts_them() -> None:
    rng = np.random.default_rng(5)
    for n, segments in ((1, 1), (2, 1), (1000, 7), (50_000, 9_000)):
        seg = rng.integers(0, segments, n)
        values = np.round(rng.lognormal(3, 1, n), 1)  # many ties
        values[rng.random(n) < 0.05] = 0.0
        order = _by_segment_then_value(seg, values)
        want = np.lexsort((values, seg))
        assert np.array_equal(np.sort(order), np.arange(n))  # a permutation
        assert np.array_equal(seg[order], seg[want]) and np.array_equal(values[order], values[want])


def test_merged_blocks_give_rows_by_value_then_hour() -> None:
    reg = default_registry({"user": 30})
    events = make_events(3000, seed=8, hours=10, users=50, null_rate=0.1)
    blocks = merged_round_robin(events, reg, 3)
    several = 0
    for b in blocks:
        pairs = list(zip(b.labels, b.hours.tolist(), strict=True))
        assert pairs == sorted(pairs) and len(set(pairs)) == len(pairs)
        several += len(set(b.labels)) > 1 and len(set(b.hours.tolist())) > 1
    assert several  # blocks where hour-major order would differ
