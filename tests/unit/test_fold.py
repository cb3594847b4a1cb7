"""Batch fold against an independent row-by-row computation (tests/helpers.reference_values)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_events, rank_error, reference_values
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_agg.core.aggstate import AggState
from stream_agg.core.fold import PartitionState, fold_events
from stream_agg.core.registry import OTHER, default_registry

QS = (0.5, 0.95, 0.99)


def _fold(events, registry, chunks: int = 1, offsets=None) -> PartitionState:
    ps = PartitionState(registry)
    offs = np.arange(len(events)) if offsets is None else np.asarray(offsets)
    for part in np.array_split(np.arange(len(events)), chunks):
        fold_events(ps, [events[i] for i in part], offs[part])
    return ps


def _assert_matches(states: dict, ref: dict) -> None:
    assert set(states) == set(ref)
    for key, values in ref.items():
        s, x = states[key], np.asarray(values)
        assert s.count == x.size, key
        assert s.sum == pytest.approx(float(x.sum()), rel=1e-9, abs=1e-9), key
        assert (s.min, s.max) == (float(x.min()), float(x.max())), key
        if s.digest is not None:
            for q in QS:
                est = s.quantile(q)
                if x.size <= 1000:
                    assert est == pytest.approx(float(np.percentile(x, q * 100, method="linear")), rel=1e-9), key
                else:
                    assert rank_error(x, est, q) <= 0.001, key


def test_every_key_matches_reference() -> None:
    events = make_events(3000, seed=1, hours=30)
    reg = default_registry({"user": 1000})
    ps = _fold(events, reg)
    _assert_matches(ps.states, reference_values(events, reg))
    metrics = {k[2] for k in ps.states}
    assert metrics == set(reg.names)
    # percentile columns only where a digest is kept
    assert all((s.digest is not None) == k[2].endswith("duration_ms") for k, s in ps.states.items())


def test_large_bucket_quantiles_within_rank_error() -> None:
    events = make_events(6000, seed=2, hours=1)  # one hour bucket with > 1000 values
    reg = default_registry()
    ps = _fold(events, reg, chunks=7)
    ref = reference_values(events, reg)
    big = [k for k, v in ref.items() if len(v) > 1000 and ps.states[k].digest is not None]
    assert big
    _assert_matches(ps.states, ref)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 12))
def test_split_anywhere_equals_whole(seed: int, chunks: int) -> None:
    events = make_events(400, seed=seed, hours=50, users=30)
    reg = default_registry({"user": 8})
    whole = _fold(events, reg).states
    split = _fold(events, reg, chunks=chunks).states
    assert set(whole) == set(split)
    for k, s in whole.items():
        t = split[k]
        assert (t.count, t.min, t.max, t.applied_offset) == (s.count, s.min, s.max, s.applied_offset)
        assert t.sum == pytest.approx(s.sum, rel=1e-9, abs=1e-9)
        for q in QS:
            assert t.quantile(q) == pytest.approx(s.quantile(q), rel=1e-9, abs=1e-9) if s.digest else True


def test_refolding_changes_nothing_and_redelivery_is_per_key() -> None:
    events = make_events(1000, seed=3, hours=5)
    reg = default_registry()
    ps = _fold(events, reg, chunks=3)
    before = {k: s.copy() for k, s in ps.states.items()}
    again = fold_events(ps, events, np.arange(len(events)))
    assert again.changed == set() and again.rows_skipped > 0
    assert ps.states == before
    # a re-delivered tail (offsets 900..999) plus new events (1000..1199): only the new ones count
    more = make_events(200, seed=4, hours=5)
    fold_events(ps, events[900:] + more, np.arange(900, 1200))
    _assert_matches(ps.states, reference_values(events + more, reg))


def test_cap_keeps_totals_exact_and_picks_the_reference_values() -> None:
    events = make_events(2000, seed=5, hours=3, users=400, null_rate=0.0)
    reg = default_registry({"user": 10, "kb": 3})
    ps = _fold(events, reg, chunks=5)
    _assert_matches(ps.states, reference_values(events, reg))
    for (g, b, m, d, _v), s in ps.states.items():
        if d == "all" and m.startswith("trace."):
            parts = [t for k, t in ps.states.items() if k[:3] == (g, b, m) and k[3] == "user"]
            assert sum(t.count for t in parts) == s.count
            assert sum(t.sum for t in parts) == pytest.approx(s.sum, rel=1e-9)
            assert len([1 for k in ps.states if k[:4] == (g, b, m, "user") and k[4] != OTHER]) <= 10
    assert any(k[4] == OTHER for k in ps.states)


def test_partitions_merge_to_the_whole() -> None:
    events = make_events(1500, seed=6, hours=8)
    reg = default_registry()
    parts = [PartitionState(reg) for _ in range(3)]
    for p in range(3):
        idx = np.arange(p, len(events), 3)
        fold_events(parts[p], [events[i] for i in idx], idx)
    keys = set().union(*(p.states for p in parts))
    merged = {k: AggState.merge_many([p.states[k] for p in parts if k in p.states], k[2].endswith("duration_ms"))
              for k in keys}
    _assert_matches(merged, reference_values(events, reg))


def test_null_dimensions_and_values_are_skipped() -> None:
    events = make_events(300, seed=7, null_rate=0.5)
    reg = default_registry()
    ps = _fold(events, reg)
    n_tokens = sum(e.total_tokens is not None for e in events)
    day_all = [s for k, s in ps.states.items() if k[0] == "week" and k[2] == "trace.total_tokens" and k[3] == "all"]
    assert sum(s.count for s in day_all) == n_tokens
    n_user = sum(e.user_id is not None for e in events)
    wk_user = [s for k, s in ps.states.items() if k[0] == "week" and k[2] == "trace.duration_ms" and k[3] == "user"]
    assert sum(s.count for s in wk_user) == n_user


def test_small_then_large_batches_keep_every_granularity_exact() -> None:
    """An hour state held as exact values, then a batch big enough to bring a digest: the hour
    takes that digest as its own, and day / week must see each value once."""
    events = make_events(900, seed=8, hours=0.5)
    reg = default_registry()
    ps = PartitionState(reg)
    fold_events(ps, events[:60], np.arange(60))
    fold_events(ps, events[60:], np.arange(60, 900))
    _assert_matches(ps.states, reference_values(events, reg))
