"""Exact, authoritative recomputation of buckets from the raw `traces` / `spans` tables.

The range is widened to whole buckets of the coarsest granularity requested and walked in
chunks aligned to it (a week chunk when weeks are requested, so a week bucket is computed
in one piece; day chunks for days; for hours only, the hours of one day). Each chunk is one
transaction: computed with the SQL of `stream_agg.store.backfill_sql`, written through the
same upsert as the stream (`UPSERT_ROWS_SQL`, source 'backfill'), committed. An
interruption therefore leaves whole chunks done, and a re-run recomputes the same values
(rows whose stored values are identical are not even rewritten).

Determinism: each chunk runs with parallel query and synchronized seq scans off, so the
rows of a group are summed in the same order on every run and a re-run of the same command
writes bit-identical sums. (Another set of granularities sorts the rows differently, so its
sums may differ in the last bits, far inside verify's 1e-9.) Throughput comes instead from
running `jobs` chunks at once on separate connections (two by default: one per core here).

Digest column: backfilled rows of digest metrics carry a t-digest too, so `query --quantile`
and hour -> day roll-ups work on them like on stream rows. It is built in Python from the
group's raw values, which the same SQL statement returns next to its PERCENTILE_CONT
columns (`array_send(array_agg(v))`, decoded with numpy), sorted first so the digest bytes
do not depend on the order PostgreSQL grouped the rows in. Measured by `bench/backfill.py`
(1,000,000 traces with spans over 30 days, this 2-core machine, shared with other work at
the time): 41.1 s with digests against 25.7 s with `digest` left NULL. The +15 s (about
7 CPU-s in the client: decode, sort, build, COPY back; the rest moving the raw values out
of PostgreSQL) keeps the run well inside the 60 s target, so backfilled rows stay
complete: roll-ups and arbitrary quantiles work on them like on stream rows.
The percentile columns always come from PERCENTILE_CONT, never from the digest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import psycopg

from stream_agg.core.aggstate import digest_from_values, digest_to_bytes
from stream_agg.core.buckets import DAY, GRANULARITIES, SPAN, bucket_start, to_datetime
from stream_agg.core.registry import Registry, default_registry
from stream_agg.store import backfill_sql as q
from stream_agg.store.db import connect
from stream_agg.store.schema import refuse_newer, schema_version_of
from stream_agg.store.stream_state import UPSERT_ROWS_SQL

log = logging.getLogger(__name__)

# Per-chunk session settings (SET LOCAL: they end with the chunk's transaction).
CHUNK_SETTINGS = (
    "SET LOCAL max_parallel_workers_per_gather = 0",  # deterministic summation order
    "SET LOCAL synchronize_seqscans = off",  # ... also for big tables
    "SET LOCAL work_mem = '128MB'",  # group sorts for PERCENTILE_CONT stay in memory
    "SET LOCAL jit = off",  # compiling each generated statement costs more than it saves
    # The cap's join of raw rows to their value's rank: a hash join probes the rows as they
    # come; the merge join the planner prefers sorts them first (measured 1.5x slower).
    "SET LOCAL enable_mergejoin = off",
)

Key = tuple[str, int, str, str, str]  # (granularity, bucket start, metric, dimension, value)


class OpsError(ValueError):
    """Bad input or an unusable environment for an operator command (exit code 2)."""


class Interrupted(Exception):  # noqa: N818 - it is a state the caller reports, not an error
    """The run was stopped (Ctrl-C) after `done` of `total` chunks had committed."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"interrupted after {done} of {total} chunks")
        self.done = done
        self.total = total


# ----------------------------------------------------------------------------- input


