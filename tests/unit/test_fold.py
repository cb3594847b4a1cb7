"""Batch fold against an independent row-by-row computation (tests/helpers.reference_values)."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from helpers import make_events, rank_error, reference_values
from hypothesis import given, settings
from hypothesis import strategies as st

import stream_agg.core.fold as fold_module
from stream_agg.core.aggstate import AggState
from stream_agg.core.buckets import GRANULARITIES, bucket_start
from stream_agg.core.cardinality import cap_hash
from stream_agg.core.fold import PartitionState, fold_events, to_columns
from stream_agg.core.registry import ALL, DIMENSIONS, OTHER, default_registry
from stream_agg.core.sample import digest_of
from stream_agg.core.state_table import PENDING_VALUES, Interner, StateTable, composite

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
    held = [p.states for p in parts]  # (a property that builds every state: once per partition)
    keys = set().union(*held)
    merged = {k: AggState.merge_many([h[k] for h in held if k in h], k[2].endswith("duration_ms")) for k in keys}
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


def _reference_columns(events, reg) -> dict:
    """Per level: (ts, parent, values by metric, dimension value per row), row by row in Python."""
    out = {}
    for level in ("trace", "llm"):
        rows = [(i, e, None) for i, e in enumerate(events)] if level == "trace" else \
            [(i, e, s) for i, e in enumerate(events) for s in e.spans if s.kind == "llm"]
        values = {}
        for m in reg.by_level(level):
            col = []
            for _, e, s in rows:
                v = getattr(e if s is None else s, m.field)
                col.append((1.0 if v == "error" else 0.0) if m.is_error else (np.nan if v is None else float(v)))
            values[m.name] = col
        dims = {}
        for d in reg.dimensions_of(level):
            dim = DIMENSIONS[d]
            dims[d] = [ALL if dim.on == "const" else getattr(e if dim.on == "trace" else s, dim.field)
                       for _, e, s in rows]
        out[level] = ([e.started_at.timestamp() for _, e, _ in rows], [i for i, _, _ in rows], values, dims)
    return out


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_to_columns_matches_a_row_by_row_reading(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Columns are read in chunks with C-level maps; whatever the chunking, they say what the events say."""
    monkeypatch.setattr(fold_module, "_CHUNK", chunk)
    events = make_events(300, seed=11, hours=30, null_rate=0.3)
    reg = default_registry()
    cols = to_columns(events, np.arange(100, 400), reg)
    assert np.array_equal(cols.offsets, np.arange(100, 400))
    for level, (ts, parent, values, dims) in _reference_columns(events, reg).items():
        lc = cols.levels[level]
        assert lc.ts.tolist() == ts and lc.parent.tolist() == parent
        assert lc.offsets.tolist() == [100 + p for p in parent]
        for name, col in values.items():
            assert np.array_equal(lc.values[name], np.asarray(col, dtype=float), equal_nan=True), name
        for d, col in dims.items():
            got = [None if c < 0 else lc.labels[d][c] for c in lc.codes[d].tolist()]
            assert got == col, d
            assert len(set(lc.labels[d])) == len(lc.labels[d]) and None not in lc.labels[d]
    assert cols.buckets() == {(g, bucket_start(t, g)) for t in cols.ts.tolist() for g in GRANULARITIES}


def test_to_columns_of_no_events() -> None:
    cols = to_columns([], np.empty(0, dtype=np.int64), default_registry())
    assert cols.size == 0 and all(lc.size == 0 for lc in cols.levels.values())
    assert cols.buckets() == set()


def test_cap_shared_across_metrics_only_while_their_values_are_the_same() -> None:
    """trace.duration_ms and trace.errors see every user, trace.total_tokens only users with
    tokens: the kept sets part ways, and each must still be the reference's. The fold reuses
    one metric's cap decision for another only while both kept sets are equal, so the last
    batch (only users with tokens: every metric has a value in every group) must not let
    trace.total_tokens follow trace.duration_ms."""
    events = make_events(3000, seed=12, hours=5, users=300, null_rate=0.0)
    no_tokens = {f"u{k}" for k in range(0, 300, 3)}
    events = [msgspec.structs.replace(e, total_tokens=None) if e.user_id in no_tokens else e for e in events]
    reg = default_registry({"user": 12})
    ps = PartitionState(reg)
    for part in np.array_split(np.arange(2000), 8):
        fold_events(ps, [events[i] for i in part], part)
    tail = [i for i in range(2000, 3000) if events[i].user_id not in no_tokens]
    fold_events(ps, [events[i] for i in tail], np.asarray(tail))
    _assert_matches(ps.states, reference_values(events[:2000] + [events[i] for i in tail], reg))

    def kept(metric: str) -> dict:
        labels = ps.interners["user"].labels
        return {s[:2]: {labels[i] for i in ids.tolist()} for s, ids in ps.kept.items() if s[2] == metric}

    duration, errors, tokens = kept("trace.duration_ms"), kept("trace.errors"), kept("trace.total_tokens")
    assert duration == errors
    assert duration.keys() == tokens.keys() and any(duration[s] != tokens[s] for s in duration)
    assert all(not (ids & no_tokens) for ids in tokens.values())


