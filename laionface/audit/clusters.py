"""The report's near-duplicate clusters image by image: the image dedup kept beside the ones it
dropped, for the largest clusters (`shards.cluster_summary`).

To keep the reading bounded on a big run, a cluster shows at most MEMBERS_SHOWN dropped images,
and clusters are taken largest first while their images lie in at most
sheets.MAX_SAMPLE_SHARDS raw shards (whose tars are read for the thumbnails, streamed).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laionface.audit.shards import cluster_summary
from laionface.audit.sheets import MAX_SAMPLE_SHARDS, Sample
from laionface.io import storage
from laionface.layout import RunLayout, key_prefix, shard_of_file

CLUSTERS_SHOWN = 8
MEMBERS_SHOWN = 7  # dropped images per cluster, besides its keeper
_COLUMNS = ["key", "kept", "reason", "duplicate_of", "distance", "cluster"]


@dataclass
class ClusterSheet:
    cluster: int
    images: int  # in the whole cluster
    samples: list[Sample]  # the keeper first, then dropped ones in key order


def cluster_members(url: str, clusters: list[int], per_cluster: int) -> dict[int, list[dict]]:
    """The decisions rows of the keeper and of up to `per_cluster` dropped members (the first in
    key order) of each of `clusters`, read a row group at a time (the cluster column first)."""
    wanted = pa.array(clusters, pa.int64())
    found: dict[int, list[dict]] = {c: [] for c in clusters}
    fs, path = storage.fs_for(url)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        for index in range(parquet.num_row_groups):
            cluster = parquet.read_row_group(index, ["cluster"])["cluster"]
            if not pc.any(pc.is_in(cluster, value_set=wanted)).as_py():
                continue
            group = parquet.read_row_group(index, _COLUMNS)
            for row in group.filter(pc.is_in(group["cluster"], value_set=wanted)).to_pylist():
                members = found[row["cluster"]]
                if row["kept"] or sum(not m["kept"] for m in members) < per_cluster:
                    members.append(row)
    return {c: sorted(rows, key=lambda r: (not r["kept"], r["key"])) for c, rows in found.items()}


def _shard_of(key: str, prefixes: dict[str, str]) -> str:
    """The raw shard whose key prefix `key` starts with (layout.key_prefix); "" if none."""
    lengths = {len(p) for p in prefixes}
    return next((prefixes[key[:n]] for n in sorted(lengths) if key[:n] in prefixes), "")


def _sample(row: dict, shard: str) -> Sample:
    if row["kept"]:
        return Sample(row["key"], shard, "kept", note="kept: the cluster's keeper", keeper=True)
    note = f"{row['reason']}: duplicate of {row['duplicate_of']}"
    if row["distance"] is not None:
        note += f" (pHash distance {row['distance']})"
    return Sample(row["key"], shard, row["reason"], note=note)


def cluster_sheets(run_url: str) -> list[ClusterSheet] | None:
    """The largest clusters, each with its keeper and dropped images (thumbnails not filled in:
    sheets.render_samples does); None when the run has no dedup decisions."""
    layout = RunLayout(run_url)
    url = layout.dedup_decisions
    if not storage.exists(url):
        return None
    largest = cluster_summary(url=url, top=CLUSTERS_SHOWN)["largest"]
    members = cluster_members(url, [c["cluster"] for c in largest], MEMBERS_SHOWN)
    shards = [shard_of_file(u) for u in storage.list_files(layout.raw, ".tar")]
    prefixes = {key_prefix(shard): shard for shard in shards}
    sheets: list[ClusterSheet] = []
    read: set[str] = set()
    for cluster in largest:
        rows = members[cluster["cluster"]]
        located = [(row, _shard_of(row["key"], prefixes)) for row in rows]
        needed = read | {shard for _, shard in located if shard}
        if sheets and len(needed) > MAX_SAMPLE_SHARDS:
            break
        read = needed
        samples = [_sample(row, shard) for row, shard in located]
        sheets.append(ClusterSheet(cluster["cluster"], cluster["images"], samples))
    return sheets
