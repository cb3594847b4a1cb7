"""Pruning the stream state, against a real PostgreSQL: only buckets no partition can fold
into any more lose their partials, deltas and cap cuts; their rows stay those of numpy over
every event; a partition with no watermark obeys the floor, and one that folded into a
pruned bucket before it knew the floor is refused as fenced, writing nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from helpers import make_events
from worker_support import assert_rows_match_events, close_processors, fetch_rows, open_processor

from stream_agg.core.registry import default_registry
from stream_agg.events import TraceEvent, encode_event
from stream_agg.kafka.processor import Message, Processor
from stream_agg.store.schema import migrate
from stream_agg.store.stream_state import FencedError

STREAM = "s:prune"
START = datetime(2026, 3, 2, tzinfo=UTC)
ENDS = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(days=7)}


class Topic:
    """Messages for the processors, with each partition's offsets and what was sent where."""

    def __init__(self) -> None:
        self.offsets: dict[int, int] = {}
        self.sent: list[TraceEvent] = []

    def messages(self, partition: int, events: list[TraceEvent]) -> list[Message]:
        out = []
        for i in range(0, len(events), 50):
            off = self.offsets.get(partition, 0)
            out.append(Message(partition, off, b"[" + b",".join(encode_event(e) for e in events[i:i + 50]) + b"]"))
            self.offsets[partition] = off + 1
        return out


def _owner(url: str, parts: set[int], topic_partitions: int) -> Processor:
    return open_processor(url, STREAM, parts, topic_partitions, cardinality_caps="user=5")


def _state(url: str) -> dict[str, set[tuple]]:
    with psycopg.connect(url) as conn:
        return {
            "stream_partials": set(conn.execute(
                "SELECT granularity, bucket_time, partition FROM stream_partials WHERE stream = %s", (STREAM,))),
            "stream_partial_deltas": set(conn.execute(
                "SELECT granularity, bucket_time, partition, applied_offset FROM stream_partial_deltas "
                "WHERE stream = %s", (STREAM,))),
            "stream_cap_cuts": set(conn.execute(
                "SELECT granularity, bucket_time, metric_name, dimension_type FROM stream_cap_cuts")),
        }


def _day(d: int, n: int, seed: int) -> list[TraceEvent]:
    return sorted(make_events(n, seed=seed, hours=24, users=12, start=START + timedelta(days=d)),
                  key=lambda e: e.started_at)


def test_prune_keeps_the_rows_and_only_lets_go_of_unreachable_buckets(database_url: str) -> None:
    migrate(database_url)
    topic = Topic()
    proc = _owner(database_url, {0, 1}, topic_partitions=2)
    late_joiner = _owner(database_url, {3}, topic_partitions=4)  # assigned before any floor exists
    rows_before: dict = {}
    marks: dict[int, float] = {}  # each partition's max event time
    try:
        for d in range(16):  # a day at a time, so that buckets close and late events write deltas
            events = _day(d, 400, seed=d)
            if d in (6, 14):  # late (not too late) events into a closed day: deltas over its stored blobs
                events += _day(d - 5, 3, seed=90 + d)
            topic.sent += events
            marks = {p: max([marks.get(p, 0.0), *(e.started_at.timestamp() for e in events[p::2])]) for p in (0, 1)}
            proc.process(topic.messages(0, events[0::2]) + topic.messages(1, events[1::2]))
            proc.flush()
        assert proc.floor == float("-inf")  # nothing pruned yet: no floor
        before = _state(database_url)
        rows_before = fetch_rows(database_url)
        assert_rows_match_events(rows_before, topic.sent, proc.registry)

        report = proc.prune()
        assert report is not None and report.moved
        last = max(e.started_at for e in topic.sent)
        want_floor = min(marks.values()) - 30.0 - 7 * 86400.0
        assert report.floor == pytest.approx(want_floor, abs=1e-3)
        floor = datetime.fromtimestamp(want_floor, tz=UTC)
        assert floor > START + timedelta(days=7) and floor < last

        after = _state(database_url)
        for table, kept in after.items():
            want = {r for r in before[table] if r[1] + ENDS[r[0]] > floor}
            assert kept == want, table
            assert report.deleted[table] == len(before[table]) - len(want) > 0, table
            assert want, table  # the recent buckets keep their state
        assert fetch_rows(database_url) == rows_before  # the product is untouched
        m = proc.metrics
        assert m.prune_floor._value.get() == report.floor
        assert m.pruned_rows.labels("stream_partials")._value.get() == report.deleted["stream_partials"]

        again = proc.prune()  # nothing moved: nothing deleted
        assert again is not None and not again.moved and again.floor == report.floor
        assert again.deleted == dict.fromkeys(report.deleted, 0) and again.unmarked == []
        assert _state(database_url) == after

        # A partial below the floor written again (a replay of an old range; or a prune whose
        # floor was stored but whose deletes did not run) goes at the next prune, even while a
        # flush holds the stream's lock: only moving the floor needs it, and is then skipped.
        old_hour = datetime.fromtimestamp(want_floor, tz=UTC).replace(minute=0, second=0) - timedelta(hours=2)
        with psycopg.connect(database_url) as flushing:
            flushing.execute("INSERT INTO stream_partials (stream, granularity, bucket_time, partition, states, "
                             "keys, applied_offset) VALUES (%s, 'hour', %s, 0, '\\x00', 0, 0)", (STREAM, old_hour))
            flushing.commit()
            flushing.execute("SELECT pg_advisory_xact_lock_shared(727275, hashtext(%s))", (STREAM,))
            busy = proc.prune()
            assert busy is not None and busy.busy and not busy.moved and busy.floor == report.floor
            assert busy.deleted["stream_partials"] == 1
        assert _state(database_url) == after

        # the flushes read the floor: every partition of this worker knows it from now on
        events = _day(16, 200, seed=16)
        topic.sent += events
        proc.process(topic.messages(0, events[0::2]) + topic.messages(1, events[1::2]))
        proc.flush()
        assert proc.floor == report.floor
        assert all(c.watermark.floor == report.floor for c in proc.contexts.values())

        # A partition the pruning worker did not know of (the topic grew), assigned before the
        # floor existed: its events older than the floor were not too late for it, and its
        # flush would re-merge their rows from its own partial alone. Refused, nothing written.
        old = _day(2, 5, seed=77)
        out = late_joiner.process(topic.messages(3, old))
        assert out.folded_events == 5
        rows_now = fetch_rows(database_url)
        with pytest.raises(FencedError, match="pruned"):
            late_joiner.flush()
        assert fetch_rows(database_url) == rows_now
        with psycopg.connect(database_url) as conn:
            assert conn.execute("SELECT count(*) FROM stream_offsets WHERE stream = %s AND partition = 3",
                                (STREAM,)).fetchone() == (0,)
    finally:
        close_processors(proc, late_joiner)

    # Restarted, it reads the floor: the same messages are too late now, and a new partition's
    # events after the floor fold as usual, into rows that stay those of numpy over every event.
    restarted = _owner(database_url, {3}, topic_partitions=4)
    try:
        assert restarted.contexts[3].watermark.floor == report.floor
        topic.offsets[3] = 0
        recent = _day(15, 20, seed=78)
        out = restarted.process(topic.messages(3, old + recent))
        assert sorted(r.reason for r in out.dlq) == ["too_late"] * 5
        assert out.folded_events == 20
        restarted.flush()
        topic.sent += recent
        assert_rows_match_events(fetch_rows(database_url), topic.sent, restarted.registry)
    finally:
        close_processors(restarted)


