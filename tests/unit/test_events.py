"""The event model and decoder: values, batches, reasons, fast/slow path agreement."""

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import numpy as np
import pytest

import stream_agg.events as events_module
from stream_agg.events import (
    FIELD_PATHS,
    Decoded,
    Reject,
    Span,
    TraceEvent,
    decode_message,
    encode_event,
    epoch_seconds,
    event_to_dict,
)

INVALID_EXAMPLES = Path(__file__).resolve().parents[2] / "schemas" / "examples" / "invalid"
REASON = re.compile(r"^[a-z_]+(:[a-z_.]+)?$")


def event(**overrides: object) -> dict:
    """A valid event dict with two spans; keyword arguments replace or add fields."""
    base = {
        "schema_version": 1,
        "trace_id": "t-1",
        "operation_type": "chat",
        "started_at": "2026-03-01T12:00:00Z",
        "duration_ms": 1500.5,
        "status": "ok",
        "user_id": "u-1",
        "kb_id": "kb-1",
        "total_tokens": 900,
        "spans": [
            {"span_id": "s-1", "kind": "retrieval", "duration_ms": 80.0},
            {"span_id": "s-2", "kind": "llm", "duration_ms": 1300.0, "model": "gpt-4o",
             "input_tokens": 700, "output_tokens": 200, "status": "ok"},
        ],
    }
    base.update(overrides)
    return base


def span(**overrides: object) -> dict:
    base = {"span_id": "s-9", "kind": "tool", "duration_ms": 5.0}
    base.update(overrides)
    return base


def one(message: bytes) -> TraceEvent:
    decoded = decode_message(message)
    assert decoded.rejects == [], decoded.rejects
    assert len(decoded.events) == 1
    return decoded.events[0]


def reasons(message: bytes) -> list[str]:
    return [r.reason for r in decode_message(message).rejects]


def dumps(obj: object) -> bytes:
    return json.dumps(obj).encode()


# --- single events: values ------------------------------------------------------------


