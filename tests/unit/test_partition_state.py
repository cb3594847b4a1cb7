"""Columnar partition state: blobs, merged rows, change tracking and eviction against per-key references."""

from __future__ import annotations

import struct

import msgspec
import numpy as np
import pytest
from fastdigest import TDigest
from helpers import make_events, rank_error, reference_values

from stream_agg.core.aggstate import (
    AggState,
    compress_blob,
    decode_bucket,
    decode_bucket_items,
    digest_from_bytes,
    encode_bucket_items,
)
from stream_agg.core.cardinality import capped_values
from stream_agg.core.fold import PartitionState, fold_events
from stream_agg.core.merged_rows import merged_blocks, merged_rows
from stream_agg.core.registry import OTHER, default_registry
from stream_agg.core.sample import SMALL_SAMPLE
from stream_agg.core.state_table import Interner, StateTable, composite


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


def _reference_items(ps: PartitionState, bucket: tuple[str, int]) -> list[tuple[str, str, str, bytes]]:
    """A bucket's states built key by key, as `AggState.to_bytes` lays a state out, except that
    small samples are written as their values (kind 2) and no sample as nothing (kind 0)."""
    items = []
    for metric, dim, t, rng in ps._bucket_tables(bucket):
        for comp, slot in zip(t.keys[rng].tolist(), t.slots[rng].tolist(), strict=True):
            x = t.digests[slot] if t.with_digest else None
            kind, tail = ((0, b"") if x is None else (2, np.asarray(x, dtype="<f8").tobytes())
                          if isinstance(x, np.ndarray) else (1, x.to_bytes()))
            head = struct.pack("<BqdddqB", 1, int(t.count[slot]), float(t.total[slot]), float(t.lo[slot]),
                               float(t.hi[slot]), int(t.applied[slot]), kind)
            items.append((metric, dim, ps.interners[dim].labels[comp & 0xFFFFFFFF], head + tail))
    return items


def test_bucket_blob_holds_exactly_the_per_key_states() -> None:
    """The table-at-a-time blobs (one bucket, many buckets at once, a delta's keys) decode to
    the states laid out key by key, and are the bytes `encode_bucket_items` makes of them."""
    reg = default_registry({"user": 20})
    ps = _partitions(make_events(3000, seed=12, hours=5, users=60), reg, n=1)[0]
    assert any(t._pending for t in ps.tables.values())  # digest values deferred: the encoding must settle them
    buckets = sorted(ps.buckets)
    slices = ps.bucket_slices([*buckets, buckets[0], ("hour", 0)])  # a bucket asked twice, one not held
    assert slices[("hour", 0)] == []
    got = {bucket: ps.encode_bucket(bucket, slices[bucket])[0] for bucket in buckets}  # before anything settles
    kinds = {type(x) for t in ps.tables.values() if t.with_digest for x in t.digests[: t.used]}
    assert {np.ndarray, TDigest} <= kinds  # small samples as values and big ones as digests
    assert any(not t.with_digest for t in ps.tables.values())  # and states without a sample
    many = ps.encode_buckets([*buckets[::-1], buckets[0], ("hour", 0)])
    assert many[("hour", 0)] == (encode_bucket_items([]), 0)
    for bucket in buckets:
        assert slices[bucket] == list(ps._bucket_tables(bucket))
        want = _reference_items(ps, bucket)
        assert decode_bucket_items(got[bucket]) == want
        assert got[bucket] == encode_bucket_items(want)
        assert ps.encode_bucket(bucket)[0] == got[bucket]
        assert many[bucket] == (got[bucket], len(want))
    # a delta: some keys of some tables of one bucket
    bucket = buckets[1]
    tables = {(bucket[0], m, d): t.keys[rng][::3] for m, d, t, rng in slices[bucket][::2]}
    wanted = {(m, d, ps.interners[d].labels[c & 0xFFFFFFFF]) for (_, m, d), cs in tables.items() for c in cs.tolist()}
    delta, n = ps.encode_keys(tables)
    want = [item for item in _reference_items(ps, bucket) if item[:3] in wanted]
    assert n == len(want) > 0 and decode_bucket_items(delta) == want


def _expected_row(parts: list[PartitionState], key: tuple, also: tuple[tuple, ...] = ()) -> tuple:
    """The row of `key` merged the slow way: AggStates of every partition, merged per key
    (with the states of the keys `also`, pushed into `key` by the cap)."""
    states = [s for k in (key, *also) for s in (p.get(k) for p in parts) if s is not None]
    m = AggState.merge_many(states, key[2].endswith("duration_ms"))
    return (m.count, m.sum, m.min, m.max, m.avg, *(m.quantile(q) for q in (0.5, 0.95, 0.99)))


