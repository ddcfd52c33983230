"""Dedup's decisions: every sample that passed select gets exactly one fate, in this order.

1. `eval_overlap`: its pHash is within `dedup.max_distance` of a reference hash (`dedup.reference`:
   evaluation sets such as the CelebA test split, or an earlier dataset's manifest to build a
   disjoint subset). Dropped whatever else it matches; `duplicate_of` is the nearest reference
   item (ties: the smallest item name), `distance` its distance, `cluster` null. Such samples take
   no part in clustering, so they can't make another sample a duplicate.
2. The other samples are clustered: two samples are linked when their sha256 are equal
   (`dedup.exact`) or their pHashes are within `dedup.max_distance` (`dedup.near`, equal pHashes
   included); a cluster is a connected component (scipy's connected components: a linear-time
   union-find over the sparse pair graph), so a chain A-B-C is one cluster even when A and C are
   farther apart than the distance.
3. One keeper per cluster: the most pixels (width x height), then the highest best face score,
   then the smallest key. The rule reads only the samples themselves, so it does not depend on
   shard order, shard count or worker count.
4. Every other member is dropped as `exact_duplicate` when its sha256 equals the keeper's (and
   `dedup.exact` is on), else `near_duplicate`; `duplicate_of` is the keeper's key and `distance`
   the pHash distance to the keeper. A chain member's distance to its keeper can exceed
   `max_distance`: it is linked through other members. With `exact = false`, byte-identical
   copies still have equal pHashes and are dropped as `near_duplicate` at distance 0.
   `cluster` is the row number of the keeper in decisions.parquet.

Everything works on the distinct hash values ("nodes"): a sample's node is its pHash's value,
and the search's pairs link nodes, so a value shared by a million placeholder images is one node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laionface.config import DedupSection
from laionface.io.schemas import DEDUP
from laionface.layout import DEDUP_REASONS
from laionface.stages.dedup.samples import u64
from laionface.stages.dedup.search import Pairs


def _run_starts(*columns: np.ndarray) -> np.ndarray:
    """True where a row of the sorted `columns` differs from the row before (and at row 0)."""
    size = columns[0].size
    starts = np.zeros(size, dtype=bool)
    if size:
        starts[0] = True
        for column in columns:
            starts[1:] |= column[1:] != column[:-1]
    return starts


def _ranks(strings: pa.Array) -> np.ndarray:
    """Rank of each string in sorted order."""
    order = pc.sort_indices(strings).to_numpy()
    ranks = np.empty(order.size, dtype=np.int64)
    ranks[order] = np.arange(order.size)
    return ranks


@dataclass
class _Samples:
    """The columns of DEDUP_SAMPLES the rules read, as arrays (row = sample, sorted by key)."""

    keys: pa.Array
    phash: np.ndarray
    has_phash: np.ndarray
    sha_hi: np.ndarray
    sha_lo: np.ndarray
    has_sha: np.ndarray
    pixels: np.ndarray
    score: np.ndarray

    @classmethod
    def of(cls, samples: pa.Table) -> _Samples:
        phash, has_phash = u64(samples["phash"])
        sha_hi, has_sha = u64(samples["sha256_hi"])
        sha_lo, _ = u64(samples["sha256_lo"])
        pixels = pc.fill_null(samples["pixels"], 0).to_numpy(zero_copy_only=False)
        # A sample without any detection ranks below every sample with one.
        score = pc.fill_null(samples["best_score"], -1.0).to_numpy(zero_copy_only=False)
        return cls(
            samples["key"].combine_chunks(),
            phash,
            has_phash,
            sha_hi,
            sha_lo,
            has_sha,
            pixels.astype(np.int64),
            score,
        )


@dataclass
class _Reference:
    """The distinct reference hash values, each with its smallest item, and item ranks."""

    values: np.ndarray
    items: pa.Array
    rank: np.ndarray

    @classmethod
    def of(cls, reference: pa.Table) -> _Reference:
        reference = reference.sort_by([("phash", "ascending"), ("item", "ascending")])
        every, _ = u64(reference["phash"])
        first_items = np.flatnonzero(_run_starts(every))
        items = reference["item"].combine_chunks().take(pa.array(first_items))
        return cls(every[first_items], items, _ranks(items))


@dataclass
class _Nodes:
    """The distinct hash values of samples and references (`values`, sorted) and which is which."""

    values: np.ndarray
    node: np.ndarray  # per sample: its value's node (0 where it has no pHash)
    ref_node: np.ndarray  # per distinct reference value: its node
    sample_node: np.ndarray  # per node: some sample has this value
    ref_of_node: np.ndarray  # per node: the reference value index, or -1


def _nodes(s: _Samples, ref: _Reference) -> _Nodes:
    # One sort for all (a binary search per sample would cost more than the whole search at 10M).
    combined = np.concatenate([s.phash[s.has_phash], ref.values])
    order = np.argsort(combined, kind="stable")
    starts = _run_starts(combined[order])
    values = combined[order][starts]
    ids = np.empty(combined.size, dtype=np.int64)
    ids[order] = np.cumsum(starts) - 1
    n_hashed = int(s.has_phash.sum())
    node = np.zeros(s.phash.size, dtype=np.int64)
    node[s.has_phash] = ids[:n_hashed]
    ref_node = ids[n_hashed:]
    sample_node = np.zeros(values.size, dtype=bool)
    sample_node[node[s.has_phash]] = True
    ref_of_node = np.full(values.size, -1, dtype=np.int64)
    ref_of_node[ref_node] = np.arange(ref.values.size)
    return _Nodes(values, node, ref_node, sample_node, ref_of_node)


def _pair_nodes(nodes: _Nodes, pairs: Pairs) -> tuple[np.ndarray, np.ndarray]:
    """The nodes of each pair's two hashes (the search's pairs are among the nodes' values)."""
    a, b, _ = pairs
    values = nodes.values
    ia, ib = np.searchsorted(values, a), np.searchsorted(values, b)
    if ia.size and (
        ia.max() >= values.size
        or ib.max() >= values.size
        or (values[ia] != a).any()
        or (values[ib] != b).any()
    ):
        raise RuntimeError("dedup: the search returned hashes that are not among the inputs")
    return ia, ib


