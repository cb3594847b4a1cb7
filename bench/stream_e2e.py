"""End to end: broker -> `stream-agg worker` (one process) -> PostgreSQL, against the practical floor.

Starts its own embedded broker (Tansu, in memory) unless --bootstrap is given, and uses
the PostgreSQL at --database-url (a fresh database per worker run, dropped afterwards).
Each scenario loads its events into a fresh topic once, then for every run, side by side
on the same topic: the reference reader(s) and the real worker (a fresh consumer group and
database each time, so each reads the whole topic). Run order alternates between runs.

Scenarios (pick with --scenarios 1,2,3):
  1. --batched events (default 1,000,000) in JSON-array messages of --batch-events (500),
     over --hours (48) of event time with --users (2,000), raw archive OFF.
     Targets: >= 100,000 events/s per worker process, >= 50% of the floor, peak RSS <= 1 GB.
  2. the same with the raw archive ON (PostgreSQL shares the machine; reported only).
  3. --single events (default 100,000), one per message (key = trace_id), archive OFF,
     against a bare Faust agent that only counts messages.

What is measured (every rate is events / seconds of the interval named):
  worker durable  t0 = the worker logs "positioned partitions" (its consumer group is joined
                  and the fetch is about to start; the bench polls the log every 10 ms),
                  t1 = PostgreSQL `stream_offsets` first shows sum(next_offset) == the topic's
                  end offsets total (polled every 50 ms): every event's effect is durable.
                  Includes the wait for the last flush (STREAM_AGG_FLUSH_INTERVAL). End offsets
                  are those the broker acknowledged to the loading producer (Tansu's ListOffsets
                  undercounts multi-record batches).
  worker folded   same t0; t1 = the worker's /metrics first shows stream_agg_events_consumed_total
                  == N (polled every 250 ms): every event decoded and folded, not yet flushed.
  aiokafka floor  a fresh interpreter: AIOKafkaConsumer (no group, Faust's fetch settings) assigned
                  every partition at offset 0, `getmany` + `orjson.loads` of each value until the
                  end offsets; t0 just before the first getmany, t1 after the last message.
  bare Faust      a fresh interpreter: the worker's own `build_app` (same broker settings, raw
                  values, same quiet loggers) and an agent `async for _ in stream: n += 1`;
                  t0 = on_rebalance_complete, t1 = the N-th message counted.
  peak RSS        VmHWM of the worker process (read before it is stopped), or the largest sampled
                  RSS of its process tree plus the memfds it holds (chunks on their way to the
                  decode helper, which no RSS counts) if that is larger.
  worker CPU      user+system seconds of the worker process and its children (the decode helper)
                  between t0 and durable t1; also
                  the broker's, and PostgreSQL's (the backends of the run's database, by pid).
  flushes         count and summed duration from the worker's "flushed ... in X s" log lines;
                  "flush failed" / "processing paused" lines are counted and quoted.
Each figure is the median over --runs (default 2); peak RSS is the maximum.
After each worker run the bench checks sum(count) of the hourly `trace.duration_ms/all` rows == N
(and, with the archive on, count(traces) == N).

    python bench/stream_e2e.py [--scenarios 1,3] [--runs 2] [--batched N] [--single N]
                               [--flush-interval 5s] [--profile DIR]

--profile DIR attaches `py-spy record --idle --threads --nonblocking` (100 Hz) to every worker
run, writes the collapsed stacks to DIR and prints, per busy thread, the top frames as shares of
wall time (a thread waiting for the GIL shows in its current frame, so shares of concurrent
threads can add up to more than 100%), then inclusive stream_agg functions. Profiled runs are
slower; measure without it. `python bench/stream_e2e.py _summarize FILE...` re-prints saved ones.
--worker-src DIR runs the worker from DIR/stream_agg (A/B a patched copy without touching the
checkout); PYTHONPATH=DIR pins the whole bench (and the bare agent) to that copy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

START = datetime(2024, 5, 1, tzinfo=UTC)
BASE_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
RESULT = "BENCH-RESULT "  # prefix of the line a child process reports on
POSITIONED = "positioned partitions"  # the worker's log line once its group is joined
FAST_JOIN = {
    "STREAM_AGG_SESSION_TIMEOUT": "6s",
    "STREAM_AGG_HEARTBEAT_INTERVAL": "1s",
    "STREAM_AGG_REBALANCE_TIMEOUT": "3s",
}
FETCH = {"max_partition_fetch_bytes": 1024 ** 2, "fetch_max_wait_ms": 1500}  # as Faust's consumer


# ============================================================== child processes

def floor_main(bootstrap: str, topic: str, ends_json: str) -> None:
    """Plain aiokafka + orjson read of the whole topic; prints one JSON line."""
    import orjson
    from aiokafka import AIOKafkaConsumer, TopicPartition

    ends = {int(p): int(o) for p, o in json.loads(ends_json).items()}

    async def read() -> dict[str, Any]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", **FETCH)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in sorted(ends)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            remaining = {tp: ends[tp.partition] for tp in tps if ends[tp.partition] > 0}
            loads = orjson.loads
            events = messages = 0
            began = time.perf_counter()
            while remaining:
                batch = await consumer.getmany(timeout_ms=1000)
                for tp, records in batch.items():
                    for record in records:
                        value = loads(record.value)
                        events += len(value) if type(value) is list else 1
                    messages += len(records)
                    if records and records[-1].offset + 1 >= remaining.get(tp, 0):
                        remaining.pop(tp, None)
            seconds = time.perf_counter() - began
        finally:
            await consumer.stop()
        return {"events": events, "messages": messages, "seconds": seconds, "rss_kb": vm_hwm_kb(os.getpid())}

    print(RESULT + json.dumps(asyncio.run(read())), flush=True)


def bare_main(bootstrap: str, topic: str, group: str, expect: str) -> None:
    """A bare Faust agent that only counts messages; prints one JSON line at the N-th message."""
    import logging

    import faust

    from stream_agg.config import load_config
    from stream_agg.kafka.worker import build_app

    n_expect = int(expect)
    config = load_config({"STREAM_AGG_KAFKA_BOOTSTRAP": bootstrap, "STREAM_AGG_TOPIC": topic,
                          "STREAM_AGG_GROUP_ID": group, **FAST_JOIN})
    app = build_app(config)
    source = app.topic(topic, value_type=bytes, value_serializer="raw", key_serializer="raw", allow_empty=True)
    marks: dict[str, float] = {}

    async def rebalanced(sender: Any, **_: Any) -> None:
        marks.setdefault("t0", time.perf_counter())

    app.on_rebalance_complete.connect(rebalanced)

    @app.agent(source, name="bare-count")
    async def count(stream: Any) -> None:
        n = 0
        async for _ in stream:
            n += 1
            if n == n_expect:
                t1 = time.perf_counter()
                print(RESULT + json.dumps({"messages": n, "seconds": t1 - marks.get("t0", t1),
                                           "rss_kb": vm_hwm_kb(os.getpid())}), flush=True)
            elif not n % 10_000:
                marks["n"] = n

    @app.timer(5.0)
    async def progress() -> None:
        logging.getLogger("bench").info("bare agent: rebalanced=%s counted>=%s", "t0" in marks, marks.get("n", 0))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    worker = faust.Worker(app, loglevel="INFO", override_logging=False, redirect_stdouts=False, quiet=True)
    for noisy in ("aiokafka", "kafka", "faust", "mode"):  # as the real worker does
        logging.getLogger(noisy).setLevel(logging.WARNING)
    worker.execute_from_commandline()


# ============================================================== helpers

def code_version(worker_src: str | None) -> str:
    """Which stream_agg the worker runs: its directory and, in a git checkout, the commit (+dirty)."""
    if worker_src:
        where = Path(worker_src).resolve() / "stream_agg"
    else:
        import stream_agg

        where = Path(stream_agg.__file__).resolve().parent
    rev = subprocess.run(["git", "-C", str(where), "describe", "--always", "--dirty", "--exclude", "*"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return f"worker runs stream_agg from {where}" + (f" (git {rev})" if rev else " (not a git checkout)")


def result_line(lines: list[str]) -> str:
    for line in reversed(lines):
        if RESULT in line:  # Faust may print a terminal escape sequence first
            return line[line.index(RESULT) + len(RESULT):]
    raise RuntimeError("child process reported no result")


def vm_hwm_kb(pid: int) -> int:
    """Peak resident set size of a process (VmHWM), in kB; 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    """Current RSS of a process and its children, plus the memfds they hold open, bytes.

    Why the memfds: the worker hands its decode helper chunks of messages in memfds it never
    maps, so their pages are memory it holds that no RSS counts (a chunk the helper is
    reading is counted twice, once in its RSS: the figure errs high)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
        total += memfd_bytes(p.pid)
    return total


def memfd_bytes(pid: int) -> int:
    """Size of the memfds a process holds open (Linux; 0 elsewhere)."""
    total = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            path = f"/proc/{pid}/fd/{fd}"
            with contextlib.suppress(OSError):
                if os.readlink(path).startswith("/memfd:"):
                    total += os.stat(path).st_size
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live children (the worker's decode helper)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        t = proc.cpu_times()
    except psutil.Error:
        return float("nan")
    total = t.user + t.system
    for child in procs[1:]:
        with contextlib.suppress(psutil.Error):
            c = child.cpu_times()
            total += c.user + c.system
    return total


class BackendCpu:
    """CPU seconds used by the PostgreSQL backends of one database (the worker's connections,
    autovacuum...) since the first sample, sampled by pid (needs a local server we may inspect)."""

    def __init__(self, conn: Any, database: str) -> None:
        self.conn = conn
        self.database = database
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.started = False

    def sample(self) -> None:
        try:
            pids = [int(r[0]) for r in self.conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.database,)).fetchall()]
        except Exception:  # noqa: BLE001 - best effort
            return
        for pid in pids:
            cpu = cpu_seconds(pid)
            if cpu != cpu:  # nan: gone or not ours to read
                continue
            self.first.setdefault(pid, cpu if not self.started else 0.0)
            self.last[pid] = cpu
        self.started = True

    @property
    def total(self) -> float:
        return sum(self.last[p] - self.first[p] for p in self.last)


def scrape(port: int, name: str) -> float | None:
    """One sample value from the worker's /metrics, or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else None


