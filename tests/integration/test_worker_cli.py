"""`stream-agg worker` refuses to start, with one clear line and exit 2, when a dependency is missing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psycopg

from stream_agg.devstack import free_port
from stream_agg.store.schema import LATEST, migrate


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_AGG_")}
    return subprocess.run([sys.executable, "-m", "stream_agg", "worker", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_unreachable_broker_is_exit_2(database_url: str) -> None:
    started = time.monotonic()
    out = _run("--bootstrap", f"127.0.0.1:{free_port()}", env={"STREAM_AGG_DATABASE_URL": database_url})
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert err[-1].startswith("error: cannot reach Kafka at 127.0.0.1:"), out.stderr
    assert time.monotonic() - started < 30


def test_unreachable_database_is_exit_2_without_the_password(broker_bootstrap: str) -> None:
    out = _run(env={"STREAM_AGG_KAFKA_BOOTSTRAP": broker_bootstrap, "STREAM_AGG_TOPIC": "cli.check",
                    "STREAM_AGG_DATABASE_URL": f"postgresql://u:hunter2@127.0.0.1:{free_port()}/db"})
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach PostgreSQL at postgresql://u:***@127.0.0.1:"), out.stderr
    assert "hunter2" not in out.stderr + out.stdout


def test_a_database_a_newer_stream_agg_migrated_is_exit_2(broker_bootstrap: str, database_url: str) -> None:
    migrate(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO stream_agg_schema (version) VALUES (%s)", (LATEST + 1,))
    out = _run(env={"STREAM_AGG_KAFKA_BOOTSTRAP": broker_bootstrap, "STREAM_AGG_TOPIC": "cli.newer",
                    "STREAM_AGG_DATABASE_URL": database_url})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: the database's stream-agg schema is version {LATEST + 1}, newer than this stream-agg knows "
        f"(up to {LATEST}); it may hold state this version cannot read: run the stream-agg that migrated it, "
        "or a newer one"), out.stderr


def test_bad_setting_is_exit_2() -> None:
    out = _run(env={"STREAM_AGG_FLUSH_INTERVAL": "soon"})
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: STREAM_AGG_FLUSH_INTERVAL='soon': not a duration: 'soon' "
                                  "(use e.g. 5s, 250ms, 2m, 1h, 7d)")
