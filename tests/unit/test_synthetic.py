"""The synthetic workload is deterministic and has the shape the aggregator must cope with."""

from __future__ import annotations

import importlib.util
from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_agg.synthetic import BLOCK, MODELS, SPAN_KINDS, generate_events, iter_events

START = datetime(2024, 5, 1, tzinfo=UTC)
N = 60_000


@pytest.fixture(scope="module")
def events() -> list[dict]:
    return generate_events(N, 11, START, 24)


def _times(evs: list[dict]) -> np.ndarray:
    """Event times as epoch milliseconds, parsed with the standard library."""
    return np.array([datetime.fromisoformat(e["started_at"]).timestamp() * 1000 for e in evs])


def test_same_arguments_same_bytes_and_other_seed_differs():
    a = orjson.dumps(generate_events(3000, 5, START, 6))
    b = orjson.dumps(generate_events(3000, 5, START, 6))
    c = orjson.dumps(generate_events(3000, 6, START, 6))
    assert a == b
    assert a != c


def test_iter_events_yields_the_same_sequence_across_blocks():
    n = 2 * BLOCK + 17
    listed = generate_events(n, 9, START, 3, users=50, kbs=7)
    streamed = iter_events(n, 9, START, 3, users=50, kbs=7)
    assert orjson.dumps(list(streamed)) == orjson.dumps(listed)


def test_naive_start_is_utc():
    naive = datetime(2024, 5, 1)
    assert generate_events(500, 1, naive, 1) == generate_events(500, 1, START, 1)


def test_counts_and_unique_ids(events):
    assert len(events) == N
    assert generate_events(0, 1, START, 1) == []
    trace_ids = [e["trace_id"] for e in events]
    assert len(set(trace_ids)) == N
    assert trace_ids[:3] == ["t-11-0", "t-11-1", "t-11-2"]
    span_ids = [s["span_id"] for e in events for s in e["spans"]]
    assert len(set(span_ids)) == len(span_ids) > N
    assert all(0 <= len(e["spans"]) <= 4 for e in events)


def test_fields_follow_the_contract(events):
    for e in events:
        assert e["schema_version"] == 1
        assert 1 <= len(e["trace_id"]) <= 64
        assert isinstance(e["operation_type"], str) and 1 <= len(e["operation_type"]) <= 64
        assert datetime.fromisoformat(e["started_at"]).utcoffset() is not None
        assert isinstance(e["duration_ms"], float) and e["duration_ms"] >= 0
        assert e["status"] in ("ok", "error")
        assert e["user_id"] is None or isinstance(e["user_id"], str)
        assert e["kb_id"] is None or isinstance(e["kb_id"], str)
        assert e["total_tokens"] is None or (type(e["total_tokens"]) is int
                                             and e["total_tokens"] >= 0)
        for s in e["spans"]:
            assert s["kind"] in SPAN_KINDS
            assert s["duration_ms"] >= 0
            assert s["status"] in ("ok", "error")


def test_error_rate_is_about_two_percent(events):
    errors = np.array([e["status"] == "error" for e in events])
    # Binomial(60000, 0.02): sd = 0.00057; allow 5 sd.
    assert abs(errors.mean() - 0.02) < 0.003


def test_users_are_zipf_skewed(events):
    users = [e["user_id"] for e in events if e["user_id"] is not None]
    counts = np.array(sorted(Counter(users).values(), reverse=True))
    assert counts[0] > 50 * np.median(counts)
    # Share of the top user under Zipf(s=1.1) over 2000 ranks, computed here from scratch.
    expected_top = 1.0 / np.sum(1.0 / np.arange(1, 2001) ** 1.1)
    assert abs(counts[0] / len(users) - expected_top) < 0.01
    null_share = 1 - len(users) / len(events)
    assert 0.01 < null_share < 0.03


def test_kb_only_for_operation_types_with_a_kb(events):
    by_op: dict[str, list] = {}
    for e in events:
        by_op.setdefault(e["operation_type"], []).append(e["kb_id"])
    assert set(by_op) >= {"chat", "search", "generation", "summarize", "embed"}
    assert all(k is None for k in by_op["generation"] + by_op["embed"])
    assert all(k is not None for k in by_op["search"])
    chat_with_kb = np.mean([k is not None for k in by_op["chat"]])
    assert 0.5 < chat_with_kb < 0.7


