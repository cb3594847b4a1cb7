"""How far the fold loop has got with the chunks the agent handed it, so that the agent
can wait for a micro-batch's fold before it takes the next one (lockstep).

Why lockstep for micro-batches that are not full (the take ended at the batch timeout, or
at the end of the partitions, before the batch size or the byte budget): such takes are
small (single-event messages: ~1,000 messages per 0.2 s), and the agent's per-message work
in Faust and the fold thread share one GIL. Run at the same time, both lose more to handing
the GIL back and forth than they gain: on 100,000 single-event messages the fold thread
spent 13.4-14.8 s of wall time folding for 3.3-3.4 s of CPU, against 2.4-2.7 s for 2.0-2.3 s
in lockstep. Side by side the worker then used 22% less CPU and made 15% more events per
second durable (README, "Measured figures").

Full takes stay pipelined: the next micro-batch is taken and decoded in the helper process
while this one folds, numpy works on arrays large enough to release the GIL, and there are
few messages (each a batch of events) for Faust to handle meanwhile.

What the agent waits for is everything the fold thread has queued before the fold's end:
the rest of a flush's merge if one is running (`WorkerShell._snapshot` queues it ahead of
later folds), and the fold loop's own waits after the fold (DLQ sends, a flush that
backpressure or the raw archive calls for).
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

    def hand(self) -> int:
        """The agent queued one more; returns the count to `wait` for to see it folded."""
        self.handed += 1
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
