"""Running real `stream-agg worker` processes in tests and checking what they wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from helpers import rank_error, reference_values
from kafka import KafkaConsumer, TopicPartition

from stream_agg.config import Config
from stream_agg.core.registry import Registry
from stream_agg.events import TraceEvent, encode_event
from stream_agg.producer import TraceProducer

FAST = {
    "STREAM_AGG_SESSION_TIMEOUT": "6s",
    "STREAM_AGG_HEARTBEAT_INTERVAL": "1s",
    "STREAM_AGG_REBALANCE_TIMEOUT": "3s",
    "STREAM_AGG_FLUSH_INTERVAL": "1s",
    "STREAM_AGG_METRICS_PORT": "0",
    "STREAM_AGG_LOG_LEVEL": "INFO",
}


def worker_env(config: Config, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_AGG_")}
    env.update(FAST)
    env.update({
        "STREAM_AGG_KAFKA_BOOTSTRAP": config.kafka_bootstrap,
        "STREAM_AGG_DATABASE_URL": config.database_url,
        "STREAM_AGG_TOPIC": config.topic,
        "STREAM_AGG_GROUP_ID": config.group_id,
    })
    env.update(overrides)
    return env


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (Linux /proc; the worker's decode helper)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _assert_gone(pids: list[int], worker: int, timeout: float = 5.0) -> None:
    """The worker's helper processes must end with it (they are killed here if not, and the test fails)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in left:
        os.kill(p, signal.SIGKILL)
    if left:
        pytest.fail(f"helper processes {left} outlived worker {worker}")


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


class WorkerProcess:
    """One `stream-agg worker` subprocess; always stopped by the test that started it."""

    def __init__(self, config: Config, log: Path, python: list[str] | None = None, **env: str) -> None:
        self.env = worker_env(config, **env)
        self.log = log
        self.argv = [sys.executable, *(python or ["-m", "stream_agg"]), "worker"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        out = open(self.log, "ab")  # noqa: SIM115 - closed when the process is reaped
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM; returns the exit code (the worker must exit within `timeout`)."""
        assert self.proc is not None
        helpers = children_of(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        _assert_gone(helpers, self.proc.pid)
        return code

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            helpers = children_of(self.proc.pid)
            self.proc.kill()
            self.proc.wait(timeout=10)
            _assert_gone(helpers, self.proc.pid)

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if not self.alive():
                pytest.fail(f"worker {self.pid} exited:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker {self.pid} never logged {text!r}:\n{self.log_text()[-3000:]}")
            time.sleep(0.1)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def produce(config: Config, events: Iterable[Any], *, batching: bool = True, batch: int = 500) -> int:
    with TraceProducer(config.kafka_bootstrap, config.topic, batching=batching, batch_max_events=batch) as p:
        n = p.send_many(events)
        p.flush()
    return n


def produce_raw(config: Config, payloads: Iterable[bytes | None]) -> int:
    with TraceProducer(config.kafka_bootstrap, config.topic) as p:
        n = 0
        for value in payloads:
            p.send_raw(value)
            n += 1
        p.flush()
    return n


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Next offset after the last message of each partition, found by reading the topic.

    Not `KafkaConsumer.end_offsets`: the embedded Tansu broker (0.6.0) answers it with the
    last record batch's base offset + 1, which undercounts whenever a batch holds several
    messages (Apache Kafka answers correctly).
    """
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or set())]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        ends = {tp.partition: 0 for tp in tps}
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 1.5:
            polled = c.poll(timeout_ms=300, max_records=5000)
            for tp, msgs in polled.items():
                ends[tp.partition] = max(ends[tp.partition], msgs[-1].offset + 1)
            if polled:
                idle_since = time.monotonic()
        return ends
    finally:
        c.close()


def durable_offsets(database_url: str, stream: str) -> dict[int, int]:
    try:
        with psycopg.connect(database_url) as conn:
            rows = conn.execute("SELECT partition, next_offset FROM stream_offsets WHERE stream = %s",
                                (stream,)).fetchall()
    except psycopg.Error:
        return {}
    return {int(p): int(o) for p, o in rows}


def stream_of(config: Config) -> str:
    return f"{config.group_id}:{config.topic}"


