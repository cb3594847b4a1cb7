"""The stream's durable state in PostgreSQL and the flush transaction.

Why PostgreSQL and not Faust tables: the partial states, the partition's next offset
and the event-time watermark must change *together* for a crash to be harmless. One
PostgreSQL transaction gives that without Kafka transactions (which the embedded broker
lacks); a Faust changelog and the consumer offset commit are two separate writes, and
a changelog per key update would double the per-event cost.

One flush transaction, for all partitions this worker owns:
1. upsert the changed partial states `(stream, key, partition)` (fenced: never
   replace a partial with one that has folded less),
2. advance `stream_offsets` (fenced the same way: a zombie worker that lost the
   partition cannot move it back),
3. archive the raw traces / spans (`ON CONFLICT DO NOTHING`: same trace twice = one row),
4. lock the touched buckets (advisory locks, sorted, so two workers never deadlock and
   never interleave a read-merge-write of the same row), read every partition's
   partial of each changed key, merge, and upsert `metrics_aggregates`, never over a
   row whose source is 'backfill'.
"""

from __future__ import annotations

import logging
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from stream_agg.core.aggstate import AggState, digest_to_bytes
from stream_agg.core.buckets import to_datetime
from stream_agg.core.fold import BucketId, Key
from stream_agg.store.db import connect

log = logging.getLogger(__name__)

QUANTILES = (0.5, 0.95, 0.99)


class FencedError(RuntimeError):
    """Another worker has moved a partition past us: our view of it is stale."""


@dataclass
class PartitionFlush:
    """What one partition contributes to a flush (a snapshot taken in the event loop)."""

    partition: int
    next_offset: int
    max_event_time: float | None
    base_offset: int | None  # next_offset as loaded / last flushed (fencing)
    upserts: list[tuple[Key, AggState]] = field(default_factory=list)
    removed: list[Key] = field(default_factory=list)


@dataclass
class FlushPayload:
    """One flush. `memory` / `resident` let the merge skip what this worker already holds.

    `resident` lists the (granularity, bucket, partition) whose every stored partial is
    in this worker's memory; for those, `memory[key]` has the states and PostgreSQL is
    not asked again. With one worker owning every partition, the merge reads nothing back.
    """

    stream: str
    partitions: list[PartitionFlush]
    traces: list[tuple[Any, ...]] = field(default_factory=list)
    spans: list[tuple[Any, ...]] = field(default_factory=list)
    memory: dict[Key, list[AggState]] = field(default_factory=dict)
    resident: list[tuple[str, int, int]] = field(default_factory=list)
    complete: set[tuple[str, int]] = field(default_factory=set)  # buckets resident in every partition

    @property
    def changed_keys(self) -> set[Key]:
        keys: set[Key] = set()
        for p in self.partitions:
            keys.update(k for k, _ in p.upserts)
            keys.update(p.removed)
        return keys


@dataclass
class FlushReport:
    partials: int
    rows: int
    deleted_rows: int
    traces: int
    spans: int


@dataclass(frozen=True)
class MergedRow:
    key: Key
    state: AggState

    def values(self) -> tuple[Any, ...]:
        g, bucket, metric, dim, value = self.key
        s = self.state
        qs = [s.quantile(q) for q in QUANTILES]
        digest = digest_to_bytes(s.digest) if s.digest is not None else None
        return (to_datetime(bucket), g, metric, dim, value, s.count, s.sum, s.min, s.max, s.avg,
                qs[0], qs[1], qs[2], digest)