def _pushed_out(parts: list[PartitionState], reg) -> dict[tuple, tuple[tuple, ...]]:
    """Per __other__ key, the keys the cap over every partition's values (the reference rule,
    `capped_values`) pushes into it."""
    scopes: dict[tuple, set[str]] = {}
    for key in set().union(*(p.states for p in parts)):
        scopes.setdefault(key[:4], set()).add(key[4])
    out = {}
    for scope, values in scopes.items():
        cap = reg.cap(scope[3])
        named = sorted(values - {OTHER})
        if cap is not None and len(named) > cap:
            kept = capped_values(named, cap)
            out[(*scope, OTHER)] = tuple((*scope, v) for v in named if v not in kept)
    return out


def _assert_row(got: tuple, want: tuple, key: tuple) -> None:
    assert got[5] == want[0] and got[7:9] == want[2:4], key
    assert got[6] == pytest.approx(want[1], rel=1e-12)
    assert got[9] == pytest.approx(want[4], rel=1e-12)
    for a, b in zip(got[10:13], want[5:8], strict=True):
        assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-9)), key
    if got[10] is not None:  # the stored digest gives the same percentiles back
        assert digest_from_bytes(got[13]).quantile(0.95) == pytest.approx(got[11], rel=1e-9)


def test_merged_rows_equal_per_key_merges_capped_over_all_partitions() -> None:
    reg = default_registry({"user": 15})
    events = make_events(4000, seed=12, hours=30, users=80)
    parts = _partitions(events, reg)
    buckets = sorted(set().union(*(p.buckets for p in parts)))
    rows = merged_rows(parts, buckets)
    pushed = _pushed_out(parts, reg)
    gone = {k for ks in pushed.values() for k in ks}
    # some partition kept a value the cap over the union pushes out: the case this is about
    assert any(p.get(k) is not None for k in gone for p in parts)
    assert set(rows) == set().union(*(p.states for p in parts)) - gone | set(pushed)
    for key, row in rows.items():
        if key not in pushed:
            _assert_row(row, _expected_row(parts, key), key)
    # the rows hold exactly the values and events the reference (caps over all events) gives;
    # percentiles (digests merged in another order for __other__) as the worker's tests check them
    ref = reference_values(events, reg)
    assert set(rows) == set(ref)
    for key, values in ref.items():
        x = np.asarray(values)
        assert rows[key][5] == x.size and rows[key][7:9] == (x.min(), x.max()), key
        assert rows[key][6] == pytest.approx(x.sum(), rel=1e-12), key
        if key[2].endswith("duration_ms"):
            for q, est in zip((0.5, 0.95, 0.99), rows[key][10:13], strict=True):
                assert rank_error(x, est, q) <= (1e-9 if x.size <= SMALL_SAMPLE else 0.001), (key, q)


def test_merged_blocks_of_changed_keys_hold_exactly_those_keys() -> None:
    reg = default_registry({"user": 15})
    events = make_events(3000, seed=21, hours=10, users=60)
    parts = _partitions(events[:2500], reg)
    for p in parts:
        p.take_changes()
    later = events[2500:]
    for i, p in enumerate(parts):  # a few more events, in some partitions only
        if i != 1:
            fold_events(p, later[i::3], np.arange(10_000 + i, 10_000 + len(later), 3))
    changes = [p.take_changes() for p in parts]
    changed = set().union(*(p.keys_of(c) for p, c in zip(parts, changes, strict=True)))
    buckets = {(k[0], k[1]) for k in changed}
    some = sorted(buckets)[::2]  # and only some of the buckets
    removed = set().union(*(c.removed for c in changes))
    cuts: dict = {}
    blocks = merged_blocks(parts, some, [c.tables for c in changes], also=removed, cuts=cuts)
    got = {k: row for b in blocks for k, row in b.rows()}
    held = {k for k in changed if any(p.get(k) is not None for p in parts)}
    assert changed - held <= removed and removed  # pushed into __other__ everywhere: no row
    full = merged_rows(parts, some)  # every row of those buckets, capped over all partitions
    pushed = _pushed_out(parts, reg)
    out = {k for ks in pushed.values() for k in ks if (k[0], k[1]) in set(some)}
    wanted = {k for k in held if (k[0], k[1]) in set(some)}
    assert wanted & out and wanted - out  # changed keys on both sides of the cut
    others = {(*k[:4], OTHER) for k in wanted if (*k[:4], OTHER) in pushed}
    assert set(got) == (wanted - out) | others  # __other__ of every scope over the cap with a change
    for key, row in got.items():  # the same rows, to the digest byte, as merging everything
        assert row == full[key], key
    assert {k[:4] for k in others} <= set(cuts) <= {k[:4] for k in wanted}


