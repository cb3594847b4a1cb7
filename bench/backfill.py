"""Backfill benchmark: 1,000,000 synthetic traces (with spans) over 30 days -> `stream-agg backfill`.

Loads `stream_agg.synthetic` traces into `traces` / `spans` of a fresh database, then, in
the same run and on the same data:

1. the backfill for all granularities, exactly as the CLI runs it (digests included);
2. the same backfill again on a cleared table with `digest` left NULL, to measure what
   building the digests costs;
3. a re-run over the stored rows (nothing to rewrite);
4. the naive way of the old batch job: one query per (granularity, bucket, dimension
   value) computing that value's metrics. Running all of those would take far too long,
   so a random sample per granularity is timed and extrapolated linearly to that
   granularity's number of queries (the output says so).

    python bench/backfill.py                  # 1,000,000 traces over 30 days
    python bench/backfill.py --traces 100000 --days 7 --naive-seconds 10

Needs a PostgreSQL server: STREAM_AGG_DATABASE_URL (its maintenance database) or the local
one on 127.0.0.1:5432; a database `stream_agg_bench_<random>` is created and dropped.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import psycopg

from stream_agg.core.buckets import GRANULARITIES, SPAN, to_datetime
from stream_agg.core.registry import DIMENSIONS, LEVEL_SQL, default_registry
from stream_agg.devstack import LOCAL_POSTGRES_URL
from stream_agg.ops.backfill import make_plan, run_backfill
from stream_agg.store.backfill_sql import bucket_sql
from stream_agg.store.db import scratch_database
from stream_agg.store.schema import migrate
from stream_agg.synthetic import iter_events

TARGET_SECONDS = 60.0
START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday


def load(url: str, n: int, days: float, seed: int) -> tuple[int, int, float]:
    """COPY n synthetic traces and their spans; returns (traces, spans, seconds)."""
    t0 = time.perf_counter()
    traces = spans = 0
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        span_rows = []
        with cur.copy("COPY traces (trace_id, operation_type, started_at, duration_ms, status, user_id, "
                      "kb_id, total_tokens) FROM STDIN") as copy:
            for e in iter_events(n, seed, START, days * 24):
                copy.write_row((e["trace_id"], e["operation_type"], e["started_at"], e["duration_ms"],
                                e["status"], e["user_id"], e["kb_id"], e["total_tokens"]))
                traces += 1
                for s in e["spans"]:
                    span_rows.append((e["trace_id"], s["span_id"], s["kind"], s.get("model"), s["duration_ms"],
                                      s["input_tokens"], s["output_tokens"], s["status"], e["started_at"],
                                      e["operation_type"]))
        with cur.copy("COPY spans (trace_id, span_id, kind, model, duration_ms, input_tokens, output_tokens, "
                      "status, started_at, operation_type) FROM STDIN") as copy:
            for row in span_rows:
                copy.write_row(row)
                spans += 1
        conn.commit()
        conn.autocommit = True
        cur.execute("VACUUM ANALYZE traces")
        cur.execute("VACUUM ANALYZE spans")
    return traces, spans, time.perf_counter() - t0


NaiveKey = tuple[str, int, str, str, str]  # (granularity, bucket, level, dimension, value)


def naive_keys(url: str, start: int, end: int) -> dict[str, list[NaiveKey]]:
    """Per granularity, every (bucket, level, dimension, value) the old job would query."""
    registry = default_registry()
    out: dict[str, list[NaiveKey]] = {g: [] for g in GRANULARITIES}
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        for g in GRANULARITIES:
            for level in ("trace", "llm"):
                table, row_filter = LEVEL_SQL[level]
                for dim in registry.dimensions_of(level):
                    d = DIMENSIONS[dim]
                    cur.execute(f"SELECT DISTINCT {bucket_sql(g)}, ({d.sql})::text FROM {table} r "
                                f"WHERE r.started_at >= %s AND r.started_at < %s AND ({row_filter}) "
                                f"AND ({d.sql}) IS NOT NULL", (to_datetime(start), to_datetime(end)))
                    out[g] += [(g, int(t.timestamp()), level, dim, v) for t, v in cur.fetchall()]
    return out


def naive_query(cur: psycopg.Cursor, key: NaiveKey) -> None:
    """The old job's shape: one query per bucket and dimension value, all its metrics (no cap)."""
    g, bucket, level, dim, value = key
    registry = default_registry()
    table, row_filter = LEVEL_SQL[level]
    cols = []
    for m in registry.by_level(level):  # type: ignore[arg-type]
        if dim in m.dimensions:
            v = f"({m.sql})::float8"
            cols += [f"count({v})", f"sum({v})", f"min({v})", f"max({v})", f"avg({v})"]
            if m.digest:
                cols.append(f"percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY {v})")
    t = to_datetime(bucket)
    cur.execute(f"SELECT {', '.join(cols)} FROM {table} r WHERE r.started_at >= %s AND r.started_at < %s "
                f"AND ({row_filter}) AND ({DIMENSIONS[dim].sql})::text = %s",
                (t, t + timedelta(seconds=SPAN[g]), value))
    cur.fetchall()


