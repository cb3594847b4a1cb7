"""The raw archive's COPY text, loaded by PostgreSQL, gives back exactly the events' fields."""

from __future__ import annotations

import msgspec
import psycopg
from helpers import make_events

from stream_agg.events import Span, TraceEvent
from stream_agg.store.archive_copy import SPAN_COLUMNS, TRACE_COLUMNS, render
from stream_agg.store.schema import migrate


def _awkward(events: list[TraceEvent]) -> list[TraceEvent]:
    """Some events whose text fields hold what COPY's text format must escape."""
    nasty = "a\tb\\c\nd\re"
    first = msgspec.structs.replace(events[0], user_id=nasty, kb_id="\\N", spans=[
        Span(span_id="s\t1", kind="llm", duration_ms=1.5, model="m\\odel", input_tokens=None, output_tokens=3)])
    return [first, *events[1:]]


def test_rendered_archive_loads_back_unchanged(database_url: str) -> None:
    migrate(database_url)
    plain = make_events(200, seed=21, null_rate=0.3)
    for events in (plain, _awkward(plain)):
        offsets = list(range(100, 100 + len(events)))
        traces, spans, n_spans = render(events, offsets, partition=3)
        assert n_spans == sum(len(e.spans) for e in events)
        with psycopg.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE t (LIKE traces INCLUDING DEFAULTS)")
            cur.execute("CREATE TEMP TABLE s (LIKE spans)")
            with cur.copy(f"COPY t ({TRACE_COLUMNS}) FROM STDIN") as copy:
                copy.write(traces)
            with cur.copy(f"COPY s ({SPAN_COLUMNS}) FROM STDIN") as copy:
                copy.write(spans)
            got = {r[0]: r[1:] for r in cur.execute(f"SELECT {TRACE_COLUMNS} FROM t").fetchall()}
            got_spans = {(r[0], r[1]): r[2:] for r in cur.execute(f"SELECT {SPAN_COLUMNS} FROM s").fetchall()}
        assert len(got) == len(events)
        for e, off in zip(events, offsets, strict=True):
            assert got[e.trace_id] == (e.operation_type, e.started_at, e.duration_ms, e.status, e.user_id, e.kb_id,
                                       e.total_tokens, 3, off)
            for sp in e.spans:
                assert got_spans[(e.trace_id, sp.span_id)] == (sp.kind, sp.model, sp.duration_ms, sp.input_tokens,
                                                               sp.output_tokens, sp.status, e.started_at,
                                                               e.operation_type)
