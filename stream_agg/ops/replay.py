"""Re-read a time range from Kafka and rewrite its buckets from the stream's own fold.

Useful when the raw archive is off (nothing for the backfill to read). Reading: a plain
kafka-python consumer with manually assigned partitions and no group (nothing is
committed, no running worker is disturbed), from `offsets_for_times(start - lookback)`
per partition. A partition is done when its messages' timestamps pass `end + slack`
(producers publish when a trace completes, so later messages hold later traces), or once
it has reached the end offset captured at the start and then either catches up (no more
records) or meets a record produced after the replay started. The last rule also covers
brokers whose reported end offset lags behind the log (the embedded Tansu reports the
last batch's base offset + 1), without reading a live topic forever.

Folding: events whose event time falls in the range widened to whole buckets of the
coarsest granularity asked for are folded with the core (`to_columns` + `fold`, one
`PartitionState` per source partition, fixed batches of `FOLD_BATCH` events per
partition so the result does not depend on fetch boundaries). Late events produced after
`end + slack` are not seen; widen `--slack` to include them.

Writing, in one transaction under the stream's bucket locks: the stream's partials of
the replayed buckets (selected metrics) are replaced by the replay's per-partition
partials, then every affected row is re-merged through the worker's own merge / upsert
(`StreamStore.merge_rows`): source 'stream', never over a 'backfill' row, and rows
whose key no longer has partials are deleted. Running it again gives the same rows.

Replay is for closed buckets: a worker that still owns an open bucket keeps its state in
memory and will write its own partials over the replayed ones at its next flush.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import psycopg

from stream_agg.core.aggstate import AggState, encode_bucket
from stream_agg.core.buckets import to_datetime
from stream_agg.core.fold import Key, PartitionState, event_times, fold, to_columns
from stream_agg.core.registry import Registry
from stream_agg.events import TraceEvent, decode_message
from stream_agg.ops.backfill import OpsError, coarsest, iso, widen
from stream_agg.store import backfill_sql as q
from stream_agg.store.db import connect
from stream_agg.store.stream_state import StreamStore, lock_buckets, read_bucket_states

log = logging.getLogger(__name__)

FOLD_BATCH = 5000  # events per fold call and partition (fixed: the fold is then deterministic)
POLL_MS = 500
IDLE_POLLS = 2  # empty polls after the captured end offset = caught up


@dataclass(frozen=True)
class ReplayPlan:
    registry: Registry
    granularities: tuple[str, ...]
    start: int  # widened, epoch seconds
    end: int
    lookback: float  # seconds before start to begin reading (messages may be stamped early)
    slack: float  # seconds after end until message timestamps stop the read


def make_replay_plan(registry: Registry, granularities: Sequence[str], start: datetime, end: datetime,
                     lookback: float = 3600.0, slack: float = 3600.0) -> ReplayPlan:
    grans = tuple(granularities)
    lo, hi = widen(start, end, coarsest(grans))
    return ReplayPlan(registry, grans, lo, hi, lookback, slack)


@dataclass
class PartitionRead:
    partition: int
    first_offset: int | None = None
    next_offset: int | None = None
    messages: int = 0
    events: int = 0  # events in the range, folded
    outside: int = 0  # valid events outside the range
    rejects: int = 0
    stop: str = ""


@dataclass
class ReplayResult:
    plan: ReplayPlan
    partitions: dict[int, PartitionRead] = field(default_factory=dict)
    partials: int = 0
    rows: int = 0
    deleted: int = 0
    seconds: float = 0.0

    def total(self, attr: str) -> int:
        return sum(getattr(p, attr) for p in self.partitions.values())

    def describe(self) -> str:
        p = self.plan
        return (f"replay {iso(p.start)} .. {iso(p.end)}: read {self.total('messages'):,} messages from "
                f"{len(self.partitions)} partitions, folded {self.total('events'):,} events in range "
                f"({self.total('outside'):,} outside, {self.total('rejects'):,} invalid skipped); wrote "
                f"{self.partials:,} partials and {self.rows:,} rows, deleted {self.deleted:,} stale rows "
                f"in {self.seconds:.2f} s")


class _Folder:
    """Per-partition fold in fixed batches."""

    def __init__(self, registry: Registry, plan: ReplayPlan) -> None:
        self.registry = registry
        self.plan = plan
        self.states: dict[int, PartitionState] = {}
        self.pending: dict[int, tuple[list[TraceEvent], list[int]]] = {}

    def add(self, partition: int, offset: int, events: list[TraceEvent], read: PartitionRead) -> None:
        ts = event_times(events)
        keep = (ts >= self.plan.start) & (ts < self.plan.end)
        read.outside += int((~keep).sum())
        if not keep.any():
            return
        evs, offs = self.pending.setdefault(partition, ([], []))
        for e, k in zip(events, keep.tolist(), strict=True):
            if k:
                evs.append(e)
                offs.append(offset)
        read.events += int(keep.sum())
        while len(evs) >= FOLD_BATCH:
            self._fold(partition, evs[:FOLD_BATCH], offs[:FOLD_BATCH])
            del evs[:FOLD_BATCH], offs[:FOLD_BATCH]

    def _fold(self, partition: int, events: list[TraceEvent], offsets: list[int]) -> None:
        pstate = self.states.setdefault(partition, PartitionState(self.registry))
        fold(pstate, to_columns(events, np.asarray(offsets, dtype=np.int64), self.registry))

    def finish(self) -> dict[int, PartitionState]:
        for partition, (evs, offs) in self.pending.items():
            if evs:
                self._fold(partition, evs, offs)
        self.pending.clear()
        return self.states


def read_topic(consumer: Any, topic: str, plan: ReplayPlan, folder: _Folder,
               clock: Callable[[], float] = time.time) -> dict[int, PartitionRead]:
    """Read every partition of `topic` for the plan (see module doc for when a partition ends)."""
    from kafka import TopicPartition

    parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise OpsError(f"topic {topic!r} does not exist")
    started_ms = clock() * 1000
    stop_ms = (plan.end + plan.slack) * 1000
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    ends = consumer.end_offsets(tps)
    firsts = consumer.offsets_for_times({tp: int((plan.start - plan.lookback) * 1000) for tp in tps})
    reads = {tp.partition: PartitionRead(tp.partition) for tp in tps}
    active: dict[Any, int] = {}  # tp -> empty polls since reaching the captured end
    for tp in tps:
        found = firsts.get(tp)
        if found is None:
            reads[tp.partition].stop = "no message at or after start - lookback"
            continue
        consumer.seek(tp, found.offset)
        reads[tp.partition].first_offset = found.offset
        active[tp] = 0
    while active:
        batch = consumer.poll(timeout_ms=POLL_MS, max_records=5000)
        done: list[Any] = []
        for tp, records in batch.items():
            if tp not in active:
                continue
            read = reads[tp.partition]
            active[tp] = 0
            for rec in records:
                if rec.timestamp > stop_ms:
                    read.stop = f"message timestamps passed end + slack at offset {rec.offset}"
                    done.append(tp)
                    break
                if rec.offset >= ends[tp] and rec.timestamp > started_ms:
                    read.stop = f"reached the end offset captured at start ({ends[tp]})"
                    done.append(tp)
                    break
                read.messages += 1
                read.next_offset = rec.offset + 1
                decoded = decode_message(rec.value)
                read.rejects += len(decoded.rejects)
                if decoded.events:
                    folder.add(tp.partition, rec.offset, decoded.events, read)
        for tp in list(active):
            if tp in done or tp in batch:
                continue
            if consumer.position(tp) >= ends[tp]:
                active[tp] += 1
                if active[tp] >= IDLE_POLLS:
                    reads[tp.partition].stop = "caught up with the log"
                    done.append(tp)
        for tp in done:
            active.pop(tp, None)
        if done:
            consumer.pause(*done)
    for read in reads.values():
        log.info("partition %d: offsets %s..%s, %d messages, %d events in range: %s", read.partition,
                 read.first_offset, read.next_offset, read.messages, read.events, read.stop)
    return reads


def _selected(states: dict[int, PartitionState], plan: ReplayPlan) -> dict[int, list[tuple[Key, AggState]]]:
    """Per partition, the states of requested granularities inside the widened range."""
    out: dict[int, list[tuple[Key, AggState]]] = {}
    for partition, pstate in states.items():
        out[partition] = [(k, s) for k, s in pstate.states.items()
                          if k[0] in plan.granularities and plan.start <= k[1] < plan.end and s.count]
    return out


def write_replay(conn: psycopg.Connection, url: str, stream: str, plan: ReplayPlan,
                 states: dict[int, PartitionState]) -> tuple[int, int, int]:
    """Replace the stream's partials of the replayed buckets and re-merge their rows (one transaction)."""
    chosen = _selected(states, plan)
    buckets = sorted({(g, b) for g in plan.granularities for b in _bucket_starts(plan, g)})
    metrics = list(plan.registry.names)
    grans = [g for g, _ in buckets]
    times = [to_datetime(b) for _, b in buckets]
    with conn.transaction(), conn.cursor() as cur:
        lock_buckets(cur, buckets)
        # Each (partition, bucket) blob keeps its other metrics' states and gets the replayed
        # states of the selected metrics in place of the stored ones.
        wanted = set(metrics)
        existing = read_bucket_states(cur, stream, buckets)
        keys: set[Key] = {k for k, _ in existing if k[2] in wanted}
        blobs: dict[tuple[int, str, int], list[tuple[Key, AggState]]] = {}
        for (k, p), state in existing.items():
            entry = blobs.setdefault((p, k[0], k[1]), [])
            if k[2] not in wanted:
                entry.append((k, state))
        for p, ups in chosen.items():
            for k, state in ups:
                blobs.setdefault((p, k[0], k[1]), []).append((k, state))
                keys.add(k)
        rows_out = []
        for (p, g, b), items in sorted(blobs.items()):
            applied = max((s.applied_offset for _, s in items), default=-1)
            blob = encode_bucket((k[2], k[3], k[4], s) for k, s in items)
            rows_out.append((g, b, p, blob, len(items), applied))
        store = StreamStore(url)  # its flush helpers, run on our cursor and transaction
        partials = store.write_partials(cur, stream, rows_out, fenced=False)
        cur.execute(q.STREAM_ROW_KEYS_SQL, {"grans": grans, "times": times, "metrics": metrics})
        keys |= {(g, int(t.timestamp()), m, d, v) for g, t, m, d, v in cur.fetchall()}
        rows, deleted, _ = store.merge_rows(cur, stream, keys, caps=plan.registry.caps)
    return partials, rows, deleted


