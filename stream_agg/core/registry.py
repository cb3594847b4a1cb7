"""What is aggregated: one declarative list used by the stream, the replay and the SQL backfill.

A metric reads one value per *row* of its level: one row per trace (`trace` level) or one
row per span of kind `llm` (`llm` level). Each dimension reads one string per row; a null
value skips that dimension for that row, and a null metric value skips the metric.
Each definition carries both its Python accessor (for the stream) and its SQL expression
over the raw tables (for the backfill), side by side, so the two cannot drift apart
silently: `tests/unit/test_registry.py` checks that both read the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Level = Literal["trace", "llm"]

OTHER = "__other__"
ALL = "all"


@dataclass(frozen=True)
class Dimension:
    """A way to slice a metric.

    `field` names the attribute read per row: on the trace (`on="trace"`), on the span
    (`on="span"`), or nothing (`on="const"`, the `all` dimension). Attribute names rather
    than callables keep column extraction a C-speed `map(attrgetter(...))`.
    """

    name: str
    on: Literal["const", "trace", "span"]
    field: str
    sql: str  # SQL expression over the level's raw table alias `r`


@dataclass(frozen=True)
class Metric:
    """One aggregated value per row of its level.

    `field` is the attribute read (on the trace for level `trace`, on the span for `llm`);
    `is_error` turns a status field into 1.0 / 0.0 so sum = errors and avg = error rate.
    """

    name: str
    level: Level
    field: str
    sql: str  # SQL expression over the level's raw table alias `r`; NULL = skip
    dimensions: tuple[str, ...]
    digest: bool  # keep a t-digest (percentiles) -- the costliest per-value work
    is_error: bool = False


DIMENSIONS: dict[str, Dimension] = {
    d.name: d
    for d in (
        Dimension("all", "const", ALL, "'all'"),
        Dimension("operation_type", "trace", "operation_type", "r.operation_type"),
        Dimension("kb", "trace", "kb_id", "r.kb_id"),
        Dimension("user", "trace", "user_id", "r.user_id"),
        Dimension("model", "span", "model", "r.model"),
    )
}

TRACE_DIMS = ("all", "operation_type", "kb", "user")
LLM_DIMS = ("all", "model", "operation_type")

DEFAULT_METRICS: tuple[Metric, ...] = (
    Metric("trace.duration_ms", "trace", "duration_ms", "r.duration_ms", TRACE_DIMS, digest=True),
    Metric("trace.total_tokens", "trace", "total_tokens", "r.total_tokens::double precision",
           TRACE_DIMS, digest=False),
    Metric("trace.errors", "trace", "status",
           "CASE WHEN r.status = 'error' THEN 1.0::double precision ELSE 0.0::double precision END",
           TRACE_DIMS, digest=False, is_error=True),
    Metric("llm.duration_ms", "llm", "duration_ms", "r.duration_ms", LLM_DIMS, digest=True),
    Metric("llm.input_tokens", "llm", "input_tokens", "r.input_tokens::double precision",
           LLM_DIMS, digest=False),
    Metric("llm.output_tokens", "llm", "output_tokens", "r.output_tokens::double precision",
           LLM_DIMS, digest=False),
)

# Raw table and row filter per level, for SQL generated from the registry.
LEVEL_SQL: dict[Level, tuple[str, str]] = {
    "trace": ("traces", "TRUE"),
    "llm": ("spans", "r.kind = 'llm'"),
}

DEFAULT_CAPS: dict[str, int] = {"user": 1000}


@dataclass(frozen=True)
class Registry:
    """The metrics in force plus the per-dimension cardinality caps."""

    metrics: tuple[Metric, ...] = DEFAULT_METRICS
    caps: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_CAPS), hash=False)

    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.metrics)
        raise KeyError(f"unknown metric {name!r} (known: {known})")

    def select(self, names: list[str] | tuple[str, ...] | None) -> Registry:
        """A registry restricted to `names` (all when None or empty)."""
        if not names:
            return self
        return Registry(tuple(self.metric(n) for n in names), dict(self.caps))

    def by_level(self, level: Level) -> tuple[Metric, ...]:
        return tuple(m for m in self.metrics if m.level == level)

    def dimensions_of(self, level: Level) -> tuple[str, ...]:
        """Dimensions used by any metric of `level`, in first-seen order."""
        seen: dict[str, None] = {}
        for m in self.by_level(level):
            for d in m.dimensions:
                seen[d] = None
        return tuple(seen)

    def cap(self, dimension: str) -> int | None:
        return self.caps.get(dimension)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics)


def default_registry(caps: dict[str, int] | None = None) -> Registry:
    return Registry(DEFAULT_METRICS, dict(DEFAULT_CAPS if caps is None else caps))