def wait_caught_up(config: Config, timeout: float = 120.0, workers: Iterable[WorkerProcess] = ()) -> None:
    """Until PostgreSQL holds the effect of every message now in the topic."""
    ends = {p: o for p, o in end_offsets(config.kafka_bootstrap, config.topic).items() if o > 0}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = durable_offsets(config.database_url, stream_of(config))
        if all(done.get(p, 0) >= o for p, o in ends.items()):
            return
        for w in workers:
            if not w.alive():
                pytest.fail(f"worker {w.pid} died:\n{w.log_text()[-3000:]}")
        time.sleep(0.3)
    logs = "\n".join(w.log_text()[-3000:] for w in workers)
    pytest.fail(f"not caught up after {timeout}s: want {ends}, have "
                f"{durable_offsets(config.database_url, stream_of(config))}\n{logs}")


Row = tuple[int, float, float, float, float | None, float | None, float | None, float | None, str]


def fetch_rows(database_url: str) -> dict[tuple, Row]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT granularity, extract(epoch FROM bucket_time)::bigint, metric_name, dimension_type, "
            "dimension_value, count, sum_value, min_value, max_value, avg_value, p50_value, p95_value, "
            "p99_value, source FROM metrics_aggregates").fetchall()
    return {(g, int(b), m, d, v): (int(c), s, lo, hi, avg, p50, p95, p99, src)
            for g, b, m, d, v, c, s, lo, hi, avg, p50, p95, p99, src in rows}


def assert_rows_match_events(rows: dict[tuple, Row], events: list[TraceEvent], registry: Registry) -> None:
    """Every row equals numpy over the same events; no row missing, none extra."""
    ref = reference_values(events, registry)
    assert set(rows) == set(ref), (sorted(set(ref) - set(rows))[:5], sorted(set(rows) - set(ref))[:5])
    for key, values in ref.items():
        x = np.asarray(values)
        c, s, lo, hi, avg, p50, p95, p99, _ = rows[key]
        assert c == x.size, key
        assert s == pytest.approx(float(x.sum()), rel=1e-9, abs=1e-9), key
        assert (lo, hi) == (float(x.min()), float(x.max())), key
        assert avg == pytest.approx(float(x.mean()), rel=1e-9, abs=1e-12), key
        if key[2].endswith("duration_ms"):
            for q, est in ((0.5, p50), (0.95, p95), (0.99, p99)):
                if x.size <= 1000:
                    assert est == pytest.approx(float(np.percentile(x, q * 100)), rel=1e-9), key
                else:
                    assert rank_error(x, est, q) <= 0.001, key
        else:
            assert (p50, p95, p99) == (None, None, None), key


def assert_same_rows(a: dict[tuple, Row], b: dict[tuple, Row]) -> None:
    """Two runs wrote the same aggregates (exact, but float sums to 1e-9 and sketch quantiles)."""
    assert set(a) == set(b)
    for key in a:
        ca, sa, la, ha, _, *qa, _ = a[key]
        cb, sb, lb, hb, _, *qb, _ = b[key]
        assert (ca, la, ha) == (cb, lb, hb), key
        assert sa == pytest.approx(sb, rel=1e-9, abs=1e-9), key
        for x, y in zip(qa, qb, strict=True):
            assert (x is None) == (y is None), key
            if x is not None and ca <= 1000:
                assert x == pytest.approx(y, rel=1e-9), key


def decode_all(payloads: list[bytes]) -> list[TraceEvent]:
    from stream_agg.events import decode_message

    out: list[TraceEvent] = []
    for p in payloads:
        out.extend(decode_message(p).events)
    return out


def as_bytes(event: TraceEvent | dict) -> bytes:
    return encode_event(event)


def open_processor(url: str, stream: str, partitions: set[int], topic_partitions: int, **settings: Any) -> Any:
    """A `Processor` on its own PostgreSQL connections (no Kafka), owning `partitions` of a
    topic of `topic_partitions`, metrics server and raw archive off unless `settings` say."""
    from stream_agg.config import load_config
    from stream_agg.core.registry import default_registry
    from stream_agg.kafka.processor import Processor
    from stream_agg.observability import Metrics
    from stream_agg.store.stream_state import StreamStore

    config = load_config(env={}, **{"database_url": url, "metrics_port": 0, "archive": False, **settings})
    proc = Processor(config, default_registry(config.cardinality_caps), StreamStore(url), Metrics(), stream)
    proc.topic_partitions = topic_partitions
    proc.assign(partitions)
    return proc


def close_processors(*procs: Any) -> None:
    for proc in procs:
        proc.reader.close()
        proc.store.close()
