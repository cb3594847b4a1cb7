"""Dashboard query benchmark: one metric, one dimension value, 30 days of hourly rows.

Fills `metrics_aggregates` of a fresh database with a month of rows shaped like a busy
deployment (every registry metric, hour + day rows, 6 operation types, 5 models, 40 kbs
and 100 users, digests on the digest metrics, each digest the size a real hour of ~400
values has), then times, on one open connection, the median of --runs runs of:

1. the plain dashboard read (`stream-agg query --metric trace.duration_ms --dimension
   operation_type --value chat --since 30d`): 720 rows from the stored columns;
2. the same with `--quantile 0.999` (720 digests read and queried);
3. the same with `--rollup 1d` (720 digests merged into 30 windows);

each as PostgreSQL's own execution time (EXPLAIN ANALYZE) and as client wall time (SQL +
rows to Python + the core's answer), plus one run of the CLI as a user types it.

    python bench/query.py                 # 30 days, 15 runs
    python bench/query.py --days 7 --runs 5

Needs a PostgreSQL server: STREAM_AGG_DATABASE_URL (its maintenance database) or the local
one on 127.0.0.1:5432; a database `stream_agg_bench_query_<random>` is created and dropped.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

import numpy as np
import psycopg

from stream_agg.core.aggstate import digest_from_values, digest_to_bytes
from stream_agg.core.query import answer, parse_span
from stream_agg.core.registry import DEFAULT_METRICS
from stream_agg.devstack import LOCAL_POSTGRES_URL
from stream_agg.store.db import scratch_database
from stream_agg.store.query_sql import INDEX_NAME, DashboardQuery, explain, fetch_rows
from stream_agg.store.schema import migrate

START = datetime(2026, 3, 2, tzinfo=UTC)
H = 3600
VALUES = {
    "all": ["all"],
    "operation_type": ["chat", "search", "generation", "summarize", "embed", "agent"],
    "model": ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "llama-3-70b", "text-embedding-3-small"],
    "kb": [f"kb-{i:03d}" for i in range(40)],
    "user": [f"user-{i:04d}" for i in range(100)],
}


def fill(url: str, days: int) -> int:
    """COPY the month of rows; returns how many."""
    rng = np.random.default_rng(0)
    digest = digest_to_bytes(digest_from_values(rng.lognormal(6, 1, 400)))
    lo = int(START.timestamp())
    n = 0
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy("COPY metrics_aggregates (bucket_time, granularity, metric_name, dimension_type, "
                      "dimension_value, count, sum_value, min_value, max_value, avg_value, p50_value, p95_value, "
                      "p99_value, digest) FROM STDIN") as copy:
            for h in range(days * 24):
                hour = datetime.fromtimestamp(lo + h * H, UTC)
                grans = ("hour", "day") if h % 24 == 0 else ("hour",)
                for g in grans:
                    for m in DEFAULT_METRICS:
                        for dim in m.dimensions:
                            for v in VALUES[dim]:
                                q = (400.0, 1500.0, 2500.0) if m.digest else (None, None, None)
                                copy.write_row((hour, g, m.name, dim, v, 400, 200_000.0, 1.0, 9000.0, 500.0, *q,
                                                digest if m.digest else None))
                                n += 1
        conn.commit()
        conn.autocommit = True
        cur.execute("VACUUM ANALYZE metrics_aggregates")
    return n


def timed(conn: psycopg.Connection, q: DashboardQuery, quantiles: tuple[float, ...], rollup: int | None,
          runs: int) -> tuple[float, float, int]:
    """(median server ms, median client ms, windows answered)."""
    server, client = [], []
    windows = 0
    for _ in range(runs):
        plan = explain(conn, q, analyze=True)
        server.append(float(re.search(r"Execution Time: ([0-9.]+) ms", plan).group(1)))  # type: ignore[union-attr]
        t0 = time.perf_counter()
        rows = fetch_rows(conn, q)
        windows = len(answer(rows, q.granularity, quantiles, rollup))
        client.append((time.perf_counter() - t0) * 1000)
    return statistics.median(server), statistics.median(client), windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()

    server_url = os.environ.get("STREAM_AGG_DATABASE_URL") or LOCAL_POSTGRES_URL
    with scratch_database(server_url, "stream_agg_bench_query") as url:
        migrate(url)
        t0 = time.perf_counter()
        n = fill(url, args.days)
        with psycopg.connect(url, autocommit=True) as conn:
            size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('metrics_aggregates'))").fetchone()
        filled = time.perf_counter() - t0
        print(f"metrics_aggregates: {n:,} rows, {size[0] if size else '?'} (filled in {filled:.1f} s)")
        lo = int(START.timestamp())
        hi = lo + args.days * 24 * H
        cases = [
            ("plain: p50/p95/p99 columns", (0.5, 0.95, 0.99), None, False),
            ("--quantile 0.999 (digests)", (0.999,), None, True),
            ("--rollup 1d (digests merged)", (0.5, 0.95, 0.99), parse_span("1d"), True),
        ]
        print(f"one metric (trace.duration_ms), one value (operation_type=chat), {args.days} days of hour rows; "
              f"median of {args.runs} runs")
        print(f"{'query':<32} {'rows':>5} {'windows':>8} {'PostgreSQL ms':>14} {'client ms':>10}")
        with psycopg.connect(url, autocommit=True) as conn:
            for label, qs, rollup, digests in cases:
                q = DashboardQuery("trace.duration_ms", "hour", "operation_type", "chat", lo, hi, with_digest=digests)
                fetch_rows(conn, q)  # warm the cache, as a dashboard refreshing the same panel does
                server, client, windows = timed(conn, q, qs, rollup, args.runs)
                print(f"{label:<32} {len(fetch_rows(conn, q)):>5} {windows:>8} {server:>14.2f} {client:>10.2f}")
            plan = explain(conn, DashboardQuery("trace.duration_ms", "hour", "operation_type", "chat", lo, hi, False))
            print(f"plan: {plan.splitlines()[0].split('  (')[0].strip()} ... "
                  f"{'uses ' + INDEX_NAME if INDEX_NAME in plan else 'DOES NOT USE ' + INDEX_NAME}")
        cmd = ["stream-agg", "query", "--metric", "trace.duration_ms", "--dimension", "operation_type", "--value",
               "chat", "--start", START.isoformat(), "--end", datetime.fromtimestamp(hi, UTC).isoformat(),
               "--format", "csv"]
        env = {**os.environ, "STREAM_AGG_DATABASE_URL": url}
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        print(f"CLI, one run as typed (Python start-up included): {wall:.2f} s; it reports: {out.stderr.strip()}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
