"""Bounded cardinality: keep at most K values per (bucket, metric, dimension); the rest -> __other__.

Which K? The K values with the smallest stable hash (then by value). That rule does not
depend on arrival order, so a crash-restart, a replay with other batch boundaries and
the SQL backfill (`CAP_HASH_SQL`) all pick the same values, and a value once pushed
out never returns (the kept set only ever swaps in smaller hashes).
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field

# Same 60-bit number in PostgreSQL: first 15 hex digits of md5, as a bigint.
CAP_HASH_SQL = "('x' || substr(md5({expr}), 1, 15))::bit(60)::bigint"


_HASHES: dict[str, int] = {}
_HASH_CACHE_MAX = 1 << 20


def cap_hash(value: str) -> int:
    """60-bit md5 prefix of the value, memoised (the same values recur in every bucket)."""
    h = _HASHES.get(value)
    if h is None:
        if len(_HASHES) >= _HASH_CACHE_MAX:
            _HASHES.clear()
        h = _HASHES[value] = int(hashlib.md5(value.encode("utf-8")).hexdigest()[:15], 16)
    return h


@dataclass
class KeptSet:
    """The values currently kept for one (bucket, metric, dimension), ordered by hash."""

    limit: int
    order: list[tuple[int, str]] = field(default_factory=list)  # sorted (hash, value)
    members: set[str] = field(default_factory=set)

    def admit(self, value: str) -> tuple[bool, str | None]:
        """Decide for `value`: (kept?, evicted value or None).

        A kept value whose arrival pushes out the largest-hash member returns that
        member as evicted; the caller moves its state into __other__.
        """
        if value in self.members:
            return True, None
        entry = (cap_hash(value), value)
        if len(self.order) < self.limit:
            bisect.insort(self.order, entry)
            self.members.add(value)
            return True, None
        if entry < self.order[-1]:
            evicted = self.order.pop()[1]
            self.members.discard(evicted)
            bisect.insort(self.order, entry)
            self.members.add(value)
            return True, evicted
        return False, None

    @property
    def full(self) -> bool:
        return len(self.order) >= self.limit

    def would_keep(self, value: str) -> bool:
        """Would `admit` keep it (without changing anything)?"""
        if value in self.members or len(self.order) < self.limit:
            return True
        return (cap_hash(value), value) < self.order[-1]


def capped_values(values: list[str], limit: int) -> set[str]:
    """The values a cap of `limit` keeps out of `values` (reference rule, order-free)."""
    ranked = sorted({(cap_hash(v), v) for v in values})
    return {v for _, v in ranked[:limit]}
