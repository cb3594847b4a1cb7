"""The worker's Faust consumer keeps fetching every partition when the stream buffer fills.

Faust's own consumer drops a partition from its fetch set under buffer pressure, and its
fetch loop then sleeps a full second once no partition is left; behind a slower fold
that stalled the agent for up to 1 s every few batches. Ours leaves the bound to the
buffer's blocking `put`.
"""

from __future__ import annotations

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from stream_agg.config import load_config
from stream_agg.kafka.worker import BoundedBufferConsumer, build_app


def _consumer() -> faust_aiokafka.Consumer:
    app = build_app(load_config({"STREAM_AGG_KAFKA_BOOTSTRAP": "127.0.0.1:9", "STREAM_AGG_TOPIC": "t"}))
    return app.consumer  # built lazily, no connection made


def test_buffer_pressure_keeps_partitions_fetchable() -> None:
    consumer = _consumer()
    assert isinstance(consumer, BoundedBufferConsumer)
    tps = {TP("t", 0), TP("t", 1)}
    consumer._active_partitions = set(tps)
    for tp in tps:
        consumer.on_buffer_full(tp)
    assert consumer._active_partitions == tps
    assert not consumer._buffered_partitions


def test_faust_default_would_leave_nothing_to_fetch() -> None:
    """What the override is for: with Faust's method, a full buffer empties the fetch set."""
    consumer = _consumer()
    tps = {TP("t", 0), TP("t", 1)}
    consumer._active_partitions = set(tps)
    for tp in tps:
        faust_aiokafka.Consumer.on_buffer_full(consumer, tp)
    assert consumer._active_partitions == set()
    assert consumer._buffered_partitions == tps
