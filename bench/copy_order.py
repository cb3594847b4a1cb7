"""PostgreSQL's cost of writing a flush's rows, in the merge's order against hour-major orders.

Why: a backlog flush writes ~200,000 rows into `metrics_aggregates`, and PostgreSQL keeps
three indexes up at each row: the id key, the unique key (bucket_time, granularity,
metric_name, dimension_type, dimension_value) and the dashboard index (metric_name,
granularity, dimension_type, dimension_value, bucket_time). `core/merged_rows.py` gives each
table's rows by value, then hour (the dashboard index's order); before, they came by hour,
then value id (ids numbered as values are first seen: an order unrelated to the text).
This folds synthetic events like the worker (4 partitions, round-robin JSON-array messages),
merges every row once, and then, in a scratch database migrated like the worker's, writes
the same rows in three orders (hour then value id, hour then value text, value then hour),
alternating, each into an empty table (COPY, as a backlog's new buckets go in) and again over
existing rows (staged COPY + the worker's `INSERT ... ON CONFLICT`, as rows of buckets
already written go in):

    python bench/copy_order.py [--events 1000000] [--rounds 3] [--index-costs]

`--index-costs` also COPYs the rows (by value) into copies of the table holding none, some or
all of its three indexes (id key, unique key, dashboard index): what each costs.

Prints each round's seconds and the medians. The rows are the same in every order (the
script checks the table's contents match).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flush_cpu import folded_states  # noqa: E402  (a sibling script, not a package)

from stream_agg.core.merged_rows import RowBlock, merged_blocks  # noqa: E402
from stream_agg.store import rows_copy  # noqa: E402
from stream_agg.store.db import prefer_lz4, scratch_database  # noqa: E402
from stream_agg.store.schema import migrate  # noqa: E402
from stream_agg.store.stream_state import UPSERT_ROWS_SQL  # noqa: E402


def hour_major(block: RowBlock, by_text: bool) -> RowBlock:
    """The block's rows by hour, then value: by the values' text (`by_text`), or in an order
    unrelated to it, as the merge gave them before it sorted by value (hour, then value id;
    ids are numbered as values are first seen, which a hash of the text stands in for)."""
    if by_text:
        rank = {v: i for i, v in enumerate(sorted(set(block.labels)))}
        ranks = np.fromiter(map(rank.__getitem__, block.labels), dtype=np.int64, count=len(block.labels))
    else:
        ranks = np.array([int.from_bytes(hashlib.md5(v.encode()).digest()[:8], "little") >> 1
                          for v in block.labels], dtype=np.int64)
    return block.take(np.lexsort((ranks, block.hours)))


def copy_rows(cur: psycopg.Cursor, table: str, blocks: list[RowBlock]) -> None:
    with cur.copy(f"COPY {table} ({', '.join(rows_copy.COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy:
        for chunk in rows_copy.render(blocks):
            copy.write(chunk)


def write(url: str, blocks: list[RowBlock], upsert: bool) -> float:
    """Seconds PostgreSQL takes to write the blocks (fresh table; `upsert`: over its rows)."""
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        prefer_lz4(conn)
        cur.execute("TRUNCATE metrics_aggregates")
        if upsert:
            copy_rows(cur, "metrics_aggregates", blocks)
        conn.commit()
        cur.execute("CHECKPOINT")
        began = time.perf_counter()
        if upsert:
            cur.execute(f"CREATE TEMP TABLE tmp_rows ON COMMIT DROP AS SELECT {', '.join(rows_copy.COLUMNS)} "
                        "FROM metrics_aggregates WITH NO DATA")
            copy_rows(cur, "tmp_rows", blocks)
            cur.execute(UPSERT_ROWS_SQL.format(source="stream", tmp="tmp_rows"))
        else:
            copy_rows(cur, "metrics_aggregates", blocks)
        conn.commit()
        return time.perf_counter() - began


# The table with none, some or all of metrics_aggregates' indexes (`--index-costs`).
INDEX_SETS = {
    "no index": [],
    "id key": ["ALTER TABLE t_idx ADD PRIMARY KEY (id)"],
    "id + unique key": ["ALTER TABLE t_idx ADD PRIMARY KEY (id)",
                        "ALTER TABLE t_idx ADD UNIQUE (bucket_time, granularity, metric_name, dimension_type, "
                        "dimension_value)"],
    "all three": ["ALTER TABLE t_idx ADD PRIMARY KEY (id)",
                  "ALTER TABLE t_idx ADD UNIQUE (bucket_time, granularity, metric_name, dimension_type, "
                  "dimension_value)",
                  "CREATE INDEX ON t_idx (metric_name, granularity, dimension_type, dimension_value, bucket_time)"],
}


def copy_with_indexes(url: str, blocks: list[RowBlock], ddl: list[str]) -> float:
    """Seconds to COPY the blocks into a copy of metrics_aggregates holding just these indexes."""
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        prefer_lz4(conn)
        cur.execute("DROP TABLE IF EXISTS t_idx")
        cur.execute("CREATE TABLE t_idx (LIKE metrics_aggregates INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
                    "INCLUDING STORAGE INCLUDING COMPRESSION) WITH (fillfactor = 70)")
        cur.execute("ALTER TABLE t_idx ALTER COLUMN id SET DEFAULT nextval('metrics_aggregates_id_seq')")
        for statement in ddl:
            cur.execute(statement)
        conn.commit()
        cur.execute("CHECKPOINT")
        began = time.perf_counter()
        copy_rows(cur, "t_idx", blocks)
        conn.commit()
        seconds = time.perf_counter() - began
        cur.execute("DROP TABLE t_idx")
        conn.commit()
        return seconds


def contents(url: str) -> str:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT md5(string_agg(concat_ws('|', bucket_time, granularity, metric_name, "
                            "dimension_type, dimension_value, count, sum_value, min_value, max_value, p50_value, "
                            "md5(digest)), ',' ORDER BY bucket_time, granularity, metric_name, dimension_type, "
                            "dimension_value)) FROM metrics_aggregates").fetchone()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--index-costs", action="store_true",
                    help="also COPY the rows (by value) into copies of the table with none, some or all of its indexes")
    args = ap.parse_args()
    states = folded_states(args.events, 500, 4, 80, 48.0, 2000)
    buckets = set().union(*(ps.resident for ps in states))
    by_value = [b for b in merged_blocks(states, buckets, cuts={}) if len(b)]
    orders = {"hour, value id": [hour_major(b, False) for b in by_value],
              "hour, value": [hour_major(b, True) for b in by_value],
              "value, hour": by_value}
    rows = sum(len(b) for b in by_value)
    print(f"{args.events:,} events folded into 4 partitions: {rows:,} rows in {len(by_value)} blocks")
    with scratch_database(args.database_url, "bench_copy_order") as url:
        migrate(url)
        seen: dict[str, str] = {}
        for upsert in (False, True):
            times: dict[str, list[float]] = {name: [] for name in orders}
            for _ in range(args.rounds):
                for name, blocks in orders.items():
                    times[name].append(write(url, blocks, upsert))
                    seen[name] = contents(url)
            what = "upsert over existing rows" if upsert else "COPY into an empty table"
            for name, ts in times.items():
                print(f"  {what:26s} {name:15s} median {statistics.median(ts):.3f}s "
                      f"({', '.join(f'{t:.3f}' for t in ts)})")
        if args.index_costs:
            costs: dict[str, list[float]] = {name: [] for name in INDEX_SETS}
            for _ in range(args.rounds):
                for name, ddl in INDEX_SETS.items():
                    costs[name].append(copy_with_indexes(url, by_value, ddl))
            for name, ts in costs.items():
                print(f"  COPY, rows by value, {name:16s} median {statistics.median(ts):.3f}s "
                      f"({', '.join(f'{t:.3f}' for t in ts)})")
        if len(set(seen.values())) != 1:
            raise SystemExit(f"the table's contents differ between the orders: {seen}")
        print(f"  table contents identical in every order (md5 {seen['value, hour'][:12]})")


if __name__ == "__main__":
    main()
