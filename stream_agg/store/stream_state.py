"""The stream's durable state in PostgreSQL and the flush transaction.

Why PostgreSQL and not Faust tables: the partial states, the partition's next offset
and the event-time watermark must change *together* for a crash to be harmless. One
PostgreSQL transaction gives that without Kafka transactions (which the embedded broker
lacks); a Faust changelog and the consumer offset commit are two separate writes, and
a changelog per key update would double the per-event cost.

One flush transaction, for all partitions this worker owns:
0. take the stream's prune lock (shared) and refuse, as fenced, a flush into a bucket
   pruned meanwhile (store/retention.py),
1. advance `stream_offsets` (fenced: a zombie worker that lost the partition cannot
   move it back),
2. archive the raw traces / spans (`ON CONFLICT DO NOTHING`: same trace twice = one row),
3. lock the touched buckets (advisory locks, sorted, so two workers never deadlock and
   never interleave a read-merge-write of the same row), read every other partition's
   partial of each changed key, merge, and upsert `metrics_aggregates`, never over a
   row whose source is 'backfill',
4. upsert the changed partial states `(stream, bucket, partition)` (fenced the same
   way: never replace a partial with one that has folded less).

The partials go last so that compressing them (zstd, on a thread of its own: it releases
the GIL) overlaps PostgreSQL's work on steps 1-3 instead of adding to the flush: ~1.8 s
of zlib (as it was then) per million events was on the flush's critical path. The order
inside the transaction changes nothing: other workers wait on the bucket locks until commit, and
the partials this flush writes are of buckets in this worker's memory, which step 3
takes from memory, never from the table.
"""

from __future__ import annotations

import logging
import queue
import time
import zlib
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import numpy as np
import psycopg

from stream_agg.core.aggstate import AggState, compress_blob, decode_bucket, decode_bucket_items, is_compressed
from stream_agg.core.cardinality import CAP_HASH_SQL
from stream_agg.core.fold import BucketId, Key
from stream_agg.core.global_cap import Cut, Scope, cap_states
from stream_agg.core.merged_rows import RowBlock, blocks_from_states
from stream_agg.core.partition_state import MAX_DELTAS
from stream_agg.core.registry import OTHER
from stream_agg.core.state_table import HOUR, I64, member_of_sorted, sorted_unique
from stream_agg.core.watermark import WatermarkPolicy
from stream_agg.store import retention, rows_copy
from stream_agg.store.archive_copy import SPAN_COLUMNS, TRACE_COLUMNS
from stream_agg.store.db import connect
from stream_agg.store.schema import schema_version_of
from stream_agg.store.table_stats import StatsRefresher

log = logging.getLogger(__name__)
T = TypeVar("T")



class FencedError(RuntimeError):
    """Another worker has moved a partition past us: our view of it is stale."""


@dataclass
class PartitionFlush:
    """What one partition contributes to a flush (a snapshot taken on the folding thread).

    `buckets`: (granularity, bucket, blob of all its states) for every bucket that changed;
    `changed`: the keys whose merged rows the writer must recompute (new, updated or
    removed), but those of buckets the caller merged itself (`FlushPayload.complete`).
    """

    partition: int
    next_offset: int
    max_event_time: float | None
    base_offset: int | None  # next_offset as loaded / last flushed (fencing)
    buckets: list[tuple[str, int, bytes, int]] = field(default_factory=list)  # (g, bucket, blob, keys)
    changed: list[Key] = field(default_factory=list)
    deltas: set[int] = field(default_factory=set)  # indexes in `buckets` of blobs holding changed states only


@dataclass
class FlushPayload:
    """One flush. `memory` / `resident` let the merge skip what this worker already holds.

    `resident` lists the (granularity, bucket, partition) whose every stored partial is
    in this worker's memory; for those, `memory[key]` has the states and PostgreSQL is
    not asked again. With one worker owning every partition, the merge reads nothing back.
    """

    stream: str
    partitions: list[PartitionFlush]
    traces: list[str] = field(default_factory=list)  # COPY text chunks (store.archive_copy)
    spans: list[str] = field(default_factory=list)
    memory: dict[Key, list[tuple[int, AggState]]] = field(default_factory=dict)  # key -> (partition, state)
    resident: list[tuple[str, int, int]] = field(default_factory=list)
    complete: set[BucketId] = field(default_factory=set)  # buckets resident in every partition
    # rows of `complete` buckets merged by the caller; a RowFeed while it is still merging them
    blocks: list[RowBlock] | RowFeed = field(default_factory=list)
    gone: list[Key] = field(default_factory=list)  # rows of `complete` buckets to delete
    caps: dict[str, int] = field(default_factory=dict)  # the registry's cardinality caps
    # cut of each written scope at or over its cap (global_cap); filled by the merge, so
    # complete only once `blocks` (a RowFeed) has ended
    cuts: dict[Scope, Cut] = field(default_factory=dict)
    # set while the partitions' blobs are still being encoded (by the caller's thread)
    encoded: BlobFeed | None = None
    # earliest end (epoch seconds) of a bucket this flush changes: checked against the prune floor
    earliest_end: int | None = None

    @property
    def changed_keys(self) -> set[Key]:
        keys: set[Key] = set()
        for p in self.partitions:
            keys.update(p.changed)
        return keys


