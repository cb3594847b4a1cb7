"""`stream-agg demo`: the whole pipeline on one machine, watched live, then stopped cleanly.

What it runs, in order: a broker and PostgreSQL (`DevStack`: the configured ones, else the
embedded broker and the local or an embedded PostgreSQL), `migrate`, one worker as a child
process (`python -m stream_agg worker`, flushing every 2 s), and a producer thread that
publishes a steady synthetic stream stamped "now", with a few late (2-3 h old), too-late
(8 days old) and invalid messages mixed in so corrections and the DLQ show up.

Isolation: every run has its own topic and consumer group (`demo.<hex>`), and on a
PostgreSQL it found rather than was given, its own database, dropped at the end unless
`--keep-data`. Two demos never mix, and a demo never touches the default database.

Stopping (Ctrl-C, SIGTERM or the end of `--duration`): the producer stops, the worker is
given up to 15 s to aggregate everything sent, the final numbers are printed, the worker
gets SIGTERM (it flushes and exits), and what DevStack started is stopped. The worker runs
in its own session, so a terminal's Ctrl-C reaches only the demo, which stops it in that
order. Nothing it started is left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from stream_agg.config import redact_url
from stream_agg.core.buckets import bucket_start
from stream_agg.store.query_sql import BucketRow

PARTITIONS = 4
FLUSH_INTERVAL = "2s"
# Small group timeouts: a demo worker joins its group in about a second, not 30.
WORKER_SETTINGS = {
    "STREAM_AGG_FLUSH_INTERVAL": FLUSH_INTERVAL,
    "STREAM_AGG_SESSION_TIMEOUT": "6s",
    "STREAM_AGG_HEARTBEAT_INTERVAL": "1s",
    "STREAM_AGG_REBALANCE_TIMEOUT": "3s",
    "STREAM_AGG_PARTITIONS": str(PARTITIONS),
    "STREAM_AGG_LOG_LEVEL": "INFO",
}
DEFAULT_METRICS_PORT = 9108
LATE_FRACTION = 0.01  # 2-3 h old: corrections of closed buckets
TOO_LATE_FRACTION = 0.002  # 8 days old: past the 7-day horizon, to the DLQ as too_late
INVALID_FRACTION = 0.003  # malformed messages, to the DLQ with their reason
TICK_S = 0.25
WORKER_READY_TIMEOUT = 90.0
FIRST_FLUSH_TIMEOUT = 60.0
DRAIN_TIMEOUT = 15.0
WORKER_STOP_TIMEOUT = 15.0
CLOSE_TIMEOUT = 5.0

# The current hour, per operation type and per model: what the live view reads.
VIEW_SLICES: tuple[tuple[str, str], ...] = (
    ("trace.duration_ms", "operation_type"), ("trace.errors", "operation_type"),
    ("trace.total_tokens", "operation_type"),
    ("trace.duration_ms", "all"), ("trace.errors", "all"), ("trace.total_tokens", "all"),
    ("llm.duration_ms", "model"), ("llm.input_tokens", "model"), ("llm.output_tokens", "model"),
)

# Malformed messages, each with the reason the worker gives it.
INVALID_PAYLOADS: tuple[bytes, ...] = (
    b"{this is not json",
    b'{"schema_version": 1, "trace_id": "demo-missing-fields"}',
    b'{"schema_version": 1, "trace_id": "demo-negative", "operation_type": "chat", '
    b'"started_at": "2026-01-01T00:00:00Z", "duration_ms": -5, "status": "ok"}',
    b'{"schema_version": 1, "trace_id": "demo-nan", "operation_type": "chat", '
    b'"started_at": "2026-01-01T00:00:00Z", "duration_ms": NaN, "status": "ok"}',
)


class DemoError(RuntimeError):
    """Something the demo depends on failed; the message says what, in one line or a log tail."""


@dataclass(frozen=True)
class DemoOptions:
    duration: float | None = None  # seconds of streaming; None = until Ctrl-C
    rate: float = 500.0  # events/s
    metrics_port: int | None = None  # None: 9108 when free, else any free port
    refresh: float | None = None  # None: 3 s live, 10 s for plain-text snapshots
    keep_data: bool = False
    embedded_postgres: bool = False  # even when a PostgreSQL answers on 127.0.0.1:5432
    tty: bool = False


# ----------------------------------------------------------------------------- view model


@dataclass(frozen=True)
class SliceRow:
    """One line of the live view: an operation type or a model in the current hour."""

    name: str
    count: int
    error_rate: float | None
    avg_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    tokens: float | None
    output_tokens: float | None = None


def view_rows(rows: list[BucketRow]) -> tuple[list[SliceRow], list[SliceRow]]:
    """Bucket rows -> (per operation type + 'all' last, per model), busiest first."""
    cells: dict[tuple[str, str], dict[str, BucketRow]] = {}
    for r in rows:
        cells.setdefault((r.dimension, r.value), {})[r.metric] = r
    ops, models, total = [], [], []
    for (dim, value), by_metric in cells.items():
        if dim in ("operation_type", "all") and "trace.duration_ms" in by_metric:
            d = by_metric["trace.duration_ms"]
            err = by_metric.get("trace.errors")
            tok = by_metric.get("trace.total_tokens")
            row = SliceRow(value, d.count, err.avg if err else None, d.avg, d.p95, d.p99,
                           tok.sum if tok else None)
            (total if dim == "all" else ops).append(row)
        elif dim == "model" and "llm.duration_ms" in by_metric:
            d = by_metric["llm.duration_ms"]
            inp = by_metric.get("llm.input_tokens")
            out = by_metric.get("llm.output_tokens")
            models.append(SliceRow(value, d.count, None, d.avg, d.p95, d.p99, inp.sum if inp else None,
                                   out.sum if out else None))
    ops.sort(key=lambda r: (-r.count, r.name))
    models.sort(key=lambda r: (-r.count, r.name))
    return ops + total, models


@dataclass(frozen=True)
class WorkerStats:
    """Counters read from the worker's /metrics."""

    consumed: float = 0.0
    invalid: float = 0.0
    late: float = 0.0
    too_late: float = 0.0
    dlq: float = 0.0
    rows_upserted: float = 0.0
    last_success: float = 0.0
    assigned: float = 0.0
    pending: float = 0.0


