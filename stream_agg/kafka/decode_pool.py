"""Decoding micro-batches in a helper process, one batch ahead of the fold.

Why a process: JSON decoding and the event -> column pass are a third of the worker's
Python work per event (measured: 2.2 + 1.7 us of ~11 us), and they hold the GIL, so a
thread cannot overlap them with folding. The worker used ~0.7 of the machine's cores
while its fold thread waited for the GIL or for input. A process decodes batch N+1 while
the worker folds batch N, and sends back only numpy columns, the distinct dimension values,
rejects and (archive on) the COPY text: small next to the events themselves.

What stays in the worker: the watermark classification (it depends on what was folded
before), so a batch holding a too-late event takes the in-process path for its DLQ records.
If the helper process fails, the worker logs it once and decodes in process from then on:
nothing is lost, the batch is simply decoded again.

`decode_partition` is the pure function both paths run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import multiprocessing
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stream_agg.core.column_concat import concat_columns
from stream_agg.core.fold import Columns, event_times, to_columns
from stream_agg.core.registry import Registry, default_registry
from stream_agg.core.state_table import F64, I64
from stream_agg.events import decode_message
from stream_agg.kafka.gc_tuning import tune_gc
from stream_agg.store import archive_copy

log = logging.getLogger(__name__)

# A micro-batch decodes in well under a second; a helper that takes this long is stuck
# (stopped, swapping): the worker stops using it rather than stall consumption silently.
DECODE_TIMEOUT = 60.0


@dataclass
class DecodedPart:
    """One partition's messages of a micro-batch, decoded (in message order)."""

    partition: int
    messages: int
    rejects: list[tuple[bytes, str, int, int | None]]  # (raw, reason, message offset, index in batch)
    offsets: I64  # source offset of each valid event
    ts: F64  # event time of each valid event (epoch seconds)
    cols: Columns | None  # None when no valid event
    archive: tuple[str, str] | None  # (traces, spans) COPY text, when the archive is on


def decode_partition(partition: int, messages: Sequence[tuple[int, bytes | None]], registry: Registry,
                     archive: bool) -> DecodedPart:
    """Decode one partition's (offset, value) messages into columns (and archive text)."""
    events = []
    offsets: list[int] = []
    rejects: list[tuple[bytes, str, int, int | None]] = []
    for offset, value in messages:
        decoded = decode_message(value)
        rejects.extend((r.raw, r.reason, offset, r.index) for r in decoded.rejects)
        events.extend(decoded.events)
        offsets.extend([offset] * len(decoded.events))
    offs = np.asarray(offsets, dtype=np.int64)
    if not events:
        return DecodedPart(partition, len(messages), rejects, offs, np.empty(0), None, None)
    ts = event_times(events)
    cols = to_columns(events, offs, registry, ts=ts)
    text = None
    if archive:
        traces, spans, _ = archive_copy.render(events, offsets, partition)
        text = (traces, spans)
    return DecodedPart(partition, len(messages), rejects, offs, ts, cols, text)