@dataclass
class FlushReport:
    partials: int
    rows: int
    deleted_rows: int
    traces: int
    spans: int
    seconds: dict[str, float] = field(default_factory=dict)  # per phase, for the flush log line
    floor: float | None = None  # the stream's prune floor, read in the flush's transaction
    new_rows: int = 0  # of `rows`, those COPYed into buckets that had none (the others were upserted)


class Feed(Generic[T]):
    """Items handed one by one from the thread making them to the thread writing them.

    Unbounded on purpose: a bound would make the processing thread wait on the writer.
    `close(error)` makes the reader raise, so a failure on the making side fails the
    write instead of leaving it waiting. Read again (a retried write), it gives the items
    already read, then goes on where the last reading stopped."""

    _END = object()

    def __init__(self, what: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._what = what
        self._items: list[T] = []
        self._ended = False
        self._error: BaseException | None = None

    def put(self, item: T) -> None:
        self._queue.put(item)

    def pending(self) -> int:
        """Items put and not yet taken by the reader (approximately: for pacing the maker)."""
        return self._queue.qsize()

    def close(self, error: BaseException | None = None) -> None:
        """Everything is made, or making it failed with `error`."""
        self._queue.put(self._END if error is None else error)

    def __iter__(self) -> Iterator[T]:
        i = 0
        while i < len(self._items):
            yield self._items[i]
            i += 1
        while not self._ended:
            if self._error is None:
                item = self._queue.get()
                if item is self._END:
                    self._ended = True
                    return
                if not isinstance(item, BaseException):
                    self._items.append(item)
                    yield item
                    continue
                self._error = item
            raise RuntimeError(f"{self._what} failed") from self._error


class BlobFeed(Feed[tuple[PartitionFlush, int]]):
    """Partial blobs, as (partition flush, index in its `buckets`), handed from the thread
    encoding them to the one compressing them: a big flush encodes ~200 MB of raw blobs,
    and each is freed as soon as the compress thread gets to it instead of after the last
    one is encoded."""

    def __init__(self) -> None:
        super().__init__("encoding the partial blobs")


class RowFeed(Feed[RowBlock]):
    """Merged row blocks (one per table) handed from the processing thread to the writer as
    each is merged: the writer COPYs rows while the next blocks are merged, instead of
    waiting for the whole merge (~1 s for the last flush of a backlog, with nothing else
    left to do). Which rows: those of buckets without any row yet (most of a backlog's
    first flush) straight into the table, or, when most buckets have rows, those to
    upsert into the staging table; the other kind waits for the last block (`_write_rows`)."""

    def __init__(self) -> None:
        super().__init__("merging the rows")


def compress_blobs(payload: FlushPayload) -> None:
    """Compress every blob in place, so each raw blob is freed as soon as it is done.

    Safe to run again on the same payload: the feed is used once, and a blob already
    compressed (its one-byte prefix; raw blobs start with msgpack's 0x92) is left alone."""
    fed = payload.encoded if payload.encoded is not None else (
        (part, i) for part in payload.partitions for i in range(len(part.buckets)))
    for part, i in fed:
        g, b, blob, n = part.buckets[i]
        if not is_compressed(blob):
            part.buckets[i] = (g, b, compress_blob(blob), n)
    payload.encoded = None


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


def bucket_lock_id(granularity: str, bucket: int) -> int:
    """Advisory-lock id of a bucket (all metrics of one bucket share a lock)."""
    return zlib.crc32(f"stream-agg:{granularity}:{bucket}".encode())


def lock_buckets(cur: psycopg.Cursor, buckets: Iterable[BucketId]) -> None:
    """Take the buckets' advisory locks (until commit) in ascending id order, in one statement.

    Why one statement: a flush under load locks a few hundred buckets, and one round trip
    per lock cost 0.2-0.8 s per flush in the worker, where each reply also waits for the
    GIL. The order is the deadlock rule every writer follows; the locks are taken in
    array order (`WITH ORDINALITY ... ORDER BY`: PostgreSQL evaluates a volatile output
    function after the sort).
    """
    ids = sorted({bucket_lock_id(g, b) for g, b in buckets})
    if ids:
        cur.execute("SELECT pg_advisory_xact_lock(x.id) FROM unnest(%s::bigint[]) WITH ORDINALITY AS x(id, i) "
                    "ORDER BY x.i", (ids,))


@contextmanager
def index_plans(cur: psycopg.Cursor) -> Iterator[None]:
    """Plan the statements inside as index nested loops over the listed keys or scopes.

    Why: right after a flush has COPYed its rows into a new table, the planner's
    statistics still describe the table as it was (nearly empty), and it hashed the whole
    table for a list of 1,600 keys (150 ms, against a few ms through the unique index).
    Each key or scope is one index range, so a nested loop is right whatever the statistics.
    """
    cur.execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off")
    yield
    # Not in a `finally`: after an error the transaction is aborted (which ends SET LOCAL
    # anyway), and a statement sent then would replace the real error with its own.
    cur.execute("SET LOCAL enable_seqscan = DEFAULT; SET LOCAL enable_hashjoin = DEFAULT; "
                "SET LOCAL enable_mergejoin = DEFAULT")


_KEY_COLS = "granularity, bucket_time, metric_name, dimension_type, dimension_value"


class StreamStore:
    """Reads and writes the stream's state; one psycopg connection, used from one thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection | None = None
        self._compressor: ThreadPoolExecutor | None = None
        self.stats = StatsRefresher(url)  # ANALYZE after bulk writes (store/table_stats.py)

    # ----------------------------------------------------------------- connection

    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.url)
        return self._conn

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None
        if self._compressor is not None:
            self._compressor.shutdown(wait=True)
            self._compressor = None
        self.stats.close()

    def _reset(self) -> None:
        """Forget a connection that failed mid-transaction."""
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may raise anything
                pass
        self._conn = None

    # ----------------------------------------------------------------- reads

    def schema_version(self) -> int:
        """The schema version recorded in the database (`schema.schema_version_of`)."""
        try:
            with self.conn().transaction():
                return schema_version_of(self.conn())
        except psycopg.Error:
            self._reset()
            raise

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

    def load_bucket_items(self, stream: str, wanted: dict[int, list[BucketId]],
                          ) -> dict[tuple[int, BucketId], StoredBucket]:
        """(partition, bucket) -> its stored states (blob and deltas applied), for every
        partition's wanted buckets, in one query (absent blobs are simply missing)."""
        pairs = [(p, g, b) for p, buckets in wanted.items() for g, b in buckets]
        if not pairs:
            return {}
        try:
            with self.conn().transaction(), self.conn().cursor() as cur:
                cur.execute(
                    f"SELECT s.partition, s.granularity, s.bucket_time, s.states, s.seq FROM ({_WITH_DELTAS}) s "
                    "JOIN unnest(%s::int[], %s::text[], %s::timestamptz[]) AS w(p, g, t) "
                    "ON s.partition = w.p AND s.granularity = w.g AND s.bucket_time = w.t WHERE s.stream = %s "
                    "ORDER BY s.partition, s.granularity, s.bucket_time, s.seq",
                    ([p for p, _, _ in pairs], [g for _, g, _ in pairs], [_ts(b) for _, _, b in pairs], stream))
                out: dict[tuple[int, BucketId], StoredBucket] = {}
                for p, g, t, blob, seq in cur.fetchall():
                    key = (int(p), (g, int(t.timestamp())))
                    items = decode_bucket_items(bytes(blob))
                    have = out.get(key)
                    if have is not None:
                        out[key] = StoredBucket(overlay(have.items, items), have.deltas + 1)
                    elif seq < 0:
                        out[key] = StoredBucket(items, 0)
                    else:
                        # deltas without their blob (someone deleted stream_partials rows): keep
                        # what they hold, and have the next flush write the whole blob
                        log.warning("partition=%s bucket=%s %s: deltas without a stored blob; the next "
                                    "flush rewrites the whole blob", p, g, t.isoformat())
                        out[key] = StoredBucket(items, MAX_DELTAS)
                return out
        except psycopg.Error:
            self._reset()
            raise

    def load_floor(self, stream: str) -> float | None:
        """The stream's prune floor (events before it are too late everywhere), or None."""
        try:
            with self.conn().transaction(), self.conn().cursor() as cur:
                return retention.read_floor(cur, stream)
        except psycopg.Error:
            self._reset()
            raise

    def prune(self, stream: str, partitions: int, policy: WatermarkPolicy) -> retention.PruneReport:
        """Move the stream's floor if its watermarks allow (a short transaction, skipped if a
        flush holds the stream's lock), then delete the state below the floor (another one)."""
        try:
            with self.conn().transaction(), self.conn().cursor() as cur:
                report = retention.move_floor(cur, stream, partitions, policy)
            if report.floor is not None:
                with self.conn().transaction(), self.conn().cursor() as cur:
                    report.deleted = retention.delete_below(cur, stream, report.floor)
            return report
        except psycopg.Error:
            self._reset()
            raise

    # ----------------------------------------------------------------- flush

    def flush(self, payload: FlushPayload) -> FlushReport:
        """Write one flush atomically (see module docstring). Raises FencedError if stale."""
        try:
            conn = self.conn()
            clock = time.perf_counter()
            phases: dict[str, float] = {}

            def lap(name: str) -> None:
                nonlocal clock
                now = time.perf_counter()
                phases[name] = now - clock
                clock = now

            if self._compressor is None:
                self._compressor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-agg-compress")
            compressing = self._compressor.submit(compress_blobs, payload)
            try:
                with conn.transaction(), conn.cursor() as cur:
                    floor = retention.floor_for_flush(cur, payload.stream)
                    self._advance_offsets(cur, payload)  # fenced first: a zombie is told so
                    if floor is not None and payload.earliest_end is not None and payload.earliest_end <= floor:
                        raise FencedError(
                            f"a bucket ending at {_ts(payload.earliest_end).isoformat()} was folded into after "
                            f"{payload.stream}'s state before {_ts(floor).isoformat()} was pruned; its events "
                            "are too late (a restart reads the floor and sends them to the DLQ)")
                    traces, spans = self._archive(cur, payload)
                    lap("archive")
                    rows, deleted, new_rows = self.merge_rows(
                        cur, payload.stream, payload.changed_keys, payload.memory, payload.resident, payload.blocks,
                        payload.gone, payload.caps, payload.cuts, payload.complete)
                    lap("rows")
                    compressing.result()
                    lap("compress")  # what is left of it once PostgreSQL is done
                    whole: list[tuple[str, int, int, bytes, int, int]] = []
                    deltas: list[tuple[str, int, int, bytes, int, int]] = []
                    for part in payload.partitions:
                        for i, (g, b, blob, n) in enumerate(part.buckets):
                            (deltas if i in part.deltas else whole).append(
                                (g, b, part.partition, blob, n, part.next_offset - 1))
                    partials = self.write_partials(cur, payload.stream, whole)
                    partials += self.write_deltas(cur, payload.stream, deltas)
                    lap("partials")
                lap("commit")
                try:
                    self.stats.wrote(new_rows)
                except Exception:  # noqa: BLE001 - only statistics: never fail a committed flush
                    log.exception("could not start refreshing metrics_aggregates' statistics")
            finally:
                wait([compressing])  # never leave a thread rewriting a payload the caller may retry
            return FlushReport(partials, rows, deleted, traces, spans, phases, floor, new_rows)
        except psycopg.Error:
            self._reset()
            raise
        except FencedError:
            self._reset()
            raise

    def write_partials(self, cur: psycopg.Cursor, stream: str,
                       blobs: Sequence[tuple[str, int, int, bytes, int, int]], fenced: bool = True) -> int:
        """Upsert one blob per (granularity, bucket, partition, blob, keys, applied offset).

        Fenced (the worker): never over a blob that has folded more. Unfenced (replay):
        replaces, keeping the higher applied offset.
        """
        if not blobs:
            return 0
        guard = "WHERE p.applied_offset <= EXCLUDED.applied_offset" if fenced else ""
        cur.executemany(
            "INSERT INTO stream_partials AS p (stream, granularity, bucket_time, partition, states, keys, "
            "applied_offset, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, now()) "
            "ON CONFLICT (stream, granularity, bucket_time, partition) DO UPDATE SET states = EXCLUDED.states, "
            "keys = EXCLUDED.keys, applied_offset = GREATEST(p.applied_offset, EXCLUDED.applied_offset), "
            f"updated_at = now() {guard}",
            [(stream, g, _ts(b), part, blob, n, applied) for g, b, part, blob, n, applied in blobs])
        # the whole blob holds what its deltas did (fenced: those it has folded past)
        cur.execute(
            "DELETE FROM stream_partial_deltas d USING unnest(%s::text[], %s::timestamptz[], %s::int[], %s::bigint[]) "
            "AS w(g, t, p, a) WHERE d.stream = %s AND d.granularity = w.g AND d.bucket_time = w.t "
            f"AND d.partition = w.p {'AND d.applied_offset <= w.a' if fenced else ''}",
            ([x[0] for x in blobs], [_ts(x[1]) for x in blobs], [x[2] for x in blobs], [x[5] for x in blobs],
             stream))
        return len(blobs)

    def write_deltas(self, cur: psycopg.Cursor, stream: str,
                     blobs: Sequence[tuple[str, int, int, bytes, int, int]]) -> int:
        """Insert delta blobs (changed states only), same tuples as `write_partials`.

        Keyed by applied offset: a retried flush rewrites its own delta. Stale ones cannot
        land: the offsets written first in the same transaction fence the partition."""
        if not blobs:
            return 0
        cur.executemany(
            "INSERT INTO stream_partial_deltas AS d (stream, granularity, bucket_time, partition, applied_offset, "
            "states, keys, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, now()) "
            "ON CONFLICT (stream, granularity, bucket_time, partition, applied_offset) DO UPDATE SET "
            "states = EXCLUDED.states, keys = EXCLUDED.keys, updated_at = now()",
            [(stream, g, _ts(b), part, applied, blob, n) for g, b, part, blob, n, applied in blobs])
        return len(blobs)

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
        with cur.copy(f"COPY tmp_traces ({TRACE_COLUMNS}) FROM STDIN") as copy:
            for chunk in payload.traces:
                copy.write(chunk)
        cur.execute(
            "INSERT INTO traces (trace_id, operation_type, started_at, duration_ms, status, user_id, kb_id, "
            "total_tokens, source_partition, source_offset) SELECT DISTINCT ON (trace_id) trace_id, "
            "operation_type, started_at, duration_ms, status, user_id, kb_id, total_tokens, "
            "source_partition, source_offset FROM tmp_traces ORDER BY trace_id, source_offset "
            "ON CONFLICT (trace_id) DO NOTHING")
        traces = cur.rowcount
        spans = 0
        if payload.spans:
            with cur.copy(f"COPY tmp_spans ({SPAN_COLUMNS}) FROM STDIN") as copy:
                for chunk in payload.spans:
                    copy.write(chunk)
            cur.execute(
                "INSERT INTO spans SELECT DISTINCT ON (trace_id, span_id) * FROM tmp_spans "
                "ORDER BY trace_id, span_id ON CONFLICT (trace_id, span_id) DO NOTHING")
            spans = cur.rowcount
        return traces, spans

    def merge_rows(self, cur: psycopg.Cursor, stream: str, keys: set[Key],
                   memory: dict[Key, list[tuple[int, AggState]]] | None = None,
                   resident: list[tuple[str, int, int]] | None = None,
                   blocks: Sequence[RowBlock] | RowFeed = (), gone: Sequence[Key] = (),
                   caps: Mapping[str, int] | None = None, cuts: dict[Scope, Cut] | None = None,
                   block_buckets: Collection[BucketId] = ()) -> tuple[int, int, int]:
        """Recompute the metrics_aggregates rows of `keys` from every partition's partial, and
        write them with the rows the caller merged already (`blocks`; `gone`: rows to delete).

        Partials of (bucket, partition) pairs listed in `resident` come from `memory`; all
        others are read from stream_partials under the bucket locks. A scope of a capped
        dimension (`caps`) with a key in `keys` is capped again over the union of every
        partition's values (`global_cap.cap_states`; `memory` must then hold all of its
        states). Then the stream rows past the cut of each scope in `cuts` (the caller's
        and these) are deleted, whoever wrote them.

        `blocks` may be a `RowFeed` the caller is still filling (and `cuts` with it): its
        blocks are COPYed as they come, and `block_buckets` must then name every bucket
        they may hold (the locks are taken first). `cuts` is read once the feed has ended.

        Returns (rows written, rows deleted, rows COPYed into buckets that had none).
        """
        caps = caps or {}
        capped = {k[:4] for k in keys if k[3] in caps}
        buckets = {(k[0], k[1]) for k in keys} | {(k[0], k[1]) for k in gone} | set(block_buckets)
        fed = isinstance(blocks, RowFeed)  # the locks are taken before its blocks come: checked as they do
        if not fed:
            for block in blocks:
                buckets.update((block.granularity, h * HOUR) for h in sorted_unique(block.hours).tolist())
        if not buckets:
            for block in blocks:  # an empty feed still ends (a block here has no lock: an error)
                _check_locked(block, set())
            return 0, 0, 0
        lock_buckets(cur, buckets)
        held = {(g, b, p) for g, b, p in (resident or [])}
        found: dict[Key, list[tuple[int, AggState]]] = defaultdict(list)
        for key, mine in (memory or {}).items():
            if mine and (key in keys or key[:4] in capped):
                found[key].extend(mine)
        wanted = sorted({(k[0], k[1]) for k in keys})
        if wanted:
            wanted_set = set(wanted)
            skip = [r for r in held if (r[0], r[1]) in wanted_set]
            for (key, partition), state in read_bucket_states(cur, stream, wanted, skip=skip).items():
                if (key in keys or key[:4] in capped) and (key[0], key[1], partition) not in held:
                    found[key].append((partition, state))
        # merged in partition order, so the same partials always give the same bytes
        parts = {k: [s for _, s in sorted(v, key=lambda ps: ps[0])] for k, v in found.items()}
        own_cuts: dict[Scope, Cut] = {}
        states = cap_states(parts, keys, caps, own_cuts, _merge)
        keyed = blocks_from_states(states.items())
        # a key without partials has no row, unless the cap made it (an __other__ of values
        # that each partition kept under its own name)
        gone = sorted(k for k in {*gone, *(k for k in keys if k not in found)} if k not in states)
        fresh = _fresh_buckets(cur, buckets)
        # a bucket without rows has none to delete
        gone = [k for k in gone if (k[0], k[1]) not in fresh]
        # stream the staged rows as they are merged when most buckets already have rows
        everything, staged = _write_rows(cur, fresh, keyed, blocks, buckets if fed else None,
                                         stage_first=2 * len(fresh) < len(buckets))
        cuts = {**(cuts or {}), **own_cuts}  # complete now: the blocks have all been merged
        rows = sum(len(b) for b in everything)
        written = _capped_scopes(everything, gone, caps) | capped
        stored = _stored_cuts(cur, written | set(cuts))
        # rows past a cut exist only where the cut moved below the stored one (or none is stored)
        past = sorted((scope, cut) for scope, cut in cuts.items()
                      if (scope[0], scope[1]) not in fresh and not (scope in stored and cut >= stored[scope]))
        deleted = 0
        if past or gone:
            with index_plans(cur):
                deleted += _delete_past_cuts(cur, past) if past else 0
                deleted += _delete_keys(cur, gone) if gone else 0
        _save_cuts(cur, {s: c for s, c in cuts.items() if stored.get(s) != c},
                   sorted(s for s in written if s in stored and s not in cuts))
        return rows, deleted, rows - staged


def _check_locked(block: RowBlock, locked: set[BucketId]) -> None:
    """A fed block may hold only rows of the buckets locked before it came (a bug otherwise)."""
    outside = [h for h in sorted_unique(block.hours).tolist() if (block.granularity, h * HOUR) not in locked]
    if outside:
        raise ValueError(f"a fed block has rows of {block.granularity} bucket(s) not locked: "
                         f"{[_ts(h * HOUR).isoformat() for h in outside[:3]]}")


DELETE_KEYS_SQL = (
    "DELETE FROM metrics_aggregates a USING unnest(%s::text[], %s::timestamptz[], %s::text[], "
    "%s::text[], %s::text[]) AS d(g, t, m, dt, v) WHERE a.granularity = d.g AND a.bucket_time = d.t "
    "AND a.metric_name = d.m AND a.dimension_type = d.dt AND a.dimension_value = d.v "
    "AND a.source = 'stream'")


def delete_keys_params(gone: Sequence[Key]) -> tuple[list[Any], ...]:
    return ([k[0] for k in gone], [_ts(k[1]) for k in gone], [k[2] for k in gone], [k[3] for k in gone],
            [k[4] for k in gone])


def _delete_keys(cur: psycopg.Cursor, gone: Sequence[Key]) -> int:
    """Delete the stream rows of these keys (a backfilled row stays)."""
    cur.execute(DELETE_KEYS_SQL, delete_keys_params(gone))
    return cur.rowcount


def _delete_past_cuts(cur: psycopg.Cursor, past: Sequence[tuple[Scope, Cut]]) -> int:
    """Delete the stream rows of each scope whose (hash, value) is past the scope's cut.

    In SQL, not from a list of values: the rows may have been written by anyone (an
    earlier flush, another worker, a replay that saw fewer values), and the scope's rows
    are one index range. Values compare byte-wise (COLLATE "C"), as Python and the
    backfill's ranking do.
    """
    cur.execute(DELETE_PAST_CUTS_SQL, past_cuts_params(past))
    return cur.rowcount


DELETE_PAST_CUTS_SQL = (
    "DELETE FROM metrics_aggregates a USING unnest(%s::text[], %s::timestamptz[], %s::text[], %s::text[], "
    "%s::bigint[], %s::text[]) AS c(g, t, m, d, h, v) WHERE a.bucket_time = c.t AND a.granularity = c.g "
    "AND a.metric_name = c.m AND a.dimension_type = c.d AND a.source = 'stream' AND a.dimension_value <> %s "
    f"AND ({CAP_HASH_SQL.format(expr='a.dimension_value')}, a.dimension_value COLLATE \"C\") "
    "> (c.h, c.v COLLATE \"C\")")


def past_cuts_params(past: Sequence[tuple[Scope, Cut]]) -> tuple[Any, ...]:
    return ([s[0] for s, _ in past], [_ts(s[1]) for s, _ in past], [s[2] for s, _ in past],
            [s[3] for s, _ in past], [c[0] for _, c in past], [c[1] for _, c in past], OTHER)


def _capped_scopes(blocks: Sequence[RowBlock], gone: Sequence[Key], caps: Mapping[str, int]) -> set[Scope]:
    """The scopes of capped dimensions that these rows (written or deleted) belong to."""
    out = {(k[0], k[1], k[2], k[3]) for k in gone if k[3] in caps}
    for b in blocks:
        if b.dimension in caps and len(b):
            out.update((b.granularity, h * HOUR, b.metric, b.dimension) for h in sorted_unique(b.hours).tolist())
    return out


def _scope_arrays(scopes: Sequence[Scope]) -> tuple[list[str], list[datetime], list[str], list[str]]:
    return [s[0] for s in scopes], [_ts(s[1]) for s in scopes], [s[2] for s in scopes], [s[3] for s in scopes]


def _stored_cuts(cur: psycopg.Cursor, scopes: set[Scope]) -> dict[Scope, Cut]:
    """The cuts stored for these scopes (`stream_cap_cuts`); the caller holds their buckets' locks."""
    if not scopes:
        return {}
    cur.execute(
        "SELECT c.granularity, c.bucket_time, c.metric_name, c.dimension_type, c.cap_hash, c.cap_value "
        "FROM stream_cap_cuts c JOIN unnest(%s::text[], %s::timestamptz[], %s::text[], %s::text[]) AS s(g, t, m, d) "
        "ON c.bucket_time = s.t AND c.granularity = s.g AND c.metric_name = s.m AND c.dimension_type = s.d",
        _scope_arrays(sorted(scopes)))
    return {(g, int(t.timestamp()), m, d): (int(h), v) for g, t, m, d, h, v in cur.fetchall()}


def _save_cuts(cur: psycopg.Cursor, cuts: Mapping[Scope, Cut], cleared: Sequence[Scope]) -> None:
    """Store the cuts these rows were written (and deleted) with. `cleared`: scopes written
    without a cut (fewer values than the cap, e.g. after a replay that saw fewer): any of
    their values may now have a row, so no stored cut may claim otherwise."""
    if cuts:
        ordered = sorted(cuts.items())
        cur.execute(
            "INSERT INTO stream_cap_cuts AS c (granularity, bucket_time, metric_name, dimension_type, cap_hash, "
            "cap_value) SELECT * FROM unnest(%s::text[], %s::timestamptz[], %s::text[], %s::text[], %s::bigint[], "
            "%s::text[]) ON CONFLICT (bucket_time, granularity, metric_name, dimension_type) DO UPDATE SET "
            "cap_hash = EXCLUDED.cap_hash, cap_value = EXCLUDED.cap_value, updated_at = now()",
            (*_scope_arrays([s for s, _ in ordered]), [c[0] for _, c in ordered], [c[1] for _, c in ordered]))
    if cleared:
        cur.execute(
            "DELETE FROM stream_cap_cuts c USING unnest(%s::text[], %s::timestamptz[], %s::text[], %s::text[]) "
            "AS s(g, t, m, d) WHERE c.bucket_time = s.t AND c.granularity = s.g AND c.metric_name = s.m "
            "AND c.dimension_type = s.d", _scope_arrays(cleared))


def _fresh_buckets(cur: psycopg.Cursor, buckets: set[BucketId]) -> set[BucketId]:
    """Those of `buckets` without any row in metrics_aggregates."""
    ids = sorted(buckets)
    cur.execute(
        "SELECT w.g, w.t FROM unnest(%s::text[], %s::timestamptz[]) AS w(g, t) WHERE NOT EXISTS "
        "(SELECT 1 FROM metrics_aggregates a WHERE a.bucket_time = w.t AND a.granularity = w.g)",
        ([g for g, _ in ids], [_ts(b) for _, b in ids]))
    return {(g, int(t.timestamp())) for g, t in cur.fetchall()}


def _write_rows(cur: psycopg.Cursor, fresh: set[BucketId], first: list[RowBlock],
                blocks: Iterable[RowBlock], locked: set[BucketId] | None = None, stage_first: bool = False,
                ) -> tuple[list[RowBlock], int]:
    """COPY every row as `first`, then `blocks`, come (a `RowFeed` is read while it is filled;
    `locked`: the buckets its blocks may hold): rows of the `fresh` buckets (no row in
    metrics_aggregates yet) straight into the table, the others through the staging table
    `tmp_rows` and the upsert (`_stage`). Returns every block and how many rows were upserted.

    Why two ways: catching up a backlog, most rows are of buckets never written before, and
    a plain COPY into the table costs about two thirds of COPY into the staging table plus
    `INSERT ... ON CONFLICT` (240,000 rows: 1.56 s against 2.30 s). The caller holds the
    buckets' advisory locks, so no stream worker or replay writes them meanwhile; the
    backfill does not take those locks, so if it inserted a row of such a bucket in
    between, the COPY (in a savepoint) fails on the unique key and those rows go through
    the upsert instead, which keeps the backfill's row.

    Why `stage_first`: one COPY runs at a time, and the one that takes the blocks as they
    are merged overlaps the merge; the other waits for its end. The caller streams the
    side it expects to be larger: the new buckets' rows in a backlog's first flush, the
    staged ones in a later flush (late events touch every hour) and in live operation.
    Staged rows fed while they are merged are upserted in pieces (`PIECE_ROWS`), so that
    PostgreSQL upserts a piece while the next tables are merged.
    """
    def every_block() -> Iterator[RowBlock]:
        # read again, a RowFeed gives what it gave, then the rest, or its failure again
        yield from first
        for block in blocks:
            if locked is not None:
                _check_locked(block, locked)
            yield block

    by: dict[str, list[int]] = defaultdict(list)
    for g, b in fresh:
        by[g].append(b // HOUR)
    hours = {g: sorted_unique(np.asarray(v, dtype=np.int64)) for g, v in by.items()}
    every: list[RowBlock] = []
    held: list[RowBlock] = []  # the side not streamed, COPYed once the feed has ended

    def streamed(new: bool) -> Iterator[RowBlock]:
        for block in every_block():
            every.append(block)
            hit = member_of_sorted(hours.get(block.granularity, _NONE), block.hours) if hours else None
            if hit is None or not hit.any():
                parts: tuple[RowBlock | None, RowBlock | None] = (None, block)
            elif hit.all():
                parts = (block, None)
            else:
                parts = (block.take(np.flatnonzero(hit)), block.take(np.flatnonzero(~hit)))
            mine, other = parts if new else parts[::-1]
            if other is not None and len(other):
                held.append(other)
            if mine is not None and len(mine):
                yield mine

    if stage_first or not fresh:
        staged = _stage(cur, streamed(new=False), PIECE_ROWS if locked is not None else None)
        if held and not _copy_new(cur, held, hours):
            staged += _stage(cur, held)
        return every, staged
    if _copy_new(cur, streamed(new=True), hours):
        return every, _stage(cur, held) if held else 0
    # Every block again, not what the COPY had read: if the merge failed meanwhile, its
    # error (which the COPY's own may have hidden) comes back here and fails the write.
    every = list(every_block())
    return every, _stage(cur, every)


def _copy_new(cur: psycopg.Cursor, blocks: Iterable[RowBlock], hours: dict[str, I64]) -> bool:
    """COPY rows of buckets that had none straight into metrics_aggregates, in a savepoint;
    False if a row of one of them appeared meanwhile (a backfill), and nothing was written."""
    try:
        with cur.connection.transaction():  # a savepoint
            _copy_blocks(cur, "metrics_aggregates", blocks)
    except psycopg.errors.UniqueViolation:
        log.info("a row of new buckets %s appeared meanwhile (a backfill?); upserting their rows instead",
                 sorted((g, _ts(h * HOUR).isoformat()) for g, hs in hours.items() for h in hs.tolist())[:5])
        return False
    return True


# Staged rows upserted per statement when they are fed as they are merged: big enough that a
# statement's own cost is nothing beside its rows, small enough to start well before the merge ends.
PIECE_ROWS = 20_000


def _stage(cur: psycopg.Cursor, blocks: Iterable[RowBlock], piece_rows: int | None = None) -> int:
    """Upsert rows through the staging table `tmp_rows` (made on first use, left empty);
    returns how many. No statement at all if no block comes (a flush whose rows all went in
    by plain COPY). With `piece_rows`, each time at least that many rows are COPYed (at a
    block's end), they are upserted before the next blocks are read."""
    it = iter(blocks)
    head = next(it, None)  # waits for the first block (or the end of the feed)
    if head is None:
        return 0
    # just the copied columns: no id / updated_at defaults evaluated per staged row
    cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS tmp_rows ON COMMIT DELETE ROWS AS SELECT "
                f"{', '.join(rows_copy.COLUMNS)} FROM metrics_aggregates WITH NO DATA")
    n = 0
    while head is not None:
        piece = 0

        def counted(first: RowBlock) -> Iterator[RowBlock]:
            nonlocal n, piece
            block: RowBlock | None = first
            while block is not None:
                n += len(block)
                piece += len(block)
                yield block
                if piece_rows is not None and piece >= piece_rows:
                    return
                block = next(it, None)

        _copy_blocks(cur, "tmp_rows", counted(head))
        cur.execute(UPSERT_ROWS_SQL.format(source="stream", tmp="tmp_rows"))
        cur.execute("TRUNCATE tmp_rows")
        head = next(it, None) if piece_rows is not None and piece >= piece_rows else None
    return n


_NONE = np.empty(0, dtype=np.int64)


def _copy_blocks(cur: psycopg.Cursor, table: str, blocks: Iterable[RowBlock]) -> None:
    """Binary COPY of the blocks' rows into `table` (rows_copy.COLUMNS)."""
    with cur.copy(f"COPY {table} ({', '.join(rows_copy.COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy:
        for chunk in rows_copy.render(blocks):
            copy.write(chunk)


# Every stored blob of a stream with its deltas, ordered by `seq` within a (bucket,
# partition): the whole blob first (-1), then the deltas by applied offset.
_WITH_DELTAS = (
    "SELECT stream, granularity, bucket_time, partition, states, -1::bigint AS seq FROM stream_partials "
    "UNION ALL SELECT stream, granularity, bucket_time, partition, states, applied_offset FROM stream_partial_deltas")


@dataclass
class StoredBucket:
    """A (partition, bucket)'s stored states: its blob with the deltas applied, and how many."""

    items: list[tuple[str, str, str, bytes]]
    deltas: int


def overlay(base: list[tuple[str, str, str, bytes]], delta: list[tuple[str, str, str, bytes]],
            ) -> list[tuple[str, str, str, bytes]]:
    """`base` with each (metric, dimension, value) in `delta` replaced by (or added as) delta's state."""
    out = {(m, d, v): data for m, d, v, data in base}
    out.update(((m, d, v), data) for m, d, v, data in delta)
    return [(m, d, v, data) for (m, d, v), data in out.items()]


def read_bucket_states(cur: psycopg.Cursor, stream: str, buckets: Sequence[BucketId],
                       partitions: Sequence[int] | None = None,
                       skip: Sequence[tuple[str, int, int]] = ()) -> dict[tuple[Key, int], AggState]:
    """(key, partition) -> state for every stored blob of the given buckets (and partitions).

    `skip` lists (granularity, bucket, partition) blobs the caller already holds.
    """
    parts = None if partitions is None else list(partitions)
    # each blob, then its deltas in order: a later state of a key replaces an earlier one
    cur.execute(
        f"SELECT p.granularity, p.bucket_time, p.partition, p.states FROM ({_WITH_DELTAS}) p "
        "JOIN unnest(%s::text[], %s::timestamptz[]) AS b(g, t) ON p.granularity = b.g AND p.bucket_time = b.t "
        "WHERE p.stream = %s AND (%s::int[] IS NULL OR p.partition = ANY(%s::int[])) "
        "AND NOT EXISTS (SELECT 1 FROM unnest(%s::text[], %s::timestamptz[], %s::int[]) AS s(g, t, p) "
        "WHERE s.g = p.granularity AND s.t = p.bucket_time AND s.p = p.partition) "
        "ORDER BY p.partition, p.granularity, p.bucket_time, p.seq",
        ([g for g, _ in buckets], [_ts(b) for _, b in buckets], stream, parts, parts,
         [g for g, _, _ in skip], [_ts(b) for _, b, _ in skip], [p for _, _, p in skip]))
    out: dict[tuple[Key, int], AggState] = {}
    for g, t, partition, blob in cur.fetchall():
        bucket = int(t.timestamp())
        for m, d, v, state in decode_bucket(bytes(blob)):
            out[((g, bucket, m, d, v), int(partition))] = state
    return out


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


def _merge(states: list[AggState]) -> AggState:
    if len(states) == 1:
        return states[0]
    return AggState.merge_many(states, any(s.digest is not None for s in states))
