"""Batch fold: decoded events of one source partition -> keyed AggStates.

Key = (granularity, bucket_start, metric, dimension_type, dimension_value).

Why it looks like this: per-event Python work is the bottleneck of the worker, so a batch
is turned into numpy columns once (`to_columns`: C-level maps over cache-sized chunks of
events) and grouped with dense integer group ids; Python loops run once per key touched
by the batch, not per value. Per dimension the rows are sorted once by (hour, value);
day and week are roll-ups of those hour groups. Metrics with a value in every group
share the cap decision and the grouping. A key's new percentile values are fed to its
sample directly (one concatenate, or a deferred digest update: `StateTable.defer`); only
a group with more than BIG_GROUP values gets its own digest, built once and merged into
its week, day and hour states.

Exactly-once effect: every state records the highest source offset folded into it
(`applied_offset`); a row whose offset is not above its key's applied offset is skipped.
Offsets grow within a partition and states are persisted together with the partition's
next offset, so in normal operation nothing is filtered and the check costs O(1)
(`PartitionState.max_applied`); after a re-delivery it filters per key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain, compress, count, repeat
from operator import attrgetter, eq, itemgetter
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_agg.core.buckets import GRANULARITIES, HOUR, bucket_starts
from stream_agg.core.partition_state import BucketId, Key, PartitionState
from stream_agg.core.registry import ALL, DIMENSIONS, OTHER, Level, Metric, Registry
from stream_agg.core.sample import SMALL_SAMPLE, Sample, absorb, combine, digest_of, sample_of
from stream_agg.core.state_table import (
    PENDING_VALUES,
    Interner,
    StateTable,
    composite,
    member_of_sorted,
    sorted_unique,
)

__all__ = ["BucketId", "Columns", "FoldResult", "Key", "LevelColumns", "PartitionState", "event_times", "fold",
           "fold_events", "to_columns"]

_STARTED_AT = attrgetter("started_at")
_KIND = attrgetter("kind")
_NONE_NAN: dict[Any, float] = {None: math.nan}
# A group with more values than this gets a digest of its own, merged into its day / week /
# hour states; smaller groups' values are fed to those states directly (cheaper below ~1,000).
BIG_GROUP = 1024
_CHUNK = 1024  # events per extraction chunk: their objects stay in the CPU caches between passes

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

    _buckets: set[BucketId] | None = None

    @property
    def size(self) -> int:
        return int(self.ts.size)

    def buckets(self) -> set[BucketId]:
        """Every (granularity, bucket_start) the batch touches (computed once: the worker
        asks before the fold, and the fold again)."""
        if self._buckets is None:
            lc = self.levels.get("trace")
            hours = lc.starts("hour") if lc is not None and lc.ts is self.ts else bucket_starts(self.ts, "hour")
            uh = _distinct(hours, HOUR)
            out: set[BucketId] = {("hour", h) for h in uh.tolist()}
            for g in GRANULARITIES:
                if g != "hour":
                    out.update((g, int(b)) for b in sorted_unique(bucket_starts(uh.astype(np.float64), g)).tolist())
            self._buckets = out
        return set(self._buckets)

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


def _distinct(starts: I64, step: int) -> I64:
    """Sorted distinct values of bucket starts (multiples of `step`), without a sort when
    they span a modest range (a batch covers a few hours, plus some late events)."""
    if starts.size == 0:
        return starts
    lo, hi = int(starts.min()), int(starts.max())
    span = (hi - lo) // step + 1
    if span > 4 * starts.size + 1024:
        return sorted_unique(starts)
    seen = np.zeros(span, dtype=bool)
    seen[(starts - lo) // step] = True
    return lo + np.flatnonzero(seen) * step


class _Codes:
    """Dictionary-encodes one string column chunk by chunk (None -> -1).

    One C-level pass per chunk: `dict.setdefault` records each value's first position, so a
    string is hashed once, while it is still in cache from reading the attribute.
    """

    def __init__(self) -> None:
        self.first: dict[Any, int] = {}
        self.parts: list[I64] = []
        self.size = 0

    def add(self, values: Iterable[Any], n: int) -> None:
        self.parts.append(np.fromiter(map(self.first.setdefault, values, count(self.size)), dtype=np.int64,
                                      count=n))
        self.size += n

    def finish(self) -> tuple[I64, list[str]]:
        """(code per row, label per code), codes numbered in first-seen order."""
        first = self.first
        labels: list[Any] = list(first)
        pos = np.fromiter(first.values(), dtype=np.int64, count=len(first))
        remap = np.empty(max(self.size, 1), dtype=np.int64)
        remap[pos] = np.arange(pos.size, dtype=np.int64)
        if None in first:
            k = labels.index(None)
            remap[pos[k]] = -1
            remap[pos[k + 1:]] -= 1
            del labels[k]
        raw = np.concatenate(self.parts) if self.parts else np.empty(0, dtype=np.int64)
        return remap[raw], labels


def _floats(objs: Sequence[Any], get: Callable[[Any], Any], n: int) -> F64:
    """One float per object; None -> NaN (a null skips the value)."""
    try:
        return np.fromiter(map(get, objs), dtype=np.float64, count=n)
    except TypeError:  # a None: map it to NaN, still in C
        return np.fromiter(map(_NONE_NAN.get, map(get, objs), map(get, objs)), dtype=np.float64, count=n)


def _flags(objs: Sequence[Any], get: Callable[[Any], Any], n: int) -> npt.NDArray[np.bool_]:
    return np.fromiter(map(eq, map(get, objs), repeat("error")), dtype=bool, count=n)


def event_times(events: Sequence[Any]) -> F64:
    """Epoch seconds of each event's `started_at` (an aware datetime)."""
    return np.fromiter(map(datetime.timestamp, map(_STARTED_AT, events)), dtype=np.float64, count=len(events))


