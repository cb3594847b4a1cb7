"""The cap over the union of partitions: rows kept incrementally equal rows merged at once,
and both equal the reference rule applied to every event (as the SQL backfill does)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_events, reference_values

from stream_agg.core.aggstate import AggState
from stream_agg.core.cardinality import capped_values
from stream_agg.core.fold import PartitionState, fold_events
from stream_agg.core.global_cap import CapCuts, cap_states, cut_union
from stream_agg.core.merged_rows import merged_blocks, merged_rows
from stream_agg.core.registry import OTHER, default_registry
from stream_agg.core.state_table import LABEL_SPACE, Interner


def _merge(states: list[AggState]) -> AggState:
    return AggState.merge_many(states, any(s.digest is not None for s in states))


def test_incremental_flushes_end_with_the_rows_of_one_merge_and_of_the_reference() -> None:
    """A worker's flushes: fold a round into three partitions, merge only the changed keys
    (with the cuts of the last flush), upsert the rows and delete the ones pushed out. The
    table must end as one merge of everything, with the values the reference rule keeps.
    Half-way the cuts are forgotten, as after a restart."""
    reg = default_registry({"user": 6})
    events = make_events(3000, seed=31, hours=8, users=40)
    parts = [PartitionState(reg) for _ in range(3)]
    table: dict[tuple, tuple] = {}
    known: dict = {}
    deleted_with_known_cut = 0
    rounds = np.array_split(np.arange(len(events)), 8)
    for r, idx in enumerate(rounds):
        for p, ps in enumerate(parts):
            mine = idx[idx % 3 == p]
            fold_events(ps, [events[i] for i in mine], mine)
        changes = [ps.take_changes() for ps in parts]
        buckets = set().union(*(c.buckets() for c in changes))
        removed = set().union(*(c.removed for c in changes))
        cuts = CapCuts(known=dict(known))
        blocks = merged_blocks(parts, buckets, [c.tables for c in changes], also=removed, cuts=cuts)
        rows = {k: row for b in blocks for k, row in b.rows()}
        gone = set(cuts.gone) | {k for k in removed if all(ps.get(k) is None for ps in parts)}
        assert not gone & set(rows)
        if known:
            deleted_with_known_cut += len(gone & set(table) & set(cuts.gone))
        for k in gone:
            table.pop(k, None)
        table.update(rows)
        known = {} if r == 4 else {**known, **cuts.cuts}
    assert deleted_with_known_cut  # rows written, then pushed out by a later flush's values
    every = merged_rows(parts, set().union(*(ps.buckets for ps in parts)))
    assert table.keys() == every.keys()
    for key, row in every.items():
        assert table[key][5:9] == row[5:9], key  # count, sum, min, max
    ref = reference_values(events, reg)
    assert set(table) == set(ref)
    for key, values in ref.items():
        assert table[key][5] == len(values) and table[key][6] == pytest.approx(sum(values), rel=1e-12), key


def test_known_cuts_delete_only_what_the_new_values_pushed_out() -> None:
    reg = default_registry({"user": 6})
    events = make_events(2000, seed=32, hours=4, users=30)
    parts = [PartitionState(reg) for _ in range(2)]
    for p, ps in enumerate(parts):
        fold_events(ps, events[p::2], np.arange(p, len(events), 2))
    first = CapCuts()
    buckets = set().union(*(ps.buckets for ps in parts))
    merged_blocks(parts, buckets, [ps.take_changes().tables for ps in parts], cuts=first)
    assert first.gone and first.cuts  # nothing known: every value past a cut may have a row
    again = CapCuts(known=first.cuts)
    merged_blocks(parts, buckets, cuts=again)
    assert again.gone == [] and again.cuts == first.cuts  # same values: same cuts, nothing to delete


def test_the_per_key_merge_caps_like_the_vectorised_one() -> None:
    """`cap_states` (other workers' partials, replay) gives the rows `merged_blocks` gives."""
    reg = default_registry({"user": 5})
    events = make_events(2500, seed=33, hours=6, users=35)
    parts = [PartitionState(reg) for _ in range(3)]
    for p, ps in enumerate(parts):
        fold_events(ps, events[p::3], np.arange(p, len(events), 3))
    keys = set().union(*(ps.states for ps in parts))
    states = {k: _merge([s for s in (ps.get(k) for ps in parts) if s is not None]) for k in keys}
    record = CapCuts()
    rows = cap_states(states, keys, reg.caps, record, _merge)
    vector = merged_rows(parts, set().union(*(ps.buckets for ps in parts)))
    assert rows.keys() == vector.keys()
    for key, state in rows.items():
        assert (state.count, state.min, state.max) == (vector[key][5], vector[key][7], vector[key][8]), key
        assert state.sum == pytest.approx(vector[key][6], rel=1e-12), key
    pushed = keys - set(rows)
    assert pushed and set(record.gone) == pushed
    # one changed key, cuts known: only its row (kept) or __other__ (pushed out) is written
    kept_key = next(k for k in sorted(rows) if k[3] == "user" and k[4] != OTHER)
    out_key = sorted(pushed)[0]
    assert set(cap_states(states, {kept_key}, reg.caps, CapCuts(known=record.cuts), _merge)) == {kept_key}
    again = CapCuts(known=record.cuts)
    assert set(cap_states(states, {out_key}, reg.caps, again, _merge)) == {(*out_key[:4], OTHER)}
    assert again.gone == []


@pytest.mark.parametrize("cap", [1, 3, 8])
def test_cut_union_keeps_the_smallest_hash_then_value_per_bucket(cap: int) -> None:
    rng = np.random.default_rng(cap)
    labels = [f"v{i}" for i in range(40)] + [OTHER]
    other = len(labels) - 1
    hashes = rng.integers(0, 6, size=len(labels)).astype(np.int64)  # many ties: the value decides
    keys = np.unique(np.concatenate([h * LABEL_SPACE + rng.choice(len(labels), size=rng.integers(0, 15))
                                     for h in range(5)]))
    prev = {2: (3, "v5")}
    result = cut_union(keys, labels, hashes, other, cap, prev.get)
    want_out, want_stale, want_cuts = [], [], {}
    for hour in range(5):
        ids = [int(k % LABEL_SPACE) for k in keys if k // LABEL_SPACE == hour and k % LABEL_SPACE != other]
        ranked = sorted((int(hashes[i]), labels[i], i) for i in ids)
        if len(ranked) > cap:
            want_cuts[hour] = ranked[cap - 1][:2]
        for h, v, i in ranked[cap:]:
            want_out.append(hour * LABEL_SPACE + i)
            if hour not in prev or (h, v) <= prev[hour]:
                want_stale.append(hour * LABEL_SPACE + i)
    assert result.out.tolist() == sorted(want_out)
    assert result.stale.tolist() == sorted(want_stale)
    assert result.cuts == want_cuts
    # with the real (md5) hashes, the values kept are the backfill's
    it = Interner()
    ids = it.intern([*labels[:-1], OTHER])
    real = cut_union(np.sort(7 * LABEL_SPACE + ids), it.labels, it.hashes(), int(ids[-1]), cap, lambda h: None)
    out = {it.labels[int(k % LABEL_SPACE)] for k in real.out}
    assert set(labels[:-1]) - out == capped_values(labels[:-1], cap)
