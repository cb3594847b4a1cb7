"""`stream-agg query` on rows a real worker wrote: roll-ups and quantiles equal numpy over the raw events."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
import pytest
from click.testing import CliRunner, Result
from helpers import T0, make_events, rank_error, reference_values
from worker_support import WorkerProcess, produce, wait_caught_up

from stream_agg.cli import cli
from stream_agg.config import Config
from stream_agg.core.aggstate import digest_from_values, digest_to_bytes
from stream_agg.core.registry import default_registry
from stream_agg.store.query_sql import INDEX_NAME, DashboardQuery, explain, fetch_rows
from stream_agg.store.schema import LATEST, migrate

H = 3600
START, END = T0.isoformat(), (T0 + timedelta(days=1)).isoformat()


def run_query(database_url: str, *args: str) -> Result:
    result = CliRunner().invoke(cli, ["query", *args], env={"STREAM_AGG_DATABASE_URL": database_url},
                                catch_exceptions=False)
    return result


def query_json(database_url: str, *args: str) -> list[dict]:
    result = run_query(database_url, *args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_window(rec: dict, values: list[float], quantiles: dict[str, float]) -> None:
    """count / min / max exact, sum to float rounding; quantiles exact <= 2,000 values, else 0.1% rank."""
    x = np.asarray(values)
    key = (rec["window_start"], rec["dimension_value"])
    assert rec["count"] == x.size, key
    assert rec["sum"] == pytest.approx(float(x.sum()), rel=1e-12), key
    assert (rec["min"], rec["max"]) == (float(x.min()), float(x.max())), key
    assert rec["avg"] == pytest.approx(float(x.mean()), rel=1e-12), key
    for label, q in quantiles.items():
        if x.size <= 2000:
            assert rec[label] == pytest.approx(float(np.percentile(x, q * 100)), rel=1e-9), (key, label)
        else:
            assert rank_error(x, rec[label], q) <= 0.001, (key, label, x.size)


def iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def aggregated(config: Config, tmp_path: Path) -> tuple[Config, dict[tuple, list[float]]]:
    """12,000 events over 12 hours folded by a real worker; returns the raw values per key."""
    cfg = config.with_overrides(group_id=f"g-{config.topic}")
    events = make_events(12_000, seed=5, hours=12, users=50)
    produce(cfg, events)
    worker = WorkerProcess(cfg, tmp_path / "worker.log").start()
    try:
        wait_caught_up(cfg, timeout=120, workers=[worker])
        assert worker.terminate() == 0
    finally:
        worker.kill()
    return cfg, reference_values(events, default_registry(cfg.cardinality_caps))


def windows_of(ref: dict[tuple, list[float]], metric: str, dim: str, span: int) -> dict[tuple[str, str], list]:
    """Raw values of hour keys grouped into `span`-second windows aligned to the epoch (6 h, 1 d)."""
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (g, b, m, d, v), values in ref.items():
        if (g, m, d) == ("hour", metric, dim):
            out[(iso(b // span * span), v)].extend(values)
    return out


def test_rollup_and_quantiles_equal_the_raw_events(aggregated):
    cfg, ref = aggregated
    url = cfg.database_url
    qs = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p99.9": 0.999}
    flags = [a for q in qs.values() for a in ("--quantile", str(q))]

    # 6 h windows of hour rows, every operation type: ~1,500 values each (exact), 'all': 6,000 (rank).
    for dim in ("operation_type", "all"):
        recs = query_json(url, "--metric", "trace.duration_ms", "--dimension", dim, "--start", START, "--end", END,
                          "--rollup", "6h", *flags)
        want = windows_of(ref, "trace.duration_ms", dim, 6 * H)
        assert {(r["window_start"], r["dimension_value"]) for r in recs} == set(want)
        assert all(r["buckets"] == 6 and r["source"] == "stream" for r in recs)
        for r in recs:
            assert_window(r, want[(r["window_start"], r["dimension_value"])], qs)
        if dim == "all":
            assert [r["count"] for r in recs] == [len(want[k]) for k in sorted(want)]
            assert max(len(v) for v in want.values()) > 2000  # the rank-error path was taken

    # A day from hour rows equals the raw values of the day (and the stored day row's count).
    recs = query_json(url, "--metric", "llm.duration_ms", "--dimension", "model", "--start", START, "--end", END,
                      "--rollup", "1d", *flags)
    day = int(T0.timestamp())
    want = {v: vals for (g, b, m, d, v), vals in ref.items()
            if (g, b, m, d) == ("day", day, "llm.duration_ms", "model")}
    assert {r["dimension_value"] for r in recs} == set(want)
    for r in recs:
        assert_window(r, want[r["dimension_value"]], qs)

    # No roll-up: p50 from the stored column, p99.9 from each hour's digest.
    recs = query_json(url, "--metric", "trace.duration_ms", "--start", START, "--end", END,
                      "--quantile", "0.5", "--quantile", "0.999")
    hours = {iso(b): vals for (g, b, m, d, v), vals in ref.items()
             if (g, m, d) == ("hour", "trace.duration_ms", "all")}
    assert [r["window_start"] for r in recs] == sorted(hours)
    for r in recs:
        assert_window(r, hours[r["window_start"]], {"p50": 0.5, "p99.9": 0.999})

    # Stored day buckets, another dimension and quantile.
    recs = query_json(url, "--metric", "trace.duration_ms", "--dimension", "kb", "--granularity", "day",
                      "--start", START, "--end", END, "--quantile", "0.9")
    want = {v: vals for (g, b, m, d, v), vals in ref.items() if (g, b, m, d) == ("day", day, "trace.duration_ms", "kb")}
    assert {r["dimension_value"] for r in recs} == set(want)
    for r in recs:
        assert_window(r, want[r["dimension_value"]], {"p90": 0.9})

    # A metric without digests rolls up exactly and shows no quantile.
    recs = query_json(url, "--metric", "trace.total_tokens", "--dimension", "user", "--value", "u1",
                      "--start", START, "--end", END, "--rollup", "6h")
    want = windows_of(ref, "trace.total_tokens", "user", 6 * H)
    assert [r["window_start"] for r in recs] == sorted(w for w, v in want if v == "u1")
    for r in recs:
        assert not any(k.startswith("p") for k in r)
        assert_window(r, want[(r["window_start"], "u1")], {})

    check_formats_agree(url)


def check_formats_agree(url: str) -> None:
    """table and csv carry the same rows as json (run on the same worker output as above)."""
    args = ["--metric", "trace.errors", "--dimension", "operation_type", "--start", START, "--end", END,
            "--rollup", "6h"]
    recs = query_json(url, *args)
    out = run_query(url, *args, "--format", "csv")
    assert out.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [(r["window_start"], r["dimension_value"], int(r["count"]), float(r["sum"])) for r in rows] == [
        (r["window_start"], r["dimension_value"], r["count"], r["sum"]) for r in recs]
    table = run_query(url, *args)
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["window_start", "value", "buckets", "count", "sum", "min", "avg", "max", "source"]
    assert [line.split()[:4] for line in lines[1:]] == [
        [r["window_start"], r["dimension_value"], "6", str(r["count"])] for r in recs]
    assert f"{len(recs)} rows from {6 * len(recs)} stored rows" in table.stderr


def _fill_month(url: str) -> tuple[int, int]:
    """30 days of hourly rows for 3 metrics x 20 dimension values (+ day rows), like a busy month."""
    migrate(url)
    lo = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    hi = lo + 30 * 24 * H
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO metrics_aggregates (bucket_time, granularity, metric_name, dimension_type, "
            "dimension_value, count, sum_value, min_value, max_value, avg_value, p50_value, p95_value, p99_value) "
            "SELECT t, g, m, d, v, 10, 100, 1, 20, 10, 9, 18, 19 "
            "FROM generate_series(to_timestamp(%s), to_timestamp(%s) - interval '1 hour', interval '1 hour') t, "
            "(VALUES ('hour'), ('day')) AS gs(g), "
            "unnest(ARRAY['trace.duration_ms', 'trace.errors', 'llm.duration_ms']) m, "
            "(SELECT 'operation_type', 'op' || i FROM generate_series(1, 10) i UNION ALL "
            " SELECT 'kb', 'kb' || i FROM generate_series(1, 10) i) AS dv(d, v) "
            "WHERE g = 'hour' OR extract(hour FROM t AT TIME ZONE 'UTC') = 0", (lo, hi))
        conn.execute("ANALYZE metrics_aggregates")
    return lo, hi


def test_dashboard_query_runs_on_the_dashboard_index(database_url):
    lo, hi = _fill_month(database_url)
    with psycopg.connect(database_url) as conn:
        for value, digest in (("op3", False), ("op3", True), (None, False)):
            q = DashboardQuery("trace.duration_ms", "hour", "operation_type", value, lo, hi, with_digest=digest)
            plan = explain(conn, q)
            # A plain index scan or a bitmap scan of the same index: both read only this slice
            # (the planner picks by how scattered the slice's rows are in the heap).
            assert (f"Index Scan using {INDEX_NAME} on metrics_aggregates" in plan
                    or f"Bitmap Index Scan on {INDEX_NAME}" in plan), plan
            assert "Seq Scan" not in plan, plan
            rows = fetch_rows(conn, q)
            assert len(rows) == 720 * (1 if value else 10)
            assert [r.bucket for r in rows[:720]] == list(range(lo, hi, H))
    # The command's own --explain shows the same access path, with the real run's numbers.
    out = run_query(database_url, "--metric", "trace.duration_ms", "--dimension", "operation_type", "--value", "op3",
                    "--start", iso(lo), "--end", iso(hi), "--explain")
    assert out.exit_code == 0
    assert INDEX_NAME in out.stdout and "Seq Scan" not in out.stdout, out.stdout
    assert "actual time" in out.stdout and "rows=720 loops=1" in out.stdout, out.stdout


def test_rows_without_digest_say_so_instead_of_inventing_quantiles(database_url):
    migrate(database_url)
    rng = np.random.default_rng(11)
    t0 = int(T0.timestamp())
    a, b = rng.lognormal(5, 1, 400), rng.lognormal(5, 1, 600)
    with psycopg.connect(database_url) as conn:
        for t, x, digest, source in ((t0, a, digest_to_bytes(digest_from_values(a)), "stream"),
                                     (t0 + H, b, None, "backfill")):
            conn.execute(
                "INSERT INTO metrics_aggregates (bucket_time, granularity, metric_name, dimension_type, "
                "dimension_value, count, sum_value, min_value, max_value, avg_value, p50_value, p95_value, "
                "p99_value, digest, source) VALUES (to_timestamp(%s), 'hour', 'trace.duration_ms', 'all', 'all', "
                "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (t, x.size, x.sum(), x.min(), x.max(), x.mean(), *np.percentile(x, [50, 95, 99]), digest, source))
    out = run_query(database_url, "--metric", "trace.duration_ms", "--start", START, "--end", END, "--rollup", "6h",
                    "--format", "json")
    assert out.exit_code == 0
    [rec] = json.loads(out.stdout)
    assert_window(rec, list(np.concatenate([a, b])), {})
    assert (rec["p50"], rec["p95"], rec["p99"], rec["source"]) == (None, None, None, "backfill+stream")
    assert "1 of their stored rows carry no digest" in out.stderr
    # Per hour: the stored percentiles stay readable; p99.9 only where a digest exists.
    recs = query_json(database_url, "--metric", "trace.duration_ms", "--start", START, "--end", END,
                      "--quantile", "0.99", "--quantile", "0.999")
    assert recs[0]["p99.9"] == pytest.approx(float(np.percentile(a, 99.9)), rel=1e-9)
    assert (recs[1]["p99"], recs[1]["p99.9"]) == (pytest.approx(float(np.percentile(b, 99))), None)


@pytest.mark.parametrize(("args", "message"), [
    (["--metric", "nope"], "unknown metric 'nope'"),
    (["--metric", "trace.duration_ms", "--dimension", "model"], "has no dimension 'model'"),
    (["--metric", "trace.total_tokens", "--quantile", "0.5"], "keeps no digest"),
    (["--metric", "trace.duration_ms", "--quantile", "1.5"], "between 0 and 1"),
    (["--metric", "trace.duration_ms", "--rollup", "90m"], "whole multiple of one hour"),
    (["--metric", "trace.duration_ms", "--rollup", "6x"], "not a span"),
    (["--metric", "trace.duration_ms", "--since", "1h", "--start", START], "not both"),
    (["--metric", "trace.duration_ms", "--start", END, "--end", START], "after its start"),
    (["--metric", "trace.duration_ms", "--start", "yesterday"], "not an ISO 8601 time"),
])
def test_bad_input_is_one_line_and_exit_2(database_url, args, message):
    out = run_query(database_url, *args)
    assert out.exit_code == 2
    assert out.stderr.startswith("error: ") and message in out.stderr and out.stderr.count("\n") == 1


def test_missing_tables_and_unreachable_database_exit_2(database_url):
    out = run_query(database_url, "--metric", "trace.duration_ms")
    assert (out.exit_code, out.stderr) == (2, "error: the database has no metrics_aggregates table: run "
                                              "`stream-agg migrate` first\n")
    out = run_query("postgresql://nobody:secret@127.0.0.1:1/none", "--metric", "trace.duration_ms")
    assert out.exit_code == 2 and "cannot query PostgreSQL" in out.stderr and "secret" not in out.stderr


def test_a_database_a_newer_stream_agg_migrated_is_exit_2(database_url: str) -> None:
    """Its digests may be in a format this version cannot read: refused, like the other commands."""
    migrate(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO stream_agg_schema (version) VALUES (%s)", (LATEST + 1,))
    out = run_query(database_url, "--metric", "trace.duration_ms")
    assert out.exit_code == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"error: the database's stream-agg schema is version {LATEST + 1}, newer than")


def test_a_role_that_cannot_read_the_schema_version_still_queries(database_url: str) -> None:
    """A read-only dashboard role without SELECT on stream_agg_schema: no version to refuse on."""
    migrate(database_url)
    role = "sa_reader_" + database_url.rsplit("/", 1)[1][-8:]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT SELECT ON metrics_aggregates TO {role}")
    try:
        parts = urlsplit(database_url)
        url = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))
        out = run_query(url, "--metric", "trace.duration_ms", "--format", "json")
        assert out.exit_code == 0, out.output
        assert json.loads(out.stdout) == []
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"REVOKE ALL ON metrics_aggregates FROM {role}")
            conn.execute(f"DROP ROLE {role}")
