"""Row blocks rendered as binary COPY, loaded by PostgreSQL, give back exactly the rows' values."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import numpy as np
import psycopg
import pytest
from helpers import make_events, merged_round_robin

from stream_agg.core.buckets import to_datetime
from stream_agg.core.merged_rows import RowBlock
from stream_agg.core.registry import default_registry
from stream_agg.core.state_table import HOUR
from stream_agg.store import rows_copy, stream_state
from stream_agg.store.schema import migrate
from stream_agg.store.stream_state import RowFeed, StreamStore


def _awkward_block() -> RowBlock:
    """Every NULL pattern, a zero count, infinities, and labels COPY's text format would escape."""
    q = np.array([[1.0, 2.0, 3.0], [math.nan] * 3, [0.5, math.nan, 7.25], [math.nan] * 3, [-1e300, 0.0, 1e-300]])
    return RowBlock("hour", "trace.duration_ms", "user", np.array([0, 1, 480_000, 500_000, 499_999], dtype=np.int64),
                    ["a\tb\\c\nd", "\\N", "", "ünïcødé ✓", "x" * 300],
                    np.array([3, 0, 1, 2**40, 7], dtype=np.int64), np.array([6.5, 0.0, -2.0, 1e18, 1.25]),
                    np.array([1.0, math.inf, -2.0, 0.0, -5.0]), np.array([4.0, -math.inf, -2.0, 9.0, 5.0]),
                    q, [b"\x02" + np.arange(3.0).tobytes(), None, b"", b"\x00\xff" * 2000, None])


def _load(database_url: str, blocks: list[RowBlock]) -> dict[tuple, tuple]:
    cols = ", ".join(rows_copy.COLUMNS)
    with psycopg.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
        cur.execute(f"CREATE TEMP TABLE t AS SELECT {cols} FROM metrics_aggregates WITH NO DATA")
        with cur.copy(f"COPY t ({cols}) FROM STDIN (FORMAT BINARY)") as copy:
            for chunk in rows_copy.render(blocks):
                copy.write(chunk)
        rows = cur.execute("SELECT bucket_time, granularity, metric_name, dimension_type, dimension_value, count, "
                           "sum_value, min_value, max_value, avg_value, p50_value, p95_value, p99_value, digest "
                           "FROM t").fetchall()
    return {r[1:5] + (r[0],): r for r in rows}


def test_rendered_rows_load_back_unchanged(database_url: str) -> None:
    migrate(database_url)
    reg = default_registry({"user": 5})
    events = make_events(600, seed=31, hours=5, users=12, null_rate=0.3)
    blocks = [*merged_round_robin(events, reg, 2), _awkward_block()]
    got = _load(database_url, blocks)
    want = [row for b in blocks for _, row in b.rows()]
    assert len(got) == len(want) == sum(len(b) for b in blocks)
    for row in want:
        back = got[row[1:5] + (row[0],)]
        assert back[:5] == row[:5]
        assert back[5:9] == row[5:9]  # count, sum, min, max: bit for bit (binary floats)
        assert (back[9] is None) == (row[9] is None) and (row[9] is None or back[9] == row[9])
        assert back[10:13] == row[10:13]
        assert (bytes(back[13]) if back[13] is not None else None) == row[13]


def test_merged_rows_reach_the_table_in_the_dashboard_index_order(database_url: str) -> None:
    """The merge orders each block by value, then hour (the dashboard index's order, which
    PostgreSQL then keeps up cheaply), and the COPY keeps each block's order, whatever its
    rows' NULL patterns; every row once."""
    migrate(database_url)
    reg = default_registry({"user": 50})
    events = make_events(2000, seed=32, hours=9, users=40, null_rate=0.1)
    merged = merged_round_robin(events, reg, 2)
    # blocks of several hours and values: hour-major order would differ
    assert any(len(set(b.labels)) > 1 and len(set(b.hours.tolist())) > 1 for b in merged)
    blocks = [*merged, _awkward_block()]  # every NULL pattern (record layout) in one block
    cols = ", ".join(rows_copy.COLUMNS)
    with psycopg.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TEMP TABLE t AS SELECT {cols} FROM metrics_aggregates WITH NO DATA")
        with cur.copy(f"COPY t ({cols}) FROM STDIN (FORMAT BINARY)") as copy:
            for chunk in rows_copy.render(blocks):
                copy.write(chunk)
        got = cur.execute("SELECT granularity, metric_name, dimension_type, dimension_value, "
                          "extract(epoch FROM bucket_time)::bigint FROM t ORDER BY ctid").fetchall()
    want = []
    for b in blocks:
        rows = [(b.granularity, b.metric, b.dimension, v, h * HOUR) for v, h in zip(b.labels, b.hours.tolist(),
                                                                                  strict=True)]
        want += sorted(rows) if any(b is m for m in merged) else rows  # the COPY keeps each block's order
    assert got == want


