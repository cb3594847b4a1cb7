"""TakeLimit: Faust's `len(buffer) >= max_` ends a take at a message count, a byte budget or,
behind a backlog, once every owned partition is taken to its high watermark."""

from __future__ import annotations

from collections.abc import Callable

from stream_agg.kafka.take_limit import TakeLimit


def test_take_ends_at_message_count_or_byte_budget() -> None:
    limit = TakeLimit(messages=5, max_bytes=1000)
    taken = 0
    for value in (b"x" * 300, b"y" * 300, b"z" * 300):
        assert limit.count(value) is value
        taken += 1
        assert not taken >= limit  # type: ignore[operator]
    limit.count(b"w" * 200)
    taken += 1
    assert taken >= limit  # type: ignore[operator]  # 1,100 bytes >= 1,000
    assert limit.full(taken)
    assert limit.next_take(taken)  # full; no positions known: not draining
    assert not 4 >= limit  # type: ignore[operator]
    assert 5 >= limit  # type: ignore[operator]  # the message count alone
    limit.count(None)  # a tombstone has no payload
    assert limit.bytes == 0


class Feed:
    """Messages as Faust shows them to the processor, and what the worker knows: each owned
    partition's next offset to fold, and Kafka's high watermarks (counting reads)."""

    def __init__(self, high: dict[int, int | None], folded: dict[int, int]) -> None:
        self.high = high
        self.folded = folded
        self.current: tuple[int, int] | None = None
        self.reads = 0

    def position(self) -> tuple[int, int] | None:
        return self.current

    def positions(self) -> tuple[dict[int, int], Callable[[int], int | None]]:
        self.reads += 1
        return dict(self.folded), self.high.get

    def take(self, limit: TakeLimit, messages: list[tuple[int, int]]) -> tuple[int, bool]:
        """Offer messages one by one as Faust does: (messages the take holds, whether it
        ended; False: it would wait for more, or for the timeout)."""
        taken = 0
        for partition, offset in messages:
            self.current = (partition, offset)
            limit.count(b"v")
            taken += 1
            if taken >= limit:  # type: ignore[operator]
                return taken, True
        return taken, False


def limit_for(feed: Feed, messages: int = 1000) -> TakeLimit:
    return TakeLimit(messages, 1 << 30, feed.position, feed.positions)


def test_behind_a_backlog_the_take_ends_when_every_partition_is_taken_to_its_end() -> None:
    feed = Feed(high={0: 10, 1: 4}, folded={0: 0, 1: 0})
    limit = limit_for(feed)
    # partition 1 reaches its end first, partition 0 is still behind: the take goes on
    backlog = [(1, 0), (1, 1), (1, 2), (1, 3), *((0, o) for o in range(10)), (1, 4)]
    assert feed.take(limit, backlog) == (14, True)  # ends on partition 0's last message, offset 9
    assert limit.at_end and not limit.full(14)
    assert limit.taken_to == {0: 10, 1: 4}
    assert feed.reads == 3  # the first message of each partition, then partition 0's last
    assert not limit.next_take(14)  # not full: the next take is live traffic
    assert not limit.draining and not limit.at_end


def test_the_watermarks_are_read_when_a_partition_passes_its_known_one_not_per_message() -> None:
    feed = Feed(high={0: 500}, folded={0: 0})
    limit = limit_for(feed, messages=10_000)
    assert feed.take(limit, [(0, o) for o in range(500)]) == (500, True)
    assert feed.reads == 2  # the first message (nothing known yet) and the last one


def test_a_watermark_that_moved_on_keeps_the_take_open() -> None:
    feed = Feed(high={0: 5}, folded={0: 0})
    limit = limit_for(feed)
    assert feed.take(limit, [(0, o) for o in range(3)]) == (3, False)  # the watermark read: 5
    feed.high[0] = 20  # Kafka got more messages meanwhile
    assert feed.take(limit, [(0, 3), (0, 4)]) == (2, False)  # offset 4 reaches 5: read again, 20
    feed.high[0] = 22
    assert feed.take(limit, [(0, o) for o in range(5, 20)]) == (15, False)  # 20 reached: read, 22
    assert feed.take(limit, [(0, 20), (0, 21)]) == (2, True)


