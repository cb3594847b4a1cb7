"""The worker's micro-batch shaping: chunks for the decode helper, and decoded chunks joined for one fold."""

from __future__ import annotations

import asyncio

import numpy as np
from helpers import make_events

from stream_agg.core.registry import default_registry
from stream_agg.events import encode_event
from stream_agg.kafka.decode_pool import DecodedPart, decode_batch
from stream_agg.kafka.processor import Message
from stream_agg.kafka.worker import Queued, _chunks, join_decoded


def _sizes(chunks: list[list[Message]]) -> list[int]:
    return [sum(len(m.value or b"") for m in c) for c in chunks]


def test_chunks_end_on_the_message_that_reaches_the_limit() -> None:
    """A take ends on the message reaching the byte budget: it stays in the chunk, instead of
    becoming a chunk of its own."""
    msgs = [Message(0, i, b"x" * 100) for i in range(10)] + [Message(0, 10, None)]
    assert _sizes(_chunks(msgs[:10], 1000)) == [1000]
    assert [len(c) for c in _chunks(msgs, 1001)] == [11]
    assert [len(c) for c in _chunks(msgs, 250)] == [3, 3, 3, 2]  # the last one: 100 bytes and a tombstone
    assert [m.offset for c in _chunks(msgs, 250) for m in c] == list(range(11))
    big = [Message(0, 0, b"y" * 5000), Message(0, 1, b"z")]
    assert [len(c) for c in _chunks(big, 1000)] == [1, 1]


def _batch(partitions: list[int], first: int, registry_caps: int = 10) -> tuple[list[Message], list[DecodedPart]]:
    """A chunk of 2 messages (3 events each) per partition, and its decoding."""
    msgs = []
    for p in partitions:
        for k in range(2):
            events = make_events(3, seed=first * 10 + p * 3 + k, hours=2)
            msgs.append(Message(p, first + k, b"[" + b",".join(encode_event(e) for e in events) + b"]"))
    by_p: dict[int, list[tuple[int, bytes | None]]] = {}
    for m in msgs:
        by_p.setdefault(m.partition, []).append((m.offset, m.value))
    return msgs, decode_batch(list(by_p.items()), False, default_registry({"user": registry_caps}))


def _done(value: list[DecodedPart] | None) -> asyncio.Future[list[DecodedPart] | None]:
    fut: asyncio.Future[list[DecodedPart] | None] = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


def test_decoded_chunks_behind_the_first_are_joined_until_one_is_not_decoded() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Queued] = asyncio.Queue()
        c0, d0 = _batch([0, 1], 0)
        c1, d1 = _batch([1, 0], 2)
        c2, d2 = _batch([1], 4)
        c3, _ = _batch([0], 6)
        pending: asyncio.Future[list[DecodedPart] | None] = loop.create_future()
        for item in ((c1, _done(d1)), (c2, _done(d2)), (c3, pending)):
            queue.put_nowait(item)
        msgs, parts, carried = join_decoded(c0, d0, queue, limit=1 << 30)
        assert msgs == c0 + c1 + c2
        assert carried is not None and carried[0] is c3 and carried[1] is pending and queue.empty()
        assert [p.partition for p in parts] == [0, 1]
        for part in parts:  # each partition's events, in message order, as one part
            offsets = [m.offset for m in msgs if m.partition == part.partition]
            assert part.messages == len(offsets)
            assert np.array_equal(np.unique(part.offsets), offsets)
            assert part.cols is not None and part.cols.size == part.offsets.size == 3 * len(offsets)
            assert np.all(np.diff(part.offsets) >= 0)
    asyncio.run(run())


def test_joining_stops_at_the_byte_limit_and_at_a_chunk_to_decode_in_process() -> None:
    async def run() -> None:
        queue: asyncio.Queue[Queued] = asyncio.Queue()
        c0, d0 = _batch([0], 0)
        c1, d1 = _batch([0], 2)
        c2, d2 = _batch([0], 4)
        queue.put_nowait((c1, _done(d1)))
        queue.put_nowait((c2, _done(d2)))
        size = sum(_sizes([c0]))
        msgs, parts, carried = join_decoded(c0, d0, queue, limit=size + 1)  # one more chunk passes the limit
        assert msgs == c0 + c1 and carried is None and queue.qsize() == 1
        assert parts[0].offsets.size == 12
        msgs, parts, carried = join_decoded(c0, d0, queue, limit=size)  # the first alone reaches it
        assert msgs is c0 and parts is d0 and carried is None and queue.qsize() == 1
        queue.get_nowait()
        failed = _batch([0], 6)[0]
        undecoded = _batch([0], 8)[0]
        queue.put_nowait((failed, _done(None)))  # the helper failed: decoded in process, alone
        msgs, parts, carried = join_decoded(c0, d0, queue, limit=1 << 30)
        assert msgs is c0 and carried == (failed, carried[1]) and carried[1] is not None
        queue.put_nowait((undecoded, None))  # no helper at all
        msgs, parts, carried = join_decoded(c0, d0, queue, limit=1 << 30)
        assert msgs is c0 and carried == (undecoded, None)
    asyncio.run(run())