def parse_time(text: str) -> datetime:
    """ISO 8601 instant; a naive one is UTC (as everywhere in stream-agg)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise OpsError(f"bad time {text!r}: use ISO 8601, e.g. 2026-03-01T00:00:00Z") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_granularity(text: str) -> tuple[str, ...]:
    """'hour' | 'day' | 'week' | 'all' -> the granularities to compute."""
    name = text.strip().lower()
    if name == "all":
        return GRANULARITIES
    if name in GRANULARITIES:
        return (name,)
    raise OpsError(f"unknown granularity {text!r} (use hour, day, week or all)")


def select_registry(caps: dict[str, int], metrics: Sequence[str]) -> Registry:
    """The default registry with the configured caps, restricted to `metrics` (all if empty)."""
    try:
        return default_registry(caps).select(list(metrics))
    except KeyError as exc:
        raise OpsError(str(exc.args[0])) from None


def parse_duration(text: str, what: str) -> float:
    """'1h', '90m', '2d' ... -> seconds (the same syntax as the STREAM_AGG_* durations)."""
    from stream_agg.config import _parse_duration

    try:
        return _parse_duration(text)
    except ValueError as exc:
        raise OpsError(f"{what}: {exc}") from None


def check_range(start: datetime, end: datetime, max_range: float, yes: bool) -> None:
    """Refuse an empty / reversed range, and a longer one than `max_range` without --yes."""
    if end <= start:
        raise OpsError(f"end {iso(end)} is not after start {iso(start)}")
    seconds = (end - start).total_seconds()
    if seconds > max_range and not yes:
        raise OpsError(f"range of {_human(seconds)} is longer than the maximum {_human(max_range)} "
                       "(STREAM_AGG_MAX_RANGE); pass --yes to run it anyway")


def coarsest(granularities: Sequence[str]) -> str:
    return max(granularities, key=lambda g: SPAN[g])


def widen(start: datetime, end: datetime, granularity: str) -> tuple[int, int]:
    """[start, end) as epoch seconds, widened to whole buckets of `granularity`."""
    lo = bucket_start(start.timestamp(), granularity)
    hi = bucket_start(end.timestamp(), granularity)
    if hi < end.timestamp():
        hi += SPAN[granularity]
    return lo, hi


def chunks(start: int, end: int, granularity: str) -> list[tuple[int, int]]:
    """Chunks of a widened range: one bucket of `granularity`, or one day's hours."""
    out = []
    a = start
    while a < end:
        if granularity == "hour":
            b = min(end, bucket_start(float(a), "day") + DAY)
        else:
            b = a + SPAN[granularity]
        out.append((a, b))
        a = b
    return out


def iso(moment: datetime | int | float) -> str:
    """RFC 3339 in UTC with a Z (how ranges are printed)."""
    dt = moment if isinstance(moment, datetime) else to_datetime(moment)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _human(seconds: float) -> str:
    if seconds >= DAY and seconds % 3600 == 0:
        return f"{seconds / DAY:g} days"
    if seconds >= 3600:
        return f"{seconds / 3600:g} hours"
    return f"{seconds:g} s"


# ----------------------------------------------------------------------------- exact rows


@dataclass
class ExactRow:
    """One (granularity, bucket, metric, dimension, value) computed exactly in SQL."""

    key: Key
    count: int
    sum: float
    min: float
    max: float
    avg: float
    p50: float | None
    p95: float | None
    p99: float | None
    values: npt.NDArray[np.float64] | None  # sorted raw values (digest metrics, when asked)


def compute_chunk(cur: psycopg.Cursor, registry: Registry, granularities: Sequence[str], start: int,
                  end: int, with_values: bool) -> list[ExactRow]:
    """Every exact row of the chunk [start, end) (aligned to the coarsest granularity)."""
    params = {"start": to_datetime(start), "end": to_datetime(end)}
    rows: list[ExactRow] = []
    for st in q.aggregate_statements(registry, tuple(granularities), with_values=with_values):
        cur.execute(st.sql, params, binary=True)  # raw values as bytea, not hex text
        for (g, t, metric, dim, value, c, s, lo, hi, avg, p50, p95, p99, vals) in cur.fetchall():
            values = np.sort(q.decode_values(vals)) if vals is not None else None
            rows.append(ExactRow((g, int(t.timestamp()), metric, dim, value), int(c), float(s),
                                 float(lo), float(hi), float(avg), p50, p95, p99, values))
    return rows


def digest_bytes(vals: bytes | None) -> bytes | None:
    """The stored digest of a group's raw values (`array_send` bytes), sorted first so the
    bytes do not depend on the order PostgreSQL grouped the rows in."""
    values = q.decode_values(vals)
    if not values.size:
        return None
    return digest_to_bytes(digest_from_values(np.sort(values)))


def count_raw_rows(cur: psycopg.Cursor, registry: Registry, start: int, end: int) -> int:
    cur.execute(q.raw_rows_sql(registry), {"start": to_datetime(start), "end": to_datetime(end)})
    row = cur.fetchone()
    return int(row[0]) if row is not None else 0


@contextmanager
def chunk_transaction(conn: psycopg.Connection, read_only: bool = False) -> Iterator[psycopg.Cursor]:
    """One chunk = one transaction, with the deterministic, in-memory settings above."""
    with conn.transaction(), conn.cursor() as cur:
        if read_only:
            cur.execute("SET TRANSACTION READ ONLY")
        for setting in CHUNK_SETTINGS:
            cur.execute(setting)
        yield cur