def test_single_event_decodes_every_field() -> None:
    e = one(dumps(event(started_at="2026-03-01T17:30:00.25+05:30")))
    assert e.schema_version == 1 and e.trace_id == "t-1" and e.operation_type == "chat"
    assert e.started_at == datetime(2026, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    assert e.started_at.utcoffset() == timedelta(hours=5, minutes=30)
    assert e.duration_ms == 1500.5 and isinstance(e.duration_ms, float)
    assert (e.status, e.user_id, e.kb_id, e.total_tokens) == ("ok", "u-1", "kb-1", 900)
    assert e.spans == [
        Span("s-1", "retrieval", 80.0),
        Span("s-2", "llm", 1300.0, "gpt-4o", 700, 200, "ok"),
    ]


def test_optional_fields_default_and_unknown_fields_are_ignored() -> None:
    minimal = {k: v for k, v in event().items()
               if k not in ("user_id", "kb_id", "total_tokens", "spans")}
    e = one(dumps({**minimal, "region": "eu", "nested": {"a": [1, 2]},
                   "events": "a string here does not make an envelope"}))
    assert (e.user_id, e.kb_id, e.total_tokens, e.spans) == (None, None, None, [])


def test_integer_duration_and_integral_float_counts_are_accepted() -> None:
    e = one(dumps(event(schema_version=1.0, duration_ms=7, total_tokens=12.0,
                        spans=[span(input_tokens=3e2, output_tokens=0.0)])))
    assert e.schema_version == 1 and type(e.schema_version) is int
    assert e.duration_ms == 7.0 and isinstance(e.duration_ms, float)
    assert e.total_tokens == 12 and type(e.total_tokens) is int
    assert (e.spans[0].input_tokens, e.spans[0].output_tokens) == (300, 0)


def test_timestamps_keep_their_offset_and_instant() -> None:
    cases = {
        "2026-03-01T12:00:00Z": (datetime(2026, 3, 1, 12, tzinfo=UTC), timedelta(0)),
        "2026-03-01T04:00:00-08:00": (datetime(2026, 3, 1, 12, tzinfo=UTC), timedelta(hours=-8)),
        "2026-03-01T12:00:00.123456789Z":  # rounded to the nearest microsecond
            (datetime(2026, 3, 1, 12, 0, 0, 123457, tzinfo=UTC), timedelta(0)),
        "2024-02-29T23:59:59.5-00:00":
            (datetime(2024, 2, 29, 23, 59, 59, 500_000, tzinfo=UTC), timedelta(0)),
    }
    for text, (instant, offset) in cases.items():
        e = one(dumps(event(started_at=text)))
        assert e.started_at == instant and e.started_at.utcoffset() == offset, text


# --- reasons for single events ---------------------------------------------------------


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"duration_ms": True}, "bad_type:duration_ms"),
    ({"duration_ms": "12"}, "bad_type:duration_ms"),
    ({"duration_ms": -0.001}, "negative:duration_ms"),
    ({"duration_ms": None}, "bad_type:duration_ms"),
    ({"total_tokens": 1.5}, "bad_type:total_tokens"),
    ({"total_tokens": False}, "bad_type:total_tokens"),
    ({"total_tokens": -3}, "negative:total_tokens"),
    ({"total_tokens": 2**63}, "bad_value:total_tokens"),
    ({"total_tokens": 2**63 - 1}, None),
    ({"schema_version": 2}, "bad_value:schema_version"),
    ({"schema_version": True}, "bad_type:schema_version"),
    ({"status": "OK"}, "bad_value:status"),
    ({"status": None}, "bad_type:status"),
    ({"trace_id": ""}, "empty:trace_id"),
    ({"trace_id": "x" * 65}, "too_long:trace_id"),
    ({"trace_id": "x" * 64}, None),
    ({"operation_type": 5}, "bad_type:operation_type"),
    ({"user_id": "u" * 10_000}, "too_long:user_id"),
    ({"user_id": ""}, None),
    ({"user_id": "bad\x00id"}, "nul_byte:user_id"),
    ({"kb_id": "\x00"}, "nul_byte:kb_id"),
    ({"started_at": "2026-03-01T12:00:00"}, "bad_timestamp"),
    ({"started_at": "2026-03-01T12:00:00+0100"}, "bad_timestamp"),
    ({"started_at": "2026-03-01t12:00:00Z"}, "bad_timestamp"),
    ({"started_at": "2026-03-01T12:00:00z"}, "bad_timestamp"),
    ({"started_at": "2026-03-01 12:00:00Z"}, "bad_timestamp"),
    ({"started_at": "2026-02-29T12:00:00Z"}, "bad_timestamp"),
    ({"started_at": "2026-03-01T12:00:60Z"}, "bad_timestamp"),
    ({"started_at": "2026-03-01T12:00:00Z\n"}, "bad_timestamp"),
    ({"started_at": "1969-12-31T23:59:59Z"}, "bad_timestamp"),
    ({"started_at": "3000-01-01T00:00:00Z"}, "bad_timestamp"),
    ({"started_at": "1970-01-01T00:00:00+01:00"}, None),
    ({"started_at": "2999-12-31T23:59:59.9999994-05:00"}, None),
    ({"started_at": "2999-12-31T23:59:59.9999995Z"}, "bad_timestamp"),
    ({"started_at": 1772366400}, "bad_type:started_at"),
    ({"started_at": "2026-03-01T12:00:00Z\x00"}, "nul_byte:started_at"),
    ({"spans": None}, "bad_type:spans"),
    ({"spans": [span(), 7]}, "bad_type:spans"),
    ({"spans": [span(), {"kind": "llm", "duration_ms": 1}]}, "missing_field:spans.span_id"),
    ({"spans": [span(duration_ms=-1)]}, "negative:spans.duration_ms"),
    ({"spans": [span(model="m\x00")]}, "nul_byte:spans.model"),
    ({"spans": [span(model="m" * 129)]}, "too_long:spans.model"),
    ({"spans": [span(kind="")]}, "empty:spans.kind"),
    ({"spans": [span(status="fine")]}, "bad_value:spans.status"),
    ({"spans": [span(output_tokens=2.5)]}, "bad_type:spans.output_tokens"),
    ({"spans": [span(input_tokens=-1)]}, "negative:spans.input_tokens"),
])
def test_reason_for_each_kind_of_fault(overrides: dict, reason: str | None) -> None:
    decoded = decode_message(dumps(event(**overrides)))
    if reason is None:
        assert len(decoded.events) == 1 and decoded.rejects == []
    else:
        assert decoded.events == []
        assert decoded.rejects == [Reject(reason, dumps(event(**overrides)), None)]


