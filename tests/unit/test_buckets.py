"""Bucket arithmetic on known instants (the PostgreSQL comparison is in tests/integration)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from stream_agg.core.buckets import bucket_start, bucket_starts, truncate


@pytest.mark.parametrize(("moment", "gran", "start"), [
    (datetime(2026, 1, 1, 0, 30, tzinfo=UTC), "hour", datetime(2026, 1, 1, 0, tzinfo=UTC)),
    (datetime(2026, 1, 1, 5, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))), "day",
     datetime(2026, 1, 1, tzinfo=UTC)),
    (datetime(2026, 1, 1, 5, 29, tzinfo=timezone(timedelta(hours=5, minutes=30))), "day",
     datetime(2025, 12, 31, tzinfo=UTC)),
    (datetime(2026, 1, 1, 12, tzinfo=UTC), "week", datetime(2025, 12, 29, tzinfo=UTC)),  # Thursday
    (datetime(2020, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "week", datetime(2020, 12, 28, tzinfo=UTC)),  # wk 53
    (datetime(2024, 2, 29, 23, 59, tzinfo=UTC), "day", datetime(2024, 2, 29, tzinfo=UTC)),
    (datetime(1969, 12, 31, 23, 0, tzinfo=UTC), "week", datetime(1969, 12, 29, tzinfo=UTC)),
])
def test_known_buckets(moment: datetime, gran: str, start: datetime) -> None:
    s, e = truncate(moment, gran)
    assert s == start
    assert e - s == {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(days=7)}[gran]
    assert bucket_start(moment.timestamp(), gran) == int(start.timestamp())


def test_vectorised_equals_scalar() -> None:
    ts = np.random.default_rng(0).uniform(-1e9, 4e9, 5000)
    for g in ("hour", "day", "week"):
        assert bucket_starts(ts, g).tolist() == [bucket_start(float(t), g) for t in ts]


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError):
        truncate(datetime(2026, 1, 1), "hour")
