"""Columnar state storage: the states of one (granularity, metric, dimension) as numpy columns.

Why columns and not one AggState object per key: the fold touches about one key per
event (a `user` dimension with 1,000 values per bucket, three granularities), and a
Python object, a key tuple and a dict lookup per touched key was most of the fold's cost
and of the worker's memory. Here a batch's groups are located with one `searchsorted`
and updated with fancy indexing; only digests, which are Rust objects, stay per key.

A state is addressed by a composite int64 `bucket_hour * 2**32 + label_id`, where
`bucket_hour` is the bucket start in hours since the epoch and `label_id` comes from the
partition's `Interner` for the dimension. Composite keys are kept sorted, so the keys of
one bucket are one contiguous range (eviction and flush read ranges, not scans).
"""

from __future__ import annotations

import math
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_agg.core.cardinality import cap_hash
from stream_agg.core.sample import feed

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
BOOL = npt.NDArray[np.bool_]

LABEL_BITS = 32
LABEL_SPACE = 1 << LABEL_BITS
LABEL_MASK = LABEL_SPACE - 1
HOUR = 3600
# Values a digest state may have waiting (`StateTable.defer`): 512 float64 = 4 KB at most per state.
PENDING_VALUES = 512


def composite(bucket_starts: I64 | int, label_ids: I64 | int) -> Any:
    """Composite key(s) of (bucket start in epoch seconds, label id)."""
    return (bucket_starts // HOUR) * LABEL_SPACE + label_ids


def member_of_sorted(sorted_ids: I64, ids: I64) -> npt.NDArray[np.bool_]:
    """Which `ids` are in `sorted_ids` (one binary search each; ~2x `np.isin`, which sorts both)."""
    if sorted_ids.size == 0:
        return np.zeros(ids.size, dtype=bool)
    pos = np.searchsorted(sorted_ids, ids)
    return sorted_ids[np.minimum(pos, sorted_ids.size - 1)] == ids


def sorted_unique(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """`np.unique(a)` for integer arrays, by a sort and a mask.

    Why: numpy 2.3 made `np.unique` without indices build a hash set, then sort it: on the
    merge's composite keys that was 7-15x slower than sorting (600,000 keys: 152 ms against
    11 ms), and np.unique was 42% of the flush's row merge. `np.union1d` and
    `np.intersect1d` go through it too. Not for floats (NaN would not collapse)."""
    out = np.sort(a, axis=None)
    if out.size < 2:
        return out
    keep = np.empty(out.size, dtype=bool)
    keep[0] = True
    np.not_equal(out[1:], out[:-1], out=keep[1:])
    return out[keep]


def bucket_of(keys: I64 | int) -> Any:
    """Bucket start (epoch seconds) of composite key(s)."""
    return (keys >> LABEL_BITS) * HOUR


class Interner:
    """Dimension values <-> dense int ids, one per dimension and partition.

    Ids only grow; `compact` renumbers the ids still in use when most are dead, so a
    long-running worker seeing ever-new users does not keep every value it ever saw.
    """

    def __init__(self) -> None:
        self.labels: list[str] = []
        self.ids: dict[str, int] = {}
        self._hashes: list[int] = []
        self._hash_array: I64 = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def intern(self, labels: list[str]) -> I64:
        """Ids of `labels` (adding new ones). Known labels are looked up in one C-level pass."""
        out = np.fromiter(map(self.ids.get, labels, repeat(-1)), dtype=np.int64, count=len(labels))
        missing = np.flatnonzero(out < 0)
        if missing.size:
            ids = self.ids
            for i in missing.tolist():
                label = labels[i]
                lid = ids.get(label)
                if lid is None:
                    lid = ids[label] = len(self.labels)
                    self.labels.append(label)
                out[i] = lid
        return out

    def one(self, label: str) -> int:
        lid = self.ids.get(label)
        return int(self.intern([label])[0]) if lid is None else lid

    def hashes(self) -> I64:
        """Cap hash of every id (computed once per value; the array is rebuilt only when ids are added)."""
        if self._hash_array.size < len(self.labels):
            self._hashes.extend(cap_hash(v) for v in self.labels[len(self._hashes):])
            self._hash_array = np.asarray(self._hashes, dtype=np.int64)
        return self._hash_array

    def compact(self, live: I64) -> I64 | None:
        """Keep only the ids in `live`; returns old id -> new id (-1 dead), or None if kept as is."""
        if len(self.labels) < 65536 or live.size * 2 >= len(self.labels):
            return None
        remap = np.full(len(self.labels), -1, dtype=np.int64)
        remap[live] = np.arange(live.size, dtype=np.int64)
        self.labels = [self.labels[i] for i in live.tolist()]
        self.ids = {v: i for i, v in enumerate(self.labels)}
        self._hashes = []
        self._hash_array = np.empty(0, dtype=np.int64)
        return remap


class StateTable:
    """Every state of one (granularity, metric, dimension) of one partition."""

    def __init__(self, granularity: str, metric: str, dimension: str, with_digest: bool) -> None:
        self.granularity = granularity
        self.metric = metric
        self.dimension = dimension
        self.with_digest = with_digest
        self.keys: I64 = np.empty(0, dtype=np.int64)  # sorted composite keys
        self.slots: I64 = np.empty(0, dtype=np.int64)  # slot of each sorted key
        cap = 16
        self.slot_key: I64 = np.full(cap, -1, dtype=np.int64)
        self.count: I64 = np.zeros(cap, dtype=np.int64)
        self.total: F64 = np.zeros(cap)
        self.lo: F64 = np.full(cap, math.inf)
        self.hi: F64 = np.full(cap, -math.inf)
        self.applied: I64 = np.full(cap, -1, dtype=np.int64)
        self.dirty: BOOL = np.zeros(cap, dtype=bool)
        self._samples: list[Any] = [None] * cap
        # slot -> [value count, arrays...]: values waiting to go into that slot's digest
        self._pending: dict[int, list[Any]] = {}
        self.used = 0  # slots handed out so far (free ones are reused first)
        self.free: list[int] = []
        self.any_dirty = False

    def __len__(self) -> int:
        return int(self.keys.size)

    # ------------------------------------------------------------------ samples

    @property
    def digests(self) -> list[Any]:
        """Percentile sample per slot (None, exact values, or a t-digest), complete."""
        if self._pending:
            self.settle()
        return self._samples

    def live_samples(self) -> list[Any]:
        """The sample list as is, values given to `defer` not yet applied (for the fold,
        which only replaces arrays and merges into digests; anyone else reads `digests`)."""
        return self._samples

    def defer(self, slot: int, values: F64) -> None:
        """Add `values` (an array nobody changes) to the t-digest in `slot`, later.

        Why: `batch_update` costs time in proportion to the digest's size, not only to the
        values added, so a big digest fed a few values per batch (a day or week state of
        a busy user) spent far more on the call than on the values. Values are collected
        per slot and applied in one call once `PENDING_VALUES` are waiting, or as soon as
        anyone reads `digests`.
        """
        held = self._pending.get(slot)
        if held is None:
            if values.size >= PENDING_VALUES:
                feed(self._samples[slot], values)
            else:
                self._pending[slot] = [values.size, values]
            return
        held[0] += values.size
        held.append(values)
        if held[0] >= PENDING_VALUES:
            del self._pending[slot]
            feed(self._samples[slot], np.concatenate(held[1:]))

    def settle(self, slots: I64 | None = None) -> None:
        """Apply the deferred values (of `slots`, or all)."""
        if not self._pending:
            return
        if slots is None:
            pending, self._pending = self._pending, {}
            items = pending.items()
        else:
            items = [(s, self._pending.pop(s)) for s in slots.tolist() if s in self._pending]
        samples = self._samples
        for slot, held in items:
            feed(samples[slot], held[1] if len(held) == 2 else np.concatenate(held[1:]))

    # ------------------------------------------------------------------ addressing

    def lookup(self, q: I64) -> I64:
        """Slot of each composite key, -1 where absent."""
        if self.keys.size == 0 or q.size == 0:
            return np.full(q.size, -1, dtype=np.int64)
        pos = np.searchsorted(self.keys, q)
        pos_c = np.minimum(pos, self.keys.size - 1)
        hit = self.keys[pos_c] == q
        return np.where(hit, self.slots[pos_c], -1)

    def ensure(self, q: I64) -> tuple[I64, BOOL]:
        """Slots of the (distinct) composite keys `q`, creating missing ones; and which are new."""
        slots = self.lookup(q)
        new = slots < 0
        if new.any():
            slots[new] = self._insert(q[new])
        return slots, new

    def _insert(self, q: I64) -> I64:
        n = q.size
        take = min(n, len(self.free))
        fresh = np.empty(n, dtype=np.int64)
        if take:
            fresh[:take] = self.free[-take:]
            del self.free[-take:]
        if n > take:
            need = n - take
            self._grow(self.used + need)
            fresh[take:] = np.arange(self.used, self.used + need)
            self.used += need
        self.slot_key[fresh] = q
        # merge the (few) new keys into the sorted ones: a move of the arrays, not a sort of them
        order = np.argsort(q, kind="stable")
        qs = q[order]
        pos = np.searchsorted(self.keys, qs)
        self.keys, self.slots = np.insert(self.keys, pos, qs), np.insert(self.slots, pos, fresh[order])
        return fresh

    def _grow(self, size: int) -> None:
        cap = self.count.size
        if size <= cap:
            return
        new = max(size, cap * 2)
        extra = new - cap
        self.slot_key = np.concatenate((self.slot_key, np.full(extra, -1, dtype=np.int64)))
        self.count = np.concatenate((self.count, np.zeros(extra, dtype=np.int64)))
        self.total = np.concatenate((self.total, np.zeros(extra)))
        self.lo = np.concatenate((self.lo, np.full(extra, math.inf)))
        self.hi = np.concatenate((self.hi, np.full(extra, -math.inf)))
        self.applied = np.concatenate((self.applied, np.full(extra, -1, dtype=np.int64)))
        self.dirty = np.concatenate((self.dirty, np.zeros(extra, dtype=bool)))
        self._samples.extend([None] * extra)

    def delete(self, q: I64) -> None:
        """Remove the states of composite keys `q` (absent ones are ignored)."""
        if self.keys.size == 0 or q.size == 0:
            return
        pos = np.minimum(np.searchsorted(self.keys, q), self.keys.size - 1)
        found = self.keys[pos] == q
        if not found.any():
            return
        pos = np.unique(pos[found])  # positions in the sorted keys, each once
        self._release(self.slots[pos])
        self.keys, self.slots = np.delete(self.keys, pos), np.delete(self.slots, pos)

    def _release(self, slots: I64) -> None:
        self.slot_key[slots] = -1
        self.count[slots] = 0
        self.total[slots] = 0.0
        self.lo[slots] = math.inf
        self.hi[slots] = -math.inf
        self.applied[slots] = -1
        self.dirty[slots] = False
        samples, pending = self._samples, self._pending
        for s in slots.tolist():
            samples[s] = None
            if pending:
                pending.pop(s, None)
        self.free.extend(slots.tolist())

    def bucket_range(self, bucket_start: int) -> slice:
        """Positions (in the sorted arrays) of one bucket's keys."""
        lo = composite(bucket_start, 0)
        a, b = np.searchsorted(self.keys, [lo, lo + LABEL_SPACE])
        return slice(int(a), int(b))

    def evict_bucket(self, bucket_start: int) -> int:
        rng = self.bucket_range(bucket_start)
        n = rng.stop - rng.start
        if n:
            self._release(self.slots[rng])
            self.keys = np.concatenate((self.keys[: rng.start], self.keys[rng.stop:]))
            self.slots = np.concatenate((self.slots[: rng.start], self.slots[rng.stop:]))
        return n

    def buckets(self) -> I64:
        """Distinct bucket starts held."""
        return sorted_unique(bucket_of(self.keys)) if self.keys.size else np.empty(0, dtype=np.int64)

    def relabel(self, remap: I64) -> None:
        """Apply an `Interner.compact` renumbering to every key."""
        if self.keys.size == 0:
            return
        hours = self.keys >> LABEL_BITS
        keys = hours * LABEL_SPACE + remap[self.keys & LABEL_MASK]
        order = np.argsort(keys, kind="stable")
        self.keys, self.slots = keys[order], self.slots[order]
        self.slot_key[self.slots] = self.keys

    # ------------------------------------------------------------------ updating

    def add(self, slots: I64, count: I64, total: F64, lo: F64, hi: F64, top: I64) -> None:
        """Fold group aggregates into distinct slots."""
        self.count[slots] += count
        self.total[slots] += total
        self.lo[slots] = np.minimum(self.lo[slots], lo)
        self.hi[slots] = np.maximum(self.hi[slots], hi)
        self.applied[slots] = np.maximum(self.applied[slots], top)
        self.dirty[slots] = True
        self.any_dirty = True

    def take_dirty(self) -> I64:
        """Slots changed since the last call (and clear the marks)."""
        if not self.any_dirty:
            return np.empty(0, dtype=np.int64)
        out = np.flatnonzero(self.dirty[: self.used])
        self.dirty[out] = False
        self.any_dirty = False
        return out

    def mark_dirty(self, slots: I64) -> None:
        if slots.size:
            self.dirty[slots] = True
            self.any_dirty = True
