"""The flush's work on the processing thread, without PostgreSQL: merge every row, encode every blob.

Why: in the worker, merging the changed rows and encoding the partial blobs run on the
processing thread and stop folding meanwhile (and the last flush's merge and encoding are on
the critical path of a backlog). `bench/worker_cycle.py` shows them next to PostgreSQL's
writes on a noisy machine; this folds the events once, the way the worker does (4 partitions,
one `PartitionState` each, round-robin JSON-array messages), and then times only those two
steps, repeatedly, so two versions compare at a few percent:

    PYTHONPATH=DIR python bench/flush_cpu.py [--events 500000] [--repeat 5]

Merge: `merged_blocks` of every bucket held, all keys changed (what a backlog's flush
merges). Encode: `PartitionState.encode_buckets` of every partition's buckets (each table's
states of all of them packed at once, then cut per bucket), as `Processor.encode` does. The
printed digests of the rows (in key order) and of the states the blobs hold must be equal between versions
that claim the same output (blob formats and row orders may differ).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from datetime import UTC, datetime

import orjson

from stream_agg.core.aggstate import decode_bucket_items
from stream_agg.core.fold import PartitionState, fold
from stream_agg.core.merged_rows import merged_blocks
from stream_agg.core.registry import default_registry
from stream_agg.kafka.decode_pool import decode_partition
from stream_agg.synthetic import iter_events

START = datetime(2024, 5, 1, tzinfo=UTC)


def folded_states(events: int, per_message: int, partitions: int, take: int, hours: float,
                  users: int) -> list[PartitionState]:
    """Fold the synthetic events like the worker: messages round robin, `take` messages per micro-batch."""
    registry = default_registry({"user": 1000})
    messages: list[tuple[int, int, bytes]] = []
    offsets = [0] * partitions
    chunk: list[dict] = []
    for event in iter_events(events, 1, START, hours, users=users):
        chunk.append(event)
        if len(chunk) == per_message:
            p = len(messages) % partitions
            messages.append((p, offsets[p], orjson.dumps(chunk)))
            offsets[p] += 1
            chunk = []
    if chunk:
        p = len(messages) % partitions
        messages.append((p, offsets[p], orjson.dumps(chunk)))
    states = [PartitionState(registry) for _ in range(partitions)]
    for i in range(0, len(messages), take):
        for p in range(partitions):
            mine = [(o, v) for q, o, v in messages[i:i + take] if q == p]
            part = decode_partition(p, mine, registry, archive=False)
            if part.cols is not None:
                fold(states[p], part.cols)
    return states


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--batch-events", type=int, default=500)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--take", type=int, default=64, help="messages per micro-batch")
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    began = time.perf_counter()
    states = folded_states(args.events, args.batch_events, args.partitions, args.take, args.hours, args.users)
    buckets = sorted(set().union(*(ps.resident for ps in states)))
    keys = sum(len(ps) for ps in states)
    print(f"folded {args.events:,} events into {keys:,} states in {len(buckets)} buckets "
          f"({args.partitions} partitions) in {time.perf_counter() - began:.1f}s")

    merge_s, encode_s = [], []
    rows_digest = blobs_digest = ""
    for _ in range(args.repeat):
        t = time.perf_counter()
        blocks = merged_blocks(states, buckets, cuts={})
        merge_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        blobs = []
        for ps in states:
            held = sorted(ps.resident)
            if hasattr(ps, "encode_buckets"):  # every table's states of all buckets at once
                whole = ps.encode_buckets(held)
                blobs.extend(whole[b][0] for b in held)
            elif hasattr(ps, "bucket_slices"):  # a version before encode_buckets (A/B against it)
                slices = ps.bucket_slices(held)
                blobs.extend(ps.encode_bucket(b, slices[b])[0] for b in held)
            else:  # a version before bucket_slices (A/B against it)
                blobs.extend(ps.encode_bucket(b)[0] for b in held)
        encode_s.append(time.perf_counter() - t)
        h = hashlib.sha256()
        for block in blocks:
            h.update(repr(sorted(block.rows(), key=lambda row: row[0])).encode())  # whatever the row order
        rows_digest = h.hexdigest()[:12]
        h = hashlib.sha256()  # of the states the blobs hold, so that blob formats compare
        for blob in blobs:
            h.update(repr(decode_bucket_items(blob)).encode())
        blobs_digest = h.hexdigest()[:12]
    rows = sum(len(b) for b in blocks)
    print(f"merge:  median {statistics.median(merge_s):.3f}s over {args.repeat} "
          f"({', '.join(f'{x:.3f}' for x in merge_s)}) for {rows:,} rows; rows sha256 {rows_digest}")
    print(f"encode: median {statistics.median(encode_s):.3f}s over {args.repeat} "
          f"({', '.join(f'{x:.3f}' for x in encode_s)}) for {keys:,} states; states sha256 {blobs_digest}")


if __name__ == "__main__":
    main()