def _table(database_url: str) -> dict[tuple, tuple]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT bucket_time, granularity, metric_name, dimension_type, dimension_value, count, "
                            "sum_value, min_value, max_value, source FROM metrics_aggregates").fetchall()
    return {(r[1], int(r[0].timestamp()), r[2], r[3], r[4]): r[5:] for r in rows}


def _blocks(hours: list[int], labels: list[str], base: int) -> RowBlock:
    n = len(hours)
    return RowBlock("hour", "trace.duration_ms", "user", np.array(hours, dtype=np.int64), labels,
                    np.arange(base, base + n, dtype=np.int64), np.arange(n, dtype=np.float64) + base,
                    np.zeros(n), np.full(n, float(base)), None, None)


def _seed_old_bucket(database_url: str, old: int) -> None:
    """Hour `old` already has a stream row for user a and a backfilled one for user b."""
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO metrics_aggregates (bucket_time, granularity, metric_name, dimension_type, "
                     "dimension_value, count, sum_value, source) VALUES "
                     "(%s, 'hour', 'trace.duration_ms', 'user', 'a', 1, 1, 'stream'), "
                     "(%s, 'hour', 'trace.duration_ms', 'user', 'b', 1, 1, 'backfill')",
                     (to_datetime(old * HOUR), to_datetime(old * HOUR)))


def _old_and_new(old: int, new: int) -> RowBlock:
    """Rows a, b, c of hour `old` and a, b of hour `new` (counts 10..14)."""
    return _blocks([old, old, old, new, new], ["a", "b", "c", "a", "b"], base=10)


def _after_old_and_new(old: int, new: int) -> dict[tuple, tuple]:
    """The table once `_old_and_new` is written over `_seed_old_bucket`: the backfill row kept."""
    key = ("trace.duration_ms", "user")
    return {
        ("hour", old * HOUR, *key, "a"): (10, 10.0, 0.0, 10.0, "stream"),
        ("hour", old * HOUR, *key, "b"): (1, 1.0, None, None, "backfill"),
        ("hour", old * HOUR, *key, "c"): (12, 12.0, 0.0, 10.0, "stream"),
        ("hour", new * HOUR, *key, "a"): (13, 13.0, 0.0, 10.0, "stream"),
        ("hour", new * HOUR, *key, "b"): (14, 14.0, 0.0, 10.0, "stream"),
    }


def test_rows_of_new_buckets_are_copied_and_the_others_upserted(database_url: str) -> None:
    """A flush's rows: those of buckets without any row go in by plain COPY, the rest by the
    upsert, which never replaces a backfill row; the table ends up the same either way."""
    migrate(database_url)
    store = StreamStore(database_url)
    old, new = 480_000, 480_001  # hours since the epoch
    _seed_old_bucket(database_url, old)
    block = _old_and_new(old, new)
    with store.conn().transaction(), store.conn().cursor() as cur:
        rows, _, new_rows = store.merge_rows(cur, "s", set(), blocks=[block])
        left = cur.execute("SELECT count(*) FROM tmp_rows").fetchone()
    store.close()
    assert rows == 5 and rows - new_rows == 3  # the old bucket's rows upserted; the new one's copied
    assert left == (0,)  # the staging table is left empty
    assert _table(database_url) == _after_old_and_new(old, new)


