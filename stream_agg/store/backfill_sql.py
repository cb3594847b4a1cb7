"""SQL for the exact recomputation (backfill, verify, reconcile), generated from the registry.

Why generated: the metrics, their SQL expressions, null rules, dimensions and caps are
declared once in `stream_agg.core.registry`; writing the backfill SQL by hand a second
time would let the exact path and the stream drift apart silently.

Shape, per level (`traces`, or `spans` of kind llm) and dimension:
- an uncapped dimension gets one statement for all its metrics and all requested
  granularities: one scan of the chunk's raw rows, one sort, and the granularities as a
  rollup of grouping sets (week > day > hour are nested buckets, so one sort order serves
  all of them); count / sum / min / max per metric side by side, `percentile_cont` over
  an array of fractions for digest metrics (one sort of each group for p50, p95 and p99),
  then the few aggregated rows are unpivoted into one row per metric. A null metric value
  skips only that metric; a null dimension value skips the row.
- a capped dimension gets one statement per metric, because a value takes a slot only
  where the metric is not null: per bucket of each granularity, rank the distinct values
  by (`CAP_HASH_SQL`, value in byte order), keep rank <= K and fold the others into
  `__other__` *before* aggregating, so `__other__`'s percentiles are exact over its raw
  values. The raw rows are read once (a materialized CTE) for all granularities.

Every statement returns `RESULT_COLUMNS`; avg is sum / count (bit for bit PostgreSQL's
avg(float8)); `vals` is the group's raw values as `array_send` bytes (decode with
`decode_values`) when asked for, else NULL. Parameters: `%(start)s`, `%(end)s`
(timestamptz, half-open) on the raw rows' `started_at`. Dimension values are compared in
the "C" collation: byte order is the cap's tie rule, and it sorts several times faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stream_agg.core.buckets import GRANULARITIES
from stream_agg.core.cardinality import CAP_HASH_SQL
from stream_agg.core.registry import DIMENSIONS, LEVEL_SQL, OTHER, Level, Metric, Registry

QUANTILES = (0.5, 0.95, 0.99)

RESULT_COLUMNS = (
    "granularity", "bucket_time", "metric_name", "dimension_type", "dimension_value", "count", "sum_value",
    "min_value", "max_value", "avg_value", "p50_value", "p95_value", "p99_value", "vals",
)

_ARRAY_HEADER = 20  # array_send of a 1-D array: ndim, flags, element oid, size, lower bound
_ELEMENT = np.dtype([("len", ">i4"), ("v", ">f8")])  # each float8 element: length 8 + value


@dataclass(frozen=True)
class Statement:
    """One generated SELECT and what it computes."""

    level: Level
    dimension: str
    granularities: tuple[str, ...]
    metrics: tuple[str, ...]
    cap: int | None
    sql: str


def quote(text: str) -> str:
    """A SQL string literal (registry names are code, but quote them properly anyway)."""
    return "'" + text.replace("'", "''") + "'"


# date_bin with a Monday origin is exactly date_trunc(..., t AT TIME ZONE 'UTC') for hour,
# day and ISO week (UTC has no DST; 0001-01-01 was a Monday), i.e. the core's buckets, but
# it is integer arithmetic on the instant instead of two time zone conversions: 3x cheaper
# per row, and the backfill evaluates it for every raw row of every statement.
_BIN_ORIGIN = "TIMESTAMPTZ '0001-01-01 00:00:00+00'"
_STRIDE = {"hour": "1 hour", "day": "1 day", "week": "7 days"}


def bucket_sql(granularity: str, column: str = "r.started_at") -> str:
    """The bucket start (timestamptz) holding `column`, as the core's buckets."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}")
    return f"date_bin(INTERVAL {quote(_STRIDE[granularity])}, {column}, {_BIN_ORIGIN})"


