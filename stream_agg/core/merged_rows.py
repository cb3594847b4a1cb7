"""metrics_aggregates rows of whole buckets, merged across the partitions held in memory.

Why vectorised: with one worker owning every partition, each flush rewrites the rows
of every key that changed, 100,000 and more per flush under load. Doing that per key
(an AggState per partition, a merge, a digest, a tuple for psycopg) cost more than
folding the events. Here count / sum / min / max are merged with numpy across
partitions per table, and so are the exact percentiles of small samples (values sorted
per row with one sort); only rows holding a t-digest do per-row work. The result
is a `RowBlock` of columns per table, which `store.rows_copy` renders as binary COPY.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_agg.core.aggstate import (
    DIGEST_SAMPLE,
    NO_SAMPLE,
    VALUES_DIGEST_PREFIX,
    VALUES_SAMPLE,
    AggState,
    digest_to_bytes,
)
from stream_agg.core.buckets import to_datetime
from stream_agg.core.global_cap import Cut, Scope, cut_union
from stream_agg.core.partition_state import BucketId, Key, PartitionState, TableId
from stream_agg.core.registry import OTHER
from stream_agg.core.sample import SAMPLE_KIND, SMALL_SAMPLE, combine, segment_quantiles, to_digest
from stream_agg.core.state_table import (
    F64,
    HOUR,
    I64,
    LABEL_BITS,
    LABEL_MASK,
    LABEL_SPACE,
    Interner,
    member_of_sorted,
    sorted_unique,
)

QUANTILES = (0.5, 0.95, 0.99)
Row = tuple[Any, ...]  # the columns of metrics_aggregates the stream writes, in `Row` order (see RowBlock.rows)


@dataclass
class RowBlock:
    """Merged rows of one (granularity, metric, dimension): one entry per row in each column.

    The merge gives the rows by value, then hour (`_index_order`: the order PostgreSQL's
    dashboard index keeps them in); other makers of blocks may give any order.

    `quantiles` is (n, 3) with NaN for NULL (events are validated finite, so a real
    percentile is never NaN), or None for a metric without percentiles; `digests` holds
    the stored digest bytes (None = NULL), or is None for such a metric.
    """

    granularity: str
    metric: str
    dimension: str
    hours: I64  # bucket start, in hours since the epoch
    labels: list[str]
    count: I64
    total: F64
    lo: F64
    hi: F64
    quantiles: F64 | None
    digests: list[bytes | None] | None

    def __len__(self) -> int:
        return int(self.hours.size)

    def take(self, rows: I64) -> RowBlock:
        """The block's rows at positions `rows` (a new block; the arrays are copied)."""
        at = rows.tolist()
        return RowBlock(self.granularity, self.metric, self.dimension, self.hours[rows],
                        list(map(self.labels.__getitem__, at)), self.count[rows], self.total[rows], self.lo[rows],
                        self.hi[rows], None if self.quantiles is None else self.quantiles[rows],
                        None if self.digests is None else list(map(self.digests.__getitem__, at)))

    def keys(self) -> Iterator[Key]:
        g, m, d = self.granularity, self.metric, self.dimension
        for h, v in zip(self.hours.tolist(), self.labels, strict=True):
            yield (g, h * HOUR, m, d, v)

    def rows(self) -> Iterator[tuple[Key, Row]]:
        """(key, row) pairs, the row as (bucket_time, granularity, metric, dimension, value,
        count, sum, min, max, avg, p50, p95, p99, digest) with None for NULL (tests, tools)."""
        g, m, d = self.granularity, self.metric, self.dimension
        qs = (self.quantiles.tolist() if self.quantiles is not None else [[math.nan] * 3] * len(self))
        digests = self.digests if self.digests is not None else [None] * len(self)
        for key, c, s, a, b, q, dg in zip(self.keys(), self.count.tolist(), self.total.tolist(), self.lo.tolist(),
                                          self.hi.tolist(), qs, digests, strict=True):
            q3 = [None if math.isnan(x) else x for x in q]
            yield key, (to_datetime(key[1]), g, m, d, key[4], c, s, a, b, s / c if c else None, *q3, dg)


