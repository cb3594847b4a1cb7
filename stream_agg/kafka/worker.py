"""The Faust shell around `Processor`: agent, flush timer, rebalance hooks, shutdown.

Faust delivers messages; everything that decides anything lives in the processor and
the core. Faust's own windowed tables are not used (they expire windows by wall clock
and drop late events); its offset commits are kept *behind* PostgreSQL by holding an
extra reference on every message until the flush that made it durable has committed.

Threading: folding, snapshots, the merge of their rows and the encoding of their partial
blobs run on one processing thread, in submission order (the fold gate keeps a snapshot's
merge and encoding right behind it);
PostgreSQL writes run on a writer thread while folding goes on; the event loop stays free
for heartbeats and fetching; JSON decoding runs in a helper process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import faust
import psycopg
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from stream_agg.config import Config
from stream_agg.core.registry import Registry, default_registry
from stream_agg.kafka.decode_pool import DecodedPart, DecodePool, merge_batches
from stream_agg.kafka.fold_progress import FoldProgress
from stream_agg.kafka.processor import Message, Outcome, PoisonedError, Processor, Snapshot
from stream_agg.kafka.take_limit import TakeLimit
from stream_agg.observability import Metrics
from stream_agg.store.db import describe_db_error
from stream_agg.store.schema import SchemaTooNewError
from stream_agg.store.stream_state import BlobFeed, FencedError, StreamStore

log = logging.getLogger(__name__)
T = TypeVar("T")

FOLD_BYTES = 16 << 20  # payload bytes decoded per chunk: bounds the helper's decoded events (~30k events)
# Payload bytes of decoded chunks a batch is joined up to behind a backlog (usually 2 chunks,
# ~60k events): the fold's rate grows with its batch (`join_decoded`). The raw bytes stay
# held until folded, so this costs memory: joining up to 4 chunks raised peak RSS by ~120 MB
# on the benchmark, up to 2 by ~60 MB.
FOLD_JOIN_BYTES = 2 * FOLD_BYTES
MAX_BACKOFF = 10.0  # seconds between retries while PostgreSQL is unreachable
IDLE_AFTER = 1.0  # at least this long without messages, the consumer counts as caught up (`idle_after`)
TICK = 0.25  # seconds between the flush loop's checks
FETCH_MAX_WAIT_MS = 100  # longest a fetch waits at the broker for data (`ShortPollConsumerThread`)
PRUNE_RETRY = 60.0  # seconds before a failed or locked-out prune is tried again (at most the prune interval)
# Flushes a prune may follow: not those of a rebalance, shutdown or backpressure, which other
# work (or every other worker of the group) is waiting for.
ROUTINE = frozenset({"timer", "interval", "backlog end"})
ARCHIVE_BYTES = 64 << 20  # raw-archive COPY text held before folding waits for a flush


def _chunks(msgs: list[Message], limit: int) -> list[list[Message]]:
    """Split a micro-batch into chunks of `limit` payload bytes, the last message of each
    passing it: a take ends on the message that reaches the byte budget (TakeLimit), and
    splitting that one off made every other chunk a single message, each with its own
    decoding round trip and fold call."""
    out: list[list[Message]] = [[]]
    size = 0
    for m in msgs:
        if size >= limit:
            out.append([])
            size = 0
        out[-1].append(m)
        size += len(m.value or b"")
    return out


def _offset_ranges(msgs: list[Message]) -> str:
    """Where a batch comes from, for logs: a batch may span partitions (and joined chunks)."""
    spans: dict[int, tuple[int, int]] = {}
    for m in msgs:
        lo, hi = spans.get(m.partition, (m.offset, m.offset))
        spans[m.partition] = (min(lo, m.offset), max(hi, m.offset))
    return ", ".join(f"partition={p} offsets {lo}..{hi}" for p, (lo, hi) in sorted(spans.items()))


def _payload_bytes(msgs: list[Message]) -> int:
    return sum(len(m.value or b"") for m in msgs)


# A chunk on its way to the fold: its messages and its decoding (None: decode in process).
Queued = tuple[list[Message], asyncio.Future[list[DecodedPart] | None] | None]


class ChunkQueue(asyncio.Queue[Queued]):
    """The agent -> fold queue, whose head can be looked at without taking it (asyncio's
    queues keep their items in `_queue`, the attribute their subclasses are meant to use):
    a chunk that is not joined stays queued, so it keeps its slot and the bound holds."""

    def peek(self) -> Queued:
        return self._queue[0]  # type: ignore[attr-defined, no-any-return]


def join_budget(config: Config) -> int:
    """Payload bytes of decoded chunks a batch may be joined up to; 0: no joining.

    Nothing is joined without a decode helper (nothing is decoded ahead), nor with the raw
    archive on: that worker is bound by PostgreSQL's archive upserts (folding waits for
    them), joining did not make it faster on the benchmark (12,792-15,324 events/s either
    way), and its chunks also carry their COPY text (peak RSS 883-996 MB joined, 885-940 not).
    """
    return FOLD_JOIN_BYTES if config.decode_processes and not config.archive else 0


def join_decoded(chunk: list[Message], decoded: list[DecodedPart], queue: ChunkQueue,
                 limit: int) -> tuple[list[Message], list[DecodedPart]]:
    """`chunk` and the queued chunks right behind it whose decoding is done, as one batch,
    while the batch holds less than `limit` payload bytes (so at most `limit` plus one chunk).
    A chunk still decoding, or one to decode in process, stays queued, and so do the ones
    behind it: the fold does not wait for the helper to grow a batch."""
    chunks, parts = [chunk], [decoded]
    size = _payload_bytes(chunk)
    while size < limit and not queue.empty():
        nxt, fut = queue.peek()
        result = fut.result() if fut is not None and fut.done() else None
        if result is None:
            break
        queue.get_nowait()
        chunks.append(nxt)
        parts.append(result)
        size += _payload_bytes(nxt)
    if len(chunks) == 1:
        return chunk, decoded
    return [m for c in chunks for m in c], merge_batches(parts)


def idle_after(config: Config) -> float:
    """Seconds without a micro-batch after which the consumer counts as caught up (and what is
    pending is flushed within a second): IDLE_AFTER, or two batch windows if longer. On a
    quiet topic a take comes every STREAM_AGG_BATCH_TIMEOUT; with 1s (the setting that suits
    single-event messages) the time between two takes must not count as idle, or the worker
    would flush every second instead of every flush interval."""
    return max(IDLE_AFTER, 2.0 * config.batch_timeout)


def caught_up(next_offsets: dict[int, int], highwater: Callable[[int], int | None]) -> bool:
    """Whether every partition's next offset to fold has reached its high watermark (the
    offset after the last message Kafka reported); unknown watermarks count as behind."""
    if not next_offsets:
        return False
    for p, next_offset in next_offsets.items():
        high = highwater(p)
        if high is None or next_offset < high:
            return False
    return True


class BacklogEnd:
    """Says, when a backlog has just been folded, that it is time to flush, until a flush starts.

    A backlog shows as a full take (the batch size or byte budget reached); its end, as
    every partition folded to its high watermark. Edge-triggered on purpose: a worker
    keeping up with live traffic is caught up between most fetches, and flushing on the
    level would flush every second instead of every `flush_interval`. Latched until
    `flushing()`: the end usually comes while the previous flush is still writing, and
    the flush that makes the backlog's tail durable must start as soon as that one ends.
    """

    def __init__(self) -> None:
        self.behind = False
        self.due = False

    def took(self, full: bool) -> None:
        if full:
            self.behind = True

    def ended(self, next_offsets: dict[int, int], highwater: Callable[[int], int | None]) -> bool:
        if self.behind and caught_up(next_offsets, highwater):
            self.behind = False
            self.due = True
        return self.due

    def flushing(self) -> None:
        """A flush is taking its snapshot: it covers everything folded so far."""
        self.due = False


def remaining_messages(next_offsets: dict[int, int], highwater: Callable[[int], int | None]) -> int | None:
    """Messages Kafka holds past the fold's position, over these partitions (None if a high
    watermark is not known yet, or there is no partition)."""
    if not next_offsets:
        return None
    total = 0
    for p, next_offset in next_offsets.items():
        high = highwater(p)
        if high is None:
            return None
        total += max(0, high - next_offset)
    return total


class FlushHold:
    """Holds back a flush the interval makes due near a backlog's end.

    Catching up, a flush costs about as much for the last part of a backlog as for the
    rest (it rewrites every open hour, day and week row: ~200,000 rows per million events on
    the benchmark), so one that falls shortly before the end is mostly paid twice. When the
    messages left, at the rate folded since the last flush, would take at most `within`
    seconds, the flush waits for the backlog's end (which flushes at once, `BacklogEnd`),
    but never more than `at_most` seconds past its time. The rate includes the time the last
    flush held the fold, so it errs on the slow side: fewer holds.

    Two limits keep a hold from costing more than it saves:
    - one that ran out before the end (traffic as fast as the fold, a wrong rate) is the
      last until the backlog is seen to end (`ended`): a worker that stays near an end it
      never reaches is not held at every flush;
    - none when the events folded meanwhile would reach `max_pending` (the backpressure
      bound): that flush would come anyway, after a pause.
    """

    def __init__(self, within: float, at_most: float, now: float, max_pending: int | None = None) -> None:
        self.within = within
        self.at_most = at_most
        self.max_pending = max_pending
        self.since = now
        self.folded = 0
        self.until: float | None = None
        self.spent = False  # a hold ran out before the backlog's end: no more until `ended`

    def flushed(self, now: float) -> None:
        """A flush starts: measure the rate afresh, and hold the next one anew."""
        self.since, self.folded, self.until = now, 0, None

    def ended(self) -> None:
        """The backlog was folded to its end: the next backlog may be held again."""
        self.spent = False

    def took(self, messages: int) -> None:
        self.folded += messages

    def holds(self, now: float, remaining: int | None, pending: int = 0) -> bool:
        """Whether the flush due now waits (the first True starts the at_most clock).
        `pending`: events folded since the last flush."""
        if self.until is not None:
            if now < self.until:
                return True
            self.spent = True
            return False
        if self.spent or remaining is None or self.folded <= 0 or now <= self.since:
            return False
        elapsed = now - self.since
        if remaining * elapsed / self.folded > self.within:
            return False
        if self.max_pending is not None and pending * (elapsed + self.at_most) / elapsed >= self.max_pending:
            return False
        self.until = now + self.at_most
        return True


def flush_hold(config: Config, now: float) -> FlushHold:
    """The worker's hold: for a backlog that would end within three quarters of an interval,
    at most one interval.

    Why that long: on a machine whose fold passed the 5 s flush with 35-40% of the benchmark's
    backlog left (2.7-3.3 s at the rate so far), a quarter of the interval (at most half) let
    every run flush twice; one interval made each one flush, with half of PostgreSQL's CPU
    (README, "Measured figures"). Three quarters rather than the whole interval: an end
    estimated just under `at_most` away and reached just after it would cost the wait and
    the second flush both.
    """
    return FlushHold(within=0.75 * config.flush_interval, at_most=config.flush_interval, now=now,
                     max_pending=config.max_pending_events)


def stream_id(config: Config) -> str:
    """Identity of the stream's stored state: one per (consumer group, topic)."""
    return f"{config.group_id}:{config.topic}"


