"""Batch fold: decoded events of one source partition -> keyed AggStates.

Key = (granularity, bucket_start, metric, dimension_type, dimension_value).

Why it looks like this: per-event Python work is the bottleneck of the worker, so a batch
is turned into numpy columns once, grouped with dense integer group ids and `bincount`,
and each digest gets one `batch_update` per key and batch at the *hour* level only; day
and week digests are merges of the hour deltas (one digest update per value instead of
three). Python loops run once per key touched by the batch, not per value.

Exactly-once effect: every state records the highest source offset folded into it
(`applied_offset`); a row whose offset is not above its key's applied offset is skipped.
Offsets grow within a partition and states are persisted together with the partition's
next offset, so in normal operation nothing is filtered and the check costs O(1)
(`PartitionState.max_applied`); after a re-delivery it filters per key.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain, compress
from operator import attrgetter
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_agg.core.buckets import GRANULARITIES, HOUR, bucket_starts
from stream_agg.core.partition_state import BucketId, CapScope, Key, PartitionState
from stream_agg.core.registry import ALL, DIMENSIONS, OTHER, Level, Metric, Registry
from stream_agg.core.sample import Sample, absorb, combine, sample_of
from stream_agg.core.state_table import StateTable, composite

__all__ = ["BucketId", "Columns", "FoldResult", "Key", "LevelColumns", "PartitionState", "event_times", "fold",
           "fold_events", "to_columns"]

_STARTED_AT = attrgetter("started_at")
_SPANS = attrgetter("spans")
_KIND = attrgetter("kind")

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- columns


@dataclass
class LevelColumns:
    """One row per trace (level trace) or per llm span (level llm)."""

    ts: F64
    offsets: I64
    parent: I64  # index of the row's event in the batch
    values: dict[str, F64]  # metric name -> value per row, NaN = null (skip)
    codes: dict[str, I64]  # dimension -> code per row, -1 = null (skip)
    labels: dict[str, list[str]]  # dimension -> code -> value

    _starts: dict[str, I64] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.ts.size)

    def starts(self, granularity: str) -> I64:
        """Bucket start of every row (computed once per batch and granularity)."""
        out = self._starts.get(granularity)
        if out is None:
            out = self._starts[granularity] = bucket_starts(self.ts, granularity)
        return out


@dataclass
class Columns:
    """A batch as columns. `ts` / `offsets` are per event, in partition order."""

    ts: F64
    offsets: I64
    levels: dict[Level, LevelColumns]

    @property
    def size(self) -> int:
        return int(self.ts.size)

    def buckets(self) -> set[BucketId]:
        """Every (granularity, bucket_start) the batch touches."""
        out: set[BucketId] = set()
        for g in GRANULARITIES:
            out.update((g, int(b)) for b in np.unique(bucket_starts(self.ts, g)))
        return out

    def select(self, keep: npt.NDArray[np.bool_]) -> Columns:
        """The same batch restricted to events where `keep` is true (e.g. not too late)."""
        if keep.all():
            return self
        levels: dict[Level, LevelColumns] = {}
        new_index = np.cumsum(keep) - 1
        for name, lc in self.levels.items():
            rows = np.flatnonzero(keep[lc.parent])
            levels[name] = LevelColumns(
                lc.ts[rows], lc.offsets[rows], new_index[lc.parent[rows]],
                {k: v[rows] for k, v in lc.values.items()},
                {k: v[rows] for k, v in lc.codes.items()},
                lc.labels,
            )
        return Columns(self.ts[keep], self.offsets[keep], levels)


def _encode(values: list[Any]) -> tuple[I64, list[str]]:
    """Dictionary-encode strings (None -> -1) at C speed."""
    labels = [v for v in dict.fromkeys(values) if v is not None]
    lut: dict[Any, int] = {v: i for i, v in enumerate(labels)}
    lut[None] = -1
    return np.fromiter(map(lut.__getitem__, values), dtype=np.int64, count=len(values)), labels


def _floats(objs: Sequence[Any], attr: str) -> F64:
    return np.array(list(map(attrgetter(attr), objs)), dtype=np.float64)


def event_times(events: Sequence[Any]) -> F64:
    """Epoch seconds of each event's `started_at` (an aware datetime)."""
    return np.fromiter(map(datetime.timestamp, map(_STARTED_AT, events)), dtype=np.float64, count=len(events))


