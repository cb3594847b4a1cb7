"""AggState: exact statistics, percentiles equal to PERCENTILE_CONT, associative merges, bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import rank_error
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_agg.core.aggstate import (
    AggState,
    UnknownVersionError,
    digest_from_bytes,
    digest_to_bytes,
    values_to_digest_bytes,
)
from stream_agg.core.sample import segment_quantiles

QS = (0.5, 0.95, 0.99)


def _data(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "lognormal":
        return rng.lognormal(5, 1.5, n)
    return np.concatenate([rng.normal(100, 10, n // 2), rng.normal(2000, 300, n - n // 2)])


@pytest.mark.parametrize("kind", ["lognormal", "bimodal"])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000, 2000])
def test_small_states_equal_percentile_cont(kind: str, n: int) -> None:
    x = _data(kind, n, n)
    s = AggState.from_values(x, with_digest=True)
    assert s.count == n
    assert s.sum == pytest.approx(float(np.sum(x)), rel=1e-12)
    assert (s.min, s.max) == (float(x.min()), float(x.max()))
    assert s.avg == pytest.approx(float(np.mean(x)), rel=1e-12)
    for q in QS:
        assert s.quantile(q) == pytest.approx(float(np.percentile(x, q * 100, method="linear")), rel=1e-9)


@pytest.mark.parametrize("kind", ["lognormal", "bimodal"])
def test_merged_small_partials_stay_exact(kind: str) -> None:
    x = _data(kind, 1000, 3)
    parts = np.array_split(x, 100)
    merged = AggState.merge_many([AggState.from_values(p, True) for p in parts], True)
    for q in QS:
        assert merged.quantile(q) == pytest.approx(float(np.percentile(x, q * 100)), rel=1e-9)


@pytest.mark.parametrize("kind", ["lognormal", "bimodal"])
@pytest.mark.parametrize("partials", [1, 100])
def test_large_states_within_rank_error(kind: str, partials: int) -> None:
    x = _data(kind, 200_000, 11)
    states = [AggState.from_values(p, True) for p in np.array_split(x, partials)]
    merged = AggState.merge_many(states, True) if partials > 1 else states[0]
    assert merged.count == x.size
    assert merged.sum == pytest.approx(float(x.sum()), rel=1e-9)
    for q in QS:
        assert rank_error(x, merged.quantile(q), q) <= 0.001, q


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(0, 1e9, allow_nan=False, allow_infinity=False), min_size=0, max_size=30),
                min_size=1, max_size=8),
       st.randoms(use_true_random=False))
def test_merge_in_any_order_is_exact(chunks: list[list[float]], rnd) -> None:
    allv = np.array([v for c in chunks for v in c], dtype=float)
    states = [AggState.from_values(c, True, applied_offset=i) for i, c in enumerate(chunks)]
    order = list(range(len(states)))
    rnd.shuffle(order)
    acc = AggState.empty(True)
    for i in order:
        acc.merge_in(states[i])
    assert acc.count == allv.size
    assert acc.applied_offset == len(chunks) - 1
    if allv.size:
        assert acc.sum == pytest.approx(float(allv.sum()), rel=1e-9, abs=1e-9)
        assert (acc.min, acc.max) == (float(allv.min()), float(allv.max()))
        for q in QS:
            assert acc.quantile(q) == pytest.approx(float(np.percentile(allv, q * 100)), rel=1e-9, abs=1e-9)
    else:
        assert acc.quantile(0.5) is None and acc.avg is None


def test_empty_and_no_digest_states() -> None:
    assert AggState.empty(True).quantile(0.99) is None
    no_digest = AggState.from_values([1.0, 2.0], with_digest=False)
    assert no_digest.quantile(0.5) is None and no_digest.avg == 1.5
    with pytest.raises(ValueError):
        AggState.from_values([1.0], True).quantile(1.5)


def test_bytes_round_trip_and_versioning() -> None:
    x = _data("lognormal", 5000, 1)
    s = AggState.from_values(x, True, applied_offset=42)
    back = AggState.from_bytes(s.to_bytes())
    assert back == s
    assert back.quantile(0.95) == s.quantile(0.95)
    plain = AggState.from_values([3.0], False, applied_offset=7)
    assert AggState.from_bytes(plain.to_bytes()) == plain
    assert len(plain.to_bytes()) < 64
    with pytest.raises(UnknownVersionError, match="version 9"):
        AggState.from_bytes(b"\x09" + s.to_bytes()[1:])
    d = digest_from_bytes(digest_to_bytes(s.digest))
    assert d.quantile(0.5) == s.digest.quantile(0.5)
    with pytest.raises(UnknownVersionError):
        digest_from_bytes(b"\x03abc")
    with pytest.raises(UnknownVersionError):
        digest_from_bytes(b"\x02abc")  # exact values, but not a whole number of float64s
    few = np.array([5.0, 1.0, 3.0, 2.5])
    exact = digest_from_bytes(values_to_digest_bytes(few))
    for q in (0.0, 0.5, 0.95, 1.0):
        assert exact.quantile(q) == pytest.approx(float(np.percentile(few, q * 100)), rel=1e-12)
        got = segment_quantiles(np.sort(few), np.array([0]), np.array([few.size]), (q,))[0, 0]
        assert got == pytest.approx(float(np.percentile(few, q * 100)), rel=1e-12)
    assert math.isinf(AggState().min)


def test_bucket_blob_round_trip_and_versioning() -> None:
    from stream_agg.core.aggstate import decode_bucket, decode_bucket_items, encode_bucket

    items = [("trace.duration_ms", "user", "ann", AggState.from_values(_data("lognormal", 3000, 4), True, 17)),
             ("trace.errors", "all", "all", AggState.from_values([0.0, 1.0, 1.0], False, 9)),
             ("trace.duration_ms", "user", "bob", AggState.from_values([2.5], True, 18))]
    blob = encode_bucket(items)
    back = decode_bucket(blob)
    # grouped by table (first-seen order), each table's states in their order
    order = [0, 2, 1]
    assert [(m, d, v) for m, d, v, _ in back] == [items[i][:3] for i in order]
    assert [s for *_, s in back] == [items[i][3] for i in order]
    assert decode_bucket(encode_bucket([])) == []
    import msgspec

    # version 2: one entry per table, the states' headers, sample sizes and samples side by side
    version, tables = msgspec.msgpack.decode(blob)
    assert version == 2 and [(t[0], t[1], t[2]) for t in tables] == [
        ("trace.duration_ms", "user", ["ann", "bob"]), ("trace.errors", "all", ["all"])]
    per_state = [items[i][3].to_bytes() for i in order]
    duration = tables[0]
    assert duration[3] == per_state[0][:42] + per_state[1][:42]
    assert np.frombuffer(duration[4], "<i8").tolist() == [len(per_state[0]) - 42, len(per_state[1]) - 42]
    assert duration[5] == per_state[0][42:] + per_state[1][42:]
    assert tables[1][3:] == [per_state[2], np.zeros(1, "<i8").tobytes(), b""]  # no sample
    # version 1 (one item per state), written by earlier versions, still reads the same
    v1 = msgspec.msgpack.encode((1, [(m, d, v, s.to_bytes()) for m, d, v, s in (items[i] for i in order)]))
    assert decode_bucket_items(v1) == decode_bucket_items(blob)
    with pytest.raises(UnknownVersionError, match="version 3"):
        decode_bucket(msgspec.msgpack.encode((3, [])))
    with pytest.raises(UnknownVersionError):
        decode_bucket(b"\x00garbage")
    short = msgspec.msgpack.encode((2, [(*duration[:5], duration[5][:-8])]))  # a sample cut short
    with pytest.raises(UnknownVersionError, match="do not agree"):
        decode_bucket(short)
    big = 2**63 - 1  # sizes whose int64 sum wraps around to the (empty) samples' length
    wrapped = np.array([big, big, 2], dtype="<i8").tobytes()
    with pytest.raises(UnknownVersionError, match="do not agree"):
        decode_bucket(msgspec.msgpack.encode((2, [("m", "d", ["a", "b", "c"], b"\x01" * 126, wrapped, b"")])))
    with pytest.raises(UnknownVersionError, match="do not agree"):  # sizes not whole int64s
        decode_bucket(msgspec.msgpack.encode((2, [(*duration[:4], duration[4][:-3], duration[5])])))
    from stream_agg.core.aggstate import encode_bucket_items

    with pytest.raises(ValueError, match="not a version 1 state"):
        encode_bucket_items([("m", "d", "v", b"\x01" * 10)])


def test_compressed_blobs_zstd_written_and_zlib_still_read() -> None:
    """Partials are written zstd-compressed; those an earlier version wrote with zlib
    ("Z" prefix) must still load after an upgrade, and a damaged one is a clear error."""
    import zlib

    import zstandard

    from stream_agg.core.aggstate import compress_blob, decode_bucket, encode_bucket, is_compressed

    items = [("trace.duration_ms", "user", "ann", AggState.from_values(_data("lognormal", 3000, 4), True, 17))]
    raw = encode_bucket(items)
    packed = compress_blob(raw)
    assert packed[:1] == b"S" and zstandard.ZstdDecompressor().decompress(packed[1:]) == raw
    assert len(packed) < len(raw) and is_compressed(packed) and not is_compressed(raw)
    old = b"Z" + zlib.compress(raw, 1)
    for blob in (raw, packed, old):
        back = decode_bucket(blob)
        assert [s for *_, s in back] == [s for *_, s in items]
    for bad in (packed[:-7], old[:-7], b"S" + raw):
        with pytest.raises(UnknownVersionError, match="not a stream-agg bucket blob"):
            decode_bucket(bad)


def test_segment_quantiles_of_many_samples_equal_numpy() -> None:
    rng = np.random.default_rng(3)
    samples = [np.sort(rng.lognormal(3, 1, int(n))) for n in rng.integers(1, 130, 200)]
    sizes = np.array([s.size for s in samples])
    first = np.cumsum(sizes) - sizes
    qs = (0.0, 0.5, 0.95, 0.99, 1.0)
    got = segment_quantiles(np.concatenate(samples), first, sizes, qs)
    want = np.array([[np.percentile(s, q * 100) for q in qs] for s in samples])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
