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

How the messages get there (Linux): written with `writev` (1,024 messages a call) into a
memfd, which the helper opens through `/proc/<worker pid>/fd/<fd>` and maps, so only their offsets go
through the pool's pipe. Why: per 400 MB of messages (a million events), the pipe cost the
worker 0.34 s and the helper 0.60 s of CPU, the memfd 0.15 s and 0.25 s (medians of
`bench/shared_input.py`). While the worker catches up, both cores are busy and the helper
is the stage the fold waits for: the catch-up benchmark folded in 4.79-4.89 s against
5.09-5.33 s through the pipe. A memfd has no name, so a killed worker leaves nothing behind
in /dev/shm; its pages are the worker's memory, though not in its RSS, and a second copy of
the chunk's messages, so at most one chunk per helper waits in a memfd (`DecodePool.send`).
Where memfds or /proc are not there (another OS, a locked-down /proc), the pipe is used.

`decode_partition` is the pure function both paths run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import mmap
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

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

Batch = list[tuple[int, list[tuple[int, bytes | None]]]]  # (partition, [(offset, value)]) of a chunk
# Whether the worker tries memfds at all (another OS: never).
SHARED_INPUT = sys.platform.startswith("linux") and hasattr(os, "memfd_create")
_IOV_MAX = 1024  # iovecs per writev (Linux's IOV_MAX)


@dataclass(frozen=True)
class SharedBatch:
    """A chunk's payloads, back to back in a memfd of the worker process, and where each is."""

    pid: int
    fd: int
    inode: tuple[int, int]  # (st_dev, st_ino) of the memfd: the helper checks it opened this one
    size: int
    layout: list[tuple[int, list[tuple[int, int, int]]]]  # (partition, [(offset, start, end)]); end -1: None


def share_batch(batch: Batch) -> SharedBatch:
    """Write the chunk's payloads into a new memfd (the caller closes `fd` once decoded)."""
    values = [v for _, msgs in batch for _, v in msgs if v]
    fd = os.memfd_create("stream-agg-decode", os.MFD_CLOEXEC)
    try:
        for i in range(0, len(values), _IOV_MAX):
            group = values[i:i + _IOV_MAX]
            done = os.writev(fd, group)
            rest = memoryview(b"".join(group))[done:] if done < sum(map(len, group)) else None
            while rest:  # a short write (not seen on a memfd, but allowed): the rest in order
                rest = rest[os.write(fd, rest):]
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    layout = []
    pos = 0
    for p, msgs in batch:
        spans = []
        for offset, v in msgs:
            if v is None:
                spans.append((offset, 0, -1))
            else:
                spans.append((offset, pos, pos + len(v)))
                pos += len(v)
        layout.append((p, spans))
    return SharedBatch(os.getpid(), fd, (st.st_dev, st.st_ino), pos, layout)


