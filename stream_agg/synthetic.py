"""Deterministic synthetic workload: completed-trace events that look like production.

Used by `stream-agg produce --synthetic`, the demo, benchmarks and tests. Pure: no I/O,
no wall clock, no global random state. Events are built block by block; each block of
`BLOCK` events draws from its own numpy Generator seeded with `(seed, block_index)`, so
`iter_events` can stream 1e7 events in bounded memory and still yield exactly what
`generate_events` returns, byte for byte once serialized.

Shape of the data (what the aggregator has to cope with):
- event time spread evenly over [start, start + hours), mostly increasing; a fraction
  (`disorder_fraction`) moved back by seconds to minutes (never before `start`), and a
  few (`late_fraction`) moved back by 1 hour to 6 days (late corrections, never
  `too_late` under the default 7-day horizon);
- `started_at` mostly in UTC ("Z" or "+00:00"), some with other offsets that denote the
  same instant, so the consumer must honour offsets;
- Zipf-skewed users and knowledge bases, so a few values dominate (cardinality caps);
- lognormal latencies whose medians differ per operation type and per model;
- ~2% errors, some null users / kbs / token counts, 0..4 spans per trace.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np

BLOCK = 8192
"""Events per internal block. Part of the output's definition: changing it changes the data."""

# operation type: (weight, median ms when the trace has no spans, kb probability,
#                  P(0..4 spans), P(kind = llm, retrieval, tool))
_OPS: tuple[tuple[str, float, float, float, tuple[float, ...], tuple[float, ...]], ...] = (
    ("chat", 0.38, 1500.0, 0.6, (0.05, 0.35, 0.35, 0.15, 0.10), (0.60, 0.30, 0.10)),
    ("search", 0.24, 300.0, 1.0, (0.10, 0.50, 0.30, 0.10, 0.00), (0.30, 0.70, 0.00)),
    ("generation", 0.12, 3500.0, 0.0, (0.05, 0.70, 0.15, 0.10, 0.00), (0.85, 0.00, 0.15)),
    ("summarize", 0.10, 2500.0, 0.5, (0.05, 0.45, 0.35, 0.15, 0.00), (0.75, 0.25, 0.00)),
    ("embed", 0.10, 80.0, 0.0, (0.70, 0.30, 0.00, 0.00, 0.00), (1.00, 0.00, 0.00)),
    ("agent", 0.06, 6000.0, 0.3, (0.00, 0.10, 0.25, 0.30, 0.35), (0.50, 0.20, 0.30)),
)
OPERATION_TYPES: tuple[str, ...] = tuple(o[0] for o in _OPS)
_OP_P = np.array([o[1] for o in _OPS])
_OP_MEDIAN = np.array([o[2] for o in _OPS])
_OP_KB_P = np.array([o[3] for o in _OPS])
_OP_NSPANS_CUM = np.cumsum(np.array([o[4] for o in _OPS]), axis=1)
_OP_KIND_CUM = np.cumsum(np.array([o[5] for o in _OPS]), axis=1)
_EMBED_OP = OPERATION_TYPES.index("embed")

SPAN_KINDS: tuple[str, ...] = ("llm", "retrieval", "tool")
_KIND_LLM, _KIND_RETRIEVAL, _KIND_TOOL = 0, 1, 2
_KIND_MEDIAN = np.array([0.0, 90.0, 250.0])  # llm latency comes from the model
_KIND_SIGMA = np.array([0.0, 0.5, 0.8])

# model: (weight among chat models, median latency ms, sigma); the embedding model is
# used only (and always) by `embed` traces.
_MODELS: tuple[tuple[str, float, float, float], ...] = (
    ("gpt-4o", 0.25, 1400.0, 0.50),
    ("gpt-4o-mini", 0.40, 600.0, 0.45),
    ("claude-3-5-sonnet", 0.20, 1700.0, 0.50),
    ("llama-3-70b", 0.15, 900.0, 0.55),
    ("text-embedding-3-small", 0.0, 60.0, 0.30),
)
MODELS: tuple[str, ...] = tuple(m[0] for m in _MODELS)
_CHAT_MODEL_P = np.array([m[1] for m in _MODELS[:-1]])
_MODEL_MEDIAN = np.array([m[2] for m in _MODELS])
_MODEL_SIGMA = np.array([m[3] for m in _MODELS])
_EMBED_MODEL = len(_MODELS) - 1

# RFC 3339 suffix, minutes east of UTC, probability.
_OFFSETS: tuple[tuple[str, int, float], ...] = (
    ("Z", 0, 0.80),
    ("+00:00", 0, 0.10),
    ("+05:30", 330, 0.03),
    ("-07:00", -420, 0.03),
    ("+09:00", 540, 0.02),
    ("-03:30", -210, 0.01),
    ("+01:00", 60, 0.01),
)
_OFFSET_CUM = np.cumsum([o[2] for o in _OFFSETS])
_OFFSET_MS = np.array([o[1] * 60_000 for o in _OFFSETS], dtype=np.int64)