def _eval_overlap(nodes: _Nodes, ref: _Reference, ia, ib, distance) -> tuple:
    """Per node: the nearest reference (then the smallest item) within the distance, or -1, and
    the distance to it."""
    eval_ref = np.full(nodes.values.size, -1, dtype=np.int64)
    eval_distance = np.zeros(nodes.values.size, dtype=np.int32)
    if not ref.values.size:
        return eval_ref, eval_distance
    exact = nodes.sample_node[nodes.ref_node]
    to_ref_b = nodes.sample_node[ia] & (nodes.ref_of_node[ib] >= 0)
    to_ref_a = nodes.sample_node[ib] & (nodes.ref_of_node[ia] >= 0)
    cand_node = np.concatenate([nodes.ref_node[exact], ia[to_ref_b], ib[to_ref_a]])
    cand_ref = np.concatenate(
        [np.flatnonzero(exact), nodes.ref_of_node[ib[to_ref_b]], nodes.ref_of_node[ia[to_ref_a]]]
    )
    cand_distance = np.concatenate(
        [np.zeros(int(exact.sum()), np.int32), distance[to_ref_b], distance[to_ref_a]]
    )
    order = np.lexsort((ref.rank[cand_ref], cand_distance, cand_node))
    best = order[_run_starts(cand_node[order])]
    eval_ref[cand_node[best]] = cand_ref[best]
    eval_distance[cand_node[best]] = cand_distance[best]
    return eval_ref, eval_distance