_STAT_SAMPLES = {
    "stream_agg_events_consumed_total": "consumed",
    "stream_agg_events_invalid_total": "invalid",
    "stream_agg_events_late_total": "late",
    "stream_agg_events_too_late_total": "too_late",
    "stream_agg_dlq_messages_total": "dlq",
    "stream_agg_rows_upserted_total": "rows_upserted",
    "observability_aggregation_last_success": "last_success",
    "stream_agg_assigned_partitions": "assigned",
    "stream_agg_pending_events": "pending",
}


def parse_worker_metrics(text: str) -> WorkerStats:
    """The Prometheus text exposition -> WorkerStats (labelled series summed)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = _STAT_SAMPLES.get(sample.name)
            if key is not None:
                values[key] = values.get(key, 0.0) + float(sample.value)
    return WorkerStats(**values)


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    hour: int
    ops: list[SliceRow]
    models: list[SliceRow]
    stats: WorkerStats | None
    events_per_s: float | None


def _n(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}{unit}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def render(snap: Snapshot, title: str, metrics_url: str, elapsed: float) -> RenderableType:
    """The view: a header line, the stream's counters, and the two tables."""
    hour = datetime.fromtimestamp(snap.hour, UTC).strftime("%Y-%m-%d %H:00 UTC")
    head = Text.assemble((title, "bold"), f"  ·  hour {hour}  ·  {elapsed:,.0f} s  ·  metrics {metrics_url}")
    s = snap.stats
    if s is not None:
        rate = "-" if snap.events_per_s is None else f"{snap.events_per_s:,.0f}"
        stats = Text(f"events/s {rate}  ·  consumed {_n(s.consumed)}  ·  late {_n(s.late)}  ·  "
                     f"DLQ {_n(s.dlq)} (invalid {_n(s.invalid)}, too late {_n(s.too_late)})  ·  "
                     f"rows upserted {_n(s.rows_upserted)}")
    else:
        stats = Text("worker metrics unavailable")
    ops = Table(title="by operation type (traces, current hour)", box=box.SIMPLE_HEAD, title_justify="left")
    for name, justify in (("operation", "left"), ("count", "right"), ("errors", "right"), ("avg ms", "right"),
                          ("p95 ms", "right"), ("p99 ms", "right"), ("tokens", "right")):
        ops.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in snap.ops:
        ops.add_row(r.name, _n(r.count), _pct(r.error_rate), _n(r.avg_ms), _n(r.p95_ms), _n(r.p99_ms),
                    _n(r.tokens), style="bold" if r.name == "all" else None)
    models = Table(title="by model (LLM spans, current hour)", box=box.SIMPLE_HEAD, title_justify="left")
    for name in ("model", "calls", "avg ms", "p95 ms", "p99 ms", "input tokens", "output tokens"):
        models.add_column(name, justify="left" if name == "model" else "right")
    for r in snap.models:
        models.add_row(r.name, _n(r.count), _n(r.avg_ms), _n(r.p95_ms), _n(r.p99_ms), _n(r.tokens),
                       _n(r.output_tokens))
    return Group(head, stats, ops, models)