def require_tables(conn: psycopg.Connection) -> None:
    """The schema must exist (operators run `stream-agg migrate`; we never create it here),
    and not be newer than this stream-agg (`schema.refuse_newer` raises SchemaTooNewError)."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('metrics_aggregates') IS NOT NULL AND to_regclass('traces') "
                    "IS NOT NULL AND to_regclass('spans') IS NOT NULL")
        row = cur.fetchone()
    version = schema_version_of(conn)
    conn.rollback()
    if not row or not row[0]:
        raise OpsError("the database has no stream-agg tables: run `stream-agg migrate` first")
    refuse_newer(version)


# ----------------------------------------------------------------------------- backfill


@dataclass(frozen=True)
class BackfillPlan:
    registry: Registry
    granularities: tuple[str, ...]
    start: int  # widened, epoch seconds
    end: int
    prune: bool = False
    dry_run: bool = False
    jobs: int = 2
    digests: bool = True  # False leaves `digest` NULL (how bench/backfill.py measures what digests cost)

    @property
    def chunks(self) -> list[tuple[int, int]]:
        return chunks(self.start, self.end, coarsest(self.granularities))

    def buckets_in(self, a: int, b: int) -> int:
        return sum((b - a) // SPAN[g] for g in self.granularities)

    @property
    def total_buckets(self) -> int:
        return self.buckets_in(self.start, self.end)


def make_plan(registry: Registry, granularities: Sequence[str], start: datetime, end: datetime,
              prune: bool = False, dry_run: bool = False, jobs: int = 2, digests: bool = True) -> BackfillPlan:
    """A plan over [start, end) widened to whole buckets of the coarsest granularity."""
    grans = tuple(g for g in GRANULARITIES if g in granularities)
    lo, hi = widen(start, end, coarsest(grans))
    return BackfillPlan(registry, grans, lo, hi, prune, dry_run, max(1, jobs), digests)


@dataclass
class ChunkResult:
    start: int
    end: int
    buckets: int  # buckets of the chunk (all requested granularities)
    buckets_written: int  # of those, buckets that have at least one row
    rows: dict[str, int]  # rows computed per granularity
    unchanged: int  # rows already stored with identical values (not rewritten)
    removed: int  # rows of recomputed buckets that the exact result does not have
    pruned: int
    raw_rows: int
    seconds: float


@dataclass
class BackfillSummary:
    plan: BackfillPlan
    results: list[ChunkResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows(self) -> dict[str, int]:
        out = dict.fromkeys(self.plan.granularities, 0)
        for r in self.results:
            for g, n in r.rows.items():
                out[g] += n
        return out

    def total(self, attr: str) -> int:
        return sum(getattr(r, attr) for r in self.results)

    def describe(self) -> str:
        p = self.plan
        rows = self.rows
        per = ", ".join(f"{g} {rows[g]:,}" for g in p.granularities)
        verb = "would write" if p.dry_run else "wrote"
        text = (f"backfill {iso(p.start)} .. {iso(p.end)}: {verb} {self.total('buckets_written'):,} of "
                f"{p.total_buckets:,} buckets (the others have no raw data); {verb} rows: {per} "
                f"(total {sum(rows.values()):,}")
        if not p.dry_run:
            text += (f"; unchanged {self.total('unchanged'):,}, removed {self.total('removed'):,}"
                     + (f", pruned {self.total('pruned'):,}" if p.prune else ""))
        raw = self.total("raw_rows")
        rate = raw / self.seconds if self.seconds > 0 else 0.0
        return text + f"); {raw:,} raw rows in {self.seconds:.2f} s ({rate:,.0f} raw rows/s)"


def backfill_chunk(conn: psycopg.Connection, plan: BackfillPlan, a: int, b: int) -> ChunkResult:
    """Compute and write one chunk in one transaction (rolled back in a dry run).

    Rows land in a temp table first: non-digest rows straight from SQL, digest rows through
    the client (which adds the digest). Then, against metrics_aggregates: drop the rows the
    exact result no longer has, (--prune) stream rows of buckets without raw data, skip rows
    already stored identically, and upsert the rest with source 'backfill'.
    """
    started = time.perf_counter()
    params = {"start": to_datetime(a), "end": to_datetime(b)}
    unchanged = removed = pruned = 0
    with conn.transaction(force_rollback=plan.dry_run), conn.cursor() as cur:
        for setting in CHUNK_SETTINGS:
            cur.execute(setting)
        cur.execute(q.CREATE_TMP_SQL)
        cur.execute(f"TRUNCATE {q.TMP_TABLE}")
        for st in q.aggregate_statements(plan.registry, plan.granularities, with_values=plan.digests):
            cur.execute(q.split_insert_sql(st), params, binary=True)  # bytea raw, not hex
            digest_rows = cur.fetchall()
            if digest_rows:
                with cur.copy(q.COPY_TMP_SQL) as copy:
                    copy.set_types(q.COPY_TMP_TYPES)
                    for row in digest_rows:
                        copy.write_row((*row[:13], digest_bytes(row[13])))
        cur.execute(q.TMP_COUNTS_SQL)
        counts = {g: (int(n), int(nb)) for g, n, nb in cur.fetchall()}
        raw = count_raw_rows(cur, plan.registry, a, b)
        if not plan.dry_run:
            cur.execute(q.DELETE_REPLACED_SQL)
            removed = cur.rowcount
            if plan.prune:
                cur.execute(q.PRUNE_SQL, {"grans": list(plan.granularities), "metrics": list(plan.registry.names),
                                          **params})
                pruned = cur.rowcount
            cur.execute(q.DROP_UNCHANGED_SQL)
            unchanged = cur.rowcount
            cur.execute(UPSERT_ROWS_SQL.format(source="backfill", tmp=q.TMP_TABLE))
    per_gran = {g: counts.get(g, (0, 0))[0] for g in plan.granularities}
    written = sum(nb for _, nb in counts.values())
    return ChunkResult(a, b, plan.buckets_in(a, b), written, per_gran, unchanged, removed, pruned,
                       raw, time.perf_counter() - started)


Progress = Callable[[ChunkResult, int, int], None]  # (result, chunks done, chunks total)
DEADLOCK_ATTEMPTS = 3  # runs of a chunk that PostgreSQL chose as a deadlock's victim


def run_backfill(url: str, plan: BackfillPlan, on_chunk: Progress | None = None) -> BackfillSummary:
    """Run every chunk (`plan.jobs` at a time); raises Interrupted on Ctrl-C (whole chunks kept)."""
    started = time.perf_counter()
    summary = BackfillSummary(plan)
    todo = plan.chunks
    local = threading.local()
    conns: list[psycopg.Connection] = []
    lock = threading.Lock()

    def work(a: int, b: int) -> ChunkResult:
        conn = getattr(local, "conn", None)
        if conn is None or conn.closed:
            conn = local.conn = connect(url)
            with lock:
                conns.append(conn)
        for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
            try:
                return backfill_chunk(conn, plan, a, b)
            except psycopg.errors.DeadlockDetected:
                # A stream flush writing the same buckets (it takes the buckets' advisory
                # locks; the backfill does not): the chunk rolled back as a whole, and is
                # idempotent, so it is run again.
                if attempt == DEADLOCK_ATTEMPTS:
                    raise
                log.warning("chunk %s .. %s deadlocked with another writer; running it again (attempt %d)",
                            to_datetime(a).isoformat(), to_datetime(b).isoformat(), attempt + 1)
        raise AssertionError("unreachable")

    pool = ThreadPoolExecutor(max_workers=plan.jobs, thread_name_prefix="backfill")
    pending: set[Future[ChunkResult]] = set()
    queue = list(reversed(todo))
    try:
        while queue or pending:
            while queue and len(pending) < plan.jobs:
                a, b = queue.pop()
                pending.add(pool.submit(work, a, b))
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                result = fut.result()
                summary.results.append(result)
                if on_chunk is not None:
                    on_chunk(result, len(summary.results), len(todo))
    except KeyboardInterrupt:
        queue.clear()
        with lock:
            for conn in conns:
                conn.cancel()  # a chunk in flight rolls back: only whole chunks stay
        for fut in pending:
            try:
                summary.results.append(fut.result())
            except Exception:  # noqa: BLE001, S110 - cancelled chunks roll back by design
                pass
        raise Interrupted(len(summary.results), len(todo)) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for conn in conns:
            conn.close()
        summary.seconds = time.perf_counter() - started
    summary.results.sort(key=lambda r: r.start)
    return summary


def open_buckets_warning(plan: BackfillPlan, grace: float, now: float | None = None) -> str | None:
    """A warning when the range holds buckets that may still receive events: once backfilled,
    the stream does not update those rows any more (the backfill is authoritative)."""
    now = time.time() if now is None else now
    finest = min(plan.granularities, key=lambda g: SPAN[g])
    last_closed_end = bucket_start(now - grace, finest)
    if plan.end > last_closed_end:
        return (f"the range reaches buckets that are not closed yet (after {iso(last_closed_end)}); "
                "the stream will not update their backfilled rows, run it again once they close")
    return None
