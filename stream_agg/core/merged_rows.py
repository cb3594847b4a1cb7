"""metrics_aggregates rows of whole buckets, merged across the partitions held in memory.

Why vectorised: with one worker owning every partition, each flush rewrites the rows
of every bucket that changed, tens of thousands per flush under load. Doing that per
key (an AggState per partition, a merge, a digest) cost as much as folding the events.
Here count / sum / min / max are merged with numpy across partitions per table; only
digest metrics do per-key work, and only for their digest.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable, Sequence
from itertools import repeat
from typing import Any

import numpy as np

from stream_agg.core.aggstate import digest_to_bytes, values_to_digest_bytes
from stream_agg.core.buckets import to_datetime
from stream_agg.core.partition_state import BucketId, Key, PartitionState, TableId
from stream_agg.core.sample import combine, exact_quantiles
from stream_agg.core.state_table import HOUR, I64, LABEL_BITS, LABEL_MASK, LABEL_SPACE, Interner

QUANTILES = (0.5, 0.95, 0.99)
Row = tuple[Any, ...]  # the columns of metrics_aggregates the stream writes, in COPY order


def merged_rows(pstates: Sequence[PartitionState], buckets: Iterable[BucketId],
                only: Container[Key] | None = None) -> dict[Key, Row]:
    """Key -> merged row for every key of `buckets` held by any of `pstates` (and in `only`).

    `pstates` must be in partition order (digests merge in that order, so the same
    partials always give the same bytes). Nothing in the live states is changed.
    """
    wanted: dict[str, list[int]] = {}
    for g, b in buckets:
        wanted.setdefault(g, []).append(b)
    glob: dict[str, Interner] = {}
    trans: dict[tuple[int, str], I64] = {}
    tids: dict[TableId, None] = {}
    for ps in pstates:
        for tid in ps.tables:
            if tid[0] in wanted:
                tids[tid] = None
    out: dict[Key, Row] = {}
    for tid in tids:
        _table_rows(pstates, tid, sorted(wanted[tid[0]]), glob, trans, out, only)
    return out


def _translation(ps_index: int, ps: PartitionState, dim: str, glob: dict[str, Interner],
                 trans: dict[tuple[int, str], I64]) -> I64:
    """This partition's value ids -> ids of one interner shared by the merge."""
    key = (ps_index, dim)
    t = trans.get(key)
    if t is None or t.size < len(ps.interners[dim]):
        it = glob.setdefault(dim, Interner())
        t = trans[key] = it.intern(ps.interners[dim].labels)
    return t


def _table_rows(pstates: Sequence[PartitionState], tid: TableId, buckets: list[int],
                glob: dict[str, Interner], trans: dict[tuple[int, str], I64], out: dict[Key, Row],
                only: Container[Key] | None) -> None:
    g, metric, dim = tid
    comps: list[I64] = []
    cols: list[tuple[I64, Any, Any, Any, I64]] = []
    samples: list[Any] = []
    with_digest = False
    for i, ps in enumerate(pstates):
        t = ps.tables.get(tid)
        if t is None:
            continue
        with_digest = t.with_digest
        pos = np.concatenate([np.arange(r.start, r.stop) for r in (t.bucket_range(b) for b in buckets)])
        if pos.size == 0:
            continue
        keys, slots = t.keys[pos], t.slots[pos]
        tr = _translation(i, ps, dim, glob, trans)
        comps.append((keys >> LABEL_BITS) * LABEL_SPACE + tr[keys & LABEL_MASK])
        cols.append((t.count[slots], t.total[slots], t.lo[slots], t.hi[slots], slots))
        if with_digest:
            samples.extend(t.digests[s] for s in slots.tolist())
    if not comps:
        return
    allc = np.concatenate(comps)
    uq, inv = np.unique(allc, return_inverse=True)
    n = uq.size
    labels = glob[dim].labels
    hours = (uq >> LABEL_BITS).tolist()
    names = [labels[lid] for lid in (uq & LABEL_MASK).tolist()]
    wanted = None if only is None else [(g, h * HOUR, metric, dim, name) in only
                                         for h, name in zip(hours, names, strict=True)]
    count = np.bincount(inv, weights=np.concatenate([c[0] for c in cols]), minlength=n).astype(np.int64)
    total = np.bincount(inv, weights=np.concatenate([c[1] for c in cols]), minlength=n)
    lo = np.full(n, math.inf)
    np.minimum.at(lo, inv, np.concatenate([c[2] for c in cols]))
    hi = np.full(n, -math.inf)
    np.maximum.at(hi, inv, np.concatenate([c[3] for c in cols]))
    times = {h: to_datetime(h * HOUR) for h in set(hours)}
    counts, totals, los, his = count.tolist(), total.tolist(), lo.tolist(), hi.tolist()
    if not with_digest:
        for h, name, c, s, a, b, w in zip(hours, names, counts, totals, los, his, wanted or repeat(True),
                                          strict=False):
            if not w:
                continue
            out[(g, h * HOUR, metric, dim, name)] = (times[h], g, metric, dim, name, c, s, a, b,
                                                     s / c if c else None, None, None, None, None)
        return
    groups: list[list[Any]] = [[] for _ in range(n)]
    for j, x in zip(inv.tolist(), samples, strict=True):
        if x is not None:
            groups[j].append(x)
    for h, name, c, s, a, b, parts, w in zip(hours, names, counts, totals, los, his, groups,
                                             wanted or repeat(True), strict=False):
        if not w:
            continue
        qs: list[float | None] = [None, None, None]
        stored: bytes | None = None
        sample = combine(parts, own=False) if parts else None
        if isinstance(sample, np.ndarray):  # small: exact percentiles, values stored as they are
            if sample.size and c:
                qs = list(exact_quantiles(sample, QUANTILES))
            stored = values_to_digest_bytes(sample)
        elif sample is not None:
            if c and not sample.is_empty():
                qs = [float(sample.quantile(q)) for q in QUANTILES]
            stored = digest_to_bytes(sample)
        out[(g, h * HOUR, metric, dim, name)] = (times[h], g, metric, dim, name, c, s, a, b,
                                                 s / c if c else None, qs[0], qs[1], qs[2], stored)
