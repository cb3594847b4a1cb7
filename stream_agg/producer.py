"""Client library for services that publish completed-trace events.

Why batching matters: the worker pays a fixed cost per Kafka *message* (~250 us in Faust:
fetch bookkeeping, the stream machinery, offset tracking) on top of the per-event work.
With one event per message that caps a worker at ~4,000 events/s whatever the decoder
does. With batching on (the default) `TraceProducer` packs many events into ONE message
whose value is a JSON array of events, so the per-message cost is shared by up to
`batch_max_events` events. The consumer's `decode_message` accepts both shapes.

Batch limits: a batch message is emitted when it holds `batch_max_events` events, when
adding the next event would make it larger than `batch_max_bytes` (default 900,000, under
the broker's default 1 MB message limit), or `linger_s` after its first event arrived (a
background thread does this, so a lone event is not held until the next `send`).
`flush()` and `close()` emit whatever is pending. An event that alone exceeds
`batch_max_bytes` is sent as a one-element batch; the broker's size limit then decides.

Keys: a batch carries many trace_ids, so its key is None and kafka-python's default
partitioner spreads batches over the partitions (random choice among available ones).
Nothing downstream needs a key: exactly-once counting is by (partition, offset), not by
trace. With batching off, each event is its own message keyed by its trace_id (UTF-8), as
in the design's topic contract, so a trace always lands on the same partition.

Delivery: `acks="all"` and kafka-python's idempotent producer. Failures are asynchronous;
they are collected and raised as `ProducerError` by the next `flush()` / `close()`
(or by `send` if the client refuses the message up front). Counters `sent_events` and
`sent_messages` count what the broker acknowledged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from datetime import datetime
from types import TracebackType
from typing import Any

import msgspec
import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError

from stream_agg.kafka.admin import BrokerUnavailable, ensure_topics

_ORJSON_OPTS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_SERIALIZE_NUMPY
_CONNECT_TIMEOUT_MS = 8_000


class ProducerError(RuntimeError):
    """The producer cannot reach the broker or a message was not delivered."""


def encode_event(event: Any) -> bytes:
    """One event as compact JSON; datetimes become RFC 3339 (naive ones taken as UTC)."""
    if isinstance(event, msgspec.Struct):
        event = msgspec.to_builtins(event, builtin_types=(datetime,))
    return orjson.dumps(event, option=_ORJSON_OPTS)


def describe_error(exc: BaseException) -> str:
    """'Name: message' once (kafka-python's messages often start with the class name)."""
    name, text = type(exc).__name__, str(exc)
    return text if text.startswith(name) else f"{name}: {text}" if text else name


def _trace_id(event: Any) -> str | None:
    tid = event.get("trace_id") if isinstance(event, dict) else getattr(event, "trace_id", None)
    return tid if isinstance(tid, str) else None


def _client_options(bootstrap: str, compression_type: str | None,
                    kafka_kwargs: dict[str, Any]) -> dict[str, Any]:
    """kafka-python settings: fail fast on an unreachable broker, work on 2.x and 3.x."""
    known = KafkaProducer.DEFAULT_CONFIG
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": "stream-agg-producer",
        "acks": "all",
        "compression_type": compression_type,
        "linger_ms": 5,  # lets kafka-python pack unbatched events into one produce request
        "retries": 5,
        "request_timeout_ms": 10_000,
        "max_block_ms": 10_000,
    }
    if "delivery_timeout_ms" in known:
        options["delivery_timeout_ms"] = 30_000
    if "bootstrap_timeout_ms" in known:  # kafka-python >= 3
        options["bootstrap_timeout_ms"] = _CONNECT_TIMEOUT_MS
    else:  # kafka-python 2.x
        options["api_version_auto_timeout_ms"] = _CONNECT_TIMEOUT_MS
    options.update(kafka_kwargs)
    return options


def ensure_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """Create `topic` if it is missing (an existing topic is kept as it is).

    The replication factor is left to the broker (-1 = its `default.replication.factor`),
    so the same call suits a single-node dev broker and a production cluster.
    """
    try:
        ensure_topics(bootstrap, {topic: partitions}, timeout=_CONNECT_TIMEOUT_MS / 1000,
                      replication_factor=-1, strict=False)
    except (BrokerUnavailable, KafkaError, TimeoutError) as exc:
        raise ProducerError(f"cannot create topic {topic} at {bootstrap}: {describe_error(exc)}") from None