def naive_baseline(url: str, keys: dict[str, list[NaiveKey]], budget: float, seed: int) -> tuple[float, str]:
    """Extrapolated seconds for all naive queries, and how it was measured."""
    rng = random.Random(seed)
    total = 0.0
    notes = []
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SET jit = off")
        for g in GRANULARITIES:
            sample = rng.sample(keys[g], min(len(keys[g]), 2000))
            t0 = time.perf_counter()
            done = 0
            for key in sample:
                naive_query(cur, key)
                done += 1
                if time.perf_counter() - t0 > budget / len(GRANULARITIES):
                    break
            spent = time.perf_counter() - t0
            est = spent / done * len(keys[g])
            total += est
            notes.append(f"{g}: {done:,} of {len(keys[g]):,} queries in {spent:.1f} s -> {est:,.0f} s")
    return total, "; ".join(notes)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--traces", type=int, default=1_000_000)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--jobs", type=int, default=2, help="chunks computed at once")
    ap.add_argument("--naive-seconds", type=float, default=30.0, help="time budget of the sampled naive baseline")
    ap.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = ap.parse_args()

    server = os.environ.get("STREAM_AGG_DATABASE_URL", LOCAL_POSTGRES_URL)
    with scratch_database(server, "stream_agg_bench", keep=args.keep) as url:
        try:
            return run(url, args)
        finally:
            if args.keep:
                print(f"kept database {url}")


def cpu_seconds() -> float:
    """CPU time of this machine so far (all processes), to show how busy it was."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class BackendCpu:
    """CPU seconds of the PostgreSQL backends serving one database, sampled from /proc.

    The machine may be shared with other work, which stretches wall-clock times; the CPU the
    backfill itself used (client + its backends) does not depend on that.
    """

    def __init__(self, database: str) -> None:
        self.tag = f" {database} "
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if self.tag not in f.read().decode(errors="replace").replace("\0", " "):
                        continue
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            used = (float(fields[11]) + float(fields[12])) / tick
            self.seen[int(pid)] = max(self.seen.get(int(pid), 0.0), used)

    def _loop(self) -> None:
        while not self.stop.wait(0.1):
            self._sample()

    def __enter__(self) -> BackendCpu:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def seconds(self) -> float:
        return sum(self.seen.values())


def run(url: str, args: argparse.Namespace) -> int:
    migrate(url)
    n_traces, n_spans, load_s = load(url, args.traces, args.days, args.seed)
    print(f"loaded {n_traces:,} traces and {n_spans:,} spans over {args.days:g} days in {load_s:.1f} s "
          f"(PostgreSQL {psycopg.connect(url).info.server_version}, {os.cpu_count()} CPUs)")

    # Late events reach back up to 6 days: start a week early, widened to whole weeks.
    registry = default_registry()
    plan = make_plan(registry, GRANULARITIES, START - timedelta(days=7), START + timedelta(days=args.days),
                     jobs=args.jobs)
    print(f"range {to_datetime(plan.start):%Y-%m-%d} .. {to_datetime(plan.end):%Y-%m-%d}, all granularities, "
          f"{len(plan.chunks)} week chunks, jobs={plan.jobs}")

    load_before = os.getloadavg()[0]
    cpu0, wall0, own0 = cpu_seconds(), time.perf_counter(), time.process_time()
    with BackendCpu(urlsplit(url).path.lstrip("/")) as backends:
        summary = run_backfill(url, plan)
    busy = (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    client_cpu = time.process_time() - own0
    used = client_cpu + backends.seconds
    rows = sum(summary.rows.values())
    raw = summary.total("raw_rows")
    print(summary.describe())
    print(f"  machine: load average {load_before:.2f} before the run; {busy:.2f} of {os.cpu_count()} CPUs busy "
          f"during it (all processes, other sessions' work included)")
    print(f"  CPU used by this backfill: client {client_cpu:.1f} s + PostgreSQL backends {backends.seconds:.1f} s "
          f"= {used:.1f} s -> at least {used / (os.cpu_count() or 1):.1f} s of wall time on an idle "
          f"{os.cpu_count()}-CPU machine")

    again = run_backfill(url, plan)
    print(f"re-run over stored rows: {again.total('unchanged'):,} of {sum(again.rows.values()):,} rows unchanged, "
          f"nothing rewritten, {again.seconds:.2f} s")

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE metrics_aggregates")
    bare = run_backfill(url, make_plan(registry, GRANULARITIES, START - timedelta(days=7),
                                       START + timedelta(days=args.days), jobs=args.jobs, digests=False))
    print(f"same backfill without digests (digest NULL): {bare.seconds:.2f} s -> digests cost "
          f"{summary.seconds - bare.seconds:+.2f} s ({(summary.seconds / bare.seconds - 1) * 100:+.0f}%)")

    keys = naive_keys(url, plan.start, plan.end)
    naive_s, how = naive_baseline(url, keys, args.naive_seconds, args.seed)
    n_naive = sum(len(v) for v in keys.values())
    print(f"naive baseline (one query per bucket and dimension value, no cap): {n_naive:,} queries, timed on a "
          f"random sample per granularity and extrapolated linearly: {how}")

    print()
    print(f"backfill of {n_traces:,} traces ({raw:,} raw rows incl. llm spans): {summary.seconds:.2f} s, "
          f"{raw / summary.seconds:,.0f} raw rows/s, {rows:,} rows written ({rows / summary.seconds:,.0f} rows/s)")
    print(f"naive baseline (extrapolated): {naive_s:,.0f} s -> backfill is {naive_s / summary.seconds:,.0f}x faster")
    ok = summary.seconds <= TARGET_SECONDS
    print(f"target: full backfill of 1,000,000 traces <= {TARGET_SECONDS:.0f} s: "
          f"{'met' if ok else 'MISSED'} ({summary.seconds:.1f} s wall, {used:.1f} CPU-s)")
    return 0 if ok or args.traces != 1_000_000 else 1


if __name__ == "__main__":
    sys.exit(main())
