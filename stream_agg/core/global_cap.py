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

Deleting the rows of values pushed out: such a row exists only if an earlier merge kept
the value, i.e. the value ranked at or below that merge's cut (the last kept (hash,
value)). The cut of a scope only ever moves down: the union gains values, and loses only
values a partition pushed out, which are past the cut already. So a merge deletes the
pushed-out values at or below the previous cut it knows (every pushed-out value when it
knows none, after a restart or for another worker's scope), not every pushed-out value at
every flush. The caller must record the new cuts only once the flush has committed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from stream_agg.core.aggstate import AggState
from stream_agg.core.cardinality import cap_hash
from stream_agg.core.registry import OTHER
from stream_agg.core.state_table import I64, LABEL_BITS, LABEL_MASK, LABEL_SPACE

Cut = tuple[int, str]  # (cap hash, value) of the last value kept
Scope = tuple[str, int, str, str]  # (granularity, bucket start, metric, dimension)
Key = tuple[str, int, str, str, str]


@dataclass
class CapCuts:
    """What merges of capped scopes need to remember: in, the cuts of the last committed
    merge (`known`); out, the cuts this merge found and the rows it pushed out (`gone`)."""

    known: Mapping[Scope, Cut] = field(default_factory=dict)
    cuts: dict[Scope, Cut] = field(default_factory=dict)
    gone: list[Key] = field(default_factory=list)


def at_or_below(cut: Cut | None) -> Callable[[int, str], bool]:
    """Whether a (hash, value) may have a row, given the previous cut (None: unknown)."""
    if cut is None:
        return lambda h, v: True
    return lambda h, v: (h, v) <= cut


@dataclass
class UnionCut:
    """One table's merge decision (composite keys: bucket hour * 2**32 + value id)."""

    out: I64  # keys past the cut, sorted: their states go to the bucket's __other__
    stale: I64  # those of `out` whose row may exist (to delete)
    cuts: dict[int, Cut]  # bucket hour -> new cut, for buckets with values past it


_EMPTY = np.empty(0, dtype=np.int64)


def cut_union(keys: I64, labels: list[str], hashes: I64, other: int, cap: int,
              known: Callable[[int], Cut | None]) -> UnionCut:
    """The cap over `keys` (sorted, distinct composite keys of one table, every partition's),
    per bucket. `labels` / `hashes` are indexed by value id; `known(hour)` is the previous cut."""
    ids = keys & LABEL_MASK
    keys = keys[ids != other]
    if keys.size <= cap:
        return UnionCut(_EMPTY, _EMPTY, {})
    hours = keys >> LABEL_BITS
    starts = np.flatnonzero(np.r_[True, hours[1:] != hours[:-1]])
    sizes = np.diff(np.r_[starts, keys.size])
    if not bool((sizes > cap).any()):
        return UnionCut(_EMPTY, _EMPTY, {})
    ids = keys & LABEL_MASK
    h = hashes[ids]
    order = np.lexsort((h, hours))  # keys are grouped by hour already; within, by hash
    oh, hh = hours[order], h[order]
    if bool(((oh[1:] == oh[:-1]) & (hh[1:] == hh[:-1])).any()):  # a 60-bit tie: by value, as the SQL does
        order = np.asarray(sorted(order.tolist(), key=lambda i: (int(hours[i]), int(h[i]), labels[int(ids[i])])),
                           dtype=np.int64)
    rank = np.arange(keys.size) - np.repeat(starts, sizes)
    past = order[rank >= cap]  # positions (in `keys`) past the cut of their bucket
    cuts: dict[int, Cut] = {}
    at_cut = order[rank == cap - 1]  # one per bucket holding at least `cap` values
    for j in at_cut[sizes[sizes >= cap] > cap].tolist():
        cuts[int(hours[j])] = (int(h[j]), labels[int(ids[j])])
    tests: dict[int, Callable[[int, str], bool]] = {}
    stale = []
    for j in past.tolist():
        hour = int(hours[j])
        may_exist = tests.get(hour)
        if may_exist is None:
            may_exist = tests[hour] = at_or_below(known(hour))
        if may_exist(int(h[j]), labels[int(ids[j])]):
            stale.append(j)
    out = np.sort(keys[past])
    return UnionCut(out, np.sort(keys[np.asarray(stale, dtype=np.int64)]), cuts)


def other_keys(keys: I64, other: int) -> I64:
    """The `__other__` key of each key's bucket (distinct, sorted)."""
    return np.unique(keys >> LABEL_BITS) * LABEL_SPACE + other


def cap_states(states: Mapping[Key, AggState], wanted: set[Key], caps: Mapping[str, int],
               record: CapCuts, merge: Callable[[list[AggState]], AggState]) -> dict[Key, AggState]:
    """The rows to write, per key: the `wanted` keys' merged states after the cap over the union.

    `states` holds the merged (all partitions) state of every wanted key and of every key
    of each capped scope that has a wanted key. A wanted key pushed out writes no row (and
    is recorded in `record.gone` if its row may exist); its scope's `__other__` row is
    rewritten as the merge of `__other__` and every pushed-out value. Keys of scopes not
    capped, or not over their cap, pass through.
    """
    scopes: dict[Scope, list[Key]] = {}
    for key in states:
        if key[3] in caps:
            scopes.setdefault(key[:4], []).append(key)
    rows = {k: s for k, s in states.items() if k in wanted and k[:4] not in scopes}
    for scope, keys in scopes.items():
        cap = caps[scope[3]]
        ranked = sorted((cap_hash(k[4]), k[4]) for k in keys if k[4] != OTHER)
        if len(ranked) <= cap:
            rows.update((k, states[k]) for k in keys if k in wanted)
            continue
        record.cuts[scope] = ranked[cap - 1]
        may_exist = at_or_below(record.known.get(scope))
        out = [(*scope, v) for h, v in ranked[cap:]]
        stale = [(*scope, v) for h, v in ranked[cap:] if may_exist(h, v)]
        record.gone.extend(stale)
        kept = {(*scope, v) for _, v in ranked[:cap]}
        rows.update((k, states[k]) for k in keys if k in wanted and k in kept)
        other = (*scope, OTHER)
        if stale or other in wanted or any(k in wanted for k in out):
            parts = ([states[other]] if other in states else []) + [states[k] for k in out]
            rows[other] = merge(parts)
    return rows
