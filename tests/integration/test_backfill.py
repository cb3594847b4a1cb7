"""`stream-agg backfill` against a real PostgreSQL, checked against numpy over the same raw rows.

The reference here is deliberately naive and independent of the SQL: plain Python loops put
each raw value into its (granularity, bucket, metric, dimension, value) list, the cap keeps
the K values of smallest `cap_hash` per scope, and numpy computes the expected aggregates
(`np.percentile(..., method="linear")` is PERCENTILE_CONT).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import psycopg
import pytest

from stream_agg.core.aggstate import digest_from_bytes
from stream_agg.core.buckets import GRANULARITIES
from stream_agg.core.cardinality import capped_values
from stream_agg.core.registry import OTHER, Registry, default_registry
from stream_agg.ops import backfill as backfill_ops
from stream_agg.ops.backfill import Interrupted, make_plan, run_backfill
from stream_agg.store.schema import migrate
from stream_agg.synthetic import generate_events

MONDAY = datetime(2026, 3, 2, tzinfo=UTC)
TRACE_DIM_FIELD = {"operation_type": "operation_type", "kb": "kb_id", "user": "user_id"}
SPAN_DIM_FIELD = {"operation_type": "operation_type", "model": "model"}
VALUE_COLS = ("count", "sum_value", "min_value", "max_value", "avg_value", "p50_value", "p95_value",
              "p99_value", "digest", "source")


# ----------------------------------------------------------------------------- raw data


def synthetic_rows(n: int, seed: int, start: datetime, hours: float, users: int = 40) -> tuple[list, list]:
    traces, spans = [], []
    for e in generate_events(n, seed, start, hours, users=users, kbs=12):
        t = datetime.fromisoformat(e["started_at"])
        traces.append({"trace_id": e["trace_id"], "operation_type": e["operation_type"], "started_at": t,
                       "duration_ms": e["duration_ms"], "status": e["status"], "user_id": e["user_id"],
                       "kb_id": e["kb_id"], "total_tokens": e["total_tokens"]})
        for s in e["spans"]:
            spans.append({"trace_id": e["trace_id"], "span_id": s["span_id"], "kind": s["kind"],
                          "model": s.get("model"), "duration_ms": s["duration_ms"],
                          "input_tokens": s["input_tokens"], "output_tokens": s["output_tokens"],
                          "status": s["status"], "started_at": t, "operation_type": e["operation_type"]})
    return traces, spans


def edge_rows() -> tuple[list, list]:
    """Hand-made corner cases, each alone in its own hour of 2026-03-20."""
    base = datetime(2026, 3, 20, tzinfo=UTC)
    tz = base.astimezone(ZoneInfo("Asia/Kolkata"))
    traces = [
        # one value in its hour (and a non-UTC offset denoting the same instant)
        {"trace_id": "one", "operation_type": "solo", "started_at": tz + timedelta(hours=1, minutes=5),
         "duration_ms": 42.5, "status": "error", "user_id": "u-one", "kb_id": None, "total_tokens": None},
    ]
    # identical values in one hour
    for i in range(5):
        traces.append({"trace_id": f"same-{i}", "operation_type": "same",
                       "started_at": base + timedelta(hours=3, minutes=i), "duration_ms": 7.0,
                       "status": "ok", "user_id": None, "kb_id": "kb-same",
                       "total_tokens": 100})
    # an hour with only nulls in the optional fields, and the last microsecond of an hour
    traces.append({"trace_id": "nulls", "operation_type": "nulls",
                   "started_at": base + timedelta(hours=5) - timedelta(microseconds=1),
                   "duration_ms": 0.0, "status": "ok", "user_id": None, "kb_id": None, "total_tokens": None})
    spans = [
        {"trace_id": "one", "span_id": "s0", "kind": "llm", "model": None, "duration_ms": 3.0,
         "input_tokens": None, "output_tokens": 5, "status": "ok", "started_at": traces[0]["started_at"],
         "operation_type": "solo"},
        {"trace_id": "one", "span_id": "s1", "kind": "tool", "model": None, "duration_ms": 99.0,
         "input_tokens": None, "output_tokens": None, "status": "ok", "started_at": traces[0]["started_at"],
         "operation_type": "solo"},
        {"trace_id": "same-0", "span_id": "s0", "kind": "llm", "model": "m-same", "duration_ms": 11.0,
         "input_tokens": 4, "output_tokens": 4, "status": "ok", "started_at": traces[1]["started_at"],
         "operation_type": "same"},
        {"trace_id": "same-1", "span_id": "s0", "kind": "llm", "model": "m-same", "duration_ms": 11.0,
         "input_tokens": 4, "output_tokens": 4, "status": "ok", "started_at": traces[2]["started_at"],
         "operation_type": "same"},
    ]
    return traces, spans


def insert_raw(url: str, traces: list[dict], spans: list[dict]) -> None:
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy("COPY traces (trace_id, operation_type, started_at, duration_ms, status, user_id, kb_id, "
                      "total_tokens) FROM STDIN") as copy:
            for t in traces:
                copy.write_row((t["trace_id"], t["operation_type"], t["started_at"], t["duration_ms"], t["status"],
                                t["user_id"], t["kb_id"], t["total_tokens"]))
        with cur.copy("COPY spans (trace_id, span_id, kind, model, duration_ms, input_tokens, output_tokens, "
                      "status, started_at, operation_type) FROM STDIN") as copy:
            for s in spans:
                copy.write_row((s["trace_id"], s["span_id"], s["kind"], s["model"], s["duration_ms"],
                                s["input_tokens"], s["output_tokens"], s["status"], s["started_at"],
                                s["operation_type"]))


# ----------------------------------------------------------------------------- reference


def bucket_of(moment: datetime, granularity: str) -> datetime:
    t = moment.astimezone(UTC)
    hour = t.replace(minute=0, second=0, microsecond=0)
    if granularity == "hour":
        return hour
    day = hour.replace(hour=0)
    return day if granularity == "day" else day - timedelta(days=day.weekday())


def metric_value(metric: Any, row: dict) -> float | None:
    if metric.is_error:
        return 1.0 if row["status"] == "error" else 0.0
    v = row[metric.field]
    return None if v is None else float(v)


def reference(traces: list[dict], spans: list[dict], registry: Registry,
              granularities: tuple[str, ...] = GRANULARITIES) -> dict[tuple, np.ndarray]:
    raw: dict[tuple, list[float]] = defaultdict(list)
    llm = [s for s in spans if s["kind"] == "llm"]
    for m in registry.metrics:
        rows, fields = (traces, TRACE_DIM_FIELD) if m.level == "trace" else (llm, SPAN_DIM_FIELD)
        for row in rows:
            v = metric_value(m, row)
            if v is None:
                continue
            for dim in m.dimensions:
                dv = "all" if dim == "all" else row[fields[dim]]
                if dv is None:
                    continue
                for g in granularities:
                    raw[(g, bucket_of(row["started_at"], g), m.name, dim, dv)].append(v)
    scopes: dict[tuple, list[str]] = defaultdict(list)
    for key in raw:
        scopes[key[:4]].append(key[4])
    out: dict[tuple, list[float]] = defaultdict(list)
    for scope, values in scopes.items():
        cap = registry.cap(scope[3])
        kept = capped_values(values, cap) if cap is not None else set(values)
        for v in values:
            out[(*scope, v if v in kept else OTHER)].extend(raw[(*scope, v)])
    return {k: np.asarray(v) for k, v in out.items()}


def stored(url: str) -> dict[tuple, dict[str, Any]]:
    with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("SELECT * FROM metrics_aggregates")
        return {(r["granularity"], r["bucket_time"], r["metric_name"], r["dimension_type"], r["dimension_value"]): r
                for r in cur.fetchall()}


def assert_matches(rows: dict[tuple, dict], expected: dict[tuple, np.ndarray], registry: Registry) -> None:
    assert set(rows) == set(expected), (sorted(set(expected) - set(rows))[:5], sorted(set(rows) - set(expected))[:5])
    digest_metrics = {m.name for m in registry.metrics if m.digest}
    for key, values in expected.items():
        row = rows[key]
        assert row["source"] == "backfill"
        assert row["count"] == values.size, key
        assert math.isclose(row["sum_value"], values.sum(), rel_tol=1e-9, abs_tol=1e-12), key
        assert row["min_value"] == values.min() and row["max_value"] == values.max(), key
        assert math.isclose(row["avg_value"], values.mean(), rel_tol=1e-9, abs_tol=1e-12), key
        if key[2] in digest_metrics:
            for q, col in ((50, "p50_value"), (95, "p95_value"), (99, "p99_value")):
                want = np.percentile(values, q, method="linear")
                assert math.isclose(row[col], want, rel_tol=1e-12, abs_tol=1e-12), (key, col, row[col], want)
            digest = digest_from_bytes(row["digest"])
            assert digest.n_values == values.size
            if values.size <= 1000:  # exact while the digest holds every value
                assert math.isclose(digest.quantile(0.5), np.percentile(values, 50), rel_tol=1e-9), key
        else:
            assert row["p50_value"] is None and row["digest"] is None, key


def backfill(url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stream_agg", "backfill", *args], capture_output=True, text=True,
                          env={**os.environ, "STREAM_AGG_DATABASE_URL": url, **(env or {})}, timeout=240)


# ----------------------------------------------------------------------------- tests


@pytest.fixture
def db(database_url: str) -> str:
    migrate(database_url)
    return database_url


def test_backfill_equals_numpy_for_every_granularity_metric_and_dimension(db: str) -> None:
    # 10 days from a Sunday: two weeks, the cap (user=4) overflowing in most buckets, plus edge rows.
    traces, spans = synthetic_rows(3000, seed=5, start=MONDAY - timedelta(days=1), hours=240)
    t2, s2 = edge_rows()
    traces += t2
    spans += s2
    insert_raw(db, traces, spans)
    caps = {"user": 4}
    result = backfill(db, "--start", "2026-03-01T00:00:00Z", "--end", "2026-03-21T00:00:00Z", "--granularity",
                      "all", env={"STREAM_AGG_CARDINALITY_CAPS": "user=4"})
    assert result.returncode == 0, result.stderr
    assert "widened to whole weeks: 2026-02-23T00:00:00Z .. 2026-03-23T00:00:00Z" in result.stdout
    assert "backfill 2026-02-23T00:00:00Z .. 2026-03-23T00:00:00Z" in result.stdout
    registry = default_registry(caps)
    expected = reference(traces, spans, registry)
    rows = stored(db)
    assert_matches(rows, expected, registry)
    # The corner cases are really in there.
    one = rows[("hour", datetime(2026, 3, 20, 1, tzinfo=UTC), "trace.duration_ms", "all", "all")]
    assert (one["count"], one["p50_value"], one["p99_value"]) == (1, 42.5, 42.5)
    same = rows[("hour", datetime(2026, 3, 20, 3, tzinfo=UTC), "trace.duration_ms", "operation_type", "same")]
    assert (same["count"], same["min_value"], same["p95_value"]) == (5, 7.0, 7.0)
    assert ("hour", datetime(2026, 3, 20, 4, tzinfo=UTC), "trace.total_tokens", "all", "all") not in rows
    assert any(k[4] == OTHER for k in rows)
    per_scope: dict[tuple, int] = defaultdict(int)
    for k in rows:
        if k[3] == "user" and k[4] != OTHER:
            per_scope[k[:4]] += 1
    assert max(per_scope.values()) == 4


def test_single_granularity_and_metric_selection(db: str) -> None:
    traces, spans = synthetic_rows(600, seed=9, start=MONDAY + timedelta(hours=2), hours=30)
    insert_raw(db, traces, spans)
    result = backfill(db, "--start", "2026-03-02T05:30:00+02:00", "--end", "2026-03-03T01:10:00Z",
                      "--granularity", "hour", "--metric", "llm.duration_ms", "--metric", "trace.errors")
    assert result.returncode == 0, result.stderr
    assert "widened to whole hours: 2026-03-02T03:00:00Z .. 2026-03-03T02:00:00Z" in result.stdout
    registry = default_registry().select(["llm.duration_ms", "trace.errors"])
    expected = {k: v for k, v in reference(traces, spans, registry, ("hour",)).items()
                if datetime(2026, 3, 2, 3, tzinfo=UTC) <= k[1] < datetime(2026, 3, 3, 2, tzinfo=UTC)}
    assert_matches(stored(db), expected, registry)


def test_running_twice_changes_nothing(db: str) -> None:
    traces, spans = synthetic_rows(1500, seed=3, start=MONDAY, hours=50)
    insert_raw(db, traces, spans)
    args = ("--start", "2026-03-02T00:00:00Z", "--end", "2026-03-05T00:00:00Z")
    assert backfill(db, *args).returncode == 0
    first = stored(db)
    with psycopg.connect(db) as conn:
        updated = conn.execute("SELECT max(updated_at) FROM metrics_aggregates").fetchone()
    again = backfill(db, *args)
    assert again.returncode == 0, again.stderr
    assert f"unchanged {len(first):,}" in again.stdout
    second = stored(db)
    assert second == first  # every column, ids and updated_at included
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT max(updated_at) FROM metrics_aggregates").fetchone() == updated


def test_interrupted_run_resumed_gives_the_same_rows(db: str) -> None:
    traces, spans = synthetic_rows(2000, seed=11, start=MONDAY, hours=24 * 6)
    insert_raw(db, traces, spans)
    registry = default_registry()
    plan = make_plan(registry, ("hour", "day"), MONDAY, MONDAY + timedelta(days=6), jobs=1)
    assert len(plan.chunks) == 6

    def stop_after_two(result: Any, done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as info:
        run_backfill(db, plan, on_chunk=stop_after_two)
    assert (info.value.done, info.value.total) == (2, 6)
    partial = stored(db)
    days = {k[1] for k in partial if k[0] == "day"}
    assert days == {MONDAY, MONDAY + timedelta(days=1)}  # whole chunks, nothing of the others
    assert all(k[1] < MONDAY + timedelta(days=2) for k in partial)
    run_backfill(db, plan)
    resumed = stored(db)
    with psycopg.connect(db) as conn:
        conn.execute("TRUNCATE metrics_aggregates")
        conn.commit()
    run_backfill(db, plan)
    fresh = stored(db)
    strip = {k: {c: r[c] for c in VALUE_COLS} for k, r in resumed.items()}
    assert strip == {k: {c: r[c] for c in VALUE_COLS} for k, r in fresh.items()}
    expected = reference(traces, spans, registry, ("hour", "day"))
    assert_matches(resumed, {k: v for k, v in expected.items() if MONDAY <= k[1] < MONDAY + timedelta(days=6)},
                   registry)


@pytest.mark.parametrize("victim_runs", [1, 3], ids=["once", "every-time"])
def test_a_chunk_chosen_as_a_deadlocks_victim_is_run_again(db: str, victim_runs: int,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A stream flush holds row locks in buckets the backfill rewrites (it takes the buckets'
    advisory locks, the backfill does not), so PostgreSQL may abort a chunk as a deadlock's
    victim. The chunk rolled back whole: it is run again, up to DEADLOCK_ATTEMPTS times. The
    deadlock itself is injected here: the first `victim_runs` runs of the second chunk get
    PostgreSQL's error after writing (the transaction's rollback undoes them)."""
    traces, spans = synthetic_rows(600, seed=5, start=MONDAY, hours=48)
    insert_raw(db, traces, spans)
    registry = default_registry()
    plan = make_plan(registry, ("hour", "day"), MONDAY, MONDAY + timedelta(days=2), jobs=1)
    real = backfill_ops.backfill_chunk
    runs: list[int] = []

    def chunk(conn: psycopg.Connection, plan: Any, a: int, b: int) -> Any:
        if a == plan.chunks[1][0] and len(runs) < victim_runs:
            runs.append(a)
            with conn.transaction():
                real(conn, plan, a, b)  # written in a transaction of its own (a savepoint here) ...
                raise psycopg.errors.DeadlockDetected("deadlock detected")  # ... and rolled back
        return real(conn, plan, a, b)

    monkeypatch.setattr(backfill_ops, "backfill_chunk", chunk)
    with caplog.at_level(logging.WARNING, logger="stream_agg.ops.backfill"):
        if victim_runs >= backfill_ops.DEADLOCK_ATTEMPTS:
            with pytest.raises(psycopg.errors.DeadlockDetected):
                run_backfill(db, plan)
            assert len(runs) == backfill_ops.DEADLOCK_ATTEMPTS
            assert {k[1] for k in stored(db) if k[0] == "day"} == {MONDAY}  # the first chunk only
            return
        run_backfill(db, plan)
    assert len(runs) == 1 and sum("deadlocked with another writer" in r.getMessage() for r in caplog.records) == 1
    expected = reference(traces, spans, registry, ("hour", "day"))
    assert_matches(stored(db), {k: v for k, v in expected.items() if MONDAY <= k[1] < MONDAY + timedelta(days=2)},
                   registry)


