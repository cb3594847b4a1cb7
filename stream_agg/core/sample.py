"""A state's percentile sample in memory: its exact values while few, a t-digest beyond.

Why: most keys are small (88% of per-user hour states hold fewer than 10 values), and a
fastdigest costs about 4 KB and ~3 us per create / update / merge call whatever its
size, which made small digests most of the fold's digest time and of the worker's memory.
A small numpy array of the values is exact, a few hundred bytes, and merges by
concatenation. Outside the fold (flush, replay, tests) every sample is a `TDigest`
(`to_digest`): the stored format does not change. Arrays are never changed in place, so
they may be shared; digests are, so a digest has exactly one owner.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from fastdigest import TDigest

from stream_agg.core.aggstate import (
    DIGEST_SAMPLE,
    NO_SAMPLE,
    VALUES_SAMPLE,
    digest_from_values,
    merge_digests,
    new_digest,
)

F64 = npt.NDArray[np.float64]
Sample = Any  # TDigest | F64

# Values kept exactly before switching to a digest: 128 float64 = 1 KB, a quarter of the
# smallest digest, and well under MAX_CENTROIDS so the digest built from them is exact too.
SMALL_SAMPLE = 128

# fastdigest's `batch_update` sorts its input; from a few hundred values it runs ~1.3-1.8x
# faster on input that is sorted already, and `np.sort` costs a tenth of that gain.
SORT_FROM = 512


# The stored kind (`aggstate`) of each object a state's sample may be, for mapping a whole
# table's samples in C (`map(SAMPLE_KIND.__getitem__, map(type, samples))`). Another type is
# a bug, and fails with a KeyError rather than writing a wrong blob or row.
SAMPLE_KIND: dict[type, int] = {type(None): NO_SAMPLE, np.ndarray: VALUES_SAMPLE, TDigest: DIGEST_SAMPLE}


def digest_of(values: F64) -> TDigest:
    """A new digest of `values` (sorted first when there are many: see SORT_FROM)."""
    return digest_from_values(np.sort(values) if values.size >= SORT_FROM else values)


def feed(digest: TDigest, values: F64) -> None:
    """`digest.batch_update(values)`, sorted first when there are many (see SORT_FROM)."""
    digest.batch_update(np.sort(values) if values.size >= SORT_FROM else values)


def sample_of(values: F64) -> Sample:
    """A sample of `values` (the array is copied: it may be a view of a whole batch)."""
    return values.copy() if values.size <= SMALL_SAMPLE else digest_of(values)


def _settle(values: F64) -> Sample:
    return values if values.size <= SMALL_SAMPLE else digest_of(values)


def combine(parts: list[Sample], own: bool) -> Sample:
    """One sample of several. A single part is returned as is when `own` (else a copy of its
    digest); several give a new sample and are never changed."""
    if len(parts) == 1:
        p = parts[0]
        return p if own or isinstance(p, np.ndarray) else p.copy()
    arrays = [p for p in parts if isinstance(p, np.ndarray)]
    digests = [p for p in parts if not isinstance(p, np.ndarray)]
    if not digests:
        return _settle(np.concatenate(arrays))
    d = digests[0].copy() if len(digests) == 1 else merge_digests(digests)
    if arrays:
        feed(d, arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
    return d


def absorb(cur: Sample | None, delta: Sample, own: bool) -> Sample:
    """`cur` with `delta` folded in (may be `cur` changed in place, or a new sample)."""
    if cur is None:
        return delta if own or isinstance(delta, np.ndarray) else delta.copy()
    if isinstance(cur, np.ndarray):
        if isinstance(delta, np.ndarray):
            return _settle(np.concatenate((cur, delta)))
        d = delta if own else delta.copy()
        d.batch_update(cur)
        return d
    if isinstance(delta, np.ndarray):
        feed(cur, delta)
    else:
        cur.merge_inplace(delta)
    return cur


def to_digest(sample: Sample | None) -> TDigest | None:
    """The sample as a t-digest (a new one for an array; the live one otherwise)."""
    if sample is None or not isinstance(sample, np.ndarray):
        return sample
    if sample.size == 0:
        return new_digest()
    return digest_of(sample)


def segment_quantiles(values: F64, first: npt.NDArray[np.int64], size: npt.NDArray[np.int64],
                      qs: tuple[float, ...]) -> F64:
    """PERCENTILE_CONT of many samples at once: sample i is `values[first[i]:first[i] + size[i]]`,
    sorted, non-empty. Returns one row per sample, one column per q.

    PostgreSQL's formula `lo + (hi - lo) * frac` (numpy's "linear" agrees to the last bit
    or one ulp: it interpolates from the upper value when frac >= 0.5).
    """
    last = size - 1
    pos = np.asarray(qs)[None, :] * last[:, None]
    low = pos.astype(np.int64)
    high = np.minimum(low + 1, last[:, None])
    base = first[:, None]
    x_lo, x_hi = values[base + low], values[base + high]
    return x_lo + (x_hi - x_lo) * (pos - low)