# ----------------------------------------------------------------------------- synthetic stream


@dataclass
class StreamCounts:
    """What the producer thread sent (events that reached the broker's acknowledgement path)."""

    on_time: int = 0
    late: int = 0
    too_late: int = 0
    invalid: int = 0

    @property
    def valid(self) -> int:
        """Events that end up aggregated: on time and late (too-late and invalid go to the DLQ)."""
        return self.on_time + self.late


@dataclass
class _Due:
    """Fractional event budgets carried between ticks, so low rates still send exact fractions."""

    on_time: float = 0.0
    late: float = 0.0
    too_late: float = 0.0
    invalid: float = 0.0

    def take(self, name: str, amount: float) -> int:
        total = getattr(self, name) + amount
        whole = int(total)
        setattr(self, name, total - whole)
        return whole


class DemoStream:
    """A paced synthetic stream stamped 'now', run on a thread until `stop` is set."""

    def __init__(self, bootstrap: str, topic: str, rate: float, seed: int | None = None) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.rate = rate
        self.seed = secrets.randbelow(2**62) if seed is None else seed  # trace ids t-<seed+tick>-<i>
        self.counts = StreamCounts()
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self._ticks = 0
        self._due = _Due()
        self._thread: threading.Thread | None = None

    def batch(self, now: float, seconds: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                         list[dict[str, Any]], list[bytes]]:
        """Events due for `seconds` ending at `now`: (on time, late, too late, invalid payloads)."""
        from stream_agg.synthetic import generate_events

        n = self.rate * seconds
        parts = []
        for name, frac, age, spread in (("on_time", 1.0, 0.0, seconds), ("late", LATE_FRACTION, 7200.0, 3600.0),
                                        ("too_late", TOO_LATE_FRACTION, 8 * 86400.0, 3600.0)):
            k = self._due.take(name, n * frac)
            self._ticks += 1
            start = datetime.fromtimestamp(now - age - spread, UTC)
            parts.append(generate_events(k, self.seed + self._ticks, start, spread / 3600,
                                         late_fraction=0.0) if k else [])
        k = self._due.take("invalid", n * INVALID_FRACTION)
        invalid = [INVALID_PAYLOADS[(self.counts.invalid + i) % len(INVALID_PAYLOADS)] for i in range(k)]
        return parts[0], parts[1], parts[2], invalid

    def start(self) -> DemoStream:
        self._thread = threading.Thread(target=self._run, name="demo-producer", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float = 15.0) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        from stream_agg.producer import TraceProducer

        try:
            producer = TraceProducer(self.bootstrap, self.topic, linger_s=0.1)
        except BaseException as exc:  # noqa: BLE001 - reported by the demo's main loop
            self.error = exc
            return
        try:
            last = time.time()
            while not self.stop.wait(TICK_S):
                now = time.time()
                on_time, late, too_late, invalid = self.batch(now, now - last)
                last = now
                for events, attr in ((on_time, "on_time"), (late, "late"), (too_late, "too_late")):
                    producer.send_many(events)
                    setattr(self.counts, attr, getattr(self.counts, attr) + len(events))
                for payload in invalid:
                    producer.send_raw(payload)
                    self.counts.invalid += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the demo's main loop
            self.error = exc
        finally:
            # Bounded: with the broker gone, what is unsent is lost anyway; do not hang the stop.
            with contextlib.suppress(Exception):
                producer.close(timeout=CLOSE_TIMEOUT)


