"""Every state of one source partition: one `StateTable` per (granularity, metric, dimension).

Key = (granularity, bucket_start, metric, dimension_type, dimension_value) is the
outside view (flush, replay, tests); inside, states live in columns (`state_table`), and
`AggState` objects are made only when someone asks for a key (`get`, `bucket_states`,
`states`). Changes are tracked as dirty marks in the tables and turned into keys once per
flush (`take_changes`), not once per batch.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import compress
from operator import attrgetter

import numpy as np
from fastdigest import TDigest

from stream_agg.core.aggstate import (
    DIGEST_SAMPLE,
    HEADER_DTYPE,
    NO_SAMPLE,
    STATE_VERSION,
    VALUES_SAMPLE,
    AggState,
    TableBlob,
    encode_bucket_tables,
    state_fields,
)
from stream_agg.core.registry import OTHER, Registry
from stream_agg.core.sample import SAMPLE_KIND, to_digest
from stream_agg.core.state_table import (
    F64,
    I64,
    LABEL_MASK,
    LABEL_SPACE,
    Interner,
    StateTable,
    bucket_of,
    composite,
    sorted_unique,
)

Key = tuple[str, int, str, str, str]
BucketId = tuple[str, int]
TableId = tuple[str, str, str]  # (granularity, metric, dimension)
CapScope = tuple[str, int, str, str]  # (granularity, bucket_start, metric, dimension_type)
BlobPart = dict[TableId, I64] | None  # a delta's keys per table, or None: the whole bucket
BucketSlice = tuple[str, str, StateTable, slice]  # (metric, dimension, table, positions of one bucket's keys)

# Deltas over a stored bucket blob (`blob_plan`): at most this many are stacked before the
# whole blob is written again, and only when at most 1/DELTA_SHARE of the states changed.
MAX_DELTAS = 8
DELTA_SHARE = 4


@dataclass
class Changes:
    """Changes of one partition taken for a flush: arrays, so 100,000 keys cost no tuples.

    `tables`: sorted composite keys (this partition's value ids) of states new or changed;
    `removed`: keys whose state was pushed into `__other__` (by a cap) and is gone.
    """

    tables: dict[TableId, I64]
    removed: set[Key]

    def __bool__(self) -> bool:
        return bool(self.tables) or bool(self.removed)

    def buckets(self) -> set[BucketId]:
        out = {(k[0], k[1]) for k in self.removed}
        for (g, _, _), comps in self.tables.items():
            out.update((g, b) for b in sorted_unique(bucket_of(comps)).tolist())
        return out


@dataclass
class PartitionState:
    """The states of one partition, plus the kept value sets of capped dimensions."""

    registry: Registry
    tables: dict[TableId, StateTable] = field(default_factory=dict)
    interners: dict[str, Interner] = field(default_factory=dict)
    kept: dict[CapScope, I64] = field(default_factory=dict)  # label ids kept under the cap
    resident: set[BucketId] = field(default_factory=set)  # buckets loaded / folded into
    removed: set[Key] = field(default_factory=set)  # pushed into __other__ since take_changes
    max_applied: int = -1  # highest applied_offset of any state here

    def __post_init__(self) -> None:
        self._digest = {m.name: m.digest for m in self.registry.metrics}

    # ------------------------------------------------------------------ structure

    def interner(self, dimension: str) -> Interner:
        it = self.interners.get(dimension)
        if it is None:
            it = self.interners[dimension] = Interner()
        return it

    def table(self, granularity: str, metric: str, dimension: str) -> StateTable:
        tid = (granularity, metric, dimension)
        t = self.tables.get(tid)
        if t is None:
            t = self.tables[tid] = StateTable(granularity, metric, dimension, self._digest.get(metric, False))
        return t

    @property
    def buckets(self) -> set[BucketId]:
        return set(self.resident)

    # ------------------------------------------------------------------ keys <-> states

    def _locate(self, key: Key) -> tuple[StateTable, int] | None:
        t = self.tables.get((key[0], key[2], key[3]))
        it = self.interners.get(key[3])
        if t is None or it is None:
            return None
        lid = it.ids.get(key[4])
        if lid is None:
            return None
        slot = int(t.lookup(np.array([composite(key[1], lid)], dtype=np.int64))[0])
        return None if slot < 0 else (t, slot)

    @staticmethod
    def _state(t: StateTable, slot: int) -> AggState:
        return AggState(int(t.count[slot]), float(t.total[slot]), float(t.lo[slot]), float(t.hi[slot]),
                        to_digest(t.digests[slot]), int(t.applied[slot]))

    def held(self, keys: Iterable[Key]) -> set[Key]:
        """Those of `keys` with a state here: one `lookup` per table, and no AggState made
        (the flush asks this of every key a partition pushed into __other__, thousands per
        flush behind a backlog; `get` per key was half of taking the snapshot)."""
        by_table: dict[TableId, list[Key]] = {}
        for k in keys:
            by_table.setdefault((k[0], k[2], k[3]), []).append(k)
        out: set[Key] = set()
        for tid, ks in by_table.items():
            t, it = self.tables.get(tid), self.interners.get(tid[2])
            if t is None or it is None:
                continue
            lids = np.fromiter((it.ids.get(k[4], -1) for k in ks), dtype=np.int64, count=len(ks))
            comps = composite(np.fromiter((k[1] for k in ks), dtype=np.int64, count=len(ks)), np.maximum(lids, 0))
            hit = (lids >= 0) & (t.lookup(comps) >= 0)
            out.update(compress(ks, hit.tolist()))
        return out

    def get(self, key: Key) -> AggState | None:
        """The state of `key` (a new AggState sharing the live digest: copy before changing it)."""
        found = self._locate(key)
        return None if found is None else self._state(*found)

    def load_bucket(self, bucket: BucketId, items: list[tuple[str, str, str, bytes]]) -> int:
        """Install a stored bucket blob's states (`decode_bucket_items`) in bulk; returns states loaded.

        The bucket becomes resident even when `items` is empty (nothing stored yet).
        """
        g, b = bucket
        self.resident.add(bucket)
        by_table: dict[tuple[str, str], list[tuple[str, tuple[int, float, float, float, int, object]]]] = {}
        for m, d, v, data in items:
            by_table.setdefault((m, d), []).append((v, state_fields(data)))
        for (metric, dim), rows in by_table.items():
            t = self.table(g, metric, dim)
            lids = self.interner(dim).intern([v for v, _ in rows])
            q = composite(b, lids)
            t.delete(q)
            slots, _ = t.ensure(q)
            fields = list(zip(*(f for _, f in rows), strict=True))
            t.count[slots] = np.asarray(fields[0], dtype=np.int64)
            t.total[slots] = np.asarray(fields[1], dtype=np.float64)
            t.lo[slots] = np.asarray(fields[2], dtype=np.float64)
            t.hi[slots] = np.asarray(fields[3], dtype=np.float64)
            applied = np.asarray(fields[4], dtype=np.int64)
            t.applied[slots] = applied
            for slot, sample in zip(slots.tolist(), fields[5], strict=True):
                t.digests[slot] = sample
            self.max_applied = max(self.max_applied, int(applied.max()))
            if self.registry.cap(dim) is not None:
                other = self.interner(dim).ids.get(OTHER)
                mine = lids if other is None else lids[lids != other]
                scope: CapScope = (g, b, metric, dim)
                have = self.kept.get(scope)
                self.kept[scope] = mine if have is None else sorted_unique(np.concatenate((have, mine)))
        return len(items)

    def _keys(self, t: StateTable, comps: I64) -> list[Key]:
        labels = self.interners[t.dimension].labels
        g, m, d = t.granularity, t.metric, t.dimension
        return [(g, b, m, d, labels[lid]) for b, lid in
                zip(bucket_of(comps).tolist(), (comps & LABEL_MASK).tolist(), strict=True)]

    def _bucket_tables(self, bucket: BucketId) -> Iterator[tuple[str, str, StateTable, slice]]:
        """(metric, dimension, table, positions) of every table holding keys of `bucket`."""
        g, b = bucket
        for (tg, metric, dim), t in self.tables.items():
            if tg == g:
                rng = t.bucket_range(b)
                if rng.start != rng.stop:
                    yield metric, dim, t, rng

    def bucket_slices(self, buckets: Collection[BucketId]) -> dict[BucketId, list[BucketSlice]]:
        """`_bucket_tables` of many buckets at once: two `searchsorted` per table for all of
        them, not two per table and bucket (a flush encodes hundreds of buckets). Positions:
        valid until a key is added to or removed from a table (the next fold or eviction)."""
        by_g: dict[str, list[int]] = {}
        for g, b in dict.fromkeys(buckets):  # each once: a bucket asked twice must not list its keys twice
            by_g.setdefault(g, []).append(b)
        out: dict[BucketId, list[BucketSlice]] = {bucket: [] for bucket in buckets}
        for (g, metric, dim), t in self.tables.items():
            starts = by_g.get(g)
            if not starts or not t.keys.size:
                continue
            lo = composite(np.asarray(starts, dtype=np.int64), 0)
            cut = np.searchsorted(t.keys, np.concatenate((lo, lo + LABEL_SPACE))).tolist()
            k = len(starts)
            for i, b in enumerate(starts):
                if cut[i + k] > cut[i]:
                    out[(g, b)].append((metric, dim, t, slice(cut[i], cut[i + k])))
        return out

    def bucket_states(self, bucket: BucketId) -> Iterator[tuple[str, str, str, AggState]]:
        """(metric, dimension, value, state) of every key of one bucket (states share digests)."""
        for metric, dim, t, rng in self._bucket_tables(bucket):
            labels = self.interners[dim].labels
            for comp, slot in zip(t.keys[rng].tolist(), t.slots[rng].tolist(), strict=True):
                yield metric, dim, labels[comp & LABEL_MASK], self._state(t, slot)

    def encode_bucket(self, bucket: BucketId, slices: list[BucketSlice] | None = None) -> tuple[bytes, int]:
        """The bucket's blob (as `aggstate.encode_bucket` writes it) and its number of states
        (`slices`: the bucket's entry of `bucket_slices`, when the caller has it)."""
        tables = [self._table_blob(metric, dim, t, t.keys[rng], t.slots[rng])
                  for metric, dim, t, rng in (self._bucket_tables(bucket) if slices is None else slices)]
        return encode_bucket_tables(tables), sum(len(tb[2]) for tb in tables)

    def encode_buckets(self, buckets: Collection[BucketId]) -> dict[BucketId, tuple[bytes, int]]:
        """`encode_bucket` of many buckets: each table's states of all of them are packed at
        once and then cut per bucket. A backlog's flush encodes hundreds of buckets of ~20
        tables each; per (bucket, table), the fixed cost of the numpy calls was most of it."""
        by_g: dict[str, list[int]] = {}
        for g, b in dict.fromkeys(buckets):  # each once: a bucket asked twice must not list its keys twice
            by_g.setdefault(g, []).append(b)
        parts: dict[BucketId, list[TableBlob]] = {bucket: [] for bucket in buckets}
        size = HEADER_DTYPE.itemsize
        for (g, metric, dim), t in self.tables.items():
            starts = by_g.get(g)
            if not starts or not t.keys.size:
                continue
            lo = composite(np.asarray(starts, dtype=np.int64), 0)
            cut = np.searchsorted(t.keys, np.concatenate((lo, lo + LABEL_SPACE)))
            k = len(starts)
            lengths = cut[k:] - cut[:k]
            if not lengths.any():
                continue
            ends = np.cumsum(lengths)
            begins = ends - lengths
            pos = np.repeat(cut[:k] - begins, lengths) + np.arange(int(ends[-1]), dtype=np.int64)
            names, heads_bytes, sizes, samples_bytes = self._table_parts(dim, t, t.keys[pos], t.slots[pos])
            byte_end = np.concatenate(([0], np.cumsum(sizes))).tolist()
            # views, not copies: each table's bytes are held once until its buckets' blobs are made
            heads, samples = memoryview(heads_bytes), memoryview(samples_bytes)
            raw_sizes = memoryview(sizes.astype("<i8", copy=False).tobytes())
            for b, i, j in zip(starts, begins.tolist(), ends.tolist(), strict=True):
                if j > i:
                    parts[(g, b)].append((metric, dim, names[i:j], heads[i * size:j * size], raw_sizes[i * 8:j * 8],
                                          samples[byte_end[i]:byte_end[j]]))
        out: dict[BucketId, tuple[bytes, int]] = {}
        for bucket in list(parts):
            tables = parts.pop(bucket)  # its slices freed as its blob is made
            out[bucket] = (encode_bucket_tables(tables), sum(len(tb[2]) for tb in tables))
        return out

    def blob_plan(self, changes: Changes, deltas: Mapping[BucketId, int]) -> list[tuple[BucketId, BlobPart]]:
        """For each changed bucket, what its flush writes: None for the whole blob, or the
        changed keys per table for a delta over the stored one.

        `deltas`: the buckets whose whole blob is stored, with the number of deltas over
        it. A delta only where that blob exists, fewer than MAX_DELTAS are stacked on it
        (readers apply them all; the next whole blob replaces them), at most 1/DELTA_SHARE
        of the bucket's states changed, and none was removed (a delta cannot say "gone").
        """
        buckets = sorted(changes.buckets())
        removed = {(k[0], k[1]) for k in changes.removed}
        candidates = [b for b in buckets if b not in removed and deltas.get(b, MAX_DELTAS) < MAX_DELTAS]
        if not candidates:
            return [(b, None) for b in buckets]
        sizes = self.bucket_sizes(candidates)
        subsets: dict[BucketId, dict[TableId, I64]] = {b: {} for b in candidates}
        by_g: dict[str, list[int]] = {}
        for g, b in candidates:
            by_g.setdefault(g, []).append(b)
        for tid, comps in changes.tables.items():
            starts = by_g.get(tid[0])
            if not starts:
                continue
            lo = composite(np.asarray(starts, dtype=np.int64), 0)
            cut = np.searchsorted(comps, np.concatenate((lo, lo + LABEL_SPACE)))
            for i, b in enumerate(starts):
                a, z = int(cut[i]), int(cut[i + len(starts)])
                if z > a:
                    subsets[(tid[0], b)][tid] = comps[a:z]
        out: list[tuple[BucketId, BlobPart]] = []
        for b in buckets:
            sub = subsets.get(b)
            n = sum(int(c.size) for c in sub.values()) if sub is not None else 0
            out.append((b, sub if sub is not None and n * DELTA_SHARE <= sizes[b] else None))
        return out

    def encode_keys(self, tables: dict[TableId, I64]) -> tuple[bytes, int]:
        """A blob (same format) of just these states: composite keys per table, all of one
        bucket and all present (a flush's changed keys: a delta over the stored blob)."""
        out: list[TableBlob] = []
        for (g, metric, dim), comps in tables.items():
            t = self.tables[(g, metric, dim)]
            slots = t.lookup(comps)
            if (slots < 0).any():
                raise KeyError(f"no state for {int((slots < 0).sum())} of the keys asked for in {g}/{metric}/{dim}")
            out.append(self._table_blob(metric, dim, t, comps, slots))
        return encode_bucket_tables(out), sum(len(tb[2]) for tb in out)

    def _table_blob(self, metric: str, dim: str, t: StateTable, comps: I64, slots: I64) -> TableBlob:
        names, heads, sizes, samples = self._table_parts(dim, t, comps, slots)
        return metric, dim, names, heads, sizes.astype("<i8", copy=False).tobytes(), samples

    def _table_parts(self, dim: str, t: StateTable, comps: I64, slots: I64) -> tuple[list[str], bytes, I64, bytes]:
        """These states of table `t` as (values, headers, sample sizes, samples): a version 2
        blob's table (`aggstate.TableBlob`), the sizes still an array.

        The headers are packed for the whole table at once, and the samples' bytes made by
        C-level maps and joined (small samples written as their values), so no AggState or
        digest is made, and no Python-level loop runs, per key (but the per-array conversion
        of values that are not little-endian float64 already)."""
        labels = self.interners[dim].labels
        names = list(map(labels.__getitem__, (comps & LABEL_MASK).tolist()))
        n = slots.size
        rec = np.empty(n, dtype=HEADER_DTYPE)
        rec["version"] = STATE_VERSION
        rec["count"], rec["sum"], rec["min"], rec["max"] = t.count[slots], t.total[slots], t.lo[slots], t.hi[slots]
        rec["applied"] = t.applied[slots]
        if not t.with_digest:
            rec["kind"] = NO_SAMPLE
            return names, rec.tobytes(), np.zeros(n, dtype=np.int64), b""
        samples = list(map(t.digests.__getitem__, slots.tolist()))  # `digests` settles pending values once
        kinds = np.fromiter(map(SAMPLE_KIND.__getitem__, map(type, samples)), dtype=np.uint8, count=n)
        rec["kind"] = kinds
        tails = np.full(n, b"", dtype=object)
        for kind, to_bytes in ((VALUES_SAMPLE, _values_bytes), (DIGEST_SAMPLE, _digest_bytes)):
            at = np.flatnonzero(kinds == kind)
            if at.size:
                tails[at] = to_bytes(list(map(samples.__getitem__, at.tolist())))
        parts = tails.tolist()
        return names, rec.tobytes(), np.fromiter(map(len, parts), dtype=np.int64, count=n), b"".join(parts)

    @property
    def states(self) -> dict[Key, AggState]:
        """Every state as a dict (for tests, replay and tools; the fold never uses this)."""
        out: dict[Key, AggState] = {}
        for t in self.tables.values():
            for key, slot in zip(self._keys(t, t.keys), t.slots.tolist(), strict=True):
                out[key] = self._state(t, slot)
        return out

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def bucket_sizes(self, buckets: Collection[BucketId]) -> dict[BucketId, int]:
        """Number of states held for each of `buckets` (`bucket_slices`: no scan)."""
        return {b: sum(rng.stop - rng.start for *_, rng in slices) for b, slices in self.bucket_slices(buckets).items()}

    # ------------------------------------------------------------------ changes

    def take_changes(self) -> Changes:
        """What changed since the last call (composite keys per table, removed keys); clears the marks."""
        tables: dict[TableId, I64] = {}
        for tid, t in self.tables.items():
            slots = t.take_dirty()
            if slots.size:
                tables[tid] = np.sort(t.slot_key[slots])
        removed = self.removed - self.held(self.removed)  # else re-added: in `tables`
        self.removed = set()
        return Changes(tables, removed)

    def restore_changes(self, changes: Changes) -> None:
        """Put changes taken by `take_changes` back (a flush that failed)."""
        for tid, comps in changes.tables.items():
            t = self.tables.get(tid)
            if t is not None:
                slots = t.lookup(comps)
                t.mark_dirty(slots[slots >= 0])
        self.removed |= changes.removed - self.held(changes.removed)

    def keys_of(self, changes: Changes, skip: Collection[BucketId] = ()) -> set[Key]:
        """The changed and removed keys of `changes` as Keys, but those of buckets in `skip`."""
        out: set[Key] = set()
        for tid, comps in changes.tables.items():
            if skip:
                comps = comps[~np.isin(bucket_of(comps), [b for g, b in skip if g == tid[0]])]
            if comps.size:
                out.update(self._keys(self.tables[tid], comps))
        out.update(k for k in changes.removed if (k[0], k[1]) not in skip)
        return out

    def has_changes(self) -> bool:
        return bool(self.removed) or any(t.any_dirty for t in self.tables.values())

    def dirty_buckets(self) -> set[BucketId]:
        """Buckets with changes not yet taken."""
        out = {(k[0], k[1]) for k in self.removed}
        for t in self.tables.values():
            if t.any_dirty:
                slots = np.flatnonzero(t.dirty[: t.used])
                out.update((t.granularity, int(b)) for b in sorted_unique(bucket_of(t.slot_key[slots])).tolist())
        return out

    # ------------------------------------------------------------------ eviction

    def evict_bucket(self, bucket: BucketId) -> int:
        """Drop a bucket from memory (after its final flush); returns states dropped."""
        g, b = bucket
        self.resident.discard(bucket)
        dropped = sum(t.evict_bucket(b) for (tg, _, _), t in self.tables.items() if tg == g)
        for scope in [s for s in self.kept if s[:2] == bucket]:
            del self.kept[scope]
        if not self.resident:  # nothing held: every value id is dead
            self.tables.clear()
            self.interners.clear()
            self.kept.clear()
        else:
            self._compact()
        return dropped

    def _compact(self) -> None:
        """Renumber value ids of dimensions whose interner holds mostly dead values."""
        for dim, it in self.interners.items():
            if len(it) < 65536:
                continue
            tables = [t for (_, _, d), t in self.tables.items() if d == dim]
            live_parts = [t.keys & LABEL_MASK for t in tables]
            live_parts += [v for s, v in self.kept.items() if s[3] == dim]
            live = sorted_unique(np.concatenate(live_parts)) if live_parts else np.empty(0, dtype=np.int64)
            remap = it.compact(live)
            if remap is None:
                continue
            for t in tables:
                t.relabel(remap)
            for s in [s for s in self.kept if s[3] == dim]:
                self.kept[s] = remap[self.kept[s]]


def _values_bytes(arrays: list[F64]) -> list[bytes]:
    """Each array's float64 little-endian bytes (`tobytes` mapped in C when they are so already)."""
    if _LITTLE and set(map(attrgetter("dtype"), arrays)) == {_F8}:
        return list(map(np.ndarray.tobytes, arrays))
    return [a.astype("<f8", copy=False).tobytes() for a in arrays]


def _digest_bytes(digests: list[TDigest]) -> list[bytes]:
    return list(map(TDigest.to_bytes, digests))


_LITTLE = sys.byteorder == "little"
_F8 = np.dtype(np.float64)