def _components(edges_a: np.ndarray, edges_b: np.ndarray, size: int) -> np.ndarray:
    """The connected component of each of `size` nodes linked by the edges."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(edges_a.size, np.int8), (edges_a, edges_b)), shape=(size, size))
    return connected_components(graph, directed=False)[1]


def _clusters(s: _Samples, nodes: _Nodes, live: np.ndarray, eval_ref, ia, ib, cfg) -> tuple:
    """(cluster label of each sample, number of labels).

    First the components of the hash values linked by the pairs (few edges), so a sample's label
    is its value's component; then samples with equal sha256 are joined, which only needs a
    second pass when their labels differ (equal bytes almost always have equal pHashes).
    Samples without pHash, or all samples when near is off, start alone.
    """
    n = s.phash.size
    rows = np.arange(n)
    space = nodes.values.size + n  # labels: value components, then one per sample on its own
    label = nodes.values.size + rows
    if cfg.near:
        live_node = nodes.sample_node & (eval_ref < 0)
        both = live_node[ia] & live_node[ib]
        component = _components(ia[both], ib[both], nodes.values.size)
        label = np.where(live & s.has_phash, component[nodes.node], label)
    if cfg.exact:
        linked = rows[live & s.has_sha]
        by_sha = linked[np.argsort(s.sha_hi[linked], kind="stable")]
        if (_run_starts(s.sha_hi[by_sha]) != _run_starts(s.sha_hi[by_sha], s.sha_lo[by_sha])).any():
            by_sha = linked[np.lexsort((s.sha_lo[linked], s.sha_hi[linked]))]  # a 64-bit tie: rare
        group_start = _run_starts(s.sha_hi[by_sha], s.sha_lo[by_sha])
        first = by_sha[np.flatnonzero(group_start)][np.cumsum(group_start) - 1]
        differ = label[by_sha] != label[first]
        if differ.any():
            label = _components(label[by_sha][differ], label[first][differ], space)[label]
    return label, space


def _keepers(s: _Samples, live: np.ndarray, label: np.ndarray, space: int) -> np.ndarray:
    """Each live sample's keeper (row): most pixels, then best face score, then smallest key
    (= lowest row); -1 for the others. Only clusters of two or more need sorting."""
    rows = np.arange(s.phash.size)
    keeper = np.where(live, rows, -1)
    members = np.bincount(label[live], minlength=space)
    shared = rows[live & (members[label] > 1)]
    if shared.size:
        ordered = shared[np.lexsort((shared, -s.score[shared], -s.pixels[shared], label[shared]))]
        firsts = ordered[_run_starts(label[ordered])]
        keeper_of_label = np.full(space, -1, dtype=np.int64)
        keeper_of_label[label[firsts]] = firsts
        keeper[shared] = keeper_of_label[label[shared]]
    return keeper


def _fates(s: _Samples, ref: _Reference, keeper, is_eval, eval_ref, eval_distance, cfg):
    """The DEDUP table from the keepers and the evaluation overlaps."""
    n = s.phash.size
    rows = np.arange(n)
    live = ~is_eval
    kept = live & (keeper == rows)
    duplicate = live & ~kept
    k = np.where(duplicate, keeper, 0)
    same_bytes = s.has_sha & s.has_sha[k] & (s.sha_hi == s.sha_hi[k]) & (s.sha_lo == s.sha_lo[k])
    exact_duplicate = duplicate & same_bytes & cfg.exact
    code = np.zeros(n, dtype=np.int8)
    code[exact_duplicate] = 1
    code[duplicate & ~exact_duplicate] = 2
    code[is_eval] = 3
    reason = pa.DictionaryArray.from_arrays(
        pa.array(code, mask=code == 0), pa.array(["", *DEDUP_REASONS])
    ).dictionary_decode()
    has_distance = (duplicate & s.has_phash & s.has_phash[k]) | is_eval
    distance = np.where(
        is_eval, eval_distance, np.bitwise_count(s.phash ^ s.phash[k]).astype(np.int32)
    )
    matched_ref = np.where(is_eval, eval_ref, 0)
    duplicate_of = pc.if_else(
        pa.array(is_eval),
        ref.items.take(pa.array(matched_ref, mask=~is_eval))
        if ref.values.size
        else pa.nulls(n, pa.string()),
        s.keys.take(pa.array(k, mask=~duplicate)),
    )
    return pa.table(
        {
            "key": s.keys,
            "kept": pa.array(kept),
            "reason": reason,
            "duplicate_of": pc.cast(duplicate_of, pa.string()),
            "distance": pa.array(distance.astype(np.int32), mask=~has_distance),
            "cluster": pa.array(keeper, mask=is_eval),
        },
        schema=DEDUP,
    )


def decide(samples: pa.Table, reference: pa.Table, pairs: Pairs, cfg: DedupSection) -> pa.Table:
    """The DEDUP table of `samples` (DEDUP_SAMPLES rows, sorted by unique key).

    `reference` is REFERENCE_HASHES; `pairs` (a, b, distance) must hold every pair of distinct
    values among the samples' and references' pHashes within `cfg.max_distance` (the search).
    """
    if samples.num_rows == 0:
        return DEDUP.empty_table()
    s, ref = _Samples.of(samples), _Reference.of(reference)
    nodes = _nodes(s, ref)
    ia, ib = _pair_nodes(nodes, pairs)
    eval_ref, eval_distance = _eval_overlap(nodes, ref, ia, ib, pairs[2])
    is_eval = s.has_phash & (eval_ref[nodes.node] >= 0)
    label, space = _clusters(s, nodes, ~is_eval, eval_ref, ia, ib, cfg)
    keeper = _keepers(s, ~is_eval, label, space)
    return _fates(s, ref, keeper, is_eval, eval_ref[nodes.node], eval_distance[nodes.node], cfg)
