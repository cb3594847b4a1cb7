"""How far the fold loop has got with the chunks the agent handed it, so that the agent
can wait for a micro-batch's fold before it takes the next one (lockstep).

Why lockstep for micro-batches that are not full (the take ended at the batch timeout, or
at the end of the partitions): there the worker is not behind a backlog of full takes, and
the agent's per-message work in Faust and the fold thread's folding share one GIL. Run at
the same time, both lose far more to handing the GIL back and forth than they gain:
measured on 100,000 single-event messages (`bench/stream_e2e.py --scenarios 3`, 2 CPUs),
the fold thread spent 13.4-14.8 s of wall time folding for 3.3-3.4 s of CPU, and the
worker process used 20-23.5 s of CPU in all. Folding each such micro-batch before taking the
next, the folds took 2.4-2.7 s of wall time for 2.0-2.3 s of CPU, the worker 16-18 s of
CPU, and 14-15% more events per second (two pairs side by side).

Full takes (a backlog) stay pipelined: the next micro-batch is taken and decoded in the
helper process while this one folds, numpy works on arrays large enough to release the
GIL, and there is no per-message Faust work to contend with.
"""

from __future__ import annotations

import asyncio


class FoldProgress:
    """Chunks handed to the fold loop, and chunks it has folded (or dropped at shutdown)."""

    def __init__(self) -> None:
        self.handed = 0
        self.folded = 0
        self.closed = False
        self._moved = asyncio.Event()

    def hand(self, chunks: int = 1) -> int:
        """The agent queued `chunks` more; returns the count to `wait` for to see them folded."""
        self.handed += chunks
        return self.handed

    def done(self, chunks: int) -> None:
        """The fold loop has handled `chunks` more (a joined batch is several)."""
        self.folded += chunks
        self._moved.set()

    def close(self) -> None:
        """Shutting down: nothing waits any more (queued chunks are not folded, nor acked)."""
        self.closed = True
        self._moved.set()

    async def wait(self, upto: int) -> None:
        """Until the first `upto` chunks handed are folded, or `close`."""
        while self.folded < upto and not self.closed:
            self._moved.clear()
            await self._moved.wait()