@pytest.mark.parametrize("field", ["schema_version", "trace_id", "operation_type",
                                   "started_at", "duration_ms", "status"])
def test_missing_required_field(field: str) -> None:
    body = {k: v for k, v in event().items() if k != field}
    assert reasons(dumps(body)) == [f"missing_field:{field}"]


def test_first_faulty_field_in_declaration_order_names_the_reason() -> None:
    message = dumps(event(duration_ms=-1, trace_id="", spans=[span(kind="")]))
    assert reasons(message) == ["empty:trace_id"]


@pytest.mark.parametrize(("token", "reason"), [
    (b"NaN", "not_finite:duration_ms"),
    (b"Infinity", "not_finite:duration_ms"),
    (b"-Infinity", "not_finite:duration_ms"),
    (b"1e400", "not_finite:duration_ms"),
    (b"-1e400", "not_finite:duration_ms"),
])
def test_nan_and_infinity_tokens_are_not_finite_not_json_errors(token: bytes, reason: str) -> None:
    message = dumps(event(duration_ms=12.5)).replace(b"12.5", token)
    assert reasons(message) == [reason]


def test_nan_in_a_span_and_in_token_counts() -> None:
    message = dumps(event(spans=[span(duration_ms=0.125)])).replace(b"0.125", b"NaN")
    assert reasons(message) == ["not_finite:spans.duration_ms"]
    message = dumps(event(total_tokens=77)).replace(b"77", b"Infinity")
    assert reasons(message) == ["not_finite:total_tokens"]


def test_nul_in_an_unknown_field_is_ignored_like_the_field() -> None:
    e = one(dumps(event(note="has\x00nul", spans=[span(extra="\x00")])))
    assert e.trace_id == "t-1" and len(e.spans) == 1


def test_lone_surrogate_escapes() -> None:
    assert reasons(dumps(event(user_id="a\ud800b"))) == ["bad_value:user_id"]
    assert one(dumps(event(note="\udc00"))).trace_id == "t-1"
    assert one(dumps(event(user_id="\U0001f600"))).user_id == "\U0001f600"


# --- whole-message failures ------------------------------------------------------------


@pytest.mark.parametrize(("message", "reason"), [
    (None, "empty_message"),
    (b"", "empty_message"),
    (b"not json", "not_json"),
    (b"   ", "not_json"),
    (b'{"trace_id": ', "not_json"),
    (b'{"a": 1} {"b": 2}', "not_json"),
    (b"\xff\xfe{}", "not_utf8"),
    (b"42", "not_object"),
    (b'"an event?"', "not_object"),
    (b"null", "not_object"),
    (b"NaN", "not_object"),
    (b"[]", "empty_batch"),
    (b' \n[ ] ', "empty_batch"),
    (b'{"events": []}', "empty_batch"),
    pytest.param(b"[" * 100_000, "not_json", id="unterminated-deep-nesting"),
    # Well-formed but nested beyond what the parsers allow: not_json, never a crash.
    pytest.param(b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "not_json", id="deep-nesting"),
])
def test_whole_message_reasons(message: bytes | None, reason: str) -> None:
    assert decode_message(message) == Decoded([], [Reject(reason, message or b"", None)])


