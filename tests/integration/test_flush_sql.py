"""The flush's SQL against a real PostgreSQL: bucket locks in one statement, index plans for key lists."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from stream_agg.store.schema import migrate
from stream_agg.store.stream_state import (
    DELETE_KEYS_SQL,
    DELETE_PAST_CUTS_SQL,
    bucket_lock_id,
    delete_keys_params,
    index_plans,
    lock_buckets,
    past_cuts_params,
)
from stream_agg.store.table_stats import StatsRefresher

HOUR = 3600


def _advisory(conn: psycopg.Connection, pid: int) -> dict[int, bool]:
    """The advisory locks of backend `pid`: lock id -> granted (single-bigint keys below 2**32)."""
    rows = conn.execute("SELECT objid::bigint, granted FROM pg_locks WHERE locktype = 'advisory' AND pid = %s "
                        "AND classid = 0", (pid,)).fetchall()
    return {int(o): bool(g) for o, g in rows}


def test_bucket_locks_are_taken_in_ascending_order_by_one_statement(database_url: str) -> None:
    buckets = [("hour", h * HOUR) for h in range(12)] + [("day", 0), ("week", 0)]
    ids = sorted({bucket_lock_id(g, b) for g, b in buckets})
    middle = ids[len(ids) // 2]
    with psycopg.connect(database_url) as holder, psycopg.connect(database_url) as locker, \
            psycopg.connect(database_url, autocommit=True) as watcher:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (middle,))
        pid = locker.info.backend_pid
        done = threading.Event()

        def lock() -> None:
            with locker.cursor() as cur:
                lock_buckets(cur, reversed(buckets))  # any input order
            done.set()

        t = threading.Thread(target=lock)
        t.start()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and False not in _advisory(watcher, pid).values():
                time.sleep(0.02)
            seen = _advisory(watcher, pid)
            blocked = not done.is_set()
            query = watcher.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]
        finally:
            holder.rollback()  # lets the locker go on whatever happened (no thread left hanging)
            t.join(10)
        # it was blocked on the middle id, holding exactly the ids below it: ascending order
        assert seen == {**{i: True for i in ids if i < middle}, middle: False}
        assert blocked and done.is_set()
        assert query.startswith("SELECT pg_advisory_xact_lock(x.id) FROM unnest(")  # all of them, one statement
        assert _advisory(watcher, pid) == dict.fromkeys(ids, True)
        locker.commit()
        assert _advisory(watcher, pid) == {}


def _plan(cur: psycopg.Cursor, statement: str, params: tuple) -> str:
    cur.execute("EXPLAIN " + statement, params)
    return "\n".join(r[0] for r in cur.fetchall())


def _fill(url: str, analyse_first: bool) -> None:
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE metrics_aggregates SET (autovacuum_enabled = false)")  # stays stale
        if analyse_first:
            conn.execute("ANALYZE metrics_aggregates")
        conn.execute("INSERT INTO metrics_aggregates (bucket_time, granularity, metric_name, dimension_type, "
                     "dimension_value, count, sum_value, source) SELECT to_timestamp(3600 * (i / 1000)), 'hour', "
                     "'trace.duration_ms', 'user', 'u' || (i % 1000), 1, 1, "
                     "CASE WHEN i % 7 = 0 THEN 'backfill' ELSE 'stream' END FROM generate_series(0, 59999) i")


@pytest.fixture
def stale_table(database_url: str) -> str:
    """metrics_aggregates analyzed while empty, then given 60,000 rows: stale statistics,
    as right after a flush COPYed a backlog's rows into a new table."""
    _fill(database_url, analyse_first=True)
    return database_url


def test_cut_deletes_use_the_bucket_key_once_the_refresher_analysed(database_url: str) -> None:
    """Never analysed (a backlog's first flushes, autovacuum off or not yet run): PostgreSQL 15
    takes the dashboard index for the cut deletes, whose scope (bucket, granularity, metric,
    dimension) is spread over every hour of it; after `StatsRefresher`, the bucket key."""
    _fill(database_url, analyse_first=False)
    scopes = [(("hour", HOUR * h, "trace.duration_ms", "user"), (1 << 59, "u1")) for h in range(40)]
    with psycopg.connect(database_url) as conn, conn.cursor() as cur:
        with index_plans(cur):
            before = _plan(cur, DELETE_PAST_CUTS_SQL, past_cuts_params(scopes))
        conn.rollback()
        if "metrics_aggregates_bucket_key" in before:  # another PostgreSQL may guess better
            pytest.skip("this PostgreSQL takes the bucket key without statistics")
        stats = StatsRefresher(database_url)
        stats.wrote(60000)
        stats.wait(60)
        assert stats.runs == 1
        with index_plans(cur):
            plan = _plan(cur, DELETE_PAST_CUTS_SQL, past_cuts_params(scopes))
        assert "Index Scan using metrics_aggregates_bucket_key" in plan, plan


def test_key_list_deletes_use_the_index_with_stale_statistics(stale_table: str) -> None:
    keys = [("hour", HOUR * (i // 1000), "trace.duration_ms", "user", f"u{i % 1000}") for i in range(0, 60000, 30)]
    scopes = [(("hour", HOUR * h, "trace.duration_ms", "user"), (1 << 59, "u1")) for h in range(40)]
    with psycopg.connect(stale_table) as conn, conn.cursor() as cur:
        # the problem: without the settings this plan hashes the whole table
        assert "Seq Scan on metrics_aggregates" in _plan(cur, DELETE_KEYS_SQL, delete_keys_params(keys))
        with index_plans(cur):
            for statement, params in ((DELETE_KEYS_SQL, delete_keys_params(keys)),
                                      (DELETE_PAST_CUTS_SQL, past_cuts_params(scopes))):
                plan = _plan(cur, statement, params)
                assert "Index Scan using" in plan and "Seq Scan" not in plan and "Hash" not in plan, plan
            cur.execute(DELETE_KEYS_SQL, delete_keys_params(keys))
            deleted = cur.rowcount
        # the planner settings end with the block, not with the transaction
        assert [cur.execute(f"SHOW {s}").fetchone()[0] for s in
                ("enable_seqscan", "enable_hashjoin", "enable_mergejoin")] == ["on", "on", "on"]
        # the stream's rows of those keys went; backfilled rows (every 7th) stayed
        assert deleted == sum(1 for i in range(0, 60000, 30) if i % 7)
        left = cur.execute("SELECT count(*) FILTER (WHERE source = 'stream'), count(*) FILTER "
                           "(WHERE source = 'backfill') FROM metrics_aggregates").fetchone()
        assert left == (sum(1 for i in range(60000) if i % 7) - deleted, sum(1 for i in range(60000) if i % 7 == 0))