def test_the_worker_prunes_after_its_flushes_and_reports_it(config, tmp_path) -> None:  # noqa: ANN001
    """A real worker on the broker, pruning after every flush (interval below the flushes'
    spacing): the floor it reports is the one its stored watermarks give, no stream state of
    a bucket ending by it is left, and the rows are those of numpy over every event."""
    import time
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    from worker_support import WorkerProcess, produce, stream_of, wait_caught_up

    from stream_agg.devstack import free_port

    cfg = config.with_overrides(group_id=f"g-{config.topic}")
    stream = stream_of(cfg)
    events = sorted(make_events(2400, seed=5, hours=12 * 24, users=15, start=START), key=lambda e: e.started_at)
    port = free_port()
    worker = WorkerProcess(cfg, tmp_path / "w.log", STREAM_AGG_PRUNE_INTERVAL="500ms",
                           STREAM_AGG_METRICS_PORT=str(port)).start()

    def metrics() -> dict[tuple, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    try:
        produce(cfg, events[:2000], batch=50)
        wait_caught_up(cfg, timeout=90, workers=[worker])
        produce(cfg, events[2000:], batch=10)  # the last days, to every partition: more flushes, more prunes
        wait_caught_up(cfg, timeout=60, workers=[worker])
        with psycopg.connect(cfg.database_url) as conn:
            marks = [t for (t,) in conn.execute("SELECT max_event_time FROM stream_offsets WHERE stream = %s",
                                                (stream,))]
        assert len(marks) == 4 and None not in marks
        want = min(marks) - 30.0 - 7 * 86400.0
        deadline = time.monotonic() + 20
        while (m := metrics()).get(("stream_agg_prune_floor_timestamp_seconds", ())) != want:
            assert time.monotonic() < deadline, f"floor {m.get(('stream_agg_prune_floor_timestamp_seconds', ()))}"
            time.sleep(0.3)
        pruned = {t: m[("stream_agg_pruned_rows_total", (("table", t),))] for t in ("stream_partials",
                                                                                     "stream_partial_deltas")}
        assert pruned["stream_partials"] > 0
        with psycopg.connect(cfg.database_url) as conn:
            assert conn.execute("SELECT pruned_before FROM stream_retention WHERE stream = %s",
                                (stream,)).fetchone() == (want,)
            left = conn.execute(
                "SELECT granularity, bucket_time FROM stream_partials WHERE stream = %s", (stream,)).fetchall()
        floor = datetime.fromtimestamp(want, tz=UTC)
        assert left and all(t + ENDS[g] > floor for g, t in left)
        assert "pruned the stream state of buckets ending by" in worker.log_text()
        assert worker.terminate() == 0
    finally:
        worker.kill()
    assert_rows_match_events(fetch_rows(cfg.database_url), events, default_registry(cfg.cardinality_caps))
