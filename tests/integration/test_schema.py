"""`stream-agg migrate` creates everything once; running it again is a no-op; the SQL file matches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from stream_agg.store.schema import LATEST, SchemaTooNewError, current_version, ddl_sql, migrate

ROOT = Path(__file__).resolve().parents[2]


def _catalog(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        cols = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY 1, 2").fetchall()
        idx = conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
                           ).fetchall()
    return cols + idx


def test_migrate_twice_is_a_noop(database_url: str) -> None:
    assert migrate(database_url) == [1, 2, 3]
    first = _catalog(database_url)
    assert migrate(database_url) == []
    assert _catalog(database_url) == first
    assert current_version(database_url) == 3
    tables = {r[0] for r in first if len(r) == 4}
    assert {"metrics_aggregates", "traces", "spans", "stream_partials", "stream_offsets", "stream_cap_cuts",
            "stream_partial_deltas", "stream_retention"} <= tables
    names = {r[0] for r in first if len(r) == 2}
    assert "metrics_aggregates_dashboard_idx" in names and "metrics_aggregates_bucket_key" in names


def test_a_version_2_database_is_upgraded_to_the_same_catalog(database_url: str) -> None:
    migrate(database_url)
    want = _catalog(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:  # as a version-2 worker left it
        conn.execute("DROP TABLE stream_retention")
        conn.execute("DELETE FROM stream_agg_schema WHERE version = 3")
    assert current_version(database_url) == 2
    assert migrate(database_url) == [3]
    assert _catalog(database_url) == want


def test_a_database_a_newer_stream_agg_migrated_is_left_alone(database_url: str) -> None:
    migrate(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO stream_agg_schema (version) VALUES (%s)", (LATEST + 1,))
    want = _catalog(database_url)
    with pytest.raises(SchemaTooNewError, match=f"schema is version {LATEST + 1}, newer than this stream-agg "
                                                f"knows \\(up to {LATEST}\\)"):
        migrate(database_url)
    out = subprocess.run([sys.executable, "-m", "stream_agg", "migrate", "--database-url", database_url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith(f"error: the database's stream-agg schema is version {LATEST + 1}")
    assert _catalog(database_url) == want and current_version(database_url) == LATEST + 1


def test_cli_migrate_and_plain_sql_agree(database_url: str, pg_server_url: str) -> None:
    out = subprocess.run([sys.executable, "-m", "stream_agg", "migrate", "--database-url", database_url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "schema version 3" in out.stdout
    again = subprocess.run([sys.executable, "-m", "stream_agg", "migrate", "--database-url", database_url],
                           capture_output=True, text=True, timeout=60)
    assert "nothing to do" in again.stdout
    assert (ROOT / "schemas" / "tables.sql").read_text() == ddl_sql()
    # the plain SQL builds the same catalog as the CLI
    other = database_url.rsplit("/", 1)[0] + "/" + database_url.rsplit("/", 1)[1] + "_sql"
    with psycopg.connect(pg_server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{other.rsplit("/", 1)[1]}"')
    try:
        with psycopg.connect(other, autocommit=True) as conn:
            conn.execute(ddl_sql())
        assert _catalog(other) == _catalog(database_url)
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{other.rsplit("/", 1)[1]}" WITH (FORCE)')


def test_unreachable_database_is_one_line_exit_2() -> None:
    out = subprocess.run([sys.executable, "-m", "stream_agg", "migrate", "--database-url",
                          "postgresql://nobody:secret@127.0.0.1:1/none"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("error: cannot migrate postgresql://nobody:***@127.0.0.1:1/none")
    assert "secret" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
