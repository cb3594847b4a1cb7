"""decode_partition: what the decode helper sends back equals decoding and columnizing in process."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from helpers import assert_same_columns, assert_same_part, make_events

from stream_agg.core.fold import to_columns
from stream_agg.core.registry import default_registry
from stream_agg.events import decode_message, encode_event
from stream_agg.kafka.decode_pool import decode_partition, merge_batches, merge_parts
from stream_agg.store import archive_copy


def _messages() -> list[tuple[int, bytes | None]]:
    events = make_events(300, seed=41, hours=3)
    batch = b"[" + b",".join(encode_event(e) for e in events[:200]) + b"]"
    broken = b"[" + encode_event(events[200]) + b',{"trace_id": 7}]'  # one valid event, one reject
    return [(10, batch), (11, b"not json"), (12, broken), (13, None),
            *((14 + i, encode_event(e)) for i, e in enumerate(events[201:]))]


def test_decoded_part_equals_the_in_process_decoding() -> None:
    reg = default_registry({"user": 10})
    msgs = _messages()
    part = decode_partition(3, msgs, reg, archive=True)
    events, offsets, rejects = [], [], []
    for off, value in msgs:
        d = decode_message(value)
        events += d.events
        offsets += [off] * len(d.events)
        rejects += [(r.raw, r.reason, off, r.index) for r in d.rejects]
    assert part.partition == 3 and part.messages == len(msgs)
    assert part.rejects == rejects and {r[2] for r in rejects} == {11, 12, 13}
    assert part.offsets.tolist() == offsets and len(events) == 300
    assert np.allclose(part.ts, [e.started_at.timestamp() for e in events], rtol=0, atol=1e-6)
    assert_same_columns(part.cols, to_columns(events, np.asarray(offsets), reg))
    traces, spans, _ = archive_copy.render(events, offsets, 3)
    assert part.archive == (traces, spans)
    back = pickle.loads(pickle.dumps(part))  # as it travels back from the helper process
    assert_same_columns(back.cols, part.cols)
    assert back.rejects == part.rejects and back.archive == part.archive


def test_a_partition_without_valid_events_has_no_columns() -> None:
    part = decode_partition(0, [(5, b"{}"), (6, b"[]")], default_registry(), archive=False)
    assert part.cols is None and part.archive is None and part.offsets.size == 0
    assert [r[2] for r in part.rejects] == [5, 6]
    assert [r[1] for r in part.rejects] == [decode_message(b"{}").rejects[0].reason,
                                            decode_message(b"[]").rejects[0].reason]


@pytest.mark.parametrize("archive", [False, True])
def test_parts_of_consecutive_chunks_merge_into_the_part_of_all_messages(archive: bool) -> None:
    """The worker folds chunks decoded one by one as one batch: merged, they are what decoding
    every message at once gives (the middle chunk has no valid event at all)."""
    reg = default_registry({"user": 10})
    msgs = _messages()
    chunks = [msgs[:1], msgs[1:2], msgs[2:]]
    parts = [decode_partition(3, c, reg, archive) for c in chunks]
    assert parts[1].cols is None
    assert_same_part(merge_parts(parts), decode_partition(3, msgs, reg, archive))
    assert merge_parts(parts[:1]) is parts[0]
    with pytest.raises(ValueError, match="different partitions"):
        merge_parts([parts[0], decode_partition(4, chunks[2], reg, archive)])


def test_batches_merge_into_one_part_per_partition_in_message_order() -> None:
    reg = default_registry({"user": 10})
    msgs = _messages()
    a, b = msgs[:3], msgs[3:]
    first = [decode_partition(5, a[:2], reg, False), decode_partition(2, b[:100], reg, False)]
    second = [decode_partition(2, b[100:], reg, False), decode_partition(5, a[2:], reg, False)]
    merged = merge_batches([first, second])
    assert [p.partition for p in merged] == [5, 2]
    assert_same_part(merged[0], decode_partition(5, a, reg, False))
    assert_same_part(merged[1], decode_partition(2, b, reg, False))
