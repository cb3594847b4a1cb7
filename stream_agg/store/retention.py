"""Deleting the stream state of buckets nothing can fold into any more (core/retention.py).

`stream_partials`, `stream_partial_deltas` and `stream_cap_cuts` would otherwise grow by a
blob per partition and bucket forever. Moving the floor and the flushes are serialised by
one advisory lock per stream: every flush takes it shared (flushes never wait for each
other) and reads the floor under it; the prune *tries* it exclusive (never waits, so no
worker's flush queues behind it) just long enough to store a new floor. A flush that
folded an event into a bucket before the floor moved past it (only a partition that had no
watermark when the floor moved: one the pruning worker's partition count did not cover yet)
is refused as fenced instead of writing the bucket's row from its own partial alone; the
restarted worker reads the floor and sends those events to the DLQ as too_late.

The deletes run afterwards in a transaction of their own, without the lock: once the floor
is committed no flush can write a bucket below it, and PostgreSQL keeps the deletes away from
the rows flushes write. They run at every prune, not only when the floor moves, so a prune
interrupted after its floor was stored finishes next time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg

from stream_agg.core.buckets import GRANULARITIES
from stream_agg.core.retention import advance, last_prunable_starts, prune_floor, unmarked
from stream_agg.core.watermark import WatermarkPolicy

LOCK_SPACE = 727275  # first key of the two-key advisory locks (a key space apart from the buckets' one-key locks)
# bucket_time <= the granularity's last prunable start, for each granularity
_OLD = "(" + " OR ".join(f"granularity = '{g}' AND bucket_time <= %({g})s" for g in GRANULARITIES) + ")"
TABLES = ("stream_partials", "stream_partial_deltas", "stream_cap_cuts")


@dataclass
class PruneReport:
    floor: float | None  # the stored floor after the attempt (None: none yet)
    moved: bool = False
    busy: bool = False  # a flush held the stream's lock: the floor was not moved this time
    unmarked: list[int] = field(default_factory=list)  # partitions without a watermark, holding it back
    deleted: dict[str, int] = field(default_factory=dict)  # table -> rows deleted below the floor


def floor_for_flush(cur: psycopg.Cursor, stream: str) -> float | None:
    """Hold the stream's prune lock (shared) until commit and read the floor under it."""
    cur.execute("SELECT pg_advisory_xact_lock_shared(%s, hashtext(%s))", (LOCK_SPACE, stream))
    return read_floor(cur, stream)


def read_floor(cur: psycopg.Cursor, stream: str) -> float | None:
    cur.execute("SELECT pruned_before FROM stream_retention WHERE stream = %s", (stream,))
    row = cur.fetchone()
    return None if row is None else float(row[0])


def move_floor(cur: psycopg.Cursor, stream: str, partitions: int, policy: WatermarkPolicy) -> PruneReport:
    """Store the floor the stream's stored watermarks allow, if higher; the caller commits
    at once (it holds the stream's lock exclusive until then)."""
    cur.execute("SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", (LOCK_SPACE, stream))
    row = cur.fetchone()
    if row is None or not row[0]:
        return PruneReport(read_floor(cur, stream), busy=True)
    stored = read_floor(cur, stream)
    cur.execute("SELECT partition, max_event_time FROM stream_offsets WHERE stream = %s", (stream,))
    marks = {int(p): None if t is None else float(t) for p, t in cur.fetchall()}
    floor = advance(stored, prune_floor(marks, partitions, policy))
    if floor is None or floor == stored:
        return PruneReport(stored, unmarked=unmarked(marks, partitions))
    cur.execute(
        "INSERT INTO stream_retention (stream, pruned_before, updated_at) VALUES (%s, %s, now()) "
        "ON CONFLICT (stream) DO UPDATE SET pruned_before = EXCLUDED.pruned_before, updated_at = now()",
        (stream, floor))
    return PruneReport(floor, moved=True)


def delete_below(cur: psycopg.Cursor, stream: str, floor: float) -> dict[str, int]:
    """Delete the stream state of every bucket ending at or before `floor`; table -> rows.

    Cap cuts are per scope of metrics_aggregates, not per stream; one missing only makes the
    next writer of that scope (a replay, say) scan it for rows past its cut."""
    last = {g: datetime.fromtimestamp(t, tz=UTC) for g, t in last_prunable_starts(floor).items()}
    deleted: dict[str, int] = {}
    for table in TABLES:
        mine = "stream = %(stream)s AND " if table != "stream_cap_cuts" else ""
        cur.execute(f"DELETE FROM {table} WHERE {mine}{_OLD}", {**last, "stream": stream})
        deleted[table] = cur.rowcount
    return deleted
