"""The pure query core: windows, ranges, roll-ups and quantiles from stored rows vs numpy."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from helpers import rank_error

from stream_agg.core.aggstate import digest_from_values, digest_to_bytes
from stream_agg.core.query import (
    QueryError,
    StoredRow,
    answer,
    check_rollup,
    needs_digests,
    parse_span,
    quantile_label,
    query_range,
    window_start,
)

H = 3600
T0 = int(datetime(2026, 3, 2, tzinfo=UTC).timestamp())  # a Monday, 00:00 UTC


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


def stored(bucket: int, values: np.ndarray, value: str = "all", digest: bool = True,
           source: str = "stream") -> StoredRow:
    """A row as the stream writes it: exact columns, PERCENTILE_CONT-style percentiles, a digest."""
    p50, p95, p99 = (float(np.percentile(values, q)) for q in (50, 95, 99))
    return StoredRow(bucket, value, int(values.size), float(values.sum()), float(values.min()),
                     float(values.max()), p50, p95, p99,
                     digest_to_bytes(digest_from_values(values)) if digest else None, source)


def test_parse_span_and_labels():
    assert [parse_span(s) for s in ("30m", "6h", "1d", "2w", " 12h ")] == [1800, 21600, 86400, 1209600, 43200]
    for bad in ("", "6", "0h", "1.5h", "6y", "-1h"):
        with pytest.raises(QueryError):
            parse_span(bad)
    assert [quantile_label(q) for q in (0.5, 0.95, 0.99, 0.999, 0.9999, 0.0, 1.0)] == [
        "p50", "p95", "p99", "p99.9", "p99.99", "p0", "p100"]


def test_windows_align_to_utc_and_to_monday():
    assert window_start(ts("2026-03-04T13:00:00+00:00"), 6 * H) == ts("2026-03-04T12:00:00+00:00")
    assert window_start(ts("2026-03-04T05:00:00+00:00"), 6 * H) == ts("2026-03-04T00:00:00+00:00")
    assert window_start(ts("2026-03-04T23:00:00+00:00"), 24 * H) == ts("2026-03-04T00:00:00+00:00")
    # 2026-03-04 is a Wednesday: its week window starts Monday 2026-03-02.
    assert window_start(ts("2026-03-04T23:00:00+00:00"), 7 * 24 * H) == ts("2026-03-02T00:00:00+00:00")
    t, fortnight = ts("2026-03-08T23:00:00+00:00"), 14 * 24 * H
    w = window_start(t, fortnight)
    assert datetime.fromtimestamp(w, UTC).weekday() == 0 and 0 <= t - w < fortnight
    assert (w - ts("1970-01-05T00:00:00+00:00")) % fortnight == 0


def test_query_range_takes_whole_buckets_and_widens_to_whole_windows():
    start, end = ts("2026-03-04T13:20:00+00:00"), ts("2026-03-04T19:05:00+00:00")
    assert query_range(start, end, "hour", None) == (ts("2026-03-04T13:00:00+00:00"), end)
    assert query_range(start, end, "hour", 6 * H) == (ts("2026-03-04T12:00:00+00:00"),
                                                      ts("2026-03-05T00:00:00+00:00"))
    # An end exactly on a window edge adds no extra window.
    assert query_range(start, ts("2026-03-04T18:00:00+00:00"), "hour", 6 * H)[1] == ts("2026-03-04T18:00:00+00:00")
    with pytest.raises(QueryError):
        query_range(end, start, "hour", None)


def test_rollup_must_be_whole_buckets():
    check_rollup("hour", 6 * H)
    check_rollup("day", 7 * 24 * H)
    for gran, span in (("hour", 1800), ("hour", 90 * 60), ("day", 6 * H), ("week", 24 * H)):
        with pytest.raises(QueryError):
            check_rollup(gran, span)


def test_plain_rows_use_the_stored_columns_and_the_digest_for_other_quantiles():
    rng = np.random.default_rng(1)
    values = rng.lognormal(6, 1, 700)
    row = stored(T0, values)
    # A stored column wins over the digest for p50/p95/p99: poison p95 to prove which is read.
    poisoned = StoredRow(**{**row.__dict__, "p95": -1.0})
    [out] = answer([poisoned], "hour", [0.5, 0.95, 0.999])
    assert (out.start, out.end, out.buckets, out.count) == (T0, T0 + H, 1, 700)
    assert out.quantiles[0] == row.p50
    assert out.quantiles[1] == -1.0
    # p99.9 comes from the digest: exact (= PERCENTILE_CONT) at <= 2,000 values.
    assert out.quantiles[2] == pytest.approx(float(np.percentile(values, 99.9)), rel=1e-12)
    assert out.sum == pytest.approx(float(values.sum()), rel=1e-12)
    assert out.avg == pytest.approx(float(values.mean()), rel=1e-12)
    assert (out.min, out.max) == (float(values.min()), float(values.max()))


@pytest.mark.parametrize("per_hour", [150, 1500])
def test_rollup_equals_numpy_over_the_raw_values(per_hour):
    """12 hourly rows -> two 6 h windows: exact count/sum/min/max, quantiles exact or within 0.1% rank."""
    rng = np.random.default_rng(per_hour)
    hours = [rng.lognormal(5 + (h % 3), 1.1, per_hour + h) for h in range(12)]
    rows = [stored(T0 + h * H, v) for h, v in enumerate(hours)]
    qs = [0.5, 0.9, 0.95, 0.99, 0.999]
    out = answer(rows, "hour", qs, rollup=6 * H)
    assert [(r.start, r.end, r.buckets) for r in out] == [(T0, T0 + 6 * H, 6), (T0 + 6 * H, T0 + 12 * H, 6)]
    for r, chunk in zip(out, (hours[:6], hours[6:]), strict=True):
        x = np.concatenate(chunk)
        assert r.count == x.size
        assert r.sum == pytest.approx(float(x.sum()), rel=1e-12)
        assert (r.min, r.max) == (float(x.min()), float(x.max()))
        assert r.missing_digests == 0 and r.source == "stream"
        for q, est in zip(qs, r.quantiles, strict=True):
            if x.size <= 2000:
                assert est == pytest.approx(float(np.percentile(x, q * 100)), rel=1e-9), q
            else:
                assert rank_error(x, est, q) <= 0.001, q


def test_rollup_keeps_dimension_values_apart():
    rng = np.random.default_rng(7)
    data = {(v, h): rng.normal(100 if v == "a" else 1000, 10, 50) for v in "ab" for h in range(4)}
    rows = [stored(T0 + h * H, data[(v, h)], value=v) for v in "ab" for h in range(4)]
    out = answer(rows, "hour", [0.5], rollup=2 * H)
    assert [(r.dimension_value, r.start) for r in out] == [("a", T0), ("a", T0 + 2 * H), ("b", T0), ("b", T0 + 2 * H)]
    for r in out:
        h0 = (r.start - T0) // H
        x = np.concatenate([data[(r.dimension_value, h0)], data[(r.dimension_value, h0 + 1)]])
        assert r.count == 100
        assert r.quantiles[0] == pytest.approx(float(np.median(x)), rel=1e-12)


def test_rows_without_digest_roll_up_exactly_but_have_no_quantiles():
    rng = np.random.default_rng(3)
    a, b = rng.lognormal(5, 1, 200), rng.lognormal(5, 1, 300)
    rows = [stored(T0, a), stored(T0 + H, b, digest=False, source="backfill")]
    [r] = answer(rows, "hour", [0.5, 0.99], rollup=2 * H)
    x = np.concatenate([a, b])
    assert (r.count, r.min, r.max) == (500, float(x.min()), float(x.max()))
    assert r.sum == pytest.approx(float(x.sum()), rel=1e-12)
    assert r.quantiles == (None, None)
    assert r.missing_digests == 1 and r.source == "backfill+stream"
    # Unrolled, the backfilled row still answers its stored percentiles but not others.
    plain = answer(rows, "hour", [0.99, 0.999])
    assert plain[1].quantiles == (float(np.percentile(b, 99)), None)
    assert plain[0].quantiles[1] == pytest.approx(float(np.percentile(a, 99.9)), rel=1e-12)


def test_needs_digests_only_when_an_answer_reads_them():
    assert not needs_digests("hour", [0.5, 0.95, 0.99], None)
    assert needs_digests("hour", [0.999], None)
    assert needs_digests("hour", [0.5], 6 * H)
    assert not needs_digests("hour", [0.5], H)
    assert not needs_digests("hour", [], 6 * H)


def test_bad_quantiles_are_refused():
    for q in (-0.1, 1.5, float("nan")):
        with pytest.raises(QueryError):
            answer([], "hour", [q])
