"""schemas/trace_completed.v1.json and stream_agg.events accept and reject the same events."""

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from stream_agg.events import FIELD_PATHS, Span, TraceEvent, decode_message

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
SCHEMA = json.loads((SCHEMAS / "trace_completed.v1.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)
VALID = sorted((SCHEMAS / "examples" / "valid").glob("*.json"))
INVALID = sorted((SCHEMAS / "examples" / "invalid").glob("*.json"))
REASON = re.compile(r"^[a-z_]+(:[a-z_.]+)?$")


def _refuse(token: str) -> float:
    raise ValueError(f"{token} is not JSON")


def schema_accepts(data: bytes) -> bool:
    """What a strict JSON parser plus the schema say: NaN / Infinity are not JSON at all."""
    try:
        instance = json.loads(data.decode("utf-8"), parse_constant=_refuse)
    except ValueError:
        return False
    return VALIDATOR.is_valid(instance)


def expected_reason(path: Path) -> str:
    """`bad_type__duration_ms.2.json` -> `bad_type:duration_ms`."""
    return re.sub(r"\.\d+$", "", path.name.removesuffix(".json")).replace("__", ":")


# --- the examples ----------------------------------------------------------------------


def test_schema_is_valid_draft_2020_12_and_examples_are_plenty() -> None:
    Draft202012Validator.check_schema(SCHEMA)
    assert len(VALID) >= 8 and len(INVALID) >= 15


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_example_passes_schema_and_decoder(path: Path) -> None:
    data = path.read_bytes()
    assert schema_accepts(data)
    decoded = decode_message(data)
    assert decoded.rejects == [] and len(decoded.events) == 1


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_example_fails_schema_and_decoder_with_the_named_reason(path: Path) -> None:
    data = path.read_bytes()
    assert not schema_accepts(data)
    decoded = decode_message(data)
    assert decoded.events == []
    assert [(r.reason, r.raw, r.index) for r in decoded.rejects] == [
        (expected_reason(path), data, None)]


IST, PST = timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))
TRACE_ID = "3f2b9c1e8a7d4e6f9b0c1d2e3f4a5b6c"
LLM = Span("s-llm-1", "llm", 1422.5, "gpt-4o-mini", 1200, 310, "ok")
RETRIEVAL = Span("s-ret-1", "retrieval", 88.0, None, None, None, "ok")
NOON = datetime(2026, 3, 1, 12, 34, 56, tzinfo=UTC)
# file -> (fields expected on the decoded event, expected started_at offset)
EXPECTED: dict[str, tuple[dict[str, Any], timedelta]] = {
    "minimal.json": ({"trace_id": TRACE_ID, "operation_type": "chat", "started_at": NOON,
                      "duration_ms": 1834.25, "status": "ok", "user_id": None, "kb_id": None,
                      "total_tokens": None, "spans": []}, timedelta(0)),
    "full_with_spans.json": ({"user_id": "user-0042", "kb_id": "kb-handbook",
                              "total_tokens": 1510, "spans": [RETRIEVAL, LLM]}, timedelta(0)),
    "null_optionals.json": ({"user_id": None, "kb_id": None, "total_tokens": None,
                             "spans": [Span("s1", "tool", 12.0)]}, timedelta(0)),
    "unknown_fields.json": ({"user_id": "user-0042", "spans": [LLM]}, timedelta(0)),
    "offset_plus_0530.json": ({"started_at": datetime(2026, 3, 1, 12, 34, 56, tzinfo=UTC)},
                              timedelta(hours=5, minutes=30)),
    "offset_z_lower_bound.json": ({"started_at": datetime(1970, 1, 1, tzinfo=UTC),
                                   "duration_ms": 0.0}, timedelta(0)),
    "fractional_seconds.json": ({"started_at": NOON.replace(microsecond=123457)}, timedelta(0)),
    "negative_offset_fraction.json": ({"started_at": datetime(2026, 3, 1, 7, 30, 0, 500_000,
                                                              tzinfo=UTC)}, timedelta(hours=-8)),
    "leap_day_minus_zero_offset.json": ({"started_at": datetime(2024, 2, 29, tzinfo=UTC)},
                                        timedelta(0)),
    "integral_floats.json": ({"schema_version": 1, "total_tokens": 1510, "duration_ms": 250.0,
                              "spans": [LLM]}, timedelta(0)),
    "max_lengths.json": ({"trace_id": "t" * 64, "operation_type": "o" * 64, "user_id": "u" * 256,
                          "kb_id": "k" * 256,
                          "spans": [Span("s" * 64, "k" * 32, 1422.5, "m" * 128, 1200, 310, "ok")]},
                         timedelta(0)),
    "unicode.json": ({"operation_type": "résumé", "user_id": "José Müller 👩‍💻", "kb_id": "知识库"},
                     timedelta(0)),
    "unicode_escaped.json": ({"operation_type": "résumé", "user_id": "José Müller 👩‍💻",
                              "kb_id": "知识库"}, timedelta(0)),
}


