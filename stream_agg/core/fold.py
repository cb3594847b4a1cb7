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
from operator import attrgetter
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_agg.core.aggstate import AggState, merge_digests, new_digest
from stream_agg.core.buckets import GRANULARITIES, SPAN, bucket_starts
from stream_agg.core.cardinality import KeptSet
from stream_agg.core.registry import ALL, DIMENSIONS, OTHER, Level, Metric, Registry

Key = tuple[str, int, str, str, str]
BucketId = tuple[str, int]
CapScope = tuple[str, int, str, str]  # (granularity, bucket_start, metric, dimension_type)

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

    @property
    def size(self) -> int:
        return int(self.ts.size)


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
    return np.fromiter((e.started_at.timestamp() for e in events), dtype=np.float64,
                       count=len(events))


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
                    (s == "error" for s in map(attrgetter(m.field), events)), dtype=bool, count=n
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
        parents: list[int] = []
        spans: list[Any] = []
        for i, e in enumerate(events):
            for s in e.spans:
                if s.kind == "llm":
                    parents.append(i)
                    spans.append(s)
        parent = np.asarray(parents, dtype=np.int64)
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


# --------------------------------------------------------------------------- state


@dataclass
class PartitionState:
    """Every AggState of one source partition, plus the kept sets of capped dimensions."""

    registry: Registry
    states: dict[Key, AggState] = field(default_factory=dict)
    kept: dict[CapScope, KeptSet] = field(default_factory=dict)
    by_bucket: dict[BucketId, set[Key]] = field(default_factory=dict)
    max_applied: int = -1  # highest applied_offset of any state here

    def get(self, key: Key) -> AggState | None:
        return self.states.get(key)

    def put(self, key: Key, state: AggState) -> None:
        """Install a state (e.g. loaded from storage), keeping indexes in step."""
        self.states[key] = state
        self.by_bucket.setdefault((key[0], key[1]), set()).add(key)
        self.max_applied = max(self.max_applied, state.applied_offset)
        cap = self.registry.cap(key[3])
        if cap is not None and key[4] != OTHER:
            kept = self.kept.setdefault(key[:4], KeptSet(cap))
            kept.admit(key[4])

    def remove(self, key: Key) -> None:
        self.states.pop(key, None)
        keys = self.by_bucket.get((key[0], key[1]))
        if keys is not None:
            keys.discard(key)

    def evict_bucket(self, bucket: BucketId) -> int:
        """Drop a bucket from memory (after its final flush); returns states dropped."""
        keys = self.by_bucket.pop(bucket, set())
        for key in keys:
            self.states.pop(key, None)
        for scope in [s for s in self.kept if s[:2] == bucket]:
            del self.kept[scope]
        return len(keys)

    @property
    def buckets(self) -> set[BucketId]:
        return set(self.by_bucket)

    def keys_of(self, bucket: BucketId) -> set[Key]:
        return set(self.by_bucket.get(bucket, ()))


@dataclass
class FoldResult:
    changed: set[Key] = field(default_factory=set)
    removed: set[Key] = field(default_factory=set)  # pushed into __other__ by the cap
    rows_folded: int = 0  # (row, metric, dimension, granularity) contributions
    rows_skipped: int = 0  # skipped as already applied (re-delivery)

    def update(self, other: FoldResult) -> None:
        self.changed |= other.changed
        self.removed |= other.removed
        self.removed -= other.changed
        self.rows_folded += other.rows_folded
        self.rows_skipped += other.rows_skipped


# --------------------------------------------------------------------------- fold


def fold(pstate: PartitionState, cols: Columns) -> FoldResult:
    """Fold a batch (columns of one partition) into `pstate`; returns what changed.

    The caller must have loaded every state of the buckets the batch touches
    (`cols.buckets()`), because the cap and the offset check read them.
    """
    result = FoldResult()
    if cols.size == 0:
        return result
    may_dedup = int(cols.offsets.min()) <= pstate.max_applied
    for level, lc in cols.levels.items():
        if lc.size == 0:
            continue
        metrics = pstate.registry.by_level(level)
        for dim in pstate.registry.dimensions_of(level):
            for metric in metrics:
                if dim in metric.dimensions:
                    _fold_metric_dim(pstate, lc, metric, dim, may_dedup, result)
    pstate.max_applied = max(pstate.max_applied, int(cols.offsets.max()))
    result.removed -= result.changed
    return result


