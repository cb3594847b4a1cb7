"""AggState: count / sum / min / max (+ avg) and an optional t-digest, mergeable.

The digest is fastdigest's Rust t-digest: ~80 ns per value through `batch_update`, exact
(equal to PostgreSQL's PERCENTILE_CONT) while it holds <= `MAX_CENTROIDS` values, and
cheap to merge, so partitions, late data and hour -> day -> week roll-ups all merge.
"""

from __future__ import annotations

import math
import struct
import threading
import zlib
from collections.abc import Iterable
from itertools import accumulate, repeat

import msgspec
import numpy as np
import numpy.typing as npt
import zstandard
from fastdigest import TDigest, merge_all

# 2,000 centroids: exact (= PERCENTILE_CONT) up to 2,000 values per key, and, measured on the
# synthetic workload folded the way the worker does (4 partitions, 200-1,000-event batches,
# day/week by merging), worst rank error 0.05% above that, against 0.105% at 1,000
# centroids, which missed the 0.1% target. Cost: up to ~32 KB per stored digest.
MAX_CENTROIDS = 2000
STATE_VERSION = 1
DIGEST_VERSION = 1
VALUES_DIGEST_VERSION = 2  # digest column holding the exact values of a small sample
VALUES_DIGEST_PREFIX = bytes((VALUES_DIGEST_VERSION,))
_HEADER = struct.Struct("<BqdddqB")  # version, count, sum, min, max, applied_offset, sample kind
# The same header as a numpy record, so a whole table of states packs in one call.
HEADER_DTYPE = np.dtype([("version", "u1"), ("count", "<i8"), ("sum", "<f8"), ("min", "<f8"), ("max", "<f8"),
                         ("applied", "<i8"), ("kind", "u1")])
# What follows the header: nothing, a fastdigest t-digest, or the exact values (float64 LE;
# the stream keeps small samples as values, and a digest of them would be bigger).
NO_SAMPLE, DIGEST_SAMPLE, VALUES_SAMPLE = 0, 1, 2


class UnknownVersionError(ValueError):
    """Serialized bytes were written by a format this code does not know."""


def new_digest() -> TDigest:
    return TDigest(max_centroids=MAX_CENTROIDS)


def digest_from_values(values: npt.NDArray[np.float64]) -> TDigest:
    digest = new_digest()
    digest.batch_update(values)
    return digest


def digest_to_bytes(digest: TDigest) -> bytes:
    """Versioned digest bytes, as stored in `metrics_aggregates.digest`."""
    return bytes((DIGEST_VERSION,)) + digest.to_bytes()


def values_to_digest_bytes(values: npt.NDArray[np.float64]) -> bytes:
    """A small sample stored exactly: version byte 2 + its values (float64 LE).

    Most rows (per user and hour) hold a handful of values; their values are smaller than a
    serialized t-digest and need no digest to be built. Readers get a digest either way.
    """
    return VALUES_DIGEST_PREFIX + np.asarray(values, dtype="<f8").tobytes()


def digest_from_bytes(data: bytes) -> TDigest:
    version = data[0] if data else None
    if version == DIGEST_VERSION:
        return TDigest.from_bytes(bytes(data[1:]))
    if version == VALUES_DIGEST_VERSION and (len(data) - 1) % 8 == 0:
        values = np.frombuffer(data, dtype="<f8", offset=1)
        return digest_from_values(values) if values.size else new_digest()
    raise UnknownVersionError(f"digest format version {version} is not {DIGEST_VERSION} or "
                              f"{VALUES_DIGEST_VERSION} (or its length is wrong)")


def merge_digests(digests: list[TDigest]) -> TDigest:
    """Merge many digests at once (faster than pairwise)."""
    if len(digests) == 1:
        return digests[0].copy()
    merged = merge_all(digests)
    if merged.max_centroids != MAX_CENTROIDS:
        merged = merge_all([merged], max_centroids=MAX_CENTROIDS)
    return merged


