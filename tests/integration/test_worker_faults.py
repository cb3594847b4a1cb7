"""Bad input, late data, a PostgreSQL outage and the metrics endpoint, with a real broker and database."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg
import pytest
from helpers import make_events
from kafka import KafkaConsumer
from prometheus_client.parser import text_string_to_metric_families
from tcp_proxy import TcpProxy
from worker_support import (
    WorkerProcess,
    assert_rows_match_events,
    decode_all,
    fetch_rows,
    produce,
    produce_raw,
    wait_caught_up,
)

from stream_agg.config import Config
from stream_agg.core.registry import default_registry
from stream_agg.devstack import free_port
from stream_agg.events import encode_event, event_to_dict
from stream_agg.synthetic import generate_events

START = datetime(2026, 3, 2, tzinfo=UTC)


@pytest.fixture
def cfg(config: Config) -> Config:
    return config.with_overrides(group_id=f"g-{config.topic}")


def _ev(i: int, t: datetime, duration: float = 100.0, **kw: object) -> dict:
    return {"schema_version": 1, "trace_id": f"f-{i}", "operation_type": "chat", "started_at": t.isoformat(),
            "duration_ms": duration, "status": "ok", "user_id": "u1", **kw}


GOOD = _ev(0, START)
BAD: list[tuple[bytes | None, list[str]]] = [
    (b"not json at all", ["not_json"]),
    (b'{"schema_version": 1, "trace_id": "x"', ["not_json"]),
    (orjson.dumps({**GOOD, "duration_ms": "fast"}), ["bad_type:duration_ms"]),
    (json.dumps({**GOOD, "duration_ms": float("nan")}).encode(), ["not_finite:duration_ms"]),
    (json.dumps({**GOOD, "duration_ms": float("inf")}).encode(), ["not_finite:duration_ms"]),
    (orjson.dumps({**GOOD, "duration_ms": -5}), ["negative:duration_ms"]),
    (orjson.dumps({**GOOD, "user_id": "a\x00b"}), ["nul_byte:user_id"]),
    (orjson.dumps({**GOOD, "kb_id": "k" * 10_000}), ["too_long:kb_id"]),
    (orjson.dumps({**GOOD, "started_at": "yesterday"}), ["bad_timestamp"]),
    (orjson.dumps({**GOOD, "started_at": "2026-03-02T10:00:00"}), ["bad_timestamp"]),
    (orjson.dumps({k: v for k, v in GOOD.items() if k != "started_at"}), ["missing_field:started_at"]),
    (b"[]", ["empty_batch"]),
    (b'{"events": []}', ["empty_batch"]),
    (orjson.dumps([_ev(900, START), {**GOOD, "status": "meh"}, _ev(901, START)]), ["bad_value:status"]),
]


def _metrics(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _dlq(cfg: Config, expected: int, timeout: float = 30.0) -> list[tuple[dict[str, str], bytes]]:
    consumer = KafkaConsumer(cfg.dlq, bootstrap_servers=cfg.kafka_bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=2000)
    out: list[tuple[dict[str, str], bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for m in consumer:
                out.append(({k: v.decode() for k, v in m.headers}, m.value))
    finally:
        consumer.close()
    return out


def test_bad_input_late_and_too_late_events_and_metrics(cfg: Config, tmp_path: Path) -> None:
    port = free_port()
    first = [_ev(i, START + timedelta(minutes=20 * i), 10.0 * (i + 1)) for i in range(9)]  # 3 hours
    produce(cfg, first, batching=False)
    started = time.time()
    worker = WorkerProcess(cfg, tmp_path / "w.log", STREAM_AGG_GRACE="0s", STREAM_AGG_OUT_OF_ORDERNESS="0s",
                           STREAM_AGG_METRICS_PORT=str(port)).start()
    try:
        wait_caught_up(cfg, timeout=90, workers=[worker])
        hour0 = int(START.timestamp())
        before = fetch_rows(cfg.database_url)[("hour", hour0, "trace.duration_ms", "all", "all")]
        assert before[:4] == (3, 60.0, 10.0, 30.0)
        # a late event for the closed first hour, and one older than the 7-day horizon
        late = _ev(100, START + timedelta(minutes=5), 1000.0)
        too_late = _ev(101, START - timedelta(days=8), 5.0)
        produce(cfg, [late, too_late], batching=False)
        produce_raw(cfg, [payload for payload, _ in BAD])
        wait_caught_up(cfg, timeout=60, workers=[worker])
        after = fetch_rows(cfg.database_url)[("hour", hour0, "trace.duration_ms", "all", "all")]
        # corrected, not lost: + the late 1000 ms event + the two valid 100 ms events of the mixed batch
        assert after[:4] == (6, 1260.0, 10.0, 1000.0)
        expected_reasons = Counter(r for _, reasons in BAD for r in reasons) + Counter({"too_late": 1})
        records = _dlq(cfg, sum(expected_reasons.values()))
        assert Counter(h["reason"] for h, _ in records) == expected_reasons
        for headers, value in records:
            assert {"reason", "source_partition", "source_offset"} <= set(headers)
            if headers["reason"] == "too_late":
                assert orjson.loads(value)["trace_id"] == "f-101"
        by_value = {v: h["reason"] for h, v in records}
        assert by_value[b"not json at all"] == "not_json"
        assert worker.alive()
        m = _metrics(port)
        for reason, n in expected_reasons.items():
            if reason != "too_late":
                assert m[("stream_agg_events_invalid_total", (("reason", reason),))] == n, reason
        assert m[("stream_agg_events_too_late_total", ())] == 1
        assert m[("stream_agg_events_late_total", ())] >= 1
        assert m[("stream_agg_dlq_messages_total", ())] == sum(expected_reasons.values())
        valid = len(first) + 2 + 2  # + late, too-late and the two valid events of the mixed batch
        invalid_events = sum(expected_reasons.values()) - 1
        assert m[("stream_agg_events_consumed_total", ())] == valid + invalid_events
        assert m[("observability_aggregation_records_processed_total", (("job", "stream"),))] == valid - 1
        assert m[("observability_aggregation_last_success", (("job", "stream"),))] >= started
        assert m[("observability_aggregation_duration_seconds_count", (("job", "stream"),))] >= 1
        assert m[("stream_agg_database_up", ())] == 1
        assert m[("stream_agg_assigned_partitions", ())] == 4
        # a few messages at a time: no take was full, so each was folded before the next was taken
        assert m[("stream_agg_micro_batches_total", (("mode", "lockstep"),))] >= 2
        assert m.get(("stream_agg_micro_batches_total", (("mode", "pipelined"),)), 0) == 0
        assert worker.terminate() == 0
    finally:
        worker.kill()
    rows = fetch_rows(cfg.database_url)
    kept = decode_all([encode_event(e) for e in [*first, late, _ev(900, START), _ev(901, START)]])
    assert_rows_match_events(rows, kept, default_registry(cfg.cardinality_caps))


def test_postgres_cut_for_30_seconds_mid_stream(cfg: Config, tmp_path: Path) -> None:
    url = urlsplit(cfg.database_url)
    proxy = TcpProxy(url.hostname or "127.0.0.1", url.port or 5432)
    proxied = urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{proxy.port}"))
    port = free_port()
    first = generate_events(20_000, seed=31, start=START, hours=4, users=100)
    # only the still-open last hour (its state is in memory), so folding goes on and flushes fail
    second = [event_to_dict(e) for e in make_events(3000, seed=32, start=START + timedelta(hours=3, minutes=30),
                                                    hours=0.45)]
    third = generate_events(5_000, seed=33, start=START + timedelta(hours=5), hours=1, users=100)
    produce(cfg, first, batch=100)
    worker = WorkerProcess(cfg, tmp_path / "w.log", STREAM_AGG_DATABASE_URL=proxied,
                           STREAM_AGG_METRICS_PORT=str(port)).start()
    try:
        wait_caught_up(cfg, timeout=90, workers=[worker])
        proxy.cut()
        produce(cfg, second, batch=100)  # arrives while PostgreSQL is away
        time.sleep(30)
        assert worker.alive(), worker.log_text()[-3000:]
        m = _metrics(port)
        assert m[("stream_agg_flush_failures_total", ())] >= 1
        assert m[("stream_agg_database_up", ())] == 0
        produce(cfg, third, batch=100)  # new buckets: their stored state cannot be read -> consumption pauses
        deadline = time.monotonic() + 15  # within ~3 s when the machine is idle; longer when the suite loads it
        while _metrics(port)[("stream_agg_consumption_paused", ())] != 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _metrics(port)[("stream_agg_consumption_paused", ())] == 1
        proxy.restore()
        wait_caught_up(cfg, timeout=90, workers=[worker])
        deadline = time.monotonic() + 20
        while _metrics(port)[("stream_agg_database_up", ())] != 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _metrics(port)[("stream_agg_database_up", ())] == 1
        assert worker.terminate() == 0
    finally:
        worker.kill()
        proxy.close()
    assert "flush failed" in worker.log_text()
    events = decode_all([encode_event(e) for e in first + second + third])
    assert_rows_match_events(fetch_rows(cfg.database_url), events, default_registry(cfg.cardinality_caps))
    with psycopg.connect(cfg.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM traces").fetchone()[0] == len(events)
