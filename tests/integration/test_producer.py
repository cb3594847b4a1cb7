"""TraceProducer and `stream-agg produce` against a real broker: what is sent is what is stored."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from stream_agg.devstack import EmbeddedBroker, ensure_topics, free_port
from stream_agg.events import TraceEvent, decode_message
from stream_agg.producer import ProducerError, TraceProducer
from stream_agg.synthetic import generate_events

START = datetime(2024, 5, 1, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]


def read_topic(bootstrap: str, topic: str, timeout: float = 20.0) -> list:
    """Every record now in `topic` (all partitions, from the beginning)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             group_id=None)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        records: list = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end[tp] for tp in parts):
            assert time.monotonic() < deadline, "topic not fully read in time"
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def events_of(records: list) -> list[dict]:
    """Events in the records, each message being one event or a JSON array of events."""
    out: list[dict] = []
    for r in records:
        value = orjson.loads(r.value)
        out.extend(value if isinstance(value, list) else [value])
    return out


def by_id(events: list[dict]) -> dict[str, dict]:
    return {e["trace_id"]: e for e in events}


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from stream_agg.cli import main; main()", *args],
        input=stdin, capture_output=True, cwd=REPO, timeout=120)


def test_batched_events_arrive_exactly_in_bounded_messages(broker_bootstrap, topic):
    sent = generate_events(3000, 5, START, 2)
    with TraceProducer(broker_bootstrap, topic, batch_max_events=200) as producer:
        assert producer.send_many(sent) == 3000
        producer.flush()
        assert producer.sent_events == 3000
        messages = producer.sent_messages
    records = read_topic(broker_bootstrap, topic)
    assert len(records) == messages >= 15
    assert all(r.key is None for r in records)
    for r in records:
        batch = orjson.loads(r.value)
        assert isinstance(batch, list) and 1 <= len(batch) <= 200
        decoded = decode_message(r.value)  # what the worker will see
        assert not decoded.rejects and len(decoded.events) == len(batch)
    assert len({r.partition for r in records}) > 1  # keyless batches spread out
    received = events_of(records)
    assert len(received) == 3000
    assert by_id(received) == by_id(sent)


def test_batches_stay_under_the_byte_limit(broker_bootstrap, topic):
    sent = generate_events(2000, 6, START, 2)
    limit = 20_000
    with TraceProducer(broker_bootstrap, topic, batch_max_bytes=limit, linger_s=5) as producer:
        producer.send_many(sent)
        producer.flush()
    records = read_topic(broker_bootstrap, topic)
    sizes = [len(r.value) for r in records]
    largest_event = max(len(orjson.dumps(e)) for e in sent)
    assert max(sizes) <= limit
    # Each batch was closed only because the next event would not fit.
    total = sum(len(orjson.dumps(e)) + 1 for e in sent) + len(records)
    assert len(records) <= total // (limit - largest_event) + 1
    assert by_id(events_of(records)) == by_id(sent)


def test_unbatched_events_are_keyed_by_trace_id(broker_bootstrap, topic):
    sent = generate_events(500, 7, START, 1)
    with TraceProducer(broker_bootstrap, topic, batching=False) as producer:
        producer.send_many(sent)
        producer.flush()
        assert (producer.sent_events, producer.sent_messages) == (500, 500)
    records = read_topic(broker_bootstrap, topic)
    assert len(records) == 500
    for r in records:
        event = orjson.loads(r.value)
        assert isinstance(event, dict)
        assert r.key == event["trace_id"].encode()
        # The Java client's partitioning: murmur2(key) mod partitions.
        assert r.partition == (murmur2(r.key) & 0x7FFFFFFF) % 4
    assert by_id(events_of(records)) == by_id(sent)


