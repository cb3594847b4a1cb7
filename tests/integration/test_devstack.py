"""The embedded services and `stream-agg devstack` start, work over TCP and leave nothing behind."""

from __future__ import annotations

import contextlib
import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from stream_agg.config import SETTINGS, load_config
from stream_agg.devstack import (
    DevStack,
    EmbeddedBroker,
    EmbeddedPostgres,
    ensure_topics,
    free_port,
    port_open,
    postgres_reachable,
    wait_for_port,
)

REPO = Path(__file__).resolve().parents[2]


def _gone(pid: int) -> bool:
    """True if no live process has this PID (a zombie counts as gone: it runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _port_of(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])


def _round_trip(bootstrap: str, topic: str) -> list[tuple[bytes, bytes]]:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(3):
        producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode(), partition=0).get(10)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=5000)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    got = []
    for message in consumer:
        got.append((message.key, message.value))
        if len(got) == 3:
            break
    consumer.close()
    return got


def test_embedded_broker_round_trip_then_stops_cleanly():
    began = time.monotonic()
    broker = EmbeddedBroker().start()
    startup = time.monotonic() - began
    pid, port, workdir = broker.pid, broker.port, broker.workdir
    try:
        assert broker.bootstrap == f"127.0.0.1:{port}"
        assert startup < 10
        ensure_topics(broker.bootstrap, {"round.trip": 2})
        ensure_topics(broker.bootstrap, {"round.trip": 2})  # idempotent
        with pytest.raises(ValueError, match="exists with 2 partitions, expected 3"):
            ensure_topics(broker.bootstrap, {"round.trip": 3})
        assert _round_trip(broker.bootstrap, "round.trip") == [
            (b"k0", b"v0"), (b"k1", b"v1"), (b"k2", b"v2")]
    finally:
        broker.stop()
    assert _gone(pid)
    assert not port_open("127.0.0.1", port)
    assert workdir is not None and not workdir.exists()
    broker.stop()  # idempotent


def test_wait_for_port(broker_bootstrap):
    wait_for_port("127.0.0.1", _port_of(broker_bootstrap), timeout=1)
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="nothing listening"):
        wait_for_port("127.0.0.1", free_port(), timeout=0.3)
    assert time.monotonic() - began < 2


def test_embedded_broker_refuses_a_busy_port(broker_bootstrap):
    with pytest.raises(RuntimeError, match="already in use"):
        EmbeddedBroker(_port_of(broker_bootstrap)).start()


def test_embedded_postgres_over_tcp_then_stops_cleanly():
    began = time.monotonic()
    server = EmbeddedPostgres().start()
    startup = time.monotonic() - began
    pid, port, workdir = server.pid, server.port, server.workdir
    try:
        assert server.url == f"postgresql://postgres@127.0.0.1:{port}/postgres"
        assert startup < 30
        with psycopg.connect(server.url) as conn:
            one, addr, server_port = conn.execute(
                "select 1, host(inet_server_addr()), inet_server_port()").fetchone()
        assert (one, addr, server_port) == (1, "127.0.0.1", port)
    finally:
        server.stop()
    assert _gone(pid)
    assert not port_open("127.0.0.1", port)
    assert not postgres_reachable(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    assert workdir is not None and not workdir.exists()


def test_devstack_uses_given_services_and_stops_nothing(broker_bootstrap, pg_server_url):
    with DevStack(kafka_bootstrap=broker_bootstrap, database_url=pg_server_url) as stack:
        assert stack.broker is None and stack.postgres is None
        assert stack.env() == {
            "STREAM_AGG_KAFKA_BOOTSTRAP": broker_bootstrap,
            "STREAM_AGG_DATABASE_URL": pg_server_url,
        }
    assert port_open("127.0.0.1", _port_of(broker_bootstrap))
    assert postgres_reachable(pg_server_url)


def test_devstack_auto_prefers_a_reachable_local_postgres(broker_bootstrap, pg_server_url):
    with DevStack(kafka_bootstrap=broker_bootstrap, local_postgres_url=pg_server_url) as stack:
        assert stack.postgres is None
        assert stack.database_url == pg_server_url


def test_devstack_starts_what_is_missing_and_reports_progress():
    messages: list[str] = []
    nobody = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    stack = DevStack(local_postgres_url=nobody, progress=messages.append).start()
    try:
        assert stack.broker is not None and stack.postgres is not None
        pids = [stack.broker.pid, stack.postgres.pid]
        env = stack.env()
        assert env == {
            "STREAM_AGG_KAFKA_BOOTSTRAP": stack.broker.bootstrap,
            "STREAM_AGG_DATABASE_URL": stack.postgres.url,
        }
        assert set(env) <= {s.env for s in SETTINGS}
        config = load_config(env=env)
        assert config.kafka_bootstrap == stack.broker.bootstrap
        assert config.database_url == stack.postgres.url
        assert postgres_reachable(config.database_url)
    finally:
        stack.stop()
    assert all(_gone(pid) for pid in pids)
    assert messages[0] == "starting broker..."
    assert messages[1].startswith(f"broker ready on {env['STREAM_AGG_KAFKA_BOOTSTRAP']} ")
    assert "starting embedded PostgreSQL..." in messages
    assert messages[-2:] == ["stopping embedded PostgreSQL...", "stopping broker..."]


def _read_lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)


def test_devstack_command_prints_exports_and_stops_everything_on_sigint():
    kafka_port, pg_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_AGG_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-c", "from stream_agg.cli import main; main()", "devstack",
           "--kafka-port", str(kafka_port), "--pg-port", str(pg_port)]
    children: set[int] = set()
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env=env, cwd=REPO, stdin=subprocess.DEVNULL)
        try:
            lines: queue.Queue[str] = queue.Queue()
            threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
            exported: dict[str, str] = {}
            deadline = time.monotonic() + 60
            while len(exported) < 2:
                try:
                    line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    stderr.seek(0)
                    pytest.fail(f"no export lines within 60 s; stderr:\n{stderr.read()}")
                word, _, assignment = line.strip().partition(" ")
                assert word == "export", line
                name, value = shlex.split(assignment)[0].split("=", 1)
                exported[name] = value

            assert exported == {
                "STREAM_AGG_KAFKA_BOOTSTRAP": f"127.0.0.1:{kafka_port}",
                "STREAM_AGG_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{pg_port}/postgres",
            }
            topic = "devstack.cli"
            ensure_topics(exported["STREAM_AGG_KAFKA_BOOTSTRAP"], {topic: 1})
            assert _round_trip(exported["STREAM_AGG_KAFKA_BOOTSTRAP"], topic)[0] == (b"k0", b"v0")
            with psycopg.connect(exported["STREAM_AGG_DATABASE_URL"]) as conn:
                assert conn.execute("select 1").fetchone() == (1,)

            children = {c.pid for c in psutil.Process(proc.pid).children()}
            assert len(children) == 2, children
            proc.send_signal(signal.SIGINT)
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:  # the test failed early: still stop what the command started
                leftovers = psutil.Process(proc.pid).children()
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    for process in [*leftovers, psutil.Process(proc.pid)]:
                        with contextlib.suppress(psutil.NoSuchProcess):
                            process.kill()
                    proc.wait()
        stderr.seek(0)
        log = stderr.read()
    assert all(_gone(pid) for pid in children), log
    assert not port_open("127.0.0.1", kafka_port)
    assert not port_open("127.0.0.1", pg_port)
    assert "devstack: stopped" in log


def test_shared_fixtures_give_an_empty_database_and_fresh_topics(
        config, database_url, topic, broker_bootstrap, pg_server_url):
    assert topic.startswith("traces.test.")
    assert config.topic == topic and config.dlq == f"{topic}.dlq"
    assert config.kafka_bootstrap == broker_bootstrap
    assert config.database_url == database_url and config.metrics_port == 0
    name = database_url.rsplit("/", 1)[1]
    assert name.startswith("sa_test_")
    assert database_url == pg_server_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(database_url) as conn:
        db, tables = conn.execute(
            "select current_database(), count(*) from information_schema.tables"
            " where table_schema = 'public'").fetchone()
    assert (db, tables) == (name, 0)
    consumer = KafkaConsumer(bootstrap_servers=broker_bootstrap)
    try:
        assert consumer.partitions_for_topic(topic) == {0, 1, 2, 3}
        assert consumer.partitions_for_topic(f"{topic}.dlq") == {0}
    finally:
        consumer.close()