@dataclass
class _Groups:
    """Dense grouping of rows by (bucket, code) at one granularity."""

    granularity: str
    base: int  # first bucket start
    ncodes: int
    gid: I64
    vals: F64
    offs: I64

    def bucket_of(self, g: I64 | int) -> I64 | int:
        return self.base + (g // self.ncodes) * SPAN[self.granularity]


def _fold_metric_dim(
    pstate: PartitionState, lc: LevelColumns, metric: Metric, dim: str, may_dedup: bool,
    result: FoldResult,
) -> None:
    vals = lc.values[metric.name]
    codes = lc.codes[dim]
    rows = (codes >= 0) & ~np.isnan(vals)
    if not rows.any():
        return
    vals, codes, offs, ts = vals[rows], codes[rows], lc.offsets[rows], lc.ts[rows]
    labels = lc.labels[dim]
    ncodes = max(len(labels), 1)
    hour_digests: dict[int, Any] | None = None
    hour_groups: _Groups | None = None
    for g in GRANULARITIES:
        starts = bucket_starts(ts, g)
        base = int(starts.min())
        gid = ((starts - base) // SPAN[g]) * ncodes + codes
        grp = _Groups(g, base, ncodes, gid, vals, offs)
        filtered = False
        if may_dedup:
            grp, filtered = _drop_applied(pstate, grp, metric, dim, labels, result)
            if grp.gid.size == 0:
                continue
        digests: dict[int, Any] | None = None
        if metric.digest:
            if g == "hour" or filtered or hour_digests is None or hour_groups is None:
                digests = _digests_by_group(grp)
            else:
                digests = _merge_child_digests(grp, hour_groups, hour_digests)
            if g == "hour":
                hour_digests, hour_groups = digests, grp
        _apply_groups(pstate, grp, metric, dim, labels, digests, result)


def _drop_applied(
    pstate: PartitionState, grp: _Groups, metric: Metric, dim: str, labels: list[str],
    result: FoldResult,
) -> tuple[_Groups, bool]:
    """Remove rows at or below their key's applied offset (re-delivered events)."""
    present = np.unique(grp.gid)
    applied = np.full(present.size, -1, dtype=np.int64)
    cap = pstate.registry.cap(dim)
    for j, g in enumerate(present.tolist()):
        bucket = int(grp.bucket_of(g))
        value = labels[g % grp.ncodes] if labels else ALL
        key: Key = (grp.granularity, bucket, metric.name, dim, value)
        state = pstate.get(key)
        if state is None and cap is not None:
            kept = pstate.kept.get(key[:4])
            if kept is not None and not kept.would_keep(value):
                state = pstate.get((*key[:4], OTHER))
        if state is not None:
            applied[j] = state.applied_offset
    row_applied = applied[np.searchsorted(present, grp.gid)]
    keep = grp.offs > row_applied
    if keep.all():
        return grp, False
    result.rows_skipped += int((~keep).sum())
    return _Groups(grp.granularity, grp.base, grp.ncodes, grp.gid[keep], grp.vals[keep],
                   grp.offs[keep]), True


def _digests_by_group(grp: _Groups) -> dict[int, Any]:
    """One digest per group, each fed with a single `batch_update` of its values."""
    order = np.argsort(grp.gid, kind="stable")
    sorted_gid = grp.gid[order]
    sorted_vals = grp.vals[order]
    cut = np.flatnonzero(np.diff(sorted_gid)) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [sorted_gid.size]))
    out: dict[int, Any] = {}
    for g, a, b in zip(sorted_gid[starts].tolist(), starts.tolist(), ends.tolist(), strict=True):
        digest = new_digest()
        digest.batch_update(sorted_vals[a:b])
        out[g] = digest
    return out


