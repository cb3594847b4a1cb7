"""`stream-agg replay` against the real broker and PostgreSQL."""

from __future__ import annotations

import math
import os
import secrets
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from helpers import make_events, reference_values
from kafka import KafkaProducer
from test_verify import running_worker, wait_consumed

from stream_agg.config import Config
from stream_agg.core.registry import default_registry
from stream_agg.producer import encode_event
from stream_agg.store.schema import migrate

T0 = datetime(2026, 3, 1, tzinfo=UTC)
WEEK = (datetime(2026, 2, 23, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC))  # T0's ISO week
RANGE = ("--start", "2026-03-01T00:00:00Z", "--end", "2026-03-01T06:00:00Z")
COLS = ("count", "sum_value", "min_value", "max_value", "avg_value", "p50_value", "p95_value", "p99_value",
        "digest", "source")


def produce_timestamped(bootstrap: str, topic: str, events: list, per_message: int = 20) -> int:
    """JSON-array messages stamped like a producer publishing as traces complete; returns messages sent."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    sent = 0
    for i in range(0, len(events), per_message):
        chunk = events[i:i + per_message]
        value = b"[" + b",".join(encode_event(e) for e in chunk) + b"]"
        stamp = int(max(e.started_at.timestamp() for e in chunk) * 1000) + 5
        producer.send(topic, value=value, partition=sent % 4, timestamp_ms=stamp)
        sent += 1
    producer.flush()
    producer.close()
    return sent


def workload() -> tuple[list, list]:
    """Events of the range, plus events 9 days before and 3 days after (outside its week)."""
    inside = make_events(800, seed=31, hours=6, users=40)
    before = make_events(60, seed=32, hours=2, start=T0 - timedelta(days=9))
    after = make_events(60, seed=33, hours=2, start=T0 + timedelta(days=3))
    return inside, sorted(before, key=lambda e: e.started_at) + sorted(inside, key=lambda e: e.started_at) + sorted(
        after, key=lambda e: e.started_at)


def replay(config: Config, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_agg", "replay", *RANGE, "--bootstrap", config.kafka_bootstrap, "--topic",
         config.topic, "--group-id", config.group_id, *args], capture_output=True, text=True, timeout=240,
        env={**os.environ, "STREAM_AGG_DATABASE_URL": config.database_url, **(env or {})})


def rows(url: str) -> dict[tuple, dict[str, Any]]:
    with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("SELECT * FROM metrics_aggregates")
        return {(r["granularity"], r["bucket_time"], r["metric_name"], r["dimension_type"], r["dimension_value"]):
                {c: r[c] for c in COLS} for r in cur.fetchall()}


def partial_count(url: str) -> int:
    """Stored (partition, key) states: stream_partials holds one blob per partition and bucket."""
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT coalesce(sum(keys), 0) FROM stream_partials").fetchone()[0]


def test_replay_matches_numpy_and_restores_deleted_rows_exactly(config: Config) -> None:
    migrate(config.database_url)
    inside, ordered = workload()
    produce_timestamped(config.kafka_bootstrap, config.topic, ordered)
    first = replay(config)
    assert first.returncode == 0, first.stderr
    assert "range widened to whole weeks: 2026-02-23T00:00:00Z .. 2026-03-02T00:00:00Z" in first.stdout
    assert "folded 800 events in range" in first.stdout
    got = rows(config.database_url)
    registry = default_registry()
    expected = {k: np.asarray(v) for k, v in reference_values(inside, registry).items()}
    assert set(got) == {(g, datetime.fromtimestamp(b, UTC), m, d, v) for g, b, m, d, v in expected}
    digest_metrics = {m.name for m in registry.metrics if m.digest}
    for (g, b, m, d, v), values in expected.items():
        row = got[(g, datetime.fromtimestamp(b, UTC), m, d, v)]
        assert row["source"] == "stream" and row["count"] == values.size
        assert math.isclose(row["sum_value"], values.sum(), rel_tol=1e-9, abs_tol=1e-12)
        assert (row["min_value"], row["max_value"]) == (values.min(), values.max())
        if m in digest_metrics:
            for q, col in ((50, "p50_value"), (95, "p95_value"), (99, "p99_value")):
                assert math.isclose(row[col], np.percentile(values, q), rel_tol=1e-9, abs_tol=1e-9), (m, col)
    partials = partial_count(config.database_url)
    assert partials > len(got)  # one partial per partition and key

    with psycopg.connect(config.database_url) as conn:
        conn.execute("DELETE FROM metrics_aggregates WHERE bucket_time >= %s AND bucket_time < %s", WEEK)
    again = replay(config)
    assert again.returncode == 0, again.stderr
    assert rows(config.database_url) == got  # every value column, digest bytes included
    third = replay(config)  # idempotent without deleting anything
    assert third.returncode == 0, third.stderr
    assert rows(config.database_url) == got
    assert partial_count(config.database_url) == partials


def test_replay_restores_rows_written_by_the_worker(config: Config, tmp_path: Path) -> None:
    cfg = config.with_overrides(group_id=f"replay-{secrets.token_hex(4)}")
    caps = "user=5"
    _, ordered = workload()
    log_path = tmp_path / "worker.log"
    with running_worker(cfg, log_path, caps) as proc:
        messages = produce_timestamped(cfg.kafka_bootstrap, cfg.topic, ordered)
        wait_consumed(cfg, messages, proc, log_path)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    assert "\x1b[" not in log_path.read_text()  # no terminal escapes (Faust's spinner) in the log
    before = rows(cfg.database_url)
    in_week = {k: r for k, r in before.items() if WEEK[0] <= k[1] < WEEK[1]}
    assert in_week and any(k[4] == "__other__" for k in in_week)
    with psycopg.connect(cfg.database_url) as conn:
        conn.execute("DELETE FROM metrics_aggregates WHERE bucket_time >= %s AND bucket_time < %s", WEEK)
    result = replay(cfg, env={"STREAM_AGG_CARDINALITY_CAPS": caps})
    assert result.returncode == 0, result.stderr
    after = rows(cfg.database_url)
    assert set(after) == set(before)
    for key, was in before.items():
        now = after[key]
        assert (now["count"], now["min_value"], now["max_value"], now["source"]) == (
            was["count"], was["min_value"], was["max_value"], was["source"]), key
        for col in ("sum_value", "avg_value", "p50_value", "p95_value", "p99_value"):
            if was[col] is None:
                assert now[col] is None
            else:
                assert math.isclose(now[col], was[col], rel_tol=1e-12, abs_tol=1e-12), (key, col)
