"""The cardinality cap with partitions split between workers, against a real PostgreSQL.

Two processors own two partitions each, so no bucket is whole in either one's memory: each
flush merges its own states with the other's partials read back from PostgreSQL (the
per-key path). Then one processor takes all four partitions over, as after a rebalance,
and merges in memory (the vectorised path) without knowing the cuts the others wrote.
With a tight cap, partitions keep values the cap over the whole bucket pushes out; the
final rows must be exactly the reference rule's (caps over every event), as the SQL
backfill computes them.
"""

from __future__ import annotations

from helpers import make_events
from worker_support import assert_rows_match_events, fetch_rows

from stream_agg.config import load_config
from stream_agg.core.registry import OTHER, default_registry
from stream_agg.events import encode_event
from stream_agg.kafka.processor import Message, Processor
from stream_agg.observability import Metrics
from stream_agg.store.schema import migrate
from stream_agg.store.stream_state import StreamStore

STREAM = "s:caps"
PARTITIONS = 4


def _processor(url: str, partitions: set[int]) -> Processor:
    config = load_config(env={"STREAM_AGG_CARDINALITY_CAPS": "user=4"}, database_url=url, metrics_port=0,
                         archive=False)
    proc = Processor(config, default_registry(config.cardinality_caps), StreamStore(url), Metrics(), STREAM)
    proc.topic_partitions = PARTITIONS
    proc.assign(partitions)
    return proc


def _close(*procs: Processor) -> None:
    for proc in procs:
        proc.store.close()
        proc.reader.close()


def _rounds(events: list, rounds: int) -> list[list[Message]]:
    """Each partition's events as batched messages, cut into `rounds` in offset order."""
    per: list[list[Message]] = []
    for p in range(PARTITIONS):
        mine = events[p::PARTITIONS]
        per.append([Message(p, i, b"[" + b",".join(encode_event(e) for e in mine[j:j + 25]) + b"]")
                    for i, j in enumerate(range(0, len(mine), 25))])
    out = []
    for r in range(rounds):
        out.append([m for msgs in per for m in msgs[r * len(msgs) // rounds:(r + 1) * len(msgs) // rounds]])
    return out


def test_rows_are_capped_over_every_partition_whoever_writes_them(database_url: str) -> None:
    migrate(database_url)
    events = make_events(3000, seed=61, hours=10, users=40)
    registry = default_registry({"user": 4})
    a, b = _processor(database_url, {0, 1}), _processor(database_url, {2, 3})
    rounds = _rounds(events, 4)
    try:
        for msgs in rounds[:3]:
            for proc in (a, b):
                proc.process([m for m in msgs if m.partition in proc.contexts])
                proc.flush()
        # a value kept by some partition although the whole bucket pushes it out: the case at hand
        per_partition = {(k, p) for proc in (a, b) for p, ctx in proc.contexts.items()
                         for k in ctx.pstate.states if k[3] == "user" and k[4] != OTHER}
        assert {k for k, _ in per_partition} - set(fetch_rows(database_url))
    finally:
        _close(a, b)
    whole = _processor(database_url, set(range(PARTITIONS)))
    try:
        whole.process(rounds[3])
        whole.flush()
    finally:
        _close(whole)
    assert_rows_match_events(fetch_rows(database_url), events, registry)
