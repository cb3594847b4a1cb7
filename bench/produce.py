"""Producer throughput: one event per message vs JSON-array batches, on a real broker.

Starts its own embedded broker (Tansu, in memory), so the figures include the Kafka
protocol over loopback TCP but no disk. Each run writes to a fresh 4-partition topic
that is deleted afterwards. Prints the median of 3 runs per mode and the ratio, plus
the synthetic generator's own rate (it feeds the demo and must not be the bottleneck).

    python bench/produce.py [--single N] [--batched N] [--runs R]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime

from kafka import KafkaAdminClient

from stream_agg.devstack import EmbeddedBroker, ensure_topics
from stream_agg.producer import TraceProducer
from stream_agg.synthetic import generate_events

START = datetime(2024, 5, 1, tzinfo=UTC)


def timed_run(bootstrap: str, topic: str, events: list[dict], batching: bool) -> tuple[float, int]:
    """Seconds from first send to last acknowledgement, and messages written."""
    ensure_topics(bootstrap, {topic: 4})
    with TraceProducer(bootstrap, topic, batching=batching) as producer:
        began = time.perf_counter()
        producer.send_many(events)
        producer.flush()
        elapsed = time.perf_counter() - began
        assert producer.sent_events == len(events)
        messages = producer.sent_messages
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_topics([topic])
    finally:
        admin.close()
    return elapsed, messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", type=int, default=20_000, help="events, one per message")
    parser.add_argument("--batched", type=int, default=200_000, help="events, batched")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    gen_rates = []
    for _ in range(args.runs):
        began = time.perf_counter()
        events = generate_events(args.batched, 1, START, 24)
        gen_rates.append(args.batched / (time.perf_counter() - began))
    print(f"synthetic generate_events: {statistics.median(gen_rates):,.0f} events/s "
          f"(median of {args.runs}, n={args.batched:,})")

    with EmbeddedBroker() as broker:
        print(f"broker: embedded Tansu at {broker.bootstrap} (memory storage)")
        results = {}
        for label, batching, n in (("single-event messages", False, args.single),
                                   ("batched messages", True, args.batched)):
            rates, messages = [], 0
            for run in range(args.runs):
                elapsed, messages = timed_run(broker.bootstrap, f"bench.{label[:6]}.{run}",
                                              events[:n], batching)
                rates.append(n / elapsed)
            results[label] = statistics.median(rates)
            print(f"{label:>22}: {results[label]:>9,.0f} events/s  "
                  f"(n={n:,}, {messages:,} messages/run, runs: "
                  f"{', '.join(f'{r:,.0f}' for r in rates)})")
        ratio = results["batched messages"] / results["single-event messages"]
        print(f"{'batched / single':>22}: {ratio:.1f}x")


if __name__ == "__main__":
    main()