def _concat(parts: list[npt.NDArray[Any]], dtype: Any) -> npt.NDArray[Any]:
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def to_columns(
    events: Sequence[Any], offsets: Sequence[int] | I64, registry: Registry,
    ts: F64 | None = None,
) -> Columns:
    """Turn decoded events (with their source offsets) into per-level columns.

    Reading Python objects is bound by memory, not by work: a batch's events are far bigger
    than the CPU caches, and a pass over them that follows one pointer per event waits for
    one cache miss after another. So the events are read in chunks of `_CHUNK`, first
    into a tuple of every field needed per event (one C call per event whose loads the CPU
    can overlap), then column by column from those tuples while they are in cache. Every
    step is a C-level `map`: no Python code runs per event or span.
    """
    n = len(events)
    offs = np.asarray(offsets, dtype=np.int64)
    if offs.shape != (n,):
        raise ValueError(f"{n} events but {offs.size} offsets")
    trace_metrics, llm_metrics = registry.by_level("trace"), registry.by_level("llm")
    trace_dims = [d for d in dict.fromkeys(registry.dimensions_of("trace") + registry.dimensions_of("llm"))
                  if DIMENSIONS[d].on == "trace"]
    span_dims = [d for d in registry.dimensions_of("llm") if DIMENSIONS[d].on == "span"] if llm_metrics else []
    fields = list(dict.fromkeys([*(["started_at"] if ts is None else []),
                                 *(DIMENSIONS[d].field for d in trace_dims), *(m.field for m in trace_metrics),
                                 *(["spans"] if llm_metrics else [])]))
    read_row: Callable[[Any], Any] | None = attrgetter(*fields) if len(fields) > 1 else None
    field_of: dict[str, Callable[[Any], Any]] = {
        f: itemgetter(i) if read_row is not None else attrgetter(f) for i, f in enumerate(fields)}
    trace_codes = {d: _Codes() for d in trace_dims}
    span_codes = {d: _Codes() for d in span_dims}
    trace_parts: dict[str, list[npt.NDArray[Any]]] = {m.name: [] for m in trace_metrics}
    llm_parts: dict[str, list[npt.NDArray[Any]]] = {m.name: [] for m in llm_metrics}
    ts_parts: list[F64] = []
    counts: list[I64] = []
    is_llm: list[npt.NDArray[np.bool_]] = []
    span_get = {d: attrgetter(DIMENSIONS[d].field) for d in span_dims}
    llm_get = [(m, attrgetter(m.field)) for m in llm_metrics]
    for lo in range(0, n, _CHUNK):
        chunk = events[lo:lo + _CHUNK]
        m = len(chunk)
        rows = chunk if read_row is None else list(map(read_row, chunk))
        if ts is None:
            ts_parts.append(np.fromiter(map(datetime.timestamp, map(field_of["started_at"], rows)),
                                        dtype=np.float64, count=m))
        for d, enc in trace_codes.items():
            enc.add(map(field_of[DIMENSIONS[d].field], rows), m)
        for metric in trace_metrics:
            get = field_of[metric.field]
            trace_parts[metric.name].append(_flags(rows, get, m) if metric.is_error else _floats(rows, get, m))
        if not llm_metrics:
            continue
        span_lists = list(map(field_of["spans"], rows))
        counts.append(np.fromiter(map(len, span_lists), dtype=np.int64, count=m))
        every = list(chain.from_iterable(span_lists))
        llm = np.fromiter(map(eq, map(_KIND, every), repeat("llm")), dtype=bool, count=len(every))
        is_llm.append(llm)
        spans = list(compress(every, llm.tolist()))
        k = len(spans)
        for metric, get in llm_get:
            llm_parts[metric.name].append(_flags(spans, get, k) if metric.is_error else _floats(spans, get, k))
        for d, enc in span_codes.items():
            enc.add(map(span_get[d], spans), k)
    if ts is None:
        ts = _concat(ts_parts, np.float64)
    codes: dict[str, I64] = {}
    labels: dict[str, list[str]] = {}
    for d, enc in (*trace_codes.items(), *span_codes.items()):
        codes[d], labels[d] = enc.finish()
    levels: dict[Level, LevelColumns] = {}
    if trace_metrics:
        dims = registry.dimensions_of("trace")
        levels["trace"] = LevelColumns(
            ts, offs, np.arange(n, dtype=np.int64),
            {k: _concat(v, np.float64).astype(np.float64, copy=False) for k, v in trace_parts.items()},
            {d: codes[d] if d in codes else np.zeros(n, dtype=np.int64) for d in dims},
            {d: labels.get(d, [ALL]) for d in dims},
        )
    if llm_metrics:
        parent = np.repeat(np.arange(n, dtype=np.int64), _concat(counts, np.int64))[_concat(is_llm, bool)]
        k = parent.size
        dims = registry.dimensions_of("llm")
        levels["llm"] = LevelColumns(
            ts[parent], offs[parent], parent,
            {name: _concat(v, np.float64).astype(np.float64, copy=False) for name, v in llm_parts.items()},
            {d: (codes[d][parent] if DIMENSIONS[d].on == "trace" else codes[d]) if d in codes
             else np.zeros(k, dtype=np.int64) for d in dims},
            {d: labels.get(d, [ALL]) for d in dims},
        )
    return Columns(ts, offs, levels)


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
    hours: I64  # hour bucket start of each group (non-decreasing)
    codes: I64  # batch-local value code of each group


