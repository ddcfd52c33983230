"""Which hashes lie within a Hamming distance of a fixed set of reference pHashes.

`takedown --images` asks this of every sample's pHash: is it a near duplicate of one of the
given images? It is the one-sided form of the dedup stage's multi-index search
(stages.dedup.hashindex, whose block plans and bit permutations it uses): the 64 bits are cut
into blocks; two hashes within distance r differ in at most r blocks, so (pigeonhole) they agree
on all the key blocks of at least one table. The references are permuted and sorted once per
table; a batch of queries is permuted the same way, each query's run of references sharing its
key is found by binary search, and only those candidates are compared (XOR + popcount). Nothing
within the distance is missed, and the work follows the number of candidates, not
queries x references.
"""

from __future__ import annotations

import numpy as np

from laionface.stages.dedup import hashindex

# Candidate pairs compared at once, at most (a few arrays of this many uint64s).
MAX_CANDIDATES = 1 << 22
HASH_BITS = hashindex.HASH_BITS


class ReferenceHashes:
    """Reference pHashes (uint64) and a radius, indexed for `near` queries."""

    def __init__(self, references: np.ndarray, max_distance: int):
        if not 0 <= max_distance <= 16:
            raise ValueError(f"max_distance must be in 0..16, got {max_distance}")
        self.references = hashindex.distinct(np.asarray(references, dtype=np.uint64))
        self.max_distance = max_distance
        self.plan = hashindex.plan_search(max(2, len(self.references)), max_distance)
        self._tables = [
            np.sort(hashindex.permute(self.references, self.plan, table))
            for table in range(len(self.plan.tables))
        ]

    def __len__(self) -> int:
        return len(self.references)

    def near(self, hashes: np.ndarray) -> np.ndarray:
        """Whether each uint64 hash is within max_distance of a reference."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        found = np.zeros(len(hashes), dtype=bool)
        if not len(self.references) or not len(hashes):
            return found
        for table, permuted in enumerate(self._tables):
            todo = np.flatnonzero(~found)
            if not len(todo):
                break
            shift = np.uint64(HASH_BITS - self.plan.key_bits(table))
            queries = hashindex.permute(hashes[todo], self.plan, table)
            keys = permuted >> shift
            low = np.searchsorted(keys, queries >> shift, "left")
            high = np.searchsorted(keys, queries >> shift, "right")
            hit = _compare(queries, low, high - low, permuted, self.max_distance)
            found[todo[hit]] = True
        return found


def _compare(
    queries: np.ndarray, low: np.ndarray, counts: np.ndarray, sorted_refs: np.ndarray, radius: int
) -> np.ndarray:
    """Whether each query is within `radius` of one of its candidates: the `counts[i]`
    references of `sorted_refs` from `low[i]` on. Taken in batches of about MAX_CANDIDATES."""
    hit = np.zeros(len(queries), dtype=bool)
    ends = np.cumsum(counts)
    start = 0
    while start < len(queries):
        done = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, done + MAX_CANDIDATES, "right")))
        batch = counts[start:stop]
        total = int(batch.sum())
        if total:
            owner = np.repeat(np.arange(start, stop), batch)
            first = np.repeat(low[start:stop] - (np.cumsum(batch) - batch), batch)
            candidates = first + np.arange(total)
            close = hashindex.distance(queries[owner], sorted_refs[candidates]) <= radius
            hit[owner[close]] = True
        start = stop
    return hit
