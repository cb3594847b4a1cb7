"""When a take (a micro-batch of Faust's `take_events`) ends: at a message count, at a
payload byte budget, or, behind a backlog, as soon as every partition is taken to its end.

Why the last rule: a take that is not full waits for `STREAM_AGG_BATCH_TIMEOUT`. Without
it, the last micro-batch of every backlog waited that long before it was folded and flushed,
which is what kept the timeout short (0.2 s) and so the takes of single-event messages
small: ~1,500 messages, each fold paying its fixed cost per dimension, metric and
granularity for a few hundred events per partition. Ending the take when the backlog is
taken lets the timeout be long (1 s: takes of up to `STREAM_AGG_BATCH_SIZE` messages)
without delaying a backlog's end.

Only behind a backlog (the previous take was full, or the worker has just started): a
worker keeping up with live traffic is at the end of the partition after each fetch, and
ending takes there would fold every few messages instead of every timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# (partition, offset) of the message a Faust processor is looking at, or None.
Position = Callable[[], "tuple[int, int] | None"]
# Each owned partition's next offset to fold, and Kafka's high watermark by partition
# (the offset after the last message of its last fetch; None while not known).
Positions = Callable[[], "tuple[dict[int, int], Callable[[int], int | None]]"]


class TakeLimit:
    """`max_` for Faust's `take_events`: ends a take at `messages` messages, `max_bytes` bytes
    or, while `draining`, when every owned partition has been taken to its high watermark.

    Faust tests `len(buffer) >= max_`; an int compared with this object falls back to
    `__le__`. `count` must be added as a stream processor before the take, so that it sees
    each message first. Without `position` and `positions` only the first two rules apply.
    """

    def __init__(self, messages: int, max_bytes: int, position: Position | None = None,
                 positions: Positions | None = None) -> None:
        self.messages = messages
        self.max_bytes = max_bytes
        self.position = position
        self.positions = positions
        self.bytes = 0
        self.draining = True  # a (re)started worker may be behind: a small backlog ends at once too
        self.caught_up = False  # as seen at the last message counted while draining
        self.taken_to: dict[int, int] = {}  # partition -> offset after the last message taken
        self._high: dict[int, int] = {}  # partition -> high watermark as last read (it only grows)

    def count(self, value: Any) -> Any:
        self.bytes += len(value) if isinstance(value, (bytes, bytearray)) else 0
        pos = self.position() if self.position is not None else None
        if pos is not None:
            partition, offset = pos
            self.taken_to[partition] = offset + 1
            if self.draining:
                self.caught_up = self._at_end(partition, offset + 1)
        return value

    def _at_end(self, partition: int, after: int) -> bool:
        """Whether every owned partition is taken to its end. The watermarks are read only
        when this partition passes the one last read for it, so behind a backlog they are
        read about once per partition, not per message."""
        high = self._high.get(partition)
        if (high is not None and after < high) or self.positions is None:
            return False
        try:
            folded, highwater = self.positions()
            at_end = bool(folded)
            for p in {partition, *folded}:
                mark = highwater(p)
                if mark is None:
                    at_end = False
                    continue
                self._high[p] = mark
                if p in folded and max(folded[p], self.taken_to.get(p, 0)) < mark:
                    at_end = False
        except Exception:  # noqa: BLE001 - not known yet (no fetch, mid-rebalance): not at the end
            return False
        return at_end

    def full(self, taken: int) -> bool:
        """The take ended at its message count or byte budget (a backlog is waiting)."""
        return taken >= self.messages or self.bytes >= self.max_bytes

    def reached(self, taken: int) -> bool:
        return self.full(taken) or (self.draining and self.caught_up)

    def next_take(self, full: bool) -> None:
        """A take was handed over: count bytes afresh, and drain the next one if this was full."""
        self.bytes = 0
        self.draining = full

    def __le__(self, taken: int) -> bool:
        return self.reached(taken)

    def __repr__(self) -> str:
        return f"TakeLimit({self.messages} messages or {self.max_bytes} bytes)"
