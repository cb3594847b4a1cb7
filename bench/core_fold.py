"""Fold 1,000,000 synthetic events with the core (all default metrics, dimensions, granularities).

Prints events/s of the fold alone (decoding is done beforehand and not timed), the
per-value cost of the digest update measured in the same run, and peak memory.
Usage: python bench/core_fold.py [--events N] [--batch B] [--runs R]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from datetime import UTC, datetime

import numpy as np
import orjson

from stream_agg.core.aggstate import new_digest
from stream_agg.core.fold import PartitionState, fold, to_columns
from stream_agg.core.registry import default_registry
from stream_agg.events import decode_message
from stream_agg.synthetic import iter_events


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=20_000, help="events per fold call (a worker micro-batch)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hours", type=float, default=48)
    args = ap.parse_args()

    t = time.perf_counter()
    events = []
    chunk: list[dict] = []
    for e in iter_events(args.events, seed=7, start=datetime(2026, 1, 5, tzinfo=UTC), hours=args.hours):
        chunk.append(e)
        if len(chunk) == 1000:
            events.extend(decode_message(orjson.dumps(chunk)).events)
            chunk = []
    if chunk:
        events.extend(decode_message(orjson.dumps(chunk)).events)
    print(f"prepared {len(events):,} decoded events in {time.perf_counter() - t:.1f}s "
          f"({args.hours:.0f} h, 2,000 users, batch {args.batch:,} events per fold)")

    registry = default_registry({"user": 1000})
    rates = []
    for run in range(args.runs):
        ps = PartitionState(registry)
        t0 = time.perf_counter()
        for i in range(0, len(events), args.batch):
            part = events[i:i + args.batch]
            fold(ps, to_columns(part, np.arange(i, i + len(part)), registry))
        for table in ps.tables.values():  # digest values still deferred are part of the fold's work
            table.settle()
        dt = time.perf_counter() - t0
        rates.append(len(events) / dt)
        print(f"  run {run + 1}: {dt:.2f}s  {len(events) / dt:,.0f} events/s  states={len(ps):,}")
    print(f"fold: median {statistics.median(rates):,.0f} events/s over {args.runs} runs (target >= 300,000)")

    values = np.random.default_rng(1).lognormal(5, 1, 1_000_000)
    costs = []
    for _ in range(5):
        d = new_digest()
        t0 = time.perf_counter()
        d.batch_update(values)
        costs.append((time.perf_counter() - t0) / values.size * 1e9)
    print(f"digest batch_update: median {statistics.median(costs):.0f} ns/value (1e6 lognormal values)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak:,.0f} MB (includes the {len(events):,} decoded events held in memory)")


if __name__ == "__main__":
    main()