class TraceProducer:
    """Publishes trace events to `topic`, batched into JSON-array messages by default.

    Thread-safe: `send` may be called from several threads.
    """

    def __init__(self, bootstrap: str, topic: str, *, batch_max_events: int = 500,
                 batch_max_bytes: int = 900_000, linger_s: float = 0.05, batching: bool = True,
                 compression_type: str | None = None, **kafka_kwargs: Any) -> None:
        if batch_max_events < 1:
            raise ValueError(f"batch_max_events must be >= 1, got {batch_max_events}")
        if batch_max_bytes < 2:
            raise ValueError(f"batch_max_bytes must be >= 2, got {batch_max_bytes}")
        if linger_s < 0:
            raise ValueError(f"linger_s must be >= 0, got {linger_s}")
        self.bootstrap = bootstrap
        self.topic = topic
        self.batching = batching
        self.batch_max_events = batch_max_events
        self.batch_max_bytes = batch_max_bytes
        self.linger_s = linger_s
        self.sent_events = 0
        self.sent_messages = 0
        self.failed_events = 0
        self.failed_messages = 0

        self._lock = threading.Lock()  # guards the pending batch and _closed
        self._cond = threading.Condition(self._lock)
        self._pending: list[bytes] = []
        self._pending_bytes = 1  # the closing "]"; each event adds len + 1 ("[" or ",")
        self._pending_since = 0.0
        self._closed = False
        self._stats_lock = threading.Lock()  # guards counters and errors (sender thread)
        self._errors: list[BaseException] = []

        try:
            self._kafka = KafkaProducer(
                **_client_options(bootstrap, compression_type, kafka_kwargs))
        except KafkaError as exc:
            raise ProducerError(
                f"cannot connect to Kafka at {bootstrap}: {describe_error(exc)}") from None

        self._lingerer: threading.Thread | None = None
        if batching:
            self._lingerer = threading.Thread(target=self._linger_loop,
                                              name="trace-producer-linger", daemon=True)
            self._lingerer.start()

    # -- public API ----------------------------------------------------------------

    def send(self, event: dict[str, Any] | msgspec.Struct) -> None:
        """Queue one event (a dict or a msgspec Struct such as `TraceEvent`)."""
        data = encode_event(event)
        if not self.batching:
            self._check_open()
            key = _trace_id(event)
            self._produce(data, key.encode() if key is not None else None, 1)
            return
        with self._lock:
            self._check_open()
            if self._pending and (len(self._pending) >= self.batch_max_events
                                  or self._pending_bytes + len(data) + 1 > self.batch_max_bytes):
                self._emit_locked()
            if not self._pending:
                self._pending_since = time.monotonic()
                self._cond.notify()
            self._pending.append(data)
            self._pending_bytes += len(data) + 1
            if (len(self._pending) >= self.batch_max_events
                    or self._pending_bytes >= self.batch_max_bytes):
                self._emit_locked()

    def send_many(self, events: Iterable[dict[str, Any] | msgspec.Struct]) -> int:
        """Queue every event of `events`; returns how many were queued."""
        count = 0
        for event in events:
            self.send(event)
            count += 1
        return count

    def send_raw(self, value: bytes, key: bytes | None = None) -> None:
        """Send bytes as one message, unbatched and unchecked (e.g. to exercise the DLQ)."""
        with self._lock:
            self._check_open()
        self._produce(value, key, 1)

    def flush(self, timeout: float | None = None) -> None:
        """Emit the pending batch, wait for every acknowledgement, raise any failure."""
        with self._lock:
            if self._closed:
                return
            if self._pending:
                self._emit_locked()
        self._wait_delivered(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush, then release the connection; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        try:
            if self._lingerer is not None:
                self._lingerer.join()
            with self._lock:
                if self._pending:
                    self._emit_locked()
            self._wait_delivered(timeout)
        finally:
            self._kafka.close(timeout=timeout)

    def __enter__(self) -> TraceProducer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
            return
        try:  # keep the original exception; still try to deliver what was queued
            self.close()
        except ProducerError:
            pass

    # -- internals -----------------------------------------------------------------

    def _wait_delivered(self, timeout: float | None) -> None:
        try:
            self._kafka.flush(timeout=timeout)
        except KafkaError as exc:
            raise ProducerError(
                f"flush to {self.topic} at {self.bootstrap} did not complete: "
                f"{describe_error(exc)}") from None
        self._raise_errors()

    def _check_open(self) -> None:
        if self._closed:
            raise ProducerError(f"producer for {self.topic} at {self.bootstrap} is closed")

    def _emit_locked(self) -> None:
        """Send the pending events as one JSON-array message (caller holds the lock)."""
        events = self._pending
        self._pending = []
        self._pending_bytes = 1
        self._produce(b"[" + b",".join(events) + b"]", None, len(events))

    def _produce(self, value: bytes, key: bytes | None, n_events: int) -> None:
        try:
            future = self._kafka.send(self.topic, value=value, key=key)
        except KafkaError as exc:
            with self._stats_lock:
                self.failed_events += n_events
                self.failed_messages += 1
            raise ProducerError(
                f"cannot send to {self.topic} at {self.bootstrap}: {describe_error(exc)}"
            ) from None
        future.add_callback(self._on_delivered, n_events)
        future.add_errback(self._on_failed, n_events)

    def _on_delivered(self, n_events: int, _metadata: Any) -> None:
        with self._stats_lock:
            self.sent_events += n_events
            self.sent_messages += 1

    def _on_failed(self, n_events: int, exc: BaseException) -> None:
        with self._stats_lock:
            self.failed_events += n_events
            self.failed_messages += 1
            self._errors.append(exc)

    def _raise_errors(self) -> None:
        with self._stats_lock:
            if not self._errors:
                return
            first, count = self._errors[0], len(self._errors)
            events = self.failed_events
            self._errors.clear()
        raise ProducerError(
            f"{count} message(s) ({events} events so far) not delivered to {self.topic} "
            f"at {self.bootstrap}: {describe_error(first)}")

    def _linger_loop(self) -> None:
        """Emit a batch once its first event is `linger_s` old."""
        with self._lock:
            while not self._closed:
                if not self._pending:
                    self._cond.wait()
                    continue
                remaining = self._pending_since + self.linger_s - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                try:
                    self._emit_locked()
                except ProducerError as exc:
                    with self._stats_lock:
                        self._errors.append(exc)
