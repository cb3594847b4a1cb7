"""The cardinality cap with partitions split between workers, against a real PostgreSQL.

Two processors own two partitions each, so no bucket is whole in either one's memory: each
flush merges its own states with the other's partials read back from PostgreSQL (the
per-key path). Then one processor takes all four partitions over, as after a rebalance,
and merges in memory (the vectorised path). With a tight cap, partitions keep values the
cap over the whole bucket pushes out; after every round the rows must be exactly the
reference rule's (caps over every event so far), as the SQL backfill computes them. A
stray row past a cut (as a worker of a version before `stream_cap_cuts` could leave) is
deleted by the next flush of its scope. Every written scope's stored cut
(`stream_cap_cuts`) is the last value its rows keep, which is what lets a flush skip the
delete when its cut has not moved.
"""

from __future__ import annotations

import psycopg
from helpers import make_events
from worker_support import assert_rows_match_events, close_processors, fetch_rows, open_processor

from stream_agg.core.aggstate import AggState
from stream_agg.core.cardinality import CAP_HASH_SQL, cap_hash
from stream_agg.core.registry import OTHER, default_registry
from stream_agg.events import TraceEvent, encode_event
from stream_agg.kafka.processor import Message, Processor
from stream_agg.store.schema import migrate
from stream_agg.store.stream_state import StreamStore

STREAM = "s:caps"
PARTITIONS = 4
PER_MESSAGE = 25


def _processor(url: str, partitions: set[int]) -> Processor:
    return open_processor(url, STREAM, partitions, PARTITIONS, cardinality_caps="user=4")


