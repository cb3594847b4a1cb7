"""The streaming worker against a real broker and a real PostgreSQL: correct, exactly-once, robust."""

from __future__ import annotations

import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import numpy as np
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from worker_support import (
    WorkerProcess,
    assert_rows_match_events,
    assert_same_rows,
    children_of,
    decode_all,
    durable_offsets,
    end_offsets,
    fetch_rows,
    produce,
    stream_of,
    wait_caught_up,
)

from stream_agg.config import Config
from stream_agg.core.registry import default_registry
from stream_agg.devstack import free_port
from stream_agg.events import TraceEvent, encode_event
from stream_agg.store.schema import LATEST
from stream_agg.synthetic import generate_events

START = datetime(2026, 2, 2, tzinfo=UTC)  # a Monday


@pytest.fixture
def cfg(config: Config) -> Config:
    """A consumer group of its own per test, so no test waits on another's members."""
    return config.with_overrides(group_id=f"g-{config.topic}")


def _event(i: int, t: datetime, duration: float, **kw) -> TraceEvent:
    body = {"schema_version": 1, "trace_id": f"hand-{i}", "operation_type": kw.pop("op", "chat"),
            "started_at": t.isoformat(), "duration_ms": duration, "status": kw.pop("status", "ok"), **kw}
    return msgspec.convert(body, TraceEvent)


