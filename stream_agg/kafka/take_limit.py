"""When a take (a micro-batch of Faust's `take_events`) ends: at a message count, at a
payload byte budget, or, behind a backlog, as soon as every partition is taken to its end.

Why the last rule: a take that is not full waits for `STREAM_AGG_BATCH_TIMEOUT`, so without
it the last micro-batch of every backlog waited that long before it was folded and flushed
(up to a second with the 1 s timeout that suits single-event messages).

Only behind a backlog: a worker keeping up with live traffic is at the end of the
partitions after each fetch, and ending takes there would fold every few messages instead
of every timeout. Behind a backlog means: the worker has just started or been assigned
partitions, or a take came full with at least another take's worth of messages left in
Kafka; it lasts until a take ends at the end of the partitions, or one is not full. A full
take with less than that left is live traffic faster than a take per timeout: the next
take fills up as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeAlias

log = logging.getLogger(__name__)

# (partition, offset) of the message a Faust processor is looking at, or None.
Position: TypeAlias = Callable[[], "tuple[int, int] | None"]
# Each owned partition's next offset to fold, and Kafka's high watermark by partition
# (the offset after the last message of its last fetch; None while not known).
Positions: TypeAlias = Callable[[], "tuple[dict[int, int], Callable[[int], int | None]]"]


class TakeLimit:
    """`max_` for Faust's `take_events`: ends a take at `messages` messages, `max_bytes` bytes
    or, while `draining` (behind a backlog), when every owned partition has been taken to
    its high watermark.

    Why bytes: Faust counts messages, and one message may hold one event or a thousand: a
    take of `batch_size` 250 KB messages held 125 MB.

    Faust tests `len(buffer) >= max_`; an int compared with this object falls back to
    `__le__`. `count` must be added as a stream processor before the take, so that it sees
    each message before take_events' own processor buffers it and asks `__le__`. The agent
    calls `next_take` with each take's size before it awaits anything. Without `position`
    and `positions` only the first two rules apply.
    """

    def __init__(self, messages: int, max_bytes: int, position: Position | None = None,
                 positions: Positions | None = None) -> None:
        self.messages = messages
        self.max_bytes = max_bytes
        self.position = position
        self.positions = positions
        self.bytes = 0
        self.draining = True  # a (re)started worker may be behind: a small backlog ends at once too
        self.at_end = False  # every owned partition taken to its end, as of the last message counted
        self.taken_to: dict[int, int] = {}  # partition -> offset after the last message taken
        self._high: dict[int, int] = {}  # partition -> high watermark as last read (it only grows)
        self._failed = False  # a watermark read raised (logged once)

    def count(self, value: Any) -> Any:
        """The stream processor: adds the message's payload bytes and, while draining,
        checks whether the take has reached the end of every partition."""
        self.bytes += len(value) if isinstance(value, (bytes, bytearray)) else 0
        pos = self.position() if self.position is not None else None
        if pos is not None:
            partition, offset = pos
            self.taken_to[partition] = offset + 1
            if self.draining:
                self.at_end = self._at_end(partition, offset + 1)
        return value

    def _at_end(self, partition: int, after: int) -> bool:
        """Whether every owned partition is taken to its end. The watermarks are read only
        when this partition passes the one last read for it, so behind a backlog they are
        read about once per partition, not per message."""
        high = self._high.get(partition)
        if high is not None and after < high:
            return False
        gaps = self._gaps(also=partition)
        return bool(gaps) and all(gap == 0 for gap in gaps.values())

    def _behind(self, taken: int) -> bool:
        """At least another `taken` messages wait in Kafka past what was taken or folded."""
        gaps = self._gaps()
        return gaps is not None and sum(gap or 0 for gap in gaps.values()) >= taken

    def _gaps(self, also: int | None = None) -> dict[int, int | None] | None:
        """Messages Kafka holds past what was taken or folded, per owned partition (None:
        its watermark is not known yet), reading and keeping the watermarks (of `also` too,
        a partition whose messages are taken though it may not be owned any more)."""
        read = self._read()
        if read is None:
            return None
        folded, highwater = read
        gaps: dict[int, int | None] = {}
        for p in {*folded, *(() if also is None else (also,))}:
            mark = highwater(p)
            if mark is not None:
                self._high[p] = mark
            if p in folded:
                gaps[p] = None if mark is None else max(0, mark - max(folded[p], self.taken_to.get(p, 0)))
        return gaps

    def _read(self) -> tuple[dict[int, int], Callable[[int], int | None]] | None:
        if self.positions is None:
            return None
        try:
            return self.positions()
        except Exception:  # noqa: BLE001 - not known yet (no fetch, mid-rebalance): not at the end
            if not self._failed:
                self._failed = True
                log.debug("high watermarks not readable yet; takes end at their size or timeout", exc_info=True)
            return None

    def full(self, taken: int) -> bool:
        """The take ended at its message count or byte budget."""
        return taken >= self.messages or self.bytes >= self.max_bytes

    def reached(self, taken: int) -> bool:
        """Whether a take of `taken` messages is complete (Faust asks after each message)."""
        return self.full(taken) or (self.draining and self.at_end)

    def next_take(self, taken: int) -> bool:
        """A take of `taken` messages was handed over: count afresh, and decide whether the
        next one drains a backlog. Returns whether this one was full."""
        full = self.full(taken)
        if not full or (self.draining and self.at_end):
            self.draining = False  # at the end of the partitions, or traffic slower than a take per timeout
        elif not self.draining:
            self.draining = self._behind(taken)
        self.bytes = 0
        self.at_end = False
        return full

    def reassigned(self) -> None:
        """Partitions moved (a rebalance): positions start again from what PostgreSQL holds,
        and the worker may be behind on the partitions it was given."""
        self.taken_to.clear()
        self._high.clear()
        self.draining = True
        self.at_end = False

    def __le__(self, taken: int) -> bool:
        return self.reached(taken)

    def __repr__(self) -> str:
        return (f"TakeLimit({self.messages} messages or {self.max_bytes} bytes, or at the end of every "
                f"partition behind a backlog)")
