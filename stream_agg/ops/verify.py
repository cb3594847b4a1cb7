"""Compare `metrics_aggregates` with the exact values recomputed in SQL, writing nothing.

Per row: count, min and max must be equal, sum and avg equal to 1e-9 relative, and for
digest metrics each stored p50 / p95 / p99 within a rank tolerance (default 0.1%) of the
raw values. Missing and extra rows are mismatches.

Rank error, measured against the raw values: PERCENTILE_CONT (and a t-digest holding every
value) interpolates linearly between neighbours, so the rank of a value x among n sorted
values s is the position p in [0, 1] where that interpolation yields x: i / (n - 1) for
x = s[i] (an interval over ties), fractional between neighbours. The error of a stored
q-quantile is the distance from q to that rank (0 when exact, 1 / (n - 1) one value off).

Capped dimensions are compared value by value too: the stream caps each bucket again over
the union of its partitions when it merges rows (`core.global_cap`), so it keeps the values
the exact rule keeps. (Rows written by a worker older than that may hold part of a value
that belongs in `__other__`; they show up here as mismatches, and a replay or backfill of
the range rewrites them.)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_agg.core.buckets import to_datetime
from stream_agg.core.registry import Registry
from stream_agg.ops.backfill import ExactRow, chunk_transaction, chunks, coarsest, compute_chunk, iso, widen
from stream_agg.store import backfill_sql as q
from stream_agg.store.db import connect

SUM_RTOL = 1e-9
DEFAULT_RANK_TOLERANCE = 0.001
QUANTILE_FIELDS = (("p50_value", 0.5), ("p95_value", 0.95), ("p99_value", 0.99))

Key = tuple[str, int, str, str, str]
Scope = tuple[str, int, str, str]


@dataclass(frozen=True)
class StoredRow:
    key: Key
    count: int
    sum: float
    min: float | None
    max: float | None
    avg: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    source: str


@dataclass(frozen=True)
class Mismatch:
    granularity: str
    bucket: str
    metric: str
    dimension: str
    value: str
    field: str
    stored: Any
    expected: Any
    source: str | None = None


@dataclass
class VerifyReport:
    start: int
    end: int
    buckets: int = 0
    rows: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "start": iso(self.start), "end": iso(self.end), "buckets": self.buckets,
                "rows": self.rows, "mismatches": [asdict(m) for m in self.mismatches]}


# ----------------------------------------------------------------------------- pure comparison


def rank_error(values: npt.NDArray[np.float64], estimate: float, q: float) -> float:
    """Distance (0..1) from q to the rank of `estimate` among sorted `values` (see module doc)."""
    n = int(values.size)
    if n == 0:
        return 1.0
    if n == 1:
        return 0.0 if estimate == values[0] else 1.0
    lo = int(np.searchsorted(values, estimate, side="left"))
    hi = int(np.searchsorted(values, estimate, side="right"))
    if hi > lo:
        p_lo, p_hi = lo / (n - 1), (hi - 1) / (n - 1)
    elif lo == 0:
        return q
    elif lo == n:
        return 1.0 - q
    else:
        below, above = float(values[lo - 1]), float(values[lo])
        p_lo = p_hi = (lo - 1 + (estimate - below) / (above - below)) / (n - 1)
    if p_lo <= q <= p_hi:
        return 0.0
    return min(abs(q - p_lo), abs(q - p_hi))


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=SUM_RTOL, abs_tol=1e-12)


def compare_row(exp: ExactRow, got: StoredRow, digest: bool, tolerance: float) -> list[tuple[str, Any, Any]]:
    """(field, stored, expected) for every field that does not agree."""
    out: list[tuple[str, Any, Any]] = []
    if got.count != exp.count:
        out.append(("count", got.count, exp.count))
    if not _close(got.sum, exp.sum):
        out.append(("sum_value", got.sum, exp.sum))
    if got.min != exp.min:
        out.append(("min_value", got.min, exp.min))
    if got.max != exp.max:
        out.append(("max_value", got.max, exp.max))
    if not _close(got.avg, exp.avg):
        out.append(("avg_value", got.avg, exp.avg))
    if digest and exp.values is not None:
        for name, frac in QUANTILE_FIELDS:
            stored = getattr(got, name[:3])
            wanted = getattr(exp, name[:3])
            if stored is None or rank_error(exp.values, stored, frac) > tolerance:
                out.append((name, stored, wanted))
    return out


def compare(expected: Sequence[ExactRow], stored: Sequence[StoredRow], registry: Registry,
            tolerance: float = DEFAULT_RANK_TOLERANCE) -> list[Mismatch]:
    """All mismatches between exact and stored rows."""
    digest_metrics = {m.name for m in registry.metrics if m.digest}
    exp_by: dict[Scope, dict[str, ExactRow]] = defaultdict(dict)
    got_by: dict[Scope, dict[str, StoredRow]] = defaultdict(dict)
    for e in expected:
        exp_by[e.key[:4]][e.key[4]] = e  # type: ignore[index]
    for g in stored:
        got_by[g.key[:4]][g.key[4]] = g  # type: ignore[index]
    mismatches: list[Mismatch] = []

    def add(scope: Scope, value: str, name: str, got: Any, want: Any, source: str | None) -> None:
        g, bucket, metric, dim = scope
        mismatches.append(Mismatch(g, iso(bucket), metric, dim, value, name, got, want, source))

    for scope in sorted(set(exp_by) | set(got_by)):
        exp, got = exp_by.get(scope, {}), got_by.get(scope, {})
        for value in sorted(set(exp) | set(got)):
            if value not in got:
                add(scope, value, "row", None, "missing", None)
            elif value not in exp:
                add(scope, value, "row", "extra", None, got[value].source)
            else:
                for name, a, b in compare_row(exp[value], got[value], scope[2] in digest_metrics, tolerance):
                    add(scope, value, name, a, b, got[value].source)
    return mismatches


# ----------------------------------------------------------------------------- shell


def load_stored(cur: Any, registry: Registry, granularities: Sequence[str], start: int, end: int) -> list[StoredRow]:
    cur.execute(q.STORED_ROWS_SQL, {"grans": list(granularities), "metrics": list(registry.names),
                                    "start": to_datetime(start), "end": to_datetime(end)})
    out = []
    for t, g, m, d, v, c, s, lo, hi, avg, p50, p95, p99, source in cur.fetchall():
        out.append(StoredRow((g, int(t.timestamp()), m, d, v), int(c), float(s), lo, hi, avg, p50, p95, p99,
                             source))
    return out


def run_verify(url: str, registry: Registry, granularities: Sequence[str], start: Any, end: Any,
               tolerance: float = DEFAULT_RANK_TOLERANCE) -> VerifyReport:
    """Verify [start, end) widened to whole buckets of the coarsest granularity, chunk by chunk."""
    grans = tuple(granularities)
    lo, hi = widen(start, end, coarsest(grans))
    report = VerifyReport(lo, hi)
    with connect(url) as conn:
        for a, b in chunks(lo, hi, coarsest(grans)):
            with chunk_transaction(conn, read_only=True) as cur:
                expected = compute_chunk(cur, registry, grans, a, b, with_values=True)
                stored = load_stored(cur, registry, grans, a, b)
            report.mismatches += compare(expected, stored, registry, tolerance)
            report.buckets += len({r.key[:2] for r in expected} | {r.key[:2] for r in stored})
            report.rows += len({r.key for r in expected} | {r.key for r in stored})
    return report


def format_report(report: VerifyReport, limit: int = 50) -> str:
    """A table of mismatches, or one line saying everything agrees."""
    lines = []
    if report.ok:
        lines.append(f"all {report.buckets} buckets agree ({report.rows} rows, {iso(report.start)} .. "
                     f"{iso(report.end)})")
        return "\n".join(lines)
    bad_buckets = len({(m.granularity, m.bucket) for m in report.mismatches})
    lines.append(f"{len(report.mismatches)} mismatches in {bad_buckets} of {report.buckets} buckets "
                 f"({iso(report.start)} .. {iso(report.end)}):")
    header = ("granularity", "bucket", "metric", "dimension", "value", "field", "stored", "expected", "source")
    table = [header] + [(m.granularity, m.bucket, m.metric, m.dimension, m.value, m.field, _fmt(m.stored),
                         _fmt(m.expected), m.source or "") for m in report.mismatches[:limit]]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if len(report.mismatches) > limit:
        lines.append(f"... and {len(report.mismatches) - limit} more (use --json for all)")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)
