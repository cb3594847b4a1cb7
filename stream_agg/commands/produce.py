"""`stream-agg produce`: publish trace events from a JSON Lines file or the synthetic workload.

Operators use it to load test data, replay an export, or (with `--raw`) push malformed
lines to check that they reach the DLQ; the demo uses `--synthetic` with `--rate`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import BinaryIO

import click
import orjson

from stream_agg.config import ConfigError, load_config
from stream_agg.producer import ProducerError, TraceProducer, ensure_topic

_PACE_SLACK_S = 0.002  # sleep only when this far ahead of schedule: fewer, longer sleeps


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _parse_start(text: str | None, hours: float) -> datetime:
    """ISO 8601 (naive = UTC); default: `hours` before the start of the current UTC hour."""
    if text is None:
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        return now - timedelta(hours=hours)
    try:
        start = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 time: {text!r} (e.g. 2024-05-01T00:00:00Z)",
                                 param_hint="--start") from None
    return start if start.tzinfo is not None else start.replace(tzinfo=UTC)


class _Lines:
    """JSON Lines reader: objects are events; blank lines are skipped; others are counted."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.bad = 0
        self.first_bad_line = 0

    def events(self, keep_bad: bool) -> Iterator[dict | bytes]:
        """Events as dicts; with `keep_bad`, the stripped bad lines too, as bytes."""
        for number, line in enumerate(self.stream, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                value = None
            if isinstance(value, dict):
                yield value
                continue
            self.bad += 1
            self.first_bad_line = self.first_bad_line or number
            if keep_bad:
                yield line


@click.command("produce")
@click.option("--file", "file_", type=click.File("rb"), metavar="PATH",
              help="JSON Lines file, one event per line ('-' = stdin).")
@click.option("--raw", is_flag=True,
              help="Send lines that are not JSON objects as-is, one message each (tests the DLQ).")
@click.option("--synthetic", type=click.IntRange(min=0), metavar="N",
              help="Send N events of the deterministic synthetic workload.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Synthetic: random seed (same seed and options, same events).")
@click.option("--start", metavar="ISO",
              help="Synthetic: first event time, e.g. 2024-05-01T00:00:00Z "
                   "[default: --hours before the current UTC hour].")
@click.option("--hours", type=click.FloatRange(min=0, min_open=True), default=24.0,
              show_default=True, help="Synthetic: event times span [start, start + hours).")
@click.option("--users", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Synthetic: distinct user ids (Zipf-distributed).")
@click.option("--kbs", type=click.IntRange(min=1), default=200, show_default=True,
              help="Synthetic: distinct knowledge-base ids (Zipf-distributed).")
@click.option("--bootstrap", help="Kafka host:port[,host:port]; overrides STREAM_AGG_KAFKA_BOOTSTRAP.")
@click.option("--topic", help="Target topic; overrides STREAM_AGG_TOPIC.")
@click.option("--batch/--no-batch", default=True, show_default=True,
              help="Pack events into JSON-array messages (--no-batch: one message per event, "
                   "keyed by trace_id).")
@click.option("--batch-size", type=click.IntRange(min=1), default=500, show_default=True,
              help="Max events per batch message.")
@click.option("--rate", type=click.FloatRange(min=0), default=0.0, show_default=True,
              metavar="EVENTS_PER_S", help="Pace sending at this many events/s (0 = flat out).")
@click.option("--create-topic/--no-create-topic", default=True, show_default=True,
              help="Create the topic if it does not exist.")
@click.option("--partitions", type=click.IntRange(min=1),
              help="Partitions of a created topic [default: STREAM_AGG_PARTITIONS].")
def command(file_: BinaryIO | None, raw: bool, synthetic: int | None, seed: int,
            start: str | None, hours: float, users: int, kbs: int, bootstrap: str | None,
            topic: str | None, batch: bool, batch_size: int, rate: float, create_topic: bool,
            partitions: int | None) -> None:
    """Publish completed-trace events to the topic and report the throughput."""
    from stream_agg.synthetic import iter_events

    if (file_ is None) == (synthetic is None):
        raise click.UsageError("give exactly one of --file PATH and --synthetic N")
    if raw and file_ is None:
        raise click.UsageError("--raw applies to --file only")
    lines: _Lines | None = None
    source: Iterator[dict | bytes]
    if synthetic is not None:
        source = iter_events(synthetic, seed, _parse_start(start, hours), hours,
                             users=users, kbs=kbs)
    elif file_ is not None:
        lines = _Lines(file_)
        source = lines.events(keep_bad=raw)

    # kafka-python logs every reconnect attempt at ERROR; failures reach the operator as
    # one ProducerError line instead. --log-level DEBUG keeps the client's logs.
    kafka_log = logging.getLogger("kafka")
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        kafka_log.setLevel(logging.CRITICAL)
    try:
        config = load_config(kafka_bootstrap=bootstrap, topic=topic, partitions=partitions)
        if create_topic:
            ensure_topic(config.kafka_bootstrap, config.topic, config.partitions)
        producer = TraceProducer(config.kafka_bootstrap, config.topic,
                                 batch_max_events=batch_size, batching=batch)
    except (ConfigError, ProducerError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)

    raw_sent = 0
    began = time.perf_counter()
    try:
        with producer:
            for count, item in enumerate(source, start=1):
                if isinstance(item, bytes):
                    producer.send_raw(item)
                    raw_sent += 1
                else:
                    producer.send(item)
                if rate > 0:
                    ahead = began + count / rate - time.perf_counter()
                    if ahead > _PACE_SLACK_S:
                        time.sleep(ahead)
            producer.flush()
    except ProducerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(f"interrupted after {producer.sent_events} events", err=True)
        sys.exit(130)
    elapsed = max(time.perf_counter() - began, 1e-9)

    events = producer.sent_events - raw_sent
    raw_part = f" and {_plural(raw_sent, 'raw line')}" if raw_sent else ""
    click.echo(f"sent {_plural(events, 'event')}{raw_part} in "
               f"{_plural(producer.sent_messages, 'message')} to {config.topic} "
               f"({events / elapsed:.0f} events/s)")
    if lines is not None and lines.bad and not raw:
        click.echo(f"skipped {_plural(lines.bad, 'line')} that {'is' if lines.bad == 1 else 'are'}"
                   f" not a JSON object (first: line {lines.first_bad_line}); use --raw to send"
                   " as-is", err=True)
