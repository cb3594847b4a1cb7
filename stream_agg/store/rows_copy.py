"""Merged rows (`RowBlock`s) as a binary COPY stream for `metrics_aggregates`' staging table.

Why binary and built with numpy: a flush under load writes 100,000+ rows, and psycopg's
`write_row` costs ~4.7 us per row in Python (type dispatch and text formatting of eight
numbers), more than the merge itself. Here the fixed-width part of every row of a block
(timestamp, the block's constant names, count, sum, min, max, avg, percentiles) is one
numpy record array in network byte order, and only the value label and the digest are
joined per row: ~0.3 us per row. Rows are grouped by which nullable columns are NULL, so
each group has one fixed record layout; the rows go out in the block's order all the same
(the merge orders them for PostgreSQL's indexes: `core.merged_rows._index_order`).

PostgreSQL's binary COPY format: a signature and two int32 (flags, extension length),
then per row an int16 field count and per field an int32 length (-1 = NULL) and the bytes,
then an int16 -1. timestamptz is int64 microseconds since 2000-01-01 UTC; float8 and
int8 are big-endian.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from itertools import chain
from typing import Any

import numpy as np

from stream_agg.core.merged_rows import RowBlock
from stream_agg.core.state_table import HOUR

# The staging table's columns in the order the stream renders them: fixed-width first.
COLUMNS = ("bucket_time", "granularity", "metric_name", "dimension_type", "count", "sum_value", "min_value",
           "max_value", "avg_value", "p50_value", "p95_value", "p99_value", "dimension_value", "digest")
HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
PG_EPOCH_HOURS = 946_684_800 // HOUR  # 2000-01-01 UTC, PostgreSQL's timestamp origin
_LEN = struct.Struct(">i")
_NULL = _LEN.pack(-1)
_NULLABLE = ("avg", "p50", "p95", "p99")


def render(blocks: Iterable[RowBlock]) -> Iterator[bytes]:
    """The whole COPY stream (header, rows, trailer) in chunks."""
    yield HEADER
    labels: dict[str, bytes] = {}
    for block in blocks:
        if len(block):
            yield from _render_block(block, labels)
    yield TRAILER


def _text(value: str) -> bytes:
    data = value.encode()
    return _LEN.pack(len(data)) + data


def _render_block(block: RowBlock, label_cache: dict[str, bytes]) -> Iterator[bytes]:
    n = len(block)
    count = block.count
    with np.errstate(invalid="ignore", divide="ignore"):
        avg = block.total / count
    nullable = [avg] + ([block.quantiles[:, i] for i in range(3)] if block.quantiles is not None
                        else [np.full(n, np.nan)] * 3)
    present = np.stack([count > 0] + [~np.isnan(q) for q in nullable[1:]], axis=1)
    pattern = present @ (1 << np.arange(4))
    names = [s.encode() for s in (block.granularity, block.metric, block.dimension)]
    label_pieces = [label_cache.get(v) or label_cache.setdefault(v, _text(v)) for v in block.labels]
    digests = block.digests
    digest_pieces = ([_NULL] * n if digests is None
                     else [_NULL if d is None else _LEN.pack(len(d)) + d for d in digests])
    fixed_pieces: list[Any] = [None] * n  # each row's fixed-width part, in the block's order
    for code in np.unique(pattern).tolist():
        rows = np.flatnonzero(pattern == code)
        have = [bool(code >> i & 1) for i in range(4)]
        rec = np.empty(rows.size, dtype=_layout(names, have))
        rec["nf"] = len(COLUMNS)
        rec["ts_len"] = 8
        rec["ts"] = (block.hours[rows] - PG_EPOCH_HOURS) * HOUR * 1_000_000
        for i, name in enumerate(names):
            rec[f"n{i}_len"] = len(name)
            if name:
                rec[f"n{i}"] = name
        for col, values in (("count", count), ("sum", block.total), ("min", block.lo), ("max", block.hi)):
            rec[f"{col}_len"] = 8
            rec[col] = values[rows]
        for col, values, on in zip(_NULLABLE, nullable, have, strict=True):
            rec[f"{col}_len"] = 8 if on else -1
            if on:
                rec[col] = values[rows]
        width = rec.dtype.itemsize
        fixed = memoryview(rec.tobytes())
        pieces = list(map(fixed.__getitem__, map(slice, range(0, rows.size * width, width),
                                                 range(width, rows.size * width + width, width))))
        if rows.size == n:  # one layout for the whole block (the usual case)
            fixed_pieces = pieces
        else:
            for r, piece in zip(rows.tolist(), pieces, strict=True):
                fixed_pieces[r] = piece
    yield b"".join(chain.from_iterable(zip(fixed_pieces, label_pieces, digest_pieces, strict=True)))


def _layout(names: list[bytes], have: list[bool]) -> np.dtype:
    """Record layout of the fixed-width fields of one group of a block (no padding)."""
    fields: list[tuple[str, str]] = [("nf", ">i2"), ("ts_len", ">i4"), ("ts", ">i8")]
    for i, name in enumerate(names):
        fields.append((f"n{i}_len", ">i4"))
        if name:
            fields.append((f"n{i}", f"S{len(name)}"))
    fields += [("count_len", ">i4"), ("count", ">i8")]
    for col in ("sum", "min", "max"):
        fields += [(f"{col}_len", ">i4"), (col, ">f8")]
    for col, on in zip(_NULLABLE, have, strict=True):
        fields.append((f"{col}_len", ">i4"))
        if on:
            fields.append((col, ">f8"))
    return np.dtype(fields)
