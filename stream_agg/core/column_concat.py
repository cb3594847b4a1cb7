"""Several batches' columns as one: what `to_columns` gives for their events concatenated.

Why: a fold costs a fixed amount per call and per key it touches, whatever the number of
events behind each key, so a worker behind its backlog folds faster in bigger batches
(`bench/core_fold.py`: 150k events/s at 7,500 events per fold, 250k at 120,000). The
decode helper still works on small chunks, which bounds its memory; the worker joins the
chunks already decoded when the fold thread gets to them (`kafka/worker.py`).

Dictionary codes are renumbered into the union of the parts' labels in first-seen order,
which is the numbering `to_columns` gives the concatenated events, so the result is
exactly that, array for array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stream_agg.core.fold import Columns, LevelColumns
from stream_agg.core.registry import Level
from stream_agg.core.state_table import I64


def concat_columns(parts: Sequence[Columns]) -> Columns:
    """One `Columns` for `parts` in order (all of one partition, from one registry)."""
    if not parts:
        raise ValueError("no columns to concatenate")
    if len(parts) == 1:
        return parts[0]
    ts = np.concatenate([p.ts for p in parts])
    offsets = np.concatenate([p.offsets for p in parts])
    starts = np.cumsum([0] + [p.size for p in parts[:-1]])
    names = list(parts[0].levels)
    if any(list(p.levels) != names for p in parts):
        raise ValueError("columns of different registries")
    levels: dict[Level, LevelColumns] = {}
    for name in names:
        lcs = [p.levels[name] for p in parts]
        shares_ts = all(lc.ts is p.ts for lc, p in zip(lcs, parts, strict=True))
        codes: dict[str, I64] = {}
        labels: dict[str, list[str]] = {}
        for dim in lcs[0].codes:
            codes[dim], labels[dim] = _union_codes([lc.codes[dim] for lc in lcs], [lc.labels[dim] for lc in lcs])
        levels[name] = LevelColumns(
            ts if shares_ts else np.concatenate([lc.ts for lc in lcs]),
            offsets if shares_ts else np.concatenate([lc.offsets for lc in lcs]),
            np.concatenate([lc.parent + start for lc, start in zip(lcs, starts.tolist(), strict=True)]),
            {k: np.concatenate([lc.values[k] for lc in lcs]) for k in lcs[0].values},
            codes,
            labels,
        )
    return Columns(ts, offsets, levels)


def _union_codes(codes: list[I64], labels: list[list[str]]) -> tuple[I64, list[str]]:
    """Codes of every part renumbered into the union of their labels (first seen first); -1 stays -1."""
    index: dict[str, int] = {}
    for part_labels in labels:
        for label in part_labels:
            index.setdefault(label, len(index))
    out = []
    for part_codes, part_labels in zip(codes, labels, strict=True):
        # A trailing -1 entry maps null codes (-1 indexes the last element) to -1 again.
        remap = np.fromiter([*map(index.__getitem__, part_labels), -1], dtype=np.int64, count=len(part_labels) + 1)
        out.append(remap[part_codes])
    return np.concatenate(out), list(index)