def to_columns(
    events: Sequence[Any], offsets: Sequence[int] | I64, registry: Registry,
    ts: F64 | None = None,
) -> Columns:
    """Turn decoded events (with their source offsets) into per-level columns."""
    n = len(events)
    offs = np.asarray(offsets, dtype=np.int64)
    if offs.shape != (n,):
        raise ValueError(f"{n} events but {offs.size} offsets")
    ts = event_times(events) if ts is None else ts
    levels: dict[Level, LevelColumns] = {}
    trace_codes: dict[str, I64] = {}
    trace_labels: dict[str, list[str]] = {}
    for dim in registry.dimensions_of("trace") + registry.dimensions_of("llm"):
        d = DIMENSIONS[dim]
        if d.on == "trace" and dim not in trace_codes:
            trace_codes[dim], trace_labels[dim] = _encode(list(map(attrgetter(d.field), events)))
    if registry.by_level("trace"):
        values: dict[str, F64] = {}
        for m in registry.by_level("trace"):
            if m.is_error:
                values[m.name] = np.fromiter(
                    map("error".__eq__, map(attrgetter(m.field), events)), dtype=bool, count=n
                ).astype(np.float64)
            else:
                values[m.name] = _floats(events, m.field)
        dims = registry.dimensions_of("trace")
        levels["trace"] = LevelColumns(
            ts, offs, np.arange(n, dtype=np.int64), values,
            {d: _dim_codes(d, n, trace_codes) for d in dims},
            {d: trace_labels.get(d, [ALL]) for d in dims},
        )
    if registry.by_level("llm"):
        # every span, then the llm ones: C-level maps instead of a Python loop per span
        span_lists = list(map(_SPANS, events))
        every_span = list(chain.from_iterable(span_lists))
        is_llm = list(map("llm".__eq__, map(_KIND, every_span)))
        counts = np.fromiter(map(len, span_lists), dtype=np.int64, count=n)
        parent = np.repeat(np.arange(n, dtype=np.int64), counts)[np.asarray(is_llm, dtype=bool)]
        spans = list(compress(every_span, is_llm))
        values = {m.name: _floats(spans, m.field) for m in registry.by_level("llm")}
        codes: dict[str, I64] = {}
        labels: dict[str, list[str]] = {}
        for dim in registry.dimensions_of("llm"):
            d = DIMENSIONS[dim]
            if d.on == "span":
                codes[dim], labels[dim] = _encode(list(map(attrgetter(d.field), spans)))
            elif d.on == "trace":
                codes[dim], labels[dim] = trace_codes[dim][parent], trace_labels[dim]
            else:
                codes[dim], labels[dim] = np.zeros(len(spans), dtype=np.int64), [ALL]
        levels["llm"] = LevelColumns(ts[parent], offs[parent], parent, values, codes, labels)
    return Columns(ts, offs, levels)


def _dim_codes(dim: str, n: int, trace_codes: dict[str, I64]) -> I64:
    if DIMENSIONS[dim].on == "const":
        return np.zeros(n, dtype=np.int64)
    return trace_codes[dim]


# --------------------------------------------------------------------------- fold


@dataclass
class FoldResult:
    """What one fold did. `touched` holds (table, composite keys) so keys are made only on demand."""

    rows_folded: int = 0  # (row, metric, dimension, granularity) contributions
    rows_skipped: int = 0  # skipped as already applied (re-delivery)
    touched: list[tuple[StateTable, I64]] = field(default_factory=list)
    removed: set[Key] = field(default_factory=set)  # pushed into __other__ by the cap
    pstate: PartitionState | None = None

    @property
    def changed(self) -> set[Key]:
        out: set[Key] = set()
        if self.pstate is not None:
            for table, comps in self.touched:
                live = comps[table.lookup(comps) >= 0]
                out.update(self.pstate._keys(table, live))
        return out - self.removed


def fold(pstate: PartitionState, cols: Columns) -> FoldResult:
    """Fold a batch (columns of one partition) into `pstate`; returns what it did.

    The caller must have loaded every state of the buckets the batch touches
    (`cols.buckets()`), because the cap and the offset check read them.
    """
    result = FoldResult(pstate=pstate)
    if cols.size == 0:
        return result
    may_dedup = int(cols.offsets.min()) <= pstate.max_applied
    registry = pstate.registry
    for level, lc in cols.levels.items():
        if lc.size == 0:
            continue
        metrics = registry.by_level(level)
        for dim in registry.dimensions_of(level):
            ms = [m for m in metrics if dim in m.dimensions]
            if ms:
                _fold_dimension(pstate, lc, dim, ms, may_dedup, result)
    pstate.max_applied = max(pstate.max_applied, int(cols.offsets.max()))
    pstate.resident.update(cols.buckets())
    return result


