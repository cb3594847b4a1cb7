"""`stream-agg worker` refuses to start, with one clear line and exit 2, when a dependency is missing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from stream_agg.devstack import free_port


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


def test_bad_setting_is_exit_2() -> None:
    out = _run(env={"STREAM_AGG_FLUSH_INTERVAL": "soon"})
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: STREAM_AGG_FLUSH_INTERVAL='soon': not a duration: 'soon' "
                                  "(use e.g. 5s, 250ms, 2m, 1h, 7d)")
