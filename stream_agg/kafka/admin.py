"""Broker checks and topic creation with kafka-python's admin client.

Works on Apache Kafka and on the embedded Tansu broker, with kafka-python 2.x and 3.x
(whose metadata and timeout settings differ). Used by the worker, `produce` and the
dev stack, so topic handling lives in one place.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

POLL = 0.1


class BrokerUnavailable(RuntimeError):
    """The bootstrap servers did not answer in time."""


def admin_client(bootstrap: str, timeout: float, client_id: str = "stream-agg-admin") -> KafkaAdminClient:
    """An admin client that gives up within `timeout` rather than kafka-python's 30 s default."""
    ms = max(1000, int(timeout * 1000))
    options: dict[str, Any] = {
        "bootstrap_servers": [h.strip() for h in bootstrap.split(",")],
        "client_id": client_id,
        "request_timeout_ms": ms,
    }
    if "bootstrap_timeout_ms" in KafkaAdminClient.DEFAULT_CONFIG:  # kafka-python >= 3
        options["bootstrap_timeout_ms"] = ms
    try:
        return KafkaAdminClient(**options)
    except (KafkaError, OSError) as exc:
        raise BrokerUnavailable(f"cannot reach Kafka at {bootstrap} within {timeout:.0f}s "
                                f"({type(exc).__name__})") from None


def topic_state(info: Mapping[str, Any]) -> tuple[str, int, bool]:
    """(name, partition count, every partition has a leader) from kafka-python 2.x or 3.x."""
    name = info.get("name", info.get("topic"))
    parts = info.get("partitions") or []
    led = all(p.get("error_code", 0) == 0 and p.get("leader_id", p.get("leader", -1)) >= 0 for p in parts)
    return str(name), len(parts), bool(parts) and led and info.get("error_code", 0) == 0


def ensure_topics(bootstrap: str, topics: Mapping[str, int], timeout: float = 30.0,
                  replication_factor: int = 1, strict: bool = True) -> None:
    """Create missing topics and wait until metadata shows each with its partitions.

    Idempotent: an existing topic is kept. With `strict`, an existing topic whose
    partition count differs from the requested one raises ValueError (tests want the
    layout they planned); the worker passes strict=False and adapts to what exists.
    """
    if not topics:
        return
    deadline = time.monotonic() + timeout
    admin = admin_client(bootstrap, timeout=min(timeout, 10.0))
    try:
        existing = set(admin.list_topics())
        for name, partitions in topics.items():
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, num_partitions=partitions,
                                              replication_factor=replication_factor)])
            except TopicAlreadyExistsError:
                existing.add(name)
        while True:
            pending: dict[str, str] = {}
            described: dict[str, tuple[str, int, bool]] = {}
            with contextlib.suppress(KafkaError):
                described = {topic_state(t)[0]: topic_state(t) for t in admin.describe_topics(list(topics))}
            for name, wanted in topics.items():
                state = described.get(name)
                if state is None or not state[2]:
                    pending[name] = "not in metadata yet"
                elif state[1] != wanted and (strict or name not in existing):
                    if name in existing:
                        raise ValueError(f"topic {name!r} exists with {state[1]} partitions, expected {wanted}")
                    pending[name] = f"{state[1]}/{wanted} partitions"
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"topics not ready after {timeout:.0f}s: {pending}")
            time.sleep(POLL)
    finally:
        admin.close()


def partition_count(bootstrap: str, topic: str, timeout: float = 10.0) -> int | None:
    """How many partitions `topic` has (None if the broker does not say)."""
    admin = admin_client(bootstrap, timeout=timeout)
    try:
        for info in admin.describe_topics([topic]):
            name, count, _ = topic_state(info)
            if name == topic and count:
                return count
        return None
    finally:
        admin.close()
