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
    limit.next_take(full=True)
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

    def take(self, limit: TakeLimit, messages: list[tuple[int, int]]) -> int:
        """Offer messages one by one as Faust does; returns how many the take holds when it ends."""
        taken = 0
        for partition, offset in messages:
            self.current = (partition, offset)
            limit.count(b"v")
            taken += 1
            if taken >= limit:  # type: ignore[operator]
                break
        return taken


def test_behind_a_backlog_the_take_ends_when_every_partition_is_taken_to_its_end() -> None:
    feed = Feed(high={0: 10, 1: 4}, folded={0: 0, 1: 0})
    limit = TakeLimit(1000, 1 << 30, feed.position, feed.positions)
    # partition 1 reaches its end first, partition 0 is still behind: the take goes on
    backlog = [(1, 0), (1, 1), (1, 2), (1, 3), *((0, o) for o in range(10)), (1, 4)]
    assert feed.take(limit, backlog) == 14  # ends on partition 0's last message, offset 9
    assert limit.caught_up and not limit.full(14)
    assert limit.taken_to == {0: 10, 1: 4}
    assert feed.reads == 3  # the first message of each partition, then partition 0's last


def test_the_watermarks_are_read_when_a_partition_passes_its_known_one_not_per_message() -> None:
    feed = Feed(high={0: 500}, folded={0: 0})
    limit = TakeLimit(10_000, 1 << 30, feed.position, feed.positions)
    assert feed.take(limit, [(0, o) for o in range(500)]) == 500
    assert feed.reads == 2  # the first message (nothing known yet) and the last one


def test_a_watermark_that_moved_on_keeps_the_take_open() -> None:
    feed = Feed(high={0: 5}, folded={0: 0})
    limit = TakeLimit(1000, 1 << 30, feed.position, feed.positions)
    assert feed.take(limit, [(0, 0)]) == 1  # the watermark read: 5
    limit.next_take(full=True)
    feed.high[0] = 8  # Kafka got 3 more messages meanwhile
    assert feed.take(limit, [(0, o) for o in range(1, 5)]) == 4  # offset 4 reaches 5: read again
    assert not limit.caught_up  # the watermark is 8 now
    assert feed.take(limit, [(0, o) for o in range(5, 8)]) == 3
    assert limit.caught_up


def test_partitions_already_folded_to_the_end_or_unknown() -> None:
    # partition 2 has no message in this take: what was folded of it counts
    feed = Feed(high={0: 3, 2: 7}, folded={0: 0, 2: 7})
    limit = TakeLimit(1000, 1 << 30, feed.position, feed.positions)
    assert feed.take(limit, [(0, 0), (0, 1), (0, 2), (0, 3)]) == 3
    # a partition whose watermark is not known yet (no fetch): never at its end
    feed = Feed(high={0: 3, 1: None}, folded={0: 0, 1: 0})
    limit = TakeLimit(1000, 1 << 30, feed.position, feed.positions)
    assert feed.take(limit, [(0, 0), (0, 1), (0, 2)]) == 3 and not limit.caught_up
    # nothing owned (before the first assignment): never at the end
    feed = Feed(high={0: 1}, folded={})
    limit = TakeLimit(1000, 1 << 30, feed.position, feed.positions)
    assert feed.take(limit, [(0, 0)]) == 1 and not limit.caught_up


def test_keeping_up_with_live_traffic_takes_wait_for_the_timeout() -> None:
    """After a take that was not full, being at the end of every partition does not end a take:
    live traffic is at the end after each fetch, and a take per fetch would fold a few events."""
    feed = Feed(high={0: 3}, folded={0: 0})
    limit = TakeLimit(1000, 1 << 30, feed.position, feed.positions)
    assert feed.take(limit, [(0, 0), (0, 1), (0, 2)]) == 3  # the start: maybe behind, so it ends
    limit.next_take(full=False)
    feed.high[0] = 6
    assert feed.take(limit, [(0, 3), (0, 4), (0, 5)]) == 3 and not 3 >= limit  # type: ignore[operator]
    reads = feed.reads
    feed.high[0] = 7
    feed.take(limit, [(0, 6)])
    assert feed.reads == reads  # nothing read while not behind


def test_a_failing_watermark_read_never_ends_the_take_nor_raises() -> None:
    def broken() -> tuple[dict[int, int], Callable[[int], int | None]]:
        raise RuntimeError("consumer not started")

    feed = Feed(high={0: 1}, folded={0: 0})
    limit = TakeLimit(1000, 1 << 30, feed.position, broken)
    assert feed.take(limit, [(0, 0)]) == 1 and not limit.caught_up
