"""`sorted_unique` is `np.unique` (its sorted distinct values) for the integer arrays it is given."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stream_agg.core.state_table import LABEL_SPACE, sorted_unique

INTS = st.sampled_from([np.int64, np.intp, np.int32, np.uint32])


@settings(max_examples=300, deadline=None)
@given(INTS.flatmap(lambda dt: arrays(dt, st.integers(0, 300), elements=st.integers(0, 40))))
def test_equals_np_unique_with_many_repeats(a: np.ndarray) -> None:
    got = sorted_unique(a)
    want = np.unique(a)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_composite_keys_at_merge_sizes() -> None:
    rng = np.random.default_rng(7)
    hours = rng.integers(480_000, 480_048, 200_000)
    keys = hours * LABEL_SPACE + rng.integers(0, 2_500, hours.size)
    got = sorted_unique(keys)
    np.testing.assert_array_equal(got, np.unique(keys))
    assert got.size == len(set(keys.tolist()))


def test_edges_and_input_left_alone() -> None:
    for a in (np.empty(0, dtype=np.int64), np.array([5]), np.array([3, 3, 3]), np.array([-2, 7, -2, -9])):
        before = a.copy()
        np.testing.assert_array_equal(sorted_unique(a), np.unique(a))
        np.testing.assert_array_equal(a, before)
