"""FoldProgress: the agent waits for a micro-batch's fold (lockstep) until the fold loop has
handled every chunk handed so far, joined chunks counted one by one, or until shutdown."""

from __future__ import annotations

import asyncio

from stream_agg.kafka.fold_progress import FoldProgress


async def _settles(task: asyncio.Task[None]) -> bool:
    """Whether the waiter finishes once the loop has run everything ready."""
    for _ in range(5):
        await asyncio.sleep(0)
    return task.done()


def test_a_wait_ends_when_its_chunk_is_folded_not_before() -> None:
    async def run() -> None:
        progress = FoldProgress()
        upto = progress.hand()
        assert upto == 1
        waiter = asyncio.ensure_future(progress.wait(upto))
        assert not await _settles(waiter)
        progress.done(1)
        assert await _settles(waiter)

    asyncio.run(run())


def test_joined_chunks_count_one_by_one() -> None:
    async def run() -> None:
        progress = FoldProgress()
        for _ in range(3):  # three full takes, pipelined: nobody waits for them
            progress.hand()
        upto = progress.hand()  # a fourth, not full: its fold is waited for
        waiter = asyncio.ensure_future(progress.wait(upto))
        progress.done(3)  # the first three, folded as one joined batch
        assert not await _settles(waiter)
        progress.done(1)
        assert await _settles(waiter)
        assert (progress.handed, progress.folded) == (4, 4)

    asyncio.run(run())


def test_close_releases_the_agent_and_later_waits() -> None:
    async def run() -> None:
        progress = FoldProgress()
        waiter = asyncio.ensure_future(progress.wait(progress.hand()))
        assert not await _settles(waiter)
        progress.close()  # the fold loop stopped with the chunk still queued
        assert await _settles(waiter)
        await asyncio.wait_for(progress.wait(progress.hand()), 1.0)  # returns at once
        assert progress.folded == 0

    asyncio.run(run())


TAKES = [True, True, True, False, False, True, False]  # full or not


def test_lockstep_takes_never_overlap_a_fold_and_full_ones_do() -> None:
    """The agent and fold loop of the worker, in miniature: a take that is not full is
    folded before the next take; full takes are taken while earlier ones fold."""

    async def run() -> list[str]:
        progress = FoldProgress()
        queue: asyncio.Queue[int] = asyncio.Queue(maxsize=2)
        log: list[str] = []

        async def agent() -> None:
            for i, full in enumerate(TAKES):
                log.append(f"take {i}")
                await queue.put(i)
                upto = progress.hand()
                if not full:
                    await progress.wait(upto)

        async def fold_loop() -> None:
            try:
                while True:
                    i = await queue.get()
                    await asyncio.sleep(0.01)  # folding, on the fold thread
                    log.append(f"fold {i}")
                    progress.done(1)
            finally:
                progress.close()

        folding = asyncio.ensure_future(fold_loop())
        await asyncio.wait_for(agent(), 5.0)
        await asyncio.wait_for(progress.wait(len(TAKES)), 5.0)
        folding.cancel()
        return log

    log = asyncio.run(run())
    pos = {entry: n for n, entry in enumerate(log)}
    for i, full in enumerate(TAKES[:-1]):
        if not full:
            assert pos[f"fold {i}"] < pos[f"take {i + 1}"], log
    # the full takes 0-2 were all taken before take 0 was folded: pipelined
    assert pos["take 2"] < pos["fold 0"] < pos["fold 1"], log
