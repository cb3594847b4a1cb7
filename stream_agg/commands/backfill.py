"""`stream-agg backfill`: recompute buckets exactly from the raw tables (source 'backfill').

Also holds the input handling shared by the operator commands (backfill, verify, replay,
reconcile): every bad input ends as one `error: ...` line on stderr and exit code 2,
before anything is written.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import click

from stream_agg.config import Config, ConfigError, load_config, redact_url

log = logging.getLogger("stream_agg.backfill")

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def fail(message: str) -> NoReturn:
    """One line on stderr, exit 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def range_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--start/--end/--granularity/--metric/--yes/--database-url, shared by the operator commands."""
    options = [
        click.option("--start", required=True, help="Range start, ISO 8601 (naive = UTC)."),
        click.option("--end", required=True, help="Range end (exclusive), ISO 8601."),
        click.option("--granularity", default="all", show_default=True, help="hour, day, week or all."),
        click.option("--metric", "metrics", multiple=True, help="Only this metric (repeatable; default all)."),
        click.option("--yes", is_flag=True, help="Accept a range longer than STREAM_AGG_MAX_RANGE."),
        click.option("--database-url", help="Overrides STREAM_AGG_DATABASE_URL."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@dataclass(frozen=True)
class RangeInput:
    """Validated operator input: settings, registry, granularities and the requested range."""

    config: Config
    registry: Any
    granularities: tuple[str, ...]
    start: Any
    end: Any


def parse_range_input(start: str, end: str, granularity: str, metrics: Sequence[str], yes: bool,
                      **overrides: Any) -> RangeInput:
    """Settings + range + granularity + metrics, or exit 2 with one line."""
    from stream_agg.ops.backfill import OpsError, check_range, parse_granularity, parse_time, select_registry

    try:
        config = load_config(**overrides)
        t0, t1 = parse_time(start), parse_time(end)
        grans = parse_granularity(granularity)
        registry = select_registry(config.cardinality_caps, metrics)
        check_range(t0, t1, config.max_range, yes)
    except (ConfigError, OpsError) as exc:
        fail(str(exc))
    return RangeInput(config, registry, grans, t0, t1)


def open_database(config: Config) -> None:
    """Reach PostgreSQL and check the schema, or exit 2 with one line."""
    from stream_agg.ops.backfill import OpsError, require_tables
    from stream_agg.store.db import connect, describe_db_error
    from stream_agg.store.schema import SchemaTooNewError

    try:
        with connect(config.database_url) as conn:
            require_tables(conn)
    except (OpsError, SchemaTooNewError) as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - any driver error is one line for the operator
        fail(f"cannot reach PostgreSQL at {redact_url(config.database_url)}: {describe_db_error(exc)}")


def describe_widening(requested: tuple[Any, Any], start: int, end: int, granularity: str) -> str:
    from stream_agg.ops.backfill import iso

    if (int(requested[0].timestamp()), requested[1].timestamp()) == (start, end):
        return f"range {iso(start)} .. {iso(end)} (whole {granularity}s)"
    return (f"range widened to whole {granularity}s: {iso(start)} .. {iso(end)} "
            f"(requested {iso(requested[0])} .. {iso(requested[1])})")


class ChunkProgress:
    """A rich progress bar (buckets done / total, rate) on a terminal; log lines otherwise."""

    def __init__(self, total_buckets: int, label: str, tty: bool | None = None) -> None:
        self.total = total_buckets
        self.done = 0
        self.rows = 0
        self.started = time.perf_counter()
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._bar: Any = None
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("buckets  {task.fields[rate]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self._task = self._bar.add_task(label, total=total_buckets, rate="")
            self._bar.start()

    def __call__(self, result: Any, chunks_done: int, chunks_total: int) -> None:
        from stream_agg.ops.backfill import iso

        self.done += result.buckets
        self.rows += sum(result.rows.values())
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = f"{self.done / elapsed:,.1f}/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=rate)
        else:
            log.info("chunk %d/%d %s .. %s: buckets %d/%d (%s), %d rows, %.2f s", chunks_done, chunks_total,
                     iso(result.start), iso(result.end), self.done, self.total, rate,
                     sum(result.rows.values()), result.seconds)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


@click.command("backfill")
@range_options
@click.option("--dry-run", is_flag=True, help="Compute and report, write nothing.")
@click.option("--prune", is_flag=True, help="Also delete stream rows of buckets that have no raw data.")
@click.option("--jobs", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Chunks computed at once (one PostgreSQL connection each).")
def command(start: str, end: str, granularity: str, metrics: tuple[str, ...], yes: bool, database_url: str | None,
            dry_run: bool, prune: bool, jobs: int) -> None:
    """Recompute buckets of [START, END) exactly from the raw traces / spans tables.

    The range is widened to whole buckets of the coarsest granularity asked for and walked
    in chunks of that size, each one transaction: Ctrl-C keeps whole chunks, and running
    the same command again finishes the job (identical rows are not rewritten). Written
    rows have source 'backfill', which the stream never overwrites: backfill closed
    buckets only.
    """
    from stream_agg.ops.backfill import Interrupted, coarsest, make_plan, open_buckets_warning, run_backfill
    from stream_agg.store.db import describe_db_error

    given = parse_range_input(start, end, granularity, metrics, yes, database_url=database_url)
    plan = make_plan(given.registry, given.granularities, given.start, given.end, prune=prune, dry_run=dry_run,
                     jobs=jobs)
    click.echo(describe_widening((given.start, given.end), plan.start, plan.end, coarsest(plan.granularities)))
    open_database(given.config)
    warning = open_buckets_warning(plan, given.config.grace)
    if warning:
        click.echo(f"warning: {warning}", err=True)
    progress = ChunkProgress(plan.total_buckets, "backfill")
    try:
        summary = run_backfill(given.config.database_url, plan, on_chunk=progress)
    except Interrupted as exc:
        progress.close()
        click.echo(f"interrupted: {exc.done} of {exc.total} chunks committed (whole chunks only); "
                   "re-run the same command to finish", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - PostgreSQL went away mid-run: say so in one line
        progress.close()
        fail(f"backfill stopped: {describe_db_error(exc)}; committed chunks stay, re-run to finish")
    progress.close()
    click.echo(summary.describe())
