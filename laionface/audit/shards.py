"""The audit's per-shard reads: each returns small counts, never the rows themselves.

So the driver's memory for the audit grows with the number of shards, not of rows. Each function
is a plain, picklable function of one shard: the funnel maps it over the shards on the cluster
when it has one (`Mapper`), else on a thread pool.

A raw shard's samples keep their key from the download to the dataset, and a key starts with its
raw shard's name (layout.key_prefix): a raw shard's dedup decisions are one run of the
key-sorted decisions file (io.keyed.read_prefix), and its published samples lie in the dataset
shards that `dataset_shard` says hold them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laionface.audit.model import EXAMPLES_PER_CATEGORY, AuditError
from laionface.audit.read import parallel_map, read_columns, value_counts
from laionface.engine.cluster import gather_map
from laionface.io import keyed, storage
from laionface.layout import RunLayout, key_prefix, url_hosts
from laionface.stages.download.outcomes import origin_outcomes

# Keys shown in a message before "...".
EXAMPLES = 5
# Cluster sizes from this one up are counted together.
CLUSTER_SIZE_CAP = 20
# Hosts each metadata shard reports, those with the most failures: the report's table of
# failing domains sums them, exact for every host in each of its shards' lists (a host with a
# few failures in each of many shards can be under-counted).
DOMAINS_PER_SHARD = 200

Mapper = Callable[[Callable[..., Any], list[dict]], list[Any]]


def local_mapper(fn: Callable[..., Any], kwargs: list[dict]) -> list[Any]:
    """Run `fn(**k)` for each k on this process's threads (reads are I/O bound)."""
    return parallel_map(lambda k: fn(**k), kwargs)


def dask_mapper(client: Any) -> Mapper:
    """Run `fn(**k)` for each k on the cluster behind `client`, results in order."""
    return functools.partial(gather_map, client)


def _nulls_as_kept(reasons: pa.ChunkedArray, kept: pa.ChunkedArray) -> dict[str, int]:
    """{reason: rows} with "" for the rows kept (reason null where kept is true)."""
    reason = pc.if_else(pc.fill_null(kept, False), pa.scalar("", pa.string()), reasons)
    return value_counts(pc.fill_null(reason, "unknown"))


def source_counts(*, url: str) -> dict[str, int]:
    """A metadata shard's rows per input file (its source_file column)."""
    return value_counts(read_columns(url, ["source_file"])["source_file"])


def dataset_shard(*, url: str) -> dict:
    """A dataset shard's samples per raw shard, and whether a key repeats in it."""
    table = read_columns(url, ["key", "raw_shard"])
    return {
        "samples": table.num_rows,
        "raws": value_counts(table["raw_shard"]),
        "repeated": table.num_rows - pc.count_distinct(table["key"]).as_py(),
    }


def manifest_counts(*, url: str) -> dict[str, int]:
    """manifest.parquet's rows per dataset shard (from row group statistics where a row group
    holds one shard, as emit writes it)."""
    fs, path = storage.fs_for(url)
    counts: dict[str, int] = {}
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        column = parquet.schema_arrow.get_field_index("shard")
        for index in range(parquet.num_row_groups):
            group = parquet.metadata.row_group(index)
            stats = group.column(column).statistics
            if stats is not None and stats.has_min_max and stats.min == stats.max:
                counts[stats.min] = counts.get(stats.min, 0) + group.num_rows
                continue
            for shard, n in value_counts(parquet.read_row_group(index, ["shard"])["shard"]).items():
                counts[shard] = counts.get(shard, 0) + n
    return counts


def _published_keys(dataset_urls: Iterable[str], raw: str) -> pa.ChunkedArray:
    tables = []
    for url in dataset_urls:
        table = read_columns(url, ["key", "raw_shard"])
        tables.append(table.filter(pc.equal(table["raw_shard"], raw)).select(["key"]))
    if not tables:
        return pa.chunked_array([], pa.string())
    return pa.concat_tables(tables)["key"]


def _against(keys: pa.ChunkedArray, known: pa.ChunkedArray) -> dict:
    """How many of `keys` are not in `known`, with a few of them."""
    unknown = keys.filter(pc.invert(pc.is_in(keys, value_set=known)))
    return {"count": len(unknown), "examples": unknown.slice(0, EXAMPLES).to_pylist()}


def _dedup_fates(decisions_url: str, raw: str, selected: pa.ChunkedArray) -> tuple[dict, Any]:
    """Dedup's fates of the keys select kept in one raw shard; (figures, the keys it kept)."""
    try:
        decided = keyed.read_prefix(decisions_url, key_prefix(raw), ["key", "kept", "reason"])
    except Exception as exc:
        raise AuditError(f"{decisions_url}: can't read the decisions ({exc})") from exc
    mine = decided.filter(pc.is_in(decided["key"], value_set=selected))
    figures = {
        "decided": len(decided),
        "fates": _nulls_as_kept(mine["reason"], mine["kept"]),
        "undecided": len(selected) - mine.num_rows,
        "unknown": _against(decided["key"], selected),
    }
    return figures, mine.filter(pc.fill_null(mine["kept"], False))["key"]