def _small_ints(a: I64, top: int) -> npt.NDArray[Any]:
    """The narrowest integer type holding 0..top, so a stable sort can be a radix sort."""
    if top < 1 << 15:
        return a.astype(np.int16)
    if top < 1 << 31:
        return a.astype(np.int32)
    return a


@dataclass
class _RawGroups:
    """Rows of one dimension sorted by (hour, value code): group g is rows[bounds[g]:bounds[g+1]]."""

    rows: I64  # row indices, sorted by group
    bounds: I64  # first sorted position of each group
    hours: I64  # hour bucket start of each group
    codes: I64  # batch-local value code of each group


def _raw_groups(lc: LevelColumns, codes: I64, nraw: int) -> _RawGroups | None:
    hour = lc.starts("hour")
    sel = np.flatnonzero(codes >= 0)
    if sel.size == 0:
        return None
    if sel.size == codes.size:
        sel = np.arange(codes.size)
    h = hour[sel]
    hbase = int(h.min())
    gid = ((h - hbase) // HOUR) * nraw + codes[sel]
    order = np.argsort(_small_ints(gid, int(gid.max())), kind="stable")
    sg = gid[order]
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(sg)) + 1))
    first = sg[bounds]
    return _RawGroups(sel[order], bounds, hbase + (first // nraw) * HOUR, first % nraw)


@dataclass
class _Agg:
    """count / sum / min / max / top offset per group."""

    count: I64
    total: F64
    lo: F64
    hi: F64
    top: I64

    def take(self, idx: I64 | npt.NDArray[np.bool_]) -> _Agg:
        return _Agg(self.count[idx], self.total[idx], self.lo[idx], self.hi[idx], self.top[idx])


def _group_agg(vals: F64, offs: I64, bounds: I64) -> _Agg:
    """Aggregates of contiguous groups (rows already sorted by group); NaN = no value."""
    nan = np.isnan(vals)
    if nan.any():
        count = np.add.reduceat((~nan).astype(np.int64), bounds)
        return _Agg(count, np.add.reduceat(np.where(nan, 0.0, vals), bounds),
                    np.minimum.reduceat(np.where(nan, math.inf, vals), bounds),
                    np.maximum.reduceat(np.where(nan, -math.inf, vals), bounds),
                    np.maximum.reduceat(np.where(nan, -1, offs), bounds))
    count = np.diff(np.append(bounds, vals.size))
    return _Agg(count, np.add.reduceat(vals, bounds), np.minimum.reduceat(vals, bounds),
                np.maximum.reduceat(vals, bounds), np.maximum.reduceat(offs, bounds))


def _combine(inv: I64, n: int, agg: _Agg) -> _Agg:
    """Combine groups mapped onto `n` targets by `inv`."""
    count = np.bincount(inv, weights=agg.count, minlength=n).astype(np.int64)
    total = np.bincount(inv, weights=agg.total, minlength=n)
    lo = np.full(n, math.inf)
    np.minimum.at(lo, inv, agg.lo)
    hi = np.full(n, -math.inf)
    np.maximum.at(hi, inv, agg.hi)
    top = np.full(n, -1, dtype=np.int64)
    np.maximum.at(top, inv, agg.top)
    return _Agg(count, total, lo, hi, top)


def _group_samples(vals: F64, bounds: I64) -> list[Sample]:
    """One percentile sample per contiguous group (exact values, or a digest fed once)."""
    ends = np.append(bounds[1:], vals.size).tolist()
    if np.isnan(vals).any():
        return [sample_of(c[~np.isnan(c)]) for c in
                (vals[a:b] for a, b in zip(bounds.tolist(), ends, strict=True))]
    return [sample_of(vals[a:b]) for a, b in zip(bounds.tolist(), ends, strict=True)]


def _fold_dimension(
    pstate: PartitionState, lc: LevelColumns, dim: str, metrics: list[Metric], may_dedup: bool,
    result: FoldResult,
) -> None:
    """Fold every metric of a level sliced by one dimension, at every granularity.

    Rows are sorted once by (hour, value) for all the metrics; day and week aggregates
    and digests are roll-ups of those hour groups, so only one pass touches every row.
    """
    codes = lc.codes[dim]
    labels = lc.labels[dim] or [ALL]
    lids = pstate.interner(dim).intern(labels)
    if may_dedup:
        for metric in metrics:
            _fold_rows_checked(pstate, lc, codes, lids, metric, dim, result)
        return
    raw = _raw_groups(lc, codes, len(labels))
    if raw is None:
        return
    raw_lids = lids[raw.codes]
    offs = lc.offsets[raw.rows]
    parents = {g: bucket_starts(raw.hours.astype(np.float64), g) for g in GRANULARITIES if g != "hour"}
    parents["hour"] = raw.hours
    for metric in metrics:
        vals = lc.values[metric.name][raw.rows]
        agg = _group_agg(vals, offs, raw.bounds)
        present = agg.count > 0
        every = bool(present.all())
        if not every:
            if not present.any():
                continue
            agg = agg.take(present)
        digests = _group_samples(vals, raw.bounds) if metric.digest else None
        if digests is not None and not every:
            digests = [d for d, k in zip(digests, present.tolist(), strict=True) if k]
        glids = raw_lids if every else raw_lids[present]
        # Coarsest first: week and day only read the (hour, value) samples; the hour states
        # come last because they take those samples as their own and may change them.
        for g in reversed(GRANULARITIES):
            starts = parents[g] if every else parents[g][present]
            _fold_groups(pstate, g, metric, dim, starts, glids, agg, digests, result)


def _fold_groups(
    pstate: PartitionState, g: str, metric: Metric, dim: str, starts: I64, glids: I64, agg: _Agg,
    digests: list[Any] | None, result: FoldResult,
) -> None:
    """Cap, combine and apply (bucket, value) groups at granularity `g`."""
    cap = pstate.registry.cap(dim)
    if cap is not None:
        glids = _capped(pstate, g, metric, dim, cap, starts, glids, result)
    q = composite(starts, glids)
    if g == "hour" and cap is None:  # (hour, value) groups are distinct already
        targets, tagg, children = q, agg, None
    else:
        targets, inv = np.unique(q, return_inverse=True)
        if targets.size == q.size:
            order = np.argsort(q)
            targets, tagg = q[order], agg.take(order)
            children = None if digests is None else [[digests[i]] for i in order.tolist()]
        else:
            tagg = _combine(inv, targets.size, agg)
            children = None
            if digests is not None:
                children = [[] for _ in range(targets.size)]
                for d, t in zip(digests, inv.tolist(), strict=True):
                    children[t].append(d)
    if digests is not None and children is None:
        children = [[d] for d in digests]
    _apply(pstate.table(g, metric.name, dim), targets, tagg, children, own=g == "hour", result=result)


def _apply(table: StateTable, targets: I64, agg: _Agg, children: list[list[Any]] | None, own: bool,
           result: FoldResult) -> None:
    """Fold target aggregates (and digests) into the table.

    Only hour-level states may take a group's digest as their own; coarser ones get a
    copy or a merge, so no two states ever share a digest object (arrays are never
    changed in place, so sharing those is fine).
    """
    slots, _ = table.ensure(targets)
    table.add(slots, agg.count, agg.total, agg.lo, agg.hi, agg.top)
    result.touched.append((table, targets))
    result.rows_folded += int(agg.count.sum())
    if children is None:
        return
    held = table.digests
    for slot, parts in zip(slots.tolist(), children, strict=True):
        held[slot] = absorb(held[slot], combine(parts, own), own=own or len(parts) > 1)


# --------------------------------------------------------------------------- cap


def _capped(
    pstate: PartitionState, g: str, metric: Metric, dim: str, cap: int, starts: I64, glids: I64,
    result: FoldResult,
) -> I64:
    """Label ids after the cardinality cap: values not kept get the __other__ id.

    Per (bucket, metric, dimension) the kept set is the `cap` values of smallest
    (hash, value) among all values seen, whatever the arrival order; a value that was kept
    and is pushed out by a smaller hash has its state moved into __other__.
    """
    interner = pstate.interner(dim)
    other = interner.one(OTHER)
    hashes: I64 | None = None
    out = glids.copy()
    bucket_list = np.unique(starts)
    for b in bucket_list.tolist():
        rows = None if bucket_list.size == 1 else np.flatnonzero(starts == b)
        ids = glids if rows is None else glids[rows]
        scope: CapScope = (g, b, metric.name, dim)
        old = pstate.kept.get(scope)
        present = np.unique(ids)
        present = present[present != other]
        newcomers = present if old is None else present[~np.isin(present, old)]
        if newcomers.size:
            cand = newcomers if old is None else np.concatenate((old, newcomers))
            if cand.size > cap:
                if hashes is None:
                    hashes = interner.hashes()
                kept = _smallest(cand, hashes[cand], cap, interner.labels)
                if old is not None:
                    gone = old[~np.isin(old, kept)]
                    if gone.size:
                        _evict(pstate, pstate.table(g, metric.name, dim), b, gone, other, result)
            else:
                kept = cand
            pstate.kept[scope] = kept
            old = kept
        mapped = np.where(np.isin(ids, old), ids, other) if old is not None else np.full(ids.size, other)
        if rows is None:
            out = mapped
        else:
            out[rows] = mapped
    return out


def _smallest(cand: I64, hashes: I64, k: int, labels: list[str]) -> I64:
    """The k ids of smallest (hash, value)."""
    order = np.argsort(hashes, kind="stable")
    sh = hashes[order]
    if np.unique(sh).size != sh.size:  # a 60-bit tie: order those by value, as the SQL does
        order = np.asarray(sorted(order.tolist(), key=lambda i: (int(hashes[i]), labels[int(cand[i])])))
    return cand[order[:k]]


def _evict(pstate: PartitionState, table: StateTable, bucket: int, gone: I64, other: int,
           result: FoldResult) -> None:
    """Move the states of values pushed out by the cap into the bucket's __other__ state."""
    q = composite(bucket, gone)
    slots = table.lookup(q)
    has = slots >= 0
    if not has.any():
        return
    q, slots = q[has], slots[has]
    oslots, _ = table.ensure(np.array([composite(bucket, other)], dtype=np.int64))
    o = int(oslots[0])
    table.add(oslots, np.array([table.count[slots].sum()]), np.array([table.total[slots].sum()]),
              np.array([table.lo[slots].min()]), np.array([table.hi[slots].max()]),
              np.array([table.applied[slots].max()]))
    if table.with_digest:
        parts = [table.digests[s] for s in slots.tolist() if table.digests[s] is not None]
        if parts:  # the evicted states are dropped: their samples may be taken as they are
            table.digests[o] = absorb(table.digests[o], combine(parts, own=True), own=True)
    keys = pstate._keys(table, q)
    table.delete(q)
    pstate.removed.update(keys)
    result.removed.update(keys)
    result.touched.append((table, np.array([composite(bucket, other)], dtype=np.int64)))


# --------------------------------------------------------------------------- re-delivery


def _fold_rows_checked(
    pstate: PartitionState, lc: LevelColumns, codes: I64, lids: I64, metric: Metric, dim: str,
    result: FoldResult,
) -> None:
    """The re-delivery path: rows already applied to their key are dropped, per granularity."""
    vals = lc.values[metric.name]
    rows = np.flatnonzero((codes >= 0) & ~np.isnan(vals))
    if rows.size == 0:
        return
    vals, offs, row_lids = vals[rows], lc.offsets[rows], lids[codes[rows]]
    cap = pstate.registry.cap(dim)
    for g in GRANULARITIES:
        starts = lc.starts(g)[rows]
        glids = _capped(pstate, g, metric, dim, cap, starts, row_lids, result) if cap is not None else row_lids
        q = composite(starts, glids)
        table = pstate.table(g, metric.name, dim)
        slots = table.lookup(q)
        applied = np.where(slots >= 0, table.applied[np.maximum(slots, 0)], -1)
        keep = offs > applied
        if not keep.all():
            result.rows_skipped += int((~keep).sum())
            if not keep.any():
                continue
        kq, kv, ko = q[keep], vals[keep], offs[keep]
        order = np.argsort(kq, kind="stable")
        sq = kq[order]
        bounds = np.concatenate(([0], np.flatnonzero(np.diff(sq)) + 1))
        agg = _group_agg(kv[order], ko[order], bounds)
        digests = _group_samples(kv[order], bounds) if metric.digest else None
        _apply(table, sq[bounds], agg, None if digests is None else [[d] for d in digests], own=True,
               result=result)


def fold_events(
    pstate: PartitionState, events: Sequence[Any], offsets: Iterable[int] | I64,
) -> FoldResult:
    """Convenience: columns + fold in one call (tests, replay, benchmarks)."""
    offs = np.fromiter(offsets, dtype=np.int64) if not isinstance(offsets, np.ndarray) else offsets
    return fold(pstate, to_columns(events, offs, pstate.registry))
