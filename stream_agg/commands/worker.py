"""`stream-agg worker`: the streaming aggregator (Faust app), one process per worker."""

from __future__ import annotations

import logging
import signal
import sys

import click

from stream_agg.config import ConfigError, load_config, redact_url

log = logging.getLogger("stream_agg.worker")


@click.command("worker")
@click.option("--bootstrap", help="Kafka bootstrap servers (overrides STREAM_AGG_KAFKA_BOOTSTRAP).")
@click.option("--database-url", help="PostgreSQL URL (overrides STREAM_AGG_DATABASE_URL).")
@click.option("--topic", help="Source topic (overrides STREAM_AGG_TOPIC).")
@click.option("--group-id", help="Consumer group (overrides STREAM_AGG_GROUP_ID).")
@click.option("--metrics-port", type=int, help="Prometheus port, 0 = off (overrides STREAM_AGG_METRICS_PORT).")
@click.option("--flush-interval", help="e.g. 5s (overrides STREAM_AGG_FLUSH_INTERVAL).")
@click.option("--archive/--no-archive", default=None, help="Write raw traces/spans (STREAM_AGG_ARCHIVE).")
def command(bootstrap: str | None, database_url: str | None, topic: str | None, group_id: str | None,
            metrics_port: int | None, flush_interval: str | None, archive: bool | None) -> None:
    """Consume trace events and keep metrics_aggregates current.

    Checks the broker and the database first (exit 2 with one line if either is
    unreachable), creates missing topics, migrates the schema, serves /metrics, then
    runs until SIGTERM / Ctrl-C, flushing before it exits.
    """
    # Until Faust installs its own handlers, SIGTERM means "nothing consumed yet, exit cleanly".
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from stream_agg.kafka.admin import BrokerUnavailable, ensure_topics, partition_count
    from stream_agg.store.db import describe_db_error
    from stream_agg.store.schema import SchemaTooNewError, migrate

    try:
        config = load_config(kafka_bootstrap=bootstrap, database_url=database_url, topic=topic,
                             group_id=group_id, metrics_port=metrics_port, flush_interval=flush_interval,
                             archive=archive)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    log.info("starting worker with %s", config.redacted())
    try:
        ensure_topics(config.kafka_bootstrap, {config.topic: config.partitions, config.dlq: 1},
                      replication_factor=-1, strict=False)
        partitions = partition_count(config.kafka_bootstrap, config.topic)
    except (BrokerUnavailable, TimeoutError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    try:
        migrate(config.database_url)
    except SchemaTooNewError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - one clear line
        click.echo(f"error: cannot reach PostgreSQL at {redact_url(config.database_url)}: "
                   f"{describe_db_error(exc)}", err=True)
        sys.exit(2)
    run_worker(config, partitions)


def run_worker(config: object, topic_partitions: int | None = None) -> None:
    """Run the Faust worker in this process until it is stopped."""
    import faust

    from stream_agg.kafka.worker import WorkerShell

    shell = WorkerShell(config, topic_partitions=topic_partitions)  # type: ignore[arg-type]
    if shell.config.metrics_port:
        shell.metrics.serve(shell.config.metrics_port)
        log.info("metrics on http://0.0.0.0:%d/metrics", shell.config.metrics_port)
    worker = faust.Worker(shell.app, loglevel=shell.config.log_level, override_logging=False,
                          redirect_stdouts=False, quiet=True)
    # Faust always makes a progress spinner, whose finish() writes a "show cursor" escape
    # (ESC [?25h) to stdout even when that is a log file; the worker logs, it does not spin.
    worker.spinner = None
    for noisy in ("aiokafka", "kafka", "faust", "mode"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from stream_agg.kafka.gc_tuning import tune_gc

    tune_gc()
    worker.execute_from_commandline()
