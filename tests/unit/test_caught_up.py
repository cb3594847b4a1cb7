"""`caught_up`: the worker flushes the end of a backlog as soon as it has folded all of it."""

from __future__ import annotations

from stream_agg.kafka.worker import caught_up


def test_caught_up_only_when_every_partition_reached_its_high_watermark() -> None:
    high = {0: 120, 1: 40}
    assert caught_up({0: 120, 1: 40}, high.get)
    assert caught_up({0: 121, 1: 40}, high.get)  # a watermark older than what was folded
    assert not caught_up({0: 119, 1: 40}, high.get)  # one message of partition 0 not folded yet
    assert not caught_up({0: 120, 1: 39}, high.get)
    assert not caught_up({0: 120, 1: 40, 2: 0}, high.get)  # partition 2: no watermark known yet
    assert not caught_up({}, high.get)  # nothing assigned: nothing to say
