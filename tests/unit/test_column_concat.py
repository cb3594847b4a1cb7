"""concat_columns: several batches' columns equal `to_columns` of their events concatenated."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_same_columns, make_events

from stream_agg.core.column_concat import concat_columns
from stream_agg.core.fold import PartitionState, fold, to_columns
from stream_agg.core.registry import DEFAULT_METRICS, Registry, default_registry


@pytest.mark.parametrize("cuts", [[150], [0, 40, 41, 300], [10, 20, 30, 290, 299]])
def test_concatenated_columns_equal_the_columns_of_all_events(cuts: list[int]) -> None:
    """Parts see different labels in different orders (users, kbs, models; many nulls); a cut
    at 0 or twice at one place makes an empty part."""
    events = make_events(300, seed=23, hours=30, users=40, null_rate=0.3)
    reg = default_registry({"user": 12})
    offsets = np.arange(1000, 1300)
    bounds = [0, *cuts, len(events)]
    parts = [to_columns(events[a:b], offsets[a:b], reg) for a, b in zip(bounds, bounds[1:], strict=False)]
    whole = to_columns(events, offsets, reg)
    joined = concat_columns(parts)
    assert_same_columns(joined, whole)
    assert joined.levels["trace"].ts is joined.ts  # as to_columns gives it: buckets() reuses the hour starts
    assert joined.buckets() == whole.buckets()
    # The labels really differ between parts, so the renumbering is exercised.
    assert any(p.levels["trace"].labels["user"] != whole.levels["trace"].labels["user"] for p in parts)


def test_folding_the_concatenation_equals_folding_all_events() -> None:
    events = make_events(400, seed=24, hours=10)
    reg = default_registry({"user": 20})
    offsets = np.arange(400)
    a, b = PartitionState(reg), PartitionState(reg)
    fold(a, concat_columns([to_columns(events[:170], offsets[:170], reg),
                            to_columns(events[170:], offsets[170:], reg)]))
    fold(b, to_columns(events, offsets, reg))
    sa, sb = a.states, b.states
    assert sa.keys() == sb.keys() and len(sa) > 100
    for k, s in sa.items():
        t = sb[k]
        assert (s.count, s.sum, s.min, s.max) == (t.count, t.sum, t.min, t.max), k
        if s.digest is not None:
            assert (s.quantile(0.5), s.quantile(0.99)) == (t.quantile(0.5), t.quantile(0.99)), k


def test_one_part_is_returned_as_is_and_mismatched_parts_are_refused() -> None:
    events = make_events(20, seed=25)
    reg = default_registry()
    one = to_columns(events, np.arange(20), reg)
    assert concat_columns([one]) is one
    with pytest.raises(ValueError, match="no columns"):
        concat_columns([])
    trace_only = to_columns(events, np.arange(20), Registry([m for m in DEFAULT_METRICS if m.level == "trace"], {}))
    with pytest.raises(ValueError, match="different registries"):
        concat_columns([one, trace_only])
