"""The cap over the union of partitions: rows kept incrementally equal rows merged at once,
and both equal the reference rule applied to every event (as the SQL backfill does)."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from helpers import make_events, reference_values

from stream_agg.core.aggstate import AggState, decode_bucket_items
from stream_agg.core.buckets import bucket_start
from stream_agg.core.cardinality import cap_hash, capped_values
from stream_agg.core.fold import PartitionState, fold_events
from stream_agg.core.global_cap import cap_states, cut_union
from stream_agg.core.merged_rows import merged_blocks, merged_rows
from stream_agg.core.registry import OTHER, default_registry
from stream_agg.core.state_table import LABEL_SPACE, Interner


def _merge(states: list[AggState]) -> AggState:
    return AggState.merge_many(states, any(s.digest is not None for s in states))


def _delete_past(table: dict[tuple, tuple], cuts: dict) -> None:
    """What the writer's SQL does (`stream_state._delete_past_cuts`): drop the rows of each
    scope past its cut, whoever wrote them."""
    for key in [k for k in table if k[:4] in cuts and k[4] != OTHER]:
        if (cap_hash(key[4]), key[4]) > cuts[key[:4]]:
            del table[key]


def _flush(parts: list[PartitionState], table: dict[tuple, tuple]) -> dict:
    """One flush of the changes into `table`, as the worker writes it; returns the cuts."""
    changes = [ps.take_changes() for ps in parts]
    removed = set().union(*(c.removed for c in changes))
    cuts: dict = {}
    blocks = merged_blocks(parts, set().union(*(c.buckets() for c in changes)), [c.tables for c in changes],
                           also=removed, cuts=cuts)
    _delete_past(table, cuts)
    for k in removed:
        if all(ps.get(k) is None for ps in parts):
            table.pop(k, None)
    table.update((k, row) for b in blocks for k, row in b.rows())
    return cuts


def test_incremental_flushes_keep_the_rows_of_one_merge_of_everything() -> None:
    """A worker's flushes: fold a round into three partitions, merge only the changed keys,
    delete the rows past the cuts and upsert the rest. After every flush the table must
    equal one merge of everything held (to the digest byte), and in the end the reference
    rule applied to every event. A stray row past a cut (as a replay that saw fewer
    values writes) goes at the next flush of its scope."""
    reg = default_registry({"user": 6})
    events = make_events(3000, seed=31, hours=8, users=40)
    parts = [PartitionState(reg) for _ in range(3)]
    table: dict[tuple, tuple] = {}
    stray = None
    for r, idx in enumerate(np.array_split(np.arange(len(events)), 8)):
        for p, ps in enumerate(parts):
            mine = idx[idx % 3 == p]
            fold_events(ps, [events[i] for i in mine], mine)
        cuts = _flush(parts, table)
        every = merged_rows(parts, set().union(*(ps.buckets for ps in parts)))
        if stray is not None:
            assert stray not in table
        assert table == every, r
        if r == 5:  # a row past a cut, of a scope the next rounds write
            scope = next(k[:4] for k in sorted(table) if k[3] == "user" and k[0] == "week")
            stray = (*scope, "u-stray")
            assert scope in cuts and (cap_hash("u-stray"), "u-stray") > cuts[scope]
            table[stray] = table[(*scope, OTHER)]
    ref = reference_values(events, reg)
    assert set(table) == set(ref)
    for key, values in ref.items():
        assert table[key][5] == len(values) and table[key][6] == pytest.approx(sum(values), rel=1e-12), key


def test_a_new_value_below_the_cut_moves_an_unchanged_one_into_other() -> None:
    """No partition evicts anything, so no __other__ state changes, and the value pushed
    out is not folded into: its row must still go and its events move into __other__."""
    reg = default_registry({"user": 2})
    base = make_events(4, seed=34, hours=0.2, users=3)
    v1, v2, v3, v4 = sorted((f"w{i}" for i in range(40)), key=lambda v: (cap_hash(v), v))[:4]

    def ev(i: int, user: str):  # noqa: ANN202
        return msgspec.structs.replace(base[i], user_id=user)

    parts = [PartitionState(reg), PartitionState(reg)]
    fold_events(parts[0], [ev(0, v2), ev(1, v3)], [0, 1])
    fold_events(parts[1], [ev(2, v4)], [0])
    table: dict[tuple, tuple] = {}
    _flush(parts, table)
    scope = ("hour", bucket_start(base[0].started_at.timestamp(), "hour"), "trace.duration_ms", "user")
    assert sorted(k[4] for k in table if k[:4] == scope) == sorted([v2, v3, OTHER])
    fold_events(parts[1], [ev(3, v1)], [1])
    assert all(ps.get((*scope, OTHER)) is None for ps in parts)
    _flush(parts, table)
    assert sorted(k[4] for k in table if k[:4] == scope) == sorted([v1, v2, OTHER])
    assert table[(*scope, OTHER)][5] == 2  # v3's event and v4's
    assert table == merged_rows(parts, set().union(*(ps.buckets for ps in parts)))


def test_the_per_key_merge_caps_like_the_vectorised_one() -> None:
    """`cap_states` (other workers' partials, replay) gives the rows `merged_blocks` gives."""
    reg = default_registry({"user": 5})
    events = make_events(2500, seed=33, hours=6, users=35)
    parts = [PartitionState(reg) for _ in range(3)]
    for p, ps in enumerate(parts):
        fold_events(ps, events[p::3], np.arange(p, len(events), 3))
    keys = set().union(*(ps.states for ps in parts))
    states = {k: [s for s in (ps.get(k) for ps in parts) if s is not None] for k in keys}
    cuts: dict = {}
    rows = cap_states(states, keys, reg.caps, cuts, _merge)
    vector: dict = {}
    everything = merged_rows(parts, set().union(*(ps.buckets for ps in parts)))
    merged_blocks(parts, set().union(*(ps.buckets for ps in parts)), cuts=vector)
    assert rows.keys() == everything.keys() and cuts == vector and cuts
    for key, state in rows.items():
        want = everything[key]
        assert (state.count, state.min, state.max) == (want[5], want[7], want[8]), key
        assert state.sum == pytest.approx(want[6], rel=1e-12), key
    # one changed key: its row if kept; __other__ instead if past the cut; __other__ of a
    # scope over the cap is always written (a new value may have pushed an unchanged one out)
    pushed = sorted(keys - set(rows))
    over = {k[:4] for k in pushed}
    kept = next(k for k in sorted(rows) if k[:4] in over and k[4] != OTHER)
    assert set(cap_states(states, {kept}, reg.caps, {}, _merge)) == {kept, (*kept[:4], OTHER)}
    assert set(cap_states(states, {pushed[0]}, reg.caps, {}, _merge)) == {(*pushed[0][:4], OTHER)}
    under = next(k for k in sorted(rows) if k[3] == "user" and k[:4] not in over)
    assert set(cap_states(states, {under}, reg.caps, {}, _merge)) == {under}


@pytest.mark.parametrize("cap", [1, 3, 8])
def test_cut_union_keeps_the_smallest_hash_then_value_per_bucket(cap: int) -> None:
    rng = np.random.default_rng(cap)
    labels = [f"v{i}" for i in range(40)] + [OTHER]
    other = len(labels) - 1
    hashes = rng.integers(0, 6, size=len(labels)).astype(np.int64)  # many ties: the value decides
    keys = np.unique(np.concatenate([h * LABEL_SPACE + rng.choice(len(labels), size=rng.integers(0, 15))
                                     for h in range(5)]))
    result = cut_union(keys, labels, hashes, other, cap)
    want_out, want_cuts = [], {}
    for hour in range(5):
        ids = [int(k % LABEL_SPACE) for k in keys if k // LABEL_SPACE == hour and k % LABEL_SPACE != other]
        ranked = sorted((int(hashes[i]), labels[i], i) for i in ids)
        if len(ranked) >= cap:
            want_cuts[hour] = ranked[cap - 1][:2]
        want_out += [hour * LABEL_SPACE + i for _, _, i in ranked[cap:]]
    assert result.out.tolist() == sorted(want_out)
    assert result.cuts == want_cuts
    # with the real (md5) hashes, the values kept are the backfill's
    it = Interner()
    ids = it.intern([*labels[:-1], OTHER])
    real = cut_union(np.sort(7 * LABEL_SPACE + ids), it.labels, it.hashes(), int(ids[-1]), cap)
    out = {it.labels[int(k % LABEL_SPACE)] for k in real.out}
    assert set(labels[:-1]) - out == capped_values(labels[:-1], cap)


def test_other_merges_the_same_bytes_whatever_the_value_ids() -> None:
    """A restart reloads each partition from its blobs, numbering values in another order;
    the rows, __other__'s digest included, must come out byte for byte the same."""
    reg = default_registry({"user": 6})
    events = make_events(3000, seed=35, hours=30, users=60)
    parts = [PartitionState(reg) for _ in range(3)]
    for p, ps in enumerate(parts):
        fold_events(ps, events[p::3], np.arange(p, len(events), 3))
    reloaded = []
    for ps in parts:
        again = PartitionState(reg)
        for bucket in sorted(ps.buckets, reverse=True):  # other buckets' values first: other ids
            again.load_bucket(bucket, decode_bucket_items(ps.encode_bucket(bucket)[0]))
        reloaded.append(again)
    user = next(k for k in sorted(parts[0].states) if k[3] == "user" and k[0] == "hour")
    assert (parts[0].interner("user").ids[user[4]], parts[0].interner("user").labels) != \
        (reloaded[0].interner("user").ids[user[4]], reloaded[0].interner("user").labels)
    buckets = set().union(*(ps.buckets for ps in parts))
    before, after = merged_rows(parts, buckets), merged_rows(reloaded, buckets)
    assert any(k[4] == OTHER and row[13] is not None and len(row[13]) > 1000 for k, row in before.items())
    assert before == after
