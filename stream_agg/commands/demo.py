"""`stream-agg demo`: everything started, a stream published and aggregated, watched live."""

from __future__ import annotations

import sys

import click


@click.command("demo")
@click.option("--duration", type=click.FloatRange(min=1), metavar="SECONDS",
              help="Stream for this long, then stop everything and exit 0 [default: until Ctrl-C].")
@click.option("--rate", type=click.FloatRange(min=1, max=50_000), default=500, show_default=True,
              metavar="EVENTS_PER_S", help="Synthetic events per second.")
@click.option("--metrics-port", type=click.IntRange(1, 65535),
              help="Port of the worker's Prometheus metrics [default: 9108 when free, else any free port].")
@click.option("--refresh", type=click.FloatRange(min=0.5), metavar="SECONDS",
              help="Seconds between views [default: 3 on a terminal, 10 for plain-text snapshots].")
@click.option("--keep-data", is_flag=True,
              help="Keep the demo's database (created on a PostgreSQL it found) and, on a given broker, its "
                   "topics; prints the STREAM_AGG_DATABASE_URL to query them.")
@click.option("--embedded-postgres", is_flag=True,
              help="Start an embedded PostgreSQL even when one answers on 127.0.0.1:5432 (ignored with "
                   "STREAM_AGG_DATABASE_URL).")
def command(duration: float | None, rate: float, metrics_port: int | None, refresh: float | None,
            keep_data: bool, embedded_postgres: bool) -> None:
    """Run broker, PostgreSQL, a worker and a synthetic stream; show the current hour live.

    Uses STREAM_AGG_KAFKA_BOOTSTRAP / STREAM_AGG_DATABASE_URL when set; otherwise starts
    an embedded broker and uses PostgreSQL on 127.0.0.1:5432 (in a database of its own)
    or an embedded one. Each run has its own topic and consumer group. Ctrl-C (or the end
    of --duration) stops the producer, lets the worker catch up, prints the final
    numbers and stops everything the demo started.
    """
    from stream_agg.ops.demo import Demo, DemoOptions

    options = DemoOptions(duration=duration, rate=rate, metrics_port=metrics_port, refresh=refresh,
                          keep_data=keep_data, embedded_postgres=embedded_postgres, tty=sys.stdout.isatty())
    sys.exit(Demo(options).run())