ERROR_RATE = 0.02
SPAN_ERROR_RATE = 0.01
NULL_USER_RATE = 0.02
NULL_TOKENS_RATE = 0.03
USER_ZIPF_S = 1.1
KB_ZIPF_S = 1.0
_DISORDER_SCALE_S = 20.0
_DISORDER_MAX_S = 600.0
_LATE_MIN_S = 3600.0
_LATE_MAX_S = 6 * 86400.0


def _zipf_cdf(k: int, s: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, k + 1, dtype=np.float64) ** s
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _pick(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index of the category for uniforms `u` given a cumulative distribution `cum`."""
    return np.minimum(np.searchsorted(cum, u, side="right"), len(cum) - 1)


def _pick_rows(cum_rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Like `_pick` with a different cumulative distribution per element (rows)."""
    return np.minimum((u[:, None] >= cum_rows).sum(axis=1), cum_rows.shape[1] - 1)


def _lognormal(rng: np.random.Generator, median: np.ndarray, sigma: np.ndarray | float,
               size: int) -> np.ndarray:
    return median * np.exp(sigma * rng.standard_normal(size))


class _Params:
    """Validated arguments plus the tables derived from them, shared by all blocks."""

    def __init__(self, n: int, seed: int, start: datetime, hours: float, users: int, kbs: int,
                 late_fraction: float, disorder_fraction: float) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not hours > 0:
            raise ValueError(f"hours must be > 0, got {hours}")
        if users < 1 or kbs < 1:
            raise ValueError(f"users and kbs must be >= 1, got {users}, {kbs}")
        for name, frac in (("late_fraction", late_fraction),
                           ("disorder_fraction", disorder_fraction)):
            if not 0.0 <= frac <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {frac}")
        if start.tzinfo is None:
            start = start.replace(tzinfo=UTC)  # naive means UTC, as everywhere in stream-agg
        self.n, self.seed = n, seed
        delta = start - datetime(1970, 1, 1, tzinfo=UTC)
        self.start_ms = delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000
        self.span_ms = hours * 3_600_000.0
        self.late_fraction, self.disorder_fraction = late_fraction, disorder_fraction
        self.user_cdf = _zipf_cdf(users, USER_ZIPF_S)
        self.kb_cdf = _zipf_cdf(kbs, KB_ZIPF_S)
        width_u, width_k = len(str(users)), len(str(kbs))
        self.user_ids = [f"user-{k:0{width_u}d}" for k in range(1, users + 1)]
        self.kb_ids = [f"kb-{k:0{width_k}d}" for k in range(1, kbs + 1)]


def _block(p: _Params, block: int) -> list[dict[str, Any]]:
    """Events with global indices [block * BLOCK, min(n, (block + 1) * BLOCK))."""
    i0 = block * BLOCK
    m = min(p.n, i0 + BLOCK) - i0
    rng = np.random.default_rng([p.seed, block])

    # Event time: evenly spread and increasing, then disorder and lateness.
    idx = np.arange(i0, i0 + m, dtype=np.float64)
    t = p.start_ms + np.floor((idx + rng.random(m)) * (p.span_ms / p.n)).astype(np.int64)
    t = np.minimum(t, p.start_ms + int(np.ceil(p.span_ms)) - 1)
    disorder = rng.random(m) < p.disorder_fraction
    shift = np.clip(rng.exponential(_DISORDER_SCALE_S, m), 1.0, _DISORDER_MAX_S) * 1000
    t = np.where(disorder, np.maximum(t - shift.astype(np.int64), p.start_ms), t)
    late = rng.random(m) < p.late_fraction
    age = np.exp(rng.uniform(np.log(_LATE_MIN_S), np.log(_LATE_MAX_S), m)) * 1000
    t = np.where(late, t - age.astype(np.int64), t)
    off = _pick(_OFFSET_CUM, rng.random(m))
    local = np.datetime_as_string((t + _OFFSET_MS[off]).astype("datetime64[ms]"), unit="ms")

    # Trace attributes.
    op = _pick(np.cumsum(_OP_P), rng.random(m))
    error = rng.random(m) < ERROR_RATE
    user = _pick(p.user_cdf, rng.random(m))
    user_null = rng.random(m) < NULL_USER_RATE
    kb = _pick(p.kb_cdf, rng.random(m))
    has_kb = rng.random(m) < _OP_KB_P[op]
    tokens_null = rng.random(m) < NULL_TOKENS_RATE
    base_ms = _lognormal(rng, _OP_MEDIAN[op], 0.6, m)
    overhead_ms = _lognormal(rng, 30.0, 0.7, m)

    # Spans, flattened: span k belongs to event ev[k] at position pos[k].
    nspans = _pick_rows(_OP_NSPANS_CUM[op], rng.random(m))
    total = int(nspans.sum())
    first = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(nspans, out=first[1:])
    ev = np.repeat(np.arange(m), nspans)
    pos = np.arange(total) - first[ev]
    kind = _pick_rows(_OP_KIND_CUM[op[ev]], rng.random(total))
    model = _pick(np.cumsum(_CHAT_MODEL_P), rng.random(total))
    model = np.where(op[ev] == _EMBED_OP, _EMBED_MODEL, model)
    is_llm = kind == _KIND_LLM
    llm_ms = _lognormal(rng, _MODEL_MEDIAN[model], _MODEL_SIGMA[model], total)
    other_ms = _lognormal(rng, _KIND_MEDIAN[kind], _KIND_SIGMA[kind], total)
    span_ms = np.round(np.where(is_llm, llm_ms, other_ms), 3)
    embed_span = model == _EMBED_MODEL
    in_tok = np.maximum(1, _lognormal(rng, np.where(embed_span, 300.0, 800.0), 0.8, total))
    in_tok = in_tok.astype(np.int64)
    out_tok = np.where(embed_span, 0, np.maximum(1, _lognormal(rng, 220.0, 0.7, total)))
    out_tok = out_tok.astype(np.int64)
    last = pos == nspans[ev] - 1
    span_err = (rng.random(total) < SPAN_ERROR_RATE) | (error[ev] & last)

    span_sum = np.bincount(ev, weights=span_ms, minlength=m)
    duration = np.round(np.where(nspans > 0, span_sum + overhead_ms, base_ms), 3)
    llm_tok = np.bincount(ev, weights=np.where(is_llm, in_tok + out_tok, 0), minlength=m)
    llm_count = np.bincount(ev, weights=is_llm, minlength=m)
    tokens_ok = (llm_count > 0) & ~tokens_null

    # Build the dicts from plain Python lists (no numpy scalars reach the JSON encoder).
    seed, kinds, models = p.seed, SPAN_KINDS, MODELS
    span_dicts: list[dict[str, Any]] = []
    for e, j, k, mo, d, it, ot, er in zip(ev.tolist(), pos.tolist(), kind.tolist(),
                                           model.tolist(), span_ms.tolist(), in_tok.tolist(),
                                           out_tok.tolist(), span_err.tolist(), strict=True):
        span: dict[str, Any] = {"span_id": f"t-{seed}-{i0 + e}-s{j}", "kind": kinds[k]}
        if k == _KIND_LLM:
            span["model"] = models[mo]
            span["duration_ms"] = d
            span["input_tokens"] = it
            span["output_tokens"] = ot
        else:
            span["duration_ms"] = d
            span["input_tokens"] = None
            span["output_tokens"] = None
        span["status"] = "error" if er else "ok"
        span_dicts.append(span)

    user_ids, kb_ids, ops = p.user_ids, p.kb_ids, OPERATION_TYPES
    suffixes = [o[0] for o in _OFFSETS]
    first_l = first.tolist()
    out: list[dict[str, Any]] = []
    for e, (ts, of, o, er, u, un, k, hk, d, tok, tk) in enumerate(zip(
            local.tolist(), off.tolist(), op.tolist(), error.tolist(), user.tolist(),
            user_null.tolist(), kb.tolist(), has_kb.tolist(), duration.tolist(),
            llm_tok.tolist(), tokens_ok.tolist(), strict=True)):
        out.append({
            "schema_version": 1,
            "trace_id": f"t-{seed}-{i0 + e}",
            "operation_type": ops[o],
            "started_at": ts + suffixes[of],
            "duration_ms": d,
            "status": "error" if er else "ok",
            "user_id": None if un else user_ids[u],
            "kb_id": kb_ids[k] if hk else None,
            "total_tokens": int(tok) if tk else None,
            "spans": span_dicts[first_l[e]:first_l[e + 1]],
        })
    return out


def iter_events(n: int, seed: int, start: datetime, hours: float, *, users: int = 2000,
                kbs: int = 200, late_fraction: float = 0.002,
                disorder_fraction: float = 0.02) -> Iterator[dict[str, Any]]:
    """Yield the events of `generate_events` one by one, holding one block in memory.

    A naive `start` is taken as UTC.
    """
    p = _Params(n, seed, start, hours, users, kbs, late_fraction, disorder_fraction)
    for block in range((n + BLOCK - 1) // BLOCK):
        yield from _block(p, block)


def generate_events(n: int, seed: int, start: datetime, hours: float, *, users: int = 2000,
                    kbs: int = 200, late_fraction: float = 0.002,
                    disorder_fraction: float = 0.02) -> list[dict[str, Any]]:
    """`n` JSON-able trace events; same arguments give the same events (see module doc)."""
    p = _Params(n, seed, start, hours, users, kbs, late_fraction, disorder_fraction)
    out: list[dict[str, Any]] = []
    for block in range((n + BLOCK - 1) // BLOCK):
        out.extend(_block(p, block))
    return out
