"""Event-time buckets: UTC hour, UTC day and ISO week (Monday 00:00 UTC).

Buckets are identified by their start as integer epoch seconds. The arithmetic is
plain flooring because UTC has no DST; weeks are anchored on 1970-01-05, the first
Monday after the epoch, which is what PostgreSQL's `date_trunc('week', ...)` does.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import numpy as np
import numpy.typing as npt

Granularity = Literal["hour", "day", "week"]
GRANULARITIES: tuple[Granularity, ...] = ("hour", "day", "week")

HOUR = 3600
DAY = 86400
WEEK = 604800
_MONDAY_OFFSET = 4 * DAY  # 1970-01-01 was a Thursday; 1970-01-05 a Monday

SPAN: dict[str, int] = {"hour": HOUR, "day": DAY, "week": WEEK}


def bucket_start(ts: float, granularity: str) -> int:
    """Start (epoch seconds) of the bucket holding instant `ts` (epoch seconds)."""
    if granularity == "week":
        return int((ts - _MONDAY_OFFSET) // WEEK) * WEEK + _MONDAY_OFFSET
    span = SPAN[granularity]
    return int(ts // span) * span


def bucket_end(start: int, granularity: str) -> int:
    """Exclusive end of the bucket starting at `start`."""
    return start + SPAN[granularity]


def bucket_starts(ts: npt.NDArray[np.float64], granularity: str) -> npt.NDArray[np.int64]:
    """Vectorised `bucket_start` over an array of epoch seconds."""
    if granularity == "week":
        return (np.floor((ts - _MONDAY_OFFSET) / WEEK).astype(np.int64) * WEEK) + _MONDAY_OFFSET
    span = SPAN[granularity]
    return np.floor(ts / span).astype(np.int64) * span


def truncate(moment: datetime, granularity: str) -> tuple[datetime, datetime]:
    """(start, end) of the bucket holding an aware datetime, both in UTC."""
    if moment.tzinfo is None:
        raise ValueError("bucket truncation needs an aware datetime (event time has an offset)")
    start = bucket_start(moment.timestamp(), granularity)
    return to_datetime(start), to_datetime(bucket_end(start, granularity))


def to_datetime(epoch: int | float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)


def parent_bucket(start: int, granularity: str) -> int:
    """Start of the day/week bucket that contains the hour bucket `start`."""
    return bucket_start(float(start), granularity)
