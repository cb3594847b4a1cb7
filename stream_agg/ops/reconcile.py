"""Scheduled reconcile: backfill the recently closed buckets, the safety net of the stream.

It replaces the old hourly Celery beat job (minute 5) without Celery: a loop in one process
(`--every 1h`) or a cron-friendly one-shot (`--once`). Each run recomputes, per requested
granularity, the buckets that are closed (end + grace <= now) and overlap the last
`lookback`: [now - lookback, now - grace] widened to whole hours / days / weeks. Open
buckets are never touched, because the stream does not overwrite a backfilled row.

Job health goes to Prometheus under job="reconcile": run duration, raw rows read, time of
the last success; served over HTTP in loop mode, written as a node_exporter textfile or
pushed to a Pushgateway after a one-shot run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from stream_agg.core.buckets import bucket_start, to_datetime
from stream_agg.core.registry import Registry
from stream_agg.observability import Metrics
from stream_agg.ops.backfill import BackfillSummary, iso, make_plan, require_tables, run_backfill
from stream_agg.store.db import connect
from stream_agg.store.schema import SchemaTooNewError

log = logging.getLogger(__name__)

JOB = "reconcile"


@dataclass(frozen=True)
class Window:
    granularity: str
    start: int
    end: int


def closed_windows(now: float, lookback: float, grace: float, granularities: Sequence[str]) -> list[Window]:
    """Per granularity, the closed buckets overlapping [now - lookback, now - grace]."""
    out = []
    for g in granularities:
        lo = bucket_start(now - lookback, g)
        hi = bucket_start(now - grace, g)  # buckets ending here or earlier are closed
        if hi > lo:
            out.append(Window(g, lo, hi))
    return out


@dataclass
class RunReport:
    now: float
    summaries: list[BackfillSummary]
    seconds: float

    @property
    def raw_rows(self) -> int:
        return sum(s.total("raw_rows") for s in self.summaries)

    def describe(self) -> str:
        if not self.summaries:
            return f"reconcile at {iso(self.now)}: no closed bucket in the window"
        parts = [f"{s.plan.granularities[0]} {iso(s.plan.start)} .. {iso(s.plan.end)}: "
                 f"{sum(s.rows.values()):,} rows ({s.total('unchanged'):,} unchanged)" for s in self.summaries]
        return (f"reconcile at {iso(self.now)}: " + "; ".join(parts)
                + f"; {self.raw_rows:,} raw rows in {self.seconds:.2f} s")


def run_once(url: str, registry: Registry, granularities: Sequence[str], lookback: float, grace: float,
             metrics: Metrics, now: float | None = None, jobs: int = 2) -> RunReport:
    """One reconcile run; records job health in `metrics` when it succeeds."""
    now = time.time() if now is None else now
    started = time.perf_counter()
    with connect(url) as conn:  # a loop outlives deploys: a newer stream-agg may have migrated meanwhile
        require_tables(conn)
    summaries = []
    for w in closed_windows(now, lookback, grace, granularities):
        plan = make_plan(registry, (w.granularity,), to_datetime(w.start), to_datetime(w.end), jobs=jobs)
        summaries.append(run_backfill(url, plan))
    report = RunReport(now, summaries, time.perf_counter() - started)
    metrics.observe_run(report.seconds, report.raw_rows)
    return report


def run_loop(url: str, registry: Registry, granularities: Sequence[str], lookback: float, grace: float,
             every: float, metrics: Metrics, stop: threading.Event, jobs: int = 2) -> int:
    """Run now, then every `every` seconds, until `stop` is set; returns the runs that failed.

    A failed run (PostgreSQL down...) is logged and retried at the next tick; job health
    then shows it as a stale `observability_aggregation_last_success`.
    """
    failures = 0
    next_run = time.monotonic()
    while not stop.is_set():
        try:
            report = run_once(url, registry, granularities, lookback, grace, metrics, jobs=jobs)
            log.info("%s", report.describe())
        except SchemaTooNewError:
            raise  # not a failed run: this version must not write there any more
        except Exception as exc:  # noqa: BLE001 - the loop outlives a failed run
            from stream_agg.store.db import describe_db_error

            failures += 1
            log.error("reconcile run failed: %s; next try in %.0f s", describe_db_error(exc), every)
        next_run += every
        stop.wait(max(0.0, next_run - time.monotonic()))
    return failures