def test_full_takes_keep_draining_while_a_take_is_left_and_stop_at_the_end() -> None:
    feed = Feed(high={0: 25}, folded={0: 0})
    limit = limit_for(feed, messages=10)
    assert feed.take(limit, [(0, o) for o in range(10)]) == (10, True)
    assert limit.next_take(10) and limit.draining  # full, latched while draining
    assert feed.take(limit, [(0, o) for o in range(10, 20)]) == (10, True)
    assert limit.next_take(10) and limit.draining
    assert feed.take(limit, [(0, o) for o in range(20, 25)]) == (5, True)  # the tail, at once
    assert not limit.next_take(5) and not limit.draining
    # full and at the end at once: no backlog left either
    feed.high[0] = 35
    limit.reassigned()
    assert feed.take(limit, [(0, o) for o in range(25, 35)]) == (10, True)
    assert limit.next_take(10) and not limit.draining


def test_live_traffic_faster_than_a_take_per_timeout_is_not_a_backlog() -> None:
    """A full take with less than a take's worth left in Kafka: the next take fills up as
    usual, rather than end at the end of the last fetch with a few messages."""
    feed = Feed(high={0: 10}, folded={0: 0})
    limit = limit_for(feed, messages=10)
    limit.draining = False  # keeping up
    assert feed.take(limit, [(0, o) for o in range(10)]) == (10, True)
    feed.high[0] = 14  # 4 more fetched meanwhile: less than a take
    assert limit.next_take(10) and not limit.draining
    assert feed.take(limit, [(0, o) for o in range(10, 20)]) == (10, True)  # past 14: it fills up
    feed.high[0] = 40
    assert limit.next_take(10) and limit.draining  # 20 left: a backlog


def test_partitions_already_folded_to_the_end_unknown_or_not_owned() -> None:
    # partition 2 has no message in this take: what was folded of it counts
    feed = Feed(high={0: 3, 2: 7}, folded={0: 0, 2: 7})
    assert feed.take(limit_for(feed), [(0, 0), (0, 1), (0, 2), (0, 3)]) == (3, True)
    # a partition whose watermark is not known yet (no fetch): never at its end
    feed = Feed(high={0: 3, 1: None}, folded={0: 0, 1: 0})
    assert feed.take(limit_for(feed), [(0, 0), (0, 1), (0, 2)]) == (3, False)
    # nothing owned (before the first assignment): never at the end
    feed = Feed(high={0: 1}, folded={})
    assert feed.take(limit_for(feed), [(0, 0)]) == (1, False)
    # a message of a partition not owned any more (revoked meanwhile) says nothing about the others
    feed = Feed(high={0: 3, 5: 2}, folded={0: 0})
    limit = limit_for(feed)
    assert feed.take(limit, [(5, 0), (5, 1), (0, 0), (0, 1), (0, 2)]) == (5, True)
    assert limit._high[5] == 2  # its watermark is kept: its messages do not read it again


def test_a_rebalance_forgets_what_was_taken() -> None:
    """Partitions re-read from PostgreSQL's offsets after a rebalance: what was taken of them
    before must not make them look taken to their end."""
    feed = Feed(high={0: 10, 1: 10}, folded={0: 0, 1: 0})
    limit = limit_for(feed)
    feed.take(limit, [(p, o) for o in range(10) for p in (0, 1)])
    limit.next_take(20)
    limit.reassigned()  # partition 1 re-read from offset 4 (what PostgreSQL holds)
    feed.folded = {0: 10, 1: 4}
    feed.high[0] = 12
    assert limit.draining and limit.taken_to == {}
    assert feed.take(limit, [(0, 10), (0, 11)]) == (2, False)  # partition 1 is behind again
    assert feed.take(limit, [(1, o) for o in range(4, 10)]) == (6, True)


def test_keeping_up_with_live_traffic_takes_wait_for_the_timeout() -> None:
    """After a take that was not full, being at the end of every partition does not end a take:
    live traffic is at the end after each fetch, and a take per fetch would fold a few events."""
    feed = Feed(high={0: 3}, folded={0: 0})
    limit = limit_for(feed)
    assert feed.take(limit, [(0, 0), (0, 1), (0, 2)]) == (3, True)  # the start: maybe behind, so it ends
    limit.next_take(3)
    feed.high[0] = 6
    assert feed.take(limit, [(0, 3), (0, 4), (0, 5)]) == (3, False)
    reads = feed.reads
    feed.high[0] = 7
    feed.take(limit, [(0, 6)])
    assert feed.reads == reads  # nothing read while not behind


def test_a_failing_watermark_read_never_ends_the_take_nor_raises() -> None:
    def broken() -> tuple[dict[int, int], Callable[[int], int | None]]:
        raise RuntimeError("consumer not started")

    feed = Feed(high={0: 1}, folded={0: 0})
    limit = TakeLimit(1000, 1 << 30, feed.position, broken)
    assert feed.take(limit, [(0, 0)]) == (1, False)
    assert limit.next_take(1) is False and not limit.draining