def _write_on_a_thread(store: StreamStore, blocks: list[RowBlock] | RowFeed,
                       buckets: set[tuple[str, int]] | None = None, read_staged: bool = False,
                       ) -> tuple[threading.Thread, list[Any]]:
    """`merge_rows` of `blocks` in a transaction on a started thread (as the worker's writer
    runs it). Its result (then, with `read_staged`, what the staging table holds after it)
    or its exception lands in the returned list."""
    result: list[Any] = []

    def flush() -> None:
        try:
            with store.conn().transaction(), store.conn().cursor() as cur:
                result.append(store.merge_rows(cur, "s", set(), blocks=blocks, block_buckets=buckets or ()))
                if read_staged:
                    result.append(cur.execute("SELECT count(*) FROM tmp_rows").fetchone())
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's assertions
            result.append(exc)

    writer = threading.Thread(target=flush)
    writer.start()
    return writer, result


def _wait_until_blocked(watch: psycopg.Connection, pid: int, failure: str) -> None:
    """Until backend `pid` waits for a lock (30 s at most, else fail with `failure`)."""
    deadline = time.monotonic() + 30
    while not watch.execute("SELECT count(*) FROM pg_locks WHERE NOT granted AND pid = %s", (pid,)).fetchone()[0]:
        assert time.monotonic() < deadline, failure
        time.sleep(0.02)


def _write_beside_a_backfill(database_url: str, store: StreamStore, hour: int, block: RowBlock,
                             ) -> tuple[list[Any], str]:
    """`merge_rows` of `block` on a thread while a backfill holds an uncommitted row (user b,
    count 5) of `hour`, committed once the flush waits on it. Returns what the thread got
    and the statement the flush waited in."""
    pid = store.conn().info.backend_pid
    backfill = psycopg.connect(database_url)
    backfill.execute("INSERT INTO metrics_aggregates (bucket_time, granularity, metric_name, dimension_type, "
                     "dimension_value, count, sum_value, source) "
                     "VALUES (%s, 'hour', 'trace.duration_ms', 'user', 'b', 5, 5, 'backfill')",
                     (to_datetime(hour * HOUR),))  # not committed yet: the flush's check does not see it
    writer, result = _write_on_a_thread(store, [block])
    try:
        with psycopg.connect(database_url, autocommit=True) as watch:
            _wait_until_blocked(watch, pid, "the flush never waited on the backfill's row")
            waiting_in = watch.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]
    finally:
        backfill.commit()  # the COPY, blocked on the unique index, now fails
        backfill.close()
        writer.join(30)
    return result, waiting_in