class AggState:
    """Running aggregate for one key. `applied_offset` = highest source offset folded in."""

    __slots__ = ("count", "sum", "min", "max", "digest", "applied_offset")

    def __init__(
        self,
        count: int = 0,
        total: float = 0.0,
        minimum: float = math.inf,
        maximum: float = -math.inf,
        digest: TDigest | None = None,
        applied_offset: int = -1,
    ) -> None:
        self.count = count
        self.sum = total
        self.min = minimum
        self.max = maximum
        self.digest = digest
        self.applied_offset = applied_offset

    @classmethod
    def empty(cls, with_digest: bool) -> AggState:
        return cls(digest=new_digest() if with_digest else None)

    @classmethod
    def from_values(
        cls, values: Iterable[float] | npt.NDArray[np.float64], with_digest: bool,
        applied_offset: int = -1,
    ) -> AggState:
        arr = np.asarray(values, dtype=np.float64)
        if arr.size == 0:
            return cls(digest=new_digest() if with_digest else None, applied_offset=applied_offset)
        return cls(
            int(arr.size), float(arr.sum()), float(arr.min()), float(arr.max()),
            digest_from_values(arr) if with_digest else None, applied_offset,
        )

    @property
    def avg(self) -> float | None:
        return self.sum / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """q-th quantile (0..1), None when empty or when no digest is kept."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        if self.count == 0 or self.digest is None or self.digest.is_empty():
            return None
        return float(self.digest.quantile(q))

    def merge_in(self, other: AggState) -> AggState:
        """Fold `other` into self (in place) and return self."""
        if other.count:
            self.count += other.count
            self.sum += other.sum
            self.min = min(self.min, other.min)
            self.max = max(self.max, other.max)
            if other.digest is not None:
                if self.digest is None or self.digest.is_empty():
                    self.digest = other.digest.copy()
                else:
                    self.digest.merge_inplace(other.digest)
        self.applied_offset = max(self.applied_offset, other.applied_offset)
        return self

    def merged(self, other: AggState) -> AggState:
        """A new state equal to self + other (neither input changes)."""
        return self.copy().merge_in(other)

    def copy(self) -> AggState:
        return AggState(self.count, self.sum, self.min, self.max,
                        None if self.digest is None else self.digest.copy(), self.applied_offset)

    @staticmethod
    def merge_many(states: list[AggState], with_digest: bool) -> AggState:
        """Merge many states; digests through one `merge_all` call."""
        out = AggState(digest=None)
        digests = []
        for s in states:
            if s.count:
                out.count += s.count
                out.sum += s.sum
                out.min = min(out.min, s.min)
                out.max = max(out.max, s.max)
                if s.digest is not None and not s.digest.is_empty():
                    digests.append(s.digest)
            out.applied_offset = max(out.applied_offset, s.applied_offset)
        if with_digest:
            out.digest = merge_digests(digests) if digests else new_digest()
        return out

    def to_bytes(self) -> bytes:
        """Versioned, compact binary form: 1 version byte + fixed header + digest bytes."""
        digest = b"" if self.digest is None else self.digest.to_bytes()
        head = _HEADER.pack(STATE_VERSION, self.count, self.sum, self.min, self.max,
                            self.applied_offset, 0 if self.digest is None else 1)
        return head + digest

    @classmethod
    def from_bytes(cls, data: bytes) -> AggState:
        if not data or data[0] != STATE_VERSION:
            found = data[0] if data else None
            raise UnknownVersionError(f"AggState format version {found} is not {STATE_VERSION}")
        _, count, total, lo, hi, applied, kind = _HEADER.unpack_from(data)
        if kind == NO_SAMPLE:
            digest = None
        elif kind == DIGEST_SAMPLE:
            digest = TDigest.from_bytes(bytes(data[_HEADER.size:]))
        elif kind == VALUES_SAMPLE:
            values = np.frombuffer(data, dtype="<f8", offset=_HEADER.size)
            digest = digest_from_values(values) if values.size else new_digest()
        else:
            raise UnknownVersionError(f"AggState sample kind {kind} is unknown")
        return cls(count, total, lo, hi, digest, applied)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AggState):
            return NotImplemented
        same_digest = (self.digest is None) == (other.digest is None) and (
            self.digest is None or self.digest.to_bytes() == other.digest.to_bytes()  # type: ignore[union-attr]
        )
        return (self.count, self.sum, self.min, self.max, self.applied_offset) == (
            other.count, other.sum, other.min, other.max, other.applied_offset) and same_digest

    def __repr__(self) -> str:
        return (f"AggState(count={self.count}, sum={self.sum}, min={self.min}, max={self.max}, "
                f"digest={'yes' if self.digest is not None else 'no'}, "
                f"applied_offset={self.applied_offset})")


# Version 1: [(metric, dimension, value, state bytes)], one item per state. Version 2 (what
# this code writes): one item per table, its states' parts side by side:
# (metric, dimension, [value], headers, sample sizes, samples), the headers the states'
# fixed headers back to back (HEADER_DTYPE), the sizes one little-endian int64 per state
# (its sample's byte length, 0 for none) and the samples their bytes back to back. State i's
# `to_bytes` is headers[i] + its sample, so both versions decode to the same items. Why:
# building and msgpack-encoding one bytes object per state (~340,000 per backlog flush) was
# most of the encoding, which runs on the processing thread, on a backlog's critical path.
BUCKET_CODEC_VERSION = 2
BUCKET_CODEC_VERSIONS = (1, 2)  # what decode_bucket_items reads
_BUCKET_ENCODER = msgspec.msgpack.Encoder()
_BUCKET_VERSION = msgspec.msgpack.Decoder(tuple[int, msgspec.Raw])
_BUCKET_V1 = msgspec.msgpack.Decoder(tuple[int, list[tuple[str, str, str, bytes]]])
_BUCKET_V2 = msgspec.msgpack.Decoder(tuple[int, list[tuple[str, str, list[str], bytes, bytes, bytes]]])

# One table's states in a version 2 blob: (metric, dimension, values, headers, sizes, samples)
# (written from bytes or views of bytes; read back as bytes).
TableBlob = tuple[str, str, list[str], bytes | memoryview, bytes | memoryview, bytes | memoryview]


def encode_bucket(states: Iterable[tuple[str, str, str, AggState]]) -> bytes:
    """All states of one (partition, bucket) as one blob: [(metric, dimension, value, state)].

    The stream persists a partition's bucket as a single row: one upsert per bucket and
    flush instead of one per key and partition, which is what PostgreSQL spent its time on.
    """
    return encode_bucket_items([(m, d, v, s.to_bytes()) for m, d, v, s in states])


def encode_bucket_items(items: Iterable[tuple[str, str, str, bytes]]) -> bytes:
    """`encode_bucket` for states already in their `to_bytes` form (the per-key paths)."""
    tables: dict[tuple[str, str], tuple[list[str], list[bytes], list[bytes]]] = {}
    size = HEADER_DTYPE.itemsize
    for m, d, v, data in items:
        if len(data) < size or data[0] != STATE_VERSION:
            raise ValueError(f"{m}/{d}/{v}: not a version {STATE_VERSION} state ({len(data)} bytes)")
        values, heads, samples = tables.setdefault((m, d), ([], [], []))
        values.append(v)
        heads.append(data[:size])
        samples.append(data[size:])
    return encode_bucket_tables([
        (m, d, values, b"".join(heads), np.fromiter(map(len, samples), dtype="<i8", count=len(samples)).tobytes(),
         b"".join(samples))
        for (m, d), (values, heads, samples) in tables.items()])


def encode_bucket_tables(tables: list[TableBlob]) -> bytes:
    """A version 2 blob of these tables' states (`PartitionState` builds them a table at a time)."""
    return _BUCKET_ENCODER.encode((BUCKET_CODEC_VERSION, tables))


