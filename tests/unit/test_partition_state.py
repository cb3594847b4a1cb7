"""Columnar partition state: blobs, merged rows, change tracking and eviction against per-key references."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_events

from stream_agg.core.aggstate import AggState, compress_blob, decode_bucket, decode_bucket_items
from stream_agg.core.fold import PartitionState, fold_events
from stream_agg.core.merged_rows import merged_rows
from stream_agg.core.registry import default_registry
from stream_agg.core.sample import SMALL_SAMPLE
from stream_agg.core.state_table import Interner, StateTable, composite
from stream_agg.store.stream_state import MergedRow


def _partitions(events: list, reg, n: int = 3) -> list[PartitionState]:
    parts = [PartitionState(reg) for _ in range(n)]
    for p in range(n):
        idx = np.arange(p, len(events), n)
        for chunk in np.array_split(idx, 4):
            fold_events(parts[p], [events[i] for i in chunk], chunk)
    return parts


def test_bucket_blob_decodes_to_the_held_states() -> None:
    reg = default_registry({"user": 20})
    ps = _partitions(make_events(2500, seed=11, hours=6, users=60), reg, n=1)[0]
    states = ps.states
    assert any(isinstance(x, np.ndarray) for t in ps.tables.values() for x in t.digests if x is not None)
    for bucket in sorted(ps.buckets):
        blob, n = ps.encode_bucket(bucket)
        decoded = {(bucket[0], bucket[1], m, d, v): s for m, d, v, s in decode_bucket(blob)}
        expected = {k: s for k, s in states.items() if (k[0], k[1]) == bucket}
        assert n == len(expected) and set(decoded) == set(expected)
        for k, s in expected.items():
            t = decoded[k]
            assert (t.count, t.sum, t.min, t.max, t.applied_offset) == (s.count, s.sum, s.min, s.max, s.applied_offset)
            assert (t.digest is None) == (s.digest is None)
            if s.digest is not None:
                for q in (0.5, 0.95, 0.99):
                    assert t.quantile(q) == pytest.approx(s.quantile(q), rel=1e-12)


def test_merged_rows_equal_per_key_merges() -> None:
    reg = default_registry({"user": 15})
    events = make_events(4000, seed=12, hours=30, users=80)
    parts = _partitions(events, reg)
    buckets = sorted(set().union(*(p.buckets for p in parts)))
    rows = merged_rows(parts, buckets)
    keys = set().union(*(p.states for p in parts))
    assert set(rows) == keys
    for key in keys:
        states = [s for s in (p.get(key) for p in parts) if s is not None]
        want = MergedRow(key, AggState.merge_many(states, key[2].endswith("duration_ms"))).values()
        got = rows[key]
        assert got[:6] == want[:6], key
        assert got[6] == pytest.approx(want[6], rel=1e-12)
        assert got[7:9] == want[7:9]
        assert got[9] == pytest.approx(want[9], rel=1e-12)
        for a, b in zip(got[10:13], want[10:13], strict=True):
            assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-9)), key
        assert (got[13] is None) == (want[13] is None)


def test_changes_are_taken_once_and_restored_after_a_failed_flush() -> None:
    reg = default_registry()
    ps = PartitionState(reg)
    events = make_events(600, seed=13, hours=3)
    fold_events(ps, events[:300], np.arange(300))
    changed, removed = ps.take_changes()
    assert changed == set(ps.states) and not removed
    assert ps.take_changes() == (set(), set()) and not ps.has_changes()
    ps.restore_changes(changed, removed)
    assert ps.has_changes() and ps.take_changes()[0] == changed
    result = fold_events(ps, events[300:], np.arange(300, 600))
    again, _ = ps.take_changes()
    assert again == result.changed


def test_evicting_a_bucket_drops_exactly_its_states() -> None:
    reg = default_registry()
    ps = PartitionState(reg)
    fold_events(ps, make_events(800, seed=14, hours=5), np.arange(800))
    before = ps.states
    victim = sorted(b for b in ps.buckets if b[0] == "hour")[1]
    dropped = ps.evict_bucket(victim)
    after = ps.states
    assert dropped == sum(1 for k in before if (k[0], k[1]) == victim)
    assert set(after) == {k for k in before if (k[0], k[1]) != victim}
    assert all(after[k] == before[k] for k in after)
    assert victim not in ps.buckets


def test_small_samples_switch_to_a_digest_past_the_limit() -> None:
    reg = default_registry()
    ps = PartitionState(reg)
    events = make_events(3 * SMALL_SAMPLE, seed=15, hours=1, users=1)
    for i in range(0, len(events), 50):
        fold_events(ps, events[i:i + 50], np.arange(i, min(i + 50, len(events))))
    t = ps.tables[("hour", "trace.duration_ms", "all")]
    (sample,) = [x for x in t.digests if x is not None]
    assert not isinstance(sample, np.ndarray)  # grew past SMALL_SAMPLE values: a digest now
    values = np.array([e.duration_ms for e in events])
    state = next(iter(s for k, s in ps.states.items() if k[0] == "hour" and k[2] == "trace.duration_ms"
                      and k[3] == "all"))
    for q in (0.5, 0.95, 0.99):
        assert state.quantile(q) == pytest.approx(float(np.percentile(values, q * 100, method="linear")), rel=1e-9)


def test_interner_compaction_renumbers_live_values_only() -> None:
    it = Interner()
    ids = it.intern([f"user-{i}" for i in range(70_000)])
    t = StateTable("hour", "m", "user", False)
    live = ids[[5, 69_999]]
    slots, _ = t.ensure(composite(np.array([3600, 7200]), live))
    t.add(slots, np.array([1, 2]), np.array([1.0, 2.0]), np.array([1.0, 2.0]), np.array([1.0, 2.0]),
          np.array([0, 1]))
    remap = it.compact(np.sort(live))
    assert remap is not None and len(it) == 2
    t.relabel(remap)
    got = {(int(k) >> 32, it.labels[int(k) & 0xFFFFFFFF]): int(t.count[s])
           for k, s in zip(t.keys, t.slots, strict=True)}
    assert got == {(1, "user-5"): 1, (2, "user-69999"): 2}


def test_a_loaded_blob_restores_every_state_and_the_cap() -> None:
    reg = default_registry({"user": 10})
    events = make_events(1500, seed=16, hours=4, users=40)
    ps = _partitions(events, reg, n=1)[0]
    again = PartitionState(reg)
    for bucket in sorted(ps.buckets):
        blob, n = ps.encode_bucket(bucket)
        assert again.load_bucket(bucket, decode_bucket_items(compress_blob(blob))) == n
    assert again.buckets == ps.buckets
    want, got = ps.states, again.states
    assert set(got) == set(want)
    for k, s in want.items():
        t = got[k]
        assert (t.count, t.sum, t.min, t.max, t.applied_offset) == (s.count, s.sum, s.min, s.max, s.applied_offset)
        if s.digest is not None:
            assert t.quantile(0.95) == pytest.approx(s.quantile(0.95), rel=1e-12)
    assert again.kept.keys() == ps.kept.keys()
    def kept(state: PartitionState, scope: tuple) -> set[str]:
        return {state.interners[scope[3]].labels[i] for i in state.kept[scope].tolist()}

    assert all(kept(again, s) == kept(ps, s) for s in ps.kept)
    assert again.max_applied == ps.max_applied and not again.has_changes()
