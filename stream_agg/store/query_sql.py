"""The dashboard SELECT over `metrics_aggregates`, shaped for `metrics_aggregates_dashboard_idx`.

The index is (metric_name, granularity, dimension_type, dimension_value, bucket_time).
The query fixes the first three by equality (and the value, when asked), bounds
bucket_time by a half-open range and orders by (dimension_value, bucket_time), i.e. in
index order: PostgreSQL answers it with one index range scan and no sort, so 30 days of
hourly rows cost a few hundred index tuples whatever the size of the table.
The digest column (up to ~32 KB, TOASTed) is read only when the answer needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from stream_agg.core.query import StoredRow

INDEX_NAME = "metrics_aggregates_dashboard_idx"


@dataclass(frozen=True)
class DashboardQuery:
    """One metric, one granularity, one dimension type (maybe one value), [lo, hi) in epoch seconds."""

    metric: str
    granularity: str
    dimension: str
    value: str | None
    lo: int
    hi: int
    with_digest: bool

    def sql(self) -> str:
        digest = "digest" if self.with_digest else "NULL::bytea"
        value = " AND dimension_value = %(value)s" if self.value is not None else ""
        return (
            "SELECT extract(epoch FROM bucket_time)::bigint, dimension_value, count, sum_value, min_value, "
            f"max_value, p50_value, p95_value, p99_value, {digest}, source "
            "FROM metrics_aggregates "
            "WHERE metric_name = %(metric)s AND granularity = %(granularity)s "
            f"AND dimension_type = %(dimension)s{value} "
            "AND bucket_time >= %(lo)s AND bucket_time < %(hi)s "
            "ORDER BY dimension_value, bucket_time"
        )

    def params(self) -> dict[str, Any]:
        return {"metric": self.metric, "granularity": self.granularity, "dimension": self.dimension,
                "value": self.value, "lo": datetime.fromtimestamp(self.lo, UTC),
                "hi": datetime.fromtimestamp(self.hi, UTC)}


def fetch_rows(conn: psycopg.Connection, query: DashboardQuery) -> list[StoredRow]:
    rows = conn.execute(query.sql(), query.params()).fetchall()  # type: ignore[arg-type]
    return [StoredRow(int(b), v, int(c), float(s), lo, hi, p50, p95, p99,
                      bytes(d) if d is not None else None, src)
            for b, v, c, s, lo, hi, p50, p95, p99, d, src in rows]


def explain(conn: psycopg.Connection, query: DashboardQuery, analyze: bool = False) -> str:
    """The plan PostgreSQL picks for `query`, as text (EXPLAIN [ANALYZE])."""
    prefix = "EXPLAIN (ANALYZE, BUFFERS) " if analyze else "EXPLAIN "
    rows = conn.execute(prefix + query.sql(), query.params()).fetchall()  # type: ignore[arg-type]
    return "\n".join(r[0] for r in rows)


@dataclass(frozen=True)
class BucketRow:
    """A row of one bucket, for the demo's live view."""

    metric: str
    dimension: str
    value: str
    count: int
    sum: float
    avg: float | None
    p95: float | None
    p99: float | None


def bucket_rows(conn: psycopg.Connection, granularity: str, bucket: int,
                slices: Sequence[tuple[str, str]]) -> list[BucketRow]:
    """Every row of one bucket for the given (metric, dimension type) pairs."""
    metrics = [m for m, _ in slices]
    dims = [d for _, d in slices]
    rows = conn.execute(
        "SELECT a.metric_name, a.dimension_type, a.dimension_value, a.count, a.sum_value, a.avg_value, "
        "a.p95_value, a.p99_value FROM unnest(%s::text[], %s::text[]) AS s(metric, dim) "
        "JOIN metrics_aggregates a ON a.metric_name = s.metric AND a.granularity = %s "
        "AND a.dimension_type = s.dim AND a.bucket_time = %s "
        "ORDER BY a.metric_name, a.dimension_type, a.dimension_value",
        (metrics, dims, granularity, datetime.fromtimestamp(bucket, UTC))).fetchall()
    return [BucketRow(m, d, v, int(c), float(s), a, p95, p99) for m, d, v, c, s, a, p95, p99 in rows]