def test_a_lone_event_is_delivered_by_linger_without_flush(broker_bootstrap, topic):
    event = generate_events(1, 8, START, 1)[0]
    consumer = KafkaConsumer(bootstrap_servers=broker_bootstrap, group_id=None,
                             enable_auto_commit=False)
    parts = [TopicPartition(topic, p) for p in range(4)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    producer = TraceProducer(broker_bootstrap, topic, linger_s=0.05)
    try:
        began = time.monotonic()
        producer.send(event)
        got: list = []
        while not got and time.monotonic() - began < 5:
            for batch in consumer.poll(timeout_ms=100).values():
                got.extend(batch)
        waited = time.monotonic() - began
        assert [orjson.loads(r.value) for r in got] == [[event]]
        assert waited < 1.0
        assert producer.sent_events == 1
    finally:
        producer.close()
        consumer.close()


class SpanStruct(msgspec.Struct):
    span_id: str
    kind: str
    duration_ms: float


class EventStruct(msgspec.Struct):
    schema_version: int
    trace_id: str
    operation_type: str
    started_at: datetime
    duration_ms: float
    status: str
    spans: list[SpanStruct]


def test_msgspec_structs_and_datetimes_are_serialized_as_rfc3339(broker_bootstrap, topic):
    struct = EventStruct(1, "t-struct", "chat", datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
                         12.5, "ok", [SpanStruct("s1", "tool", 3.0)])
    as_dict = {"schema_version": 1, "trace_id": "t-naive", "operation_type": "chat",
               "started_at": datetime(2024, 5, 1, 12, 30), "duration_ms": 1.0, "status": "ok"}
    with TraceProducer(broker_bootstrap, topic, batching=False) as producer:
        producer.send(struct)
        producer.send(as_dict)
    got = by_id(events_of(read_topic(broker_bootstrap, topic)))
    assert got["t-struct"] == {"schema_version": 1, "trace_id": "t-struct",
                               "operation_type": "chat", "started_at": "2024-05-01T12:30:00Z",
                               "duration_ms": 12.5, "status": "ok",
                               "spans": [{"span_id": "s1", "kind": "tool", "duration_ms": 3.0}]}
    assert got["t-naive"]["started_at"] == "2024-05-01T12:30:00Z"


def test_trace_event_structs_round_trip_through_the_consumers_decoder(broker_bootstrap, topic):
    sent = decode_message(orjson.dumps(generate_events(300, 10, START, 1))).events
    assert len(sent) == 300 and isinstance(sent[0], TraceEvent)
    with TraceProducer(broker_bootstrap, topic, batch_max_events=64) as producer:
        producer.send_many(sent)
    received = [e for r in read_topic(broker_bootstrap, topic) for e in decode_message(r.value).events]
    assert sorted(received, key=lambda e: e.trace_id) == sorted(sent, key=lambda e: e.trace_id)
    # Same instant and same offset as sent, not just an equal instant.
    offsets = {e.trace_id: e.started_at.utcoffset() for e in received}
    assert offsets == {e.trace_id: e.started_at.utcoffset() for e in sent}


def test_unreachable_broker_fails_fast_with_the_address():
    address = f"127.0.0.1:{free_port()}"
    began = time.monotonic()
    with pytest.raises(ProducerError, match=address):
        TraceProducer(address, "traces.completed")
    assert time.monotonic() - began < 12


def test_oversized_event_is_refused_at_send(broker_bootstrap, topic):
    event = dict(generate_events(1, 9, START, 1)[0], note="x" * 2_000_000)
    with TraceProducer(broker_bootstrap, topic) as producer:
        with pytest.raises(ProducerError, match=topic):
            producer.send(event)
        assert producer.failed_events == 1


def test_delivery_failure_surfaces_at_flush():
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, {"dies": 1})
        producer = TraceProducer(broker.bootstrap, "dies", batching=False,
                                 request_timeout_ms=1000, delivery_timeout_ms=3000,
                                 linger_ms=0)
        producer.send(generate_events(1, 1, START, 1)[0])
        producer.flush()
        broker.stop()
        producer.send_many(generate_events(10, 2, START, 1))
        began = time.monotonic()
        with pytest.raises(ProducerError, match="not delivered to dies"):
            producer.flush(timeout=20)
        assert time.monotonic() - began < 15
        assert producer.sent_events == 1
        assert producer.failed_events == 10
        producer.close(timeout=1)


def test_cli_synthetic_sends_exactly_the_generated_events(broker_bootstrap, topic):
    done = run_cli("produce", "--synthetic", "1000", "--seed", "1", "--start",
                   "2024-05-01T00:00:00Z", "--hours", "2", "--bootstrap", broker_bootstrap,
                   "--topic", topic)
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    assert out.startswith("sent 1000 events in ") and f" to {topic} (" in out
    assert by_id(events_of(read_topic(broker_bootstrap, topic))) == by_id(
        generate_events(1000, 1, START, 2))


def test_cli_reads_stdin_and_reports_bad_lines(broker_bootstrap, topic):
    sent = generate_events(50, 3, START, 1)
    lines = [orjson.dumps(e) for e in sent]
    stdin = b"\n".join(lines[:20] + [b"", b"not json {", b"   "] + lines[20:]) + b"\n"
    done = run_cli("produce", "--file", "-", "--no-batch", "--bootstrap", broker_bootstrap,
                   "--topic", topic, stdin=stdin)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().startswith(f"sent 50 events in 50 messages to {topic} (")
    assert "skipped 1 line that is not a JSON object (first: line 22)" in done.stderr.decode()
    records = read_topic(broker_bootstrap, topic)
    assert sorted(r.key for r in records) == sorted(e["trace_id"].encode() for e in sent)
    assert by_id(events_of(records)) == by_id(sent)


def test_cli_raw_sends_bad_lines_as_is(broker_bootstrap, topic, tmp_path):
    good = generate_events(3, 4, START, 1)
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join([orjson.dumps(good[0]), b"{broken", b"[1, 2]",
                                 orjson.dumps(good[1]), orjson.dumps(good[2])]))
    done = run_cli("produce", "--file", str(path), "--raw", "--bootstrap", broker_bootstrap,
                   "--topic", topic)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().startswith("sent 3 events and 2 raw lines in ")
    values = [r.value for r in read_topic(broker_bootstrap, topic)]
    assert sorted(v for v in values if not v.startswith(b"[{")) == [b"[1, 2]", b"{broken"]
    batches = [orjson.loads(v) for v in values if v.startswith(b"[{")]
    assert by_id([e for b in batches for e in b]) == by_id(good)


def test_cli_creates_a_missing_topic(broker_bootstrap, topic):
    new = f"{topic}.created"
    done = run_cli("produce", "--synthetic", "10", "--start", "2024-05-01", "--partitions", "3",
                   "--bootstrap", broker_bootstrap, "--topic", new)
    assert done.returncode == 0, done.stderr.decode()
    consumer = KafkaConsumer(bootstrap_servers=broker_bootstrap)
    try:
        assert consumer.partitions_for_topic(new) == {0, 1, 2}
    finally:
        consumer.close()
    assert len(events_of(read_topic(broker_bootstrap, new))) == 10


def test_cli_unreachable_broker_is_one_line_and_exit_2():
    address = f"127.0.0.1:{free_port()}"
    done = run_cli("produce", "--synthetic", "5", "--bootstrap", address)
    assert done.returncode == 2
    err = done.stderr.decode().strip()
    assert "\n" not in err and err.startswith("error: ") and address in err


def test_cli_needs_exactly_one_source():
    done = run_cli("produce", "--bootstrap", "127.0.0.1:1")
    assert done.returncode == 2
    assert "exactly one of --file PATH and --synthetic N" in done.stderr.decode()
