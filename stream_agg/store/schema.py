"""Tables, declared once with SQLAlchemy metadata; `migrate` creates or upgrades them.

`schemas/tables.sql` is this metadata compiled to plain SQL for people who don't use
the CLI (a test keeps the two equal). Upgrades are an ordered list of steps recorded
in `stream_agg_schema`, so `migrate` on an up-to-date database is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    func,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateIndex, CreateTable

if TYPE_CHECKING:
    import psycopg

metadata = MetaData()

GRANULARITY_CHECK = "granularity IN ('hour', 'day', 'week')"


def _scope_columns() -> list[Column]:
    """(bucket, granularity, metric, dimension): the scope of a row's value, new objects per table."""
    return [
        Column("bucket_time", DateTime(timezone=True), nullable=False),
        Column("granularity", Text, nullable=False),
        Column("metric_name", Text, nullable=False),
        Column("dimension_type", Text, nullable=False),
    ]


metrics_aggregates = Table(
    "metrics_aggregates",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    *_scope_columns(),
    Column("dimension_value", Text, nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("sum_value", Double, nullable=False),
    Column("min_value", Double),
    Column("max_value", Double),
    Column("avg_value", Double),
    Column("p50_value", Double),
    Column("p95_value", Double),
    Column("p99_value", Double),
    Column("digest", LargeBinary),
    Column("source", Text, nullable=False, server_default="stream"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("bucket_time", "granularity", "metric_name", "dimension_type", "dimension_value",
                     name="metrics_aggregates_bucket_key"),
    CheckConstraint(GRANULARITY_CHECK, name="metrics_aggregates_granularity_check"),
    CheckConstraint("source IN ('stream', 'backfill')", name="metrics_aggregates_source_check"),
    postgresql_with={"fillfactor": 70},  # rows are rewritten every flush: leave room for HOT updates
)
# Dashboards ask: one metric, one granularity, one dimension type (maybe one value), a range.
Index("metrics_aggregates_dashboard_idx", metrics_aggregates.c.metric_name, metrics_aggregates.c.granularity,
      metrics_aggregates.c.dimension_type, metrics_aggregates.c.dimension_value,
      metrics_aggregates.c.bucket_time)

traces = Table(
    "traces",
    metadata,
    Column("trace_id", Text, primary_key=True),
    Column("operation_type", Text, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("duration_ms", Double, nullable=False),
    Column("status", Text, nullable=False),
    Column("user_id", Text),
    Column("kb_id", Text),
    Column("total_tokens", BigInteger),
    Column("source_partition", Integer),
    Column("source_offset", BigInteger),
    Column("ingested_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
Index("traces_started_at_idx", traces.c.started_at)

# Spans carry their trace's started_at and operation_type: the bucket of a span is its
# trace's bucket, and the backfill then reads one table per level without a join.
spans = Table(
    "spans",
    metadata,
    Column("trace_id", Text, nullable=False),
    Column("span_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("model", Text),
    Column("duration_ms", Double, nullable=False),
    Column("input_tokens", BigInteger),
    Column("output_tokens", BigInteger),
    Column("status", Text),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("operation_type", Text, nullable=False),
    PrimaryKeyConstraint("trace_id", "span_id", name="spans_pkey"),
)
Index("spans_kind_started_at_idx", spans.c.kind, spans.c.started_at)

# The stream's durable state: per source partition and bucket, every AggState of that
# bucket as one blob (core.aggstate.encode_bucket), and per partition the next offset to
# read plus the event-time watermark, written in the same transaction (see
# stream_agg/store/stream_state.py for why that gives an exactly-once effect). One row
# per bucket rather than per key: a flush then writes hundreds of rows, not hundreds of
# thousands.
def _blob_columns() -> list[Column]:
    """The columns of a (stream, bucket, partition) blob row, new objects for each table."""
    return [
        Column("stream", Text, nullable=False),
        Column("granularity", Text, nullable=False),
        Column("bucket_time", DateTime(timezone=True), nullable=False),
        Column("partition", Integer, nullable=False),
        Column("states", LargeBinary, nullable=False),
        Column("keys", Integer, nullable=False),
        Column("applied_offset", BigInteger, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    ]


stream_partials = Table(
    "stream_partials",
    metadata,
    *_blob_columns(),
    PrimaryKeyConstraint("stream", "granularity", "bucket_time", "partition", name="stream_partials_pkey"),
)

# Changed states of a partial, written instead of the whole blob when a flush changed few
# of a stored bucket's states (late events into a closed bucket: rewriting all ~2,500
# states of a bucket for a handful of events was ~3/4 of the blob bytes a backlog wrote).
# Same blob format, holding only the changed keys' whole states; a reader applies a
# bucket's deltas over its stream_partials blob in applied_offset order (later wins per
# key). Writing the whole blob again deletes them (store/stream_state.py).
stream_partial_deltas = Table(
    "stream_partial_deltas",
    metadata,
    *_blob_columns(),
    PrimaryKeyConstraint("stream", "granularity", "bucket_time", "partition", "applied_offset",
                         name="stream_partial_deltas_pkey"),
)

stream_offsets = Table(
    "stream_offsets",
    metadata,
    Column("stream", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("next_offset", BigInteger, nullable=False),
    Column("max_event_time", Double),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("stream", "partition", name="stream_offsets_pkey"),
)

# Per scope of a capped dimension (bucket, metric, dimension): the cut (cap hash, value)
# of the last value kept when its stream rows were last written. Invariant: no stream row
# of the scope other than `__other__` is past it. A writer whose cut is not below the
# stored one then has nothing to delete, which spares scanning the scope's ~K rows for
# rows past the cut at every flush (core/global_cap.py, store/stream_state.py).
stream_cap_cuts = Table(
    "stream_cap_cuts",
    metadata,
    *_scope_columns(),
    Column("cap_hash", BigInteger, nullable=False),
    Column("cap_value", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("bucket_time", "granularity", "metric_name", "dimension_type",
                         name="stream_cap_cuts_pkey"),
)

# Per stream, the event time before which every partition's events are too late
# (core/retention.py): the buckets ending at or before it have had their stream state
# deleted. Only moves forward; the worker reads it at assignment and in every flush.
stream_retention = Table(
    "stream_retention",
    metadata,
    Column("stream", Text, nullable=False),
    Column("pruned_before", Double, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("stream", name="stream_retention_pkey"),
)

schema_version = Table(
    "stream_agg_schema",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)


def _v1(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=True)


def _v2(conn: Connection) -> None:
    stream_cap_cuts.create(conn, checkfirst=True)
    stream_partial_deltas.create(conn, checkfirst=True)


def _v3(conn: Connection) -> None:
    stream_retention.create(conn, checkfirst=True)


# Ordered upgrade steps; append, never edit a released one. (v1 creates every table of
# the metadata, so on a new database v2 and v3 find their tables there already.) A change
# of what the stream stores (a new blob codec, a new meaning of a column) is a step too,
# an empty one if no DDL changes: then `refuse_newer` keeps the older versions away.
MIGRATIONS: tuple[tuple[int, Callable[[Connection], None]], ...] = ((1, _v1), (2, _v2), (3, _v3))
LATEST = MIGRATIONS[-1][0]


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer stream-agg than this one."""


def refuse_newer(version: int) -> None:
    """Stop before touching a database migrated by a newer stream-agg.

    Why: a newer version may store state this one cannot read or would write over in its
    older format. The last blob codec change (version 2 of the partial blobs) had no such
    guard: an older worker started on new blobs and stopped at the first one it loaded.
    """
    if version > LATEST:
        raise SchemaTooNewError(
            f"the database's stream-agg schema is version {version}, newer than this stream-agg knows "
            f"(up to {LATEST}); it may hold state this version cannot read: run the stream-agg that "
            "migrated it, or a newer one")


def schema_version_of(conn: psycopg.Connection[Any]) -> int:
    """The version recorded in `stream_agg_schema`, on a psycopg connection (0: no such table,
    or a role that may not read it, such as a read-only dashboard role: nothing to refuse on)."""
    row = conn.execute("SELECT coalesce(has_table_privilege(to_regclass('stream_agg_schema'), 'SELECT'), false)"
                       ).fetchone()
    if not row or not row[0]:
        return 0
    got = conn.execute("SELECT coalesce(max(version), 0) FROM stream_agg_schema").fetchone()
    return int(got[0]) if got else 0


def make_engine(url: str) -> Engine:
    """SQLAlchemy engine on psycopg 3 for any postgresql:// URL."""
    import re

    return create_engine(re.sub(r"^postgres(ql)?(\+psycopg)?://", "postgresql+psycopg://", url),
                         pool_pre_ping=True)


def migrate(url_or_engine: str | Engine) -> list[int]:
    """Create or upgrade the tables; returns the versions applied (empty = already current).
    Raises SchemaTooNewError on a database a newer stream-agg migrated.

    A transaction-scoped advisory lock serialises concurrent migrations (several workers
    starting at once).
    """
    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    applied: list[int] = []
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
        schema_version.create(conn, checkfirst=True)
        current = conn.execute(text("SELECT coalesce(max(version), 0) FROM stream_agg_schema")).scalar_one()
        refuse_newer(current)
        for version, step in MIGRATIONS:
            if version > current:
                step(conn)
                conn.execute(schema_version.insert().values(version=version))
                applied.append(version)
    return applied


def current_version(url_or_engine: str | Engine) -> int:
    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    with engine.connect() as conn:
        exists = conn.execute(text("SELECT to_regclass('stream_agg_schema') IS NOT NULL")).scalar_one()
        if not exists:
            return 0
        return int(conn.execute(text("SELECT coalesce(max(version), 0) FROM stream_agg_schema")).scalar_one())


def ddl_sql() -> str:
    """The whole schema as plain PostgreSQL DDL (what `schemas/tables.sql` holds)."""
    from sqlalchemy.dialects import postgresql

    dialect = postgresql.dialect()
    parts = ["-- Generated from stream_agg/store/schema.py by `stream-agg migrate --print-sql`.",
             "-- Apply with psql if you don't use the CLI; `stream-agg migrate` does the same.", ""]
    for table in metadata.sorted_tables:
        create = str(CreateTable(table, if_not_exists=True).compile(dialect=dialect)).strip()
        parts.append(create + ";")
        for index in sorted(table.indexes, key=lambda i: i.name or ""):
            parts.append(str(CreateIndex(index, if_not_exists=True).compile(dialect=dialect)).strip() + ";")
        parts.append("")
    parts.append(f"INSERT INTO stream_agg_schema (version) VALUES ({LATEST}) ON CONFLICT DO NOTHING;")
    return "\n".join(parts) + "\n"
