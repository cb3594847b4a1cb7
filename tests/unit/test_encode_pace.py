"""The encoding waits for a lagging compress thread, but never past its bound."""

from __future__ import annotations

import threading
import time

import pytest

from stream_agg.kafka import processor
from stream_agg.store.stream_state import BlobFeed


def test_encoding_waits_while_blobs_pile_up_then_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processor, "ENCODE_PENDING_BLOBS", 4)
    monkeypatch.setattr(processor, "ENCODE_WAIT", 0.3)
    assert processor._pace(None, 0.0) < 0.001  # no compress thread: nothing to wait for
    feed = BlobFeed()
    for i in range(10):
        feed.put((None, i))  # type: ignore[arg-type]
    assert feed.pending() == 10
    t = time.monotonic()
    waited = processor._pace(feed, 0.0)  # nobody reads: waits out the whole bound
    assert 0.3 <= waited < 0.6 and time.monotonic() - t >= 0.3
    assert processor._pace(feed, waited) == pytest.approx(waited, abs=0.01)  # the bound is per flush

    taken: list[int] = []

    def read() -> None:  # a compress thread that catches up after 0.1 s
        time.sleep(0.1)
        for _, i in feed:
            taken.append(i)

    feed.close()
    reader = threading.Thread(target=read)
    reader.start()
    waited = processor._pace(feed, 0.0)
    reader.join()
    assert 0.09 <= waited < 0.3 and feed.pending() == 0 and taken == list(range(10))
