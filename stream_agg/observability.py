"""Prometheus metrics of the worker and the batch jobs.

Names follow Prometheus conventions: base units in names, `_total` on counters, and
low-cardinality labels only (job, partition, reason, granularity, outcome). Reasons
come from the decoder's fixed vocabulary, never from user data.

Each process gets its own `CollectorRegistry` (`Metrics(...)`), so tests can run
several in one process and read exactly what one of them recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
    write_to_textfile,
)

FLUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


@dataclass
class Metrics:
    """All series; `job` labels the three required job-health series."""

    job: str = "stream"
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.aggregation_duration = Histogram(
            "observability_aggregation_duration_seconds",
            "Duration of one aggregation run: a stream flush, or a backfill / reconcile run.",
            ["job"], buckets=FLUSH_BUCKETS, registry=r)
        self.records_processed = Counter(
            "observability_aggregation_records_processed_total",
            "Records aggregated (events folded by the stream; raw rows read by batch jobs).",
            ["job"], registry=r)
        self.last_success = Gauge(
            "observability_aggregation_last_success",
            "Unix time of the last successful aggregation run (flush / backfill).",
            ["job"], registry=r)
        self.events_consumed = Counter(
            "stream_agg_events_consumed_total", "Events decoded from Kafka messages (valid or not).",
            registry=r)
        self.messages_consumed = Counter(
            "stream_agg_messages_consumed_total", "Kafka messages consumed.", registry=r)
        self.micro_batches = Counter(
            "stream_agg_micro_batches_total",
            "Micro-batches taken from Kafka, by mode: pipelined (full: the batch size or 16 MB came within "
            "the batch timeout; the next one is taken while this one folds) or lockstep (not full: folded "
            "before the next is taken).",
            ["mode"], registry=r)
        for mode in ("pipelined", "lockstep"):  # both series from the start: rate() sees zeros
            self.micro_batches.labels(mode)
        self.duplicates_skipped = Counter(
            "stream_agg_messages_duplicate_total",
            "Re-delivered messages skipped because their offset was already applied.", registry=r)
        self.events_invalid = Counter(
            "stream_agg_events_invalid_total", "Events rejected to the DLQ, by reason.", ["reason"],
            registry=r)
        self.events_late = Counter(
            "stream_agg_events_late_total",
            "Events for an already closed bucket, folded as corrections.", registry=r)
        self.events_too_late = Counter(
            "stream_agg_events_too_late_total", "Events older than the late horizon, sent to the DLQ.",
            registry=r)
        self.dlq_messages = Counter(
            "stream_agg_dlq_messages_total", "Records written to the dead-letter topic.", registry=r)
        self.open_buckets = Gauge(
            "stream_agg_open_buckets", "Buckets held in memory (not yet closed), by granularity.",
            ["granularity"], registry=r)
        self.cached_buckets = Gauge(
            "stream_agg_closed_buckets_cached",
            "Closed buckets (final values flushed) kept in memory for late events, by granularity.",
            ["granularity"], registry=r)
        self.watermark_lag = Gauge(
            "stream_agg_watermark_lag_seconds",
            "Wall clock minus the partition's event-time watermark.", ["partition"], registry=r)
        self.watermark = Gauge(
            "stream_agg_watermark_timestamp_seconds", "Event-time watermark of the partition (unix time).",
            ["partition"], registry=r)
        self.consumer_lag = Gauge(
            "stream_agg_consumer_lag_messages",
            "Messages in the partition not yet durably aggregated (high water - next offset).",
            ["partition"], registry=r)
        self.flush_failures = Counter(
            "stream_agg_flush_failures_total", "Flushes that failed (PostgreSQL unreachable...).",
            registry=r)
        self.db_up = Gauge(
            "stream_agg_database_up", "1 if the last PostgreSQL operation succeeded, else 0.", registry=r)
        self.pending_events = Gauge(
            "stream_agg_pending_events", "Events folded in memory but not yet flushed.", registry=r)
        self.paused = Gauge(
            "stream_agg_consumption_paused",
            "1 while consumption waits for a flush (pending events over the bound).", registry=r)
        self.rows_upserted = Counter(
            "stream_agg_rows_upserted_total", "metrics_aggregates rows written by flushes.", registry=r)
        self.archived_traces = Counter(
            "stream_agg_archived_traces_total", "Trace rows newly written to the raw archive.", registry=r)
        self.pruned_rows = Counter(
            "stream_agg_pruned_rows_total",
            "Stream-state rows deleted because no event can change their bucket any more, by table.",
            ["table"], registry=r)
        self.prune_floor = Gauge(
            "stream_agg_prune_floor_timestamp_seconds",
            "Event time (unix) before which every partition's events are too late and stream state is pruned "
            "(0 until it first moves: a partition without a watermark holds it back).",
            registry=r)
        self.assigned_partitions = Gauge(
            "stream_agg_assigned_partitions", "Partitions this worker owns.", registry=r)

    def observe_run(self, seconds: float, records: int) -> None:
        """Record one successful aggregation run."""
        self.aggregation_duration.labels(self.job).observe(seconds)
        self.records_processed.labels(self.job).inc(records)
        self.last_success.labels(self.job).set(time.time())

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose /metrics over HTTP (Prometheus text format)."""
        start_http_server(port, addr=addr, registry=self.registry)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def write_textfile(self, path: str | Path) -> None:
        """For one-shot jobs: a node_exporter textfile-collector file (written atomically)."""
        write_to_textfile(str(path), self.registry)
