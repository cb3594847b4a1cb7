"""The worker's Kafka consumer waits at most FETCH_MAX_WAIT_MS per fetch at the broker, not
Faust's 1,500 ms: the setting reaches the fetcher of the aiokafka consumer the worker's own
consumer thread builds, once started against the real broker."""

from __future__ import annotations

import asyncio

from stream_agg.config import Config
from stream_agg.kafka.worker import FETCH_MAX_WAIT_MS, ShortPollConsumerThread, build_app


def test_the_worker_consumer_fetches_with_a_short_wait(config: Config) -> None:
    async def run() -> None:
        app = build_app(config.with_overrides(group_id=f"g-{config.topic}"))
        thread = app.consumer._new_consumer_thread()
        assert isinstance(thread, ShortPollConsumerThread)
        consumer = thread._create_worker_consumer(app.transport)
        consumer.subscribe([config.topic])
        await consumer.start()
        try:
            assert consumer._fetcher._fetch_max_wait_ms == FETCH_MAX_WAIT_MS < 1500
        finally:
            await consumer.stop()

    asyncio.run(asyncio.wait_for(run(), timeout=60))
