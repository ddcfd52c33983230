"""The near-duplicate search: every pair of distinct pHashes within `dedup.max_distance`.

Hashes are searched among their distinct values (equal hashes collapsed first) with the
multi-index search of `hashindex`:
- `memory`: in one process (`search_memory`, tables on threads; "auto" uses it up to 10M
  distinct hashes, about 3 GB);
- `dask`: across workers (`search_dask`): a map step writes each hash file's distinct hashes keyed
  by the top bits of each table's key (`dedup/bands/`, `band_shard`), a reduce step finds the
  pairs of each partition (`dedup/pairs/`, `pair_partition`); both steps resume like any step.
Both find every pair within the distance (the search is exact), so they give the same decisions.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from laionface.engine.runner import ShardTask, StageContext
from laionface.io import storage
from laionface.io.schemas import DEDUP_BANDS, HASH_PAIRS
from laionface.layout import shard_name, shard_of_file
from laionface.stages.dedup import hashindex
from laionface.stages.dedup.samples import u64

# Records (hashes x tables) one reduce task of the dask search holds at most, roughly.
DASK_RECORDS_PER_PARTITION = 16_000_000
MAX_PARTITIONS = 1024

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]


def no_pairs() -> Pairs:
    return np.empty(0, np.uint64), np.empty(0, np.uint64), np.empty(0, np.int32)


def search_memory(values: np.ndarray, max_distance: int, threads: int = 0) -> Pairs:
    """Pairs (a, b, distance) among distinct `values`, in this process."""
    return hashindex.near_pairs(
        values, max_distance, threads=threads or hashindex.default_threads()
    )


def band_shard(
    *, hashes_url: str, out_url: str, max_distance: int, blocks: int, partitions: int
) -> dict:
    """Map step of the sharded search: a file's distinct hashes, keyed per table and partition."""
    table = storage.read_parquet(hashes_url, columns=["phash"])
    values, valid = u64(table["phash"])
    values = hashindex.distinct(values[valid])
    plan = hashindex.SearchPlan(max_distance, blocks)
    groups = {}
    with storage.atomic_open(out_url, "wb") as handle:
        with pq.ParquetWriter(handle, DEDUP_BANDS, compression="zstd") as writer:
            for part, tables, hashes in hashindex.band_records(values, plan, partitions):
                groups[str(part)] = len(groups)
                batch = pa.table({"table": tables, "hash": hashes}, schema=DEDUP_BANDS)
                writer.write_table(batch, row_group_size=max(batch.num_rows, 1))
    return {"items": int(values.size), "row_groups": groups}


def pair_partition(
    *, partition: int, bands: dict[str, int], out_url: str, max_distance: int, blocks: int
) -> dict:
    """Reduce step of the sharded search: the pairs of one partition, from every file's bands."""
    tables, hashes = [], []
    for url, row_group in sorted(bands.items()):
        fs, path = storage.fs_for(url)
        with fs.open(path, "rb") as handle:
            part = pq.ParquetFile(handle).read_row_group(row_group)
        tables.append(part["table"].to_numpy())
        hashes.append(part["hash"].to_numpy())
    plan = hashindex.SearchPlan(max_distance, blocks)
    if tables:
        a, b, dist = hashindex.partition_pairs(np.concatenate(tables), np.concatenate(hashes), plan)
    else:
        a, b, dist = no_pairs()
    storage.write_parquet(pa.table({"a": a, "b": b, "distance": dist}, schema=HASH_PAIRS), out_url)
    return {"items": int(a.size), "records": int(sum(t.size for t in tables))}


def read_pairs(urls: list[str]) -> Pairs:
    """The pairs the dask search wrote, as arrays."""
    if not urls:
        return no_pairs()
    pairs = pa.concat_tables([storage.read_parquet(url) for url in urls])
    return (
        pairs["a"].to_numpy().astype(np.uint64),
        pairs["b"].to_numpy().astype(np.uint64),
        pairs["distance"].to_numpy().astype(np.int32),
    )


def _partitions(ctx: StageContext, n_hashes: int, plan: hashindex.SearchPlan) -> int:
    threads = max(1, sum(ctx.client.nthreads().values()))
    wanted = max(n_hashes * len(plan.tables) / DASK_RECORDS_PER_PARTITION, 2 * threads, 1)
    return 1 << min(
        math.ceil(math.log2(wanted)), plan.min_key_bits, MAX_PARTITIONS.bit_length() - 1
    )


def _remove_except(folder: str, keep: set[str]) -> None:
    for url in storage.list_files(folder, ".parquet"):
        if shard_of_file(url) not in keep:
            storage.remove(url)


def search_dask(
    ctx: StageContext, hash_files: dict[str, str], n_hashes: int, max_distance: int
) -> list[str]:
    """Pairs among the distinct `phash` values of `hash_files` ({name: parquet URL}), found on
    the workers; returns the pair files. `n_hashes` (at least the number of distinct values)
    sizes the plan and the partitions."""
    layout = ctx.layout
    plan = hashindex.plan_search(max(n_hashes, 2), max_distance)
    partitions = _partitions(ctx, n_hashes, plan)
    settings = {"max_distance": max_distance, "blocks": plan.blocks, "partitions": partitions}
    _remove_except(layout.dedup_folder("bands"), set(hash_files))
    band_tasks = [
        ShardTask(
            name,
            dict(hashes_url=url, out_url=layout.dedup_bands(name), **settings),
            inputs=(url,),
            outputs=(layout.dedup_bands(name),),
        )
        for name, url in sorted(hash_files.items())
    ]
    band_stats = ctx.map_shards(
        "dedup/bands", band_shard, band_tasks, settings=settings, unit="hashes"
    )
    inputs: dict[int, dict[str, int]] = {p: {} for p in range(partitions)}
    for task in band_tasks:
        for part, row_group in band_stats[task.shard]["row_groups"].items():
            inputs[int(part)][task.kwargs["out_url"]] = int(row_group)
    names = [shard_name(p) for p in range(partitions)]
    _remove_except(layout.dedup_folder("pairs"), set(names))
    pair_tasks = [
        ShardTask(
            name,
            dict(
                partition=p,
                bands=inputs[p],
                out_url=layout.dedup_pairs(name),
                max_distance=max_distance,
                blocks=plan.blocks,
            ),
            inputs=tuple(sorted(inputs[p])),
            outputs=(layout.dedup_pairs(name),),
        )
        for p, name in enumerate(names)
    ]
    ctx.map_shards("dedup/pairs", pair_partition, pair_tasks, settings=settings, unit="pairs")
    return [task.kwargs["out_url"] for task in pair_tasks]
