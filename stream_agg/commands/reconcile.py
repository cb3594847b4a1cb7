"""`stream-agg reconcile`: backfill the recently closed buckets on a schedule (replaces the beat job)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any

import click

from stream_agg.commands.backfill import fail, open_database
from stream_agg.config import ConfigError, load_config

log = logging.getLogger("stream_agg.reconcile")


@click.command("reconcile")
@click.option("--every", default="1h", show_default=True, help="Time between runs (loop mode).")
@click.option("--lookback", default="2h", show_default=True,
              help="Recompute closed buckets overlapping the last LOOKBACK.")
@click.option("--once", is_flag=True, help="One run, then exit (for cron / Kubernetes CronJobs).")
@click.option("--granularity", default="all", show_default=True, help="hour, day, week or all.")
@click.option("--metric", "metrics", multiple=True, help="Only this metric (repeatable; default all).")
@click.option("--grace", help="A bucket is closed once now passes its end + this (default STREAM_AGG_GRACE).")
@click.option("--now", "now_text", help="Run as if the clock read this ISO instant (re-run a missed window).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9109, show_default=True,
              help="Loop mode: serve Prometheus metrics on this port (0 = off).")
@click.option("--textfile", type=click.Path(dir_okay=False), help="One-shot: write metrics as a node_exporter "
              "textfile (e.g. /var/lib/node_exporter/textfile/stream_agg_reconcile.prom).")
@click.option("--pushgateway", help="One-shot: push metrics to this Pushgateway URL (job=reconcile).")
@click.option("--jobs", type=click.IntRange(1, 16), default=2, show_default=True, help="Chunks computed at once.")
@click.option("--yes", is_flag=True, help="Accept a lookback longer than STREAM_AGG_MAX_RANGE.")
@click.option("--database-url", help="Overrides STREAM_AGG_DATABASE_URL.")
def command(every: str, lookback: str, once: bool, granularity: str, metrics: tuple[str, ...], grace: str | None,
            now_text: str | None, metrics_port: int, textfile: str | None, pushgateway: str | None, jobs: int,
            yes: bool, database_url: str | None) -> None:
    """Backfill the buckets that closed within the last LOOKBACK, once or every EVERY.

    Each run recomputes [now - lookback, now - grace] widened to whole hours / days /
    weeks, closed buckets only, exactly as `stream-agg backfill` does (identical rows are
    not rewritten). Job health: observability_aggregation_duration_seconds,
    observability_aggregation_records_processed_total and
    observability_aggregation_last_success with job="reconcile".
    """
    from stream_agg.observability import Metrics
    from stream_agg.ops.backfill import OpsError, parse_duration, parse_granularity, parse_time, select_registry
    from stream_agg.ops.reconcile import JOB, run_loop, run_once
    from stream_agg.store.db import describe_db_error
    from stream_agg.store.schema import SchemaTooNewError

    try:
        config = load_config(database_url=database_url)
        period = parse_duration(every, "--every")
        window = parse_duration(lookback, "--lookback")
        closed_after = config.grace if grace is None else parse_duration(grace, "--grace")
        grans = parse_granularity(granularity)
        registry = select_registry(config.cardinality_caps, metrics)
        now = parse_time(now_text).timestamp() if now_text else None
        if period <= 0 or window <= 0:
            raise OpsError("--every and --lookback must be > 0")
        if window <= closed_after:
            raise OpsError(f"--lookback {lookback} must be longer than the grace ({closed_after:g} s): "
                           "no bucket would ever be closed inside it")
        if window > config.max_range and not yes:
            raise OpsError(f"--lookback {lookback} is longer than the maximum range ({config.max_range:g} s, "
                           "STREAM_AGG_MAX_RANGE); pass --yes to run it anyway")
        if not once and (textfile or pushgateway or now_text):
            raise OpsError("--textfile, --pushgateway and --now go with --once (loop mode serves --metrics-port)")
    except (ConfigError, OpsError) as exc:
        fail(str(exc))
    open_database(config)
    job_metrics = Metrics(job=JOB)

    if once:
        try:
            report = run_once(config.database_url, registry, grans, window, closed_after, job_metrics, now=now,
                              jobs=jobs)
        except Exception as exc:  # noqa: BLE001 - one line for cron mail
            fail(f"reconcile failed: {describe_db_error(exc)}")
        click.echo(report.describe())
        _export(job_metrics, textfile, pushgateway)
        return

    if metrics_port:
        job_metrics.serve(metrics_port)
        log.info("metrics on http://0.0.0.0:%d/metrics", metrics_port)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping after the current run", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("reconcile every %s, lookback %s, granularities %s", every, lookback, ", ".join(grans))
    try:
        run_loop(config.database_url, registry, grans, window, closed_after, period, job_metrics, stop, jobs=jobs)
    except SchemaTooNewError as exc:
        fail(str(exc))
    sys.exit(0)


def _export(job_metrics: Any, textfile: str | None, pushgateway: str | None) -> None:
    """After a one-shot run: the textfile and / or the Pushgateway; a failure is one line, exit 2."""
    from prometheus_client import push_to_gateway

    from stream_agg.ops.reconcile import JOB

    if textfile:
        try:
            job_metrics.write_textfile(textfile)
        except OSError as exc:
            fail(f"cannot write {textfile}: {exc.strerror or exc}")
    if pushgateway:
        try:
            push_to_gateway(pushgateway, job=JOB, registry=job_metrics.registry, timeout=10)
        except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, OSError...
            fail(f"cannot push to {pushgateway}: {exc}")
