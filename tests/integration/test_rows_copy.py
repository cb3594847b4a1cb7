"""Row blocks rendered as binary COPY, loaded by PostgreSQL, give back exactly the rows' values."""

from __future__ import annotations

import math

import numpy as np
import psycopg
from helpers import make_events

from stream_agg.core.fold import PartitionState, fold_events
from stream_agg.core.merged_rows import RowBlock, merged_blocks
from stream_agg.core.registry import default_registry
from stream_agg.store import rows_copy
from stream_agg.store.schema import migrate


def _awkward_block() -> RowBlock:
    """Every NULL pattern, a zero count, infinities, and labels COPY's text format would escape."""
    q = np.array([[1.0, 2.0, 3.0], [math.nan] * 3, [0.5, math.nan, 7.25], [math.nan] * 3, [-1e300, 0.0, 1e-300]])
    return RowBlock("hour", "trace.duration_ms", "user", np.array([0, 1, 480_000, 500_000, 499_999], dtype=np.int64),
                    ["a\tb\\c\nd", "\\N", "", "ünïcødé ✓", "x" * 300],
                    np.array([3, 0, 1, 2**40, 7], dtype=np.int64), np.array([6.5, 0.0, -2.0, 1e18, 1.25]),
                    np.array([1.0, math.inf, -2.0, 0.0, -5.0]), np.array([4.0, -math.inf, -2.0, 9.0, 5.0]),
                    q, [b"\x02" + np.arange(3.0).tobytes(), None, b"", b"\x00\xff" * 2000, None])


def _load(database_url: str, blocks: list[RowBlock]) -> dict[tuple, tuple]:
    cols = ", ".join(rows_copy.COLUMNS)
    with psycopg.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
        cur.execute(f"CREATE TEMP TABLE t AS SELECT {cols} FROM metrics_aggregates WITH NO DATA")
        with cur.copy(f"COPY t ({cols}) FROM STDIN (FORMAT BINARY)") as copy:
            for chunk in rows_copy.render(blocks):
                copy.write(chunk)
        rows = cur.execute("SELECT bucket_time, granularity, metric_name, dimension_type, dimension_value, count, "
                           "sum_value, min_value, max_value, avg_value, p50_value, p95_value, p99_value, digest "
                           "FROM t").fetchall()
    return {r[1:5] + (r[0],): r for r in rows}


def test_rendered_rows_load_back_unchanged(database_url: str) -> None:
    migrate(database_url)
    reg = default_registry({"user": 5})
    parts = [PartitionState(reg) for _ in range(2)]
    events = make_events(600, seed=31, hours=5, users=12, null_rate=0.3)
    for i, p in enumerate(parts):
        fold_events(p, events[i::2], np.arange(i, len(events), 2))
    blocks = [*merged_blocks(parts, set().union(*(p.buckets for p in parts))), _awkward_block()]
    got = _load(database_url, blocks)
    want = [row for b in blocks for _, row in b.rows()]
    assert len(got) == len(want) == sum(len(b) for b in blocks)
    for row in want:
        back = got[row[1:5] + (row[0],)]
        assert back[:5] == row[:5]
        assert back[5:9] == row[5:9]  # count, sum, min, max: bit for bit (binary floats)
        assert (back[9] is None) == (row[9] is None) and (row[9] is None or back[9] == row[9])
        assert back[10:13] == row[10:13]
        assert (bytes(back[13]) if back[13] is not None else None) == row[13]
