"""FlushHold: an interval flush waits for a backlog's end only when that end is near, and
never longer than its bound; `remaining_messages` sums what Kafka holds past the fold."""

from __future__ import annotations

from stream_agg.kafka.worker import FlushHold, remaining_messages


def test_remaining_messages_sums_each_partition_past_the_fold() -> None:
    highs = {0: 500, 1: 480, 2: 510, 3: 500}
    assert remaining_messages({0: 470, 1: 480, 2: 490, 3: 501}, highs.get) == 30 + 0 + 20 + 0
    assert remaining_messages({0: 470, 9: 0}, highs.get) is None  # a high watermark not known yet
    assert remaining_messages({}, highs.get) is None  # no partition: no backlog to wait for


def test_a_flush_just_before_the_end_of_a_backlog_waits_for_it_at_most_its_bound() -> None:
    hold = FlushHold(within=1.25, at_most=2.5, now=100.0)
    hold.took(1950)  # 1,950 messages in 5 s: 390 messages/s
    assert not hold.holds(105.0, 600)  # 600 left: 1.54 s > 1.25 s, flush now
    assert hold.until is None
    assert hold.holds(105.0, 50)  # 50 left: 0.13 s
    assert hold.until == 107.5
    assert hold.holds(106.0, 5000)  # held once: the bound alone decides now, whatever is left
    assert not hold.holds(107.5, 0)
    hold.flushed(107.6)  # the flush starts: the rate is measured afresh, the next flush held anew
    assert hold.until is None and hold.folded == 0
    assert not hold.holds(108.0, 1)  # nothing folded since: no rate, no hold
    hold.took(100)
    assert not hold.holds(108.6, None)  # end unknown: no hold
    assert hold.holds(108.6, 100)  # 100 left at 100/s: 1.0 s <= 1.25 s