def _ordered(granularities: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Requested granularities, coarsest first (the order of a rollup's grouping sets)."""
    unknown = [g for g in granularities if g not in GRANULARITIES]
    if unknown or not granularities:
        raise ValueError(f"bad granularities {granularities!r}")
    return tuple(g for g in reversed(GRANULARITIES) if g in granularities)


def _source(level: Level, dim_sql: str, grans: tuple[str, ...], values: list[str], extra: str = "") -> str:
    """The chunk's raw rows of a level: one bucket column per granularity, dval, values."""
    table, row_filter = LEVEL_SQL[level]
    cols = [f"{bucket_sql(g)} AS b_{g}" for g in grans] + [f"({dim_sql})::text COLLATE \"C\" AS dval"] + values
    return (f"SELECT {', '.join(cols)} FROM {table} r WHERE r.started_at >= %(start)s "
            f"AND r.started_at < %(end)s AND ({row_filter}) AND ({dim_sql}) IS NOT NULL{extra}")


def _aggregates(v: str, digest: bool, with_values: bool, suffix: str) -> list[str]:
    """count / sum / min / max (+ quantiles and raw values) of column `v`, named with `suffix`.

    No avg() here: PostgreSQL's avg(float8) is its running sum over the count, bit for bit
    the same as sum / count computed outside, and one aggregate less per row.
    """
    quantiles = "ARRAY[" + ", ".join(repr(x) for x in QUANTILES) + "]::float8[]"
    cols = [f"count({v}) AS c{suffix}", f"sum({v}) AS s{suffix}", f"min({v}) AS lo{suffix}",
            f"max({v}) AS hi{suffix}"]
    if digest:
        cols.append(f"percentile_cont({quantiles}) WITHIN GROUP (ORDER BY {v}) AS p{suffix}")
    else:
        cols.append(f"NULL::float8[] AS p{suffix}")
    if digest and with_values:
        cols.append(f"array_send(array_agg({v}) FILTER (WHERE {v} IS NOT NULL)) AS x{suffix}")
    else:
        cols.append(f"NULL::bytea AS x{suffix}")
    return cols


_OUT = ("x.c AS count, x.s AS sum_value, x.lo AS min_value, x.hi AS max_value, x.s / x.c AS avg_value, "
        "x.p[1] AS p50_value, x.p[2] AS p95_value, x.p[3] AS p99_value, {vals} AS vals")


def _which(grans: tuple[str, ...]) -> tuple[str, str]:
    """(granularity, bucket) of a rollup row: the finest granularity still grouped."""
    if len(grans) == 1:
        return quote(grans[0]), f"b_{grans[0]}"
    finer = list(reversed(grans))
    gran = "CASE " + " ".join(f"WHEN GROUPING(b_{g}) = 0 THEN {quote(g)}" for g in finer[:-1])
    gran += f" ELSE {quote(finer[-1])} END"
    bucket = "CASE " + " ".join(f"WHEN GROUPING(b_{g}) = 0 THEN b_{g}" for g in finer[:-1])
    bucket += f" ELSE b_{finer[-1]} END"
    return gran, bucket


def wide_statement(level: Level, dim: str, metrics: tuple[Metric, ...], granularities: tuple[str, ...],
                   with_values: bool) -> Statement:
    """Every metric of an uncapped dimension, every granularity: one scan, one sort.

    The granularities are a rollup (week > day > hour, nested buckets), so one sort of the
    rows serves all their grouping sets. A row with a null metric skips only that metric.
    """
    grans = _ordered(granularities)
    dim_sql = DIMENSIONS[dim].sql
    const = DIMENSIONS[dim].on == "const"
    lead = [] if const else ["dval"]
    sets = ", ".join("(" + ", ".join(lead + [f"b_{g}" for g in grans[:i + 1]]) + ")" for i in range(len(grans)))
    gran, bucket = _which(grans)
    aggs: list[str] = []
    values: list[str] = []
    for i, m in enumerate(metrics):
        aggs += _aggregates(f"v{i}", m.digest, with_values, str(i))
        values.append(f"({quote(m.name)}, c{i}, s{i}, lo{i}, hi{i}, p{i}, x{i})")
    src = _source(level, dim_sql, grans, [f"({m.sql})::float8 AS v{i}" for i, m in enumerate(metrics)])
    dval = quote(DIMENSIONS[dim].field) if const else "dval"
    sql = (
        f"SELECT g.granularity, g.bucket_time, x.metric_name, {quote(dim)} AS dimension_type, "
        f"g.dval AS dimension_value, {_OUT.format(vals='x.vals')} "
        f"FROM (SELECT {gran} AS granularity, {bucket} AS bucket_time, {dval} AS dval, {', '.join(aggs)} "
        f"FROM ({src}) s GROUP BY GROUPING SETS ({sets})) g "
        f"CROSS JOIN LATERAL (VALUES {', '.join(values)}) AS x(metric_name, c, s, lo, hi, p, vals) "
        "WHERE x.c > 0"
    )
    return Statement(level, dim, grans, tuple(m.name for m in metrics), None, sql)


def capped_statement(level: Level, dim: str, metric: Metric, cap: int, granularities: tuple[str, ...],
                     with_values: bool) -> Statement:
    """One metric of a capped dimension: per bucket keep the K smallest (hash, value), the rest
    -> __other__, then aggregate, so __other__'s percentiles are exact over its raw values.

    The cap is decided per metric (a value takes a slot only where the metric is not null)
    and per bucket of each granularity; the raw rows are read once for all granularities.
    """
    grans = _ordered(granularities)
    dim_sql = DIMENSIONS[dim].sql
    src = _source(level, dim_sql, grans, [f"({metric.sql})::float8 AS v"], f" AND ({metric.sql}) IS NOT NULL")
    aggs = ", ".join(_aggregates("v", metric.digest, with_values, ""))
    parts = [f"s AS MATERIALIZED ({src})",
             f"h AS (SELECT dval, {CAP_HASH_SQL.format(expr='dval')} AS hv FROM (SELECT DISTINCT dval FROM s) u)"]
    selects = []
    for g in grans:
        parts.append(
            f"r_{g} AS (SELECT d.b, d.dval, row_number() OVER (PARTITION BY d.b ORDER BY h.hv, "
            f"d.dval COLLATE \"C\") AS rn FROM (SELECT DISTINCT b_{g} AS b, dval FROM s) d "
            "JOIN h ON h.dval = d.dval)")
        parts.append(
            f"g_{g} AS (SELECT s.b_{g} AS bucket_time, CASE WHEN k.rn <= {int(cap)} THEN s.dval "
            f"ELSE {quote(OTHER)} END AS dval, {aggs} FROM s JOIN r_{g} k ON k.b = s.b_{g} "
            "AND k.dval = s.dval GROUP BY 1, 2)")
        selects.append(
            f"SELECT {quote(g)} AS granularity, x.bucket_time, {quote(metric.name)} AS metric_name, "
            f"{quote(dim)} AS dimension_type, x.dval AS dimension_value, {_OUT.format(vals='x.x')} "
            f"FROM g_{g} x")
    sql = "WITH " + ", ".join(parts) + " " + " UNION ALL ".join(selects)
    return Statement(level, dim, grans, (metric.name,), cap, sql)


def aggregate_statements(registry: Registry, granularities: tuple[str, ...] | list[str],
                         with_values: bool = False) -> list[Statement]:
    """All statements computing every (granularity, bucket, metric, dimension, value) row."""
    grans = _ordered(tuple(granularities))
    out: list[Statement] = []
    for level in ("trace", "llm"):
        metrics = registry.by_level(level)  # type: ignore[arg-type]
        for dim in registry.dimensions_of(level):  # type: ignore[arg-type]
            with_dim = tuple(m for m in metrics if dim in m.dimensions)
            cap = registry.cap(dim)
            if cap is None:
                out.append(wide_statement(level, dim, with_dim, grans, with_values))  # type: ignore[arg-type]
            else:
                out += [capped_statement(level, dim, m, cap, grans, with_values)  # type: ignore[arg-type]
                        for m in with_dim]
    return out


def raw_rows_sql(registry: Registry) -> str:
    """How many raw rows (traces + llm spans) the selected metrics read in [start, end)."""
    parts = []
    for level in ("trace", "llm"):
        if registry.by_level(level):  # type: ignore[arg-type]
            table, row_filter = LEVEL_SQL[level]  # type: ignore[index]
            parts.append(f"(SELECT count(*) FROM {table} r WHERE r.started_at >= %(start)s "
                         f"AND r.started_at < %(end)s AND ({row_filter}))")
    return "SELECT " + (" + ".join(parts) if parts else "0")


def decode_values(data: bytes | memoryview | None) -> npt.NDArray[np.float64]:
    """The raw values of `array_send(array_agg(float8))` bytes (no NULL elements) as float64."""
    if data is None:
        return np.empty(0, dtype=np.float64)
    buf = bytes(data)
    if len(buf) <= 12:  # a zero-dimension (empty) array has only ndim, flags and oid
        return np.empty(0, dtype=np.float64)
    return np.frombuffer(buf, dtype=_ELEMENT, offset=_ARRAY_HEADER)["v"].astype(np.float64)


# ----------------------------------------------------------------------------- writes

_ROW_COLS = ("bucket_time, granularity, metric_name, dimension_type, dimension_value, count, sum_value, "
             "min_value, max_value, avg_value, p50_value, p95_value, p99_value")


def split_insert_sql(statement: Statement) -> str:
    """Run a statement, insert its rows without raw values into the temp table server-side,
    and return only the rows that carry raw values (digest metrics), whose digest the client
    builds: most rows then never travel to Python."""
    return (f"WITH res AS MATERIALIZED ({statement.sql}), ins AS (INSERT INTO {TMP_TABLE} ({_ROW_COLS}) "
            f"SELECT {_ROW_COLS} FROM res WHERE vals IS NULL) SELECT {_ROW_COLS}, vals FROM res "
            "WHERE vals IS NOT NULL")



TMP_TABLE = "tmp_backfill"

CREATE_TMP_SQL = (
    f"CREATE TEMP TABLE IF NOT EXISTS {TMP_TABLE} (LIKE metrics_aggregates INCLUDING DEFAULTS) "
    "ON COMMIT DELETE ROWS"
)

# Binary COPY: three times faster than text for rows carrying digest bytes.
COPY_TMP_SQL = f"COPY {TMP_TABLE} ({_ROW_COLS}, digest) FROM STDIN (FORMAT BINARY)"
COPY_TMP_TYPES = ("timestamptz", "text", "text", "text", "text", "int8", "float8", "float8", "float8", "float8",
                  "float8", "float8", "float8", "bytea")

# What a chunk wrote, per granularity: rows and distinct buckets.
TMP_COUNTS_SQL = (f"SELECT granularity, count(*), count(DISTINCT bucket_time) FROM {TMP_TABLE} "
                  "GROUP BY granularity")

_KEY_MATCH = ("t.bucket_time = a.bucket_time AND t.granularity = a.granularity AND t.metric_name = a.metric_name "
              "AND t.dimension_type = a.dimension_type AND t.dimension_value = a.dimension_value")

# The backfill is authoritative for every (granularity, bucket, metric) it computed: rows of
# those scopes that the exact result does not have (e.g. values the stream's per-partition
# cap kept beyond K, or a previous run's rows under other caps) go.
DELETE_REPLACED_SQL = (
    "DELETE FROM metrics_aggregates a USING (SELECT DISTINCT granularity, bucket_time, metric_name "
    f"FROM {TMP_TABLE}) k WHERE a.granularity = k.granularity AND a.bucket_time = k.bucket_time "
    f"AND a.metric_name = k.metric_name AND NOT EXISTS (SELECT 1 FROM {TMP_TABLE} t WHERE {_KEY_MATCH})"
)

# Rows already stored by the backfill with identical values are not rewritten, so a re-run
# changes nothing at all (not even updated_at) and leaves no dead tuples behind.
DROP_UNCHANGED_SQL = (
    f"DELETE FROM {TMP_TABLE} t USING metrics_aggregates a WHERE {_KEY_MATCH} AND a.source = 'backfill' "
    "AND (a.count, a.sum_value, a.min_value, a.max_value, a.avg_value, a.p50_value, a.p95_value, "
    "a.p99_value, a.digest) IS NOT DISTINCT FROM (t.count, t.sum_value, t.min_value, t.max_value, "
    "t.avg_value, t.p50_value, t.p95_value, t.p99_value, t.digest)"
)

# --prune: stream rows of the range whose (granularity, bucket, metric) has no raw data.
PRUNE_SQL = (
    "DELETE FROM metrics_aggregates a WHERE a.source = 'stream' AND a.granularity = ANY(%(grans)s) "
    "AND a.metric_name = ANY(%(metrics)s) AND a.bucket_time >= %(start)s AND a.bucket_time < %(end)s "
    f"AND NOT EXISTS (SELECT 1 FROM {TMP_TABLE} t WHERE t.granularity = a.granularity "
    "AND t.bucket_time = a.bucket_time AND t.metric_name = a.metric_name)"
)

# Stored rows of a range, for verify.
STORED_ROWS_SQL = (
    "SELECT bucket_time, granularity, metric_name, dimension_type, dimension_value, count, sum_value, "
    "min_value, max_value, avg_value, p50_value, p95_value, p99_value, source FROM metrics_aggregates "
    "WHERE granularity = ANY(%(grans)s) AND metric_name = ANY(%(metrics)s) "
    "AND bucket_time >= %(start)s AND bucket_time < %(end)s"
)

# ----------------------------------------------------------------------------- replay

# Stream rows of the replayed buckets: re-merged too, so a row without partials is removed.
STREAM_ROW_KEYS_SQL = (
    "SELECT a.granularity, a.bucket_time, a.metric_name, a.dimension_type, a.dimension_value "
    "FROM metrics_aggregates a JOIN unnest(%(grans)s::text[], %(times)s::timestamptz[]) AS b(g, t) "
    "ON a.granularity = b.g AND a.bucket_time = b.t WHERE a.source = 'stream' AND a.metric_name = ANY(%(metrics)s)"
)