def _ts(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


def bucket_lock_id(granularity: str, bucket: int) -> int:
    """Advisory-lock id of a bucket (all metrics of one bucket share a lock)."""
    return zlib.crc32(f"stream-agg:{granularity}:{bucket}".encode())


_KEY_COLS = "granularity, bucket_time, metric_name, dimension_type, dimension_value"


class StreamStore:
    """Reads and writes the stream's state; one psycopg connection, used from one thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection | None = None

    # ----------------------------------------------------------------- connection

    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.url)
        return self._conn

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None

    def _reset(self) -> None:
        """Forget a connection that failed mid-transaction."""
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may raise anything
                pass
        self._conn = None

    # ----------------------------------------------------------------- reads

    def load_offsets(self, stream: str, partitions: Iterable[int]) -> dict[int, tuple[int, float | None]]:
        """partition -> (next offset, max event time) for partitions that have a row."""
        parts = sorted(set(partitions))
        try:
            with self.conn().transaction(), self.conn().cursor() as cur:
                cur.execute(
                    "SELECT partition, next_offset, max_event_time FROM stream_offsets "
                    "WHERE stream = %s AND partition = ANY(%s)", (stream, parts))
                return {int(p): (int(o), None if t is None else float(t)) for p, o, t in cur.fetchall()}
        except psycopg.Error:
            self._reset()
            raise

    def load_buckets(self, stream: str, partition: int, buckets: Sequence[BucketId]) -> dict[Key, AggState]:
        """Every stored partial state of `partition` in the given buckets."""
        if not buckets:
            return {}
        grans = [g for g, _ in buckets]
        times = [_ts(b) for _, b in buckets]
        out: dict[Key, AggState] = {}
        try:
            with self.conn().transaction(), self.conn().cursor() as cur:
                cur.execute(
                    f"SELECT {_KEY_COLS}, count, sum_value, min_value, max_value, digest, applied_offset "
                    "FROM stream_partials p JOIN unnest(%s::text[], %s::timestamptz[]) AS b(g, t) "
                    "ON p.granularity = b.g AND p.bucket_time = b.t "
                    "WHERE p.stream = %s AND p.partition = %s",
                    (grans, times, stream, partition))
                for g, t, m, d, v, c, s, lo, hi, dig, applied in cur:
                    key: Key = (g, int(t.timestamp()), m, d, v)
                    out[key] = _state(c, s, lo, hi, dig, applied)
        except psycopg.Error:
            self._reset()
            raise
        return out

    # ----------------------------------------------------------------- flush

    def flush(self, payload: FlushPayload) -> FlushReport:
        """Write one flush atomically (see module docstring). Raises FencedError if stale."""
        try:
            conn = self.conn()
            with conn.transaction(), conn.cursor() as cur:
                partials = self.write_partials(cur, payload)
                self._advance_offsets(cur, payload)
                traces, spans = self._archive(cur, payload)
                rows, deleted = self.merge_rows(cur, payload.stream, payload.changed_keys, payload.memory,
                                                 payload.resident, payload.complete)
            return FlushReport(partials, rows, deleted, traces, spans)
        except psycopg.Error:
            self._reset()
            raise
        except FencedError:
            self._reset()
            raise

    def write_partials(self, cur: psycopg.Cursor, payload: FlushPayload) -> int:
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS tmp_partials (LIKE stream_partials INCLUDING DEFAULTS) "
            "ON COMMIT DELETE ROWS")
        n = 0
        with cur.copy(
            f"COPY tmp_partials (stream, {_KEY_COLS}, partition, count, sum_value, min_value, "
            "max_value, digest, applied_offset) FROM STDIN"
        ) as copy:
            for part in payload.partitions:
                for (g, b, m, d, v), s in part.upserts:
                    copy.write_row((payload.stream, g, _ts(b), m, d, v, part.partition, s.count, s.sum,
                                    s.min, s.max, None if s.digest is None else s.digest.to_bytes(),
                                    s.applied_offset))
                    n += 1
        cur.execute(
            f"INSERT INTO stream_partials AS p (stream, {_KEY_COLS}, partition, count, sum_value, "
            "min_value, max_value, digest, applied_offset, updated_at) "
            f"SELECT stream, {_KEY_COLS}, partition, count, sum_value, min_value, max_value, digest, "
            "applied_offset, now() FROM tmp_partials "
            f"ON CONFLICT (stream, {_KEY_COLS}, partition) DO UPDATE SET count = EXCLUDED.count, "
            "sum_value = EXCLUDED.sum_value, min_value = EXCLUDED.min_value, "
            "max_value = EXCLUDED.max_value, digest = EXCLUDED.digest, "
            "applied_offset = EXCLUDED.applied_offset, updated_at = now() "
            "WHERE p.applied_offset <= EXCLUDED.applied_offset")
        removed = [(payload.stream, p.partition, *k[:1], _ts(k[1]), *k[2:])
                   for p in payload.partitions for k in p.removed]
        if removed:
            cur.executemany(
                "DELETE FROM stream_partials WHERE stream = %s AND partition = %s AND granularity = %s "
                "AND bucket_time = %s AND metric_name = %s AND dimension_type = %s "
                "AND dimension_value = %s", removed)
        return n

    def _advance_offsets(self, cur: psycopg.Cursor, payload: FlushPayload) -> None:
        for part in payload.partitions:
            cur.execute(
                "INSERT INTO stream_offsets AS o (stream, partition, next_offset, max_event_time, updated_at) "
                "VALUES (%s, %s, %s, %s, now()) ON CONFLICT (stream, partition) DO UPDATE SET "
                "next_offset = EXCLUDED.next_offset, max_event_time = EXCLUDED.max_event_time, "
                "updated_at = now() WHERE o.next_offset <= %s RETURNING next_offset",
                (payload.stream, part.partition, part.next_offset, part.max_event_time,
                 part.base_offset if part.base_offset is not None else part.next_offset))
            if cur.fetchone() is None:
                raise FencedError(
                    f"partition {part.partition} of {payload.stream} was advanced by another worker "
                    f"past our base offset {part.base_offset}")

    def _archive(self, cur: psycopg.Cursor, payload: FlushPayload) -> tuple[int, int]:
        if not payload.traces and not payload.spans:
            return 0, 0
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS tmp_traces (LIKE traces INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS tmp_spans (LIKE spans) ON COMMIT DELETE ROWS")
        with cur.copy(
            "COPY tmp_traces (trace_id, operation_type, started_at, duration_ms, status, user_id, kb_id, "
            "total_tokens, source_partition, source_offset) FROM STDIN"
        ) as copy:
            for row in payload.traces:
                copy.write_row(row)
        cur.execute(
            "INSERT INTO traces (trace_id, operation_type, started_at, duration_ms, status, user_id, kb_id, "
            "total_tokens, source_partition, source_offset) SELECT DISTINCT ON (trace_id) trace_id, "
            "operation_type, started_at, duration_ms, status, user_id, kb_id, total_tokens, "
            "source_partition, source_offset FROM tmp_traces ORDER BY trace_id, source_offset "
            "ON CONFLICT (trace_id) DO NOTHING")
        traces = cur.rowcount
        spans = 0
        if payload.spans:
            with cur.copy(
                "COPY tmp_spans (trace_id, span_id, kind, model, duration_ms, input_tokens, output_tokens, "
                "status, started_at, operation_type) FROM STDIN"
            ) as copy:
                for row in payload.spans:
                    copy.write_row(row)
            cur.execute(
                "INSERT INTO spans SELECT DISTINCT ON (trace_id, span_id) * FROM tmp_spans "
                "ORDER BY trace_id, span_id ON CONFLICT (trace_id, span_id) DO NOTHING")
            spans = cur.rowcount
        return traces, spans

    def merge_rows(self, cur: psycopg.Cursor, stream: str, keys: set[Key],
                    memory: dict[Key, list[AggState]] | None = None,
                    resident: list[tuple[str, int, int]] | None = None,
                    complete: set[tuple[str, int]] | None = None) -> tuple[int, int]:
        """Recompute metrics_aggregates rows of `keys` from every partition's partial.

        Partials of (bucket, partition) pairs listed in `resident` come from `memory`;
        all others are read from stream_partials under the bucket locks, except for
        `complete` buckets, which this worker holds for every partition of the topic.
        """
        if not keys:
            return 0, 0
        for lock in sorted({bucket_lock_id(k[0], k[1]) for k in keys}):
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
        ordered = sorted(keys)
        cols: list[list[Any]] = [[], [], [], [], []]
        done = complete or set()
        for g, b, m, d, v in ordered:
            if (g, b) in done:
                continue
            cols[0].append(g)
            cols[1].append(_ts(b))
            cols[2].append(m)
            cols[3].append(d)
            cols[4].append(v)
        res = resident or []
        if cols[0]:
            cur.execute(
                "SELECT p.granularity, p.bucket_time, p.metric_name, p.dimension_type, p.dimension_value, "
                "p.count, p.sum_value, p.min_value, p.max_value, p.digest, p.applied_offset "
                "FROM unnest(%s::text[], %s::timestamptz[], %s::text[], %s::text[], %s::text[]) "
                "AS k(g, t, m, d, v) JOIN stream_partials p ON p.stream = %s AND p.granularity = k.g "
                "AND p.bucket_time = k.t AND p.metric_name = k.m AND p.dimension_type = k.d "
                "AND p.dimension_value = k.v "
                "WHERE NOT EXISTS (SELECT 1 FROM unnest(%s::text[], %s::timestamptz[], %s::int[]) AS r(g, t, p) "
                "WHERE r.g = p.granularity AND r.t = p.bucket_time AND r.p = p.partition)",
                (*cols, stream, [r[0] for r in res], [_ts(r[1]) for r in res], [r[2] for r in res]))
        partials: dict[Key, list[AggState]] = defaultdict(list)
        if memory:
            for key in ordered:
                held = memory.get(key)
                if held:
                    partials[key].extend(held)
        for g, t, m, d, v, c, s, lo, hi, dig, applied in (cur if cols[0] else ()):
            partials[(g, int(t.timestamp()), m, d, v)].append(_state(c, s, lo, hi, dig, applied))
        rows = [MergedRow(k, _merge(states)) for k, states in partials.items()]
        gone = [k for k in ordered if k not in partials]
        if rows:
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS tmp_rows (LIKE metrics_aggregates INCLUDING DEFAULTS) "
                "ON COMMIT DELETE ROWS")
            with cur.copy(
                "COPY tmp_rows (bucket_time, granularity, metric_name, dimension_type, dimension_value, "
                "count, sum_value, min_value, max_value, avg_value, p50_value, p95_value, p99_value, digest) "
                "FROM STDIN"
            ) as copy:
                for row in rows:
                    copy.write_row(row.values())
            cur.execute(UPSERT_ROWS_SQL.format(source="stream", tmp="tmp_rows"))
        deleted = 0
        if gone:
            cur.executemany(
                "DELETE FROM metrics_aggregates WHERE granularity = %s AND bucket_time = %s "
                "AND metric_name = %s AND dimension_type = %s AND dimension_value = %s "
                "AND source = 'stream'", [(g, _ts(b), m, d, v) for g, b, m, d, v in gone])
            deleted = len(gone)
        return len(rows), deleted


# Upsert of computed rows; `source` is the writer. The stream never replaces a backfilled
# row (the backfill is exact and authoritative); the backfill replaces anything.
UPSERT_ROWS_SQL = (
    "INSERT INTO metrics_aggregates AS a (bucket_time, granularity, metric_name, dimension_type, "
    "dimension_value, count, sum_value, min_value, max_value, avg_value, p50_value, p95_value, "
    "p99_value, digest, source, updated_at) "
    "SELECT bucket_time, granularity, metric_name, dimension_type, dimension_value, count, sum_value, "
    "min_value, max_value, avg_value, p50_value, p95_value, p99_value, digest, '{source}', now() "
    "FROM {tmp} ON CONFLICT (bucket_time, granularity, metric_name, dimension_type, dimension_value) "
    "DO UPDATE SET count = EXCLUDED.count, sum_value = EXCLUDED.sum_value, "
    "min_value = EXCLUDED.min_value, max_value = EXCLUDED.max_value, avg_value = EXCLUDED.avg_value, "
    "p50_value = EXCLUDED.p50_value, p95_value = EXCLUDED.p95_value, p99_value = EXCLUDED.p99_value, "
    "digest = EXCLUDED.digest, source = EXCLUDED.source, updated_at = now() "
    "WHERE a.source <> 'backfill' OR EXCLUDED.source = 'backfill'"
)


def _state(c: int, s: float, lo: float, hi: float, dig: bytes | None, applied: int) -> AggState:
    from fastdigest import TDigest

    digest = TDigest.from_bytes(bytes(dig)) if dig is not None else None
    return AggState(int(c), float(s), float(lo), float(hi), digest, int(applied))


def _merge(states: list[AggState]) -> AggState:
    if len(states) == 1:
        return states[0]
    return AggState.merge_many(states, any(s.digest is not None for s in states))