def _rounds(events: list[TraceEvent], rounds: int) -> list[tuple[list[Message], list[TraceEvent]]]:
    """Each partition's events as batched messages, cut into `rounds` in offset order:
    (messages, their events) per round."""
    per: list[list[tuple[Message, list[TraceEvent]]]] = []
    for p in range(PARTITIONS):
        mine = events[p::PARTITIONS]
        chunks = [mine[j:j + PER_MESSAGE] for j in range(0, len(mine), PER_MESSAGE)]
        per.append([(Message(p, i, b"[" + b",".join(encode_event(e) for e in c) + b"]"), c)
                    for i, c in enumerate(chunks)])
    out = []
    for r in range(rounds):
        part = [x for msgs in per for x in msgs[r * len(msgs) // rounds:(r + 1) * len(msgs) // rounds]]
        out.append(([m for m, _ in part], [e for _, c in part for e in c]))
    return out


def assert_cuts_stored(url: str, cap: int) -> None:
    """Every user scope holding `cap` kept rows has its cut stored: the largest kept
    (cap hash, value); a scope with fewer has none (nothing past a cut can exist)."""
    rows = fetch_rows(url)
    kept: dict[tuple, list[str]] = {}
    for k in rows:
        if k[3] == "user":
            kept.setdefault(k[:4], [])
            if k[4] != OTHER:
                kept[k[:4]].append(k[4])
    with psycopg.connect(url) as conn:
        stored = {(g, int(t.timestamp()), m, d): (h, v) for g, t, m, d, h, v in conn.execute(
            "SELECT granularity, bucket_time, metric_name, dimension_type, cap_hash, cap_value FROM stream_cap_cuts")}
    want = {scope: max((cap_hash(v), v) for v in values) for scope, values in kept.items() if len(values) == cap}
    assert all(len(v) <= cap for v in kept.values())
    assert want and stored == want


def test_rows_are_capped_over_every_partition_whoever_writes_them(database_url: str) -> None:
    migrate(database_url)
    events = make_events(3000, seed=61, hours=10, users=40)
    registry = default_registry({"user": 4})
    rounds = _rounds(events, 4)
    seen: list[TraceEvent] = []
    a, b = _processor(database_url, {0, 1}), _processor(database_url, {2, 3})
    try:
        for msgs, evs in rounds[:3]:
            for proc in (a, b):
                proc.process([m for m in msgs if m.partition in proc.contexts])
                proc.flush()
            seen += evs
            assert_rows_match_events(fetch_rows(database_url), seen, registry)
            assert_cuts_stored(database_url, 4)
        # the case at hand: a partition kept a value the cap over the whole bucket pushes out
        held = {k for proc in (a, b) for ctx in proc.contexts.values() for k in ctx.pstate.states
                if k[3] == "user"}
        assert held - set(fetch_rows(database_url))
    finally:
        close_processors(a, b)
    # a stray row past the cut of a scope the last round writes (source 'stream'), as a
    # version that stored no cuts could leave: its scope then has no stored cut either
    stray_scope = next(k[:4] for k in sorted(fetch_rows(database_url)) if k[0] == "week" and k[3] == "user")
    kept = [k[4] for k in fetch_rows(database_url) if k[:4] == stray_scope and k[4] != OTHER]
    assert len(kept) == 4
    last = max((cap_hash(v), v) for v in kept)
    stray = next(v for v in (f"stray-{i}" for i in range(100)) if (cap_hash(v), v) > last)
    backfilled = next(v for v in (f"backfilled-{i}" for i in range(100)) if (cap_hash(v), v) > last)
    with psycopg.connect(database_url) as conn:
        for value, source in ((stray, "stream"), (backfilled, "backfill")):  # the backfill's row stays
            conn.execute(
                "INSERT INTO metrics_aggregates (bucket_time, granularity, metric_name, dimension_type, "
                "dimension_value, count, sum_value, min_value, max_value, avg_value, source) "
                "VALUES (to_timestamp(%s), %s, %s, %s, %s, 1, 1, 1, 1, 1, %s)",
                (stray_scope[1], stray_scope[0], stray_scope[2], stray_scope[3], value, source))
        conn.execute("DELETE FROM stream_cap_cuts WHERE bucket_time = to_timestamp(%s) AND granularity = %s "
                     "AND metric_name = %s AND dimension_type = %s", (stray_scope[1], *stray_scope[0:1],
                                                                       *stray_scope[2:4]))
    whole = _processor(database_url, set(range(PARTITIONS)))
    try:
        whole.process(rounds[3][0])
        whole.flush()
    finally:
        close_processors(whole)
    rows = fetch_rows(database_url)
    assert rows.pop((*stray_scope, backfilled))[-1] == "backfill"
    assert_rows_match_events(rows, events, registry)
    with psycopg.connect(database_url) as conn:
        conn.execute("DELETE FROM metrics_aggregates WHERE source = 'backfill'")
    assert_cuts_stored(database_url, 4)


def test_values_past_a_cut_compare_in_sql_as_in_python(database_url: str) -> None:
    """The delete's order (`stream_state._delete_past_cuts`): md5 prefix, then the value
    byte-wise, must be the (cap_hash, value) order the merge and the backfill use, for
    any text."""
    values = ["a", "B", "z", "é", "ä", "日本", "Ω", "a\u00e9", "ae", "zz", "", " ", "ß", "𝔘"]
    with psycopg.connect(database_url) as conn:
        got = [v for (v,) in conn.execute(
            f"SELECT v FROM unnest(%s::text[]) AS v ORDER BY {CAP_HASH_SQL.format(expr='v')}, v COLLATE \"C\"",
            (values,))]
        # a 60-bit tie, decided by the value: the same hash on both sides
        ties = conn.execute(
            "SELECT a, b, (7::bigint, a COLLATE \"C\") > (7::bigint, b COLLATE \"C\") "
            "FROM unnest(%s::text[]) AS a, unnest(%s::text[]) AS b", (values, values)).fetchall()
    assert got == sorted(values, key=lambda v: (cap_hash(v), v))
    assert len(ties) == len(values) ** 2 and all(greater == ((7, a) > (7, b)) for a, b, greater in ties)
    assert sorted(values) == sorted(values, key=lambda v: v.encode())  # code points = UTF-8 bytes


def test_a_scope_written_under_its_cap_forgets_its_stored_cut(database_url: str) -> None:
    """A replay that saw fewer values writes a capped scope below its cap: every value it
    holds gets a row, past the old stored cut too, so that cut must go. Otherwise a later
    write whose cut is not below the stale one would skip the delete and keep such a row."""
    migrate(database_url)
    metric, cap = "trace.duration_ms", 4
    ordered = sorted((cap_hash(f"u{i}"), f"u{i}") for i in range(40))
    v = [val for _, val in ordered]  # v[0] has the smallest (hash, value): kept first
    bucket = 1_700_000_000 // 3600 * 3600
    store = StreamStore(database_url)

    written: set[tuple] = set()

    def write(values: list[str]) -> dict[str, int]:
        """Like a replay: the partials now hold `values`; every key it had is re-merged."""
        mine = {("hour", bucket, metric, "user", x) for x in values}
        keys = mine | written | {("hour", bucket, metric, "user", OTHER)}
        written.update(keys)
        memory = {k: [(0, AggState.from_values([float(i + 1)], True, 0))] for i, k in enumerate(sorted(mine))}
        with store.conn().transaction(), store.conn().cursor() as cur:
            store.merge_rows(cur, STREAM, keys, memory=memory, resident=[("hour", bucket, 0)], caps={"user": cap})
        return {k[4]: r[0] for k, r in fetch_rows(database_url).items() if k[2] == metric and k[3] == "user"}

    try:
        assert set(write([v[0], v[1], v[2], v[3], v[6], v[7]])) == {v[0], v[1], v[2], v[3], OTHER}
        assert set(write([v[0], v[5], v[6]])) == {v[0], v[5], v[6]}  # under the cap now
        with psycopg.connect(database_url) as conn:
            assert conn.execute("SELECT count(*) FROM stream_cap_cuts").fetchone() == (0,)
        # cut v[5]: above the old stored cut (v[3]); v[6]'s row from the write before must go
        assert set(write([v[0], v[1], v[2], v[5], v[6]])) == {v[0], v[1], v[2], v[5], OTHER}
        assert_cuts_stored(database_url, cap)
    finally:
        store.close()
