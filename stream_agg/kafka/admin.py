"""Broker checks and topic creation with kafka-python's admin client (works on Apache Kafka and Tansu)."""

from __future__ import annotations

import time

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, NoBrokersAvailable, TopicAlreadyExistsError


class BrokerUnavailable(RuntimeError):
    """The bootstrap servers did not answer."""


def admin_client(bootstrap: str, timeout: float = 10.0) -> KafkaAdminClient:
    """An admin client, or BrokerUnavailable with one clear line within ~`timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return KafkaAdminClient(
                bootstrap_servers=[h.strip() for h in bootstrap.split(",")],
                request_timeout_ms=int(max(1.0, timeout) * 1000),
                client_id="stream-agg-admin",
            )
        except (NoBrokersAvailable, KafkaError, OSError) as exc:
            last = exc
            time.sleep(0.2)
    raise BrokerUnavailable(f"cannot reach Kafka at {bootstrap} within {timeout:.0f}s ({last!r})")


def ensure_topics(bootstrap: str, topics: dict[str, int], timeout: float = 30.0) -> None:
    """Create missing topics (name -> partitions) and wait until metadata shows them."""
    admin = admin_client(bootstrap, timeout=min(timeout, 10.0))
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, partitions, 1) for name, partitions in topics.items() if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
        deadline = time.monotonic() + timeout
        while True:
            described = {t["topic"]: len(t["partitions"]) for t in admin.describe_topics(list(topics))
                         if not t.get("error_code")}
            if all(described.get(name, 0) >= 1 for name in topics):
                return
            if time.monotonic() > deadline:
                missing = sorted(n for n in topics if not described.get(n))
                raise BrokerUnavailable(f"topics {missing} not visible after {timeout:.0f}s")
            time.sleep(0.1)
    finally:
        admin.close()