# ----------------------------------------------------------------------------- processes


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def pick_metrics_port(requested: int | None) -> int:
    """The requested port, else 9108 when free, else any free port."""
    from stream_agg.devstack import free_port

    if requested:
        return requested
    return DEFAULT_METRICS_PORT if _port_free(DEFAULT_METRICS_PORT) else free_port()


class WorkerChild:
    """`python -m stream_agg worker` as a child in its own session, logging to a file."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.log_path = workdir / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def start(self) -> WorkerChild:
        with open(self.log_path, "ab") as log:
            # cwd = the demo's scratch directory: Faust creates its data directory there.
            self.proc = subprocess.Popen([sys.executable, "-m", "stream_agg", "worker"], env=self.env,
                                         cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "(no worker log)"

    def stop(self, timeout: float = WORKER_STOP_TIMEOUT) -> int | None:
        """SIGTERM (the worker flushes and exits), SIGKILL after `timeout`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        return self.returncode


def fetch_metrics(url: str, timeout: float = 1.0) -> WorkerStats | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - our own loopback URL
            return parse_worker_metrics(resp.read().decode())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- the demo


class _Stop(Exception):
    """Ctrl-C or SIGTERM arrived: leave the current phase and shut down."""


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread while services start; a Ctrl-C meanwhile is delivered after.

    Children inherit the blocked mask, so the broker does not see the terminal's Ctrl-C
    (sent to the whole foreground process group) and keeps running until the demo has
    stopped the producer, drained the worker and stops it in order. (PostgreSQL unblocks
    its signals itself; an embedded one still stops on Ctrl-C, which the shutdown handles.)
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Reporter:
    """Progress on a terminal (a spinner while waiting) or plain lines otherwise."""

    def __init__(self, console: Console, tty: bool) -> None:
        self.console = console
        self.tty = tty
        self._status: Any = None

    def progress(self, message: str) -> None:
        """DevStack's callback: '...' messages are waits (spinner), the others are results."""
        if message.endswith("..."):
            self.spin(message)
        else:
            self.say(message)

    def spin(self, message: str) -> None:
        if not self.tty:
            self.say(message)
        elif self._status is None:
            self._status = self.console.status(message)
            self._status.start()
        else:
            self._status.update(message)

    def say(self, message: str) -> None:
        self.show(message, highlight=False, markup=False, soft_wrap=True)  # log lines hold [...]

    def show(self, *objects: Any, **options: Any) -> None:
        """Print; a terminal that went away (closed window: EIO) must not stop the clean-up."""
        with contextlib.suppress(OSError):
            self.console.print(*objects, **options)

    def done(self) -> None:
        if self._status is not None:
            with contextlib.suppress(OSError):
                self._status.stop()
            self._status = None