def read_shared(shared: SharedBatch) -> Batch | str:
    """The chunk back from the worker's memfd (in the helper), or why it cannot be read."""
    try:
        fd = os.open(f"/proc/{shared.pid}/fd/{shared.fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != shared.inode:
            # The worker closed it and the number now names another file: only a task whose
            # future is settled already (its pool broke) can get here; read nothing.
            return f"descriptor {shared.fd} of process {shared.pid} is no longer the chunk's memfd"
        if shared.size == 0:
            return [(p, [(off, None if end < 0 else b"") for off, _, end in spans]) for p, spans in shared.layout]
        with mmap.mmap(fd, shared.size, prot=mmap.PROT_READ) as data:
            return [(p, [(off, None if end < 0 else data[start:end]) for off, start, end in spans])
                    for p, spans in shared.layout]
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        os.close(fd)


def decode_shared(shared: SharedBatch, archive: bool) -> list[DecodedPart] | str:
    """`decode_batch` of a chunk in a memfd; a str (the reason) if it cannot be read."""
    batch = read_shared(shared)
    return batch if isinstance(batch, str) else decode_batch(batch, archive)


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

    def __init__(self, registry: Registry, archive: bool, processes: int = 1, shared: bool = SHARED_INPUT) -> None:
        self.archive = archive
        # messages through a memfd (see the module doc); off for good once a helper cannot read one
        self.shared = shared and SHARED_INPUT
        # Memfds written and not yet decoded, at most one waiting per helper besides the one it
        # decodes (`send`): a chunk in a memfd is a second copy of its messages (the worker keeps
        # theirs until folded), where the pipe copied a chunk only as the helper took it. Without
        # the bound, the queue's chunks sat in memfds too: +70 MB at the archive-on benchmark's peak.
        self._room = asyncio.Semaphore(processes + 1)
        ctx = multiprocessing.get_context("spawn")  # the worker has threads: never fork it
        self._pool: concurrent.futures.ProcessPoolExecutor | None = concurrent.futures.ProcessPoolExecutor(
            max_workers=processes, mp_context=ctx, initializer=_init_helper, initargs=(registry,))
        self._waiting: set[asyncio.Future[list[DecodedPart] | None]] = set()
        # Start the helpers now, while the worker joins its consumer group: spawning one (a new
        # interpreter importing numpy and the core) took ~0.25 s, which the first chunk of
        # every start waited for (its decoding 0.42 s, against ~0.17 s for the next ones).
        try:
            for _ in range(processes):
                self._pool.submit(int)
        except Exception as exc:  # noqa: BLE001 - cannot start one: decode in process, as after a failure
            self._failed(exc)

    @property
    def running(self) -> bool:
        return self._pool is not None

    async def send(self, batch: Batch) -> asyncio.Future[list[DecodedPart] | None]:
        """`submit`, once the chunks written into memfds and not decoded yet leave room (see
        `_room`): the caller (the agent) waits meanwhile, as it would for the fold's queue."""
        if not (self.shared and self._pool is not None):
            return self.submit(batch)
        await self._room.acquire()
        return self.submit(batch, room=True)

    def submit(self, batch: Batch, room: bool = False) -> asyncio.Future[list[DecodedPart] | None]:
        """Start decoding `batch`; the future gives the parts, or None (decode in process) if the
        helper failed or could not read the batch's memfd. `room`: a `_room` slot is held for it
        (`send`), given back once it is decoded or fails."""
        loop = asyncio.get_running_loop()
        out: asyncio.Future[list[DecodedPart] | None] = loop.create_future()
        shared = None
        if self.shared and self._pool is not None:
            try:
                shared = share_batch(batch)
            except OSError as exc:  # out of memory or descriptors, maybe for a moment: this batch by pipe
                log.warning("cannot write a chunk into a memfd (%s: %s); sending it through the helper's pipe",
                            type(exc).__name__, exc)
        held = room and shared is not None
        if room and not held:
            self._room.release()
        if self._pool is None:
            out.set_result(None)
            return out
        try:
            fut: concurrent.futures.Future[list[DecodedPart] | str] = (
                self._pool.submit(decode_batch, batch, self.archive) if shared is None
                else self._pool.submit(decode_shared, shared, self.archive))
        except Exception as exc:  # noqa: BLE001 - a broken pool: decode in process from now on
            if shared is not None:
                os.close(shared.fd)
            if held:
                self._room.release()
            self._failed(exc)
            out.set_result(None)
            return out
        self._waiting.add(out)
        out.add_done_callback(self._waiting.discard)

        def done(f: concurrent.futures.Future[list[DecodedPart] | str]) -> None:
            if shared is not None:
                # Decoded, failed or cancelled: nothing waits for this chunk any more. (A helper
                # of a broken pool may still open the number later: `read_shared` checks the inode.)
                with contextlib.suppress(OSError):
                    os.close(shared.fd)
            result: list[DecodedPart] | None = None
            then: list[tuple[Callable[..., None], Any]] = []
            try:
                got = f.result()
            except BaseException as exc:  # noqa: BLE001 - cancelled or broken: decoded in process instead
                then.append((self._failed, exc))
            else:
                if isinstance(got, str):  # the helper could not read the memfd: this batch in process
                    then.append((self._unshared, got))
                else:
                    result = got
            if held:
                then.append((_release, self._room))
            then.append((partial(_settle, out), result))
            try:
                for call, arg in then:
                    loop.call_soon_threadsafe(call, arg)
            except RuntimeError:  # the loop is closed (a helper killed after the worker's loop ended)
                pass

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

    def _unshared(self, reason: str) -> None:
        if self.shared:
            self.shared = False
            log.warning("the decode helper cannot read messages through a memfd (%s); sending them through "
                        "its pipe from now on", reason)

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


def _release(room: asyncio.Semaphore) -> None:
    room.release()


def _settle(fut: asyncio.Future[list[DecodedPart] | None], result: list[DecodedPart] | None) -> None:
    if not fut.done():
        fut.set_result(result)