# A stored blob is the msgpack array itself or, written by the stream, a one-byte prefix
# and a compressed copy of it: "S" + zstd (level 1), or "Z" + zlib (level 1, written up to
# 0.1 and still read). A msgpack blob starts with 0x92 (a 2-array), so the prefix is
# unambiguous. Why zstd: a million events' partials are ~280 MB raw; zlib took 2.2 s of
# CPU for them (ratio 0.31), zstd 0.6 s (ratio 0.35), and decodes ~3x faster
# (/tmp/blobexp.py, the blobs of `bench/worker_cycle.py`). Both release the GIL. Either
# is far cheaper than PostgreSQL TOAST-compressing and WAL-logging the raw bytes.
_ZSTD = b"S"
_ZLIB = b"Z"
_PREFIXES = (_ZSTD, _ZLIB)
_codecs = threading.local()  # zstd contexts are not for concurrent use: one per thread


def _zstd() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    pair = getattr(_codecs, "zstd", None)
    if pair is None:
        pair = _codecs.zstd = (zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor())
    return pair


def compress_blob(blob: bytes) -> bytes:
    return _ZSTD + _zstd()[0].compress(blob)


def is_compressed(blob: bytes) -> bool:
    return blob[:1] in _PREFIXES


def _decompress(data: bytes) -> bytes:
    prefix, body = data[:1], memoryview(data)[1:]
    try:
        if prefix == _ZSTD:
            return _zstd()[1].decompress(body)
        return zlib.decompress(body)
    except (zstandard.ZstdError, zlib.error) as exc:
        raise UnknownVersionError(f"not a stream-agg bucket blob: {exc}") from None


