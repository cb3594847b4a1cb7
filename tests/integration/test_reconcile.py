"""`stream-agg reconcile`: closed-bucket windows, one-shot exports and the loop's /metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import psycopg
import pytest
from helpers import make_events
from prometheus_client.parser import text_string_to_metric_families
from test_verify import archive

from stream_agg.core.buckets import GRANULARITIES
from stream_agg.devstack import free_port
from stream_agg.ops.reconcile import closed_windows
from stream_agg.store.schema import LATEST, migrate

NOW = datetime(2026, 3, 2, 0, 5, 30, tzinfo=UTC)  # Monday 00:05:30: an hour, a day and a week just closed


def samples(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, s.labels.get("job", ""))] = s.value
    return out


def reconcile(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stream_agg", "reconcile", *args], capture_output=True, text=True,
                          env={**os.environ, "STREAM_AGG_DATABASE_URL": url}, timeout=240)


def test_windows_hold_only_closed_buckets_overlapping_the_lookback() -> None:
    t = NOW.timestamp()
    got = {(w.granularity, datetime.fromtimestamp(w.start, UTC), datetime.fromtimestamp(w.end, UTC))
           for w in closed_windows(t, 7200, 60, GRANULARITIES)}
    assert got == {("hour", datetime(2026, 3, 1, 22, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC)),
                   ("day", datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC)),
                   ("week", datetime(2026, 2, 23, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC))}
    # Inside the grace nothing has closed yet; mid-day only hours are due.
    assert closed_windows(datetime(2026, 3, 2, 0, 0, 30, tzinfo=UTC).timestamp(), 1800, 60, GRANULARITIES) == []
    noon = closed_windows(datetime(2026, 3, 4, 12, 5, tzinfo=UTC).timestamp(), 7200, 60, GRANULARITIES)
    assert [(w.granularity, w.end - w.start) for w in noon] == [("hour", 7200)]


@pytest.fixture
def raw_db(database_url: str) -> str:
    migrate(database_url)
    archive(database_url, make_events(300, seed=41, hours=30, start=datetime(2026, 2, 28, 18, tzinfo=UTC)))
    return database_url


def stored_buckets(url: str) -> set[tuple[str, datetime]]:
    with psycopg.connect(url) as conn:
        return {(g, t) for g, t, s in conn.execute(
            "SELECT DISTINCT granularity, bucket_time, source FROM metrics_aggregates").fetchall() if s == "backfill"}


def raw_rows(url: str, start: datetime, end: datetime) -> int:
    with psycopg.connect(url) as conn:
        traces = conn.execute("SELECT count(*) FROM traces WHERE started_at >= %s AND started_at < %s",
                              (start, end)).fetchone()[0]
        llm = conn.execute("SELECT count(*) FROM spans WHERE kind = 'llm' AND started_at >= %s AND started_at < %s",
                           (start, end)).fetchone()[0]
    return int(traces + llm)


def test_once_backfills_just_closed_buckets_and_writes_a_textfile(raw_db: str, tmp_path: Path) -> None:
    prom = tmp_path / "reconcile.prom"
    result = reconcile(raw_db, "--once", "--lookback", "2h", "--grace", "60s", "--now", NOW.isoformat(),
                       "--textfile", str(prom))
    assert result.returncode == 0, result.stderr
    assert "reconcile at 2026-03-02T00:05:30Z: hour 2026-03-01T22:00:00Z .. 2026-03-02T00:00:00Z" in result.stdout
    assert stored_buckets(raw_db) == {("hour", datetime(2026, 3, 1, 22, tzinfo=UTC)),
                                      ("hour", datetime(2026, 3, 1, 23, tzinfo=UTC)),
                                      ("day", datetime(2026, 3, 1, tzinfo=UTC)),
                                      ("week", datetime(2026, 2, 23, tzinfo=UTC))}
    windows = [(datetime(2026, 3, 1, 22, tzinfo=UTC), NOW.replace(hour=0, minute=0, second=0)),
               (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC)),
               (datetime(2026, 2, 23, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC))]
    read = sum(raw_rows(raw_db, a, b) for a, b in windows)  # each window reads traces + llm spans
    got = samples(prom.read_text())
    assert got[("observability_aggregation_records_processed_total", "reconcile")] == read
    assert got[("observability_aggregation_duration_seconds_count", "reconcile")] == 1
    assert abs(got[("observability_aggregation_last_success", "reconcile")] - time.time()) < 60


def test_once_pushes_to_a_pushgateway(raw_db: str) -> None:
    received: list[tuple[str, str, bytes]] = []

    class Gateway(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = reconcile(raw_db, "--once", "--lookback", "3h", "--granularity", "hour", "--now",
                           NOW.isoformat(), "--pushgateway", f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    assert [(m, p) for m, p, _ in received] == [("PUT", "/metrics/job/reconcile")]
    got = samples(received[0][2].decode())
    assert got[("observability_aggregation_duration_seconds_count", "reconcile")] == 1
    assert got[("observability_aggregation_records_processed_total", "reconcile")] > 0
    assert stored_buckets(raw_db) == {("hour", datetime(2026, 3, 1, h, tzinfo=UTC)) for h in (21, 22, 23)}


def test_loop_runs_on_schedule_serves_metrics_and_stops_on_sigterm(database_url: str) -> None:
    migrate(database_url)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    archive(database_url, make_events(200, seed=42, hours=30, start=today - timedelta(days=2)))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stream_agg", "reconcile", "--every", "1s", "--lookback", "4d",
                             "--granularity", "day", "--metrics-port", str(port)],
                            env={**os.environ, "STREAM_AGG_DATABASE_URL": database_url}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        runs = 0.0
        while time.monotonic() < deadline and runs < 3:
            time.sleep(0.5)
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    runs = samples(resp.read().decode()).get(
                        ("observability_aggregation_duration_seconds_count", "reconcile"), 0.0)
            except OSError:
                continue
        assert runs >= 3
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert err.count("reconcile at ") >= 3  # one log line per run
    assert stored_buckets(database_url) == {("day", today - timedelta(days=2)), ("day", today - timedelta(days=1))}


def test_the_loop_stops_once_a_newer_stream_agg_migrated_the_database(database_url: str) -> None:
    """A reconcile loop outlives deploys: after a newer version migrates, its next run refuses
    (one error line, exit 2) instead of writing rows in a format the newer one may not read."""
    migrate(database_url)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    archive(database_url, make_events(50, seed=43, hours=20, start=today - timedelta(days=2)))
    proc = subprocess.Popen([sys.executable, "-m", "stream_agg", "reconcile", "--every", "1s", "--lookback", "4d",
                             "--granularity", "day", "--metrics-port", "0"],
                            env={**os.environ, "STREAM_AGG_DATABASE_URL": database_url}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not stored_buckets(database_url) and time.monotonic() < deadline:  # a first run wrote its rows
            assert proc.poll() is None
            time.sleep(0.2)
        assert stored_buckets(database_url)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("INSERT INTO stream_agg_schema (version) VALUES (%s)", (LATEST + 1,))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(
        f"error: the database's stream-agg schema is version {LATEST + 1}, newer than this stream-agg"), err[-2000:]
