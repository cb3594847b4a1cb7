"""Keeps `metrics_aggregates`' planner statistics current after the stream's bulk writes.

Why: a backlog's first flushes COPY hundreds of thousands of rows into a table whose
statistics still describe it as empty (or as it was at the last ANALYZE). With no useful
statistics every index looks as good as any other, and for the cap-cut delete (each scope:
bucket, granularity, metric, dimension) PostgreSQL chose the dashboard index (metric,
granularity, dimension, value, time), which holds a scope's rows spread over every hour
of the table: measured in the worker, 41 scopes took 506 ms reading 48 hours of index
entries each, against 230 ms for 64 scopes through the bucket key once analysed. Autovacuum
would analyse the table, but only about a minute later, and not at all where it is off.

So after a flush, when the rows this process COPYed into new buckets since its last ANALYZE
outnumber the rows the planner believes the table holds (`pg_class.reltuples`; -1 = never analysed), an
ANALYZE of the table runs on a thread and a connection of its own: it does not block the
flush's writes (its lock conflicts only with VACUUM / ANALYZE / DDL) and it stays off the
critical path of the next flush. A role that may not analyse the table gets a warning from
PostgreSQL, logged once; it is then left to autovacuum.
"""

from __future__ import annotations

import logging
import threading
import time

import psycopg
from psycopg import sql

from stream_agg.store.db import connect

log = logging.getLogger(__name__)

TABLE = "metrics_aggregates"
# Below this many written rows the planner's guesses cost little: no ANALYZE.
MIN_ROWS = 20_000


class StatsRefresher:
    """Runs ANALYZE of `table` in the background once this process has written enough rows."""

    def __init__(self, url: str, table: str = TABLE, min_rows: int = MIN_ROWS) -> None:
        self.url = url
        self.table = table
        self.min_rows = min_rows
        self.written = 0  # rows counted since the last ANALYZE this process ran
        self.believed = 0.0  # the table's row count as the planner saw it at the last check
        self.runs = 0  # ANALYZEs run
        self.disabled = False  # no more checks: a role that may not analyse, or a worker exiting
        self._closing = False
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()

    def wrote(self, rows: int) -> None:
        """Count rows just committed; start a check (and maybe an ANALYZE) once they outnumber
        what the planner believed the table held at the last check."""
        with self._lock:
            self.written += rows
            if self.disabled or self._closing or self.busy() or self.written <= max(self.min_rows, self.believed):
                return
            written, self.written = self.written, 0
            self._thread = threading.Thread(target=self._refresh, args=(written,), name="stream-agg-analyze",
                                            daemon=True)
            self._thread.start()

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a running check / ANALYZE (tests; `close`)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Stop: cancel a running ANALYZE rather than hold up a shutdown (it is only statistics).

        The cancel is sent again until the thread ends: one sent while the thread is still
        connecting, or between its statements, would reach an idle session and be lost."""
        with self._lock:
            self._closing = True
        deadline = time.monotonic() + timeout
        while self.busy() and time.monotonic() < deadline:
            with self._lock:
                conn = self._conn
            if conn is not None:
                _cancel(conn)
            self.wait(0.1)
        if not self.busy():
            self._closing = False  # usable again (a store may reconnect after `close`)

    def _refresh(self, written: int) -> None:
        try:
            conn = connect(self.url, autocommit=True)
        except psycopg.Error as exc:
            log.warning("could not connect to refresh %s's statistics (left to autovacuum this time): %s",
                        self.table, exc)
            with self._lock:
                self.written += written
            return
        with self._lock:
            if self._closing:
                conn.close()
                return
            self._conn = conn
        warnings: list[str] = []
        conn.add_notice_handler(lambda d: warnings.append(d.message_primary or "")
                                if d.severity_nonlocalized == "WARNING" else None)
        try:
            believed = self._believed(conn)
            if written <= believed:  # analysed meanwhile (autovacuum): count on from here
                with self._lock:
                    self.written += written
                    self.believed = believed
                return
            if self._closing:
                return
            started = time.perf_counter()
            conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(self.table)))
            seconds = time.perf_counter() - started
            if warnings:
                with self._lock:
                    self.disabled = True
                log.warning("could not analyse %s (%s); its statistics are left to autovacuum", self.table,
                            "; ".join(warnings))
                return
            after = self._believed(conn)
            with self._lock:
                self.believed = after
                self.runs += 1
            log.info("analysed %s in %.3fs: %d rows written since the last check, the planner believed %d "
                     "rows and now %d", self.table, seconds, written, max(int(believed), 0), int(after))
        except psycopg.Error as exc:
            if not self._closing:  # else cancelled by `close`
                log.warning("could not analyse %s (left to autovacuum this time): %s", self.table, exc)
        finally:
            with self._lock:
                self._conn = None
            conn.close()

    def _believed(self, conn: psycopg.Connection) -> float:
        row = conn.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", (self.table,)).fetchone()
        return float(row[0]) if row is not None else 0.0


def _cancel(conn: psycopg.Connection) -> None:
    """Cancel the connection's running statement, if any (never raises)."""
    try:
        safe = getattr(conn, "cancel_safe", None)  # psycopg 3.2+: does not block on a dead server
        if safe is not None:
            safe(timeout=1.0)
        else:
            conn.cancel()
    except (psycopg.Error, OSError):
        pass
