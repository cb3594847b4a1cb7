"""Decoder throughput: events/s for single-event and 1000-event batch messages.

Realistic events (UUID trace ids, 2 spans each: a retrieval and an LLM call, mixed
offsets, fractional seconds) encoded compactly as producers do. Each figure is the
median of 5 runs. Also prints `epoch_seconds` cost, quoted in its docstring.

    python bench/decode.py [--events 20000] [--runs 5]
"""

import argparse
import random
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import orjson

from stream_agg.events import decode_message, epoch_seconds

_OFFSETS = [UTC, UTC, UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-7))]


def make_event(rng: random.Random, i: int) -> dict:
    start = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(seconds=i * 0.37)
    start = start.astimezone(rng.choice(_OFFSETS))
    stamp = start.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    llm_ms, ret_ms = rng.lognormvariate(6.5, 0.5), rng.lognormvariate(4.5, 0.5)
    tokens_in, tokens_out = rng.randint(200, 4000), rng.randint(20, 800)
    return {
        "schema_version": 1,
        "trace_id": uuid.UUID(int=rng.getrandbits(128)).hex,
        "operation_type": rng.choice(["chat", "search", "generation", "summarize"]),
        "started_at": stamp,
        "duration_ms": round(llm_ms + ret_ms + rng.uniform(1, 30), 3),
        "status": "error" if rng.random() < 0.02 else "ok",
        "user_id": f"user-{rng.randint(1, 5000):05d}",
        "kb_id": rng.choice([None, "kb-handbook", "kb-support", "kb-legal"]),
        "total_tokens": tokens_in + tokens_out,
        "spans": [
            {"span_id": f"{i:x}-r", "kind": "retrieval", "duration_ms": round(ret_ms, 3),
             "model": None, "input_tokens": None, "output_tokens": None, "status": "ok"},
            {"span_id": f"{i:x}-l", "kind": "llm", "duration_ms": round(llm_ms, 3),
             "model": rng.choice(["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet"]),
             "input_tokens": tokens_in, "output_tokens": tokens_out, "status": "ok"},
        ],
    }


def median_rate(messages: list[bytes], expected: int, runs: int) -> float:
    """Median events/s over `runs` passes decoding every message once."""
    rates = []
    for _ in range(runs):
        got = rejected = 0
        t0 = time.perf_counter()
        for message in messages:  # like a consumer: decode, hand the events on, drop them
            decoded = decode_message(message)
            got += len(decoded.events)
            rejected += len(decoded.rejects)
        elapsed = time.perf_counter() - t0
        if got != expected or rejected:
            raise SystemExit(f"decoder rejected benchmark events ({got}/{expected} accepted)")
        rates.append(expected / elapsed)
    return statistics.median(rates)


def median_ns(fn: Callable[[], object], n: int, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / n * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    n = args.events - args.events % 1000
    rng = random.Random(7)
    events = [make_event(rng, i) for i in range(n)]
    singles = [orjson.dumps(e) for e in events]
    arrays = [orjson.dumps(events[i:i + 1000]) for i in range(0, n, 1000)]
    envelopes = [orjson.dumps({"events": events[i:i + 1000]}) for i in range(0, n, 1000)]
    print(f"{n} events, 2 spans each, ~{sum(map(len, singles)) // n} bytes/event, "
          f"median of {args.runs} runs")
    print(f"single-event messages:      {median_rate(singles, n, args.runs):>10,.0f} events/s")
    print(f"1000-event array batches:   {median_rate(arrays, n, args.runs):>10,.0f} events/s")
    print(f"1000-event envelope batches:{median_rate(envelopes, n, args.runs):>10,.0f} events/s")
    decoded = [e for m in arrays for e in decode_message(m).events]
    ns = median_ns(lambda: epoch_seconds(decoded), n, args.runs)
    print(f"epoch_seconds:              {ns:>10.0f} ns/event")


if __name__ == "__main__":
    main()