def test_end_to_end_synthetic_and_hand_made(cfg: Config, tmp_path: Path) -> None:
    synthetic = generate_events(4000, seed=3, start=START, hours=30, users=300)
    h = START + timedelta(hours=40)
    hand = [
        _event(0, h + timedelta(minutes=1), 10.0, user_id="ann", kb_id="kb1", total_tokens=100,
               spans=[{"span_id": "a", "kind": "llm", "model": "m1", "duration_ms": 5.0,
                       "input_tokens": 7, "output_tokens": 3}]),
        _event(1, h + timedelta(minutes=2), 20.0, user_id="ann", status="error"),
        _event(2, h + timedelta(minutes=3), 30.0, user_id="bob", total_tokens=50),
        _event(3, (h + timedelta(minutes=4)).astimezone(UTC), 40.0, op="search"),
        _event(4, h + timedelta(minutes=59, seconds=59.999999), 1000.0, user_id="bob", kb_id="kb1",
               spans=[{"span_id": "b", "kind": "llm", "model": "m1", "duration_ms": 15.0},
                      {"span_id": "c", "kind": "retrieval", "duration_ms": 99.0}]),
    ]
    produce(cfg, synthetic)
    produce(cfg, hand, batching=False)
    worker = WorkerProcess(cfg, tmp_path / "worker.log").start()
    try:
        wait_caught_up(cfg, timeout=120, workers=[worker])
        started = time.monotonic()
        assert worker.terminate(timeout=10) == 0
        assert time.monotonic() - started < 10
    finally:
        worker.kill()
    rows = fetch_rows(cfg.database_url)
    events = decode_all([encode_event(e) for e in synthetic]) + hand
    assert_rows_match_events(rows, events, default_registry(cfg.cardinality_caps))
    # the hand-made hour, checked by hand
    hb = int(h.timestamp())
    c, s, lo, hi, avg, p50, p95, p99, src = rows[("hour", hb, "trace.duration_ms", "all", "all")]
    assert (c, s, lo, hi, avg, p50, src) == (5, 1100.0, 10.0, 1000.0, 220.0, 30.0, "stream")
    assert p95 == pytest.approx(np.percentile([10, 20, 30, 40, 1000], 95))
    assert rows[("hour", hb, "trace.errors", "all", "all")][:2] == (5, 1.0)
    assert rows[("hour", hb, "trace.total_tokens", "user", "ann")][:2] == (1, 100.0)
    assert rows[("hour", hb, "llm.duration_ms", "model", "m1")][:4] == (2, 20.0, 5.0, 15.0)
    assert ("hour", hb, "trace.duration_ms", "user", None) not in rows
    with psycopg.connect(cfg.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM traces").fetchone()[0] == len(events)
        assert conn.execute("SELECT count(*) FROM spans WHERE trace_id LIKE 'hand-%%'").fetchone()[0] == 3


def _second_db(url: str, admin_url: str, request: pytest.FixtureRequest) -> str:
    """A fresh database beside the test's own, dropped when the test ends."""
    name = url.rsplit("/", 1)[1] + "_b"

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    drop()
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    request.addfinalizer(drop)
    return url.rsplit("/", 1)[0] + "/" + name


def test_sigkill_three_times_equals_uninterrupted(cfg: Config, pg_server_url: str, tmp_path: Path,
                                                  request: pytest.FixtureRequest) -> None:
    payloads = generate_events(100_000, seed=11, start=START, hours=20, users=500)
    # The stream is produced in four parts, the next one only once a kill is done: every kill
    # lands mid-stream by construction, whatever the machine's speed (one flush of a loaded
    # run can make most of a topic loaded beforehand durable at once).
    cuts = [0, 35_000, 60_000, 85_000, len(payloads)]
    produce(cfg, payloads[:cuts[1]], batch=200)
    other_db = _second_db(cfg.database_url, pg_server_url, request)
    clean = cfg.with_overrides(database_url=other_db, group_id=cfg.group_id + "-clean")

    def durable() -> int:
        return sum(durable_offsets(cfg.database_url, stream_of(cfg)).values())

    killed_at: list[int] = []  # durable messages when each kill was decided
    try:
        # flushing every 5 s, the crashing worker every second: the rows must not depend on it
        uninterrupted = WorkerProcess(clean, tmp_path / "clean.log", STREAM_AGG_FLUSH_INTERVAL="5s").start()
        crashing = WorkerProcess(cfg, tmp_path / "crash.log").start()
        for part in range(1, 4):
            # Read once this instance is positioned (a commit the killed one sent just before
            # dying is visible by then) and before the next part exists: progress past this
            # is this instance's own, and there is always some to make.
            crashing.wait_for_log("positioned partitions")
            started_from = now = durable()
            if part > 1:
                produce(cfg, payloads[cuts[part - 1]:cuts[part]], batch=200)
            deadline = time.monotonic() + 120
            while now <= started_from:
                assert time.monotonic() < deadline and crashing.alive(), crashing.log_text()[-3000:]
                time.sleep(0.05)
                now = durable()
            time.sleep(np.random.default_rng(part).uniform(0, 0.7))  # land anywhere, mid-flush too
            assert children_of(crashing.pid), "the worker runs its decode helper"  # which must die with it
            killed_at.append(now)
            crashing.kill()
            crashing = WorkerProcess(cfg, tmp_path / f"crash{part}.log").start()
        produce(cfg, payloads[cuts[3]:], batch=200)
        total = sum(end_offsets(cfg.kafka_bootstrap, cfg.topic).values())
        wait_caught_up(cfg, timeout=240, workers=[crashing])
        wait_caught_up(clean, timeout=240, workers=[uninterrupted])
        assert crashing.terminate() == 0
        assert uninterrupted.terminate() == 0
    finally:
        for w in (locals().get("crashing"), locals().get("uninterrupted")):
            if w is not None:
                w.kill()
    # three kills at growing points of the stream, the last one still before its end
    assert killed_at == sorted(set(killed_at)) and len(killed_at) == 3 and killed_at[-1] < total, killed_at
    crashed_rows = fetch_rows(cfg.database_url)
    clean_rows = fetch_rows(other_db)
    assert_same_rows(crashed_rows, clean_rows)
    events = decode_all([encode_event(e) for e in payloads])
    assert_rows_match_events(crashed_rows, events, default_registry(cfg.cardinality_caps))
    with psycopg.connect(cfg.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM traces").fetchone()[0] == len(events)


# The worker in a subprocess with chunks of ~1 message, so a backlog of small messages is
# decoded in many chunks and the fold joins those already decoded (`join_decoded`).
SMALL_CHUNKS = ("import stream_agg.kafka.worker as w; w.FOLD_BYTES = 25_000; w.FOLD_JOIN_BYTES = 250_000; "
                "from stream_agg.cli import main; main()")


def test_backlog_folded_in_joined_chunks_across_a_kill(cfg: Config, tmp_path: Path) -> None:
    """Decoded chunks folded as one batch (some partitions in some chunks only), and a SIGKILL
    in the middle: the rows still equal numpy over the events."""
    payloads = generate_events(12_000, seed=13, start=START, hours=12, users=300)
    produce(cfg, payloads, batch=50)
    total = sum(end_offsets(cfg.kafka_bootstrap, cfg.topic).values())
    debug = {"STREAM_AGG_LOG_LEVEL": "DEBUG", "STREAM_AGG_ARCHIVE": "false"}  # archive on: nothing is joined
    # flushes every ~3,000 events, whatever holds the interval's flush for the backlog's end,
    # so that the kill lands with part of the backlog durable and part not
    debug["STREAM_AGG_MAX_PENDING_EVENTS"] = "3000"
    worker = WorkerProcess(cfg, tmp_path / "first.log", python=["-c", SMALL_CHUNKS], **debug).start()
    try:
        deadline = time.monotonic() + 120
        while (durable := sum(durable_offsets(cfg.database_url, stream_of(cfg)).values())) < 0.4 * total:
            assert time.monotonic() < deadline and worker.alive(), worker.log_text()[-3000:]
            time.sleep(0.05)
        assert durable < total, "the kill must land mid-backlog"
        first_log = worker.log_text()
        worker.kill()
        worker = WorkerProcess(cfg, tmp_path / "second.log", python=["-c", SMALL_CHUNKS], **debug).start()
        wait_caught_up(cfg, timeout=120, workers=[worker])
        assert worker.terminate() == 0
    finally:
        worker.kill()
    joined = (first_log + worker.log_text()).count("folding decoded chunks joined")
    assert joined >= 5, "the backlog was never folded in joined chunks"
    events = decode_all([encode_event(e) for e in payloads])
    assert_rows_match_events(fetch_rows(cfg.database_url), events, default_registry(cfg.cardinality_caps))


def test_a_backlogs_last_micro_batch_does_not_wait_for_the_batch_timeout(cfg: Config, tmp_path: Path) -> None:
    """Single-event messages behind a backlog: full takes of 200, then a last one of 30 that
    ends once every partition is taken to its end, not after the 60 s batch timeout. The full
    ones are pipelined, the last one (not full) folded in lockstep."""
    events = generate_events(1030, seed=17, start=START, hours=6, users=50)
    produce(cfg, events, batching=False)
    port = free_port()
    worker = WorkerProcess(cfg, tmp_path / "worker.log", STREAM_AGG_BATCH_SIZE="200",
                           STREAM_AGG_BATCH_TIMEOUT="60s", STREAM_AGG_ARCHIVE="false",
                           STREAM_AGG_METRICS_PORT=str(port)).start()
    try:
        wait_caught_up(cfg, timeout=40, workers=[worker])  # group join and fold included; the timeout is 60 s
        takes = {s.labels["mode"]: s.value for f in text_string_to_metric_families(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
            for s in f.samples if s.name == "stream_agg_micro_batches_total"}
        assert takes.get("pipelined", 0) >= 4 and takes.get("lockstep", 0) >= 1, takes
        assert worker.terminate() == 0
    finally:
        worker.kill()
    events_back = decode_all([encode_event(e) for e in events])
    assert_rows_match_events(fetch_rows(cfg.database_url), events_back, default_registry(cfg.cardinality_caps))


def test_a_running_worker_stops_rather_than_take_partitions_after_a_newer_migration(
        cfg: Config, tmp_path: Path) -> None:
    """A rolling deploy: a second worker joins after a newer stream-agg migrated the database
    (here: the version bumped while it starts). At the rebalance, neither takes partitions
    whose state it may not read: both stop, with the reason in the log."""
    produce(cfg, generate_events(500, seed=23, start=START, hours=2, users=20), batch=100)
    a = WorkerProcess(cfg, tmp_path / "a.log", STREAM_AGG_FLUSH_INTERVAL="1h").start()
    b = None
    try:
        a.wait_for_log("positioned partitions")
        b = WorkerProcess(cfg, tmp_path / "b.log", STREAM_AGG_FLUSH_INTERVAL="1h").start()
        b.wait_for_log("BoundedBufferConsumer]: Starting")  # migrated; about to join the group
        with psycopg.connect(cfg.database_url, autocommit=True) as conn:
            conn.execute("INSERT INTO stream_agg_schema (version) VALUES (%s)", (LATEST + 1,))
        for w in (a, b):
            assert w.proc is not None
            code = w.proc.wait(timeout=90)
            assert code != 0, w.log_text()[-2000:]
            assert "stopping this worker" in w.log_text() and (
                f"schema is version {LATEST + 1}, newer than this stream-agg knows") in w.log_text()
    finally:
        a.kill()
        if b is not None:
            b.kill()


def test_two_workers_one_stopped_mid_stream(cfg: Config, tmp_path: Path) -> None:
    first = generate_events(15_000, seed=21, start=START, hours=6, users=200)
    second = generate_events(15_000, seed=22, start=START + timedelta(hours=6), hours=6, users=200)
    produce(cfg, first, batch=100)
    a = WorkerProcess(cfg, tmp_path / "a.log").start()
    b = WorkerProcess(cfg, tmp_path / "b.log").start()
    try:
        deadline = time.monotonic() + 90
        while "flushed partitions" not in b.log_text():  # b owns partitions and has written

            assert time.monotonic() < deadline, a.log_text()[-2000:] + b.log_text()[-2000:]
            time.sleep(0.2)
        b.kill()  # stopped mid-stream, without a goodbye
        produce(cfg, second, batch=100)
        wait_caught_up(cfg, timeout=180, workers=[a])
        assert a.terminate() == 0
    finally:
        a.kill()
        b.kill()
    events = decode_all([encode_event(e) for e in first + second])
    assert_rows_match_events(fetch_rows(cfg.database_url), events, default_registry(cfg.cardinality_caps))
