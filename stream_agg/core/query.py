"""Answering dashboard questions from stored `metrics_aggregates` rows, without raw data.

A stored row holds count / sum / min / max, p50 / p95 / p99 and a serialized t-digest.
That is enough for the two things a dashboard asks beyond the stored columns:

- a **roll-up** into coarser windows (e.g. 6 h from hour rows): counts and sums add,
  min / max combine, and quantiles come from the merge of the rows' digests;
- an **arbitrary quantile** (e.g. p99.9): read from the row's digest (or the merged one).

Digests are exact (equal to PERCENTILE_CONT) while they hold <= 2,000 values and stay
within ~0.05% rank error above that (see `core.aggstate`). Rows without a digest (a metric
that keeps none, or a backfill run with digests off) still roll up exactly for count / sum
/ min / max, but their quantiles are reported as unknown, never estimated from the stored
percentiles: percentiles of parts do not combine into the percentile of the whole.

Pure: rows in, rows out; the SQL lives in `stream_agg.store.query_sql`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stream_agg.core.aggstate import digest_from_bytes, merge_digests
from stream_agg.core.buckets import DAY, SPAN, WEEK, bucket_start

# The quantiles kept as plain columns, read without touching the digest.
STORED_QUANTILES: dict[float, str] = {0.5: "p50", 0.95: "p95", 0.99: "p99"}
_MONDAY_OFFSET = 4 * DAY  # 1970-01-05 00:00 UTC, the first Monday: week buckets start there
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": WEEK}


class QueryError(ValueError):
    """The question cannot be answered as asked (bad span, bad quantile...)."""


@dataclass(frozen=True)
class StoredRow:
    """One `metrics_aggregates` row as read by the dashboard query."""

    bucket: int  # bucket start, epoch seconds
    dimension_value: str
    count: int
    sum: float
    min: float | None
    max: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    digest: bytes | None
    source: str


@dataclass(frozen=True)
class ResultRow:
    """One answered window: one bucket, or the merge of the buckets of a roll-up window."""

    start: int
    end: int
    dimension_value: str
    buckets: int  # stored rows merged into this one
    count: int
    sum: float
    min: float | None
    max: float | None
    quantiles: tuple[float | None, ...]  # in the order the question asked for them
    source: str  # 'stream', 'backfill' or 'backfill+stream'
    missing_digests: int  # rows merged here that had no digest (their quantiles are unknown)

    @property
    def avg(self) -> float | None:
        return self.sum / self.count if self.count else None


def parse_span(text: str) -> int:
    """'6h', '1d', '2w', '90m' -> seconds (whole minutes at least)."""
    m = re.fullmatch(r"\s*(\d+)\s*([mhdw])\s*", text or "")
    if not m or int(m.group(1)) == 0:
        raise QueryError(f"not a span: {text!r} (use e.g. 30m, 6h, 1d, 2w)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def quantile_label(q: float) -> str:
    """0.5 -> 'p50', 0.999 -> 'p99.9', 0.9999 -> 'p99.99'."""
    return "p" + f"{q * 100:.6f}".rstrip("0").rstrip(".")


def check_quantiles(quantiles: Iterable[float]) -> tuple[float, ...]:
    out = tuple(float(q) for q in quantiles)
    for q in out:
        if not (math.isfinite(q) and 0.0 <= q <= 1.0):
            raise QueryError(f"quantile must be between 0 and 1, got {q:g}")
    return out


def check_rollup(granularity: str, rollup: int) -> None:
    """A roll-up window must be made of whole stored buckets."""
    span = SPAN[granularity]
    if rollup < span or rollup % span:
        raise QueryError(f"--rollup must be a whole multiple of one {granularity} ({span} s); "
                         f"got {rollup} s")


def window_start(ts: int, span: int) -> int:
    """Start of the roll-up window of `span` seconds holding `ts`.

    Windows of whole weeks start on Monday 00:00 UTC, like week buckets; any other span
    is aligned to the epoch, so 6 h windows start at 00, 06, 12 and 18 UTC.
    """
    if span % WEEK == 0:
        return (ts - _MONDAY_OFFSET) // span * span + _MONDAY_OFFSET
    return ts // span * span


def query_range(start: float, end: float, granularity: str, rollup: int | None) -> tuple[int, int]:
    """[lo, hi) of bucket starts to read: whole buckets, widened to whole roll-up windows.

    The bucket holding `start` is included; `end` is exclusive (a bucket starting at or
    after it is not). Widening means a roll-up window is never answered from part of its
    buckets.
    """
    if end <= start:
        raise QueryError("the end of the range must be after its start")
    lo = bucket_start(start, granularity)
    hi = int(math.ceil(end))
    if rollup is not None:
        lo = window_start(lo, rollup)
        last = window_start(bucket_start(math.nextafter(end, -math.inf), granularity), rollup)
        hi = max(hi, last + rollup)
    return lo, hi


def _stored_column(row: StoredRow, q: float) -> float | None:
    return getattr(row, STORED_QUANTILES[q])


def answer(rows: Sequence[StoredRow], granularity: str, quantiles: Sequence[float],
           rollup: int | None = None) -> list[ResultRow]:
    """Rows (ordered by dimension value, then bucket) -> one ResultRow per window.

    Without `rollup` each stored bucket is its own window. A stored quantile of a window
    made of one bucket comes from its column; anything else from the (merged) digest.
    """
    qs = check_quantiles(quantiles)
    span = rollup if rollup is not None else SPAN[granularity]
    if rollup is not None:
        check_rollup(granularity, rollup)
    groups: dict[tuple[str, int], list[StoredRow]] = {}
    for row in rows:
        start = window_start(row.bucket, span) if rollup is not None else row.bucket
        groups.setdefault((row.dimension_value, start), []).append(row)
    out = []
    for (value, start), members in groups.items():
        end = start + span if rollup is not None else members[0].bucket + SPAN[granularity]
        out.append(_merge_window(value, start, end, members, qs))
    return out


def _merge_window(value: str, start: int, end: int, members: list[StoredRow],
                  qs: tuple[float, ...]) -> ResultRow:
    if len(members) == 1:  # the common dashboard case: no arithmetic to do
        one = members[0]
        count, total, lo, hi, sources = one.count, one.sum, one.min, one.max, one.source
    else:
        count = sum(r.count for r in members)
        total = math.fsum(r.sum for r in members)
        mins = [r.min for r in members if r.min is not None]
        maxs = [r.max for r in members if r.max is not None]
        lo, hi = (min(mins) if mins else None), (max(maxs) if maxs else None)
        sources = "+".join(sorted({r.source for r in members}))
    without = sum(1 for r in members if r.digest is None and r.count > 0)
    missing = 0  # rows without a digest, counted only when an answer needed their digest
    digest = None
    quantiles: list[float | None] = []
    for q in qs:
        if len(members) == 1 and q in STORED_QUANTILES and _stored_column(members[0], q) is not None:
            quantiles.append(_stored_column(members[0], q))
            continue
        if without or count == 0:
            missing = without
            quantiles.append(None)
            continue
        if digest is None:
            digest = merge_digests([digest_from_bytes(r.digest) for r in members if r.digest is not None])
        quantiles.append(float(digest.quantile(q)))
    return ResultRow(start, end, value, len(members), count, total, lo, hi, tuple(quantiles), sources, missing)


def needs_digests(granularity: str, quantiles: Sequence[float], rollup: int | None) -> bool:
    """Whether the answer reads digests (so the SQL must fetch the digest column)."""
    if rollup is not None and rollup != SPAN[granularity]:
        return bool(quantiles)
    return any(q not in STORED_QUANTILES for q in quantiles)
