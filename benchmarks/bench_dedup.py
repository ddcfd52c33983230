"""Dedup benchmark: near-duplicate search among 10M 64-bit pHashes, side by side with baselines.

    python benchmarks/bench_dedup.py                      # 10M hashes, BK-tree and faiss on 1M
    python benchmarks/bench_dedup.py --n 1000000 --dask-n 1000000

Data: uniformly random 64-bit hashes with planted near-duplicate pairs at every distance from 0 to
max_distance + 2, and chains A-B-C whose steps are within max_distance but whose ends are not.
Each method runs in its own process, so its peak memory (peak RSS, input included) is its own:

- laionface memory path: collapse equal hashes, multi-index search (`laionface.stages.dedup.hashindex`), then
  the stage's `dedup.decide` (clusters, keepers, reasons) on one sample per hash;
- laionface dask path: the stage's band (map) and pair (reduce) steps on a LocalCluster, hashes
  in 100 shard files; its pairs are checked against the memory path's count and the truth;
- brute force (numpy XOR + popcount, all pairs): timed on a subsample of queries against every
  hash and extrapolated to all n(n-1)/2 pairs (said so in the table);
- BK-tree (pybktree) on --bktree-n hashes: built in full, queried for a subsample, extrapolated;
- faiss IndexBinaryMultiHash(64, 3, 21), nflip=1 (exact at distance <= 4) on --faiss-n hashes.

Recall is on the planted pairs: every planted pair within max_distance must be found, and none of
the planted pairs at max_distance + 1 or + 2 may be reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

U64 = np.uint64


def bit_masks(rng: np.random.Generator, counts: np.ndarray, skip: np.ndarray | None = None):
    """One 64-bit mask per row with `counts[i]` distinct set bits (after `skip[i]` used ones)."""
    order = np.argsort(rng.random((counts.size, 64)), axis=1).astype(U64)
    skip = np.zeros(counts.size, np.int64) if skip is None else skip
    masks = np.zeros(counts.size, U64)
    for j in range(64):
        use = (j >= skip) & (j < skip + counts)
        masks[use] |= U64(1) << order[use, j]
    return masks, order


def make_data(n: int, r: int, seed: int):
    """(hashes, planted pairs (a, b, distance), chains (c0, c1, c2)); len(hashes) == n."""
    rng = np.random.default_rng(seed)
    n_pairs, n_chains = n // 50, n // 500
    base = rng.integers(0, 2**64, size=n - n_pairs - 2 * n_chains, dtype=U64)
    sources = base[:n_pairs]
    distances = rng.integers(0, r + 3, size=n_pairs)
    masks, _ = bit_masks(rng, distances)
    partners = sources ^ masks
    c0 = base[n_pairs : n_pairs + n_chains]
    first = rng.integers((r + 2) // 2, r + 1, size=n_chains)  # ends more than r apart
    second = rng.integers((r + 2) // 2, r + 1, size=n_chains)
    step1, order = bit_masks(rng, first)
    step2 = np.zeros(n_chains, U64)
    for j in range(64):
        use = (j >= first) & (j < first + second)
        step2[use] |= U64(1) << order[use, j]
    c1 = c0 ^ step1
    c2 = c1 ^ step2
    hashes = np.concatenate([base, partners, c1, c2])
    rng.shuffle(hashes)
    return hashes, (sources, partners, distances), (c0, c1, c2)


def pair_recall(found_a, found_b, planted, r: int, queried=None) -> dict:
    """Planted pairs within r that were found / all, and planted pairs beyond r reported."""
    a, b, d = planted
    if queried is not None:
        a, b, d = a[queried], b[queried], d[queried]
    low, high = np.minimum(a, b), np.maximum(a, b)
    found = set(
        zip(
            np.minimum(found_a, found_b).tolist(),
            np.maximum(found_a, found_b).tolist(),
            strict=True,
        )
    )
    hit = np.array(
        [(x, y) in found for x, y in zip(low.tolist(), high.tolist(), strict=True)], dtype=bool
    )
    within = (d >= 1) & (d <= r)  # distance 0: the same hash value, collapsed, not a pair
    return {
        "within_found": int((hit & within).sum()),
        "within_total": int(within.sum()),
        "beyond_reported": int((hit & (d > r)).sum()),
        "beyond_total": int((d > r).sum()),
    }


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------
# Methods (each runs in its own process)


def method_memory(args) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc

    from laionface.config import DedupSection
    from laionface.io.schemas import DEDUP_SAMPLES, REFERENCE_HASHES
    from laionface.stages.dedup import hashindex
    from laionface.stages.dedup.decide import decide
    from laionface.stages.dedup.search import search_memory

    hashes, planted, chains = make_data(args.n, args.max_distance, args.seed)
    rng = np.random.default_rng(1)
    keys = pc.utf8_lpad(pc.cast(pa.array(np.arange(args.n)), pa.string()), 10, "0")
    samples = pa.table(
        {
            "key": keys,
            "phash": hashes,
            "sha256_hi": rng.integers(0, 2**64, args.n, dtype=U64),
            "sha256_lo": rng.integers(0, 2**64, args.n, dtype=U64),
            "pixels": rng.integers(100_000, 1_000_000, args.n),
            "best_score": rng.random(args.n, dtype=np.float32),
        },
        schema=DEDUP_SAMPLES,
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    values = hashindex.distinct(hashes)
    t_distinct = time.perf_counter() - started
    plan = hashindex.plan_search(values.size, args.max_distance)
    pairs = search_memory(values, args.max_distance, threads=args.threads)
    t_search = time.perf_counter() - started - t_distinct
    decisions = decide(
        samples, REFERENCE_HASHES.empty_table(), pairs, DedupSection(max_distance=args.max_distance)
    )
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    cluster = decisions["cluster"].to_numpy()
    row_of = {int(h): i for i, h in enumerate(hashes.tolist())} if args.n <= 2_000_000 else None
    if row_of is None:
        order = np.argsort(hashes)
        sorted_hashes = hashes[order]

        def rows(values_):
            return order[np.searchsorted(sorted_hashes, values_)]
    else:

        def rows(values_):
            return np.array([row_of[int(v)] for v in values_])

    c0, c1, c2 = chains
    chains_joined = int(
        ((cluster[rows(c0)] == cluster[rows(c1)]) & (cluster[rows(c1)] == cluster[rows(c2)])).sum()
    )
    distance_ok = bool((np.bitwise_count(pairs[0] ^ pairs[1]) <= args.max_distance).all())
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "detail": f"distinct {t_distinct:.1f} s, search {t_search:.1f} s "
        f"({plan.blocks} blocks, {len(plan.tables)} tables, {args.threads} threads), "
        f"clusters+keepers {seconds - t_distinct - t_search:.1f} s",
        "pairs": int(pairs[0].size),
        "recall": pair_recall(pairs[0], pairs[1], planted, args.max_distance),
        "chains": f"{chains_joined}/{c0.size} chains in one cluster",
        "all_pairs_within": distance_ok,
        "kept": int(pc.sum(decisions["kept"]).as_py()),
    }


def method_dask(args) -> dict:
    import pyarrow as pa
    from distributed import Client, LocalCluster

    from laionface.config import Config
    from laionface.engine.runfolder import RunFolder
    from laionface.engine.runner import StageContext
    from laionface.io import storage
    from laionface.stages.dedup.search import read_pairs, search_dask

    hashes, planted, _ = make_data(args.dask_n, args.max_distance, args.seed)
    with tempfile.TemporaryDirectory() as run_dir:
        files = {}
        for i, chunk in enumerate(np.array_split(hashes, 100)):
            url = storage.join(run_dir, "hashes", f"{i:05d}.parquet")
            storage.write_parquet(pa.table({"phash": chunk}), url)
            files[f"{i:05d}"] = url
        with (
            LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
            Client(cluster) as client,
        ):
            ctx = StageContext(Config(), RunFolder(run_dir), client, progress=False)
            started = time.perf_counter()
            pairs = read_pairs(search_dask(ctx, files, hashes.size, args.max_distance))
            seconds = time.perf_counter() - started
            worker_peak = client.run(peak_mb)
    return {
        "seconds": seconds,
        "detail": "band + pair steps on a LocalCluster (2 workers x 1 thread), 100 shards; "
        f"workers' peak RSS {max(worker_peak.values()):.0f} MB each",
        "pairs": int(pairs[0].size),
        "recall": pair_recall(pairs[0], pairs[1], planted, args.max_distance),
    }


def method_brute(args) -> dict:
    hashes, planted, _ = make_data(args.n, args.max_distance, args.seed)
    rng = np.random.default_rng(2)
    queried = rng.choice(planted[0].size, size=args.brute_queries, replace=False)
    sources = planted[0][queried]
    found_a, found_b = [], []
    started = time.perf_counter()
    for q in sources:
        close = np.flatnonzero(np.bitwise_count(hashes ^ q) <= args.max_distance)
        found_a.append(np.full(close.size, q, U64))
        found_b.append(hashes[close])
    per_query = (time.perf_counter() - started) / sources.size
    return {
        "seconds": per_query * (args.n - 1) / 2,  # n(n-1)/2 comparisons in all
        "extrapolated": True,
        "detail": f"{sources.size} queries x {args.n:,} hashes in {per_query * sources.size:.1f} s, "
        "extrapolated to all pairs",
        "recall": pair_recall(
            np.concatenate(found_a), np.concatenate(found_b), planted, args.max_distance, queried
        ),
    }


def method_bktree(args) -> dict:
    import pybktree

    hashes, planted, _ = make_data(args.bktree_n, args.max_distance, args.seed)
    started = time.perf_counter()
    tree = pybktree.BKTree(pybktree.hamming_distance, hashes.tolist())
    build = time.perf_counter() - started
    rng = np.random.default_rng(2)
    queried = rng.choice(planted[0].size, size=args.bktree_queries, replace=False)
    found_a, found_b = [], []
    started = time.perf_counter()
    for q in planted[0][queried].tolist():
        for _, item in tree.find(q, args.max_distance):
            found_a.append(q)
            found_b.append(item)
    per_query = (time.perf_counter() - started) / queried.size
    return {
        "seconds": build + per_query * args.bktree_n,
        "extrapolated": True,
        "detail": f"build {build:.1f} s; {queried.size} queries in {per_query * queried.size:.1f} s, "
        f"extrapolated to {args.bktree_n:,} queries",
        "recall": pair_recall(
            np.array(found_a, U64), np.array(found_b, U64), planted, args.max_distance, queried
        ),
    }


def method_faiss(args) -> dict:
    import faiss

    from laionface.stages.dedup import hashindex

    hashes, planted, _ = make_data(args.faiss_n, args.max_distance, args.seed)
    values = hashindex.distinct(hashes)
    codes = values.view(np.uint8).reshape(-1, 8)
    faiss.omp_set_num_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    index = faiss.IndexBinaryMultiHash(64, 3, 21)
    index.nflip = 1
    index.add(codes)
    lims, _, labels = index.range_search(codes, args.max_distance + 1)  # radius is exclusive
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    query = np.repeat(np.arange(values.size), np.diff(lims.astype(np.int64)))
    keep = query < labels
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "detail": "IndexBinaryMultiHash(64, 3, 21), nflip=1: add + self range search",
        "recall": pair_recall(
            values[query[keep]], values[labels[keep]], planted, args.max_distance
        ),
    }


METHODS = {
    "memory": method_memory,
    "dask": method_dask,
    "brute": method_brute,
    "bktree": method_bktree,
    "faiss": method_faiss,
}


def run_child(method: str, argv: list[str]) -> dict:
    command = [sys.executable, __file__, "--method", method, *argv]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--dask-n", type=int, default=10_000_000)
    parser.add_argument("--bktree-n", type=int, default=1_000_000)
    parser.add_argument("--faiss-n", type=int, default=1_000_000)
    parser.add_argument("--max-distance", type=int, default=4)
    parser.add_argument("--brute-queries", type=int, default=200)
    parser.add_argument("--bktree-queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="memory,dask,brute,bktree,faiss")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.method:
        result = METHODS[args.method](args)
        result["peak_mb"] = peak_mb()
        result.setdefault("cpu_seconds", None)
        print(json.dumps(result))
        return

    argv = [a for a in sys.argv[1:]]
    sizes = {
        "memory": args.n,
        "dask": args.dask_n,
        "brute": args.n,
        "bktree": args.bktree_n,
        "faiss": args.faiss_n,
    }
    names = {
        "memory": "laionface, memory path",
        "dask": "laionface, dask path",
        "brute": "brute force (numpy)",
        "bktree": "BK-tree (pybktree)",
        "faiss": "faiss IndexBinaryMultiHash",
    }
    print(
        f"# dedup benchmark: max_distance {args.max_distance}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    results = {}
    for method in args.methods.split(","):
        results[method] = run_child(method, argv)
        print(f"{method}: {json.dumps(results[method])}", file=sys.stderr, flush=True)
    brute = results.get("brute", {})
    brute_rate = brute.get("seconds", 0) / max(args.n * (args.n - 1) / 2, 1)
    print()
    print(
        "| method | hashes | wall time (s) | CPU time (s) | peak RSS (MB) | vs brute force "
        "| within r found | beyond r reported |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, res in results.items():
        n = sizes[method]
        if "error" in res:
            print(f"| {names[method]} | {n:,} | error: {res['error']} | | | | | |")
            continue
        seconds = res["seconds"]
        brute_same_n = brute_rate * n * (n - 1) / 2
        speedup = f"{brute_same_n / seconds:,.3g}x" if brute_rate and method != "brute" else "1x"
        rec = res["recall"]
        mark = " (extrapolated)" if res.get("extrapolated") else ""
        cpu = f"{res['cpu_seconds']:,.1f}" if res.get("cpu_seconds") is not None else "-"
        print(
            f"| {names[method]} | {n:,} | {seconds:,.1f}{mark} | {cpu} | {res['peak_mb']:,.0f} "
            f"| {speedup} "
            f"| {rec['within_found']:,}/{rec['within_total']:,} "
            f"| {rec['beyond_reported']}/{rec['beyond_total']:,} |"
        )
    print()
    for method, res in results.items():
        if "error" not in res:
            notes = [res["chains"]] if "chains" in res else []
            notes += [f"{res['pairs']:,} pairs"] if "pairs" in res else []
            extra = "; ".join(notes)
            print(f"- {names[method]}: {res['detail']}{'; ' + extra if extra else ''}")
    print("\nvs brute force: brute force's per-pair rate measured here, scaled to each method's n.")


if __name__ == "__main__":
    main()