def test_sigint_mid_run_keeps_whole_chunks_and_rerun_completes(db: str) -> None:
    traces, spans = synthetic_rows(20000, seed=2, start=MONDAY, hours=24 * 14)
    insert_raw(db, traces, spans)
    env = {**os.environ, "STREAM_AGG_DATABASE_URL": db}
    # A test run started in the background (`cmd &` in a script) ignores SIGINT, and a child
    # inherits that: Python then installs no KeyboardInterrupt handler. Ctrl-C is what is
    # tested, so the child installs it before running `python -m stream_agg`.
    main = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "runpy.run_module('stream_agg', run_name='__main__', alter_sys=True)")
    args = [sys.executable, "-c", main, "backfill", "--start", "2026-03-02", "--end", "2026-03-16",
            "--granularity", "hour", "--jobs", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "chunk 1/14" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "re-run the same command" in err
    partial = stored(db)
    done_days = {k[1].date() for k in partial}
    for day in done_days:  # every day chunk present is complete: 24 hours of the `all` row
        hours = {k[1] for k in partial if k[1].date() == day and k[2:] == ("trace.duration_ms", "all", "all")}
        assert len(hours) == 24
    assert 1 <= len(done_days) < 14
    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    registry = default_registry()
    expected = reference(traces, spans, registry, ("hour",))
    assert_matches(stored(db), {k: v for k, v in expected.items()
                                if MONDAY <= k[1] < MONDAY + timedelta(days=14)}, registry)


def test_replaces_stale_rows_and_prunes_only_when_asked(db: str) -> None:
    traces, spans = synthetic_rows(300, seed=4, start=MONDAY + timedelta(hours=1), hours=2)
    insert_raw(db, traces, spans)
    stale = [  # (bucket, metric, dimension, value, source)
        (MONDAY + timedelta(hours=1), "trace.duration_ms", "user", "ghost", "stream"),  # bucket with data
        (MONDAY + timedelta(hours=5), "trace.duration_ms", "all", "all", "stream"),  # no raw data
        (MONDAY + timedelta(hours=6), "trace.duration_ms", "all", "all", "backfill"),  # no raw data
    ]
    with psycopg.connect(db) as conn:
        for bucket, metric, dim, value, source in stale:
            conn.execute("INSERT INTO metrics_aggregates (bucket_time, granularity, metric_name, dimension_type, "
                         "dimension_value, count, sum_value, source) VALUES (%s, 'hour', %s, %s, %s, 1, 1.0, %s)",
                         (bucket, metric, dim, value, source))
    args = ("--start", "2026-03-02T00:00:00Z", "--end", "2026-03-02T08:00:00Z", "--granularity", "hour")
    assert backfill(db, *args).returncode == 0
    rows = stored(db)
    assert ("hour", stale[0][0], "trace.duration_ms", "user", "ghost") not in rows  # replaced by the exact set
    assert ("hour", stale[1][0], "trace.duration_ms", "all", "all") in rows  # kept without --prune
    result = backfill(db, *args, "--prune")
    assert result.returncode == 0, result.stderr
    assert "pruned 1" in result.stdout
    rows = stored(db)
    assert ("hour", stale[1][0], "trace.duration_ms", "all", "all") not in rows
    assert rows[("hour", stale[2][0], "trace.duration_ms", "all", "all")]["source"] == "backfill"


def test_dry_run_writes_nothing(db: str) -> None:
    traces, spans = synthetic_rows(200, seed=8, start=MONDAY, hours=3)
    insert_raw(db, traces, spans)
    result = backfill(db, "--start", "2026-03-02T00:00:00Z", "--end", "2026-03-02T03:00:00Z", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "would write rows" in result.stdout
    assert stored(db) == {}


def test_bucket_expression_equals_date_trunc_in_utc(db: str) -> None:
    from stream_agg.store.backfill_sql import bucket_sql

    instants = ["2026-03-01 23:59:59.999999+00", "2026-03-02 00:00:00+00", "2026-03-08 23:30:00-01",
                "1999-12-31 23:59:59+14", "2024-02-29 12:00:00+05:30", "1970-01-04 23:59:59+00"]
    with psycopg.connect(db) as conn:
        for g in GRANULARITIES:
            for t in instants:
                got, want = conn.execute(
                    f"SELECT {bucket_sql(g, '%(t)s::timestamptz')}, date_trunc(%(g)s, %(t)s::timestamptz "
                    "AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'", {"t": t, "g": g}).fetchone()
                assert got == want, (g, t)


def test_progress_log_lines_without_a_terminal(db: str) -> None:
    traces, spans = synthetic_rows(100, seed=1, start=MONDAY, hours=48)
    insert_raw(db, traces, spans)
    started = time.monotonic()
    result = backfill(db, "--start", "2026-03-02", "--end", "2026-03-04", "--granularity", "day")
    assert result.returncode == 0, result.stderr
    assert "chunk 1/2" in result.stderr and "chunk 2/2" in result.stderr
    assert "buckets 2/2" in result.stderr
    assert time.monotonic() - started < 60