def test_a_backfill_row_inserted_meanwhile_sends_the_rows_through_the_upsert(
        database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The backfill takes no bucket lock: if it commits a row of a bucket the flush found
    empty, the COPY fails on the unique key, and the upsert keeps the backfill's row."""
    migrate(database_url)
    store = StreamStore(database_url)
    hour = 480_002
    with caplog.at_level(logging.INFO, logger="stream_agg.store.stream_state"):
        result, waiting_in = _write_beside_a_backfill(database_url, store, hour,
                                                      _blocks([hour, hour], ["a", "b"], base=20))
    store.close()
    assert waiting_in.startswith("COPY metrics_aggregates")
    assert any("appeared meanwhile" in r.getMessage() for r in caplog.records)
    assert result == [(2, 0, 0)]  # both rows upserted, none copied
    assert _table(database_url) == {
        ("hour", hour * HOUR, "trace.duration_ms", "user", "a"): (20, 20.0, 0.0, 20.0, "stream"),
        ("hour", hour * HOUR, "trace.duration_ms", "user", "b"): (5, 5.0, None, None, "backfill"),
    }


def _seed_buckets(database_url: str, hours: list[int]) -> None:
    """A stream row of user a in each of these hours: buckets that are not new."""
    with psycopg.connect(database_url) as conn:
        for h in hours:
            conn.execute("INSERT INTO metrics_aggregates (bucket_time, granularity, metric_name, dimension_type, "
                         "dimension_value, count, sum_value, source) "
                         "VALUES (%s, 'hour', 'trace.duration_ms', 'user', 'a', 1, 1, 'stream')",
                         (to_datetime(h * HOUR),))


def test_a_backfill_row_in_a_new_bucket_after_the_staged_rows_goes_through_the_upsert(
        database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Most buckets have rows: the staged rows are COPYed first, the new bucket's after. A
    backfill row committed meanwhile in that bucket fails its COPY (in a savepoint), and those
    rows are staged and upserted too: the backfill's row kept, the staged rows still written."""
    migrate(database_url)
    store = StreamStore(database_url)
    olds, hour = [480_050, 480_051, 480_052], 480_053
    _seed_buckets(database_url, olds)
    block = _blocks([*olds, hour, hour], ["a", "a", "a", "a", "b"], base=40)
    with caplog.at_level(logging.INFO, logger="stream_agg.store.stream_state"):
        result, waiting_in = _write_beside_a_backfill(database_url, store, hour, block)
    store.close()
    assert waiting_in.startswith("COPY metrics_aggregates")  # the staged rows were in by then
    assert any("appeared meanwhile" in r.getMessage() for r in caplog.records)
    assert result == [(5, 0, 0)]  # the three staged first, then the new bucket's two: all upserted
    key = ("trace.duration_ms", "user")
    assert _table(database_url) == {
        **{("hour", h * HOUR, *key, "a"): (40 + i, 40.0 + i, 0.0, 40.0, "stream") for i, h in enumerate(olds)},
        ("hour", hour * HOUR, *key, "a"): (43, 43.0, 0.0, 40.0, "stream"),
        ("hour", hour * HOUR, *key, "b"): (5, 5.0, None, None, "backfill"),
    }


def test_a_flush_split_between_new_and_existing_buckets_writes_every_column(database_url: str) -> None:
    """Real merged blocks (hour, day and week; percentiles and digests): rows of buckets that
    already have a row are upserted, the others copied, a block split between both; every
    column reads back as merged."""
    migrate(database_url)
    reg = default_registry({"user": 5})
    events = make_events(800, seed=33, hours=30, users=12)
    blocks = merged_round_robin(events, reg, 2)
    want = {k: row for b in blocks for k, row in b.rows()}
    existing = sorted({(k[0], k[1]) for k in want})[::3]  # every third bucket has a (stale) row
    assert {g for g, _ in existing} == {"hour", "day", "week"}
    stale = [k for k in want if (k[0], k[1]) in set(existing)]
    with psycopg.connect(database_url) as conn:
        for g, t, m, d, v in stale[::2]:  # half of those buckets' keys, with wrong values
            conn.execute("INSERT INTO metrics_aggregates (bucket_time, granularity, metric_name, dimension_type, "
                         "dimension_value, count, sum_value) VALUES (%s, %s, %s, %s, %s, 999, -1)",
                         (to_datetime(t), g, m, d, v))
    assert any(0 < sum((b.granularity, int(h) * HOUR) in set(existing) for h in b.hours) < len(b) for b in blocks)
    store = StreamStore(database_url)
    with store.conn().transaction(), store.conn().cursor() as cur:
        rows, _, new_rows = store.merge_rows(cur, "s", set(), blocks=blocks)
    store.close()
    assert rows == len(want)
    assert rows - new_rows == sum(1 for k in want if (k[0], k[1]) in set(existing))  # only those were upserted
    with psycopg.connect(database_url) as conn:
        got = conn.execute("SELECT bucket_time, granularity, metric_name, dimension_type, dimension_value, count, "
                           "sum_value, min_value, max_value, avg_value, p50_value, p95_value, p99_value, digest, "
                           "source, updated_at IS NOT NULL FROM metrics_aggregates").fetchall()
    assert len(got) == len(want)
    for r in got:
        key = (r[1], int(r[0].timestamp()), r[2], r[3], r[4])
        w = want[key]
        assert r[5:13] == w[5:13], key
        assert (bytes(r[13]) if r[13] is not None else None) == w[13], key
        assert r[14:] == ("stream", True)


def test_large_digests_are_stored_with_lz4_where_the_server_has_it(database_url: str) -> None:
    """`db.prefer_lz4`: the store's session compresses digests with lz4 (a third faster than
    pglz to COPY), on the COPY path and the upsert path alike, and they read back unchanged.
    A server without lz4 keeps pglz and the rows are written all the same."""
    migrate(database_url)
    reg = default_registry()
    events = make_events(6000, seed=34, hours=3)
    blocks = merged_round_robin(events, reg, 2)
    want = {k: row for b in blocks for k, row in b.rows()}
    upserted = sorted({(k[0], k[1]) for k in want if k[0] == "day"})
    with psycopg.connect(database_url) as conn:  # a day bucket with a row: its rows take the upsert
        g, t = upserted[0]
        conn.execute("INSERT INTO metrics_aggregates (bucket_time, granularity, metric_name, dimension_type, "
                     "dimension_value, count, sum_value) VALUES (%s, %s, 'x', 'all', 'all', 1, 1)",
                     (to_datetime(t), g))
        lz4 = conn.execute("SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
                           "WHERE name = 'default_toast_compression'").fetchone() == (True,)
    store = StreamStore(database_url)
    with store.conn().transaction(), store.conn().cursor() as cur:
        store.merge_rows(cur, "s", set(), blocks=blocks)
    store.close()
    with psycopg.connect(database_url) as conn:
        got = conn.execute("SELECT granularity, pg_column_compression(digest), digest FROM metrics_aggregates "
                           "WHERE length(digest) > 2100").fetchall()
        digests = dict(((g, int(t.timestamp()), m, d, v), dg and bytes(dg)) for g, t, m, d, v, dg in conn.execute(
            "SELECT granularity, bucket_time, metric_name, dimension_type, dimension_value, digest "
            "FROM metrics_aggregates WHERE metric_name <> 'x'").fetchall())
    assert {g for g, _, _ in got} >= {"hour", "day"}  # large digests on both paths
    assert {method for _, method, _ in got} == ({"lz4"} if lz4 else {"pglz"})
    assert digests == {k: w[13] for k, w in want.items()}


def _copied(watch: psycopg.Connection, pid: int) -> int | None:
    """Rows the backend's running COPY into metrics_aggregates has taken so far, or None."""
    row = watch.execute("SELECT p.tuples_processed FROM pg_stat_progress_copy p JOIN pg_class c "
                        "ON c.oid = p.relid WHERE p.pid = %s AND c.relname = 'metrics_aggregates'", (pid,)).fetchone()
    return None if row is None else int(row[0])


def test_rows_fed_while_merging_are_copied_as_they_come(database_url: str) -> None:
    """With a RowFeed (the worker's flush), PostgreSQL is taking the first block's rows while
    the next block is not merged yet, and the table ends as with a list of blocks: new
    buckets copied, existing ones upserted, the backfill's row kept."""
    migrate(database_url)
    store = StreamStore(database_url)
    old, new, many = 480_010, 480_011, 480_012
    _seed_old_bucket(database_url, old)
    pid = store.conn().info.backend_pid
    block = _old_and_new(old, new)
    # a first block bigger than psycopg's COPY buffer (32 KB), as a flush's blocks are
    first = _blocks([many] * 3000, [f"user-{i}" for i in range(3000)], base=100)
    feed = RowFeed()
    writer, result = _write_on_a_thread(store, feed, {("hour", old * HOUR), ("hour", new * HOUR),
                                                      ("hour", many * HOUR)})
    try:
        feed.put(first)
        feed.put(block.take(np.array([3, 4])))  # the new bucket's rows
        with psycopg.connect(database_url, autocommit=True) as watch:
            deadline = time.monotonic() + 30
            while not _copied(watch, pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            copied_early = _copied(watch, pid)
        waiting = writer.is_alive() and not result
        feed.put(block.take(np.array([0, 1, 2])))
    finally:
        feed.close()
        writer.join(30)
    store.close()
    assert copied_early and waiting  # rows were in before the feed ended
    assert result == [(3005, 0, 3002)]
    got = _table(database_url)
    assert {k: v for k, v in got.items() if k[1] != many * HOUR} == _after_old_and_new(old, new)
    assert {k[4]: v for k, v in got.items() if k[1] == many * HOUR} == {
        f"user-{i}": (100 + i, 100.0 + i, 0.0, 100.0, "stream") for i in range(3000)}


def _copied_into(watch: psycopg.Connection, pid: int, table: str) -> int | None:
    """Rows the backend's running COPY into `table` has taken so far, or None (by the
    statement: a staging table made in the flush's transaction is not in others' catalog)."""
    row = watch.execute("SELECT p.tuples_processed FROM pg_stat_progress_copy p JOIN pg_stat_activity a "
                        "ON a.pid = p.pid WHERE p.pid = %s AND a.query LIKE %s", (pid, f"COPY {table} %")).fetchone()
    return None if row is None else int(row[0])


def _three_of_four_with_rows(database_url: str, hour: int, piece_rows: int | None,
                             monkeypatch: pytest.MonkeyPatch) -> tuple[StreamStore, list[int], int]:
    """A migrated database where hours `hour`..+2 have a row and `hour`+3 none (so a flush of
    the four streams the staged rows), with pieces of `piece_rows` (None: the default)."""
    if piece_rows is not None:
        monkeypatch.setattr(stream_state, "PIECE_ROWS", piece_rows)
    migrate(database_url)
    olds = [hour, hour + 1, hour + 2]
    _seed_buckets(database_url, olds)
    return StreamStore(database_url), olds, hour + 3


def _holds_row_lock(watch: psycopg.Connection, pid: int) -> bool:
    """The backend has written into metrics_aggregates in its transaction (nothing else of a
    flush before the upsert takes that lock: the staging table is another table)."""
    return bool(watch.execute("SELECT count(*) FROM pg_locks WHERE pid = %s AND mode = 'RowExclusiveLock' AND "
                              "relation = 'metrics_aggregates'::regclass", (pid,)).fetchone()[0])


@pytest.mark.parametrize("piece_rows", [None, 1000], ids=["one-piece", "pieces"])
def test_rows_of_buckets_with_rows_are_staged_as_they_come(database_url: str, piece_rows: int | None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Most buckets have rows (a later flush, live traffic): PostgreSQL is taking the staged
    rows while the feed still merges, and the new bucket's rows go in after, by plain COPY.
    Once a piece of staged rows is in (`PIECE_ROWS`, here 1,000 or the default), it is upserted
    before the feed ends."""
    store, olds, new = _three_of_four_with_rows(database_url, 480_060, piece_rows, monkeypatch)
    pid = store.conn().info.backend_pid
    # a first block bigger than psycopg's COPY buffer (32 KB), as a flush's blocks are
    first = _blocks([olds[0]] * 3000, [f"user-{i}" for i in range(3000)], base=100)
    feed = RowFeed()
    writer, result = _write_on_a_thread(store, feed, {("hour", h * HOUR) for h in [*olds, new]}, read_staged=True)
    try:
        feed.put(first)
        with psycopg.connect(database_url, autocommit=True) as watch:
            deadline = time.monotonic() + 30
            if piece_rows is None:
                while not _copied_into(watch, pid, "tmp_rows") and time.monotonic() < deadline:
                    time.sleep(0.02)
                staged_early = bool(_copied_into(watch, pid, "tmp_rows"))
                time.sleep(0.3)  # time enough for an upsert that should not come
                upserted_early = _holds_row_lock(watch, pid)
            else:  # the first block is a whole piece: COPYed, upserted, then the writer waits for more
                # (its COPY may be over before a poll sees it: the upsert's lock is the evidence)
                while not _holds_row_lock(watch, pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
                upserted_early = staged_early = _holds_row_lock(watch, pid)
        waiting = writer.is_alive() and not result
        feed.put(_blocks([olds[1], olds[2], new, new], ["a", "a", "a", "b"], base=10))
    finally:
        feed.close()
        writer.join(30)
    store.close()
    assert staged_early and waiting  # staged rows were in before the feed ended
    assert upserted_early == (piece_rows is not None)
    assert result == [(3004, 0, 2), (0,)]  # the new bucket's two rows copied; the staging table left empty
    got = _table(database_url)
    key = ("trace.duration_ms", "user")
    assert {k: v for k, v in got.items() if k[1] != olds[0] * HOUR} == {
        ("hour", olds[1] * HOUR, *key, "a"): (10, 10.0, 0.0, 10.0, "stream"),
        ("hour", olds[2] * HOUR, *key, "a"): (11, 11.0, 0.0, 10.0, "stream"),
        ("hour", new * HOUR, *key, "a"): (12, 12.0, 0.0, 10.0, "stream"),
        ("hour", new * HOUR, *key, "b"): (13, 13.0, 0.0, 10.0, "stream")}
    assert {k[4]: v for k, v in got.items() if k[1] == olds[0] * HOUR} == {
        **{f"user-{i}": (100 + i, 100.0 + i, 0.0, 100.0, "stream") for i in range(3000)},
        "a": (1, 1.0, None, None, "stream")}  # its seeded row, not among the rows written


def test_a_merge_that_fails_fails_the_write_and_nothing_is_committed(database_url: str) -> None:
    migrate(database_url)
    store = StreamStore(database_url)
    hour = 480_020
    feed = RowFeed()
    feed.put(_blocks([hour], ["a"], base=50))
    feed.close(MemoryError("no room"))
    with pytest.raises(RuntimeError, match="merging the rows failed"):
        with store.conn().transaction(), store.conn().cursor() as cur:
            store.merge_rows(cur, "s", set(), blocks=feed, block_buckets={("hour", hour * HOUR)})
    store.close()
    assert _table(database_url) == {}


def test_a_merge_failing_while_the_copy_meets_a_backfill_row_fails_the_write(database_url: str) -> None:
    """The COPY waits on a backfill row of a fresh bucket, and the merge fails meanwhile: the
    COPY's unique-key error must not hide that failure (the fallback would write part of
    the rows); the write fails and nothing of it is committed."""
    migrate(database_url)
    store = StreamStore(database_url)
    pid = store.conn().info.backend_pid
    hour = 480_030
    # past psycopg's COPY buffer (32 KB), within the socket's: sent while the server waits
    first = _blocks([hour] * 3000, [f"user-{i}" for i in range(3000)], base=1)
    backfill = psycopg.connect(database_url)
    backfill.execute("INSERT INTO metrics_aggregates (bucket_time, granularity, metric_name, dimension_type, "
                     "dimension_value, count, sum_value, source) "
                     "VALUES (%s, 'hour', 'trace.duration_ms', 'user', 'user-7', 5, 5, 'backfill')",
                     (to_datetime(hour * HOUR),))  # not committed yet: the flush's check does not see it
    feed = RowFeed()
    writer, result = _write_on_a_thread(store, feed, {("hour", hour * HOUR)})
    try:
        feed.put(first)
        with psycopg.connect(database_url, autocommit=True) as watch:
            _wait_until_blocked(watch, pid, "the COPY never waited on the backfill's row")
        feed.close(MemoryError("no room"))
        time.sleep(0.5)  # the writer takes the failure while its COPY still waits (else it comes later)
    finally:
        backfill.commit()
        backfill.close()
        feed.close()
        writer.join(30)
    store.close()
    assert len(result) == 1 and isinstance(result[0], RuntimeError), result
    assert str(result[0]) == "merging the rows failed"
    assert _table(database_url) == {
        ("hour", hour * HOUR, "trace.duration_ms", "user", "user-7"): (5, 5.0, None, None, "backfill")}


@pytest.mark.parametrize("piece_rows", [None, 1], ids=["one-piece", "pieces"])
def test_a_merge_failing_while_the_staged_rows_stream_fails_the_write(database_url: str, piece_rows: int | None,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Most buckets have rows, so the staged rows stream as they are merged: a merge that
    fails meanwhile fails the write, and nothing of it (the new bucket's rows neither, nor
    the pieces already upserted) is committed."""
    store, olds, new = _three_of_four_with_rows(database_url, 480_070, piece_rows, monkeypatch)
    before = _table(database_url)
    feed = RowFeed()
    feed.put(_blocks([olds[0], new], ["b", "b"], base=50))
    feed.put(_blocks([olds[1]], ["b"], base=60))  # with pieces of 1: each block upserted before the next
    feed.close(MemoryError("no room"))
    with pytest.raises(RuntimeError, match="merging the rows failed"):
        with store.conn().transaction(), store.conn().cursor() as cur:
            store.merge_rows(cur, "s", set(), blocks=feed, block_buckets={("hour", h * HOUR) for h in [*olds, new]})
    store.close()
    assert _table(database_url) == before


def test_a_fed_block_of_a_bucket_not_locked_fails_the_write(database_url: str) -> None:
    """The locks are taken before a RowFeed's blocks come, from the buckets the caller names:
    a block outside them would be written without its lock, so it fails the write."""
    migrate(database_url)
    store = StreamStore(database_url)
    feed = RowFeed()
    feed.put(_blocks([480_040], ["a"], base=1))
    feed.put(_blocks([480_041], ["a"], base=2))  # not named below
    feed.close()
    with pytest.raises(ValueError, match="not locked"):
        with store.conn().transaction(), store.conn().cursor() as cur:
            store.merge_rows(cur, "s", set(), blocks=feed, block_buckets={("hour", 480_040 * HOUR)})
    store.close()
    assert _table(database_url) == {}
