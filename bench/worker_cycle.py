"""The worker's own work without Kafka: decode + fold + flush of 1,000,000 events into PostgreSQL.

Why: `bench/stream_e2e.py` measures the whole worker, but the broker, Faust and the GIL
shared by three threads blur where the time goes. This drives the same `Processor` the
worker uses (same micro-batch size, same flush code, a real PostgreSQL) on one thread,
so each phase's cost per event and per row can be compared side by side between versions.

Messages are built like the e2e bench's topic: JSON arrays of --batch-events events,
round robin over --partitions partitions; a micro-batch is --take messages (the worker's
16 MB budget holds ~64 of them); a flush runs every --flush-every events, and once at the end.

    python bench/worker_cycle.py [--events 1000000] [--flush-every 333334] [--runs 1]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from collections import defaultdict
from datetime import UTC, datetime

import orjson
import psycopg

from stream_agg.config import load_config
from stream_agg.core.registry import default_registry
from stream_agg.kafka.processor import Message, Processor
from stream_agg.observability import Metrics
from stream_agg.store.db import scratch_database
from stream_agg.store.schema import migrate
from stream_agg.store.stream_state import StreamStore
from stream_agg.synthetic import iter_events

START = datetime(2024, 5, 1, tzinfo=UTC)


def build_messages(n: int, per_message: int, partitions: int, hours: float, users: int,
                   late_fraction: float) -> list[Message]:
    out: list[Message] = []
    offsets = [0] * partitions
    chunk: list[dict] = []

    def emit() -> None:
        p = len(out) % partitions
        out.append(Message(p, offsets[p], orjson.dumps(chunk)))
        offsets[p] += 1

    for event in iter_events(n, 1, START, hours, users=users, late_fraction=late_fraction):
        chunk.append(event)
        if len(chunk) == per_message:
            emit()
            chunk = []
    if chunk:
        emit()
    return out


def one_run(base_url: str, msgs: list[Message], args: argparse.Namespace) -> dict[str, float]:
    with scratch_database(base_url, "bench_cycle") as url:
        migrate(url)
        config = load_config(env={}, database_url=url, metrics_port=0, archive=args.archive)
        registry = default_registry(config.cardinality_caps)
        store = StreamStore(url)
        proc = Processor(config, registry, store, Metrics(job=f"bench{secrets.token_hex(3)}"), "bench:topic")
        proc.topic_partitions = args.partitions
        proc.assign(set(range(args.partitions)))
        t: dict[str, float] = defaultdict(float)
        rows = flushes = 0
        since = 0
        began = time.perf_counter()

        def flush() -> None:
            nonlocal rows, flushes
            snap = proc.snapshot()
            t["snapshot"] += snap.seconds + snap.merge_seconds  # taking the changes + merging the rows
            t["encode"] += snap.encode_seconds
            c = time.perf_counter()
            report = proc.write(snap)
            t["write"] += time.perf_counter() - c
            proc.commit(snap)
            if report is not None:
                rows += report.rows
                for k, v in report.seconds.items():
                    t["write." + k] += v
            flushes += 1

        for i in range(0, len(msgs), args.take):
            batch = [Message(m.partition, m.offset, m.value) for m in msgs[i:i + args.take]]
            c = time.perf_counter()
            out = proc.process(batch)
            t["process"] += time.perf_counter() - c
            since += out.folded_events
            if since >= args.flush_every:
                flush()
                since = 0
        flush()
        total = time.perf_counter() - began
        store.close()
        proc.reader.close()
        with psycopg.connect(url) as conn:
            final = conn.execute("SELECT count(*), sum(count) FILTER (WHERE granularity = 'hour' AND "
                                 "metric_name = 'trace.duration_ms' AND dimension_type = 'all') "
                                 "FROM metrics_aggregates").fetchone()
        return {"total": total, "rows_written": rows, "flushes": flushes, "final_rows": final[0],
                "check": final[1], **t}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--batch-events", type=int, default=500)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--take", type=int, default=64, help="messages per Processor.process call")
    ap.add_argument("--flush-every", type=int, default=333_334, help="events folded between flushes")
    ap.add_argument("--hours", type=float, default=48.0)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--late-fraction", type=float, default=0.002, help="events hours to days late (synthetic default)")
    ap.add_argument("--archive", action="store_true", help="raw archive on (off by default, as e2e scenario 1)")
    ap.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()

    c = time.perf_counter()
    msgs = build_messages(args.events, args.batch_events, args.partitions, args.hours, args.users,
                          args.late_fraction)
    print(f"built {len(msgs):,} messages of {args.batch_events} events in {time.perf_counter() - c:.1f}s")
    results = []
    for run in range(args.runs):
        r = one_run(args.database_url, msgs, args)
        results.append(r)
        phases = " ".join(f"{k} {v:.2f}s" for k, v in r.items()
                          if k not in ("total", "rows_written", "flushes", "final_rows", "check"))
        print(f"  run {run + 1}: {r['total']:.2f}s = {args.events / r['total']:,.0f} events/s; "
              f"{r['flushes']} flushes wrote {r['rows_written']:,} rows ({r['final_rows']:,} in the table); "
              f"{phases}")
        if r["check"] != args.events:
            raise SystemExit(f"check failed: hourly trace.duration_ms/all counts sum to {r['check']}, "
                             f"not {args.events}")
    med = statistics.median(r["total"] for r in results)
    print(f"median {med:.2f}s = {args.events / med:,.0f} events/s over {args.runs} runs (one thread, no broker)")


if __name__ == "__main__":
    main()