# --- batches ---------------------------------------------------------------------------


def test_array_batch_keeps_valid_events_in_order_and_rejects_the_rest_by_index() -> None:
    elements = [
        dumps(event(trace_id="a")),
        dumps(event(trace_id="b", duration_ms=-1)),
        dumps(event(trace_id="c")),
        b"17",
        dumps(event(trace_id="d", spans=[span(), span(duration_ms="slow")])),
        dumps(event(trace_id="e", user_id="u" * 10_000)),
        dumps(event(trace_id="f", user_id="nul\x00")),
        dumps(event(trace_id="g")),
    ]
    message = b"[" + b", ".join(elements) + b"]"
    decoded = decode_message(message)
    assert [e.trace_id for e in decoded.events] == ["a", "c", "g"]
    assert decoded.rejects == [
        Reject("negative:duration_ms", elements[1], 1),
        Reject("not_object", b"17", 3),
        Reject("bad_type:spans.duration_ms", elements[4], 4),
        Reject("too_long:user_id", elements[5], 5),
        Reject("nul_byte:user_id", elements[6], 6),
    ]


def test_envelope_batch_behaves_like_an_array_and_ignores_other_keys() -> None:
    elements = [dumps(event(trace_id="a")), dumps(event(trace_id="b", status="maybe")),
                dumps(event(trace_id="c"))]
    body = b"[" + b",".join(elements) + b"]"
    message = b'{"producer": "svc", "events": ' + body + b', "sent_at": 5}'
    decoded = decode_message(message)
    assert [e.trace_id for e in decoded.events] == ["a", "c"]
    assert decoded.rejects == [Reject("bad_value:status", elements[1], 1)]
    assert decode_message(b'{"events": ' + body + b"}") == decode_message(body)


def test_escaped_events_key_is_still_an_envelope() -> None:
    message = b'{"\\u0065vents": [' + dumps(event(trace_id="x")) + b"]}"
    assert [e.trace_id for e in decode_message(message).events] == ["x"]


def test_nan_inside_a_batch_keeps_the_other_events_and_the_exact_element_bytes() -> None:
    bad = dumps(event(trace_id="b", duration_ms=3.5)).replace(b"3.5", b"NaN")
    good = [dumps(event(trace_id="a")), dumps(event(trace_id="c"))]
    for message in (b"[" + good[0] + b",\n  " + bad + b" ,\t" + good[1] + b"]",
                    b'{"x": [NaN], "events": [' + good[0] + b", " + bad + b"," + good[1] + b"]}"):
        decoded = decode_message(message)
        assert [e.trace_id for e in decoded.events] == ["a", "c"]
        assert decoded.rejects == [Reject("not_finite:duration_ms", bad, 1)]


def test_non_utf8_inside_one_element_rejects_only_that_element() -> None:
    bad = dumps(event(trace_id="b")).replace(b'"chat"', b'"ch\xe4t"')
    message = b"[" + dumps(event(trace_id="a")) + b"," + bad + b"]"
    decoded = decode_message(message)
    assert [e.trace_id for e in decoded.events] == ["a"]
    assert decoded.rejects == [Reject("not_utf8", bad, 1)]


def test_utf8_text_and_escapes_decode_to_the_same_event() -> None:
    doc = event(user_id="José 👩‍💻", kb_id="知识库")
    raw = json.dumps(doc, ensure_ascii=False).encode()
    escaped = json.dumps(doc).encode()
    assert b"\\u" in escaped and b"\\u" not in raw
    assert one(raw) == one(escaped)
    assert one(raw).user_id == "José 👩‍💻"


def test_batch_with_one_bad_timestamp_form_rejects_only_it() -> None:
    message = dumps([event(trace_id="a"), event(trace_id="b", started_at="2026-03-01t12:00:00Z"),
                     event(trace_id="c")])
    decoded = decode_message(message)
    assert [e.trace_id for e in decoded.events] == ["a", "c"]
    assert [(r.reason, r.index) for r in decoded.rejects] == [("bad_timestamp", 1)]