def raw_shard_fates(
    *, run_url: str, raw: str, dataset_urls: list[str], decisions: bool, published: bool
) -> dict:
    """What became of one raw shard's images from select on: select's fates, dedup's fates of
    the keys select kept (`decisions`: the run has dedup decisions), and how many of the keys
    kept to the end were published (`published`: the run has a dataset; `dataset_urls`, the
    dataset shards holding this raw shard's samples)."""
    layout = RunLayout(run_url)
    select = read_columns(layout.select(raw), ["key", "kept", "reason"])
    selected = select.filter(pc.fill_null(select["kept"], False))["key"]
    out: dict[str, Any] = {"select": _nulls_as_kept(select["reason"], select["kept"])}
    final = selected
    if decisions:
        out["dedup"], final = _dedup_fates(layout.dedup_decisions, raw, selected)
    out["final"] = len(final)
    if published:
        keys = _published_keys(dataset_urls, raw)
        out["emit"] = {
            "published": len(keys),
            "repeated": len(keys) - pc.count_distinct(keys).as_py(),
            "unknown": _against(keys, final),
        }
    return out


def decision_counts(*, url: str) -> dict[str, int]:
    """dedup's fates of every decision ("" for kept), for a run with no select output left."""
    table = read_columns(url, ["kept", "reason"])
    return _nulls_as_kept(table["reason"], table["kept"])


def cluster_summary(*, url: str, top: int = 10) -> dict:
    """dedup's clusters of more than one image: how many of each size, and the `top` largest
    with their keeper's key (the cluster column is the keeper's row in the file)."""
    import numpy as np

    table = read_columns(url, ["cluster"])
    clusters = pc.drop_null(table["cluster"]).to_numpy()
    sizes = np.bincount(clusters) if clusters.size else np.zeros(0, np.int64)
    shared = np.flatnonzero(sizes > 1)
    order = shared[np.lexsort((shared, -sizes[shared]))][:top]
    fs, path = storage.fs_for(url)
    keepers = []
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        ends = np.cumsum(
            [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
        )
        for row in order.tolist():
            group = int(np.searchsorted(ends, row, side="right"))
            start = int(ends[group - 1]) if group else 0
            keepers.append(parquet.read_row_group(group, ["key"])["key"][row - start].as_py())
    capped = np.minimum(sizes[shared], CLUSTER_SIZE_CAP)
    return {
        # clusters of 2, 3, ... images, the last bin CLUSTER_SIZE_CAP or more
        "histogram": np.bincount(capped, minlength=CLUSTER_SIZE_CAP + 1)[2:].tolist(),
        "clusters": int(len(shared)),
        "largest": [
            {"cluster": int(c), "images": int(sizes[c]), "keeper": k}
            for c, k in zip(order.tolist(), keepers, strict=True)
        ],
    }


def download_fates(*, run_url: str, shard: str, sources: list[str]) -> dict:
    """The latest download outcome of each input row of metadata shard `shard` (from the raw
    shards `sources`, outcomes.origin_outcomes), summed: {"fates": {category,
    "" for a success: rows}, "successes": {raw shard: latest successes there}, "examples":
    {category: the first EXAMPLES_PER_CATEGORY (URL, error message) in key order}, "domains":
    {host: [rows, failed]} of the DOMAINS_PER_SHARD hosts with the most failures}."""
    outcomes = origin_outcomes(run_url, shard, sources)
    success = pc.equal(outcomes["status"], "success")
    fates = value_counts(pc.fill_null(outcomes["error_category"], ""))
    failed = outcomes.filter(pc.invert(success))
    examples: dict[str, list] = {}
    for row in failed.select(["error_category", "URL", "error_message"]).to_pylist():
        shown = examples.setdefault(row["error_category"] or "other", [])
        if len(shown) < EXAMPLES_PER_CATEGORY:
            shown.append({"URL": row["URL"], "error_message": row["error_message"]})
    return {
        "fates": fates,
        "successes": value_counts(outcomes.filter(success)["shard"]),
        "examples": examples,
        "domains": _domain_failures(outcomes["URL"], success),
    }


def _domain_failures(urls: pa.ChunkedArray, success: pa.ChunkedArray) -> dict[str, list[int]]:
    hosts = pc.fill_null(url_hosts(urls), "(not a URL)")
    table = pa.table({"domain": hosts, "failed": pc.cast(pc.invert(success), pa.int64())})
    grouped = table.group_by("domain").aggregate([("failed", "sum"), ("failed", "count")])
    grouped = grouped.filter(pc.greater(grouped["failed_sum"], 0))
    grouped = grouped.sort_by([("failed_sum", "descending"), ("domain", "ascending")])
    rows = grouped.slice(0, DOMAINS_PER_SHARD).to_pylist()
    return {r["domain"]: [r["failed_count"], r["failed_sum"]] for r in rows}
