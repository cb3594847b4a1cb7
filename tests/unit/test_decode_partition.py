"""decode_partition: what the decode helper sends back equals decoding and columnizing in process."""

from __future__ import annotations

import pickle

import numpy as np
from helpers import make_events

from stream_agg.core.fold import Columns, to_columns
from stream_agg.core.registry import default_registry
from stream_agg.events import decode_message, encode_event
from stream_agg.kafka.decode_pool import decode_partition
from stream_agg.store import archive_copy


def _messages() -> list[tuple[int, bytes | None]]:
    events = make_events(300, seed=41, hours=3)
    batch = b"[" + b",".join(encode_event(e) for e in events[:200]) + b"]"
    broken = b"[" + encode_event(events[200]) + b',{"trace_id": 7}]'  # one valid event, one reject
    return [(10, batch), (11, b"not json"), (12, broken), (13, None),
            *((14 + i, encode_event(e)) for i, e in enumerate(events[201:]))]


def _assert_same_columns(a: Columns, b: Columns) -> None:
    assert np.array_equal(a.ts, b.ts) and np.array_equal(a.offsets, b.offsets)
    assert a.levels.keys() == b.levels.keys()
    for name, la in a.levels.items():
        lb = b.levels[name]
        assert np.array_equal(la.parent, lb.parent)
        for k, v in la.values.items():
            assert np.array_equal(v, lb.values[k], equal_nan=True), (name, k)
        for k, v in la.codes.items():
            assert np.array_equal(v, lb.codes[k]) and la.labels[k] == lb.labels[k], (name, k)


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
    _assert_same_columns(part.cols, to_columns(events, np.asarray(offsets), reg))
    traces, spans, _ = archive_copy.render(events, offsets, 3)
    assert part.archive == (traces, spans)
    back = pickle.loads(pickle.dumps(part))  # as it travels back from the helper process
    _assert_same_columns(back.cols, part.cols)
    assert back.rejects == part.rejects and back.archive == part.archive


def test_a_partition_without_valid_events_has_no_columns() -> None:
    part = decode_partition(0, [(5, b"{}"), (6, b"[]")], default_registry(), archive=False)
    assert part.cols is None and part.archive is None and part.offsets.size == 0
    assert [r[2] for r in part.rejects] == [5, 6]
    assert [r[1] for r in part.rejects] == [decode_message(b"{}").rejects[0].reason,
                                            decode_message(b"[]").rejects[0].reason]
