"""The cardinality cap applied again over the union of all partitions, when rows are merged.

Why: each partition caps what it folds on its own (`fold._capped`), keeping the K values
of smallest (hash, value) it has seen, and folding the rest into `__other__`. A value
among the K smallest of the whole bucket is among the K smallest of every partition that
saw it, so it is kept everywhere and its row is whole. A value past that cut can still
be kept by a partition that saw few values while another folded it into `__other__`:
its row would hold part of its events and `__other__` the rest. So the merge keeps, of
the union of the values the partitions hold, the K of smallest (hash, value) and moves
the others' states into `__other__`. The K smallest of the union are the K smallest of
every value seen (each of those is in the union), which is the rule the SQL backfill
applies (`cardinality.capped_values`), so stream rows and backfilled rows agree.

A merge of a scope holding at least K values reports the scope's cut (the last kept
(hash, value)), and one over its cap always rewrites its `__other__` row: a new value
below the cut pushes an unchanged value out. The writer deletes the scope's stream rows
past the cut in SQL, under the bucket lock, whoever wrote them (an earlier flush, another
worker, a replay that saw fewer values, a worker older than this module); that costs one
md5 per row of the scope, and nothing for a bucket without rows yet.

Changing a cap is not followed: values a smaller cap folded into a partition's
`__other__` stay there, and rows deleted under a smaller cut come back only when their
values get new events. After changing `STREAM_AGG_CARDINALITY_CAPS`, backfill or replay
the buckets that should follow the new cap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from stream_agg.core.aggstate import AggState
from stream_agg.core.cardinality import cap_hash
from stream_agg.core.registry import OTHER
from stream_agg.core.state_table import I64, LABEL_BITS, LABEL_MASK

Cut = tuple[int, str]  # (cap hash, value) of the last value kept
Scope = tuple[str, int, str, str]  # (granularity, bucket start, metric, dimension)
Key = tuple[str, int, str, str, str]


@dataclass
class UnionCut:
    """One table's merge decision (composite keys: bucket hour * 2**32 + value id)."""

    out: I64  # keys past the cut of their bucket, sorted: their states go to its __other__
    cuts: dict[int, Cut]  # bucket hour -> cut, for the buckets holding at least `cap` values


_EMPTY = np.empty(0, dtype=np.int64)


def cut_union(keys: I64, labels: list[str], hashes: I64, other: int, cap: int) -> UnionCut:
    """The cap over `keys` (sorted, distinct composite keys of one table, every partition's),
    per bucket. `labels` / `hashes` are indexed by value id."""
    ids = keys & LABEL_MASK
    keys = keys[ids != other]
    if keys.size < cap:
        return UnionCut(_EMPTY, {})
    hours = keys >> LABEL_BITS
    starts = np.flatnonzero(np.r_[True, hours[1:] != hours[:-1]])
    sizes = np.diff(np.r_[starts, keys.size])
    if not bool((sizes >= cap).any()):
        return UnionCut(_EMPTY, {})
    ids = keys & LABEL_MASK
    h = hashes[ids]
    order = np.lexsort((h, hours))  # keys are grouped by hour already; within, by hash
    oh, hh = hours[order], h[order]
    if bool(((oh[1:] == oh[:-1]) & (hh[1:] == hh[:-1])).any()):  # a 60-bit tie: by value, as the SQL does
        order = np.asarray(sorted(order.tolist(), key=lambda i: (int(hours[i]), int(h[i]), labels[int(ids[i])])),
                           dtype=np.int64)
    rank = np.arange(keys.size) - np.repeat(starts, sizes)
    cuts: dict[int, Cut] = {}
    for j in order[rank == cap - 1].tolist():  # one per bucket holding at least `cap` values
        cuts[int(hours[j])] = (int(h[j]), labels[int(ids[j])])
    return UnionCut(np.sort(keys[order[rank >= cap]]), cuts)


def cap_states(parts: Mapping[Key, Sequence[AggState]], wanted: set[Key], caps: Mapping[str, int],
               cuts: dict[Scope, Cut], merge: Callable[[list[AggState]], AggState]) -> dict[Key, AggState]:
    """The rows to write: per key, the merge of its partitions' states, after the cap over
    the union.

    `parts` holds every partition's state (in partition order) of each wanted key and of
    every key of each capped scope that has a wanted key (more is ignored). A wanted key
    past the cut writes no row. A scope holding at least K values gets its cut in `cuts`
    (rows past it are strays: written from fewer values, by a replay or an older worker);
    one over its cap also gets its `__other__` row rewritten, as the merge of `__other__`
    and every value past the cut (in (hash, value) order, so the same partials give the
    same digest in this path). Only what is written is merged.
    """
    touched = {k[:4] for k in wanted if k[3] in caps}
    scopes: dict[Scope, list[str]] = {}
    for key in parts:
        if key[:4] in touched:
            scopes.setdefault(key[:4], []).append(key[4])
    rows = {k: merge(list(s)) for k, s in parts.items() if k in wanted and k[:4] not in scopes}
    for scope, values in scopes.items():
        cap = caps[scope[3]]
        ranked = sorted((cap_hash(v), v) for v in values if v != OTHER)
        if len(ranked) >= cap:
            cuts[scope] = ranked[cap - 1]
        if len(ranked) <= cap:
            rows.update(((*scope, v), merge(list(parts[(*scope, v)]))) for v in values if (*scope, v) in wanted)
            continue
        rows.update(((*scope, v), merge(list(parts[(*scope, v)]))) for _, v in ranked[:cap] if (*scope, v) in wanted)
        other = (*scope, OTHER)
        rows[other] = merge([*parts.get(other, ()), *(s for _, v in ranked[cap:] for s in parts[(*scope, v)])])
    return rows
