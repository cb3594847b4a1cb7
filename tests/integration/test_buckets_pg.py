"""Bucket truncation equals PostgreSQL's date_trunc(..., ts AT TIME ZONE 'UTC') for every instant tried."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import psycopg

from stream_agg.core.buckets import bucket_start, bucket_starts


def _instants() -> list[datetime]:
    rng = np.random.default_rng(42)
    out = [datetime.fromtimestamp(float(t), tz=UTC).replace(microsecond=int(us))
           for t, us in zip(rng.uniform(0, 4.1e9, 4000), rng.integers(0, 1_000_000, 4000), strict=True)]
    edges = []
    for year in range(1999, 2034):
        for base in (datetime(year, 1, 1, tzinfo=UTC), datetime(year, 3, 1, tzinfo=UTC),
                     datetime(year, 12, 28, tzinfo=UTC), datetime(year, 12, 31, 23, tzinfo=UTC)):
            for delta in (-1, -0.000001, 0, 0.000001, 1, 3599.999999, 86399.999999):
                edges.append(base + timedelta(seconds=delta))
    edges += [datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC), datetime(2020, 12, 31, 12, tzinfo=UTC),
              datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)]
    offsets = [timezone(timedelta(hours=h, minutes=m)) for h, m in ((5, 30), (-8, 0), (13, 45), (-3, -30))]
    out += [e.astimezone(offsets[i % len(offsets)]) for i, e in enumerate(edges)]
    return out


def test_buckets_equal_postgres_date_trunc(database_url: str) -> None:
    instants = _instants()
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM date_trunc('hour', t AT TIME ZONE 'UTC'))::bigint, "
            "extract(epoch FROM date_trunc('day', t AT TIME ZONE 'UTC'))::bigint, "
            "extract(epoch FROM date_trunc('week', t AT TIME ZONE 'UTC'))::bigint "
            "FROM unnest(%s::timestamptz[]) WITH ORDINALITY AS u(t, i) ORDER BY i", (instants,)).fetchall()
    ts = np.array([i.timestamp() for i in instants])
    for col, gran in enumerate(("hour", "day", "week")):
        expected = [r[col] for r in rows]
        assert [bucket_start(i.timestamp(), gran) for i in instants] == expected, gran
        assert bucket_starts(ts, gran).tolist() == expected, gran
    assert len(instants) > 4500
