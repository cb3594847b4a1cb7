"""FlushHold: an interval flush waits for a backlog's end only when that end is near, and
never longer than its bound; `remaining_messages` sums what Kafka holds past the fold."""

from __future__ import annotations

from stream_agg.config import load_config
from stream_agg.kafka.worker import FlushHold, flush_hold, remaining_messages


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
    hold.ended()  # the backlog's end came: the next backlog may be held again
    hold.flushed(107.6)  # the flush starts: the rate is measured afresh, the next flush held anew
    assert hold.until is None and hold.folded == 0
    assert not hold.holds(108.0, 1)  # nothing folded since: no rate, no hold
    hold.took(100)
    assert not hold.holds(108.6, None)  # end unknown: no hold
    assert hold.holds(108.6, 100)  # 100 left at 100/s: 1.0 s <= 1.25 s


def test_the_worker_holds_a_flush_with_up_to_three_quarters_of_an_interval_left_for_one_interval() -> None:
    """The benchmark on a slow machine: 60% of the backlog folded when the 5 s flush is due."""
    hold = flush_hold(load_config(env={}, flush_interval=5.0), now=0.0)
    hold.took(1200)  # 1,200 of 2,000 messages in 5 s
    assert hold.holds(5.0, 800, pending=600_000)  # 800 left: 3.3 s <= 3.75 s (a quarter, 1.25 s, would not hold)
    assert hold.until == 10.0  # at most one interval
    assert not hold.holds(10.0, 1)
    other = flush_hold(load_config(env={}, flush_interval=5.0), now=0.0)
    other.took(1000)
    assert not other.holds(5.0, 800)  # 4 s left: more than three quarters of the interval


def test_a_hold_that_ran_out_is_the_last_until_the_backlog_ends() -> None:
    """Traffic as fast as the fold keeps the end always near and never reached: without the
    limit, every flush would wait its whole bound for nothing."""
    hold = FlushHold(within=3.75, at_most=5.0, now=0.0)
    hold.took(1000)
    assert hold.holds(5.0, 100)
    assert not hold.holds(10.0, 100)  # ran out: the end did not come
    hold.flushed(10.0)
    hold.took(1000)
    assert not hold.holds(15.0, 100) and hold.until is None  # near the end again: not held any more
    hold.ended()  # the backlog was folded to its end
    hold.flushed(15.0)
    hold.took(1000)
    assert hold.holds(20.0, 100)


def test_no_hold_when_the_events_folded_meanwhile_would_reach_the_backpressure_bound() -> None:
    hold = FlushHold(within=3.75, at_most=5.0, now=0.0, max_pending=2_000_000)
    hold.took(1500)  # 750,000 events in 5 s: 1,500,000 by the end of a 5 s hold
    assert hold.holds(5.0, 500, pending=750_000)
    hold = FlushHold(within=3.75, at_most=5.0, now=0.0, max_pending=2_000_000)
    hold.took(2000)
    assert not hold.holds(5.0, 500, pending=1_000_000)  # 2,000,000 by then: backpressure would flush anyway
    assert hold.until is None and not hold.spent