@dataclass
class _Resources:
    """Everything the demo started, so the shutdown stops exactly that."""

    stack: Any = None
    created_db: str | None = None  # a database this demo created on a server it found
    admin_url: str | None = None
    workdir: Path | None = None
    worker: WorkerChild | None = None
    stream: DemoStream | None = None
    topics_on_given_broker: list[str] = field(default_factory=list)


class Demo:
    """One demo run: start, watch, stop; `run()` returns the exit code."""

    def __init__(self, options: DemoOptions, console: Console | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.options = options
        # Plain-text snapshots go to logs and pipes: wide enough that no model name is cut.
        self.console = console or Console(highlight=False, width=None if options.tty else 120)
        self.env = dict(os.environ if env is None else env)
        self.reporter = Reporter(self.console, options.tty)
        self.run_id = secrets.token_hex(4)
        self.topic = f"demo.{self.run_id}"
        self.group = f"stream-agg-demo-{self.run_id}"
        self.res = _Resources()
        self.database_url = ""
        self.bootstrap = ""
        self.metrics_url = ""
        self.started_stream_at = 0.0
        self._last_consumed: tuple[float, float] | None = None
        self.stop_requested = threading.Event()

    @property
    def refresh(self) -> float:
        return self.options.refresh or (3.0 if self.options.tty else 10.0)

    # -- lifecycle ---------------------------------------------------------------------

    def run(self) -> int:
        """Start, watch, stop. Returns the exit code: 0 after --duration or Ctrl-C, 1 on a failure."""
        # Signals set a flag that every wait checks: an exception raised at an arbitrary point
        # (in the middle of drawing the live view) would leave half-written output behind.
        # SIGHUP too: closing the terminal window must stop the worker child (it has its own session).
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        # kafka-python logs every reconnect at ERROR; the demo reports failures itself, in one line.
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            logging.getLogger("kafka").setLevel(logging.CRITICAL)
        code = 0
        try:
            self._start()
            self._wait_first_flush()
            self._watch()
        except _Stop:
            self.reporter.done()
            self.reporter.say("stopping (interrupted)...")
        except DemoError as exc:
            self.reporter.done()
            self.reporter.show(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
            code = 1
        finally:
            # A second Ctrl-C must not cut the clean-up short: nothing may be left running.
            # (The flag handler stays installed: further signals change nothing.)
            try:
                self._shutdown()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        return code

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self.stop_requested.set()

    def _start(self) -> None:
        from stream_agg.devstack import DevStack
        from stream_agg.kafka.admin import BrokerUnavailable, ensure_topics
        from stream_agg.store.schema import migrate

        given_bootstrap = self.env.get("STREAM_AGG_KAFKA_BOOTSTRAP") or None
        given_db = self.env.get("STREAM_AGG_DATABASE_URL") or None
        stack = DevStack(kafka_bootstrap=given_bootstrap, database_url=given_db,
                         embedded_postgres=self.options.embedded_postgres, progress=self.reporter.progress)
        self.res.stack = stack
        try:
            with _sigint_blocked():
                stack.start()
        except (RuntimeError, TimeoutError, OSError) as exc:
            raise DemoError(str(exc)) from None
        assert stack.kafka_bootstrap is not None and stack.database_url is not None
        self.bootstrap = stack.kafka_bootstrap
        self.database_url = stack.database_url
        if given_db is None and stack.postgres is None:
            self._create_database(stack.database_url)
        self.reporter.spin("migrating the database...")
        try:
            migrate(self.database_url)
        except Exception as exc:  # noqa: BLE001 - one line
            from stream_agg.store.db import describe_db_error

            raise DemoError(f"cannot migrate {redact_url(self.database_url)}: {describe_db_error(exc)}") from None
        self.reporter.spin(f"creating topic {self.topic}...")
        try:
            ensure_topics(self.bootstrap, {self.topic: PARTITIONS, f"{self.topic}.dlq": 1},
                          replication_factor=-1, strict=False)
        except (BrokerUnavailable, TimeoutError) as exc:
            raise DemoError(str(exc)) from None
        if given_bootstrap:
            self.res.topics_on_given_broker = [self.topic, f"{self.topic}.dlq"]
        self._start_worker()
        self.res.stream = DemoStream(self.bootstrap, self.topic, self.options.rate).start()
        self.started_stream_at = time.monotonic()
        self.reporter.say(f"producing ~{self.options.rate:,.0f} events/s to {self.topic} "
                          f"({LATE_FRACTION:.0%} late, {TOO_LATE_FRACTION:.1%} too late, "
                          f"{INVALID_FRACTION:.1%} invalid)")

    def _create_database(self, server_url: str) -> None:
        """A database of our own on a PostgreSQL we found (never the default one)."""
        import psycopg
        from psycopg import sql

        name = f"stream_agg_demo_{self.run_id}"
        self.reporter.spin(f"creating database {name}...")
        with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.res.created_db = name
        self.res.admin_url = server_url
        self.database_url = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
        self.reporter.say(f"database {name} on {redact_url(server_url)} "
                          f"({'kept' if self.options.keep_data else 'dropped'} at the end)")

    def _start_worker(self) -> None:
        port = pick_metrics_port(self.options.metrics_port)
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        env = dict(self.env)
        env.update(WORKER_SETTINGS)
        env.update({
            "STREAM_AGG_KAFKA_BOOTSTRAP": self.bootstrap,
            "STREAM_AGG_DATABASE_URL": self.database_url,
            "STREAM_AGG_TOPIC": self.topic,
            "STREAM_AGG_DLQ_TOPIC": f"{self.topic}.dlq",
            "STREAM_AGG_GROUP_ID": self.group,
            "STREAM_AGG_METRICS_PORT": str(port),
        })
        self.res.workdir = Path(tempfile.mkdtemp(prefix="stream-agg-demo-"))
        worker = WorkerChild(env, self.res.workdir).start()
        self.res.worker = worker
        self.reporter.spin(f"starting the worker (pid {worker.pid})...")
        deadline = time.monotonic() + WORKER_READY_TIMEOUT
        while True:
            self._check()
            stats = fetch_metrics(self.metrics_url)
            if stats is not None and stats.assigned > 0:
                break
            if time.monotonic() > deadline:
                raise DemoError(f"the worker did not join its group within {WORKER_READY_TIMEOUT:.0f} s; "
                                f"its log:\n{worker.log_tail()}")
            time.sleep(0.2)
        pids = {"worker": worker.pid}
        stack = self.res.stack
        if stack.broker is not None:
            pids["broker"] = stack.broker.pid
        if stack.postgres is not None:
            pids["postgres"] = stack.postgres.pid
        self.reporter.say(f"worker ready: {stats.assigned:.0f} partitions, metrics on {self.metrics_url}")
        self.reporter.say("demo pids: " + " ".join(f"{k}={v}" for k, v in pids.items()))
        self.reporter.say(f"database: {redact_url(self.database_url)}  topic: {self.topic}  group: {self.group}")

    def _check(self) -> None:
        """Raise _Stop on Ctrl-C / SIGTERM, DemoError when something the demo runs has died."""
        if self.stop_requested.is_set():
            raise _Stop()
        worker, stream, stack = self.res.worker, self.res.stream, self.res.stack
        if worker is not None and not worker.alive():
            raise DemoError(f"the worker exited with code {worker.proc.returncode if worker.proc else '?'}; "
                            f"its log:\n{worker.log_tail()}")
        if stream is not None and stream.error is not None:
            raise DemoError(f"the producer failed: {stream.error}")
        if stack is not None:
            dead = stack.dead_services()
            if dead:
                raise DemoError(f"{' and '.join(dead)} exited unexpectedly")

    def _wait_first_flush(self) -> None:
        self.reporter.spin("waiting for the first flush...")
        deadline = time.monotonic() + FIRST_FLUSH_TIMEOUT
        while True:
            self._check()
            snap = self.snapshot()
            if snap.ops:
                break
            if time.monotonic() > deadline:
                assert self.res.worker is not None
                raise DemoError(f"no aggregates after {FIRST_FLUSH_TIMEOUT:.0f} s; worker log:\n"
                                f"{self.res.worker.log_tail()}")
            time.sleep(0.5)
        self.reporter.done()
        self.reporter.say(f"first flush after {time.monotonic() - self.started_stream_at:.1f} s")

    def _watch(self) -> None:
        duration = self.options.duration
        end = None if duration is None else self.started_stream_at + duration
        title = f"stream-agg demo · topic {self.topic}"
        if self.options.tty:
            from rich.live import Live

            with Live(console=self.console, auto_refresh=False, transient=False) as live:
                for snap in self._snapshots(end):
                    with contextlib.suppress(OSError):  # the terminal went away: SIGHUP stops us next
                        live.update(render(snap, title, self.metrics_url, self._elapsed()), refresh=True)
        else:
            for snap in self._snapshots(end):
                self.reporter.show(render(snap, title, self.metrics_url, self._elapsed()))

    def _elapsed(self) -> float:
        return time.monotonic() - self.started_stream_at

    def _snapshots(self, end: float | None) -> Iterator[Snapshot]:
        """A snapshot every refresh interval until `end` (or forever), checking health meanwhile."""
        while True:
            yield self.snapshot()
            next_at = time.monotonic() + self.refresh
            if end is not None:
                next_at = min(next_at, end)
            while time.monotonic() < next_at:
                self._check()
                time.sleep(0.2)
            if end is not None and time.monotonic() >= end:
                return

    def snapshot(self) -> Snapshot:
        """The current hour's rows from PostgreSQL plus the worker's counters."""
        from stream_agg.store.db import connect
        from stream_agg.store.query_sql import bucket_rows

        now = time.time()
        hour = bucket_start(now, "hour")
        try:
            with connect(self.database_url, autocommit=True) as conn:
                rows = bucket_rows(conn, "hour", hour, VIEW_SLICES)
        except Exception as exc:  # noqa: BLE001 - PostgreSQL gone: the health check says why
            raise DemoError(f"cannot read {redact_url(self.database_url)}: {exc}") from None
        stats = fetch_metrics(self.metrics_url) if self.res.worker and self.res.worker.alive() else None
        rate = None
        if stats is not None:
            mono = time.monotonic()
            last = self._last_consumed
            if last is not None and mono - last[0] >= 1.0:  # shorter intervals say nothing
                rate = (stats.consumed - last[1]) / (mono - last[0])
            if last is None or rate is not None:
                self._last_consumed = (mono, stats.consumed)
        ops, models = view_rows(rows)
        return Snapshot(now, hour, ops, models, stats, rate)

    # -- shutdown ----------------------------------------------------------------------

    def _drain(self, sent: int) -> bool:
        """Wait until the worker has consumed all `sent` events and flushed them to PostgreSQL.

        Judged from the worker's own counters, not from Kafka end offsets: the embedded
        broker answers ListOffsets with the last batch's base offset + 1, which undercounts.
        """
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline and self.res.worker is not None and self.res.worker.alive():
            stats = fetch_metrics(self.metrics_url)
            if stats is not None and stats.consumed >= sent and stats.pending == 0:
                return True
            time.sleep(0.3)
        return False

    def _shutdown(self) -> None:
        self.reporter.done()
        res = self.res
        stream, worker = res.stream, res.worker
        if stream is not None:
            self.reporter.spin("stopping the producer...")
            stream.join()
        dead = res.stack.dead_services() if res.stack is not None else []
        if dead:
            self.reporter.say(f"{' and '.join(dead)} already stopped (a terminal's Ctrl-C reaches it too)")
        final: Snapshot | None = None
        drained = False
        if worker is not None and worker.alive() and stream is not None and not dead:
            self.reporter.spin("letting the worker aggregate everything sent...")
            c = stream.counts
            drained = self._drain(c.on_time + c.late + c.too_late + c.invalid)
            self.reporter.done()
            with contextlib.suppress(DemoError):
                final = self.snapshot()
            if not drained:
                self.reporter.say("note: the worker had not caught up with the topic; final numbers are partial")
        if worker is not None:
            self.reporter.spin(f"stopping the worker (pid {worker.pid})...")
            # Without its broker or database the worker cannot finish a clean shutdown: do not wait long.
            code = worker.stop(CLOSE_TIMEOUT if dead else WORKER_STOP_TIMEOUT)
            self.reporter.done()
            self.reporter.say(f"worker (pid {worker.pid}) exited with code {code}")
            if (code != 0 or (stream is not None and not drained)) and not dead:
                self._keep_worker_log(worker)
        if final is not None:
            self.reporter.show(render(final, f"final · topic {self.topic}", self.metrics_url, self._elapsed()))
        if stream is not None:
            c = stream.counts
            self.reporter.say(f"sent {c.on_time + c.late + c.too_late:,} events ({c.on_time:,} on time, "
                              f"{c.late:,} late, {c.too_late:,} too late) and {c.invalid:,} invalid messages; "
                              f"{c.valid:,} {'aggregated' if drained else 'to aggregate'}")
        self._cleanup_data()
        if res.stack is not None:
            res.stack.stop()
            self.reporter.done()
        if res.workdir is not None:
            shutil.rmtree(res.workdir, ignore_errors=True)
        self.reporter.say("demo stopped; nothing left running")

    def _keep_worker_log(self, worker: WorkerChild) -> None:
        """Something went wrong in the worker: keep its log (the scratch directory goes) and show its end."""
        kept = Path(tempfile.gettempdir()) / f"stream-agg-demo-{self.run_id}-worker.log"
        with contextlib.suppress(OSError):
            shutil.copyfile(worker.log_path, kept)
        tail = [line for line in worker.log_tail(6000).splitlines() if "WARNING" in line or "ERROR" in line]
        self.reporter.say(f"worker log kept at {kept}; its last warnings:")
        for line in tail[-8:]:
            self.reporter.say(f"  {line[:300]}")

    def _cleanup_data(self) -> None:
        res = self.res
        keep = self.options.keep_data
        if res.created_db and res.admin_url:
            if keep:
                url = urlunsplit(urlsplit(res.admin_url)._replace(path=f"/{res.created_db}"))
                self.reporter.say("kept the data; to query it:")
                self.reporter.say(f"  export STREAM_AGG_DATABASE_URL={url}")
            else:
                _drop_database(res.admin_url, res.created_db)
        elif self.database_url and res.stack is not None and res.stack.postgres is None:
            self.reporter.say(f"rows stay in {redact_url(self.database_url)} "
                              f"(stream {self.group}:{self.topic})")
        elif res.stack is not None and res.stack.postgres is not None and keep:
            self.reporter.say("note: --keep-data keeps nothing with the embedded PostgreSQL (it stops with the "
                              "demo); run `stream-agg devstack` and export its variables to keep the data")
        if res.topics_on_given_broker and not keep:
            _delete_topics(self.bootstrap, res.topics_on_given_broker)


def _drop_database(server_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with contextlib.suppress(psycopg.Error), psycopg.connect(server_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _delete_topics(bootstrap: str, topics: list[str]) -> None:
    """Best effort: a demo's topics on a broker the user gave are removed at the end."""
    from stream_agg.kafka.admin import admin_client

    with contextlib.suppress(Exception):
        admin = admin_client(bootstrap, timeout=5)
        try:
            admin.delete_topics(topics)
        finally:
            admin.close()


def invalid_reasons() -> list[str]:
    """The reject reason of each INVALID_PAYLOADS entry (what the DLQ will say)."""
    from stream_agg.events import decode_message

    return [decode_message(p).rejects[0].reason for p in INVALID_PAYLOADS]

