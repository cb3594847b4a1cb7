"""The worker's logic between the transport and the store, free of Faust.

`Processor.process` takes consumed messages (partition, offset, bytes), decodes them,
sends bad input and too-late events to the DLQ list, folds the rest into the partition's
state with the core, and remembers what changed; `Processor.flush` writes it all in one
PostgreSQL transaction and hands back the messages that are now safe to acknowledge.
Both run on one thread (the shell's executor), one after the other, so no locks.

A message is acknowledged to Kafka only after its effect is durable in PostgreSQL; the
partition's next offset lives in PostgreSQL too, so whatever Kafka re-delivers after a
crash is either skipped (offset below the stored one) or folded exactly once.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_agg.config import Config
from stream_agg.core.buckets import GRANULARITIES, SPAN, to_datetime
from stream_agg.core.fold import BucketId, Columns, PartitionState, fold
from stream_agg.core.merged_rows import RowBlock, iter_merged_blocks
from stream_agg.core.partition_state import BlobPart, Changes
from stream_agg.core.registry import Registry
from stream_agg.core.watermark import Watermark, WatermarkPolicy
from stream_agg.events import decode_message, encode_event
from stream_agg.kafka.decode_pool import DecodedPart, decode_partition
from stream_agg.observability import Metrics
from stream_agg.store import archive_copy
from stream_agg.store.retention import PruneReport
from stream_agg.store.schema import refuse_newer
from stream_agg.store.stream_state import BlobFeed, FlushPayload, FlushReport, PartitionFlush, RowFeed, StreamStore

log = logging.getLogger(__name__)

# A cached closed bucket not folded into for this long is evicted even under the state
# budget: late events come in bursts (a producer's retry queue, a replayed backlog), and a
# bucket quiet for ten minutes is cheaper to read back once than to hold for days.
CACHE_IDLE_SECONDS = 600.0
# Whole blobs are encoded this many buckets at a time (`PartitionState.encode_buckets`): few
# enough that a backlog's raw blobs are not all held at once before the compress thread
# takes them, enough that each table is visited a handful of times per flush, not per bucket.
ENCODE_CHUNK = 16
# Encoding outruns the compress thread (~0.2 s against ~0.3 s per 100 MB of raw blobs, and
# the other core is PostgreSQL's during a flush), so raw blobs pile up: +40-60 MB at the peak
# of the benchmark's last flush. Before each chunk, the encoding waits while more blobs than
# this wait for compression, for at most ENCODE_WAIT seconds per flush (a compress thread that
# died must not stop the flush: the write fails with its error anyway).
ENCODE_PENDING_BLOBS = 64
ENCODE_WAIT = 2.0


@dataclass
class Snapshot:
    """Changes taken out of the live state for one flush."""

    payload: FlushPayload | None
    closing: dict[int, list[BucketId]]
    changes: dict[int, Changes]
    refs: list[Any]
    pending_events: int
    taken_at: float
    seconds: float = 0.0  # spent taking it (on the folding thread)
    # the partial blobs still to encode: (flush entry, its partition's state, what to write per bucket)
    unencoded: list[tuple[PartitionFlush, PartitionState, list[tuple[BucketId, BlobPart]]]] = field(
        default_factory=list)
    unmerged: Iterator[RowBlock] | None = None  # the rows still to merge into the payload's RowFeed
    merge_seconds: float = 0.0
    encode_seconds: float = 0.0
    floor: float | None = None  # the stream's prune floor as the write read it


class PoisonedError(RuntimeError):
    """Processing failed half-way; the in-memory state must not be written."""


@dataclass
class Message:
    partition: int
    offset: int
    value: bytes | None
    ref: Any = None  # the transport's handle, acknowledged after the flush
    generation: int | None = None  # consumer-group generation the message was fetched in


@dataclass(frozen=True)
class DlqRecord:
    value: bytes
    reason: str
    partition: int
    offset: int
    index: int | None

    def headers(self) -> list[tuple[str, bytes]]:
        h = [("reason", self.reason.encode()), ("source_partition", str(self.partition).encode()),
             ("source_offset", str(self.offset).encode())]
        if self.index is not None:
            h.append(("batch_index", str(self.index).encode()))
        return h


@dataclass
class Outcome:
    dlq: list[DlqRecord] = field(default_factory=list)
    ack_now: list[Any] = field(default_factory=list)  # duplicates: nothing to make durable
    ignored: int = 0  # messages of partitions we do not own (revoked meanwhile)
    stale: int = 0  # messages fetched before the partition was (re)assigned: dropped, never acked
    folded_events: int = 0


@dataclass
class PartitionContext:
    partition: int
    pstate: PartitionState
    watermark: Watermark
    next_offset: int = 0
    base_offset: int | None = None  # next_offset as last persisted (fencing)
    dirty: bool = False  # offsets / watermark moved since the last flush (states track their own)
    generation: int | None = None  # consumer-group generation it was assigned in
    # closed buckets whose final values are flushed, kept for late events -> wall time last folded into
    cached: dict[BucketId, float] = field(default_factory=dict)
    # buckets whose whole blob is durable in stream_partials -> deltas stored over it (blob_plan)
    stored: dict[BucketId, int] = field(default_factory=dict)


def _policy(config: Config) -> WatermarkPolicy:
    return WatermarkPolicy(out_of_orderness=config.out_of_orderness, grace=config.grace,
                           horizon=config.late_horizon, idle_timeout=config.idle_timeout)


@dataclass
class _Prepared:
    ctx: PartitionContext
    msgs: list[Message]
    events: int
    cols: Columns | None
    late: int
    buckets: set[BucketId]
    missing: list[BucketId]
    dlq: list[DlqRecord]
    archive: tuple[str, str] | None  # (traces, spans) COPY text


class Processor:
    def __init__(self, config: Config, registry: Registry, store: StreamStore, metrics: Metrics,
                 stream_id: str, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.registry = registry
        self.store = store
        # Reads run on the folding thread while a flush may be writing on the writer thread,
        # and a psycopg connection is not for concurrent use: the reader has its own.
        self.reader = StreamStore(store.url)
        self.metrics = metrics
        self.stream_id = stream_id
        self.clock = clock
        self.contexts: dict[int, PartitionContext] = {}
        self.traces: list[str] = []  # raw archive, as COPY text chunks (store.archive_copy)
        self.spans: list[str] = []
        self.unacked: list[Any] = []
        self.pending_events = 0
        self.archive_bytes = 0  # size of the COPY text in self.traces / self.spans
        self.poisoned = False
        self.topic_partitions: int | None = None  # set by the shell from topic metadata
        self.floor = -math.inf  # the stream's prune floor (core/retention.py) as last read

    # ----------------------------------------------------------------- assignment

    def assign(self, partitions: set[int], generation: int | None = None) -> None:
        """Take ownership: read each partition's next offset and watermark from PostgreSQL.

        `generation`: the consumer group's generation of this assignment. Messages fetched
        in another generation are never folded into these partitions (see `process`).
        """
        for p in partitions:
            if p in self.contexts:
                self.contexts[p].generation = generation
        new = sorted(p for p in partitions if p not in self.contexts)
        if not new:
            return
        # A worker outlives deploys: if a newer stream-agg migrated the database since this one
        # started, its partials may be in a format this one cannot read. Refuse to take them.
        refuse_newer(self.reader.schema_version())
        stored = self.reader.load_offsets(self.stream_id, new)
        self.set_floor(self.reader.load_floor(self.stream_id))
        for p in new:
            wm = Watermark(_policy(self.config))
            next_offset, base = 0, None
            if p in stored:
                next_offset, max_ts = stored[p]
                base = next_offset
                if max_ts is not None:
                    wm.max_event_time = max_ts
            wm.floor = self.floor
            self.contexts[p] = PartitionContext(p, PartitionState(self.registry), wm, next_offset, base,
                                                generation=generation)
            log.info("assigned partition=%d next_offset=%d", p, next_offset)
        self.metrics.assigned_partitions.set(len(self.contexts))

    def set_floor(self, floor: float | None) -> None:
        """Every partition's events before the floor are too late from now on."""
        if floor is not None and floor > self.floor:
            self.floor = floor
            for ctx in self.contexts.values():
                ctx.watermark.floor = floor
            self.metrics.prune_floor.set(floor)

    def revoke(self, partitions: set[int]) -> None:
        """Drop partitions (after a flush): whoever owns them next reloads from PostgreSQL."""
        for p in partitions:
            if self.contexts.pop(p, None) is not None:
                log.info("revoked partition=%d", p)
                for gauge in (self.metrics.watermark_lag, self.metrics.watermark, self.metrics.consumer_lag):
                    try:
                        gauge.remove(str(p))
                    except KeyError:
                        pass
        self.metrics.assigned_partitions.set(len(self.contexts))

    # ----------------------------------------------------------------- processing

    def process(self, messages: list[Message], decoded: list[DecodedPart] | None = None) -> Outcome:
        """Decode, classify and fold a batch of messages.

        `decoded`: the batch already decoded by the decode helper (`decode_pool.decode_batch`
        of the same messages, grouped by partition in order), or None to decode here.
        Atomic: everything that can fail (loading stored buckets) happens before any
        state changes, so a failed call can simply be retried with the same messages.
        """
        out = Outcome()
        pre = {d.partition: d for d in decoded or []}
        by_partition: dict[int, list[Message]] = {}
        for m in messages:
            by_partition.setdefault(m.partition, []).append(m)
        prepared: list[_Prepared] = []
        for p, msgs in by_partition.items():
            ctx = self.contexts.get(p)
            if ctx is None:
                out.ignored += len(msgs)
                continue
            # Fetched before this assignment (a micro-batch still queued or buffered when the
            # group rebalanced): the partition restarted from PostgreSQL's offset and Kafka
            # re-delivers these, so folding them now would skip ahead of that re-delivery.
            gen = ctx.generation
            stale = [m for m in msgs if gen is not None and m.generation is not None and m.generation != gen]
            if stale:
                out.stale += len(stale)
                log.info("partition=%d: dropped %d messages (offsets %d..%d) fetched in generation %s, "
                         "assigned in %s; Kafka re-delivers them", p, len(stale), stale[0].offset,
                         stale[-1].offset, stale[0].generation, gen)
                msgs = [m for m in msgs if m.generation is None or m.generation == gen]
            fresh = [m for m in msgs if m.offset >= ctx.next_offset]
            dupes = len(msgs) - len(fresh)
            if dupes:
                self.metrics.duplicates_skipped.inc(dupes)
                out.ack_now.extend(m.ref for m in msgs if m.offset < ctx.next_offset)
            if fresh and fresh[0].offset > ctx.next_offset and ctx.base_offset is not None:
                # Kafka starts past what PostgreSQL says comes next: those messages are gone
                # (retention ran while no worker consumed), not skipped by us. Say so loudly.
                log.warning("partition=%d: offsets %d..%d were never consumed and are no longer in Kafka "
                            "(retention?); their events are missing from the aggregates",
                            p, ctx.next_offset, fresh[0].offset - 1)
            if fresh:
                given = pre.get(p)  # decoded from every message of the partition: only usable if all are folded
                whole = not dupes and not stale
                prepared.append(self._prepare(ctx, fresh, given if given is not None and whole else None))
        # A bucket not held in memory is loaded for every partition this worker owns, not
        # only the one that needs it: then the flush merges it in memory, vectorised,
        # instead of reading the other partitions' blobs back key by key.
        needed = sorted({b for prep in prepared for b in prep.missing})
        wanted = {p: [b for b in needed if b not in c.pstate.resident] for p, c in self.contexts.items()}
        loaded = self.reader.load_bucket_items(self.stream_id, wanted) if needed else {}
        try:
            for p, buckets in wanted.items():
                ctx = self.contexts[p]
                for bucket in buckets:
                    stored = loaded.get((p, bucket))
                    ctx.pstate.load_bucket(bucket, stored.items if stored is not None else [])
                    if stored is not None:
                        ctx.stored[bucket] = stored.deltas
                    else:
                        ctx.stored.pop(bucket, None)
            for prep in prepared:
                self._apply(prep, out)
        except BaseException:
            # A half-applied batch must never reach PostgreSQL: refuse every later flush,
            # so a restart resumes from the last consistent flush instead.
            self.poisoned = True
            raise
        return out

    def _prepare(self, ctx: PartitionContext, msgs: list[Message], part: DecodedPart | None) -> _Prepared:
        if part is None:
            part = decode_partition(ctx.partition, [(m.offset, m.value) for m in msgs], self.registry,
                                    self.config.archive)
        self.metrics.messages_consumed.inc(len(msgs))
        dlq = [DlqRecord(raw, reason, ctx.partition, off, idx) for raw, reason, off, idx in part.rejects]
        cols, archive = part.cols, part.archive
        if cols is None:
            return _Prepared(ctx, msgs, 0, None, 0, set(), [], dlq, None)
        classified = ctx.watermark.classify(part.ts)
        if classified.too_late.any():
            cols, archive = self._drop_too_late(ctx, msgs, cols, classified.too_late, part.offsets, dlq)
        buckets = cols.buckets()
        missing = sorted(buckets - ctx.pstate.resident)
        return _Prepared(ctx, msgs, int(cols.ts.size), cols, int(classified.late.sum()), buckets, missing, dlq,
                         archive)

    def _drop_too_late(self, ctx: PartitionContext, msgs: list[Message], cols: Columns, too_late: np.ndarray,
                       offsets: np.ndarray, dlq: list[DlqRecord]) -> tuple[Columns, tuple[str, str] | None]:
        """Send events older than the horizon to the DLQ (as JSON) and fold the rest (rare:
        the messages are decoded again here, for the events themselves)."""
        events = [e for m in msgs for e in decode_message(m.value).events]
        for i in np.flatnonzero(too_late).tolist():
            dlq.append(DlqRecord(encode_event(events[i]), "too_late", ctx.partition, int(offsets[i]), None))
        keep = ~too_late
        archive = None
        if self.config.archive:
            kept = [e for e, k in zip(events, keep.tolist(), strict=True) if k]
            traces, spans, _ = archive_copy.render(kept, offsets[keep].tolist(), ctx.partition)
            archive = (traces, spans)
        return cols.select(keep), archive

    def _apply(self, prep: _Prepared, out: Outcome) -> None:
        ctx = prep.ctx
        if prep.cols is not None and prep.events:
            fold(ctx.pstate, prep.cols)
            ts_max = float(prep.cols.ts.max())
            ctx.watermark.max_event_time = max(ctx.watermark.max_event_time, ts_max)
            ctx.watermark.last_event_wall = now = self.clock()
            for b in prep.buckets & ctx.cached.keys():
                ctx.cached[b] = now
            if prep.archive is not None:
                self.traces.append(prep.archive[0])
                if prep.archive[1]:
                    self.spans.append(prep.archive[1])
                self.archive_bytes += len(prep.archive[0]) + len(prep.archive[1])
        ctx.next_offset = prep.msgs[-1].offset + 1
        ctx.dirty = True
        n_events = prep.events
        self.pending_events += n_events
        out.folded_events += n_events
        out.dlq.extend(prep.dlq)
        self.unacked.extend(m.ref for m in prep.msgs)
        m = self.metrics
        m.events_consumed.inc(n_events + len(prep.dlq))
        m.events_late.inc(prep.late)
        for reason, n in Tally(r.reason for r in prep.dlq).items():
            if reason == "too_late":
                m.events_too_late.inc(n)
            else:
                m.events_invalid.labels(reason).inc(n)
        m.pending_events.set(self.pending_events)

    # ----------------------------------------------------------------- flushing

    def closed_buckets(self, ctx: PartitionContext, now: float) -> list[BucketId]:
        """Buckets closed by the watermark whose final flush is still to come."""
        return sorted(b for b in ctx.pstate.resident
                      if b not in ctx.cached and ctx.watermark.is_closed(b[1] + SPAN[b[0]], now))

    def has_work(self, now: float) -> bool:
        return any(c.dirty or c.pstate.has_changes() or self.closed_buckets(c, now)
                   for c in self.contexts.values()) or bool(self.traces)

    def snapshot(self, encode: bool = True) -> Snapshot:
        """Take every change since the last flush out of the live state (copies), or None.

        Runs on the processing thread; the copy lets `StreamStore.flush` run on another
        thread while folding goes on. `commit` or `rollback` must follow.

        With `encode=False` the merge of the rows and the partial blobs are left to
        `finish`, which must then run on this thread before anything is folded: the worker
        queues it right behind, and the writer starts COPYing rows as soon as the first
        table is merged, then writes the rows (PostgreSQL's longest step) while the blobs
        are encoded.
        """
        if self.poisoned:
            raise PoisonedError("in-memory state is inconsistent after an internal error; not flushing it "
                                "(a restart resumes from the last flush)")
        now = self.clock()
        began = time.perf_counter()
        closing = {p: self.closed_buckets(c, now) for p, c in self.contexts.items()}
        parts: list[PartitionFlush] = []
        unencoded: list[tuple[PartitionFlush, PartitionState, list[tuple[BucketId, BlobPart]]]] = []
        changes: dict[int, Changes] = {}
        for p, ctx in self.contexts.items():
            ch = ctx.pstate.take_changes()
            if not (ctx.dirty or ch):
                continue
            parts.append(PartitionFlush(p, ctx.next_offset, _finite(ctx.watermark.max_event_time),
                                        ctx.base_offset))
            unencoded.append((parts[-1], ctx.pstate, ctx.pstate.blob_plan(ch, ctx.stored)))
            changes[p] = ch
            ctx.dirty = False
        payload = None
        unmerged = None
        if parts or self.traces:
            payload = FlushPayload(self.stream_id, parts, self.traces, self.spans, caps=dict(self.registry.caps))
            ends = [b + SPAN[g] for ch in changes.values() for g, b in ch.buckets()]
            payload.earliest_end = min(ends) if ends else None
            unmerged = self._rows_from_memory(payload, changes)
            payload.blocks = RowFeed()
        snap = Snapshot(payload, closing, changes, self.unacked, self.pending_events, now,
                        time.perf_counter() - began, unencoded, unmerged)
        self.traces, self.spans, self.unacked, self.pending_events, self.archive_bytes = [], [], [], 0, 0
        if encode:
            self.finish(snap)
        return snap

    def finish(self, snap: Snapshot, feed: BlobFeed | None = None) -> None:
        """Merge the rows of a `snapshot(encode=False)` into its payload's RowFeed, then encode
        its partial blobs, handing them to `feed` a chunk of buckets at a time. On the processing
        thread, before anything is folded (both read the live states)."""
        try:
            self.merge(snap)
        except BaseException as exc:
            if feed is not None:
                feed.close(exc)  # the writer's compress thread must not wait for blobs forever
            raise
        self.encode(snap, feed)

    def merge(self, snap: Snapshot) -> None:
        """Merge the rows of a `snapshot(encode=False)` into its payload's RowFeed."""
        unmerged, snap.unmerged = snap.unmerged, None
        if unmerged is None or snap.payload is None:
            return
        rows = snap.payload.blocks
        assert isinstance(rows, RowFeed)
        began = time.perf_counter()
        try:
            for block in unmerged:
                rows.put(block)
        except BaseException as exc:
            log.exception("merging the rows failed (partitions %s)",
                          [part.partition for part in snap.payload.partitions])
            rows.close(exc)
            raise
        rows.close()
        snap.merge_seconds = time.perf_counter() - began

    def encode(self, snap: Snapshot, feed: BlobFeed | None = None) -> None:
        """Encode the snapshot's partial blobs, handing them to `feed` a chunk of buckets at a time
        (`ENCODE_CHUNK`), as each chunk is made."""
        if snap.unmerged is not None:
            raise RuntimeError("the snapshot's rows are not merged yet: call finish() (or merge() first)")
        began = time.perf_counter()
        waited = 0.0
        try:
            for part, pstate, plan in snap.unencoded:
                wholes = [bucket for bucket, delta in plan if delta is None]
                chunks = {b: i // ENCODE_CHUNK for i, b in enumerate(wholes)}
                whole: dict[BucketId, tuple[bytes, int]] = {}
                for bucket, delta in plan:
                    if delta is None:
                        if bucket not in whole:
                            waited = _pace(feed, waited)
                            k = chunks[bucket]
                            whole = pstate.encode_buckets(wholes[k * ENCODE_CHUNK:(k + 1) * ENCODE_CHUNK])
                        blob, nkeys = whole.pop(bucket)
                    else:
                        blob, nkeys = pstate.encode_keys(delta)
                        part.deltas.add(len(part.buckets))
                    part.buckets.append((bucket[0], bucket[1], blob, nkeys))
                    if feed is not None:
                        feed.put((part, len(part.buckets) - 1))
        except BaseException as exc:
            log.exception("encoding the partial blobs failed (partitions %s)",
                          [part.partition for part, _, _ in snap.unencoded])
            if feed is not None:
                feed.close(exc)
            raise
        snap.unencoded = []
        snap.encode_seconds = time.perf_counter() - began
        if feed is not None:
            feed.close()

    def commit(self, snap: Snapshot) -> list[Any]:
        """The snapshot is durable: advance fencing offsets, close buckets; returns refs to ack."""
        self.set_floor(snap.floor)
        for part in snap.payload.partitions if snap.payload else []:
            ctx = self.contexts.get(part.partition)
            if ctx is not None:
                ctx.base_offset = part.next_offset
                for i, (g, b, _, _) in enumerate(part.buckets):
                    ctx.stored[(g, b)] = ctx.stored.get((g, b), 0) + 1 if i in part.deltas else 0
        for p, buckets in snap.closing.items():
            ctx = self.contexts.get(p)
            if ctx is None:
                continue
            busy = ctx.pstate.dirty_buckets()
            for b in buckets:
                if b not in busy:  # final values durable (else folded into since: next time)
                    ctx.cached.setdefault(b, snap.taken_at)
        self._trim_cache(snap.taken_at)
        self._update_gauges(snap.taken_at)
        return snap.refs

    def _trim_cache(self, now: float) -> None:
        """Evict cached closed buckets: idle ones, then least recently folded into until the
        states they hold fit `closed_cache_states`. Runs after a successful flush only, so
        nothing evicted has changes that are not durable (busy buckets are skipped)."""
        entries = sorted((t, p, b) for p, ctx in self.contexts.items() for b, t in ctx.cached.items())
        if not entries:
            return
        sizes = {p: ctx.pstate.bucket_sizes(ctx.cached) for p, ctx in self.contexts.items() if ctx.cached}
        held = sum(sizes[p].get(b, 0) for _, p, b in entries)
        busy = {p: self.contexts[p].pstate.dirty_buckets() for p in sizes}
        for t, p, b in entries:
            if t > now - CACHE_IDLE_SECONDS and held <= self.config.closed_cache_states:
                break
            if b in busy[p]:
                continue
            ctx = self.contexts[p]
            ctx.pstate.evict_bucket(b)
            del ctx.cached[b]
            ctx.stored.pop(b, None)
            held -= sizes[p].get(b, 0)

    def rollback(self, snap: Snapshot) -> None:
        """The write failed: put the changes back so the next flush retries them."""
        for p, changes in snap.changes.items():
            ctx = self.contexts.get(p)
            if ctx is None:
                continue
            ctx.pstate.restore_changes(changes)
            ctx.dirty = True
        if snap.payload is not None:
            self.traces = snap.payload.traces + self.traces
            self.spans = snap.payload.spans + self.spans
            self.archive_bytes = sum(map(len, self.traces)) + sum(map(len, self.spans))
        self.unacked = snap.refs + self.unacked
        self.pending_events += snap.pending_events
        self.metrics.pending_events.set(self.pending_events)

    def write(self, snap: Snapshot) -> FlushReport | None:
        """Write a snapshot in one transaction (any thread; touches no live state)."""
        if snap.payload is None:
            return None
        started = time.perf_counter()
        report = self.store.flush(snap.payload)
        snap.floor = report.floor
        seconds = time.perf_counter() - started
        self.metrics.observe_run(seconds, snap.pending_events)
        self.metrics.rows_upserted.inc(report.rows)
        self.metrics.archived_traces.inc(report.traces)
        log.info("flushed partitions=%s partials=%d rows=%d (new %d) traces=%d events=%d in %.3fs (snapshot %.3fs "
                 "merge %.3fs encode %.3fs %s) rss=%s", [p.partition for p in snap.payload.partitions],
                 report.partials, report.rows, report.new_rows, report.traces, snap.pending_events, seconds,
                 snap.seconds, snap.merge_seconds, snap.encode_seconds,
                 " ".join(f"{k} {v:.3f}s" for k, v in report.seconds.items()), _rss())
        return report

    def prune(self) -> PruneReport | None:
        """Move the stream's floor and delete the stream state below it (store/retention.py).

        On the writer's thread between flushes (it uses the store's connection; the live
        partitions learn the floor from `set_floor` or the next flush). None while the
        topic's partition count is unknown."""
        if self.topic_partitions is None:
            return None
        report = self.store.prune(self.stream_id, self.topic_partitions, _policy(self.config))
        for table, n in report.deleted.items():
            self.metrics.pruned_rows.labels(table).inc(n)
        if report.floor is not None:
            self.metrics.prune_floor.set(report.floor)
        if report.deleted and any(report.deleted.values()):
            log.info("pruned the stream state of buckets ending by %s (events before it are too late "
                     "for every partition): %s", to_datetime(report.floor or 0).isoformat(),
                     ", ".join(f"{table} {n}" for table, n in report.deleted.items()))
        if report.unmarked:
            log.info("stream state not pruned: partitions %s have no watermark yet (no event flushed), and "
                     "would accept events of any age", report.unmarked)
        return report

    def flush(self) -> tuple[FlushReport | None, list[Any]]:
        """snapshot + write + commit in one call (tests, replay); rollback on failure."""
        snap = self.snapshot()
        try:
            report = self.write(snap)
        except BaseException:
            self.rollback(snap)
            raise
        return report, self.commit(snap)

    def _complete_buckets(self, buckets: set[BucketId]) -> set[BucketId]:
        """Those of `buckets` held in memory for every partition of the topic: nothing to read back."""
        n = self.topic_partitions
        if n is None or not set(range(n)) <= set(self.contexts):
            return set()
        return {b for b in buckets if all(b in c.pstate.resident for c in self.contexts.values())}

    def _rows_from_memory(self, payload: FlushPayload, changes: dict[int, Changes]) -> Iterator[RowBlock]:
        """Fill in what the merge of the changed keys needs from memory; returns the merge of
        the rows of buckets held for every partition of the topic, still to be run.

        Those buckets are merged here, vectorised (`iter_merged_blocks`; values only,
        nothing shared with the live states), table by table as the caller takes the
        blocks. For the others, the changed keys and copies of this worker's states go
        along, and the writer adds the other partitions' partials from PostgreSQL.
        """
        buckets = set().union(*(ch.buckets() for ch in changes.values()))
        ctxs = sorted(self.contexts.items())
        complete = self._complete_buckets(buckets)
        unmerged: Iterator[RowBlock] = iter(())
        if complete:
            pstates = [c.pstate for _, c in ctxs]
            removed = {k for ch in changes.values() for k in ch.removed}
            unmerged = iter_merged_blocks(pstates, complete, [changes[p].tables if p in changes else {}
                                                              for p, _ in ctxs], also=removed, cuts=payload.cuts)
            # pushed into __other__ everywhere: no partial is left, so the row goes (rows past
            # the cap over all partitions go by `payload.cuts`)
            candidates = [k for k in removed if (k[0], k[1]) in complete]
            still = set().union(*(ps.held(candidates) for ps in pstates))
            payload.gone = sorted(k for k in candidates if k not in still)
        payload.complete = complete
        for part in payload.partitions:
            ch = changes.get(part.partition)
            if ch is not None:
                part.changed = sorted(self.contexts[part.partition].pstate.keys_of(ch, skip=complete))
        changed = payload.changed_keys
        wanted = {(k[0], k[1]) for k in changed}
        # a capped scope is capped again over every partition's values: all of its states go
        # (only with several workers; the other partitions' come from PostgreSQL)
        capped = {k[:4] for k in changed if k[3] in payload.caps}
        payload.resident = [(g, b, p) for p, ctx in ctxs for g, b in sorted(wanted) if (g, b) in ctx.pstate.resident]
        for g, b in sorted(wanted):
            for p, ctx in ctxs:
                if (g, b) not in ctx.pstate.resident:
                    continue
                for m, d, v, state in ctx.pstate.bucket_states((g, b)):
                    key = (g, b, m, d, v)
                    if key in changed or key[:4] in capped:
                        payload.memory.setdefault(key, []).append((p, state.copy()))
        return unmerged

    def _update_gauges(self, now: float) -> None:
        m = self.metrics
        m.pending_events.set(self.pending_events)
        counts = dict.fromkeys(GRANULARITIES, 0)
        cached = dict.fromkeys(GRANULARITIES, 0)
        for ctx in self.contexts.values():
            for g, _ in ctx.pstate.resident - ctx.cached.keys():
                counts[g] += 1
            for g, _ in ctx.cached:
                cached[g] += 1
            wm = ctx.watermark
            if np.isfinite(wm.max_event_time):
                m.watermark_lag.labels(str(ctx.partition)).set(wm.lag_seconds(now))
                m.watermark.labels(str(ctx.partition)).set(wm.effective(now))
        for g, n in counts.items():
            m.open_buckets.labels(g).set(n)
            m.cached_buckets.labels(g).set(cached[g])


def _finite(x: float) -> float | None:
    return x if np.isfinite(x) else None


def _rss() -> str:
    """Resident memory now, for the flush log line (Linux; '?' elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return f"{int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') >> 20}MB"
    except (OSError, ValueError, IndexError):
        return "?"


def _pace(feed: BlobFeed | None, waited: float) -> float:
    """Wait while the compress thread lags more than ENCODE_PENDING_BLOBS blobs behind, for at
    most what is left of ENCODE_WAIT; returns the seconds waited so far in this flush."""
    began = time.monotonic()
    while (feed is not None and feed.pending() > ENCODE_PENDING_BLOBS
           and waited + time.monotonic() - began < ENCODE_WAIT):
        time.sleep(0.002)
    return waited + time.monotonic() - began
