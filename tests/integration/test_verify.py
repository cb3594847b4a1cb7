"""`stream-agg verify` against a real PostgreSQL, after the backfill and after the real worker."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import pytest
from helpers import make_events

from stream_agg.config import Config
from stream_agg.ops.verify import rank_error
from stream_agg.producer import TraceProducer
from stream_agg.store.schema import migrate

T0 = datetime(2026, 3, 1, tzinfo=UTC)
RANGE = ("--start", "2026-03-01T00:00:00Z", "--end", "2026-03-01T06:00:00Z")


def cli(command: str, url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stream_agg", command, *args], capture_output=True, text=True,
                          env={**os.environ, "STREAM_AGG_DATABASE_URL": url, **(env or {})}, timeout=240)


def archive(url: str, events: list) -> None:
    """What the worker's raw archive writes, for tests that do not run the worker."""
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        for e in events:
            cur.execute("INSERT INTO traces (trace_id, operation_type, started_at, duration_ms, status, user_id, "
                        "kb_id, total_tokens) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                        (e.trace_id, e.operation_type, e.started_at, e.duration_ms, e.status, e.user_id, e.kb_id,
                         e.total_tokens))
            for s in e.spans:
                cur.execute("INSERT INTO spans VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                            (e.trace_id, s.span_id, s.kind, s.model, s.duration_ms, s.input_tokens,
                             s.output_tokens, s.status, e.started_at, e.operation_type))


def tamper(url: str) -> tuple[str, datetime]:
    with psycopg.connect(url) as conn:
        row = conn.execute("UPDATE metrics_aggregates SET count = count + 1 WHERE id = (SELECT min(id) FROM "
                           "metrics_aggregates WHERE granularity = 'hour' AND dimension_type = 'operation_type') "
                           "RETURNING metric_name, bucket_time").fetchone()
    assert row is not None
    return row[0], row[1]


# ----------------------------------------------------------------------------- rank error


def test_rank_error_is_zero_for_percentile_cont_and_grows_with_distance() -> None:
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 10, 1001):
        values = np.sort(rng.lognormal(3, 1, n))
        for q in (0.5, 0.95, 0.99):
            assert rank_error(values, float(np.percentile(values, q * 100, method="linear")), q) < 1e-12
    values = np.arange(1001, dtype=float)  # rank of value i is i / 1000
    assert rank_error(values, 500.0, 0.5) == 0.0
    assert abs(rank_error(values, 502.0, 0.5) - 0.002) < 1e-12
    assert abs(rank_error(values, 499.5, 0.5) - 0.0005) < 1e-12
    assert rank_error(np.array([7.0, 7.0, 7.0]), 7.0, 0.99) == 0.0
    assert rank_error(values, -1.0, 0.5) == 0.5 and rank_error(values, 2000.0, 0.95) == pytest.approx(0.05)


# ----------------------------------------------------------------------------- after a backfill


def test_verify_after_backfill_agrees_then_reports_a_tampered_row(database_url: str) -> None:
    migrate(database_url)
    archive(database_url, make_events(400, seed=21, hours=6))
    assert cli("backfill", database_url, *RANGE).returncode == 0
    ok = cli("verify", database_url, *RANGE)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "all 8 buckets agree" in ok.stdout  # 6 hours + 1 day + 1 week
    metric, bucket = tamper(database_url)
    bad = cli("verify", database_url, *RANGE)
    assert bad.returncode == 1, bad.stdout
    assert "1 mismatches in 1 of 8 buckets" in bad.stdout
    line = next(li for li in bad.stdout.splitlines() if li.startswith("hour "))
    assert metric in line and bucket.strftime("%Y-%m-%dT%H:%M:%SZ") in line and " count " in line
    report = json.loads(cli("verify", database_url, *RANGE, "--json").stdout)
    assert report["ok"] is False and report["buckets"] == 8
    assert [(m["metric"], m["field"], m["stored"] - m["expected"]) for m in report["mismatches"]] == [
        (metric, "count", 1)]