def decode_bucket_items(data: bytes) -> list[tuple[str, str, str, bytes]]:
    """A blob's (metric, dimension, value, state bytes), states not yet parsed (either version)."""
    if is_compressed(data):
        data = _decompress(data)
    try:
        version = _BUCKET_VERSION.decode(data)[0]
        if version == 1:
            return _BUCKET_V1.decode(data)[1]
        if version == 2:
            return _table_items(_BUCKET_V2.decode(data)[1])
    except (msgspec.DecodeError, ValueError) as exc:
        raise UnknownVersionError(f"not a stream-agg bucket blob: {exc}") from None
    raise UnknownVersionError(f"bucket blob version {version} is not one of {BUCKET_CODEC_VERSIONS}")


def _table_items(tables: list[TableBlob]) -> list[tuple[str, str, str, bytes]]:
    """Version 2 tables as version 1 items: each state's header joined to its sample."""
    size = HEADER_DTYPE.itemsize
    out: list[tuple[str, str, str, bytes]] = []
    for metric, dim, values, heads, sizes, samples in tables:
        n = len(values)
        lengths = np.frombuffer(sizes, dtype="<i8").tolist() if len(sizes) % 8 == 0 else None
        if (len(heads) != n * size or lengths is None or len(lengths) != n or min(lengths, default=0) < 0
                or sum(lengths) != len(samples)):  # Python ints: a damaged size cannot wrap around
            raise ValueError(f"table {metric}/{dim}: {n} values, {len(heads)} header bytes, "
                             f"{len(sizes)} size bytes, {len(samples)} sample bytes do not agree")
        ends = list(accumulate(lengths))
        starts = [0, *ends[:-1]]
        heads_of = map(heads.__getitem__, map(slice, range(0, n * size, size), range(size, n * size + size, size)))
        samples_of = map(samples.__getitem__, map(slice, starts, ends))
        out.extend(zip(repeat(metric), repeat(dim), values, map(bytes.__add__, heads_of, samples_of)))
    return out


def decode_bucket(data: bytes) -> list[tuple[str, str, str, AggState]]:
    return [(m, d, v, AggState.from_bytes(b)) for m, d, v, b in decode_bucket_items(data)]


def state_fields(data: bytes) -> tuple[int, float, float, float, int, object]:
    """(count, sum, min, max, applied_offset, sample) of state bytes, where the sample is
    None, a TDigest, or the exact values as a float64 array (kept as such by the stream)."""
    if not data or data[0] != STATE_VERSION:
        found = data[0] if data else None
        raise UnknownVersionError(f"AggState format version {found} is not {STATE_VERSION}")
    _, count, total, lo, hi, applied, kind = _HEADER.unpack_from(data)
    sample: object
    if kind == NO_SAMPLE:
        sample = None
    elif kind == DIGEST_SAMPLE:
        sample = TDigest.from_bytes(bytes(data[_HEADER.size:]))
    elif kind == VALUES_SAMPLE:
        sample = np.frombuffer(data, dtype="<f8", offset=_HEADER.size).astype(np.float64)
    else:
        raise UnknownVersionError(f"AggState sample kind {kind} is unknown")
    return count, total, lo, hi, applied, sample