def _bucket_starts(plan: ReplayPlan, granularity: str) -> list[int]:
    from stream_agg.core.buckets import SPAN

    return list(range(plan.start, plan.end, SPAN[granularity]))


def run_replay(bootstrap: str, topic: str, stream: str, url: str, plan: ReplayPlan,
               consumer_factory: Callable[[], Any] | None = None) -> ReplayResult:
    """Read, fold and write; see the module doc."""
    started = time.perf_counter()
    consumer = (consumer_factory or (lambda: make_consumer(bootstrap)))()
    folder = _Folder(plan.registry, plan)
    try:
        reads = read_topic(consumer, topic, plan, folder)
    finally:
        consumer.close()
    states = folder.finish()
    if not any(r.events for r in reads.values()):
        # Nothing of the range was read (a retention gap, or --lookback / --slack too short for
        # back-dated data): rewriting now would erase the stored state, so write nothing.
        raise OpsError("replay read no event of the range from the topic; nothing changed "
                       "(widen --lookback / --slack if the events were produced long after their event time)")
    with connect(url) as conn:
        partials, rows, deleted = write_replay(conn, url, stream, plan, states)
    return ReplayResult(plan, reads, partials, rows, deleted, time.perf_counter() - started)


def make_consumer(bootstrap: str, timeout: float = 10.0) -> Any:
    """A group-less kafka-python consumer (nothing committed); OpsError if the broker does not answer."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    ms = max(1000, int(timeout * 1000))
    options: dict[str, Any] = {
        "bootstrap_servers": [h.strip() for h in bootstrap.split(",")], "group_id": None,
        "enable_auto_commit": False, "auto_offset_reset": "earliest", "client_id": "stream-agg-replay",
        "request_timeout_ms": ms + 5000, "max_partition_fetch_bytes": 8 << 20,
    }
    # kafka-python 3 names the bootstrap timeout differently than 2.x.
    if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG:
        options["bootstrap_timeout_ms"] = ms
    else:
        options["api_version_auto_timeout_ms"] = ms
    from stream_agg.producer import describe_error

    # kafka-python logs every refused connection at ERROR while it retries; the caller
    # reports the outcome in one line instead.
    client_log = logging.getLogger("kafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        return KafkaConsumer(**options)
    except (KafkaError, OSError) as exc:
        raise OpsError(f"cannot reach Kafka at {bootstrap}: {describe_error(exc)}") from None
    finally:
        client_log.setLevel(level)