def test_every_valid_example_has_expected_values() -> None:
    assert sorted(EXPECTED) == [p.name for p in VALID]


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_example_decodes_to_the_right_values(path: Path) -> None:
    fields, offset = EXPECTED[path.name]
    (event,) = decode_message(path.read_bytes()).events
    for name, value in fields.items():
        got = getattr(event, name)
        assert got == value and type(got) is type(value), name
    assert event.started_at.utcoffset() == offset
    assert type(event.schema_version) is int and type(event.duration_ms) is float


# --- the schema mirrors the structs' constraints ----------------------------------------


def _schema_for(path: str) -> dict[str, Any]:
    """The schema node of a field path, with a `$ref` to `$defs` merged in."""
    top, _, inner = path.partition(".")
    node = SCHEMA["$defs"]["span"]["properties"][inner] if inner else SCHEMA["properties"][top]
    if "$ref" in node:
        node = {**SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]], **node}
    return node


def _struct_fields(info: mi.StructType, prefix: str = "") -> dict[str, mi.Field]:
    out = {}
    for f in info.fields:
        out[prefix + f.encode_name] = f
        if isinstance(f.type, mi.ListType):
            out |= _struct_fields(f.type.item_type, f"{prefix}{f.encode_name}.")
    return out


def test_schema_constraints_match_the_msgspec_model() -> None:
    fields = _struct_fields(mi.type_info(TraceEvent))
    assert set(fields) == FIELD_PATHS
    required = {p for p, f in fields.items() if f.required and "." not in p}
    assert set(SCHEMA["required"]) == required
    assert set(SCHEMA["$defs"]["span"]["required"]) == {
        p.split(".")[1] for p, f in fields.items() if f.required and "." in p}
    for path, f in fields.items():
        node, t = _schema_for(path), f.type
        nullable = isinstance(t, mi.UnionType)
        if nullable:
            (t,) = [x for x in t.types if not isinstance(x, mi.NoneType)]
        if isinstance(t, mi.StrType):
            assert node["type"] == (["string", "null"] if nullable else "string"), path
            assert node.get("minLength") == t.min_length and node["maxLength"] == t.max_length
            assert node["pattern"] == "^[^\\u0000]*$", path
        elif isinstance(t, mi.FloatType | mi.IntType):
            assert (node["minimum"], node["maximum"]) == (t.ge, t.le), path
            kind = "number" if isinstance(t, mi.FloatType) else "integer"
            assert node["type"] == ([kind, "null"] if nullable else kind), path
        elif isinstance(t, mi.LiteralType):
            allowed = node.get("enum", [node.get("const")])
            assert sorted(map(str, allowed)) == sorted(map(str, t.values + (None,) * nullable))
        else:
            assert isinstance(t, mi.DateTimeType | mi.ListType), path


# --- property test: generated events -----------------------------------------------------

OFFSETS = st.sampled_from(["Z", "+00:00", "-00:00", "+05:30", "-08:00", "+23:59", "-23:59"])


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    moment = draw(st.datetimes(min_value=datetime(1970, 1, 1),
                               max_value=datetime(2999, 12, 31, 23, 59, 59, 999_999)))
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if draw(st.booleans()):
        text += "." + draw(st.text("0123456789", min_size=1, max_size=12))
    if draw(st.integers(0, 30)) == 0:  # the rounding edge at the top of the range
        text = "2999-12-31T23:59:59." + draw(st.sampled_from(["999999", "9999994", "9999995"]))
    return text + draw(OFFSETS)


