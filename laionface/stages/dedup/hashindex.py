"""Near-duplicate search among 64-bit perceptual hashes: every pair within a Hamming distance.

The method is multi-index hashing in the exact-match form of Manku, Jain and Das Sarma
("Detecting near-duplicates for web crawling", WWW 2007), which is the self-join form of Norouzi
et al.'s multi-index hashing:

- Split the 64 bits into `nb` blocks. Two hashes within distance `r` differ in at most `r` blocks, so
  (pigeonhole) at least `kb = nb - r` blocks are equal. For every choice of `kb` blocks (a "table",
  C(nb, kb) of them) put those blocks on top of a bit-permuted copy of every hash and sort: hashes
  whose key blocks are equal are then adjacent. Only those runs are compared, by XOR + popcount.
- Each table's key is `kb` whole blocks (21 bits at r=4, nb=6; 27 bits at nb=7), not one r+1-th of
  the hash: a naive split into r+1 bands keys on ~13 bits, and at 10M hashes each bucket holds about
  1,200 hashes, so the candidate pairs explode. `plan_search` picks `nb` from the number of hashes
  with a cost model (sorts versus candidate pairs, constants measured on numpy).
- A pair is found by every table whose key blocks it shares; it is reported only by its canonical
  table (the first `kb` of its equal blocks), so every pair comes out exactly once with no global
  de-duplication of pairs.
- Everything is vectorised numpy (sorts release the GIL, so tables run on threads), and runs are
  walked in chunks of positions so memory stays bounded whatever the bucket sizes.

Inputs must be distinct values: collapse equal hashes first (`np.unique`-like, see `distinct`);
real web data has huge groups of identical hashes that would make any pairwise step quadratic.

The same per-table routine serves the one-node path (`near_pairs`) and the sharded path
(`band_records` in a map step keyed by the top bits of each table's key, `partition_pairs` in the
reduce step), so both return the same pairs.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np

HASH_BITS = 64
_U64 = np.uint64
# Positions of the sorted array walked at once; bounds the memory of the candidate step.
CHUNK = 1 << 22

# Cost model of `plan_search`, in seconds, measured with numpy 2.4 on one core: a table costs a
# bit permutation and a sort of every hash (~100 ns each at 10M); a candidate pair costs a few
# gathers, an XOR and a popcount (~20 ns).
_SECONDS_PER_HASH_PER_TABLE = 1.0e-7
_SECONDS_PER_CANDIDATE = 2.0e-8
# More blocks than this make the canonical-table lookup (2**nb entries) too big to be worth it.
_MAX_BLOCKS = 22


@dataclass(frozen=True)
class SearchPlan:
    """How the 64 bits are cut: `blocks` blocks, of which `key_blocks` key each table."""

    max_distance: int
    blocks: int

    @property
    def key_blocks(self) -> int:
        return self.blocks - self.max_distance

    @cached_property
    def widths(self) -> tuple[int, ...]:
        base, extra = divmod(HASH_BITS, self.blocks)
        return tuple(base + (1 if q < extra else 0) for q in range(self.blocks))

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Bit offset (from the least significant bit) of each block; block 0 is the top one."""
        out, top = [], HASH_BITS
        for width in self.widths:
            top -= width
            out.append(top)
        return tuple(out)

    @cached_property
    def tables(self) -> tuple[tuple[int, ...], ...]:
        return tuple(itertools.combinations(range(self.blocks), self.key_blocks))

    def key_bits(self, table: int) -> int:
        return sum(self.widths[q] for q in self.tables[table])

    @cached_property
    def min_key_bits(self) -> int:
        return min(self.key_bits(t) for t in range(len(self.tables)))

    def layout(self, table: int) -> list[tuple[int, int, int]]:
        """(width, offset in the hash, offset in the permuted hash) of each block of `table`."""
        order = list(self.tables[table]) + [
            q for q in range(self.blocks) if q not in self.tables[table]
        ]
        out, top = [], HASH_BITS
        for q in order:
            top -= self.widths[q]
            out.append((self.widths[q], self.offsets[q], top))
        return out

    @cached_property
    def canonical_table(self) -> np.ndarray:
        """For each bitmask of equal blocks: the one table that reports such a pair (-1: none)."""
        masks = np.arange(1 << self.blocks, dtype=np.int64)
        first = np.zeros_like(masks)  # the first key_blocks equal blocks of each mask
        count = np.zeros_like(masks)
        for q in range(self.blocks):
            take = ((masks >> q) & 1).astype(bool) & (count < self.key_blocks)
            first[take] |= 1 << q
            count += take
        table_of = np.full(1 << self.blocks, -1, dtype=np.int32)
        for t, blocks in enumerate(self.tables):
            table_of[sum(1 << q for q in blocks)] = t
        return np.where(count == self.key_blocks, table_of[first], -1).astype(np.int32)

    def expected_candidates(self, n: int) -> float:
        """Candidate pairs for `n` uniformly random distinct hashes (real data has more)."""
        pairs = n * (n - 1) / 2
        return sum(pairs * 2.0 ** -self.key_bits(t) for t in range(len(self.tables)))

    def cost(self, n: int) -> float:
        return len(self.tables) * n * _SECONDS_PER_HASH_PER_TABLE + (
            self.expected_candidates(n) * _SECONDS_PER_CANDIDATE
        )


