"""`stream-agg verify`: diff metrics_aggregates against the exact SQL recomputation."""

from __future__ import annotations

import json
import sys

import click

from stream_agg.commands.backfill import describe_widening, fail, open_database, parse_range_input, range_options


@click.command("verify")
@range_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--rank-tolerance", type=click.FloatRange(0.0, 1.0), default=0.001, show_default=True,
              help="Allowed rank error of stored p50/p95/p99 against the raw values.")
def command(start: str, end: str, granularity: str, metrics: tuple[str, ...], yes: bool, database_url: str | None,
            as_json: bool, rank_tolerance: float) -> None:
    """Check that stored rows of [START, END) equal the exact values from the raw tables.

    Writes nothing. count / min / max must be equal, sum and avg equal to 1e-9 relative,
    p50 / p95 / p99 within --rank-tolerance of their true rank; missing and extra rows
    count as mismatches. Exit 0 when everything agrees, 1 on any mismatch, 2 on bad input.
    """
    from stream_agg.ops.backfill import coarsest, widen
    from stream_agg.ops.verify import format_report, run_verify
    from stream_agg.store.db import describe_db_error

    given = parse_range_input(start, end, granularity, metrics, yes, database_url=database_url)
    lo, hi = widen(given.start, given.end, coarsest(given.granularities))
    if not as_json:
        click.echo(describe_widening((given.start, given.end), lo, hi, coarsest(given.granularities)))
    open_database(given.config)
    try:
        report = run_verify(given.config.database_url, given.registry, given.granularities, given.start, given.end,
                            rank_tolerance)
    except Exception as exc:  # noqa: BLE001 - one line for the operator
        fail(f"verify stopped: {describe_db_error(exc)}")
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, default=str))
    else:
        click.echo(format_report(report))
    sys.exit(0 if report.ok else 1)
