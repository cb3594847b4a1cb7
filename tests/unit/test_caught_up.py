"""The worker flushes the end of a backlog as soon as it has folded all of it, once."""

from __future__ import annotations

from stream_agg.config import load_config
from stream_agg.kafka.worker import IDLE_AFTER, BacklogEnd, caught_up, idle_after


def test_caught_up_only_when_every_partition_reached_its_high_watermark() -> None:
    high = {0: 120, 1: 40}
    assert caught_up({0: 120, 1: 40}, high.get)
    assert caught_up({0: 121, 1: 40}, high.get)  # a watermark older than what was folded
    assert not caught_up({0: 119, 1: 40}, high.get)  # one message of partition 0 not folded yet
    assert not caught_up({0: 120, 1: 39}, high.get)
    assert not caught_up({0: 120, 1: 40, 2: 0}, high.get)  # partition 2: no watermark known yet
    assert not caught_up({}, high.get)  # nothing assigned: nothing to say


def test_the_end_of_a_backlog_is_signalled_once_and_live_traffic_never() -> None:
    end = BacklogEnd()
    high = {0: 10}
    for offset in range(1, 11):  # live traffic: small takes, caught up after each
        end.took(full=False)
        assert not end.ended({0: offset}, high.get)
    end.took(full=True)  # a backlog: full takes
    assert not end.ended({0: 5}, high.get)  # still behind
    end.took(full=True)
    assert end.ended({0: 10}, high.get)  # folded to the end: flush now
    assert end.ended({0: 10}, high.get)  # still due: the previous flush may still be writing
    end.flushing()  # the flush that covers it has started
    assert not end.ended({0: 10}, high.get)  # once
    end.took(full=False)
    assert not end.ended({0: 10}, high.get)
    end.took(full=True)
    assert end.ended({0: 11}, high.get)  # a second backlog
    end.flushing()
    assert not end.ended({0: 11}, high.get)


def test_idle_means_no_batch_for_two_batch_windows_or_a_second() -> None:
    """A take on a quiet topic comes every batch timeout: the wait between two takes is not idle."""
    assert idle_after(load_config(env={})) == IDLE_AFTER == 1.0  # default 0.2 s windows
    assert idle_after(load_config(env={"STREAM_AGG_BATCH_TIMEOUT": "1s"})) == 2.0
    assert idle_after(load_config(env={"STREAM_AGG_BATCH_TIMEOUT": "750ms"})) == 1.5
