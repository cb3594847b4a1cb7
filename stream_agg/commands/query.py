"""`stream-agg query`: the dashboard question, answered from `metrics_aggregates` alone.

One metric, one dimension (maybe one value), a time range: stored rows as they are, or
rolled up into coarser windows / read at other quantiles by merging the stored digests,
so no raw trace is ever read.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any, NoReturn

import click

from stream_agg.config import ConfigError, load_config, redact_url
from stream_agg.core.buckets import GRANULARITIES
from stream_agg.core.query import (
    QueryError,
    ResultRow,
    answer,
    check_quantiles,
    check_rollup,
    needs_digests,
    parse_span,
    quantile_label,
    query_range,
)

DEFAULT_QUANTILES = (0.5, 0.95, 0.99)


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _parse_time(text: str, flag: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        _fail(f"{flag}: not an ISO 8601 time: {text!r} (e.g. 2026-03-01T00:00:00Z)")
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fmt(x: float | int | None) -> str:
    """Readable numbers for the table: integers as such, 4 significant digits below 1."""
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    if x == int(x) and abs(x) < 1e15:
        return f"{x:.0f}"
    if abs(x) < 1:
        return f"{x:.4g}"
    return f"{x:.3f}".rstrip("0").rstrip(".")


def _record(row: ResultRow, dimension: str, labels: list[str]) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "window_start": _iso(row.start), "window_end": _iso(row.end), "dimension_type": dimension,
        "dimension_value": row.dimension_value, "buckets": row.buckets, "count": row.count, "sum": row.sum,
        "min": row.min, "max": row.max, "avg": row.avg,
    }
    rec.update(zip(labels, row.quantiles, strict=True))
    rec["source"] = row.source
    return rec


def render_table(rows: list[ResultRow], labels: list[str], show_value: bool, show_buckets: bool) -> str:
    head = ["window_start"] + (["value"] if show_value else []) + (["buckets"] if show_buckets else []) + [
        "count", "sum", "min", "avg", "max", *labels, "source"]
    body = []
    for r in rows:
        body.append([_iso(r.start)] + ([r.dimension_value] if show_value else [])
                    + ([str(r.buckets)] if show_buckets else [])
                    + [_fmt(v) for v in (r.count, r.sum, r.min, r.avg, r.max, *r.quantiles)] + [r.source])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    left = {0, 1} if show_value else {0}
    left.add(len(head) - 1)

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(head), *(line(b) for b in body)])


@click.command("query")
@click.option("--metric", required=True, help="Metric name, e.g. trace.duration_ms.")
@click.option("--dimension", default="all", show_default=True,
              help="Dimension type: all, operation_type, model, kb or user.")
@click.option("--value", help="One dimension value (default: every value of the dimension).")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="hour", show_default=True,
              help="Stored buckets to read.")
@click.option("--since", help="Range = the last SPAN, e.g. 24h, 7d [default: 24h].")
@click.option("--start", help="Range start, ISO 8601 (naive = UTC); with --end instead of --since.")
@click.option("--end", help="Range end (exclusive), ISO 8601 [default: now].")
@click.option("--quantile", "quantiles", type=float, multiple=True,
              help="Quantile(s) to show, 0..1 (repeatable; default 0.5 0.95 0.99). Others than the stored "
                   "three are read from the digests.")
@click.option("--rollup", help="Merge buckets into windows of this span, e.g. 6h, 1d (from the digests).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--explain", is_flag=True, help="Print PostgreSQL's plan (EXPLAIN ANALYZE) instead of the rows.")
@click.option("--database-url", help="Overrides STREAM_AGG_DATABASE_URL.")
def command(metric: str, dimension: str, value: str | None, granularity: str, since: str | None,
            start: str | None, end: str | None, quantiles: tuple[float, ...], rollup: str | None, fmt: str,
            explain: bool, database_url: str | None) -> None:
    """Read one metric by one dimension over a time range from metrics_aggregates.

    Windows are the stored buckets, or --rollup windows (6 h windows start at 00/06/12/18
    UTC, week windows on Monday), widened so a window is never answered from part of its
    buckets. Exit 2 on bad input or an unreachable database.
    """
    from stream_agg.core.registry import default_registry
    from stream_agg.store.db import connect, describe_db_error
    from stream_agg.store.query_sql import DashboardQuery, fetch_rows
    from stream_agg.store.query_sql import explain as explain_plan
    from stream_agg.store.schema import SchemaTooNewError, refuse_newer, schema_version_of

    try:
        config = load_config(database_url=database_url)
    except ConfigError as exc:
        _fail(str(exc))
    registry = default_registry(config.cardinality_caps)
    try:
        spec = registry.metric(metric)
    except KeyError as exc:
        _fail(str(exc.args[0]))
    if dimension not in spec.dimensions:
        _fail(f"metric {metric} has no dimension {dimension!r} (it has: {', '.join(spec.dimensions)})")
    if dimension == "all" and value not in (None, "all"):
        _fail("dimension 'all' has the single value 'all'")
    try:
        qs = check_quantiles(quantiles) if quantiles else (DEFAULT_QUANTILES if spec.digest else ())
        if quantiles and not spec.digest:
            with_digest = ", ".join(m.name for m in registry.metrics if m.digest)
            raise QueryError(f"{metric} keeps no digest, so it has no quantiles (metrics with quantiles: "
                             f"{with_digest})")
        span = parse_span(rollup) if rollup else None
        if span is not None:
            check_rollup(granularity, span)
        if since and (start or end):
            raise QueryError("give --since or --start/--end, not both")
        if end and not start:
            raise QueryError("--end needs --start")
        now = time.time()
        if start:
            t0 = _parse_time(start, "--start").timestamp()
            t1 = _parse_time(end, "--end").timestamp() if end else now
        else:
            t1 = now
            t0 = now - parse_span(since or "24h")
        lo, hi = query_range(t0, t1, granularity, span)
    except QueryError as exc:
        _fail(str(exc))

    query = DashboardQuery(metric, granularity, dimension, value, lo, hi,
                           with_digest=needs_digests(granularity, qs, span))
    try:
        with connect(config.database_url) as conn:
            refuse_newer(schema_version_of(conn))
            if explain:
                click.echo(explain_plan(conn, query, analyze=True))
                return
            began = time.perf_counter()
            stored = fetch_rows(conn, query)
            read_ms = (time.perf_counter() - began) * 1000
    except Exception as exc:  # noqa: BLE001 - one line for the operator
        import psycopg

        if isinstance(exc, SchemaTooNewError):
            _fail(str(exc))
        if isinstance(exc, psycopg.errors.UndefinedTable):
            _fail("the database has no metrics_aggregates table: run `stream-agg migrate` first")
        _fail(f"cannot query PostgreSQL at {redact_url(config.database_url)}: {describe_db_error(exc)}")
    rows = answer(stored, granularity, qs, span)
    labels = [quantile_label(q) for q in qs]

    what = f"{metric} by {dimension}" + (f"={value}" if value else "")
    windows = f"{rollup} windows of {granularity} rows" if rollup else f"{granularity} buckets"
    summary = (f"{what}, {windows}, {_iso(lo)} .. {_iso(hi)}: {len(rows)} rows from {len(stored)} stored "
               f"rows (read in {read_ms:.1f} ms)")
    if fmt == "json":
        click.echo(json.dumps([_record(r, dimension, labels) for r in rows], indent=2))
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        head = list(_record(rows[0], dimension, labels)) if rows else [
            "window_start", "window_end", "dimension_type", "dimension_value", "buckets", "count", "sum", "min",
            "max", "avg", *labels, "source"]
        writer.writerow(head)
        for r in rows:
            writer.writerow(["" if v is None else v for v in _record(r, dimension, labels).values()])
        click.echo(out.getvalue(), nl=False)
    elif rows:
        click.echo(render_table(rows, labels, show_value=value is None, show_buckets=span is not None))
    click.echo(summary if rows else f"no rows: {summary}", err=True)
    missing = [r for r in rows if r.missing_digests]
    if missing and qs:
        n = sum(r.missing_digests for r in missing)
        click.echo(f"note: {len(missing)} windows show no {'/'.join(labels)}: {n} of their stored rows carry no "
                   "digest (rows a backfill wrote without one), and percentiles of parts do not combine. "
                   f"Re-run `stream-agg backfill --start {_iso(lo)} --end {_iso(hi)}` to store them.", err=True)