TIMESTAMP_MUTATIONS = [
    lambda s: s[:19],  # no offset
    lambda s: s.replace("T", "t", 1), lambda s: s.replace("T", " ", 1),
    lambda s: s.replace("Z", "z"), lambda s: s[:-3] + s[-2:] if s[-3] == ":" else s + "x",
    lambda s: "1969" + s[4:], lambda s: "3000" + s[4:], lambda s: "0000" + s[4:],
    lambda s: s[:5] + "13" + s[7:], lambda s: s[:5] + "00" + s[7:],
    lambda s: s[:5] + "02-30" + s[10:], lambda s: "2023-02-29" + s[10:],
    lambda s: s[:8] + "32" + s[10:], lambda s: s[:11] + "24" + s[13:],
    lambda s: s[:14] + "60" + s[16:], lambda s: s[:17] + "60" + s[19:],
    lambda s: s[:19] + "+24:00", lambda s: s[:19] + "+05:60", lambda s: s[:19] + ".Z",
    lambda s: s + "\n", lambda s: " " + s, lambda s: s + " ", lambda s: s + "\x00",
    lambda s: s.replace("2", "２", 1), lambda s: s[:10], lambda s: "",
]

STRING_LIMITS = {"trace_id": (1, 64), "operation_type": (1, 64), "user_id": (0, 256),
                 "kb_id": (0, 256), "span_id": (1, 64), "kind": (1, 32), "model": (0, 128)}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=3),
    max_leaves=6,
)
WEIRD = st.one_of(
    st.none(), st.booleans(), st.sampled_from([0, -1, 1.5, 1.0, -0.0, 2**63 - 1, 2**63, 1e300]),
    st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5),
    st.sampled_from(["", "ok", "error"]), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), JSON_VALUES,
)
NO_NUL = st.characters(codec="utf-8", exclude_characters="\x00")


def valid_string(name: str) -> st.SearchStrategy[str]:
    lo, hi = STRING_LIMITS[name]
    return st.text(NO_NUL, min_size=lo, max_size=min(hi, 12)) | st.just("x" * hi)


def bad_string(name: str) -> st.SearchStrategy[Any]:
    """Near the limits (some still valid), with NUL, or not a string at all."""
    lo, hi = STRING_LIMITS[name]
    return st.one_of(st.text(alphabet="ab", min_size=max(hi - 1, 0), max_size=hi + 1),
                     st.just("y" * (hi + 1000)), st.just(""),
                     st.text(max_size=4).map(lambda s: s + "\x00" + s), WEIRD)


VALID_COUNT = st.none() | st.integers(min_value=0, max_value=2**63 - 1) | st.sampled_from(
    [0.0, 7.0, 1e3, -0.0])
BAD_COUNT = st.sampled_from([-1, 2**63, 2.5, 1e300, -3.0, True, "5"]) | WEIRD
VALID_MILLIS = st.floats(min_value=0, allow_infinity=False) | st.integers(0, 10**12)
BAD_MILLIS = st.sampled_from([-1e-9, -5, -0.5, True, "1.5", None]) | WEIRD


@st.composite
def valid_span(draw: st.DrawFn) -> dict[str, Any]:
    span = {"span_id": draw(valid_string("span_id")), "kind": draw(valid_string("kind")),
            "duration_ms": draw(VALID_MILLIS)}
    if draw(st.booleans()):
        span["model"] = draw(st.none() | valid_string("model"))
    for name in ("input_tokens", "output_tokens"):
        if draw(st.booleans()):
            span[name] = draw(VALID_COUNT)
    if draw(st.booleans()):
        span["status"] = draw(st.sampled_from(["ok", "error", None]))
    return span


def bad_value(name: str) -> st.SearchStrategy[Any]:
    """Values for a field that are usually, but not always, invalid."""
    if name in STRING_LIMITS:
        return bad_string(name)
    specific = {
        "total_tokens": BAD_COUNT, "input_tokens": BAD_COUNT, "output_tokens": BAD_COUNT,
        "duration_ms": BAD_MILLIS,
        "schema_version": st.sampled_from([1.0, 2, 0, "1", True, None]),
        "status": st.sampled_from(["OK", "Error", "", "failed", "ok\x00", None]),
    }
    return specific.get(name, st.nothing()) | WEIRD


