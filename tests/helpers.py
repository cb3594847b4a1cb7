"""Test helpers: random event sets and an independent, slow, obviously-correct aggregation."""

from __future__ import annotations

import os
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import numpy as np

from stream_agg.core.buckets import GRANULARITIES, bucket_start
from stream_agg.core.cardinality import capped_values
from stream_agg.core.fold import Columns, PartitionState, fold_events
from stream_agg.core.merged_rows import RowBlock, merged_blocks
from stream_agg.core.registry import DIMENSIONS, OTHER, Registry
from stream_agg.events import TraceEvent
from stream_agg.kafka.decode_pool import DecodedPart

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def make_events(n: int, seed: int = 0, hours: float = 6.0, users: int = 50, start: datetime = T0,
                null_rate: float = 0.1) -> list[TraceEvent]:
    """Random valid events with nulls, errors, several models and non-UTC offsets."""
    rng = np.random.default_rng(seed)
    ops = ["chat", "search", "generation", "summarize"]
    models = ["gpt-4o", "gpt-4o-mini", "claude", None]
    out = []
    for i in range(n):
        offset = timezone(timedelta(hours=int(rng.integers(-11, 12)), minutes=int(rng.choice([0, 30]))))
        t = (start + timedelta(seconds=float(rng.uniform(0, hours * 3600)))).astimezone(offset)
        spans = []
        for j in range(int(rng.integers(0, 4))):
            kind = str(rng.choice(["llm", "llm", "retrieval", "tool"]))
            spans.append({
                "span_id": f"s{j}", "kind": kind,
                "model": models[int(rng.integers(0, 4))] if kind == "llm" else None,
                "duration_ms": float(rng.lognormal(5, 1)),
                "input_tokens": None if rng.random() < null_rate else int(rng.integers(0, 5000)),
                "output_tokens": None if rng.random() < null_rate else int(rng.integers(0, 2000)),
            })
        out.append(msgspec.convert({
            "schema_version": 1,
            "trace_id": f"t-{seed}-{i}",
            "operation_type": ops[int(rng.integers(0, len(ops)))],
            "started_at": t.isoformat(),
            "duration_ms": float(rng.lognormal(6, 1.2)),
            "status": "error" if rng.random() < 0.05 else "ok",
            "user_id": None if rng.random() < null_rate else f"u{int(rng.zipf(1.5)) % users}",
            "kb_id": None if rng.random() < null_rate else f"kb{int(rng.integers(0, 8))}",
            "total_tokens": None if rng.random() < null_rate else int(rng.integers(0, 8000)),
            "spans": spans,
        }, TraceEvent))
    return out


def reference_values(events: list[TraceEvent], registry: Registry) -> dict[tuple, list[float]]:
    """Key -> raw values, computed row by row in plain Python, caps applied globally."""
    raw: dict[tuple, list[float]] = defaultdict(list)
    for e in events:
        ts = e.started_at.timestamp()
        for m in registry.metrics:
            rows = [(e, None)] if m.level == "trace" else [(e, s) for s in e.spans if s.kind == "llm"]
            for trace, span in rows:
                src = trace if m.level == "trace" else span
                v = getattr(src, m.field)
                if m.is_error:
                    v = 1.0 if v == "error" else 0.0
                if v is None:
                    continue
                for dim in m.dimensions:
                    d = DIMENSIONS[dim]
                    if d.on == "const":
                        dv = "all"
                    elif d.on == "trace":
                        dv = getattr(trace, d.field)
                    else:
                        dv = getattr(span, d.field)
                    if dv is None:
                        continue
                    for g in GRANULARITIES:
                        raw[(g, bucket_start(ts, g), m.name, dim, dv)].append(float(v))
    out: dict[tuple, list[float]] = defaultdict(list)
    scopes: dict[tuple, list[str]] = defaultdict(list)
    for key in raw:
        scopes[key[:4]].append(key[4])
    for scope, values in scopes.items():
        cap = registry.cap(scope[3])
        kept = capped_values(values, cap) if cap is not None else set(values)
        for v in values:
            target = v if v in kept else OTHER
            out[(*scope, target)].extend(raw[(*scope, v)])
    return dict(out)


def rank_error(values: np.ndarray, estimate: float, q: float) -> float:
    """How far (in rank, 0..1) an estimate of the q-quantile is from q.

    Ranks are read the way PERCENTILE_CONT writes them: the i-th smallest of n values
    sits at rank i / (n - 1) and ranks in between are linear, so the exact answer has
    error 0 (a plain count-based rank would charge even the exact answer up to 1/n).
    A run of equal values spans a range of ranks; any rank in it counts as exact.
    """
    s = np.sort(np.asarray(values, dtype=float))
    n = s.size
    if n == 1:
        return 0.0
    ranks = np.arange(n) / (n - 1)
    first = np.searchsorted(s, estimate, side="left")
    last = np.searchsorted(s, estimate, side="right") - 1
    if first <= last:  # the estimate equals data points: ranks[first]..ranks[last]
        lo, hi = ranks[first], ranks[last]
    elif first == 0 or first == n:
        lo = hi = 0.0 if first == 0 else 1.0
    else:  # strictly between s[first-1] and s[first]
        frac = (estimate - s[first - 1]) / (s[first] - s[first - 1])
        lo = hi = ranks[first - 1] + frac * (ranks[first] - ranks[first - 1])
    if lo <= q <= hi:
        return 0.0
    return float(min(abs(lo - q), abs(hi - q)))


def assert_same_columns(a: Columns, b: Columns) -> None:
    """Array for array, label for label (codes numbered alike)."""
    assert np.array_equal(a.ts, b.ts) and np.array_equal(a.offsets, b.offsets)
    assert a.levels.keys() == b.levels.keys()
    for name, la in a.levels.items():
        lb = b.levels[name]
        assert np.array_equal(la.ts, lb.ts) and np.array_equal(la.offsets, lb.offsets), name
        assert np.array_equal(la.parent, lb.parent), name
        assert la.values.keys() == lb.values.keys() and la.codes.keys() == lb.codes.keys()
        for k, v in la.values.items():
            assert v.dtype == lb.values[k].dtype and np.array_equal(v, lb.values[k], equal_nan=True), (name, k)
        for k, v in la.codes.items():
            assert la.labels[k] == lb.labels[k], (name, k)
            assert np.array_equal(v, lb.codes[k]), (name, k)


def assert_same_part(a: DecodedPart, b: DecodedPart) -> None:
    """Two decoded parts say the same: messages, rejects, archive text, offsets, times, columns."""
    assert (a.partition, a.messages, a.rejects, a.archive) == (b.partition, b.messages, b.rejects, b.archive)
    assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.ts, b.ts)
    assert (a.cols is None) == (b.cols is None)
    if a.cols is not None and b.cols is not None:
        assert_same_columns(a.cols, b.cols)


def merged_round_robin(events: list[TraceEvent], registry: Registry, partitions: int) -> list[RowBlock]:
    """The row blocks merged from `events` folded round robin into `partitions` partition
    states (event i into partition i % partitions, one fold each), every bucket held."""
    parts = [PartitionState(registry) for _ in range(partitions)]
    for i, p in enumerate(parts):
        fold_events(p, events[i::partitions], np.arange(i, len(events), partitions))
    return list(merged_blocks(parts, set().union(*(p.buckets for p in parts))))


def open_memfds() -> list[str]:
    """The memfds this process holds open (Linux), as descriptor numbers."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
                out.append(fd)
        except FileNotFoundError:  # the directory listing's own descriptor, closed since
            pass
    return out