def test_changes_are_taken_once_and_restored_after_a_failed_flush() -> None:
    reg = default_registry()
    ps = PartitionState(reg)
    events = make_events(600, seed=13, hours=3)
    fold_events(ps, events[:300], np.arange(300))
    changes = ps.take_changes()
    assert ps.keys_of(changes) == set(ps.states) and not changes.removed
    assert not ps.take_changes() and not ps.has_changes()
    ps.restore_changes(changes)
    assert ps.has_changes() and ps.keys_of(ps.take_changes()) == set(ps.states)
    result = fold_events(ps, events[300:], np.arange(300, 600))
    again = ps.take_changes()
    assert ps.keys_of(again) == result.changed
    some = sorted(again.buckets())[:1]
    assert ps.keys_of(again, skip=some) == {k for k in result.changed if (k[0], k[1]) not in some}


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


def _items(blob: bytes) -> dict[tuple[str, str, str], bytes]:
    return {(m, d, v): data for m, d, v, data in decode_bucket_items(blob)}


def test_a_delta_over_the_stored_blob_gives_the_bucket_as_its_whole_blob() -> None:
    """What a flush writes for a bucket whose whole blob is stored and few of whose states
    changed (late events): only those states, which over the stored blob (`overlay`, as
    every reader applies them) give exactly the blob of the whole bucket."""

    from stream_agg.core.cardinality import cap_hash
    from stream_agg.core.partition_state import DELTA_SHARE, MAX_DELTAS
    from stream_agg.store.stream_state import overlay

    reg = default_registry({"user": 20})
    events = make_events(3000, seed=21, hours=6, users=60)
    ps = PartitionState(reg)
    fold_events(ps, events, np.arange(3000))
    first = ps.take_changes()
    assert all(part is None for _, part in ps.blob_plan(first, {}))  # nothing stored yet
    # every state of every bucket changed: whole blobs even over stored ones
    assert all(part is None for _, part in ps.blob_plan(first, dict.fromkeys(ps.buckets, 0)))
    stored = {b: ps.encode_bucket(b)[0] for b in sorted(ps.buckets)}

    late = [e for e in events if e.started_at < events[0].started_at][:6]  # a few events of early hours
    fold_events(ps, late, np.arange(3000, 3000 + len(late)))
    changes = ps.take_changes()
    changed = ps.keys_of(changes)
    plan = ps.blob_plan(changes, dict.fromkeys(stored, 0))
    assert {b for b, _ in plan} == changes.buckets()
    deltas = [(b, part) for b, part in plan if part is not None]
    assert any(b[0] == "hour" for b, _ in deltas)
    sizes = ps.bucket_sizes(list(stored))
    for b, part in plan:
        mine = {k for k in changed if (k[0], k[1]) == b}
        if part is None:
            assert len(mine) * DELTA_SHARE > sizes[b]
            continue
        blob, n = ps.encode_keys(part)
        delta = _items(blob)
        assert n == len(mine) and {(b[0], b[1], *k) for k in delta} == mine
        whole = overlay(decode_bucket_items(stored[b]), decode_bucket_items(blob))
        assert dict(((m, d, v), x) for m, d, v, x in whole) == _items(ps.encode_bucket(b)[0])
    # too many deltas stacked already, or no stored blob: whole blobs
    assert all(part is None for _, part in ps.blob_plan(changes, dict.fromkeys(stored, MAX_DELTAS)))
    assert all(part is None for _, part in ps.blob_plan(changes, {}))

    # a value the cap pushes out of a bucket (a delta cannot say "gone"): that bucket whole
    b0 = min(b for b in stored if b[0] == "hour")
    kept = [k[4] for k in ps.states if (k[0], k[1], k[3]) == (*b0, "user") and k[4] != OTHER]
    small = next(v for v in (f"new-{i}" for i in range(10_000)) if cap_hash(v) < min(map(cap_hash, kept)))
    e = next(e for e in events if e.user_id is not None and e.started_at == min(x.started_at for x in events))
    fold_events(ps, [msgspec.structs.replace(e, user_id=small)], np.array([4000]))
    changes = ps.take_changes()
    assert any((k[0], k[1]) == b0 for k in changes.removed)
    plan = dict(ps.blob_plan(changes, dict.fromkeys(stored, 0)))
    assert plan[b0] is None


def test_held_names_exactly_the_keys_with_a_state() -> None:
    """`held` (one lookup per table) agrees with `get` per key: keys of this partition, of
    another, pushed into __other__ by the cap, of unknown values, tables and buckets."""
    reg = default_registry({"user": 15})
    parts = _partitions(make_events(3000, seed=5, hours=5, users=80), reg, n=2)
    mine, other = parts
    everything = sorted(set(mine.states) | set(other.states))
    b = everything[0][1]
    asked = everything + [("hour", b, "trace.duration_ms", "user", "nobody"),
                          ("hour", b, "no.such_metric", "all", "all"),
                          ("hour", b - 10 * 3600, "trace.duration_ms", "all", "all"),
                          ("week", b, "trace.duration_ms", "kb", "kb-0")]
    got = mine.held(asked)
    assert got == {k for k in asked if mine.get(k) is not None}
    assert got and len(got) < len(everything)  # the other partition holds keys this one does not
    assert mine.held([]) == set()
