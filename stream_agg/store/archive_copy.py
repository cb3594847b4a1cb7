"""The raw archive (`traces`, `spans`) as PostgreSQL COPY text, rendered when a batch is folded.

Why text and not row tuples: a tuple per trace and per span, held until the next flush, cost
~600 bytes each and one psycopg `write_row` call each on the writer thread (which competes
with folding for the GIL). A rendered line is ~150 bytes, and the writer sends whole chunks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

NULL = "\\N"
TRACE_COLUMNS = ("trace_id, operation_type, started_at, duration_ms, status, user_id, kb_id, total_tokens, "
                 "source_partition, source_offset")
SPAN_COLUMNS = ("trace_id, span_id, kind, model, duration_ms, input_tokens, output_tokens, status, started_at, "
                "operation_type")

_SPECIAL = re.compile(r"[\\\t\n\r]")
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _text(value: str | None) -> str:
    return NULL if value is None else value.translate(_ESCAPES)


def _opt(value: Any) -> str:
    return NULL if value is None else str(value)


def render(events: Sequence[Any], offsets: Sequence[int], partition: int) -> tuple[str, str, int]:
    """(traces COPY text, spans COPY text, span count) for decoded events and their offsets.

    Text fields are escaped for COPY's text format only when the batch holds a backslash,
    tab, CR or LF at all (one regex pass), which valid traffic practically never does.
    """
    if _has_special(events):
        esc = _text
    else:
        def esc(value: str | None) -> str:
            return NULL if value is None else value
    traces = []
    spans = []
    for e, off in zip(events, offsets, strict=True):
        started = e.started_at.isoformat()
        tid = esc(e.trace_id)
        op = esc(e.operation_type)
        traces.append(f"{tid}\t{op}\t{started}\t{e.duration_ms!r}\t{e.status}\t{esc(e.user_id)}\t"
                      f"{esc(e.kb_id)}\t{_opt(e.total_tokens)}\t{partition}\t{off}\n")
        for s in e.spans:
            spans.append(f"{tid}\t{esc(s.span_id)}\t{esc(s.kind)}\t{esc(s.model)}\t{s.duration_ms!r}\t"
                         f"{_opt(s.input_tokens)}\t{_opt(s.output_tokens)}\t{_opt(s.status)}\t{started}\t{op}\n")
    return "".join(traces), "".join(spans), len(spans)


def _has_special(events: Sequence[Any]) -> bool:
    parts: list[str] = []
    for e in events:
        parts += (e.trace_id, e.operation_type, e.user_id or "", e.kb_id or "")
        for s in e.spans:
            parts += (s.span_id, s.kind, s.model or "")
    return _SPECIAL.search("\x00".join(parts)) is not None
