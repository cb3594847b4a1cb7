"""The processor against a real PostgreSQL, and the decode helper process: the processor folds the
same states from its parts as from its own decoding (invalid and too-late input included), a dead
or hung helper only means decoding in process, and a gap in offsets is reported."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta

import numpy as np
import orjson
import psycopg
import pytest
from helpers import make_events, open_memfds

from stream_agg.config import load_config
from stream_agg.core.aggstate import decode_bucket, decode_bucket_items, is_compressed
from stream_agg.core.merged_rows import RowBlock
from stream_agg.core.registry import default_registry
from stream_agg.events import encode_event
from stream_agg.kafka import decode_pool
from stream_agg.kafka.decode_pool import SHARED_INPUT, DecodedPart, DecodePool, decode_batch
from stream_agg.kafka.processor import Message, Processor, Snapshot
from stream_agg.kafka.worker import WorkerShell
from stream_agg.observability import Metrics
from stream_agg.store.db import scratch_database
from stream_agg.store.schema import migrate
from stream_agg.store.stream_state import BlobFeed, RowFeed, StreamStore, compress_blobs


def _batches() -> list[list[Message]]:
    """Three micro-batches over two partitions; the last holds a too-late event and bad input."""
    events = make_events(900, seed=51, hours=20)
    old = make_events(1, seed=52, start=events[0].started_at - timedelta(days=30))[0]
    out, offsets = [], {0: 0, 1: 0}
    for b, chunk in enumerate((events[:400], events[400:800], events[800:])):
        msgs = []
        for p in (0, 1):
            mine = chunk[p::2]
            values = [b"[" + b",".join(encode_event(e) for e in mine[i:i + 50]) + b"]" for i in range(0, len(mine), 50)]
            if b == 2:
                values += [b'{"not": "an event"}', encode_event(old), b"\x00\xff"]
            for v in values:
                msgs.append(Message(p, offsets[p], v))
                offsets[p] += 1
        out.append(msgs)
    return out


def _processor(url: str, stream: str) -> Processor:
    config = load_config(env={}, database_url=url, metrics_port=0, archive=True)
    proc = Processor(config, default_registry(config.cardinality_caps), StreamStore(url), Metrics(), stream)
    proc.topic_partitions = 2
    proc.assign({0, 1})
    return proc


def _grouped(msgs: list[Message]) -> list[tuple[int, list[tuple[int, bytes | None]]]]:
    by: dict[int, list[tuple[int, bytes | None]]] = {}
    for m in msgs:
        by.setdefault(m.partition, []).append((m.offset, m.value))
    return list(by.items())


def test_processor_folds_the_same_from_helper_parts(database_url: str) -> None:
    migrate(database_url)
    here, helped = _processor(database_url, "s:a"), _processor(database_url, "s:b")
    outs_here, outs_helped = [], []
    try:
        for msgs in _batches():
            outs_here.append(here.process(msgs))
            outs_helped.append(helped.process(msgs, decode_batch(_grouped(msgs), archive=True)))
        for a, b in zip(outs_here, outs_helped, strict=True):
            assert a.folded_events == b.folded_events
            assert [(r.reason, r.partition, r.offset, r.index, r.value) for r in a.dlq] == \
                   [(r.reason, r.partition, r.offset, r.index, r.value) for r in b.dlq]
        assert {r.reason for r in outs_here[-1].dlq} >= {"too_late"} and len(outs_here[-1].dlq) >= 6
        assert here.traces == helped.traces and here.spans == helped.spans
        for p in (0, 1):
            sa, sb = here.contexts[p].pstate.states, helped.contexts[p].pstate.states
            assert sa.keys() == sb.keys() and sa
            for k, s in sa.items():
                t = sb[k]
                assert (s.count, s.sum, s.min, s.max, s.applied_offset) == (t.count, t.sum, t.min, t.max,
                                                                            t.applied_offset), k
                if s.digest is not None:
                    assert s.quantile(0.95) == t.quantile(0.95), k
            assert here.contexts[p].next_offset == helped.contexts[p].next_offset
    finally:
        for proc in (here, helped):
            proc.reader.close()
            proc.store.close()


def _same_parts(parts: list[DecodedPart] | None, msgs: list[Message]) -> None:
    want = decode_batch(_grouped(msgs), archive=False)
    assert parts is not None and [p.partition for p in parts] == [p.partition for p in want]
    for got, exp in zip(parts, want, strict=True):
        assert np.array_equal(got.offsets, exp.offsets) and got.rejects == exp.rejects
        assert got.rejects  # the batch holds bad input: its raw bytes come back in the rejects
        for level, cols in exp.cols.levels.items():
            for name, values in cols.values.items():
                assert np.array_equal(got.cols.levels[level].values[name], values, equal_nan=True)
            assert got.cols.levels[level].labels == cols.labels


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("shared", [True, False], ids=["memfd", "pipe"])
def test_helper_process_results_and_its_death(shared: bool) -> None:
    msgs = _batches()[2]
    if shared and not SHARED_INPUT:
        pytest.skip("memfds are Linux-only")

    async def run() -> None:
        pool = DecodePool(default_registry({"user": 1000}), archive=False, shared=shared)
        try:
            _same_parts(await pool.result(pool.submit(_grouped(msgs))), msgs)
            before = _fds()  # the helper is started (its pipes are open)
            _same_parts(await pool.result(pool.submit(_grouped(msgs))), msgs)
            assert pool.shared is shared
            assert _fds() == before  # the memfd is closed once decoded
            helpers = list(pool._pool._processes)  # type: ignore[union-attr]
            assert helpers
            for pid in helpers:
                os.kill(pid, signal.SIGKILL)
            for _ in range(3):  # the batch in flight and the ones after: None = decode in process
                assert await pool.result(pool.submit(_grouped(msgs))) is None
            assert not pool.running
            assert not open_memfds()
        finally:
            pool.close()

    asyncio.run(asyncio.wait_for(run(), timeout=60))


@pytest.mark.skipif(not SHARED_INPUT, reason="memfds are Linux-only")
def test_a_helper_that_cannot_read_the_memfd_gets_the_messages_through_its_pipe(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """/proc locked down (here: the memfd named by a process that is gone): that batch is decoded
    in process (None), the helper stays, and later batches go through its pipe."""
    msgs = _batches()[2]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    monkeypatch.setattr(decode_pool, "share_batch",
                        lambda batch, real=decode_pool.share_batch: replace(real(batch), pid=dead.pid))

    async def run() -> None:
        pool = DecodePool(default_registry({"user": 1000}), archive=False)
        try:
            assert pool.shared
            assert await pool.result(pool.submit(_grouped(msgs))) is None
            assert pool.running and not pool.shared
            _same_parts(await pool.result(pool.submit(_grouped(msgs))), msgs)
            assert not open_memfds()
        finally:
            pool.close()

    with caplog.at_level(logging.WARNING, logger="stream_agg.kafka.decode_pool"):
        asyncio.run(asyncio.wait_for(run(), timeout=60))
    warned = [r.getMessage() for r in caplog.records if "memfd" in r.getMessage()]
    assert len(warned) == 1 and f"FileNotFoundError: [Errno 2] No such file or directory: '/proc/{dead.pid}/fd/" \
        in warned[0] and warned[0].endswith("sending them through its pipe from now on")


@pytest.mark.skipif(not SHARED_INPUT, reason="memfds are Linux-only")
def test_chunks_wait_in_memfds_only_one_ahead_of_each_helper() -> None:
    """`send` writes a chunk into a memfd only while fewer than processes + 1 wait undecoded:
    with the helper stopped, the third waits (the agent with it), and goes once one is decoded."""
    msgs = _batches()[0]

    async def run() -> None:
        pool = DecodePool(default_registry(), archive=False)
        helpers: list[int] = []
        try:
            assert await pool.result(await pool.send(_grouped(msgs))) is not None  # started
            helpers = list(pool._pool._processes)  # type: ignore[union-attr]
            for pid in helpers:
                os.kill(pid, signal.SIGSTOP)
            first, second = await pool.send(_grouped(msgs)), await pool.send(_grouped(msgs))
            third = asyncio.ensure_future(pool.send(_grouped(msgs)))
            await asyncio.sleep(0.3)
            assert not third.done() and len(open_memfds()) == 2
            for pid in helpers:
                os.kill(pid, signal.SIGCONT)
            for fut in (first, second, await asyncio.wait_for(third, 30)):
                assert await pool.result(fut) is not None
            assert not open_memfds() and pool.shared
        finally:
            for pid in helpers:
                if _alive(pid):
                    os.kill(pid, signal.SIGCONT)
            pool.close()

    asyncio.run(asyncio.wait_for(run(), timeout=60))


def test_the_decode_helper_collects_garbage_less_often() -> None:
    """The helper runs with the worker's GC settings (`gc_tuning`): young collections every
    50,000 allocations, start-up objects frozen. The worker command applies the same."""
    import gc

    from stream_agg.kafka.gc_tuning import THRESHOLDS

    pool = DecodePool(default_registry({"user": 1000}), archive=False)
    try:
        assert pool._pool is not None
        assert pool._pool.submit(gc.get_threshold).result(60) == THRESHOLDS
        assert pool._pool.submit(gc.get_freeze_count).result(60) > 0
    finally:
        pool.close()


def test_a_hung_helper_is_given_up_after_the_timeout() -> None:
    msgs = _batches()[0]

    async def run() -> None:
        pool = DecodePool(default_registry(), archive=False)
        helpers: list[int] = []
        try:
            assert await pool.result(pool.submit(_grouped(msgs))) is not None  # started and working
            helpers = list(pool._pool._processes)  # type: ignore[union-attr]
            for pid in helpers:
                os.kill(pid, signal.SIGSTOP)
            first, second = pool.submit(_grouped(msgs)), pool.submit(_grouped(msgs))
            assert await pool.result(first, timeout=1.0) is None
            began = time.monotonic()
            assert await pool.result(second) is None  # settled when the pool was given up: no second wait
            assert time.monotonic() - began < 1.0
            assert not pool.running
            assert await pool.result(pool.submit(_grouped(msgs))) is None  # and stays given up
            deadline = time.monotonic() + 5
            while any(_alive(pid) for pid in helpers) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not any(_alive(pid) for pid in helpers), "the hung helper was killed"
        finally:
            pool.close()
            for pid in helpers:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)

    asyncio.run(asyncio.wait_for(run(), timeout=60))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_flush_lets_the_refresher_analyse_what_it_wrote(database_url: str) -> None:
    """The rows a flush commits count towards `StatsRefresher`'s ANALYZE (store/table_stats.py)."""
    migrate(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:  # no analysis behind the test's back
        conn.execute("ALTER TABLE metrics_aggregates SET (autovacuum_enabled = false)")
    proc = _processor(database_url, "s:stats")
    try:
        proc.store.stats.min_rows = 1
        for msgs in _batches():
            proc.process(msgs)
        report, _ = proc.flush()
        assert report is not None and report.rows > 1
        proc.store.stats.wait(30)
        assert proc.store.stats.runs == 1
        with psycopg.connect(database_url) as conn:
            stored = conn.execute("SELECT count(*) FROM metrics_aggregates").fetchone()[0]
            believed = conn.execute("SELECT reltuples FROM pg_class WHERE oid = 'metrics_aggregates'::regclass"
                                    ).fetchone()[0]
        assert stored == report.rows == believed  # every row new: the COPY into new buckets counted them
    finally:
        proc.reader.close()
        proc.store.close()


def test_messages_fetched_before_an_assignment_are_dropped_not_folded(database_url: str) -> None:
    migrate(database_url)
    proc = _processor(database_url, "s:gen")
    try:
        proc.assign({0, 1}, generation=7)  # re-assigned in generation 7 (contexts kept, generation moved)
        msgs = [m for m in _batches()[0] if m.partition == 0]
        old = [Message(m.partition, m.offset, m.value, None, 6) for m in msgs[:3]]
        out = proc.process(old)
        assert out.stale == 3 and out.folded_events == 0 and not out.ack_now
        assert proc.contexts[0].next_offset == 0 and not proc.contexts[0].pstate.states
        mixed = [Message(m.partition, m.offset, m.value, None, 6 if i >= 3 else 7) for i, m in enumerate(msgs)]
        out = proc.process(mixed)  # the current generation's messages fold; no skip past the dropped ones
        assert out.stale == len(msgs) - 3 and proc.contexts[0].next_offset == 3
        assert out.folded_events == sum(len(orjson.loads(m.value)) for m in msgs[:3])
    finally:
        proc.reader.close()
        proc.store.close()


def test_an_offset_gap_is_reported_and_the_rest_folded(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    migrate(database_url)
    first = _processor(database_url, "s:gap")
    msgs = [m for m in _batches()[0] if m.partition == 0]
    try:
        first.process(msgs[:2])
        first.flush()  # PostgreSQL now says partition 0 continues at offset 2
    finally:
        first.reader.close()
        first.store.close()
    again = _processor(database_url, "s:gap")
    try:
        assert again.contexts[0].next_offset == 2
        with caplog.at_level(logging.WARNING, logger="stream_agg.kafka.processor"):
            out = again.process(msgs[3:])  # offset 2 was deleted by retention, say
        assert "offsets 2..2 were never consumed" in caplog.text
        assert out.folded_events == sum(len(orjson.loads(m.value)) for m in msgs[3:])
        assert again.contexts[0].next_offset == msgs[-1].offset + 1
    finally:
        again.reader.close()
        again.store.close()


def test_blobs_encoded_while_the_write_starts_are_the_ones_written(database_url: str) -> None:
    """The worker starts the write before the partial blobs are encoded (it queues the
    encoding behind the snapshot): the write waits for them, and stores what an inline
    snapshot stores."""
    migrate(database_url)
    inline, split = _processor(database_url, "s:inline"), _processor(database_url, "s:split")
    try:
        for msgs in _batches()[:2]:
            inline.process(msgs)
            split.process(msgs)
        inline.flush()
        snap = split.snapshot(encode=False)
        assert snap.payload is not None and snap.unencoded
        assert all(not part.buckets for part in snap.payload.partitions)
        snap.payload.encoded = feed = BlobFeed()
        with ThreadPoolExecutor(1) as pool:
            writing = pool.submit(split.write, snap)
            time.sleep(0.3)
            assert not writing.done()  # waiting for the rows and blobs
            split.finish(snap, feed)
            report = writing.result(60)
        split.commit(snap)
        assert report is not None and report.partials > 0
        with psycopg.connect(database_url) as conn:
            rows = conn.execute("SELECT stream, granularity, bucket_time, partition, states FROM stream_partials "
                                "ORDER BY granularity, bucket_time, partition").fetchall()
        by = {s: {(g, t, p): decode_bucket_items(bytes(b)) for st, g, t, p, b in rows if st == s}
              for s in ("s:inline", "s:split")}
        assert by["s:split"] == by["s:inline"] and len(by["s:split"]) == report.partials
    finally:
        for proc in (inline, split):
            proc.reader.close()
            proc.store.close()


def _hour_events(url: str) -> int | None:
    """Events counted by the hour rows of trace.duration_ms over all values."""
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT sum(count) FROM metrics_aggregates WHERE granularity = 'hour' AND "
                            "metric_name = 'trace.duration_ms' AND dimension_type = 'all'").fetchone()[0]


def _rows(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT granularity, bucket_time, metric_name, dimension_type, dimension_value, count, "
                            "sum_value, min_value, max_value, avg_value, p50_value, p95_value, p99_value, digest "
                            "FROM metrics_aggregates ORDER BY 1, 2, 3, 4, 5").fetchall()


def test_rows_fed_to_the_writer_equal_rows_merged_in_the_snapshot(database_url: str, pg_server_url: str) -> None:
    """The worker leaves the merge to `finish` and the writer COPYs each table as it comes.
    Over rounds that add buckets, rewrite rows, push users past a cap of 4 (cuts move,
    rows are deleted) and correct old hours, the table is the same, every column and
    digest byte, as when the rows are merged inside the snapshot."""
    migrate(database_url)
    with scratch_database(pg_server_url, "sa_test_inline") as inline_url:
        migrate(inline_url)
        procs = []
        for url in (inline_url, database_url):
            config = load_config(env={}, database_url=url, metrics_port=0, archive=False)
            proc = Processor(config, default_registry({"user": 4}), StreamStore(url), Metrics(), "s:rows")
            proc.topic_partitions = 2
            proc.assign({0, 1})
            procs.append(proc)
        inline, split = procs
        rounds = [make_events(300, seed=61, hours=6, users=40), make_events(300, seed=62, hours=9, users=60),
                  make_events(200, seed=63, hours=3, users=80)]
        offsets = {0: 0, 1: 0}
        deleted = 0
        try:
            for events in rounds:
                msgs = []
                for p in (0, 1):
                    mine = events[p::2]
                    for i in range(0, len(mine), 50):
                        msgs.append(Message(p, offsets[p], b"[" + b",".join(map(encode_event, mine[i:i + 50])) + b"]"))
                        offsets[p] += 1
                inline.process(msgs)
                split.process(msgs)
                inline.flush()
                snap = split.snapshot(encode=False)
                assert snap.payload is not None and isinstance(snap.payload.blocks, RowFeed)
                snap.payload.encoded = feed = BlobFeed()
                with ThreadPoolExecutor(1) as pool:
                    writing = pool.submit(split.write, snap)
                    split.finish(snap, feed)
                    report = writing.result(60)
                split.commit(snap)
                assert report is not None
                deleted += report.deleted_rows
                assert _rows(database_url) == _rows(inline_url)
            assert deleted > 0  # rows pushed past a moving cut were deleted on the fed path too
        finally:
            for proc in procs:
                proc.reader.close()
                proc.store.close()


def _snapshot_with_feed(proc: Processor) -> tuple[Snapshot, BlobFeed]:
    """The first batch folded and snapshot as the worker does: blobs left to a feed."""
    proc.process(_batches()[0])
    snap = proc.snapshot(encode=False)
    assert snap.payload is not None and snap.unencoded
    snap.payload.encoded = feed = BlobFeed()
    return snap, feed


def _no_room() -> Iterator[RowBlock]:
    raise MemoryError("no room")
    yield  # a generator


@pytest.mark.parametrize("failing", ["merging the rows", "encoding the partial blobs"])
def test_a_failed_merge_or_encoding_fails_the_write_and_the_state_is_kept(database_url: str, failing: str) -> None:
    """If merging the rows or encoding the blobs raises, the write fails (nothing is
    committed) instead of waiting for rows or blobs that now never come, and the
    rolled-back changes are flushed by the next try."""
    migrate(database_url)
    proc = _processor(database_url, "s:fail")
    try:
        snap, feed = _snapshot_with_feed(proc)
        with ThreadPoolExecutor(1) as pool:
            writing = pool.submit(proc.write, snap)
            if failing == "merging the rows":
                snap.unmerged = _no_room()  # the merge as the processing thread would run it, failing
                with pytest.raises(MemoryError):
                    proc.finish(snap, feed)
            else:
                proc.merge(snap)
                feed.close(MemoryError("no room"))
            with pytest.raises(RuntimeError, match=f"{failing} failed"):
                writing.result(60)
        proc.rollback(snap)
        with psycopg.connect(database_url) as conn:
            assert conn.execute("SELECT count(*) FROM stream_partials").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM metrics_aggregates").fetchone() == (0,)
        report, _ = proc.flush()
        assert report is not None and report.partials > 0
        with psycopg.connect(database_url) as conn:
            assert conn.execute("SELECT count(*) FROM stream_partials").fetchone() == (report.partials,)
        assert _hour_events(database_url) == 400
    finally:
        proc.reader.close()
        proc.store.close()


def test_a_write_retried_with_the_same_payload_writes_every_row(database_url: str) -> None:
    """A payload whose write failed after its rows were read from the feed can be written
    again: the feed gives its blocks again, so no row is lost and nothing waits."""
    migrate(database_url)
    proc = _processor(database_url, "s:retry")
    try:
        snap, feed = _snapshot_with_feed(proc)
        proc.finish(snap, feed)
        proc.store.conn().execute("SET lock_timeout = '300ms'")
        proc.store.conn().commit()
        with psycopg.connect(database_url) as other:
            # the partials are written after the rows: the write fails there, the feed read
            other.execute("LOCK TABLE stream_partials IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                proc.write(snap)
        report = proc.write(snap)
        assert report is not None and report.rows > 0
        proc.commit(snap)
        with psycopg.connect(database_url) as conn:
            assert conn.execute("SELECT count(*) FROM metrics_aggregates").fetchone() == (report.rows,)
        assert _hour_events(database_url) == 400
    finally:
        proc.reader.close()
        proc.store.close()


def test_compressing_a_payload_twice_leaves_its_blobs_readable(database_url: str) -> None:
    """A write retried with the same payload must not compress its blobs a second time."""
    migrate(database_url)
    proc = _processor(database_url, "s:twice")
    try:
        snap, feed = _snapshot_with_feed(proc)
        proc.finish(snap, feed)
        raw = [blob for part in snap.payload.partitions for _, _, blob, _ in part.buckets]
        compress_blobs(snap.payload)
        once = [blob for part in snap.payload.partitions for _, _, blob, _ in part.buckets]
        compress_blobs(snap.payload)  # the feed is spent: the blobs are walked again, and kept
        again = [blob for part in snap.payload.partitions for _, _, blob, _ in part.buckets]
        assert raw and again == once and all(is_compressed(b) for b in once)
        assert [decode_bucket_items(b) for b in again] == [decode_bucket_items(b) for b in raw]
    finally:
        proc.reader.close()
        proc.store.close()


def test_a_fold_queued_during_a_snapshot_waits_for_its_blobs(database_url: str) -> None:
    """The worker encodes a snapshot's blobs after the snapshot, on the processing thread. A
    micro-batch arriving meanwhile must be folded after that encoding, or the stored blobs
    would hold events past the offsets stored with them (counted twice after a restart)."""
    migrate(database_url)
    config = load_config(env={}, database_url=database_url, metrics_port=0, decode_processes=0, archive=False)
    shell = WorkerShell(config, metrics=Metrics(), topic_partitions=2)
    shell.processor.assign({0, 1})
    first, second = _batches()[:2]
    try:
        async def fold_during_a_snapshot() -> Snapshot:
            await shell._process(first, None)
            snap, _ = await asyncio.gather(shell._snapshot(), shell._process(second, None))
            return snap

        snap = asyncio.run(fold_during_a_snapshot())
        assert shell.processor.pending_events == 400  # the second batch, folded after the snapshot
        assert shell.processor.write(snap) is not None
        shell.processor.commit(snap)
        with psycopg.connect(database_url) as conn:
            blobs = conn.execute("SELECT states FROM stream_partials WHERE granularity = 'hour'").fetchall()
            offsets = dict(conn.execute("SELECT partition, next_offset FROM stream_offsets").fetchall())
        stored = sum(s.count for (blob,) in blobs for m, d, _, s in decode_bucket(bytes(blob))
                     if m == "trace.duration_ms" and d == "all")
        assert stored == 400  # the first batch's events only
        assert offsets == {p: max(m.offset for m in first if m.partition == p) + 1 for p in (0, 1)}
        assert _hour_events(database_url) == 400  # and so do its rows, merged behind the snapshot
    finally:
        shell.executor.shutdown(wait=True)
        shell.writer.shutdown(wait=True)
        shell.processor.reader.close()
        shell.store.close()


def _assert_same_states(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, s in want.items():
        t = got[k]
        assert (t.count, t.sum, t.min, t.max, t.applied_offset) == (s.count, s.sum, s.min, s.max, s.applied_offset), k
        assert (t.digest is None) == (s.digest is None), k
        if s.digest is not None:
            assert [t.quantile(q) for q in (0.5, 0.95, 0.99)] == pytest.approx(
                [s.quantile(q) for q in (0.5, 0.95, 0.99)], rel=1e-9), k


@pytest.mark.parametrize("workers", [1, 2])
def test_late_events_write_deltas_that_every_reader_applies(database_url: str, workers: int) -> None:
    """A flush that changed few states of a bucket whose blob is stored writes only those
    (stream_partial_deltas). Every reader applies them: a worker loading the bucket, the
    merge reading another worker's partials (two workers, one partition each) and a
    restarted worker; the rows stay those of numpy over every event, and the stored
    states those of the memory that wrote them. At MAX_DELTAS the whole blob is written
    again, and its deltas are deleted."""
    from worker_support import assert_rows_match_events, fetch_rows

    from stream_agg.core.fold import PartitionState
    from stream_agg.core.partition_state import MAX_DELTAS
    from stream_agg.store.stream_state import read_bucket_states

    migrate(database_url)
    stream = "s:delta"

    def owner(parts: set[int]) -> Processor:
        config = load_config(env={}, database_url=database_url, metrics_port=0, archive=False)
        proc = Processor(config, default_registry(config.cardinality_caps), StreamStore(database_url), Metrics(),
                         stream)
        proc.topic_partitions = 2
        proc.assign(parts)
        return proc

    procs = [owner({0, 1})] if workers == 1 else [owner({0}), owner({1})]
    held = {p: proc for proc in procs for p in proc.contexts}
    registry = procs[0].registry
    offsets = {0: 0, 1: 0}
    sent: list = []

    def send(evs: list, to: list[Processor], per: int = 50) -> None:
        sent.extend(evs)
        msgs = []
        for p in (0, 1):
            mine = evs[p::2]
            for i in range(0, len(mine), per):
                msgs.append(Message(p, offsets[p], b"[" + b",".join(encode_event(e) for e in mine[i:i + per]) + b"]"))
                offsets[p] += 1
        for proc in to:
            proc.process([m for m in msgs if m.partition in proc.contexts])
            proc.flush()
        assert_rows_match_events(fetch_rows(database_url), sent, registry)

    def deltas() -> dict[tuple, int]:
        with psycopg.connect(database_url) as conn:
            return {(g, int(t.timestamp()), p): n for g, t, p, n in conn.execute(
                "SELECT granularity, bucket_time, partition, count(*) FROM stream_partial_deltas "
                "GROUP BY 1, 2, 3")}

    try:
        send(make_events(2000, seed=71, hours=6), procs)
        assert deltas() == {}
        seen_max, rewritten, before = 0, False, {}
        for r in range(MAX_DELTAS + 3):
            send(make_events(6, seed=100 + r, hours=1), procs)  # late: into the first hour, its day and week
            now = deltas()
            assert now and max(now.values()) <= MAX_DELTAS
            seen_max = max(seen_max, max(now.values()))
            rewritten |= any(now.get(k, 0) < n for k, n in before.items())
            before = now
            for p, proc in held.items():
                mine = proc.contexts[p].pstate
                buckets = sorted(mine.buckets)
                stored = proc.reader.load_bucket_items(stream, {p: buckets})
                again = PartitionState(registry)
                for b in buckets:
                    again.load_bucket(b, stored[(p, b)].items)
                _assert_same_states(again.states, mine.states)
                assert {b: stored[(p, b)].deltas for b in buckets} == {
                    b: now.get((b[0], b[1], p), 0) for b in buckets} == {b: proc.contexts[p].stored[b] for b in buckets}
            with psycopg.connect(database_url) as conn, conn.cursor() as cur:
                read = read_bucket_states(cur, stream, sorted(held[0].contexts[0].pstate.buckets))
            for p, proc in held.items():
                _assert_same_states({k: s for (k, q), s in read.items() if q == p}, proc.contexts[p].pstate.states)
        assert seen_max == MAX_DELTAS and rewritten  # the whole blob again, its deltas gone
    finally:
        for proc in procs:
            proc.reader.close()
            proc.store.close()
    # a restarted worker loads the blobs with their deltas, and stacks its own on them
    again = owner({0, 1})
    try:
        send(make_events(6, seed=99, hours=1), [again])
        loaded = deltas()
        for p, ctx in again.contexts.items():
            assert ctx.stored and all(ctx.stored[b] == loaded.get((b[0], b[1], p), 0) for b in ctx.stored)
    finally:
        again.reader.close()
        again.store.close()


def test_deltas_without_their_blob_load_as_due_for_a_whole_blob(database_url: str) -> None:
    """Deltas whose stream_partials row is gone (deleted by hand) are not taken for a whole
    blob: what they hold loads, and the bucket counts as MAX_DELTAS deep, so the next flush
    writes it whole instead of stacking more deltas on nothing."""
    from stream_agg.core.aggstate import AggState, encode_bucket
    from stream_agg.core.partition_state import MAX_DELTAS

    migrate(database_url)
    store = StreamStore(database_url)
    bucket = ("hour", 1_700_000_000 // 3600 * 3600)
    base = encode_bucket([("m", "user", v, AggState.from_values([1.0], True, 3)) for v in ("a", "b")])
    delta = encode_bucket([("m", "user", "b", AggState.from_values([1.0, 2.0], True, 7))])
    try:
        with store.conn().transaction(), store.conn().cursor() as cur:
            store.write_partials(cur, "s:orphan", [(*bucket, 0, base, 2, 3)])
            store.write_deltas(cur, "s:orphan", [(*bucket, 0, delta, 1, 7)])
        both = store.load_bucket_items("s:orphan", {0: [bucket]})[(0, bucket)]
        assert both.deltas == 1 and [(v, x) for _, _, v, x in both.items] == [
            ("a", decode_bucket_items(base)[0][3]), ("b", decode_bucket_items(delta)[0][3])]
        with store.conn().transaction():
            store.conn().execute("DELETE FROM stream_partials WHERE stream = 's:orphan'")
        orphan = store.load_bucket_items("s:orphan", {0: [bucket]})[(0, bucket)]
        assert orphan.deltas == MAX_DELTAS and orphan.items == decode_bucket_items(delta)
    finally:
        store.close()
