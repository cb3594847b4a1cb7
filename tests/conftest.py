"""Shared fixtures: a real broker and a real PostgreSQL, never mocks (DESIGN.md, decision 8).

Services come from the environment when given (STREAM_AGG_TEST_KAFKA,
STREAM_AGG_DATABASE_URL), else from this machine (PostgreSQL on 127.0.0.1:5432), else are
started embedded once per session. Each test gets its own database and topic, so tests
never see each other's data.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from stream_agg.config import Config, load_config
from stream_agg.devstack import (
    LOCAL_POSTGRES_URL,
    EmbeddedBroker,
    EmbeddedPostgres,
    ensure_topics,
    postgres_reachable,
)

INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration/ is marked `integration` (deselect with -m)."""
    for item in items:
        if item.path.is_relative_to(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)


def _libpq(url: str) -> str:
    return re.sub(r"^postgres(ql)?(\+psycopg)?://", "postgresql://", url)


@pytest.fixture(scope="session")
def broker_bootstrap() -> Iterator[str]:
    """host:port of a Kafka-compatible broker for the whole session."""
    given = os.environ.get("STREAM_AGG_TEST_KAFKA")
    if given:
        yield given
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """libpq URL of a PostgreSQL server (its maintenance database) for the whole session."""
    given = os.environ.get("STREAM_AGG_DATABASE_URL")
    if given:
        yield _libpq(given)
        return
    if postgres_reachable(LOCAL_POSTGRES_URL):
        yield LOCAL_POSTGRES_URL
        return
    with EmbeddedPostgres() as server:
        yield server.url


@pytest.fixture
def database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh empty database for one test, dropped afterwards."""
    name = f"sa_test_{secrets.token_hex(6)}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = urlsplit(pg_server_url)
    yield urlunsplit(parts._replace(path=f"/{name}"))
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                     .format(sql.Identifier(name)))


@pytest.fixture
def default_metrics_port() -> Iterator[None]:
    """Held by a test whose demo takes the default metrics port (9108 when free). The tests run
    in two processes, and two demos starting together could both find 9108 free: the second
    worker would then fail to bind it. Tests that need no default pass a port of their own."""
    with open(Path(tempfile.gettempdir()) / "stream-agg-tests-metrics-9108.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture
def topic(broker_bootstrap: str) -> str:
    """A new topic with 4 partitions, plus its 1-partition `.dlq`."""
    name = f"traces.test.{secrets.token_hex(6)}"
    ensure_topics(broker_bootstrap, {name: 4, f"{name}.dlq": 1})
    return name


@pytest.fixture
def config(broker_bootstrap: str, database_url: str, topic: str) -> Config:
    """Settings pointing at this test's broker, database and topic; metrics server off."""
    return load_config(env={}, kafka_bootstrap=broker_bootstrap, database_url=database_url,
                       topic=topic, metrics_port=0)