def test_valid_batches_never_take_the_slow_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(data: bytes) -> Decoded:
        raise AssertionError("slow path used for a valid message")

    monkeypatch.setattr(events_module, "_decode_slow", fail)
    batch = [event(trace_id=f"t{i}", started_at=f"2026-03-01T12:{i % 60:02d}:00.{i:03d}+05:30")
             for i in range(1000)]
    assert len(decode_message(dumps(batch)).events) == 1000
    assert len(decode_message(dumps({"events": batch})).events) == 1000
    assert len(decode_message(dumps(batch[0])).events) == 1
    assert len(decode_message(json.dumps(event(user_id="José")).encode()).events) == 1


# --- the msgspec error mapping agrees with the checker ------------------------------------


def test_msgspec_error_messages_map_to_the_checker_reasons() -> None:
    """For single-fault events msgspec rejects itself, both mechanisms name the same reason."""
    checked = 0
    for path in sorted(INVALID_EXAMPLES.glob("*.json")):
        expected = re.sub(r"\.\d+$", "", path.name.removesuffix(".json")).replace("__", ":")
        try:
            msgspec.json.decode(path.read_bytes(), type=TraceEvent)
        except msgspec.ValidationError as exc:
            assert events_module._reason_from_validation_error(str(exc)) == expected, path.name
            checked += 1
        except msgspec.DecodeError:
            pass
    assert checked >= 20


# --- encode / to_dict / epoch ------------------------------------------------------------


def test_encode_event_round_trips_and_is_canonical() -> None:
    e = one(dumps(event(started_at="2026-03-01T17:30:00.25+05:30")))
    data = encode_event(e)
    assert one(data) == e
    assert data == encode_event(event_to_dict(e))
    keys = list(json.loads(data))
    assert keys == sorted(keys)
    assert json.loads(data)["started_at"] == "2026-03-01T17:30:00.250000+05:30"


def test_encode_event_writes_invalid_dicts_as_given_but_refuses_nan() -> None:
    assert reasons(encode_event(event(duration_ms=-1))) == ["negative:duration_ms"]
    naive = encode_event(event(started_at=datetime(2026, 3, 1)))
    assert reasons(naive) == ["bad_timestamp"]
    with pytest.raises(ValueError, match="NaN"):
        encode_event(event(duration_ms=float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        encode_event(event(spans=[span(duration_ms=float("inf"))]))


def test_event_to_dict_is_plain_json() -> None:
    e = one(dumps(event()))
    d = event_to_dict(e)
    assert d["started_at"] == "2026-03-01T12:00:00Z"
    assert d["spans"][1] == {"span_id": "s-2", "kind": "llm", "duration_ms": 1300.0,
                             "model": "gpt-4o", "input_tokens": 700, "output_tokens": 200,
                             "status": "ok"}
    assert json.loads(json.dumps(d)) == d


def test_epoch_seconds() -> None:
    stamps = ["1970-01-01T00:00:00Z", "2026-03-01T17:30:00.25+05:30", "2026-02-28T16:00:00-08:00"]
    decoded = decode_message(dumps([event(started_at=s) for s in stamps])).events
    got = epoch_seconds(decoded)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [0.0, 1772366400.25, 1772323200.0])
    assert epoch_seconds([]).shape == (0,)
    naive = msgspec.structs.replace(decoded[0], started_at=datetime(2026, 3, 1))
    with pytest.raises(TypeError):
        epoch_seconds([naive])


def test_hand_built_events_and_field_paths() -> None:
    e = TraceEvent(1, "t", "chat", datetime(2026, 3, 1, tzinfo=UTC), 1.0, "ok")
    assert e.spans == [] and e.user_id is None
    assert one(encode_event(e)) == e
    assert {"spans.duration_ms", "started_at", "user_id"} <= FIELD_PATHS
    assert all(REASON.match(f"bad_type:{p}") for p in FIELD_PATHS)
