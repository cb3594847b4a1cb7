"""The backfill SQL is generated from the registry: every metric, dimension, cap and null rule shows up."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from stream_agg.core.cardinality import CAP_HASH_SQL
from stream_agg.core.registry import DIMENSIONS, LEVEL_SQL, OTHER, Registry, default_registry
from stream_agg.store import backfill_sql as q

ALL = ("hour", "day", "week")


def statements(registry: Registry, grans: tuple[str, ...] = ALL) -> list[q.Statement]:
    return q.aggregate_statements(registry, grans, with_values=True)


def test_every_metric_and_dimension_of_the_registry_is_computed() -> None:
    registry = default_registry()
    sts = statements(registry)
    covered = {(m, st.dimension) for st in sts for m in st.metrics}
    assert covered == {(m.name, d) for m in registry.metrics for d in m.dimensions}
    for m in registry.metrics:
        mine = [st for st in sts if m.name in st.metrics]
        assert all(q.quote(m.name) in st.sql and f"({m.sql})::float8" in st.sql for st in mine), m.name
        table, row_filter = LEVEL_SQL[m.level]
        assert all(f"FROM {table} r " in st.sql and f"({row_filter})" in st.sql for st in mine)
    for st in sts:
        dim_sql = DIMENSIONS[st.dimension].sql
        assert f"({dim_sql}) IS NOT NULL" in st.sql  # a null dimension value skips the row
        assert f"({dim_sql})::text COLLATE \"C\" AS dval" in st.sql
        assert "r.started_at >= %(start)s AND r.started_at < %(end)s" in st.sql
    # trace: all, operation_type, kb wide + user once per metric; llm: all, model, operation_type
    assert [(st.level, st.dimension, len(st.metrics)) for st in sts] == [
        ("trace", "all", 3), ("trace", "operation_type", 3), ("trace", "kb", 3), ("trace", "user", 1),
        ("trace", "user", 1), ("trace", "user", 1), ("llm", "all", 3), ("llm", "model", 3),
        ("llm", "operation_type", 3)]


def test_caps_rank_by_hash_then_value_and_fold_into_other() -> None:
    sts = statements(default_registry({"user": 7, "kb": 3}))
    capped = {(st.dimension, st.metrics[0]): st for st in sts if st.cap is not None}
    assert {d for d, _ in capped} == {"user", "kb"}
    for (dim, metric), st in capped.items():
        assert st.cap == {"user": 7, "kb": 3}[dim]
        assert f"WHEN k.rn <= {st.cap} THEN s.dval ELSE {q.quote(OTHER)} END" in st.sql
        assert CAP_HASH_SQL.format(expr="dval") in st.sql
        assert "ORDER BY h.hv, d.dval COLLATE \"C\"" in st.sql  # ties by value, in byte order
        m = default_registry().metric(metric)
        assert f"AND ({m.sql}) IS NOT NULL" in st.sql  # only rows with a value take a slot
        for g in ALL:
            assert "PARTITION BY d.b" in st.sql and f"r_{g} AS" in st.sql and f"{q.quote(g)} AS granularity" in st.sql
    uncapped = [st for st in sts if st.cap is None]
    assert uncapped and all(q.quote(OTHER) not in st.sql for st in uncapped)
    assert not [st for st in statements(default_registry({})) if st.cap is not None]


def test_percentiles_only_for_digest_metrics() -> None:
    registry = default_registry()
    pct = "percentile_cont(ARRAY[0.5, 0.95, 0.99]::float8[]) WITHIN GROUP (ORDER BY v"
    for st in statements(registry):
        for i, name in enumerate(st.metrics):
            col = "v" if st.cap is not None else f"v{i}"
            has_pct = f"{pct[:-1]}{col})" in st.sql
            assert has_pct == registry.metric(name).digest, (st.dimension, name)
    no_values = q.aggregate_statements(registry, ALL, with_values=False)
    assert all("array_send" not in st.sql for st in no_values)
    assert any("array_send(array_agg(" in st.sql for st in statements(registry))


def test_granularities_form_one_rollup() -> None:
    wide = statements(default_registry(), ("hour", "week"))[1]
    assert "GROUP BY GROUPING SETS ((dval, b_week), (dval, b_week, b_hour))" in wide.sql
    assert "b_day" not in wide.sql
    single = statements(default_registry(), ("day",))[0]
    assert "GROUPING SETS ((b_day))" in single.sql and "'day' AS granularity" in single.sql
    with pytest.raises(ValueError):
        q.aggregate_statements(default_registry(), ("month",))
    with pytest.raises(ValueError):
        q.bucket_sql("minute")


def test_selection_restricts_levels() -> None:
    sts = statements(default_registry().select(["llm.output_tokens"]))
    assert {st.level for st in sts} == {"llm"} and all("FROM spans r" in st.sql for st in sts)
    assert all("r.kind = 'llm'" in st.sql for st in sts)
    assert "spans" not in q.raw_rows_sql(default_registry().select(["trace.errors"]))


def test_bucket_sql_is_a_monday_anchored_bin() -> None:
    assert q.bucket_sql("week") == "date_bin(INTERVAL '7 days', r.started_at, TIMESTAMPTZ '0001-01-01 00:00:00+00')"
    assert "INTERVAL '1 hour'" in q.bucket_sql("hour") and "INTERVAL '1 day'" in q.bucket_sql("day")


def test_decode_values_reads_array_send_bytes() -> None:
    values = [1.5, -2.0, 1e300, 0.0]
    header = struct.pack(">iiiii", 1, 0, 701, len(values), 1)
    body = b"".join(struct.pack(">id", 8, v) for v in values)
    assert q.decode_values(header + body).tolist() == values
    assert q.decode_values(struct.pack(">iii", 0, 0, 701)).size == 0
    assert q.decode_values(None).dtype == np.float64