def _raw_groups(lc: LevelColumns, codes: I64, nraw: int) -> _RawGroups | None:
    hour = lc.starts("hour")
    if bool((codes >= 0).all()):
        sel: I64 | None = None
        h, c = hour, codes
    else:
        sel = np.flatnonzero(codes >= 0)
        if sel.size == 0:
            return None
        h, c = hour[sel], codes[sel]
    hbase = int(h.min())
    gid = ((h - hbase) // HOUR) * nraw + c
    order = np.argsort(_small_ints(gid, int(gid.max())), kind="stable")
    sg = gid[order]
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(sg)) + 1))
    first = sg[bounds]
    return _RawGroups(order if sel is None else sel[order], bounds, hbase + (first // nraw) * HOUR, first % nraw)


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


@dataclass
class _MetricGroups:
    """One metric's (hour, value) groups of a batch, those holding at least one value."""

    metric: Metric
    agg: _Agg
    present: npt.NDArray[np.bool_] | None  # which raw groups these are; None = all of them
    values: F64 | None = None  # digest metrics: the non-null values, group by group
    first: I64 | None = None  # where each group's values start in `values`
    _digests: dict[int, Any] = field(default_factory=dict)

    def digest(self, i: int) -> Sample:
        """A digest of group i's values, built once for every granularity (week and day merge
        it, the hour state may take it)."""
        d = self._digests.get(i)
        if d is None:
            assert self.values is not None and self.first is not None
            a = int(self.first[i])
            d = self._digests[i] = digest_of(self.values[a:a + int(self.agg.count[i])])
        return d


def _metric_groups(metric: Metric, vals: F64, offs: I64, bounds: I64) -> _MetricGroups | None:
    agg = _group_agg(vals, offs, bounds)
    present: npt.NDArray[np.bool_] | None = agg.count > 0
    assert present is not None
    full_count = agg.count
    if present.all():
        present = None
    elif not present.any():
        return None
    else:
        agg = agg.take(present)
    out = _MetricGroups(metric, agg, present)
    if metric.digest:
        nan = np.isnan(vals)
        if nan.any():
            out.values = vals[~nan]
            first = np.cumsum(full_count) - full_count
        else:
            out.values, first = vals, bounds
        out.first = first if present is None else first[present]
    return out


@dataclass
class _Plan:
    """Where a granularity's groups go: distinct target keys and each group's target.

    `inv` None means one group per target, in group order (hour level, uncapped).
    """

    targets: I64
    inv: I64 | None
    _order: I64 | None = None
    _tstart: I64 | None = None

    def order(self) -> I64:
        """Group indices sorted by target (stable: groups of a target stay in batch order)."""
        if self._order is None:
            assert self.inv is not None
            self._order = np.argsort(self.inv, kind="stable")
        return self._order

    def tstart(self) -> I64:
        """Position in `order()` of each target's first group, plus the end."""
        if self._tstart is None:
            assert self.inv is not None
            self._tstart = np.concatenate(([0], np.cumsum(np.bincount(self.inv, minlength=self.targets.size))))
        return self._tstart

    def aggregate(self, agg: _Agg) -> _Agg:
        if self.inv is None:
            return agg
        if self.targets.size == self.inv.size:  # a permutation
            return agg.take(self.order())
        return _combine(self.inv, self.targets.size, agg)


def _plan(starts: I64, glids: I64, one_to_one: bool) -> _Plan:
    q = composite(starts, glids)
    if one_to_one:
        return _Plan(q, None)
    targets, inv = np.unique(q, return_inverse=True)
    return _Plan(targets, inv.reshape(-1))


def _fold_dimension(
    pstate: PartitionState, lc: LevelColumns, dim: str, metrics: list[Metric], may_dedup: bool,
    result: FoldResult,
) -> None:
    """Fold every metric of a level sliced by one dimension, at every granularity.

    Rows are sorted once by (hour, value) for all the metrics; day and week aggregates
    and digests are roll-ups of those hour groups, so only one pass touches every row.
    Metrics with a value in every group share the cap decision and the grouping work.
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
    groups = [mg for m in metrics if (mg := _metric_groups(m, lc.values[m.name][raw.rows], offs, raw.bounds))]
    if not groups:
        return
    parents = {g: bucket_starts(raw.hours.astype(np.float64), g) for g in GRANULARITIES if g != "hour"}
    parents["hour"] = raw.hours
    cap = pstate.registry.cap(dim)
    # Coarsest first: week and day only read the (hour, value) samples; the hour states
    # come last because they take those samples as their own and may change them.
    for g in reversed(GRANULARITIES):
        shared: _CapRun | None = None  # the cap as decided for the first every-group metric
        plans: list[tuple[I64, _Plan]] = []  # (value ids, plan) of every-group metrics
        for mg in groups:
            starts = parents[g] if mg.present is None else parents[g][mg.present]
            glids = raw_lids if mg.present is None else raw_lids[mg.present]
            if cap is not None:
                run = None
                if mg.present is None and shared is not None:
                    run = _replay_cap(pstate, g, mg.metric, dim, shared, result)
                if run is None:
                    run = _capped(pstate, g, mg.metric, dim, cap, starts, glids, result)
                    if mg.present is None and shared is None:
                        shared = run
                glids = run.mapped
            plan = next((p for ids, p in plans if ids is glids), None)
            if plan is None:
                plan = _plan(starts, glids, one_to_one=g == "hour" and cap is None)
                if mg.present is None:
                    plans.append((glids, plan))
            _apply_groups(pstate.table(g, mg.metric.name, dim), plan, mg, own=g == "hour", result=result)


def _apply_groups(table: StateTable, plan: _Plan, mg: _MetricGroups, own: bool, result: FoldResult) -> None:
    """Fold one metric's groups into the table's targets: aggregates vectorised, then samples."""
    agg = plan.aggregate(mg.agg)
    slots, created = table.ensure(plan.targets)
    table.add(slots, agg.count, agg.total, agg.lo, agg.hi, agg.top)
    result.touched.append((table, plan.targets))
    result.rows_folded += int(agg.count.sum())
    if mg.values is not None:
        _absorb_values(table, slots, created, plan, mg, agg.count, own)


def _absorb_values(table: StateTable, slots: I64, created: npt.NDArray[np.bool_], plan: _Plan,
                   mg: _MetricGroups, tcount: I64, own: bool) -> None:
    """Add each target's new values to its sample.

    A target's new values are made contiguous with one gather, so a target without a big
    group (most: a user in an hour) costs one copy, concatenate or deferred digest update,
    instead of a sample object per group merged into another; new small states are made
    by C-level maps. Groups with more than BIG_GROUP values bring a digest built once for
    every granularity (a merge is much cheaper than feeding the values again). Only
    hour-level states (`own`) may take a group's digest as their own; coarser ones get a
    copy or a merge, so no two states ever share a digest object.
    """
    values, first = mg.values, mg.first
    assert values is not None and first is not None
    big = mg.agg.count > BIG_GROUP
    any_big = bool(big.any())
    if plan.inv is None:
        tvals, tfirst, has_big = values, first, big
        order = tstart = None
    else:
        order, tstart = plan.order(), plan.tstart()
        lens = mg.agg.count[order]
        ends = np.cumsum(lens)
        begins = ends - lens
        tvals = values[np.repeat(first[order] - begins, lens) + np.arange(int(ends[-1]))]
        tfirst = begins[tstart[:-1]]
        has_big = np.bincount(plan.inv, weights=big, minlength=tcount.size) > 0 if any_big else big[:0]
    held = table.live_samples()
    small = SMALL_SAMPLE
    easy = created & (tcount <= small)  # new states with few values: a copy of them each
    if any_big:
        easy &= ~has_big
    rest: I64 | None = None
    if easy.any():
        idx = np.flatnonzero(easy)
        a = tfirst[idx]
        views = map(tvals.__getitem__, map(slice, a.tolist(), (a + tcount[idx]).tolist()))
        for slot, piece in zip(slots[idx].tolist(), map(np.ndarray.copy, views), strict=True):
            held[slot] = piece  # a copy: a view would keep the whole batch alive
        if idx.size == slots.size:
            return
        rest = np.flatnonzero(~easy)
    targets = rest.tolist() if rest is not None else range(slots.size)
    sel = slice(None) if rest is None else rest
    withs = has_big[sel].tolist() if any_big else repeat(False)
    ndarray = np.ndarray
    for t, slot, a, c, with_big in zip(targets, slots[sel].tolist(), tfirst[sel].tolist(),
                                         tcount[sel].tolist(), withs, strict=False):
        cur = held[slot]
        if not with_big:  # only small groups: take the raw values
            new = tvals[a:a + c]
            if cur is None:
                held[slot] = new.copy() if c <= small else digest_of(new)
            elif isinstance(cur, ndarray):
                both = np.concatenate((cur, new))
                held[slot] = both if both.size <= small else digest_of(both)
            else:
                table.defer(slot, new.copy() if c < PENDING_VALUES else new)
            continue
        # some big groups: their digests, plus the small groups' values as one array
        rest_vals = None
        if order is None or tstart is None:
            gids: list[int] = [t]
        else:
            ids = order[tstart[t]:tstart[t + 1]]
            gids = ids[big[ids]].tolist()
            if len(gids) < ids.size:
                rest_vals = tvals[a:a + c][~np.repeat(big[ids], mg.agg.count[ids])]
        digests = [mg.digest(i) for i in gids]
        if cur is not None and not isinstance(cur, ndarray):
            for d in digests:
                cur.merge_inplace(d)
            if rest_vals is not None:
                table.defer(slot, rest_vals)
            continue
        parts: list[Sample] = digests if rest_vals is None else [*digests, rest_vals]
        if len(parts) == 1:
            held[slot] = absorb(cur, parts[0], own=own)
        else:
            held[slot] = absorb(cur, combine(parts, own=True), own=True)


def _apply(table: StateTable, targets: I64, agg: _Agg, children: list[list[Any]] | None, own: bool,
           result: FoldResult) -> None:
    """Fold target aggregates (and, per target, the samples to add) into the table (re-delivery path)."""
    slots, _ = table.ensure(targets)
    table.add(slots, agg.count, agg.total, agg.lo, agg.hi, agg.top)
    result.touched.append((table, targets))
    result.rows_folded += int(agg.count.sum())
    if children is None:
        return
    held = table.digests
    for slot, parts in zip(slots.tolist(), children, strict=True):
        if len(parts) == 1:
            held[slot] = absorb(held[slot], parts[0], own=own)
        else:
            held[slot] = absorb(held[slot], combine(parts, own=True), own=True)


# --------------------------------------------------------------------------- cap


@dataclass
class _CapRun:
    """What `_capped` decided for one metric at one granularity, per bucket, so that a metric
    with the same groups and the same kept sets can take the decision as is (`_replay_cap`)."""

    mapped: I64  # value id per group after the cap (__other__ where not kept)
    other: int
    buckets: list[int] = field(default_factory=list)
    old: list[I64 | None] = field(default_factory=list)  # kept sets found
    new: list[I64 | None] = field(default_factory=list)  # kept sets left (sorted by id)
    gone: list[I64 | None] = field(default_factory=list)  # ids pushed out


def _sorted(a: I64) -> I64:
    return a if a.size < 2 or not bool((a[1:] < a[:-1]).any()) else np.sort(a)


def _capped(
    pstate: PartitionState, g: str, metric: Metric, dim: str, cap: int, starts: I64, glids: I64,
    result: FoldResult,
) -> _CapRun:
    """Label ids after the cardinality cap: values not kept get the __other__ id.

    Per (bucket, metric, dimension) the kept set is the `cap` values of smallest
    (hash, value) among all values seen, whatever the arrival order; a value that was kept
    and is pushed out by a smaller hash has its state moved into __other__.
    Why vectorised over buckets: a batch touches dozens of hour buckets (late events), most
    with a handful of rows all of whose values are kept already; one binary search of every
    row in all the kept sets settles those, and only buckets with an unknown value take the
    per-bucket path.
    """
    interner = pstate.interner(dim)
    other = interner.one(OTHER)
    run = _CapRun(glids, other)
    n = starts.size
    if n == 0:
        return run
    order: I64 | None = None
    if n > 1 and bool((starts[1:] < starts[:-1]).any()):
        order = np.argsort(starts, kind="stable")
        starts, ids_all = starts[order], glids[order]
    else:
        ids_all = glids
    cuts = np.flatnonzero(starts[1:] != starts[:-1]) + 1
    edges = [0, *cuts.tolist(), n]
    buckets = starts[edges[:-1]].tolist()
    kept = pstate.kept
    name = metric.name
    olds = [kept.get((g, b, name, dim)) for b in buckets]
    known = [composite(b, o) for b, o in zip(buckets, olds, strict=True) if o is not None and o.size]
    if known:
        keys = np.concatenate(known) if len(known) > 1 else known[0]
        if keys.size > 1 and bool((keys[1:] < keys[:-1]).any()):
            keys = np.sort(keys)
        hit = member_of_sorted(keys, composite(starts, ids_all))
    else:
        hit = np.zeros(n, dtype=bool)
    out = np.where(hit, ids_all, other)  # right for every bucket without an unknown value
    run.buckets, run.old, run.new, run.gone = buckets, olds, list(olds), [None] * len(buckets)
    unknown = np.flatnonzero(~hit & (ids_all != other))
    if unknown.size:
        for k in sorted_unique(np.searchsorted(cuts, unknown, side="right")).tolist():
            lo, hi = edges[k], edges[k + 1]
            bucket, old = buckets[k], olds[k]
            new, gone, mapped = _cap_bucket(old, ids_all[lo:hi], other, cap, interner)
            run.new[k], run.gone[k] = new, gone
            if new is not None and new is not old:
                kept[(g, bucket, name, dim)] = new
            if gone is not None and gone.size:
                _evict(pstate, pstate.table(g, name, dim), bucket, gone, other, result)
            if mapped is not None:
                out[lo:hi] = mapped
    if order is not None:
        out[order] = out.copy()
    run.mapped = out
    return run


def _cap_bucket(old: I64 | None, ids: I64, other: int, cap: int,
                interner: Interner) -> tuple[I64 | None, I64 | None, I64 | None]:
    """One bucket's cap: (kept set after, ids pushed out, mapped ids or None if unchanged)."""
    hashes: I64 | None = None
    if old is not None:
        kept = _sorted(old)
        hit = member_of_sorted(kept, ids)
        fresh = ~hit & (ids != other)
        if not fresh.any():  # every value already kept (or already __other__)
            return kept, None, None
        if kept.size == cap:
            # full: only a value below the largest kept (hash, value) can get in; values
            # above it come back in every batch, so they are dropped before any sort
            hashes = interner.hashes()
            fresh &= hashes[ids] <= hashes[kept].max()
            if not fresh.any():
                return kept, None, np.where(hit, ids, other)
        newcomers = sorted_unique(ids[fresh])
    else:
        kept = None
        newcomers = sorted_unique(ids[ids != other])
        if newcomers.size == 0:
            return None, None, None
    cand = newcomers if kept is None else np.concatenate((kept, newcomers))
    gone = None
    if cand.size > cap:
        if hashes is None:
            hashes = interner.hashes()
        new = np.sort(_smallest(cand, hashes[cand], cap, interner.labels))
        if kept is not None:
            gone = kept[~member_of_sorted(new, kept)]
    else:
        new = np.sort(cand)
    return new, gone, np.where(member_of_sorted(new, ids), ids, other)


def _replay_cap(pstate: PartitionState, g: str, metric: Metric, dim: str, run: _CapRun,
                result: FoldResult) -> _CapRun | None:
    """Apply another metric's cap decision if this metric's kept sets are the same; else None."""
    kept = pstate.kept
    name = metric.name
    for bucket, old in zip(run.buckets, run.old, strict=True):
        mine = kept.get((g, bucket, name, dim))
        if mine is not old and (mine is None or old is None or mine.size != old.size
                                or not np.array_equal(mine, old)):
            return None
    for bucket, new, gone in zip(run.buckets, run.new, run.gone, strict=True):
        if new is not None:
            kept[(g, bucket, name, dim)] = new
        if gone is not None and gone.size:
            _evict(pstate, pstate.table(g, name, dim), bucket, gone, run.other, result)
    return run


def _smallest(cand: I64, hashes: I64, k: int, labels: list[str]) -> I64:
    """The k ids of smallest (hash, value)."""
    order = np.argsort(hashes, kind="stable")
    sh = hashes[order]
    if (sh[1:] == sh[:-1]).any():  # a 60-bit tie (sh is sorted): order those by value, as the SQL does
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
        table.settle(slots)
        held = table.live_samples()
        parts = [held[s] for s in slots.tolist() if held[s] is not None]
        if parts:  # the evicted states are dropped: their samples may be taken as they are
            held[o] = absorb(held[o], combine(parts, own=True), own=True)
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
        glids = _capped(pstate, g, metric, dim, cap, starts, row_lids, result).mapped if cap is not None \
            else row_lids
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
