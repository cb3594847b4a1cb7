"""TakeLimit: Faust's `len(buffer) >= max_` ends a take at a message count or a byte budget."""

from __future__ import annotations

from stream_agg.kafka.worker import TakeLimit


def test_take_ends_at_message_count_or_byte_budget() -> None:
    limit = TakeLimit(messages=5, max_bytes=1000)
    taken = 0
    for value in (b"x" * 300, b"y" * 300, b"z" * 300):
        assert limit.count(value) is value
        taken += 1
        assert not taken >= limit  # type: ignore[operator]
    limit.count(b"w" * 200)
    taken += 1
    assert taken >= limit  # type: ignore[operator]  # 1,100 bytes >= 1,000
    limit.reset()
    assert not 4 >= limit  # type: ignore[operator]
    assert 5 >= limit  # type: ignore[operator]  # the message count alone
    limit.count(None)  # a tombstone has no payload
    assert limit.bytes == 0