def _merge_child_digests(grp: _Groups, hours: _Groups, hour_digests: dict[int, Any]) -> dict[int, Any]:
    """Day / week digests as merges of the batch's hour digests (no second value pass)."""
    children: dict[int, list[Any]] = {}
    hour_gids = np.fromiter(hour_digests, dtype=np.int64, count=len(hour_digests))
    hour_starts = hours.base + (hour_gids // hours.ncodes) * SPAN["hour"]
    parents = bucket_starts(hour_starts.astype(np.float64), grp.granularity)
    gids = ((parents - grp.base) // SPAN[grp.granularity]) * grp.ncodes + hour_gids % hours.ncodes
    for g, digest in zip(gids.tolist(), hour_digests.values(), strict=True):
        children.setdefault(g, []).append(digest)
    return {g: (ds[0] if len(ds) == 1 else merge_digests(ds)) for g, ds in children.items()}


def _apply_groups(
    pstate: PartitionState, grp: _Groups, metric: Metric, dim: str, labels: list[str],
    digests: dict[int, Any] | None, result: FoldResult,
) -> None:
    """Merge each group's aggregate into its (possibly capped) state."""
    size = int(grp.gid.max()) + 1
    counts = np.bincount(grp.gid, minlength=size)
    sums = np.bincount(grp.gid, weights=grp.vals, minlength=size)
    mins = np.full(size, math.inf)
    np.minimum.at(mins, grp.gid, grp.vals)
    maxs = np.full(size, -math.inf)
    np.maximum.at(maxs, grp.gid, grp.vals)
    top = np.full(size, -1, dtype=np.int64)
    np.maximum.at(top, grp.gid, grp.offs)
    present = np.flatnonzero(counts)
    cap = pstate.registry.cap(dim)
    span = SPAN[grp.granularity]
    name, gran = metric.name, grp.granularity
    for g, c, s, lo, hi, off in zip(
        present.tolist(), counts[present].tolist(), sums[present].tolist(),
        mins[present].tolist(), maxs[present].tolist(), top[present].tolist(), strict=True,
    ):
        ncode = grp.ncodes
        bucket = grp.base + (g // ncode) * span
        value = labels[g % ncode] if labels else ALL
        key: Key = (gran, bucket, name, dim, value)
        if cap is not None:
            key = _capped_key(pstate, key, cap, result)
        state = pstate.states.get(key)
        if state is None:
            state = AggState(digest=new_digest() if metric.digest else None)
            pstate.put(key, state)
        state.count += c
        state.sum += s
        if lo < state.min:
            state.min = lo
        if hi > state.max:
            state.max = hi
        if off > state.applied_offset:
            state.applied_offset = off
        if digests is not None and state.digest is not None:
            state.digest.merge_inplace(digests[g])
        result.changed.add(key)
        result.rows_folded += c


def _capped_key(pstate: PartitionState, key: Key, cap: int, result: FoldResult) -> Key:
    """Route a key through the cap; an evicted value's state moves into __other__."""
    scope: CapScope = key[:4]
    kept = pstate.kept.get(scope)
    if kept is None:
        kept = pstate.kept[scope] = KeptSet(cap)
    admitted, evicted = kept.admit(key[4])
    if evicted is not None:
        old_key: Key = (*scope, evicted)
        old = pstate.states.get(old_key)
        if old is not None:
            pstate.remove(old_key)
            other_key: Key = (*scope, OTHER)
            other = pstate.states.get(other_key)
            if other is None:
                pstate.put(other_key, old)
            else:
                other.merge_in(old)
            result.changed.add(other_key)
            result.removed.add(old_key)
            result.changed.discard(old_key)
    return key if admitted else (*scope, OTHER)


def fold_events(
    pstate: PartitionState, events: Sequence[Any], offsets: Iterable[int] | I64,
) -> FoldResult:
    """Convenience: columns + fold in one call (tests, replay, benchmarks)."""
    offs = np.fromiter(offsets, dtype=np.int64) if not isinstance(offsets, np.ndarray) else offsets
    return fold(pstate, to_columns(events, offs, pstate.registry))
