"""`stream-agg devstack`: a local broker and PostgreSQL until Ctrl-C, no Docker needed.

It prints `export STREAM_AGG_...=...` lines for other shells (worker, produce, demo) and
stops everything it started on Ctrl-C or SIGTERM, so nothing is left running.
"""

from __future__ import annotations

import shlex
import signal
import sys
import time
from types import FrameType

import click

from stream_agg.devstack import DevStack


def _progress(message: str) -> None:
    click.echo(f"devstack: {message}", err=True)


@click.command("devstack")
@click.option("--kafka-port", type=click.IntRange(1, 65535), default=None,
              help="Port of the embedded broker (default: a free port).")
@click.option("--pg-port", type=click.IntRange(1, 65535), default=None,
              help="Port of an embedded PostgreSQL (implies --embedded-postgres).")
@click.option("--embedded-postgres/--auto", "embedded_postgres", default=False,
              show_default=True,
              help="Always start an embedded PostgreSQL, or (--auto) use 127.0.0.1:5432 "
                   "when it answers and start one only otherwise.")
def command(kafka_port: int | None, pg_port: int | None, embedded_postgres: bool) -> None:
    """Run a Kafka-compatible broker and PostgreSQL for development until Ctrl-C."""
    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    # Installed before anything starts, so a signal during startup still cleans up.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    stack = DevStack(kafka_port=kafka_port, pg_port=pg_port,
                     embedded_postgres=embedded_postgres, progress=_progress)
    failed = False
    try:
        try:
            stack.start()
        except (RuntimeError, TimeoutError, OSError) as exc:
            raise click.ClickException(str(exc)) from exc
        for name, value in stack.env().items():
            click.echo(f"export {name}={shlex.quote(value)}")
        sys.stdout.flush()
        _progress("running; press Ctrl-C to stop")
        while not stopping:
            time.sleep(0.2)
            if stopping:
                # Ctrl-C in a terminal signals the services too; their exit is expected.
                break
            dead = stack.dead_services()
            if dead:
                _progress(f"{' and '.join(dead)} exited unexpectedly; stopping")
                failed = True
                break
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _progress("stopped")
    if failed:
        sys.exit(1)
