"""StatsRefresher against a real PostgreSQL: ANALYZE once the rows written outnumber what the
planner believes the table holds, not before, and never an error for a role that may not."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from stream_agg.store.schema import migrate
from stream_agg.store.table_stats import StatsRefresher

INSERT_ROWS = (
    "INSERT INTO metrics_aggregates (bucket_time, granularity, metric_name, dimension_type, dimension_value, "
    "count, sum_value) SELECT timestamptz '2026-03-01' + (i / 100) * interval '1 hour', 'hour', "
    "'trace.duration_ms', 'user', %s || (i %% 100), 1, i FROM generate_series(0, %s - 1) AS i")


def believed(url: str) -> float:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT reltuples FROM pg_class WHERE oid = 'metrics_aggregates'::regclass").fetchone()
        assert row is not None
        return float(row[0])


def migrated(url: str) -> None:
    """A new schema, without autovacuum on the table (it would analyse it behind the test's back)."""
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE metrics_aggregates SET (autovacuum_enabled = false)")


def insert(url: str, n: int, prefix: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(INSERT_ROWS, (prefix, n))


def test_analyses_once_the_writes_outnumber_the_planners_rows(database_url: str) -> None:
    migrated(database_url)
    before = believed(database_url)
    assert before <= 0  # never analysed: -1 (PostgreSQL 14+) or 0
    stats = StatsRefresher(database_url, min_rows=500)
    insert(database_url, 400, "a")
    stats.wrote(400)  # below min_rows: nothing runs
    assert not stats.busy() and stats.runs == 0
    insert(database_url, 800, "b")
    stats.wrote(800)
    stats.wait(30)
    assert stats.runs == 1
    assert believed(database_url) == 1200  # small table: ANALYZE counts every row
    # the planner now knows 1,200 rows: 1,000 more written is not enough for another
    insert(database_url, 1000, "c")
    stats.wrote(1000)
    stats.wait(30)
    assert stats.runs == 1 and believed(database_url) == 1200
    insert(database_url, 300, "d")
    stats.wrote(300)  # 1,300 written since: more than the 1,200 believed
    stats.wait(30)
    assert stats.runs == 2 and believed(database_url) == 2500
    stats.close()


def test_a_table_analysed_meanwhile_is_not_analysed_again(database_url: str) -> None:
    """Autovacuum (here: a manual ANALYZE) got there first: the check finds it and counts on."""
    migrated(database_url)
    insert(database_url, 2000, "a")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ANALYZE metrics_aggregates")
    stats = StatsRefresher(database_url, min_rows=500)
    stats.wrote(2000)
    stats.wait(30)
    assert stats.runs == 0 and stats.believed == 2000 and stats.written == 2000
    stats.close()


def test_a_role_that_may_not_analyse_is_told_once_and_left_alone(database_url: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    migrated(database_url)
    role = "sa_writer_" + database_url.rsplit("/", 1)[1][-8:]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'sa-test'")  # where the server asks for one
        conn.execute(f"GRANT SELECT, INSERT ON metrics_aggregates TO {role}")
    try:
        parts = urlsplit(database_url)
        url = urlunsplit(parts._replace(netloc=f"{role}:sa-test@{parts.hostname}:{parts.port or 5432}"))
        insert(database_url, 1000, "a")
        stats = StatsRefresher(url, min_rows=500)
        with caplog.at_level(logging.WARNING, logger="stream_agg.store.table_stats"):
            stats.wrote(1000)
            stats.wait(30)
            assert stats.disabled and stats.runs == 0
            stats.wrote(100_000)  # disabled: no second attempt, no second warning
            assert not stats.busy()
        warned = [r.getMessage() for r in caplog.records if r.name == "stream_agg.store.table_stats"]
        assert len(warned) == 1 and "left to autovacuum" in warned[0], warned
        assert believed(database_url) <= 0
        stats.close()
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"REVOKE ALL ON metrics_aggregates FROM {role}")
            conn.execute(f"DROP ROLE {role}")


def test_an_unreachable_database_keeps_the_count(database_url: str) -> None:
    """No connection: nothing raised, and the rows still count towards the next attempt."""
    parts = urlsplit(database_url)
    stats = StatsRefresher(urlunsplit(parts._replace(netloc="postgres@127.0.0.1:1")), min_rows=10)
    stats.wrote(50)
    stats.wait(30)
    assert stats.runs == 0 and stats.written == 50 and not stats.disabled