def stop(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_AGG_")}
    env.update(extra)
    return env


def with_db(url: str, name: str) -> str:
    """The same server URL with another database name."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def create_database(base_url: str) -> tuple[str, str]:
    import psycopg

    name = f"stream_agg_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, with_db(base_url, name)


def drop_database(base_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = c.partitions_for_topic(topic) or set()
        return {tp.partition: int(o) for tp, o in c.end_offsets([TopicPartition(topic, p) for p in parts]).items()}
    finally:
        c.close()


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        with contextlib.suppress(Exception):
            admin.delete_topics(topics)
    finally:
        admin.close()


def load_topic(bootstrap: str, topic: str, partitions: int, n: int, per_message: int, *, seed: int,
               hours: float, users: int) -> tuple[int, float, dict[int, int]]:
    """Write n synthetic events (per_message > 1: JSON arrays, round robin; 1: one event keyed by trace_id).

    Returns (messages, seconds, end offsets). The end offsets come from the offsets the broker
    acknowledged to the producer, not from ListOffsets: Tansu answers ListOffsets(latest) with
    the base offset of the partition's last record batch + 1, short by the batch's other records.
    """
    import orjson
    from kafka import KafkaProducer

    from stream_agg.kafka.admin import ensure_topics
    from stream_agg.synthetic import iter_events

    ensure_topics(bootstrap, {topic: partitions})
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=256 * 1024,
                             max_request_size=4 * 1024 * 1024)
    ends: dict[int, int] = {}
    errors: list[BaseException] = []

    def acked(meta: Any) -> None:
        if meta.offset + 1 > ends.get(meta.partition, 0):
            ends[meta.partition] = meta.offset + 1

    def send(value: bytes, **kw: Any) -> None:
        producer.send(topic, value=value, **kw).add_callback(acked).add_errback(errors.append)

    began = time.perf_counter()
    messages = 0
    try:
        chunk: list[dict[str, Any]] = []
        for event in iter_events(n, seed, START, hours, users=users):
            if per_message == 1:
                send(orjson.dumps(event), key=event["trace_id"].encode())
                messages += 1
                continue
            chunk.append(event)
            if len(chunk) == per_message:
                send(orjson.dumps(chunk), partition=messages % partitions)
                messages += 1
                chunk = []
        if chunk:
            send(orjson.dumps(chunk), partition=messages % partitions)
            messages += 1
        producer.flush()
    finally:
        producer.close()
    if errors:
        raise RuntimeError(f"{len(errors)} messages not delivered: {errors[0]!r}")
    return messages, time.perf_counter() - began, {p: ends.get(p, 0) for p in range(partitions)}


# ============================================================== measured runs

@dataclass
class WorkerResult:
    durable_s: float
    folded_s: float | None
    cpu_s: float
    broker_cpu_s: float
    pg_cpu_s: float
    rss_bytes: int
    flushes: int
    flush_s: float  # sum of the worker's own "flushed ... in X s" figures
    failures: int  # "flush failed" + "processing paused" log lines
    check: str
    t0_source: str


@dataclass
class Scenario:
    number: int
    title: str
    events: int
    per_message: int
    archive: bool
    reference: str  # "floor" or "bare"
    topic: str = ""
    messages: int = 0
    ends: dict[int, int] = field(default_factory=dict)
    worker: list[WorkerResult] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)  # events/s
    bare: list[float] = field(default_factory=list)  # messages/s


class Bench:
    def __init__(self, args: argparse.Namespace, bootstrap: str, broker_pid: int | None, workdir: Path) -> None:
        self.args = args
        self.bootstrap = bootstrap
        self.broker_pid = broker_pid
        self.workdir = workdir
        self.profile_dir = Path(args.profile).resolve() if args.profile else None

    # ---------------------------------------------------------------- references

    def run_floor(self, sc: Scenario) -> float:
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_floor", self.bootstrap, sc.topic,
                              json.dumps(sc.ends)], capture_output=True, text=True, cwd=self.workdir,
                             env=child_env(), timeout=self.args.timeout, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"floor reader failed:\n{out.stderr[-3000:]}")
        res = json.loads(result_line(out.stdout.splitlines()))
        if res["events"] != sc.events:
            raise RuntimeError(f"floor read {res['events']} events, expected {sc.events}")
        rate = res["events"] / res["seconds"]
        print(f"    aiokafka+orjson floor: {res['events']:,} events ({res['messages']:,} msgs) in "
              f"{res['seconds']:.2f} s = {rate:,.0f} events/s, peak RSS {res['rss_kb'] / 1024:.0f} MB", flush=True)
        return rate

    def run_bare(self, sc: Scenario, run: int) -> float:
        group = f"bench-bare-{uuid.uuid4().hex[:8]}"
        log = self.workdir / f"bare-s{sc.number}-r{run}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_bare", self.bootstrap,
                                     sc.topic, group, str(sc.messages)], stdout=subprocess.PIPE, stderr=err,
                                    cwd=self.workdir, env=child_env())
        try:
            assert proc.stdout is not None
            lines = []
            for raw in proc.stdout:  # blocks until the agent has counted every message
                lines.append(raw.decode(errors="replace"))
                if RESULT in lines[-1]:
                    break
            else:
                raise RuntimeError(f"bare Faust agent exited ({proc.wait()}):\n{log.read_text()[-3000:]}")
            res = json.loads(result_line(lines))
        finally:
            stop(proc)
        rate = res["messages"] / res["seconds"]
        print(f"    bare Faust agent: {res['messages']:,} msgs in {res['seconds']:.2f} s = {rate:,.0f} msgs/s, "
              f"peak RSS {res['rss_kb'] / 1024:.0f} MB", flush=True)
        return rate

    # ---------------------------------------------------------------- the worker

    def run_worker(self, sc: Scenario, run: int) -> WorkerResult:
        import psycopg

        from stream_agg.devstack import free_port

        args = self.args
        db_name, db_url = create_database(args.database_url)
        group = f"bench-{uuid.uuid4().hex[:8]}"
        stream = f"{group}:{sc.topic}"
        port = free_port()
        env = child_env(STREAM_AGG_KAFKA_BOOTSTRAP=self.bootstrap, STREAM_AGG_DATABASE_URL=db_url,
                        STREAM_AGG_TOPIC=sc.topic, STREAM_AGG_GROUP_ID=group,
                        STREAM_AGG_ARCHIVE="true" if sc.archive else "false",
                        STREAM_AGG_METRICS_PORT=str(port), STREAM_AGG_LOG_LEVEL="INFO", **FAST_JOIN)
        if args.flush_interval:
            env["STREAM_AGG_FLUSH_INTERVAL"] = args.flush_interval
        if args.batch_size:
            env["STREAM_AGG_BATCH_SIZE"] = str(args.batch_size)
        if args.worker_src:  # A/B a patched copy of the package
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(args.worker_src).resolve()),
                                                              env.get("PYTHONPATH")]))
        log = self.workdir / f"worker-s{sc.number}-r{run}.log"
        total = sum(sc.ends.values())
        spy: subprocess.Popen[bytes] | None = None
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "stream_agg", "worker"], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=self.workdir)
        try:
            deadline = time.monotonic() + args.timeout
            t0, t0_source = self._wait_start(proc, log, port, deadline)
            cpu0 = cpu_seconds(proc.pid)
            bcpu0 = cpu_seconds(self.broker_pid) if self.broker_pid else float("nan")
            if self.profile_dir is not None:
                spy = self._start_profiler(proc.pid, sc, run)
            folded_at: float | None = None
            next_scrape = next_pg = 0.0
            peak_tree = 0
            with psycopg.connect(db_url, autocommit=True) as conn:
                pg = BackendCpu(conn, db_name)
                while True:
                    now = time.monotonic()
                    if now >= next_pg:
                        pg.sample()
                        next_pg = now + 0.5
                    if folded_at is None and now >= next_scrape:
                        consumed = scrape(port, "stream_agg_events_consumed_total")
                        if consumed is not None and consumed >= sc.events:
                            folded_at = now
                        next_scrape = now + 0.25
                    try:
                        row = conn.execute("SELECT coalesce(sum(next_offset), 0) FROM stream_offsets "
                                           "WHERE stream = %s", (stream,)).fetchone()
                        durable = int(row[0]) if row else 0
                    except psycopg.errors.UndefinedTable:
                        durable = 0
                    if durable >= total:
                        t1 = time.monotonic()
                        pg.sample()
                        break
                    peak_tree = max(peak_tree, tree_rss(proc.pid))
                    if proc.poll() is not None:
                        raise RuntimeError(f"worker exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
                    if now > deadline:
                        raise RuntimeError(f"worker not caught up after {args.timeout}s ({durable}/{total} "
                                           f"messages durable):\n{log.read_text()[-3000:]}")
                    time.sleep(0.05)
            cpu1 = cpu_seconds(proc.pid)
            bcpu1 = cpu_seconds(self.broker_pid) if self.broker_pid else float("nan")
            rss = max(vm_hwm_kb(proc.pid) * 1024, peak_tree, tree_rss(proc.pid))
        finally:
            if spy is not None:
                self._stop_profiler(spy)
            stop(proc)
        try:
            check = self._check(db_url, sc)
        finally:
            drop_database(args.database_url, db_name)
        text = log.read_text(errors="replace")
        res = WorkerResult(durable_s=t1 - t0, folded_s=None if folded_at is None else folded_at - t0,
                           cpu_s=cpu1 - cpu0, broker_cpu_s=bcpu1 - bcpu0, pg_cpu_s=pg.total, rss_bytes=rss,
                           flushes=text.count("flushed partitions="),
                           flush_s=sum(float(x) for x in re.findall(r"flushed partitions=.* in ([0-9.]+)s", text)),
                           failures=text.count("flush failed") + text.count("processing paused"),
                           check=check, t0_source=t0_source)
        folded = f"{sc.events / res.folded_s:,.0f} events/s folded ({res.folded_s:.2f} s), " if res.folded_s else ""
        print(f"    worker: {sc.events:,} events durable in {res.durable_s:.2f} s = "
              f"{sc.events / res.durable_s:,.0f} events/s; {folded}"
              f"CPU {res.cpu_s:.1f} s ({res.cpu_s / res.durable_s:.2f} cores), broker CPU {res.broker_cpu_s:.1f} s, "
              f"PostgreSQL CPU {res.pg_cpu_s:.1f} s, "
              f"peak RSS {rss / 2**20:.0f} MB, {res.flushes} flushes taking {res.flush_s:.1f} s"
              + (f", {res.failures} FLUSH FAILURES / PAUSES (see log)" if res.failures else "")
              + f", check {check}"
              + ("" if t0_source == "log" else f" [t0 from {t0_source}]"), flush=True)
        if check != "ok" or res.failures:
            bad = [ln for ln in text.splitlines() if " WARNING " in ln or " ERROR " in ln]
            print("    !! worker log warnings:\n      " + "\n      ".join(ln[:300] for ln in bad[:10]), flush=True)
        return res

    def _wait_start(self, proc: subprocess.Popen[bytes], log: Path, port: int,
                    deadline: float) -> tuple[float, str]:
        """When the worker has joined its group: its POSITIONED log line (or, failing that, first consumption)."""
        last_scrape = 0.0
        while True:
            now = time.monotonic()
            if POSITIONED in log.read_text(errors="replace"):
                return now, "log"
            if now - last_scrape > 0.2:
                last_scrape = now
                consumed = scrape(port, "stream_agg_messages_consumed_total")
                if consumed:
                    return now, "first consumption in /metrics"
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            if now > deadline:
                raise RuntimeError(f"worker never started consuming:\n{log.read_text()[-3000:]}")
            time.sleep(0.01)

    def _check(self, db_url: str, sc: Scenario) -> str:
        import psycopg

        with psycopg.connect(db_url) as conn:
            row = conn.execute("SELECT coalesce(sum(count), 0) FROM metrics_aggregates WHERE granularity = 'hour' "
                               "AND metric_name = 'trace.duration_ms' AND dimension_type = 'all'").fetchone()
            counted = int(row[0]) if row else -1
            problems = [] if counted == sc.events else [f"hourly trace count {counted} != {sc.events}"]
            if sc.archive:
                row = conn.execute("SELECT count(*) FROM traces").fetchone()
                archived = int(row[0]) if row else -1
                if archived != sc.events:
                    problems.append(f"traces rows {archived} != {sc.events}")
        return "ok" if not problems else "FAILED: " + "; ".join(problems)

    # ---------------------------------------------------------------- profiling

    def _start_profiler(self, pid: int, sc: Scenario, run: int) -> subprocess.Popen[bytes]:
        assert self.profile_dir is not None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.profile_dir / f"worker-s{sc.number}-r{run}.txt"
        return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "100", "--nonblocking",
                                 "--threads", "--idle", "--format", "raw", "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _stop_profiler(self, spy: subprocess.Popen[bytes]) -> None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()

    # ---------------------------------------------------------------- a scenario

    def run_scenario(self, sc: Scenario) -> None:
        args = self.args
        sc.topic = f"bench-e2e-s{sc.number}-{uuid.uuid4().hex[:6]}"
        print(f"\n== scenario {sc.number}: {sc.title}", flush=True)
        try:
            sc.messages, seconds, sc.ends = load_topic(self.bootstrap, sc.topic, args.partitions, sc.events,
                                                       sc.per_message, seed=sc.number, hours=args.hours,
                                                       users=args.users)
            if sum(sc.ends.values()) != sc.messages:
                raise RuntimeError(f"broker acknowledged offsets up to {sc.ends}, sent {sc.messages} messages")
            listed = end_offsets(self.bootstrap, sc.topic)
            if listed != sc.ends:
                print(f"  note: the broker's ListOffsets(latest) says {listed}, its produce acks say {sc.ends} "
                      f"(Tansu under-reports multi-record batches); using the acks", flush=True)
            print(f"  loaded {sc.events:,} events in {sc.messages:,} messages into {sc.topic} "
                  f"({args.partitions} partitions: {sorted(sc.ends.values())}) in {seconds:.1f} s", flush=True)
            for run in range(1, args.runs + 1):
                print(f"  run {run}/{args.runs}", flush=True)
                refs = [self.run_floor] if sc.reference == "floor" else [self.run_floor, self.run_bare]
                steps: list[Any] = [("ref", r) for r in refs] + [("worker", None)]
                if run % 2 == 0:
                    steps.reverse()
                for kind, fn in steps:
                    if kind == "worker":
                        sc.worker.append(self.run_worker(sc, run))
                    elif fn == self.run_floor:
                        sc.floor.append(self.run_floor(sc))
                    else:
                        sc.bare.append(self.run_bare(sc, run))
            self._report(sc)
        finally:
            delete_topics(self.bootstrap, [sc.topic, f"{sc.topic}.dlq"])

    def _report(self, sc: Scenario) -> None:
        w = sc.worker
        durable = statistics.median(sc.events / r.durable_s for r in w)
        folded = [sc.events / r.folded_s for r in w if r.folded_s]
        floor = statistics.median(sc.floor)
        print(f"  median of {len(w)}: worker {durable:,.0f} events/s durable"
              + (f", {statistics.median(folded):,.0f} folded" if folded else "")
              + f"; floor {floor:,.0f} events/s; durable/floor {durable / floor:.1%}"
              + (f"; bare Faust {statistics.median(sc.bare):,.0f} msgs/s, worker/bare "
                 f"{durable / statistics.median(sc.bare):.1%}" if sc.bare else ""), flush=True)

    # ---------------------------------------------------------------- summary

    def summary(self, scenarios: list[Scenario]) -> None:
        print(f"\n== summary (medians of {self.args.runs} runs; peak RSS = max over runs; "
              f"rates in events/s; 'durable' = group joined -> all offsets durable in PostgreSQL)")
        head = (f"{'scenario':<34} {'worker durable':>14} {'worker folded':>13} {'reference':>22} "
                f"{'durable/ref':>11} {'peak RSS':>9} {'CPU cores':>9}  checks / targets")
        print(head)
        print("-" * len(head))
        for sc in scenarios:
            if not sc.worker:
                continue
            durable = statistics.median(sc.events / r.durable_s for r in sc.worker)
            folded_list = [sc.events / r.folded_s for r in sc.worker if r.folded_s]
            folded = f"{statistics.median(folded_list):,.0f}" if folded_list else "-"
            rss = max(r.rss_bytes for r in sc.worker)
            cores = statistics.median(r.cpu_s / r.durable_s for r in sc.worker)
            checks = "ok" if all(r.check == "ok" for r in sc.worker) else "CHECK FAILED"
            if any(r.failures for r in sc.worker):
                checks += f" ({sum(r.failures for r in sc.worker)} flush failures/pauses)"
            floor = statistics.median(sc.floor)
            rows = [(f"floor {floor:,.0f}", durable / floor)]
            if sc.bare:
                bare = statistics.median(sc.bare)
                rows.insert(0, (f"bare Faust {bare:,.0f}", durable / bare))
            notes = [checks]
            if sc.number == 1:
                notes += [f">=100k/s {'PASS' if durable >= 100_000 else 'FAIL'}",
                          f">=50% floor {'PASS' if durable >= 0.5 * floor else 'FAIL'}",
                          f"RSS<=1GB {'PASS' if rss <= 2**30 else 'FAIL'}"]
            for i, (ref, ratio) in enumerate(rows):
                if i == 0:
                    print(f"{sc.title[:34]:<34} {durable:>14,.0f} {folded:>13} {ref:>22} {ratio:>11.1%} "
                          f"{rss / 2**20:>6.0f} MB {cores:>9.2f}  {', '.join(notes)}")
                else:
                    print(f"{'':<34} {'':>14} {'':>13} {ref:>22} {ratio:>11.1%}")


# ============================================================== profile summary

IDLE = {  # frames where a thread waits rather than works (py-spy --idle samples them)
    "_worker (concurrent/futures/thread.py)": "idle: executor waiting for work",
    "EpollSelector.select (selectors.py)": "idle: event loop select",
    "_PollLikeSelector.select (selectors.py)": "idle: select",
    "Condition.wait (threading.py)": "idle: condition wait",
    "Connection.wait (psycopg/connection.py)": "WAITING FOR POSTGRESQL",
}


def summarize_profile(path: Path, top: int = 12) -> None:
    """Per busy thread of a py-spy raw profile (with idle samples, so shares are of wall time):
    its top self frames; then the top inclusive stream_agg functions over all threads."""
    if not path.exists():
        print(f"  (no profile at {path})")
        return
    per_thread: dict[str, Counter[str]] = {}
    thread_total: Counter[str] = Counter()
    thread_busy: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\d+\)(: )?", "", frames[0]) if frames[0].startswith("thread") else "?"
        thread = re.sub(r"Thread-\d+", "Thread-N", thread) or "unnamed"
        frames = [_short(f) for f in frames if not f.startswith(("thread", "process"))]
        thread_total[thread] += n
        if frames:
            per_thread.setdefault(thread, Counter())[frames[-1]] += n
            if not IDLE.get(frames[-1], "").startswith("idle"):
                thread_busy[thread] += n
                for f in set(frames):
                    if "stream_agg/" in f:
                        incl[f] += n
    wall = max(thread_total.values(), default=1)  # the main thread is sampled all along
    print(f"\n== profile {path} ({wall / 100:.0f} s at 100 Hz incl. idle; % = share of wall time)")
    for thread, busy in thread_busy.most_common():
        if busy < 0.03 * wall:
            continue
        print(f"  thread {thread}: busy {busy / wall:.0%} of wall (running, or waiting for the GIL or PostgreSQL)")
        for f, k in per_thread.get(thread, Counter()).most_common(top):
            label = f"   [{IDLE[f]}]" if f in IDLE else ""
            print(f"    {k / wall:6.1%}  {f}{label}")
    print("  inclusive, stream_agg functions (non-idle samples of all threads):")
    for f, k in incl.most_common(2 * top):
        if f.startswith(("<module>", "main (stream_agg/cli", "command (", "run_worker (")):
            continue
        print(f"    {k / wall:6.1%}  {f}")


def _short(frame: str) -> str:
    """'fn (/long/path/site-packages/pkg/mod.py:12)' -> 'fn (pkg/mod.py)' (lines merged)."""
    frame = re.sub(r"\(.*?(?:site-packages|python3\.\d+|/work/main)/", "(", frame)
    return re.sub(r":\d+\)$", ")", frame)


# ============================================================== main

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_floor":
        floor_main(*sys.argv[2:5])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_summarize":  # re-read saved profiles
        for name in sys.argv[2:]:
            summarize_profile(Path(name))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_bare":
        bare_main(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--scenarios", default="1,2,3", help="comma-separated scenario numbers (1,2,3)")
    parser.add_argument("--runs", type=int, default=2, help="measured runs per scenario (median reported)")
    parser.add_argument("--batched", type=int, default=1_000_000, help="events in scenarios 1 and 2")
    parser.add_argument("--batch-events", type=int, default=500, help="events per message in scenarios 1 and 2")
    parser.add_argument("--single", type=int, default=100_000, help="events (one per message) in scenario 3")
    parser.add_argument("--hours", type=float, default=48.0, help="event-time span of the synthetic events")
    parser.add_argument("--users", type=int, default=2000, help="distinct users in the synthetic events")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--flush-interval", help="STREAM_AGG_FLUSH_INTERVAL for the worker (default: its own, 5s)")
    parser.add_argument("--batch-size", type=int, help="STREAM_AGG_BATCH_SIZE for the worker (default: its own)")
    parser.add_argument("--worker-src", metavar="DIR",
                        help="run the worker from the stream_agg package under DIR (A/B a patched copy)")
    parser.add_argument("--bootstrap", help="use this Kafka instead of starting an embedded broker")
    parser.add_argument("--database-url", default=BASE_DATABASE_URL,
                        help="PostgreSQL to create the per-run databases in")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds allowed per measured run")
    parser.add_argument("--profile", metavar="DIR", help="py-spy record every worker run into DIR")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the worker / bare-agent logs to DIR")
    args = parser.parse_args()

    wanted = [int(s) for s in args.scenarios.split(",") if s.strip()]
    all_scenarios = {
        1: Scenario(1, f"1 batched x{args.batch_events}, archive off", args.batched, args.batch_events, False,
                    "floor"),
        2: Scenario(2, f"2 batched x{args.batch_events}, archive ON", args.batched, args.batch_events, True, "floor"),
        3: Scenario(3, "3 single-event msgs, archive off", args.single, 1, False, "bare"),
    }
    scenarios = [all_scenarios[n] for n in wanted]

    from stream_agg.devstack import EmbeddedBroker, postgres_reachable

    if not postgres_reachable(args.database_url):
        raise SystemExit(f"PostgreSQL not reachable at {args.database_url}")
    import aiokafka
    import faust

    print(f"stream_e2e: {code_version(args.worker_src)}", flush=True)
    print(f"stream_e2e: python {sys.version.split()[0]}, faust {faust.__version__}, aiokafka {aiokafka.__version__}, "
          f"{os.cpu_count()} CPUs; worker flush interval {args.flush_interval or 'default (5s)'}, "
          f"batch size {args.batch_size or 'default (5000 msgs)'}; {args.partitions} partitions; "
          f"{args.hours:g} h of event time, {args.users:,} users; runs {args.runs}"
          + (f"; worker from {args.worker_src}" if args.worker_src else ""), flush=True)
    broker = None
    workdir = Path(tempfile.mkdtemp(prefix="stream-e2e-"))
    try:
        if args.bootstrap:
            bootstrap, broker_pid = args.bootstrap, None
        else:
            broker = EmbeddedBroker().start()
            bootstrap, broker_pid = broker.bootstrap, broker.pid
            print(f"embedded broker on {bootstrap} (pid {broker_pid})", flush=True)
        bench = Bench(args, bootstrap, broker_pid, workdir)
        done = []
        for sc in scenarios:
            bench.run_scenario(sc)
            done.append(sc)
        bench.summary(done)
        if bench.profile_dir is not None:
            for path in sorted(bench.profile_dir.glob("worker-*.txt")):
                summarize_profile(path)
    finally:
        if broker is not None:
            broker.stop()
        if args.keep_logs:
            import shutil

            dest = Path(args.keep_logs)
            dest.mkdir(parents=True, exist_ok=True)
            for f in workdir.glob("*.log"):
                shutil.copy(f, dest / f.name)
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
