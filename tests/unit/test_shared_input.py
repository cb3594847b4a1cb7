"""Messages handed to the decode helper through a memfd (`decode_pool.share_batch` / `read_shared`).

Real memfds and /proc of this process, no helper: what the helper reads back must be the
chunk as given, byte for byte, None and empty values included."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
from helpers import open_memfds

from stream_agg.kafka.decode_pool import SHARED_INPUT, Batch, read_shared, share_batch

pytestmark = pytest.mark.skipif(not SHARED_INPUT, reason="memfds are Linux-only (the pipe is used elsewhere)")


def test_a_chunk_reads_back_exactly() -> None:
    rng = __import__("random").Random(7)
    batch: Batch = [
        (3, [(10, b'[{"a": 1}]'), (11, None), (12, b""), (13, bytes(rng.randrange(256) for _ in range(70_000)))]),
        (0, [(5, b"x" * (1 << 20))]),
        (1, []),
        # more values than one writev takes (1024 iovecs)
        (2, [(i, str(i).encode() * (i % 7)) for i in range(2_500)]),
    ]
    before = set(open_memfds())
    shared = share_batch(batch)
    assert set(open_memfds()) - before == {str(shared.fd)}
    try:
        assert shared.size == sum(len(v) for _, msgs in batch for _, v in msgs if v)
        assert read_shared(shared) == batch
        assert read_shared(shared) == batch  # reading leaves it as it was
    finally:
        os.close(shared.fd)
    assert set(open_memfds()) == before


def test_nothing_but_empty_values() -> None:
    batch: Batch = [(0, [(1, None), (2, b"")])]
    shared = share_batch(batch)
    try:
        assert shared.size == 0
        assert read_shared(shared) == batch
    finally:
        os.close(shared.fd)


def test_an_unreadable_memfd_gives_the_reason_not_bytes() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shared = share_batch([(0, [(1, b"[]")])])
    try:
        gone = read_shared(replace(shared, pid=dead.pid))  # the process is gone: no /proc entry
        assert isinstance(gone, str) and gone.startswith("FileNotFoundError")
        closed = replace(shared, fd=max(map(int, os.listdir("/proc/self/fd"))) + 100)  # no such descriptor
        assert isinstance(read_shared(closed), str)
        # the number now names another file (closed, then reused): nothing is read from it
        reused = replace(shared, inode=(0, 0))
        assert read_shared(reused) == f"descriptor {shared.fd} of process {shared.pid} is no longer the chunk's memfd"
    finally:
        os.close(shared.fd)
