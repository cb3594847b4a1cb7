"""Deleting the stream state of buckets nothing can fold into any more (core/retention.py).

`stream_partials`, `stream_partial_deltas` and `stream_cap_cuts` would otherwise grow by a
blob per partition and bucket forever. The prune and the flushes are serialised by one
advisory lock per stream: every flush takes it shared (flushes never wait for each other),
the prune exclusive. Inside that lock a flush reads the floor, so a flush that folded an
event into a bucket pruned meanwhile (only possible for a partition that had no watermark
when the floor moved: a partition added to the topic while another worker's metadata was
stale) is refused as fenced instead of writing the bucket's row from its own partial alone;
the restarted worker reads the new floor and sends those events to the DLQ as too_late.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg

from stream_agg.core.retention import advance, last_prunable_starts, prune_floor
from stream_agg.core.watermark import WatermarkPolicy

log = logging.getLogger(__name__)

LOCK_SPACE = 727275  # first key of the two-key advisory locks (a key space apart from the buckets' one-key locks)


@dataclass
class PruneReport:
    floor: float | None  # the stored floor after this prune (None: none yet)
    moved: bool  # the floor moved forward (and rows were deleted up to it)
    deleted: dict[str, int] = field(default_factory=dict)  # table -> rows deleted


def floor_for_flush(cur: psycopg.Cursor, stream: str) -> float | None:
    """Hold the stream's prune lock (shared) until commit and read the floor under it."""
    cur.execute("SELECT pg_advisory_xact_lock_shared(%s, hashtext(%s))", (LOCK_SPACE, stream))
    return read_floor(cur, stream)


def read_floor(cur: psycopg.Cursor, stream: str) -> float | None:
    cur.execute("SELECT pruned_before FROM stream_retention WHERE stream = %s", (stream,))
    row = cur.fetchone()
    return None if row is None else float(row[0])


def prune(cur: psycopg.Cursor, stream: str, partitions: int, policy: WatermarkPolicy) -> PruneReport:
    """Move the stream's floor to what its stored watermarks allow and delete the state of
    the buckets ending at or before it. The caller commits; run it in its own transaction
    (it waits for the flushes in progress, and new flushes wait for it)."""
    # Bounded: waiting here holds back every worker's next flush (they queue behind it).
    cur.execute("SET LOCAL lock_timeout = '5s'")
    cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_SPACE, stream))
    stored = read_floor(cur, stream)
    cur.execute("SELECT partition, max_event_time FROM stream_offsets WHERE stream = %s", (stream,))
    marks = {int(p): None if t is None else float(t) for p, t in cur.fetchall()}
    floor = advance(stored, prune_floor(marks, partitions, policy))
    if floor is None or floor == stored:
        return PruneReport(stored, False)
    cur.execute(
        "INSERT INTO stream_retention (stream, pruned_before, updated_at) VALUES (%s, %s, now()) "
        "ON CONFLICT (stream) DO UPDATE SET pruned_before = EXCLUDED.pruned_before, updated_at = now()",
        (stream, floor))
    last = {g: datetime.fromtimestamp(t, tz=UTC) for g, t in last_prunable_starts(floor).items()}
    old = ("(granularity = 'hour' AND bucket_time <= %(hour)s OR granularity = 'day' AND bucket_time <= %(day)s "
           "OR granularity = 'week' AND bucket_time <= %(week)s)")
    deleted: dict[str, int] = {}
    for table in ("stream_partials", "stream_partial_deltas"):
        cur.execute(f"DELETE FROM {table} WHERE stream = %(stream)s AND {old}", {**last, "stream": stream})
        deleted[table] = cur.rowcount
    # Cap cuts are per scope of metrics_aggregates, not per stream; one missing only makes
    # the next writer of that scope (a replay, say) scan it for rows past its cut.
    cur.execute(f"DELETE FROM stream_cap_cuts WHERE {old}", last)
    deleted["stream_cap_cuts"] = cur.rowcount
    return PruneReport(floor, True, deleted)