def plan_search(n: int, max_distance: int) -> SearchPlan:
    """The cheapest block count for `n` distinct hashes and radius `max_distance` (0..16)."""
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"max_distance must be in 0..{HASH_BITS - 1}, got {max_distance}")
    if max_distance == 0:
        return SearchPlan(0, 1)
    top = min(HASH_BITS, max(max_distance + 1, min(_MAX_BLOCKS, max_distance + 8)))
    plans = [SearchPlan(max_distance, nb) for nb in range(max_distance + 1, top + 1)]
    # Cap the number of tables: C(nb, r) grows fast, and each costs a sort of every hash.
    plans = [p for p in plans if math.comb(p.blocks, max_distance) <= 5_000] or plans[:1]
    return min(plans, key=lambda p: (p.cost(n), p.blocks))


def _move_blocks(values: np.ndarray, moves: list[tuple[int, int, int]]) -> np.ndarray:
    """Move each (width, from offset, to offset) block of `values` into a fresh array."""
    out = np.zeros_like(values)
    for width, source, target in moves:
        mask = _U64((1 << width) - 1)
        if source == target:
            out |= values & (mask << _U64(source))
        else:
            out |= ((values >> _U64(source)) & mask) << _U64(target)
    return out


def permute(values: np.ndarray, plan: SearchPlan, table: int) -> np.ndarray:
    """`values` with `table`'s key blocks moved to the top bits (a fresh array)."""
    return _move_blocks(values, plan.layout(table))


def unpermute(values: np.ndarray, plan: SearchPlan, table: int) -> np.ndarray:
    return _move_blocks(values, [(w, target, source) for w, source, target in plan.layout(table)])


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distance of each pair of 64-bit hashes."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int32)


def _equal_blocks_mask(a: np.ndarray, b: np.ndarray, plan: SearchPlan) -> np.ndarray:
    diff = np.bitwise_xor(a, b)
    mask = np.zeros(diff.shape, dtype=np.int64)
    for q, (width, offset) in enumerate(zip(plan.widths, plan.offsets, strict=True)):
        block = _U64(((1 << width) - 1) << offset)
        mask |= ((diff & block) == 0).astype(np.int64) << q
    return mask