def test_late_events_across_many_buckets_with_a_tight_cap() -> None:
    """Batches that touch dozens of (old) buckets at once, each with its own kept set."""
    events = make_events(2500, seed=13, hours=60, users=200, null_rate=0.05)
    order = np.random.default_rng(13).permutation(len(events))  # every batch reaches back anywhere
    events = [events[i] for i in order.tolist()]
    reg = default_registry({"user": 4, "kb": 2})
    ps = _fold(events, reg, chunks=6)
    _assert_matches(ps.states, reference_values(events, reg))
    # and a re-delivery of the whole stream (the per-row path, rows in any bucket order) changes nothing
    before = {k: (s.count, s.sum, s.min, s.max) for k, s in ps.states.items()}
    again = fold_events(ps, events, np.arange(len(events)))
    assert again.changed == set()
    assert {k: (s.count, s.sum, s.min, s.max) for k, s in ps.states.items()} == before


def test_digest_states_fed_a_few_values_per_batch_stay_exact() -> None:
    """Once a state is a digest, small increments are deferred and applied in bulk; reading the
    states (or a flush) must see every value, exactly while the state is small."""
    events = make_events(1800, seed=14, hours=0.8, users=3)
    reg = default_registry()
    ps = _fold(events, reg, chunks=60)
    assert any(t._pending for t in ps.tables.values())  # values are waiting
    _assert_matches(ps.states, reference_values(events, reg))
    assert not any(t._pending for t in ps.tables.values())
    samples = [x for t in ps.tables.values() for x in t.digests if x is not None]
    assert len({id(x) for x in samples}) == len(samples)  # no two states share a sample
    assert all(x.base is None for x in samples if isinstance(x, np.ndarray))  # nor keep a batch alive


def test_state_table_defers_digest_values_until_read() -> None:
    t = StateTable("hour", "m", "d", with_digest=True)
    slots, _ = t.ensure(np.array([composite(3600, 1), composite(3600, 2)], dtype=np.int64))
    a, b = int(slots[0]), int(slots[1])
    t.live_samples()[a] = digest_of(np.arange(200.0))
    t.live_samples()[b] = digest_of(np.arange(200.0))
    for k in range(5):
        t.defer(a, np.full(3, 1000.0 + k))
        t.defer(b, np.full(3, 1000.0 + k))
    t.delete(np.array([composite(3600, 2)], dtype=np.int64))  # a deleted state's values are dropped
    assert t.digests[a].n_values == 215 and t.digests[b] is None and not t._pending
    t.defer(a, np.arange(PENDING_VALUES, dtype=np.float64))  # a big enough increment goes in at once
    assert not t._pending and t.live_samples()[a].n_values == 215 + PENDING_VALUES


def test_interner_adds_only_unknown_labels() -> None:
    it = Interner()
    assert it.intern(["a", "b", "a"]).tolist() == [0, 1, 0]
    assert it.intern(["c", "b", "c", "d"]).tolist() == [2, 1, 2, 3]
    assert it.labels == ["a", "b", "c", "d"] and it.one("b") == 1 and it.one("e") == 4
    assert it.hashes().tolist() == [cap_hash(v) for v in it.labels]


def test_cap_candidates_with_equal_hashes_are_ordered_by_value() -> None:
    """A 60-bit hash tie (never seen in practice, so forced here) is broken by the value, as
    the SQL ranking does: which values a cap keeps must not depend on interning order."""
    from stream_agg.core.fold import _smallest

    labels = ["u-b", "u-a", "u-d", "u-c", "u-e", "u-f"]  # by label id
    cand = np.array([3, 0, 4, 1, 2, 5], dtype=np.int64)  # label ids, in candidate order
    hashes = np.array([7, 7, 1, 7, 9, 7], dtype=np.int64)  # per candidate
    for k in range(1, 7):
        want = sorted(range(cand.size), key=lambda i: (int(hashes[i]), labels[int(cand[i])]))[:k]
        assert _smallest(cand, hashes, k, labels).tolist() == [int(cand[i]) for i in want]