class BoundedBufferConsumer(faust_aiokafka.Consumer):
    """Faust's consumer, minus the read-ahead stall.

    When the stream buffer passes 80% of `stream_buffer_maxsize`, Faust drops each
    partition from its fetch set until the buffer drains to 40%; once every partition is
    dropped, its fetch loop sleeps a whole second (`Consumer._wait_next_records`) and
    does not notice the drain. Behind a fold slower than the broker that is a stall of up
    to 1 s every few batches: the agent waited 3.7 s for messages in a 10 s bench run
    (`bench/stream_e2e.py`, scenario 1). Keeping every partition fetchable leaves the
    bound to the buffer itself: the conductor awaits `put` on a full queue, so fetching
    pauses exactly as long as the buffer is full, and memory stays bounded as before:
    `stream_buffer_maxsize` messages, plus the fetch being handed over and the one aiokafka
    has fetched ahead (each at most `consumer_max_fetch_size` per partition).
    """

    def on_buffer_full(self, tp: TP) -> None:
        return None

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return ShortPollConsumerThread(self, loop=self.loop, beacon=self.beacon)


class ShortPollConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer with fetches that wait at most `FETCH_MAX_WAIT_MS`.

    aiokafka keeps one fetch in flight per broker, and leaves out of it the partitions
    whose fetched records are not consumed yet. Near a backlog's end the partitions already
    drained go alone into a fetch that the broker holds for `fetch_max_wait_ms` (Faust sets
    1,500 ms) for lack of data, while the one partition with messages left waits behind it.
    Traced on the benchmark: the last 50 messages of one partition came 1.2 s after the
    rest, in about half the runs. A short wait costs an idle worker a few more empty fetches.
    """

    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> Any:
        return short_poll(super()._create_worker_consumer(transport))


def short_poll(consumer: Any) -> Any:
    """Set an aiokafka consumer's fetch wait to FETCH_MAX_WAIT_MS, before it starts (it
    hands the value to its fetcher in `start`; Faust does not expose the setting)."""
    consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
    return consumer


def build_app(config: Config) -> faust.App:
    """A Faust app configured for this worker (no tables, no web server, raw values)."""
    app = _faust_app(config)
    # The transport builds the consumer lazily from this attribute (Transport.create_consumer).
    if isinstance(app.transport, faust_aiokafka.Transport):
        app.transport.Consumer = BoundedBufferConsumer
    return app


def _faust_app(config: Config) -> faust.App:
    return faust.App(
        config.group_id,
        broker=[f"kafka://{h.strip()}" for h in config.kafka_bootstrap.split(",")],
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        # Faust wants a data directory even without tables; keep it out of the working directory.
        datadir=os.path.join(tempfile.gettempdir(), "stream-agg-faust-{conf.name}"),
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=config.session_timeout,
        broker_heartbeat_interval=config.heartbeat_interval,
        broker_rebalance_timeout=config.rebalance_timeout,
        broker_commit_interval=1.0,
        stream_wait_empty=False,  # our acks wait for PostgreSQL; the revoke hook flushes instead
        stream_recovery_delay=0.0,
        producer_acks=-1,
        # Faust counts messages, and one message may carry a batch of ~1,000 events: keep the
        # read-ahead small (100 messages) and let the take stop at a byte budget (TakeLimit),
        # so memory is bounded by bytes, not by luck.
        stream_buffer_maxsize=100,
    )


class WorkerShell:
    """Wires a Processor into a Faust app."""

    def __init__(self, config: Config, registry: Registry | None = None,
                 metrics: Metrics | None = None, topic_partitions: int | None = None) -> None:
        self.config = config
        self.registry = registry or default_registry(config.cardinality_caps)
        self.metrics = metrics or Metrics(job="stream")
        self.store = StreamStore(config.database_url)
        self.processor = Processor(config, self.registry, self.store, self.metrics, stream_id(config))
        self.processor.topic_partitions = topic_partitions
        self.app = build_app(config)
        self.topic = self.app.topic(config.topic, value_type=bytes, value_serializer="raw",
                                    key_serializer="raw", allow_empty=True)
        self.dlq = self.app.topic(config.dlq, value_type=bytes, value_serializer="raw", key_serializer="raw")
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-agg-fold")
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-agg-flush")
        self.flush_lock = asyncio.Lock()
        self.fold_gate = asyncio.Lock()  # held to queue work on the processing thread in a set order
        self.last_flush = time.monotonic()
        self.flush_task: asyncio.Future[bool] | None = None
        self.last_flush_seconds = 0.0
        self.last_batch = time.monotonic()  # when the fold loop last finished a micro-batch (`_idle`)
        self.folding = False  # the fold loop holds a micro-batch (waiting for its decoding, or folding it)
        self.idle_after = idle_after(config)
        self.backlog = BacklogEnd()
        self.take_limit = TakeLimit(config.batch_size, FOLD_BYTES, positions=self._fold_positions)
        self.hold = flush_hold(config, now=self.last_flush)
        self.failures = 0
        self.stopping = False
        # First after a routine flush up to a minute in (jittered, so that workers started
        # together do not all prune at once), then every prune_interval.
        self.next_prune = time.monotonic() + random.uniform(0.0, min(config.prune_interval, 60.0))
        # Micro-batches go from the agent to the fold loop through a small queue, each with its
        # decoding already started in the helper process(es): decoding overlaps folding.
        self.decoder = (DecodePool(self.registry, config.archive, config.decode_processes)
                        if config.decode_processes else None)
        # A micro-batch queued here when the group rebalances may be folded after its partitions
        # were re-assigned: each message carries the generation it was fetched in, and the
        # processor drops those of an older generation than the partition's assignment.
        # Deep enough to hold the chunks a batch may be joined up to (`join_budget`). Raw
        # chunks held: the batch being folded (up to 3 with joining), the queue, and the one
        # the agent waits to put: up to 6 of 16 MB, against 3 without joining.
        self.join_bytes = join_budget(config)
        self.batches = ChunkQueue(maxsize=max(1, config.decode_processes, self.join_bytes // FOLD_BYTES))
        # A micro-batch that is not full is folded before the next is taken (`fold_progress`).
        self.progress = FoldProgress()
        self.app.agent(self.topic, name="stream-agg-fold", concurrency=1)(self._agent)
        self.app.task(self._fold_loop)
        self.app.task(self._flush_loop)
        self.app.on_partitions_assigned.connect(self._on_assigned)
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self.app.on_rebalance_complete.connect(self._on_rebalance_complete)
        self.app.on_before_shutdown.connect(self._on_shutdown)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _ours(self, tps: set[TP]) -> set[int]:
        return {tp.partition for tp in tps if tp.topic == self.config.topic}

    # ----------------------------------------------------------------- rebalance

    async def _on_assigned(self, sender: Any, assigned: set[TP], **_: Any) -> None:
        self.take_limit.reassigned()
        await self._assign(self._ours(assigned))

    async def _on_rebalance_complete(self, sender: Any, **_: Any) -> None:
        """Make Kafka's committed offsets equal PostgreSQL's before Faust seeks to them.

        Faust seeks every assigned partition to its committed offset right after this
        signal. PostgreSQL is the source of truth: it is never behind what we acked, but
        it can be behind Kafka after a database restore or a fresh database on an old
        consumer group; committing its offsets here makes Faust re-read exactly what is
        missing. (Uses the transport-level commit: Faust's public one only commits acks.)
        """
        parts = self._ours(self.app.consumer.assignment())
        await self._assign(parts)
        count = self.app.consumer.topic_partitions(self.config.topic)
        if count:
            self.processor.topic_partitions = count
        offsets = {TP(self.config.topic, p): ctx.next_offset for p, ctx in self.processor.contexts.items()
                   if p in parts}
        if offsets:
            await self.app.consumer._commit(offsets)
            log.info("positioned partitions at PostgreSQL offsets %s (topic has %s partitions)",
                     {tp.partition: o for tp, o in sorted(offsets.items())}, self.processor.topic_partitions)

    async def _assign(self, parts: set[int]) -> None:
        if parts and not self.processor.contexts:
            # The first flush interval starts with the first partitions, not at start-up: a
            # worker that took seconds to join would otherwise flush a sliver of its backlog
            # right away, and rewrite those buckets' rows again at the next flush.
            self.last_flush = time.monotonic()
            self.hold.flushed(self.last_flush)
        delay = 1.0
        while True:
            try:
                await self._run(self.processor.assign, parts, self.app.consumer_generation_id)
                self.metrics.db_up.set(1)
                return
            except SchemaTooNewError as exc:  # nothing to retry: this version must stop
                log.error("not taking partitions=%s: %s; stopping this worker", sorted(parts), exc)
                await self.app.crash(exc)
                return
            except Exception as exc:  # noqa: BLE001 - keep trying until PostgreSQL is back
                self.metrics.db_up.set(0)
                log.warning("cannot load offsets for partitions=%s: %s; retrying in %.0fs",
                            sorted(parts), describe_db_error(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)

    async def _on_revoked(self, sender: Any, revoked: set[TP], **_: Any) -> None:
        self.take_limit.reassigned()
        parts = self._ours(revoked)
        if not parts:
            return
        await self._flush(reason="revoke")
        await self._run(self.processor.revoke, parts)

    async def _on_shutdown(self, sender: Any, **_: Any) -> None:
        self.stopping = True
        self.progress.close()
        self.store.stats.disabled = True  # exiting: no ANALYZE after the last flush (close would cancel it)
        ok = await self._flush(reason="shutdown")
        log.info("final flush on shutdown: %s", "ok" if ok else "FAILED (will be re-read from Kafka)")
        if self.decoder is not None:
            self.decoder.close()
        await asyncio.get_running_loop().run_in_executor(self.writer, self.store.close)
        await self._run(self.processor.reader.close)
        self.executor.shutdown(wait=False)
        self.writer.shutdown(wait=False)

    # ----------------------------------------------------------------- consuming

    async def _agent(self, stream: faust.StreamT) -> None:
        def position() -> tuple[int, int] | None:
            event = stream.current_event
            return None if event is None else (event.message.partition, event.message.offset)

        limit = self.take_limit
        limit.position = position
        stream.add_processor(limit.count)  # runs before take_events' own buffering processor
        async for events in stream.take_events(limit, within=self.config.batch_timeout):  # type: ignore[arg-type]
            full = limit.next_take(len(events))  # before any await: see TakeLimit
            self.backlog.took(full)
            msgs = []
            for ev in events:
                message = ev.message
                message.incref()  # held until the flush that makes it durable
                msgs.append(Message(message.partition, message.offset, message.value, message,
                                    message.generation_id))
            for chunk in _chunks(msgs, FOLD_BYTES):
                decoding = None
                if self.decoder is not None and self.decoder.running:
                    by_partition: dict[int, list[tuple[int, bytes | None]]] = {}
                    for m in chunk:
                        by_partition.setdefault(m.partition, []).append((m.offset, m.value))
                    decoding = await self.decoder.send(list(by_partition.items()))
                await self.batches.put((chunk, decoding))
                self.progress.hand()  # no await in between: the fold loop never sees it uncounted
            # Full (a take's worth came within the batch timeout): the next micro-batch is taken
            # and decoded while this one folds. Not full: this one is folded first, so that
            # Faust's per-message work for the next does not fight the fold for the GIL
            # (kafka/fold_progress.py).
            self.metrics.micro_batches.labels("pipelined" if full else "lockstep").inc()
            if not full:
                await self.progress.wait(self.progress.handed)

    async def _fold_loop(self) -> None:
        """Fold micro-batches in order as the agent hands them over (their decoding under way).

        Behind a backlog, the chunks queued after the first whose decoding is already done
        are folded with it as one batch, up to `join_bytes` of payload: the fold's cost per
        call and per key is then shared by more events (`core/column_concat`). Only decoded
        chunks are joined, so the fold never waits for the helper to join one more, and a
        worker keeping up with live traffic folds each micro-batch as it comes (the agent
        waits for it: `self.progress`).
        """
        try:
            while not self.stopping:
                chunk, decoding = await self.batches.get()
                self.folding = True
                decoded = None
                if decoding is not None and self.decoder is not None:
                    decoded = await self.decoder.result(decoding)
                if self.stopping:
                    return
                chunks = 1
                if decoded is not None and self.join_bytes:
                    first, queued = len(chunk), self.batches.qsize()
                    chunk, decoded = join_decoded(chunk, decoded, self.batches, self.join_bytes)
                    chunks += queued - self.batches.qsize()
                    if len(chunk) > first:
                        log.debug("folding decoded chunks joined: %d messages (%d in the first chunk), "
                                  "partitions %s", len(chunk), first, sorted(p.partition for p in decoded))
                try:
                    await self._handle(chunk, decoded)
                finally:
                    self.folding, self.last_batch = False, time.monotonic()
                self.progress.done(chunks)
        finally:
            self.progress.close()  # stopped or crashed: the agent must not wait for a fold forever

    async def _handle(self, msgs: list[Message], decoded: list[DecodedPart] | None = None) -> None:
        outcome = await self._process(msgs, decoded)
        # messages folded: not those skipped as re-delivered, stale or not ours
        self.hold.took(len(msgs) - len(outcome.ack_now) - outcome.stale - outcome.ignored)
        for rec in outcome.dlq:
            await self.dlq.send(value=rec.value, headers=rec.headers())
        self.metrics.dlq_messages.inc(len(outcome.dlq))
        self._ack(outcome.ack_now)
        if outcome.ignored:
            self._ack([m.ref for m in msgs if m.partition not in self.processor.contexts])
        for m in msgs:
            # Folded: only the offset is needed until the flush acks it, so let the payload
            # go now instead of holding every message's bytes for a flush interval.
            m.ref.value = None
            m.value = None
        if self.stopping:  # the shutdown flush writes what was folded
            return
        if self.processor.pending_events >= self.config.max_pending_events:
            await self._flush_until_ok(f"pending events {self.processor.pending_events} >= "
                                       f"{self.config.max_pending_events}")
        elif self.processor.archive_bytes >= ARCHIVE_BYTES:
            # The archive is PostgreSQL-bound: rather than piling up COPY text (the largest
            # buffer with the archive on) behind a slow flush, wait for it and write this too;
            # if that flush fails, consumption pauses until one succeeds (memory stays bounded).
            if not await self._flush(reason="archive"):
                await self._flush_until_ok(f"raw archive text pending {self.processor.archive_bytes >> 20} MB "
                                           f">= {ARCHIVE_BYTES >> 20} MB")
        elif self._flushing():
            return  # the next flush is decided once this one ends (the flush loop waits for it)
        elif self._backlog_ended() and self._due(idle=True):
            self._flush_soon("backlog end")  # now, not at the flush loop's next tick
        elif self._due(idle=False):
            self._flush_soon("interval")

    async def _process(self, msgs: list[Message], decoded: list[DecodedPart] | None) -> Outcome:
        """Process a batch; if stored state cannot be loaded, wait and retry (consumption pauses).

        Only database errors are retried: they happen before anything changes. Any other
        error is a bug; the processor is then poisoned (never flushed) and the worker
        crashes, so a restart resumes from the last consistent flush.
        """
        delay = 1.0
        while True:
            if self.stopping:  # not folded, not acked: re-read after the restart
                return Outcome()
            try:
                async with self.fold_gate:
                    outcome = await self._run(self.processor.process, msgs, decoded)
                self.metrics.db_up.set(1)
                return outcome
            except (psycopg.Error, OSError) as exc:  # the batch is retried; nothing was changed
                self.metrics.db_up.set(0)
                self.metrics.paused.set(1)
                log.warning("processing paused (%s): %s; retrying in %.0fs", _offset_ranges(msgs),
                            describe_db_error(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
            except Exception as exc:
                log.exception("internal error processing %s; stopping the worker", _offset_ranges(msgs))
                await self.app.crash(exc)
                raise
            finally:
                self.metrics.paused.set(0)

    def _ack(self, refs: list[Any]) -> None:
        consumer = self.app.consumer
        for ref in refs:
            if ref is not None:
                ref.ack(consumer)

    # ----------------------------------------------------------------- flushing

    async def _flush_loop(self) -> None:
        """Flush on the interval even when no messages arrive (closes idle buckets)."""
        while not self.stopping:
            if self._flushing():
                assert self.flush_task is not None
                await asyncio.wait([self.flush_task], timeout=TICK)  # check again as soon as it ends
            else:
                await asyncio.sleep(min(TICK, self.config.flush_interval / 2))
            self._update_lag()
            idle = self._idle() or self._backlog_ended()
            if self.stopping or self._flushing():
                continue
            if not self._due(idle):
                continue
            if await self._run(self.processor.has_work, time.time()):
                self._flush_soon("timer")
            else:
                self.backlog.flushing()  # a flush covered the backlog's end already: nothing is due

    def _idle(self) -> bool:
        """No micro-batch for `idle_after` seconds: none being folded or queued, and the last
        one finished that long ago. (Counted from when a fold started, a fold of a joined batch
        longer than a second on a slow machine counted as idle, and its flush skipped the hold
        for the backlog's end: seen on the benchmark.)"""
        return (not self.folding and self.batches.empty()
                and time.monotonic() - self.last_batch >= self.idle_after)

    def _backlog_ended(self) -> bool:
        """A backlog has just been folded to the end of what Kafka held at its last fetch.

        Its end is then flushed at once, instead of a second later when no message has
        come for `idle_after` (which is what stays for a quiet topic, and for a partition
        whose high watermark is not known yet)."""
        if not self.backlog.behind:
            return self.backlog.due
        try:
            ended = self.backlog.ended(*self._fold_positions())
        except Exception:  # noqa: BLE001 - not known before the consumer has fetched
            return False
        if ended:
            self.hold.ended()
        return ended

    def _fold_positions(self) -> tuple[dict[int, int], Callable[[int], int | None]]:
        """Each owned partition's next offset to fold, and Kafka's high watermark by partition."""
        consumer, topic = self.app.consumer, self.config.topic
        return ({p: ctx.next_offset for p, ctx in list(self.processor.contexts.items())},
                lambda p: consumer.highwater(TP(topic, p)))

    def _due(self, idle: bool) -> bool:
        """The flush interval has passed, and the flush is not held for a backlog's end."""
        now = time.monotonic()
        if now - self.last_flush < self._next_delay(idle):
            return False
        if idle or self.failures or not self.backlog.behind:
            return True
        try:
            remaining = remaining_messages(*self._fold_positions())
        except Exception:  # noqa: BLE001 - not known before the consumer has fetched
            remaining = None
        first = self.hold.until is None
        held = self.hold.holds(now, remaining, self.processor.pending_events)
        if held and first:
            log.info("flush held for the backlog's end: %s messages left at %.0f messages/s (at most %.1fs)",
                     remaining, self.hold.folded / max(now - self.hold.since, 1e-9), self.hold.at_most)
        elif not first and not held:
            log.info("flush hold ran out with %s messages left; no more holds until the backlog ends", remaining)
        return not held

    def _next_delay(self, idle: bool = False) -> float:
        if self.failures:
            return min(self.config.flush_interval * (2 ** self.failures), MAX_BACKOFF)
        if idle:  # caught up: nothing to share the machine with, so make what is pending durable now
            return min(self.config.flush_interval, IDLE_AFTER)
        # Under load a flush rewrites every open bucket whatever the interval, so space
        # flushes at least twice their own duration apart: the writer never takes more
        # than about a third of the time, and rows are still at most a few flushes old.
        return max(self.config.flush_interval, 2.0 * self.last_flush_seconds)

    def _flushing(self) -> bool:
        """A background flush (`_flush_soon`) is running."""
        return self.flush_task is not None and not self.flush_task.done()

    def _flush_soon(self, reason: str) -> None:
        """Start a flush in the background unless one is running (folding does not wait for it)."""
        if not self._flushing():
            self.last_flush = time.monotonic()
            self.flush_task = asyncio.ensure_future(self._flush(reason=reason))

    async def _flush_until_ok(self, why: str) -> None:
        """Backpressure: too much is pending, so stop consuming until a flush succeeds."""
        self.metrics.paused.set(1)
        log.warning("%s: consumption paused until a flush succeeds", why)
        try:
            while not self.stopping and not await self._flush(reason="backpressure"):
                await asyncio.sleep(self._next_delay())
        finally:
            self.metrics.paused.set(0)

    async def _flush(self, reason: str) -> bool:
        async with self.flush_lock:
            self.last_flush = time.monotonic()
            self.hold.flushed(self.last_flush)
            try:
                await self.app.producer.flush()  # DLQ records durable before their messages are acked
                began = time.monotonic()
                self.backlog.flushing()
                snap = await self._snapshot()
                loop = asyncio.get_running_loop()
                try:
                    # PostgreSQL work on its own thread: folding goes on meanwhile.
                    await loop.run_in_executor(self.writer, self.processor.write, snap)
                except BaseException:
                    await self._run(self.processor.rollback, snap)
                    raise
                refs = await self._run(self.processor.commit, snap)
                self.last_flush_seconds = time.monotonic() - began
            except PoisonedError as exc:
                log.error("%s", exc)
                await self.app.crash(exc)
                return False
            except FencedError as exc:
                # Another worker moved a partition past us: our in-memory view is stale. Stop;
                # a restart rejoins the group and resumes from what PostgreSQL holds.
                log.error("flush fenced: %s; stopping this worker", exc)
                self.metrics.flush_failures.inc()
                await self.app.crash(exc)
                return False
            except Exception as exc:  # noqa: BLE001 - keep state, retry with backoff
                self.failures += 1
                self.metrics.flush_failures.inc()
                self.metrics.db_up.set(0)
                log.warning("flush failed (%s, attempt %d): %s; state kept in memory, next try in %.0fs",
                            reason, self.failures, describe_db_error(exc), self._next_delay())
                return False
            self.failures = 0
            self.metrics.db_up.set(1)
            self._ack(refs)
            if reason in ROUTINE and self.config.prune_interval and time.monotonic() >= self.next_prune:
                await self._prune()
            return True

    async def _prune(self) -> None:
        """Delete old stream state (`Processor.prune`) on the writer's thread, right after a
        routine flush of this worker. It is tried again soon when another worker's flush held
        the stream's lock, or when it failed: nothing depends on it."""
        every = self.config.prune_interval
        try:
            report = await asyncio.get_running_loop().run_in_executor(self.writer, self.processor.prune)
        except Exception as exc:  # noqa: BLE001 - retried later
            every = min(every, PRUNE_RETRY)
            log.warning("pruning old stream state failed: %s; next try in %.0fs", describe_db_error(exc), every)
        else:
            if report is not None and report.busy:
                every = min(every, PRUNE_RETRY)
            if report is not None:
                await self._run(self.processor.set_floor, report.floor)
        self.next_prune = time.monotonic() + every

    async def _snapshot(self) -> Snapshot:
        """Take a snapshot and queue the merge of its rows and the encoding of its blobs
        right behind it (`Processor.finish`), ahead of any fold: the writer COPYs each
        table's rows as it is merged, and waits for the blobs only before the partials.
        The fold gate keeps a fold from being queued in between, which would put events
        past the snapshot's offsets into its rows and blobs."""
        async with self.fold_gate:
            snap: Snapshot = await self._run(self.processor.snapshot, False)
            if snap.payload is not None:
                snap.payload.encoded = BlobFeed()
                self.executor.submit(self.processor.finish, snap, snap.payload.encoded)
        return snap

    def _update_lag(self) -> None:
        try:
            consumer = self.app.consumer
            for p, ctx in list(self.processor.contexts.items()):
                high = consumer.highwater(TP(self.config.topic, p))
                if high is not None:
                    durable = ctx.base_offset if ctx.base_offset is not None else 0
                    self.metrics.consumer_lag.labels(str(p)).set(max(0, high - durable))
        except Exception:  # noqa: BLE001 - lag is best effort before the consumer has started
            return