def test_llm_spans_have_models_and_tokens_add_up(events):
    spans = [s for e in events for s in e["spans"]]
    llm = [s for s in spans if s["kind"] == "llm"]
    others = [s for s in spans if s["kind"] != "llm"]
    assert len(llm) > len(others) > 0
    assert all(s.get("model") in MODELS for s in llm)
    assert not any("model" in s for s in others)
    assert len({s["model"] for s in llm}) >= 4
    for e in events:
        llm_tokens = [s["input_tokens"] + s["output_tokens"] for s in e["spans"]
                      if s["kind"] == "llm"]
        if e["total_tokens"] is not None:
            assert e["total_tokens"] == sum(llm_tokens)
    nulls = np.mean([e["total_tokens"] is None for e in events])
    assert 0.03 < nulls < 0.5


def test_latency_medians_differ_per_operation_type_and_model(events):
    def median(values: list[float]) -> float:
        return float(np.median(np.array(values)))

    by_op: dict[str, list[float]] = {}
    for e in events:
        by_op.setdefault(e["operation_type"], []).append(e["duration_ms"])
    assert median(by_op["embed"]) < median(by_op["search"]) < median(by_op["chat"])
    assert median(by_op["chat"]) < median(by_op["agent"])
    by_model: dict[str, list[float]] = {}
    for e in events:
        for s in e["spans"]:
            if s["kind"] == "llm":
                by_model.setdefault(s["model"], []).append(s["duration_ms"])
    assert median(by_model["gpt-4o-mini"]) < median(by_model["gpt-4o"])
    # Lognormal with median 600 ms: the sample median is within a few percent.
    assert abs(median(by_model["gpt-4o-mini"]) / 600 - 1) < 0.05


def test_times_in_range_mostly_ordered_with_some_disorder_and_late(events):
    t = _times(events)
    start_ms = START.timestamp() * 1000
    end_ms = (START + timedelta(hours=24)).timestamp() * 1000
    assert t.min() >= start_ms - 7 * 86_400_000
    assert t.max() < end_ms
    running_max = np.maximum.accumulate(t)
    behind = running_max - t
    disordered = (behind > 0) & (behind <= 600_000)
    late = behind >= 3_600_000
    # ~2% moved back up to 10 minutes (some land after their neighbour anyway), ~0.2% late.
    assert 0.005 * N < disordered.sum() < 0.03 * N
    assert 0.001 * N < late.sum() < 0.004 * N
    assert (behind < 6 * 86_400_000 + 3_600_000).all()
    in_window = (t >= start_ms).mean()
    assert in_window > 0.99


def test_offsets_vary_but_denote_the_same_instant():
    evs = generate_events(20_000, 2, START, 2, late_fraction=0.0, disorder_fraction=0.0)
    suffixes = Counter(e["started_at"][-6:] if not e["started_at"].endswith("Z") else "Z"
                       for e in evs)
    assert suffixes["Z"] > 0.7 * len(evs)
    assert suffixes["+00:00"] > 0
    assert {"+05:30", "-07:00"} <= set(suffixes)
    # Without disorder the instants are non-decreasing: a local time labelled with the
    # wrong offset would jump by hours.
    t = _times(evs)
    assert (np.diff(t) >= 0).all()
    assert t[0] >= START.timestamp() * 1000
    assert t[-1] < (START + timedelta(hours=2)).timestamp() * 1000


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="n must be"):
        generate_events(-1, 1, START, 1)
    with pytest.raises(ValueError, match="hours"):
        generate_events(10, 1, START, 0)
    with pytest.raises(ValueError, match="late_fraction"):
        generate_events(10, 1, START, 1, late_fraction=1.5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 300), seed=st.integers(0, 2**32), hours=st.floats(0.01, 200),
       users=st.integers(1, 50))
def test_any_arguments_give_valid_in_range_events(n, seed, hours, users):
    evs = generate_events(n, seed, START, hours, users=users, kbs=3)
    assert len(evs) == n == len({e["trace_id"] for e in evs})
    if n:
        t = _times(evs)
        assert t.min() >= START.timestamp() * 1000 - 7 * 86_400_000
        assert t.max() < (START + timedelta(hours=hours)).timestamp() * 1000
        assert {e["user_id"] for e in evs} <= {None} | {f"user-{k:0{len(str(users))}d}"
                                                        for k in range(1, users + 1)}


@pytest.mark.skipif(importlib.util.find_spec("stream_agg.events") is None,
                    reason="stream_agg.events not written yet")
def test_every_event_passes_the_consumers_validation(events):
    from stream_agg.events import decode_message

    sample = events[:20_000]
    decoded = decode_message(orjson.dumps(sample))
    assert not decoded.rejects
    assert len(decoded.events) == len(sample)
    for e in sample[:200]:
        single = decode_message(orjson.dumps(e))
        assert not single.rejects and len(single.events) == 1