def test_verify_reports_missing_and_extra_rows(database_url: str) -> None:
    migrate(database_url)
    archive(database_url, make_events(100, seed=22, hours=2))
    args = (*RANGE, "--granularity", "hour", "--metric", "trace.duration_ms")
    assert cli("backfill", database_url, *args).returncode == 0
    with psycopg.connect(database_url) as conn:
        conn.execute("DELETE FROM metrics_aggregates WHERE dimension_type = 'all' AND bucket_time = %s", (T0,))
        conn.execute("INSERT INTO metrics_aggregates (bucket_time, granularity, metric_name, dimension_type, "
                     "dimension_value, count, sum_value, source) VALUES (%s, 'hour', 'trace.duration_ms', "
                     "'kb', 'nobody', 1, 1, 'stream')", (T0 + timedelta(hours=5),))
    report = json.loads(cli("verify", database_url, *args, "--json").stdout)
    found = {(m["bucket"], m["dimension"], m["value"], m["stored"], m["expected"]) for m in report["mismatches"]}
    assert found == {("2026-03-01T00:00:00Z", "all", "all", None, "missing"),
                     ("2026-03-01T05:00:00Z", "kb", "nobody", "extra", None)}


# ----------------------------------------------------------------------------- after the worker


@contextmanager
def running_worker(config: Config, log_path: Path, caps: str) -> Iterator[subprocess.Popen[bytes]]:
    """`stream-agg worker` as a subprocess with fast flushes and rebalances; SIGTERM at the end."""
    env = {**os.environ, "STREAM_AGG_KAFKA_BOOTSTRAP": config.kafka_bootstrap,
           "STREAM_AGG_DATABASE_URL": config.database_url, "STREAM_AGG_TOPIC": config.topic,
           "STREAM_AGG_GROUP_ID": config.group_id, "STREAM_AGG_FLUSH_INTERVAL": "1s",
           "STREAM_AGG_SESSION_TIMEOUT": "6s", "STREAM_AGG_HEARTBEAT_INTERVAL": "1s",
           "STREAM_AGG_REBALANCE_TIMEOUT": "3s", "STREAM_AGG_METRICS_PORT": "0", "STREAM_AGG_GRACE": "0s",
           "STREAM_AGG_CARDINALITY_CAPS": caps}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "stream_agg", "worker"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def wait_consumed(config: Config, messages: int, proc: subprocess.Popen[bytes], log_path: Path,
                  timeout: float = 180) -> None:
    """Until stream_offsets shows every produced message durably aggregated (offsets start at 0)."""
    stream = f"{config.group_id}:{config.topic}"
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"worker exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
        try:
            with psycopg.connect(config.database_url) as conn:
                seen = conn.execute("SELECT coalesce(sum(next_offset), 0) FROM stream_offsets WHERE stream = %s",
                                    (stream,)).fetchone()[0]
        except psycopg.Error:
            seen = -1  # tables not created yet
        if seen == messages:
            return
        time.sleep(0.5)
    raise AssertionError(f"worker consumed {seen} of {messages} messages in {timeout:.0f}s:\n"
                         f"{log_path.read_text()[-3000:]}")


def test_verify_agrees_after_the_worker_then_flags_tampering(config: Config, tmp_path: Path) -> None:
    cfg = config.with_overrides(group_id=f"verify-{secrets.token_hex(4)}")
    events = make_events(1500, seed=23, hours=6, users=40)
    # more users than the cap in every bucket: partitions keep values the cap over the whole
    # bucket pushes out, and the stream's merge must still keep exactly the backfill's values
    caps = "user=5"
    log_path = tmp_path / "worker.log"
    with running_worker(cfg, log_path, caps) as proc:
        with TraceProducer(cfg.kafka_bootstrap, cfg.topic, batch_max_events=20) as producer:
            producer.send_many(events)
            producer.flush()
            messages = producer.sent_messages
        wait_consumed(cfg, messages, proc, log_path)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    env = {"STREAM_AGG_CARDINALITY_CAPS": caps}
    with psycopg.connect(cfg.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM traces").fetchone()[0] == len(events)
        assert conn.execute("SELECT count(DISTINCT source) FROM metrics_aggregates").fetchone()[0] == 1
    ok = cli("verify", cfg.database_url, *RANGE, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "all 8 buckets agree" in ok.stdout  # value by value, capped dimensions included
    metric, bucket = tamper(cfg.database_url)
    bad = cli("verify", cfg.database_url, *RANGE, env=env)
    assert bad.returncode == 1, bad.stdout
    assert bucket.strftime("%Y-%m-%dT%H:%M:%SZ") in bad.stdout and metric in bad.stdout
    assert "1 mismatches in 1 of 8 buckets" in bad.stdout
