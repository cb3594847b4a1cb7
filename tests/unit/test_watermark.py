"""Watermark: late / too-late decisions depend on event times only; idle partitions still close."""

from __future__ import annotations

import numpy as np

from stream_agg.core.watermark import Watermark, WatermarkPolicy

P = WatermarkPolicy(out_of_orderness=10.0, grace=60.0, horizon=7 * 86400.0, idle_timeout=30.0)
H = 3600.0


def test_late_and_too_late_follow_running_max() -> None:
    w = Watermark(P)
    base = 100 * H
    ts = np.array([base + 10, base + 2 * H, base + 5, base + 2 * H - 10 * 86400, base + H + 100])
    c = w.classify(ts)
    # event 2 (base+5): watermark before it = base+2H-10 -> its hour closed at base+H+60 -> late
    assert c.late.tolist() == [False, False, True, False, False]
    assert c.too_late.tolist() == [False, False, False, True, False]
    assert c.max_event_time == base + 2 * H


def test_classification_is_independent_of_batch_split() -> None:
    rng = np.random.default_rng(5)
    ts = np.cumsum(rng.exponential(300, 2000)) + rng.normal(0, 4000, 2000)
    whole = Watermark(P).classify(ts)
    w = Watermark(P)
    late, too = [], []
    for chunk in np.array_split(ts, 17):
        c = w.classify(chunk)
        w.max_event_time = c.max_event_time
        late.append(c.late)
        too.append(c.too_late)
    assert np.array_equal(np.concatenate(late), whole.late)
    assert np.array_equal(np.concatenate(too), whole.too_late)
    assert whole.late.sum() > 0


def test_idle_partition_advances_with_wall_clock() -> None:
    w = Watermark(P, max_event_time=1000.0, last_event_wall=50_000.0)
    assert w.effective(50_000.0) == 990.0
    assert w.effective(50_030.0) == 990.0
    assert w.effective(50_100.0) == 990.0 + 70.0
    assert not w.is_closed(1000.0, 50_000.0)
    assert w.is_closed(1000.0, 50_000.0 + 30 + 80)
    assert Watermark(P).lag_seconds(1.0) == 0.0
