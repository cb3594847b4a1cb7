"""Per-partition event-time watermark: closes buckets, classifies late and too-late events.

watermark = max event time seen - allowed out-of-orderness. It is computed from event
times only (a running maximum in partition order), so whether an event is late or too
late never depends on batch boundaries, restarts or the machine's clock: a replay
decides exactly as the first run did. Only *closing* buckets of an idle partition uses
the wall clock (after `idle_timeout` without events, the watermark advances with time),
and closing changes when a row is final, never what it contains. The stream-wide prune
floor (`floor`, core/retention.py) is below every partition's own too-late line once it
has a watermark, so it only decides for partitions that have none yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stream_agg.core.buckets import HOUR


@dataclass(frozen=True)
class WatermarkPolicy:
    out_of_orderness: float = 30.0
    grace: float = 60.0
    horizon: float = 7 * 86400.0
    idle_timeout: float = 60.0


@dataclass(frozen=True)
class Classified:
    """Per event of a batch: folded normally, late (its hour already closed) or too late."""

    late: npt.NDArray[np.bool_]
    too_late: npt.NDArray[np.bool_]
    max_event_time: float  # running max after the batch


@dataclass
class Watermark:
    """Mutable watermark state of one partition; `max_event_time` is persisted with offsets."""

    policy: WatermarkPolicy
    max_event_time: float = -math.inf
    last_event_wall: float | None = None
    # Stream-wide: events before it are too late for every partition, because the buckets
    # they would fold into may have been pruned (core/retention.py). Read from PostgreSQL.
    floor: float = -math.inf

    @property
    def event_watermark(self) -> float:
        return self.max_event_time - self.policy.out_of_orderness

    def classify(self, ts: npt.NDArray[np.float64]) -> Classified:
        """Classify a batch in partition order against the watermark *before* each event."""
        if ts.size == 0:
            empty = np.zeros(0, dtype=bool)
            return Classified(empty, empty, self.max_event_time)
        running = np.maximum.accumulate(np.concatenate(([self.max_event_time], ts)))[:-1]
        wm_before = running - self.policy.out_of_orderness
        too_late = (ts < wm_before - self.policy.horizon) | (ts < self.floor)
        hour_end = np.floor(ts / HOUR) * HOUR + HOUR
        late = ~too_late & (hour_end + self.policy.grace <= wm_before)
        return Classified(late, too_late, float(max(self.max_event_time, ts.max())))

    def advance(self, classified: Classified, wall_now: float) -> None:
        """Record a folded batch: new max event time, and when we last saw events."""
        if classified.max_event_time > self.max_event_time:
            self.max_event_time = classified.max_event_time
        if classified.late.size:
            self.last_event_wall = wall_now

    def effective(self, wall_now: float) -> float:
        """Watermark used to close buckets: the event watermark, advanced while idle."""
        wm = self.event_watermark
        if self.last_event_wall is not None and math.isfinite(wm):
            idle = wall_now - self.last_event_wall - self.policy.idle_timeout
            if idle > 0:
                wm += idle
        return wm

    def is_closed(self, bucket_end: float, wall_now: float) -> bool:
        return bucket_end + self.policy.grace <= self.effective(wall_now)

    def lag_seconds(self, wall_now: float) -> float:
        """How far event time trails the wall clock (for the watermark-lag gauge)."""
        if not math.isfinite(self.max_event_time):
            return 0.0
        return max(0.0, wall_now - self.event_watermark)
