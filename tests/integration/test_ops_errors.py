"""Bad input for backfill / verify / replay / reconcile: one `error:` line, exit 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import psycopg
import pytest
from helpers import make_events
from test_verify import archive

from stream_agg.devstack import free_port
from stream_agg.store.schema import LATEST, migrate

OK_RANGE = ["--start", "2026-03-01T00:00:00Z", "--end", "2026-03-01T06:00:00Z"]

RANGE_CASES = {
    "end before start": ["--start", "2026-03-02T00:00:00Z", "--end", "2026-03-01T00:00:00Z"],
    "empty range": ["--start", "2026-03-01T00:00:00Z", "--end", "2026-03-01T00:00:00Z"],
    "longer than max_range": ["--start", "2026-01-01", "--end", "2026-06-01"],
    "unknown metric": [*OK_RANGE, "--metric", "trace.nope"],
    "unknown granularity": [*OK_RANGE, "--granularity", "month"],
    "bad time": ["--start", "yesterday", "--end", "2026-03-01"],
}
EXPECTED = {
    "end before start": "is not after start",
    "empty range": "is not after start",
    "longer than max_range": "pass --yes",
    "unknown metric": "unknown metric 'trace.nope'",
    "unknown granularity": "unknown granularity 'month'",
    "bad time": "bad time 'yesterday'",
}


def run(command: str, args: list[str], url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stream_agg", command, *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "STREAM_AGG_DATABASE_URL": url, **env})


def assert_one_error_line(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture
def db(database_url: str) -> str:
    migrate(database_url)
    archive(database_url, make_events(50, seed=51, hours=6))
    return database_url


def nothing_written(url: str) -> None:
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM metrics_aggregates").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM stream_partials").fetchone()[0] == 0


@pytest.mark.parametrize("command", ["backfill", "verify", "replay"])
@pytest.mark.parametrize("case", list(RANGE_CASES))
def test_bad_range_input(db: str, command: str, case: str) -> None:
    extra = ["--bootstrap", f"127.0.0.1:{free_port()}"] if command == "replay" else []
    assert_one_error_line(run(command, RANGE_CASES[case] + extra, db), EXPECTED[case])
    nothing_written(db)


def test_long_range_runs_with_yes(db: str) -> None:
    result = run("backfill", [*RANGE_CASES["longer than max_range"], "--yes", "--granularity", "day"], db)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", ["backfill", "verify", "replay"])
def test_unreachable_database(db: str, command: str) -> None:
    dead = f"postgresql://postgres:secret@127.0.0.1:{free_port()}/nowhere"
    result = run(command, OK_RANGE, dead)
    assert_one_error_line(result, "cannot reach PostgreSQL at postgresql://postgres:***@127.0.0.1")
    assert "secret" not in result.stderr


def test_database_without_tables(database_url: str) -> None:
    assert_one_error_line(run("backfill", OK_RANGE, database_url), "run `stream-agg migrate` first")
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT to_regclass('metrics_aggregates')").fetchone()[0] is None


@pytest.mark.parametrize("command", ["backfill", "verify", "replay", "reconcile"])
def test_database_a_newer_stream_agg_migrated(db: str, command: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("INSERT INTO stream_agg_schema (version) VALUES (%s)", (LATEST + 1,))
    args = ["--once"] if command == "reconcile" else OK_RANGE
    assert_one_error_line(run(command, args, db), f"schema is version {LATEST + 1}, newer than this stream-agg")
    nothing_written(db)


def test_replay_unreachable_broker_and_missing_topic(db: str, broker_bootstrap: str) -> None:
    assert_one_error_line(run("replay", [*OK_RANGE, "--bootstrap", f"127.0.0.1:{free_port()}"], db),
                          "cannot reach Kafka at 127.0.0.1:")
    assert_one_error_line(run("replay", [*OK_RANGE, "--bootstrap", broker_bootstrap, "--topic",
                                         f"no.such.topic.{datetime.now(UTC):%H%M%S%f}"], db), "does not exist")
    assert_one_error_line(run("replay", [*OK_RANGE, "--bootstrap", broker_bootstrap, "--slack", "soon"], db),
                          "--slack: not a duration: 'soon'")
    nothing_written(db)


@pytest.mark.parametrize(("args", "needle"), [
    (["--once", "--metric", "trace.nope"], "unknown metric 'trace.nope'"),
    (["--once", "--granularity", "fortnight"], "unknown granularity 'fortnight'"),
    (["--once", "--lookback", "100d"], "pass --yes"),
    (["--once", "--lookback", "30s", "--grace", "60s"], "must be longer than the grace"),
    (["--once", "--every", "often"], "--every: not a duration"),
    (["--once", "--now", "later"], "bad time 'later'"),
    (["--textfile", "/tmp/x.prom"], "go with --once"),
])
def test_reconcile_bad_input(db: str, args: list[str], needle: str) -> None:
    assert_one_error_line(run("reconcile", args, db), needle)
    nothing_written(db)


def test_reconcile_unreachable_database(db: str) -> None:
    result = run("reconcile", ["--once"], f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    assert_one_error_line(result, "cannot reach PostgreSQL")


def test_replay_of_a_range_with_no_event_in_the_topic_changes_nothing(db: str, config) -> None:
    """A replay that read nothing of its range (e.g. --slack too short) must not erase stored state."""
    result = run("replay", [*OK_RANGE, "--bootstrap", config.kafka_bootstrap, "--topic", config.topic], db)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: replay read no event of the range")
    nothing_written(db)