def merge_parts(parts: Sequence[DecodedPart]) -> DecodedPart:
    """One partition's parts from consecutive chunks, in order, as if decoded in one piece
    (the worker folds the chunks already decoded as one batch: `column_concat`)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if any(p.partition != first.partition for p in parts):
        raise ValueError("parts of different partitions")
    cols = [p.cols for p in parts if p.cols is not None]
    texts = [p.archive for p in parts if p.archive is not None]
    return DecodedPart(
        first.partition,
        sum(p.messages for p in parts),
        [r for p in parts for r in p.rejects],
        np.concatenate([p.offsets for p in parts]),
        np.concatenate([p.ts for p in parts]),
        concat_columns(cols) if cols else None,
        ("".join(t[0] for t in texts), "".join(t[1] for t in texts)) if texts else None,
    )


def merge_batches(batches: Sequence[list[DecodedPart]]) -> list[DecodedPart]:
    """Decoded chunks, in order, as one micro-batch: one part per partition."""
    by_partition: dict[int, list[DecodedPart]] = {}
    for batch in batches:
        for part in batch:
            by_partition.setdefault(part.partition, []).append(part)
    return [merge_parts(parts) for parts in by_partition.values()]


def decode_batch(batch: list[tuple[int, list[tuple[int, bytes | None]]]], archive: bool,
                 registry: Registry | None = None) -> list[DecodedPart]:
    """`decode_partition` for each (partition, messages) of a micro-batch (in the helper: its registry)."""
    reg = registry if registry is not None else _REGISTRY
    return [decode_partition(p, msgs, reg, archive) for p, msgs in batch]


_REGISTRY: Registry = default_registry()


def _init_helper(registry: Registry) -> None:
    """In the helper: the worker's registry; die with the worker; leave signals to the worker."""
    global _REGISTRY
    _REGISTRY = registry
    tune_gc()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the worker decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the worker shuts the pool down itself
    if sys.platform.startswith("linux"):  # SIGKILL of the worker must not leave the helper behind
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class DecodePool:
    """Helper processes decoding micro-batches; `None` results mean: decode in process."""

    def __init__(self, registry: Registry, archive: bool, processes: int = 1) -> None:
        self.archive = archive
        ctx = multiprocessing.get_context("spawn")  # the worker has threads: never fork it
        self._pool: concurrent.futures.ProcessPoolExecutor | None = concurrent.futures.ProcessPoolExecutor(
            max_workers=processes, mp_context=ctx, initializer=_init_helper, initargs=(registry,))
        self._waiting: set[asyncio.Future[list[DecodedPart] | None]] = set()

    @property
    def running(self) -> bool:
        return self._pool is not None

    def submit(self, batch: list[tuple[int, list[tuple[int, bytes | None]]]]) -> asyncio.Future[
            list[DecodedPart] | None]:
        """Start decoding `batch`; the future gives the parts, or None if the helper failed."""
        loop = asyncio.get_running_loop()
        out: asyncio.Future[list[DecodedPart] | None] = loop.create_future()
        if self._pool is None:
            out.set_result(None)
            return out
        try:
            fut = self._pool.submit(decode_batch, batch, self.archive)
        except Exception as exc:  # noqa: BLE001 - a broken pool: decode in process from now on
            self._failed(exc)
            out.set_result(None)
            return out
        self._waiting.add(out)
        out.add_done_callback(self._waiting.discard)

        def done(f: concurrent.futures.Future[list[DecodedPart]]) -> None:
            try:
                result: list[DecodedPart] | None = f.result()
            except BaseException as exc:  # noqa: BLE001 - cancelled or broken: decoded in process instead
                loop.call_soon_threadsafe(self._failed, exc)
                result = None
            loop.call_soon_threadsafe(_settle, out, result)

        fut.add_done_callback(done)
        return out

    async def result(self, fut: asyncio.Future[list[DecodedPart] | None],
                     timeout: float = DECODE_TIMEOUT) -> list[DecodedPart] | None:
        """The parts of a submitted batch, or None (decode in process) if the helper failed or hung."""
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError as exc:
            self._failed(exc)
            return None

    def _failed(self, exc: BaseException) -> None:
        if self._pool is None:
            return
        log.error("decode helper process failed (%s: %s); decoding in the worker process from now on",
                  type(exc).__name__, exc)
        self._stop(wait=0.0)

    def close(self) -> None:
        """Stop the helpers (at shutdown): idle ones exit by themselves, a stuck one is killed."""
        self._stop(wait=1.0)

    def _stop(self, wait: float) -> None:
        """Shut the pool down, settle every batch still waiting (None), and kill helpers still
        running after `wait` seconds: a hung helper must neither stall folding nor keep the
        worker from exiting (the interpreter joins the pool's threads at exit)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        procs = list((pool._processes or {}).values())  # private, but the only handle on them
        pool.shutdown(wait=False, cancel_futures=True)
        for fut in list(self._waiting):
            _settle(fut, None)
        for proc in procs:
            proc.join(wait)
            if proc.is_alive():
                proc.kill()


def _settle(fut: asyncio.Future[list[DecodedPart] | None], result: list[DecodedPart] | None) -> None:
    if not fut.done():
        fut.set_result(result)