def merged_rows(pstates: Sequence[PartitionState], buckets: Collection[BucketId]) -> dict[Key, Row]:
    """Key -> merged row of every key of `buckets` held by any of `pstates` (tests and tools)."""
    return {key: row for block in merged_blocks(pstates, buckets) for key, row in block.rows()}


def merged_blocks(pstates: Sequence[PartitionState], buckets: Collection[BucketId],
                  changed: Sequence[Mapping[TableId, I64]] | None = None,
                  also: Collection[Key] = (), cuts: dict[Scope, Cut] | None = None) -> list[RowBlock]:
    """`iter_merged_blocks` as a list."""
    return list(iter_merged_blocks(pstates, buckets, changed, also, cuts))


def iter_merged_blocks(pstates: Sequence[PartitionState], buckets: Collection[BucketId],
                       changed: Sequence[Mapping[TableId, I64]] | None = None,
                       also: Collection[Key] = (), cuts: dict[Scope, Cut] | None = None) -> Iterator[RowBlock]:
    """Merged rows of `buckets` across `pstates`: every key held, or only the keys in `changed`
    and `also`.

    `changed[i]` holds, per table, composite keys of `pstates[i]` (its own value ids), as
    `PartitionState.take_changes` returns them; a key changed in one partition is merged
    from all. `also` names more keys (those a partition removed: still held by another,
    their row must lose that partition's part). `pstates` must be in partition order
    (digests merge in that order, so the same partials always give the same bytes).
    Capped dimensions are capped again over the union of the partitions (`global_cap`);
    `cuts` gets the cut of each written scope holding at least its cap's number of values
    (the writer deletes the rows past it) as each table is merged. Nothing in the live
    states is changed; the live states must not change either until the last block is taken.
    """
    cuts = {} if cuts is None else cuts
    wanted: dict[str, list[int]] = {}
    for g, b in buckets:
        wanted.setdefault(g, []).append(b // HOUR)
    hours = {g: sorted_unique(np.asarray(v, dtype=np.int64)) for g, v in wanted.items()}
    glob: dict[str, Interner] = {}
    trans: dict[tuple[int, str], I64] = {}
    tids: dict[TableId, None] = {}
    for i, ps in enumerate(pstates):
        source = ps.tables if changed is None else changed[i]
        for tid in source:
            if tid[0] in hours:
                tids[tid] = None
    extra: dict[TableId, list[Key]] = {}
    for key in also:
        if key[0] in hours:
            extra.setdefault((key[0], key[2], key[3]), []).append(key)
            tids[(key[0], key[2], key[3])] = None
    for tid in tids:
        more = None
        if tid in extra:
            it = glob.setdefault(tid[2], Interner())
            ks = extra[tid]
            more = (np.array([k[1] // HOUR for k in ks], dtype=np.int64) * LABEL_SPACE
                    + it.intern([k[4] for k in ks]))
        block = _table_block(pstates, tid, hours[tid[0]], glob, trans,
                             None if changed is None else [c.get(tid) for c in changed], more, cuts)
        if block is not None:
            yield block


def _translation(ps_index: int, ps: PartitionState, dim: str, glob: dict[str, Interner],
                 trans: dict[tuple[int, str], I64]) -> I64:
    """This partition's value ids -> ids of one interner shared by the merge."""
    key = (ps_index, dim)
    t = trans.get(key)
    if t is None or t.size < len(ps.interners[dim]):
        it = glob.setdefault(dim, Interner())
        t = trans[key] = it.intern(ps.interners[dim].labels)
    return t


def _positions(keys: I64, hours: I64) -> I64:
    """Positions in the sorted composite `keys` of every key of the buckets `hours` (sorted):
    one contiguous range per bucket, found by `searchsorted` (not a scan of every key held)."""
    start = np.searchsorted(keys, hours * LABEL_SPACE)
    lengths = np.searchsorted(keys, (hours + 1) * LABEL_SPACE) - start
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    before = np.cumsum(lengths) - lengths
    return np.repeat(start - before, lengths) + np.arange(total, dtype=np.int64)


def _globalize(keys: I64, tr: I64) -> I64:
    return (keys >> LABEL_BITS) * LABEL_SPACE + tr[keys & LABEL_MASK]


def _table_block(pstates: Sequence[PartitionState], tid: TableId, hours: I64, glob: dict[str, Interner],
                 trans: dict[tuple[int, str], I64], changed: list[I64 | None] | None,
                 more: I64 | None, cuts: dict[Scope, Cut]) -> RowBlock | None:
    g, metric, dim = tid
    only: I64 | None = None
    if changed is not None:  # the changed keys of the wanted buckets, in the shared id space
        parts = [] if more is None else [more[np.isin(more >> LABEL_BITS, hours)]]
        for i, (ps, comps) in enumerate(zip(pstates, changed, strict=True)):
            if comps is not None and comps.size:
                comps = comps[np.isin(comps >> LABEL_BITS, hours)]
                parts.append(_globalize(comps, _translation(i, ps, dim, glob, trans)))
        if not parts:
            return None
        only = sorted_unique(np.concatenate(parts))
    held: list[tuple[Any, I64, I64]] = []  # (table, positions, keys in the shared id space) per partition
    for i, ps in enumerate(pstates):
        t = ps.tables.get(tid)
        if t is None or t.keys.size == 0:
            continue
        pos = _positions(t.keys, hours)
        if pos.size:
            held.append((t, pos, _globalize(t.keys[pos], _translation(i, ps, dim, glob, trans))))
    cap = pstates[0].registry.cap(dim) if pstates else None
    renamed = False  # keys past a cut renamed to __other__: a partition may give a row several parts
    if cap is not None and held:
        held, only, renamed = _cap_union(held, only, tid, glob[dim], cap, cuts)
    comps_all: list[I64] = []
    slots_all: list[tuple[Any, I64]] = []
    with_digest = False
    for t, pos, gk in held:
        with_digest = t.with_digest
        if only is not None:
            hit = member_of_sorted(only, gk)
            pos, gk = pos[hit], gk[hit]
            if pos.size == 0:
                continue
        comps_all.append(gk)
        slots_all.append((t, t.slots[pos]))
    if not comps_all:
        return None
    allc = np.concatenate(comps_all)
    uq, inv = np.unique(allc, return_inverse=True)
    n = uq.size
    order = _index_order(uq, glob[dim].labels)
    if order is not None:
        uq = uq[order]
        at = np.empty(n, dtype=np.int64)
        at[order] = np.arange(n, dtype=np.int64)
        inv = at[inv]
    count = np.zeros(n, dtype=np.int64)
    total = np.zeros(n)
    lo = np.full(n, math.inf)
    hi = np.full(n, -math.inf)
    start = 0
    for t, slots in slots_all:  # partition by partition: inv[start:stop] are this one's rows
        stop = start + slots.size
        r = inv[start:stop]  # distinct within one partition, unless renamed
        if renamed and r.size > 1 and sorted_unique(r).size < r.size:
            np.add.at(count, r, t.count[slots])
            np.add.at(total, r, t.total[slots])
            np.minimum.at(lo, r, t.lo[slots])
            np.maximum.at(hi, r, t.hi[slots])
        else:
            count[r] += t.count[slots]
            total[r] += t.total[slots]
            lo[r] = np.minimum(lo[r], t.lo[slots])
            hi[r] = np.maximum(hi[r], t.hi[slots])
        start = stop
    labels_all = glob[dim].labels
    block = RowBlock(g, metric, dim, uq >> LABEL_BITS, [labels_all[x] for x in (uq & LABEL_MASK).tolist()],
                     count, total, lo, hi, None, None)
    if with_digest:
        samples = [x for t, slots in slots_all for x in _samples_of(t, slots)]
        block.quantiles, block.digests = _merge_samples(samples, inv, n, count)
    return block


def _index_order(comps: I64, labels: list[str]) -> I64 | None:
    """Positions of the composite keys `comps` (sorted: hour-major) by value, then hour, or
    None when they are in that order already (one value).

    Why: a block's rows are COPYed in its order, and keeping the dashboard index (metric,
    granularity, dimension, value, time) was 36-40% of a backlog COPY's time in PostgreSQL, most
    of it for entries landing all over the index. In its order they land side by side: the
    196,000 rows of a 1,000,000-event flush took 8-20% less time to COPY than in the former
    order (hour, then value id), and 7-18% less to upsert (medians of three runs of
    `bench/copy_order.py` on a noisy machine). Python orders strings by code point, as the
    "C" and "C.UTF-8" collations do; under another collation a value's rows still come
    together.
    """
    ids = comps & LABEL_MASK
    distinct = sorted_unique(ids)
    if distinct.size <= 1:
        return None
    names = list(map(labels.__getitem__, distinct.tolist()))
    rank = np.empty(distinct.size, dtype=np.int64)
    rank[sorted(range(len(names)), key=names.__getitem__)] = np.arange(distinct.size, dtype=np.int64)
    return np.lexsort((comps >> LABEL_BITS, rank[np.searchsorted(distinct, ids)]))


def _cap_union(held: list[tuple[Any, I64, I64]], only: I64 | None, tid: TableId, interner: Interner, cap: int,
               cuts: dict[Scope, Cut]) -> tuple[list[tuple[Any, I64, I64]], I64 | None, bool]:
    """Apply the cap over the union of the partitions' keys (`global_cap`): keys past the cut
    are renamed to their bucket's __other__ (so their states merge into it). Of the buckets
    with keys to write, those holding at least `cap` values get their cut recorded, and
    those over the cap get __other__ written."""
    g, metric, dim = tid
    other = interner.one(OTHER)
    hashes = interner.hashes()
    union = sorted_unique(np.concatenate([gk for _, _, gk in held]))
    decision = cut_union(union, interner.labels, hashes, other, cap)
    if not decision.cuts:
        return held, only, False
    touched = np.fromiter(decision.cuts, dtype=np.int64, count=len(decision.cuts))
    if only is not None:
        touched = np.intersect1d(touched, only >> LABEL_BITS)
    for hour in touched.tolist():
        cuts[(g, hour * HOUR, metric, dim)] = decision.cuts[hour]
    if decision.out.size == 0:
        return held, only, False
    if only is not None:
        over = np.intersect1d(touched, decision.out >> LABEL_BITS)
        only = sorted_unique(np.concatenate((only[~member_of_sorted(decision.out, only)], over * LABEL_SPACE + other)))
    renamed = []
    for t, pos, gk in held:
        hit = member_of_sorted(decision.out, gk)
        if hit.any():
            # the renamed parts go last, ordered by bucket then hash, not by this partition's
            # value ids (which a restart renumbers): the same partials merge into the same
            # __other__ digest (in this path; the per-key path merges in another order,
            # within the digest's tolerance)
            moved = np.flatnonzero(hit)
            to = (gk[moved] >> LABEL_BITS) * LABEL_SPACE + other
            order = np.lexsort((hashes[gk[moved] & LABEL_MASK], to))
            stay = np.flatnonzero(~hit)
            pos = np.concatenate((pos[stay], pos[moved[order]]))
            gk = np.concatenate((gk[stay], to[order]))
        renamed.append((t, pos, gk))
    return renamed, only, True


def _samples_of(t: Any, slots: I64) -> list[Any]:
    digests = t.digests
    return [digests[s] for s in slots.tolist()]


def _merge_samples(samples: list[Any], inv: I64, n: int, count: I64) -> tuple[F64, list[bytes | None]]:
    """Per row: percentiles and stored digest bytes of the merge of its partitions' samples.

    Rows whose parts are all small value arrays summing to at most SMALL_SAMPLE values
    (most rows) are done together: values sorted per row, PERCENTILE_CONT by index
    arithmetic, bytes sliced from one buffer. The others combine as `sample.combine` does.
    """
    m = len(samples)
    kind = np.fromiter(map(SAMPLE_KIND.__getitem__, map(type, samples)), dtype=np.int8, count=m)
    size = np.zeros(m, dtype=np.int64)
    arr = np.flatnonzero(kind == VALUES_SAMPLE)
    size[arr] = np.fromiter(map(len, map(samples.__getitem__, arr.tolist())), dtype=np.int64, count=arr.size)
    has_digest = np.bincount(inv, weights=kind == DIGEST_SAMPLE, minlength=n) > 0
    has_values = np.bincount(inv, weights=kind == VALUES_SAMPLE, minlength=n) > 0
    nvals = np.bincount(inv, weights=size, minlength=n).astype(np.int64)
    small = ~has_digest & has_values & (nvals <= SMALL_SAMPLE)
    quantiles = np.full((n, 3), math.nan)
    digests = np.full(n, None, dtype=object)  # filled by fancy indexing: no Python code per row
    # ---- small rows, together
    parts = arr[small[inv[arr]]]
    if parts.size:
        rows_of_parts = inv[parts]
        values = np.concatenate(list(map(samples.__getitem__, parts.tolist()))).astype(np.float64, copy=False)
        seg = np.repeat(rows_of_parts, size[parts])
        order = _by_segment_then_value(seg, values)
        values, seg = values[order], seg[order]
        rows = np.flatnonzero(small)
        per = nvals[rows]
        first = np.zeros(rows.size, dtype=np.int64)
        np.cumsum(per[:-1], out=first[1:])
        ok = (per > 0) & (count[rows] > 0)
        quantiles[rows[ok]] = segment_quantiles(values, first[ok], per[ok], QUANTILES)
        raw = values.astype("<f8", copy=False).tobytes()  # each row's slice: values_to_digest_bytes
        begin = first * 8
        digests[rows] = list(map(VALUES_DIGEST_PREFIX.__add__,
                                 map(raw.__getitem__, map(slice, begin.tolist(), (begin + per * 8).tolist()))))
    # ---- the others, one by one
    big = np.flatnonzero(has_values & ~small | has_digest)
    if big.size:
        members = np.flatnonzero(np.isin(inv, big) & (kind != NO_SAMPLE))
        groups: dict[int, list[Any]] = {}
        for j, r in zip(members.tolist(), inv[members].tolist(), strict=True):
            groups.setdefault(r, []).append(samples[j])
        for r, group in groups.items():
            sample = to_digest(combine(group, own=False))  # a digest: these rows are not small
            if count[r] and not sample.is_empty():
                quantiles[r] = [float(sample.quantile(q)) for q in QUANTILES]
            digests[r] = digest_to_bytes(sample)
    return quantiles, digests.tolist()


def _by_segment_then_value(seg: I64, values: F64) -> I64:
    """An order of the values sorting them by segment, then value: what `np.lexsort((values,
    seg))` gives, but for which of equal values comes first (the sorted values are the same).
    Ranking the values, then sorting one int64 key per value (segment * size + rank) is
    3-4x faster than lexsort's two stable sorts (700,000 values in 100,000 segments: 0.08 s
    against 0.26-0.29 s), and this sort was the merge's largest single step."""
    n = values.size
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(values)] = np.arange(n, dtype=np.int64)
    return np.argsort(seg.astype(np.int64) * n + rank)


def blocks_from_states(items: Iterable[tuple[Key, AggState]]) -> list[RowBlock]:
    """Row blocks of merged AggStates (the per-key merge path: other workers' partials, replay)."""
    groups: dict[TableId, list[tuple[Key, AggState]]] = {}
    for key, state in items:
        groups.setdefault((key[0], key[2], key[3]), []).append((key, state))
    blocks = []
    for (g, metric, dim), members in groups.items():
        states = [s for _, s in members]
        quantiles = np.array([[math.nan if (x := s.quantile(q)) is None else x for q in QUANTILES] for s in states],
                             dtype=np.float64).reshape(len(states), 3)
        blocks.append(RowBlock(
            g, metric, dim, np.array([k[1] // HOUR for k, _ in members], dtype=np.int64), [k[4] for k, _ in members],
            np.array([s.count for s in states], dtype=np.int64), np.array([s.sum for s in states], dtype=np.float64),
            np.array([s.min for s in states], dtype=np.float64), np.array([s.max for s in states], dtype=np.float64),
            quantiles, [None if s.digest is None else digest_to_bytes(s.digest) for s in states]))
    return blocks