@st.composite
def event_like(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event, then zero to three mutations: delete, replace, add, or break a span."""
    event: dict[str, Any] = {
        "schema_version": 1,
        "trace_id": draw(valid_string("trace_id")),
        "operation_type": draw(valid_string("operation_type")),
        "started_at": draw(timestamps()),
        "duration_ms": draw(VALID_MILLIS),
        "status": draw(st.sampled_from(["ok", "error"])),
    }
    for name in ("user_id", "kb_id"):
        if draw(st.booleans()):
            event[name] = draw(st.none() | valid_string(name))
    if draw(st.booleans()):
        event["total_tokens"] = draw(VALID_COUNT)
    if draw(st.booleans()):
        event["spans"] = draw(st.lists(valid_span(), max_size=3))
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["delete", "replace", "timestamp", "extra", "span", "span"]))
        if action == "delete":
            event.pop(draw(st.sampled_from(sorted(event))), None)
        elif action == "replace":
            name = draw(st.sampled_from(sorted(set(event) | {"spans"})))
            event[name] = draw(bad_value(name))
        elif action == "timestamp":
            stamp = event.get("started_at")
            if isinstance(stamp, str) and len(stamp) >= 19:
                event["started_at"] = draw(st.sampled_from(TIMESTAMP_MUTATIONS))(stamp)
        elif action == "extra":
            # Any unknown key but "events": an object with an "events" array is an envelope.
            key = draw(st.text(max_size=8).filter(lambda k: k != "events"))
            event[key] = draw(JSON_VALUES)
        elif action == "span":
            spans = event.get("spans")
            if not isinstance(spans, list) or not spans:
                continue
            target = draw(st.sampled_from(spans))
            if not isinstance(target, dict):
                continue
            name = draw(st.sampled_from(sorted(set(target) | {"model", "status", "x"})))
            if draw(st.booleans()):
                target.pop(name, None)
            else:
                target[name] = draw(bad_value(name))
    return event


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=event_like(), ascii_only=st.booleans())
def test_schema_validity_equals_decoder_acceptance(event: dict[str, Any], ascii_only: bool) -> None:
    data = json.dumps(event, ensure_ascii=ascii_only, allow_nan=False).encode()
    valid = VALIDATOR.is_valid(json.loads(data))
    for message, index in ((data, None), (b"[" + data + b"]", 0),
                           (b'{"events": [' + data + b"]}", 0)):
        decoded = decode_message(message)
        assert (len(decoded.events), len(decoded.rejects)) == ((1, 0) if valid else (0, 1)), (
            event, [r.reason for r in decoded.rejects], list(VALIDATOR.iter_errors(event))[:1])
        for reject in decoded.rejects:
            assert REASON.match(reject.reason), reject.reason
            assert reject.reason.partition(":")[2] in FIELD_PATHS | {""}
            assert (reject.raw, reject.index) == (data, index)


@settings(max_examples=200, deadline=None)
@given(event=event_like())
def test_decoded_events_round_trip_through_the_schema(event: dict[str, Any]) -> None:
    """Whatever the decoder keeps, re-encoded canonically, is still valid for the schema."""
    from stream_agg.events import encode_event

    for kept in decode_message(json.dumps(event).encode()).events:
        again = encode_event(kept)
        assert VALIDATOR.is_valid(json.loads(again))
        assert decode_message(again).events == [kept]


# --- NaN and Infinity: not JSON, so outside the schema; the decoder names them ------------


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["duration_ms", "total_tokens", "spans.duration_ms",
                                   "spans.input_tokens"])
def test_nan_and_infinity_tokens(token: str, field: str) -> None:
    doc = {"schema_version": 1, "trace_id": "t", "operation_type": "chat",
           "started_at": "2026-03-01T12:00:00Z", "duration_ms": 1.0, "status": "ok",
           "spans": [{"span_id": "s", "kind": "llm", "duration_ms": 2.0}]}
    target = doc["spans"][0] if field.startswith("spans.") else doc
    target[field.rpartition(".")[2]] = "PLACEHOLDER"
    data = json.dumps(doc).replace('"PLACEHOLDER"', token).encode()
    assert not schema_accepts(data)
    assert [r.reason for r in decode_message(data).rejects] == [f"not_finite:{field}"]
