"""The worker's micro-batch shaping: chunks for the decode helper, and decoded chunks joined for one fold."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from helpers import assert_same_part, make_events

from stream_agg.config import load_config
from stream_agg.core.registry import default_registry
from stream_agg.events import encode_event
from stream_agg.kafka.decode_pool import DecodedPart, decode_batch
from stream_agg.kafka.fold_progress import FoldProgress
from stream_agg.kafka.processor import Message
from stream_agg.kafka.worker import (
    FOLD_BYTES,
    FOLD_JOIN_BYTES,
    ChunkQueue,
    WorkerShell,
    _chunks,
    _offset_ranges,
    join_budget,
    join_decoded,
)


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


def _decode(msgs: list[Message]) -> list[DecodedPart]:
    """What the helper sends back for these messages as one chunk."""
    by_p: dict[int, list[tuple[int, bytes | None]]] = {}
    for m in msgs:
        by_p.setdefault(m.partition, []).append((m.offset, m.value))
    return decode_batch(list(by_p.items()), False, default_registry({"user": 10}))


def _batch(partitions: list[int], first: int) -> tuple[list[Message], list[DecodedPart]]:
    """A chunk of 2 messages (3 events each) per partition, and its decoding."""
    msgs = []
    for p in partitions:
        for k in range(2):
            events = make_events(3, seed=first * 10 + p * 3 + k, hours=2)
            msgs.append(Message(p, first + k, b"[" + b",".join(encode_event(e) for e in events) + b"]"))
    return msgs, _decode(msgs)


def _done(value: list[DecodedPart] | None) -> asyncio.Future[list[DecodedPart] | None]:
    fut: asyncio.Future[list[DecodedPart] | None] = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


def test_decoded_chunks_behind_the_first_are_joined_until_one_is_not_decoded() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        queue = ChunkQueue()
        c0, d0 = _batch([0, 1], 0)
        c1, d1 = _batch([1, 0], 2)
        c2, d2 = _batch([1], 4)
        c3, _ = _batch([0], 6)
        c4, d4 = _batch([0], 8)
        pending: asyncio.Future[list[DecodedPart] | None] = loop.create_future()
        for item in ((c1, _done(d1)), (c2, _done(d2)), (c3, pending), (c4, _done(d4))):
            queue.put_nowait(item)
        msgs, parts = join_decoded(c0, d0, queue, limit=1 << 30)
        assert msgs == c0 + c1 + c2
        # the chunk still decoding keeps its place, and the decoded one behind it waits with it
        assert queue.qsize() == 2 and queue.get_nowait()[0] is c3 and queue.get_nowait()[0] is c4
        # one part per partition, first seen first: what decoding the three chunks at once gives
        whole = _decode(msgs)
        assert [p.partition for p in parts] == [p.partition for p in whole] == [0, 1]
        for got, want in zip(parts, whole, strict=True):
            assert got.cols is not None
            assert_same_part(got, want)
    asyncio.run(run())


def test_joining_stops_at_the_byte_limit_and_at_a_chunk_to_decode_in_process() -> None:
    async def run() -> None:
        queue = ChunkQueue()
        c0, d0 = _batch([0], 0)
        c1, d1 = _batch([0], 2)
        c2, d2 = _batch([0], 4)
        queue.put_nowait((c1, _done(d1)))
        queue.put_nowait((c2, _done(d2)))
        size = sum(_sizes([c0]))
        msgs, parts = join_decoded(c0, d0, queue, limit=size + 1)  # under the limit: one more, then over it
        assert msgs == c0 + c1 and queue.qsize() == 1
        assert parts[0].offsets.size == 12
        msgs, parts = join_decoded(c0, d0, queue, limit=size)  # the first alone reaches it
        assert msgs is c0 and parts is d0 and queue.qsize() == 1
        failed = queue.get_nowait()
        queue.put_nowait((failed[0], _done(None)))  # the helper failed: decoded in process, alone
        msgs, parts = join_decoded(c0, d0, queue, limit=1 << 30)
        assert msgs is c0 and queue.qsize() == 1
        queue.get_nowait()
        queue.put_nowait((c2, None))  # no helper at all
        msgs, parts = join_decoded(c0, d0, queue, limit=1 << 30)
        assert msgs is c0 and queue.qsize() == 1
    asyncio.run(run())


def test_chunks_are_joined_only_with_a_helper_and_the_archive_off() -> None:
    def budget(archive: str, helpers: str) -> int:
        return join_budget(load_config({"STREAM_AGG_ARCHIVE": archive, "STREAM_AGG_DECODE_PROCESSES": helpers}))

    assert budget("false", "1") == FOLD_JOIN_BYTES > FOLD_BYTES
    assert budget("true", "1") == 0
    assert budget("false", "0") == 0


def test_a_batch_is_logged_by_partition_and_offset_range() -> None:
    msgs = [Message(3, 10, b""), Message(1, 7, b""), Message(3, 12, b""), Message(1, 9, b"")]
    assert _offset_ranges(msgs) == "partition=1 offsets 7..9, partition=3 offsets 10..12"


def test_the_fold_loop_counts_joined_chunks_so_that_a_lockstep_wait_ends() -> None:
    """`WorkerShell._fold_loop` itself, on a stand-in worker: three decoded chunks folded as one
    joined batch count as three, so the agent waiting for the next chunk is released by its fold."""

    async def run() -> list[int]:
        progress = FoldProgress()
        queue = ChunkQueue()
        handled: list[int] = []

        class Decoder:
            async def result(self, fut: asyncio.Future[list[DecodedPart] | None]) -> list[DecodedPart] | None:
                return await fut

        async def handle(msgs: list[Message], decoded: list[DecodedPart] | None) -> None:
            handled.append(len(msgs))
            if len(handled) == 2:
                shell.stopping = True

        shell = SimpleNamespace(stopping=False, batches=queue, decoder=Decoder(), join_bytes=1 << 30,
                                progress=progress, _handle=handle)
        chunks = [_batch([0, 1], 2 * i) for i in range(4)]
        for msgs, decoded in chunks[:3]:  # three full takes, queued before the fold loop runs
            queue.put_nowait((msgs, _done(decoded)))
            progress.hand()
        folding = asyncio.ensure_future(WorkerShell._fold_loop(shell))  # type: ignore[arg-type]
        await asyncio.wait_for(progress.wait(3), 5.0)
        assert progress.folded == 3 and not progress.closed  # released by the count, not by a shutdown
        msgs, decoded = chunks[3]  # a take that is not full: the agent waits for its fold
        await queue.put((msgs, _done(decoded)))
        await asyncio.wait_for(progress.wait(progress.hand()), 5.0)
        assert progress.folded == progress.handed == 4
        await asyncio.wait_for(folding, 5.0)  # stopping: the loop ends and releases any waiter
        assert progress.closed
        return handled

    assert asyncio.run(run()) == [12, 4]  # one fold of the three joined chunks, then the fourth