def _runs_pairs(
    permuted_sorted: np.ndarray, key_bits: int, max_distance: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Pairs (a, b, distance) within `max_distance` among hashes sharing their top `key_bits`.

    `permuted_sorted` must be sorted and distinct. Runs of equal keys are walked by offset: position
    i pairs with i + k while key[i] == key[i + k], which holds exactly when it held for k - 1 and
    i + k - 1, i + k share a key. While most positions are still in a run, whole slices are
    compared (contiguous, cheap); once few are, only those positions are gathered, so the work
    follows the number of candidate pairs.
    """
    s = permuted_sorted
    n = s.size
    if n < 2:
        return
    key = s >> _U64(HASH_BITS - key_bits)
    same_next = key[1:] == key[:-1]  # same_next[i]: i and i + 1 share a key
    del key
    for lo in range(0, n - 1, CHUNK):
        hi = min(lo + CHUNK, n - 1)
        active = same_next[lo:hi]  # positions lo + j paired at the current offset
        offset = 1
        while active.size and np.count_nonzero(active) * 8 >= active.size:
            dist = distance(s[lo + offset : lo + offset + active.size], s[lo : lo + active.size])
            hit = np.flatnonzero(active & (dist <= max_distance))
            if hit.size:
                yield s[lo + hit], s[lo + hit + offset], dist[hit]
            size = max(min(hi, n - 1 - offset) - lo, 0)
            active = active[:size] & same_next[lo + offset : lo + offset + size]
            offset += 1
        idx = np.flatnonzero(active) + lo
        while idx.size:
            a = s[idx]
            b = s[idx + offset]
            dist = distance(a, b)
            hit = dist <= max_distance
            if hit.any():
                yield a[hit], b[hit], dist[hit]
            nxt = idx + offset
            inside = nxt < n - 1
            idx = idx[inside]
            idx = idx[same_next[nxt[inside]]]
            offset += 1


def _table_pairs(
    permuted_sorted: np.ndarray, plan: SearchPlan, table: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs whose canonical table is `table`, as original hashes with a < b."""
    found = list(_runs_pairs(permuted_sorted, plan.key_bits(table), plan.max_distance))
    if not found:
        return _empty_pairs()
    a = unpermute(np.concatenate([f[0] for f in found]), plan, table)
    b = unpermute(np.concatenate([f[1] for f in found]), plan, table)
    dist = np.concatenate([f[2] for f in found])
    mine = plan.canonical_table[_equal_blocks_mask(a, b, plan)] == table
    a, b, dist = a[mine], b[mine], dist[mine]
    low, high = np.minimum(a, b), np.maximum(a, b)
    return low, high, dist


def _empty_pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.empty(0, _U64), np.empty(0, _U64), np.empty(0, np.int32)


def _concat_pairs(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    parts = [p for p in parts if p[0].size]
    if not parts:
        return _empty_pairs()
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique without its hash-table path, which is slow for uint64)."""
    s = np.sort(np.asarray(values, dtype=_U64))
    if s.size < 2:
        return s
    keep = np.empty(s.size, dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def default_threads() -> int:
    """Threads for a search here: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def near_pairs(
    values: np.ndarray,
    max_distance: int,
    *,
    threads: int = 1,
    plan: SearchPlan | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of distinct `values` within `max_distance`: arrays (a, b, distance), a < b.

    `values` must be distinct (see `distinct`). Each pair appears once; the order is unspecified.
    """
    values = np.asarray(values, dtype=_U64)
    if values.size < 2 or max_distance == 0:
        return _empty_pairs()
    plan = plan or plan_search(values.size, max_distance)

    def one_table(table: int):
        permuted = permute(values, plan, table)
        permuted.sort()
        return _table_pairs(permuted, plan, table)

    tables = range(len(plan.tables))
    if threads <= 1:
        parts = [one_table(t) for t in tables]
    else:
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(one_table, tables))
    return _concat_pairs(parts)


def partition_bits(plan: SearchPlan, partitions: int) -> int:
    """Top bits of each table's key that choose a partition (`partitions` a power of two)."""
    bits = max(partitions, 1).bit_length() - 1
    if 1 << bits != max(partitions, 1):
        raise ValueError(f"partitions must be a power of two, got {partitions}")
    if bits > plan.min_key_bits:
        raise ValueError(
            f"at most 2**{plan.min_key_bits} partitions for this plan, got {partitions}"
        )
    return bits


def band_records(
    values: np.ndarray, plan: SearchPlan, partitions: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Map side of the sharded search: (partition, table ids, permuted hashes) per partition.

    A hash goes to one partition per table, chosen by the top bits of that table's key, so every
    pair of hashes sharing a table's key meets in the same partition.
    """
    values = np.asarray(values, dtype=_U64)
    bits = partition_bits(plan, partitions)
    tables, permuted = [], []
    for table in range(len(plan.tables)):
        tables.append(np.full(values.size, table, dtype=np.uint16))
        permuted.append(permute(values, plan, table))
    table_ids = np.concatenate(tables) if tables else np.empty(0, np.uint16)
    hashes = np.concatenate(permuted) if permuted else np.empty(0, _U64)
    part = (
        (hashes >> _U64(HASH_BITS - bits)).astype(np.int64)
        if bits
        else np.zeros(hashes.size, np.int64)
    )
    order = np.argsort(part, kind="stable")
    part, table_ids, hashes = part[order], table_ids[order], hashes[order]
    bounds = np.searchsorted(part, np.arange(partitions + 1))
    for p in range(partitions):
        lo, hi = bounds[p], bounds[p + 1]
        if hi > lo:
            yield p, table_ids[lo:hi], hashes[lo:hi]


def partition_pairs(
    table_ids: np.ndarray, permuted: np.ndarray, plan: SearchPlan
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reduce side: the pairs within one partition's records (from any number of shards)."""
    parts = []
    table_ids = np.asarray(table_ids)
    for table in np.unique(table_ids):
        s = distinct(permuted[table_ids == table])
        parts.append(_table_pairs(s, plan, int(table)))
    return _concat_pairs(parts)
