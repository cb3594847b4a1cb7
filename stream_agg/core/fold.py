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
from operator import attrgetter
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_agg.core.aggstate import AggState, merge_digests, new_digest
from stream_agg.core.buckets import GRANULARITIES, HOUR, SPAN, bucket_starts
from stream_agg.core.cardinality import KeptSet, cap_hash
from stream_agg.core.registry import ALL, DIMENSIONS, OTHER, Level, Metric, Registry

Key = tuple[str, int, str, str, str]
BucketId = tuple[str, int]
CapScope = tuple[str, int, str, str]  # (granularity, bucket_start, metric, dimension_type)

_STARTED_AT = attrgetter("started_at")

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
    """Dense grouping of rows by (bucket, code) at one granularity.

    gid = bucket_index * ncodes + code; for a capped dimension the codes were remapped
    (values not kept -> the extra code `ncodes - 1`, labelled __other__).
    """

    granularity: str
    base: int  # first bucket start
    ncodes: int
    labels: list[str]
    gid: I64
    vals: F64
    offs: I64

    def bucket_of(self, g: I64 | int) -> I64 | int:
        return self.base + (g // self.ncodes) * SPAN[self.granularity]

    def key(self, g: int, metric: str, dim: str) -> Key:
        return (self.granularity, self.base + (g // self.ncodes) * SPAN[self.granularity], metric, dim,
                self.labels[g % self.ncodes])


@dataclass
class _Agg:
    """count / sum / min / max / top offset per group (a row is a group of one)."""

    count: I64
    total: F64
    lo: F64
    hi: F64
    top: I64

    @classmethod
    def of_rows(cls, vals: F64, offs: I64) -> _Agg:
        return cls(np.ones(vals.size, dtype=np.int64), vals, vals, vals, offs)


def _reduce(gid: I64, agg: _Agg) -> tuple[I64, _Agg]:
    """Combine groups sharing a gid: returns the distinct gids (sorted) and their aggregates."""
    size = int(gid.max()) + 1
    counts = np.bincount(gid, weights=agg.count, minlength=size)
    present = np.flatnonzero(counts)
    sums = np.bincount(gid, weights=agg.total, minlength=size)
    mins = np.full(size, math.inf)
    np.minimum.at(mins, gid, agg.lo)
    maxs = np.full(size, -math.inf)
    np.maximum.at(maxs, gid, agg.hi)
    top = np.full(size, -1, dtype=np.int64)
    np.maximum.at(top, gid, agg.top)
    return present, _Agg(counts[present].astype(np.int64), sums[present], mins[present], maxs[present],
                         top[present])


def _fold_metric_dim(
    pstate: PartitionState, lc: LevelColumns, metric: Metric, dim: str, may_dedup: bool,
    result: FoldResult,
) -> None:
    """Fold one metric sliced by one dimension, at every granularity.

    Rows are grouped once by (hour, value); day and week aggregates and digests are
    roll-ups of those hour groups, so only one pass touches every row.
    """
    vals = lc.values[metric.name]
    codes = lc.codes[dim]
    rows = (codes >= 0) & ~np.isnan(vals)
    every = bool(rows.all())
    if not every and not rows.any():
        return
    if not every:
        vals, codes = vals[rows], codes[rows]
    offs = lc.offsets if every else lc.offsets[rows]
    starts_of = {g: (lc.starts(g) if every else lc.starts(g)[rows]) for g in GRANULARITIES}
    labels = lc.labels[dim] or [ALL]
    if may_dedup:
        _fold_rows_checked(pstate, metric, dim, labels, vals, codes, offs, starts_of, result)
        return
    nraw = len(labels)
    hour_starts = starts_of["hour"]
    hbase = int(hour_starts.min())
    raw_gid = ((hour_starts - hbase) // HOUR) * nraw + codes
    raw_ids, raw = _reduce(raw_gid, _Agg.of_rows(vals, offs))
    raw_digests: dict[int, Any] | None = None
    if metric.digest:
        raw_digests = _digests_by_group(_Groups("hour", hbase, nraw, labels, raw_gid, vals, offs))
    raw_hours = hbase + (raw_ids // nraw) * HOUR
    raw_codes = raw_ids % nraw
    cap = pstate.registry.cap(dim)
    for g in GRANULARITIES:
        starts = raw_hours if g == "hour" else bucket_starts(raw_hours.astype(np.float64), g)
        base = int(starts.min())
        bidx = (starts - base) // SPAN[g]
        glabels, gcodes = _capped(pstate, g, base, bidx, raw_codes, labels, metric.name, dim, cap, result)
        ncodes = len(glabels)
        gid = bidx * ncodes + gcodes
        if g == "hour" and cap is None:
            ids, agg, digests = gid, raw, raw_digests  # the hour groups themselves
        else:
            ids, agg = _reduce(gid, raw)
            digests = None if raw_digests is None else _roll_up(raw_ids, gid, raw_digests, own=g == "hour")
        _apply(pstate, g, base, ncodes, glabels, metric, dim, ids, agg, digests, result)


def _fold_rows_checked(
    pstate: PartitionState, metric: Metric, dim: str, labels: list[str], vals: F64, codes: I64, offs: I64,
    starts_of: dict[str, I64], result: FoldResult,
) -> None:
    """The re-delivery path: rows already applied to their key are dropped per granularity."""
    cap = pstate.registry.cap(dim)
    for g in GRANULARITIES:
        starts = starts_of[g]
        base = int(starts.min())
        bidx = (starts - base) // SPAN[g]
        glabels, gcodes = _capped(pstate, g, base, bidx, codes, labels, metric.name, dim, cap, result)
        grp = _Groups(g, base, len(glabels), glabels, bidx * len(glabels) + gcodes, vals, offs)
        grp, _ = _drop_applied(pstate, grp, metric.name, dim, result)
        if grp.gid.size == 0:
            continue
        ids, agg = _reduce(grp.gid, _Agg.of_rows(grp.vals, grp.offs))
        digests = _digests_by_group(grp) if metric.digest else None
        _apply(pstate, g, base, grp.ncodes, glabels, metric, dim, ids, agg, digests, result)


def _roll_up(raw_ids: I64, targets: I64, raw_digests: dict[int, Any], own: bool) -> dict[int, Any]:
    """Digest per target group as the merge of its raw (hour, value) digests.

    Only hour-level states may take a raw digest as their own; coarser ones get a copy
    or a merge, so no two states ever share a digest object.
    """
    children: dict[int, list[Any]] = {}
    for r, t in zip(raw_ids.tolist(), targets.tolist(), strict=True):
        children.setdefault(t, []).append(raw_digests[r])
    return {t: (ds[0] if own else ds[0].copy()) if len(ds) == 1 else merge_digests(ds)
            for t, ds in children.items()}


def _capped(
    pstate: PartitionState, g: str, base: int, bidx: I64, codes: I64, labels: list[str], metric: str,
    dim: str, cap: int | None, result: FoldResult,
) -> tuple[list[str], I64]:
    """(labels, codes) after the cardinality cap; values not kept get the extra __other__ code."""
    if cap is None:
        return labels, codes
    remap = _cap_remap(pstate, g, base, bidx, codes, labels, metric, dim, cap, result)
    return [*labels, OTHER], remap[bidx, codes]


def _cap_remap(
    pstate: PartitionState, g: str, base: int, bidx: I64, codes: I64, labels: list[str], metric: str,
    dim: str, cap: int, result: FoldResult,
) -> I64:
    """Per bucket: code -> itself if the value is kept under the cap, else the __other__ code.

    Values are admitted in ascending hash order so a batch evicts as little as possible;
    a value that was kept before and is pushed out now has its state moved to __other__.
    """
    other = len(labels)
    nb = int(bidx.max()) + 1
    remap = np.full((nb, other + 1), other, dtype=np.int64)
    remap[:, other] = other
    span = SPAN[g]
    pair = np.unique(bidx * (other + 1) + codes)
    for b in np.unique(pair // (other + 1)).tolist():
        present = (pair[(pair // (other + 1)) == b] % (other + 1)).tolist()
        scope: CapScope = (g, base + b * span, metric, dim)
        kept = pstate.kept.get(scope)
        if kept is None:
            kept = pstate.kept[scope] = KeptSet(cap)
        members = kept.members
        newcomers = [c for c in present if labels[c] not in members]
        if newcomers:
            for c in sorted(newcomers, key=lambda c: (cap_hash(labels[c]), labels[c])):
                admitted, evicted = kept.admit(labels[c])
                if not admitted:
                    break  # ascending hashes: every later newcomer is rejected too
                if evicted is not None:
                    _evict(pstate, scope, evicted, result)
            members = kept.members
        row = remap[b]
        for c in present:
            if labels[c] in members:
                row[c] = c
    return remap


def _evict(pstate: PartitionState, scope: CapScope, value: str, result: FoldResult) -> None:
    """Move a value pushed out by the cap into the scope's __other__ state."""
    old_key: Key = (*scope, value)
    old = pstate.states.get(old_key)
    if old is None:
        return
    pstate.remove(old_key)
    other_key: Key = (*scope, OTHER)
    other = pstate.states.get(other_key)
    if other is None:
        pstate.put(other_key, old)
    else:
        other.merge_in(old)
    result.changed.add(other_key)
    result.changed.discard(old_key)
    result.removed.add(old_key)


def _drop_applied(
    pstate: PartitionState, grp: _Groups, metric: str, dim: str, result: FoldResult,
) -> tuple[_Groups, bool]:
    """Remove rows at or below their key's applied offset (re-delivered events)."""
    present = np.unique(grp.gid)
    applied = np.full(present.size, -1, dtype=np.int64)
    for j, g in enumerate(present.tolist()):
        state = pstate.states.get(grp.key(g, metric, dim))
        if state is not None:
            applied[j] = state.applied_offset
    keep = grp.offs > applied[np.searchsorted(present, grp.gid)]
    if keep.all():
        return grp, False
    result.rows_skipped += int((~keep).sum())
    return _Groups(grp.granularity, grp.base, grp.ncodes, grp.labels, grp.gid[keep], grp.vals[keep],
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


def _apply(
    pstate: PartitionState, gran: str, base: int, ncode: int, labels: list[str], metric: Metric, dim: str,
    ids: I64, agg: _Agg, digests: dict[int, Any] | None, result: FoldResult,
) -> None:
    """Merge each group's aggregate into its state (a new key takes the group's digest as is)."""
    span = SPAN[gran]
    name = metric.name
    states = pstate.states
    changed = result.changed
    by_bucket = pstate.by_bucket
    with_digest = metric.digest
    for g, c, s, lo, hi, off in zip(ids.tolist(), agg.count.tolist(), agg.total.tolist(), agg.lo.tolist(),
                                    agg.hi.tolist(), agg.top.tolist(), strict=True):
        bucket = base + (g // ncode) * span
        key: Key = (gran, bucket, name, dim, labels[g % ncode])
        state = states.get(key)
        if state is None:
            digest = digests[g] if digests is not None else (new_digest() if with_digest else None)
            states[key] = AggState(c, s, lo, hi, digest, off)
            keys = by_bucket.get((gran, bucket))
            if keys is None:
                keys = by_bucket[(gran, bucket)] = set()
            keys.add(key)
        else:
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
        changed.add(key)
        result.rows_folded += c


def fold_events(
    pstate: PartitionState, events: Sequence[Any], offsets: Iterable[int] | I64,
) -> FoldResult:
    """Convenience: columns + fold in one call (tests, replay, benchmarks)."""
    offs = np.fromiter(offsets, dtype=np.int64) if not isinstance(offsets, np.ndarray) else offsets
    return fold(pstate, to_columns(events, offs, pstate.registry))
