"""What the report breaks the data down by, read per shard and merged on the driver.

- Kept data (the published dataset's shards) beside the download input (metadata/shards/): by
  license, NSFW tag, CLIP similarity and caption length (`column_figures`).
- Kept data by domain, with the kept rate (kept / download input rows of that domain):
  the top domains by kept samples, from each dataset shard's DOMAINS_PER_SHARD largest; then
  both counts of those exactly, per shard (`domain_counts`).
- The size of the detections of the images select dropped, per drop reason (`face_sizes`).

Each per-shard function returns counts (a few hundred numbers), never rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laionface.audit.counts import dataset_shards
from laionface.audit.figures import BOX_EDGES, TOP_DOMAINS
from laionface.audit.read import read_columns, value_counts
from laionface.audit.shards import DOMAINS_PER_SHARD, Mapper, local_mapper
from laionface.io import storage
from laionface.layout import RunLayout, shard_of_file, url_hosts

SIMILARITY_EDGES = np.linspace(0.0, 1.0, 101)
CAPTION_EDGES = np.geomspace(1, 2**14, 57)
# Distinct values a shard reports per categorical column (LICENSE has a few dozen in LAION).
VALUES_PER_SHARD = 200
# The column names of each role in the dataset shards and in the download input.
DATASET_COLUMNS = {
    "license": "LICENSE",
    "nsfw": "NSFW",
    "similarity": "similarity",
    "caption": "caption",
    "url": "url",
}
INPUT_COLUMNS = {
    "license": "LICENSE",
    "nsfw": "NSFW",
    "similarity": "similarity",
    "caption": "TEXT",
    "url": "URL",
}
NO_URL = "(not a URL)"


def _top(counts: dict[str, int], n: int) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n])


def _hist(values: pa.ChunkedArray, edges: np.ndarray) -> np.ndarray:
    data = pc.drop_null(values).to_numpy(zero_copy_only=False).astype(np.float64)
    return np.histogram(np.clip(data, edges[0], edges[-1]), bins=edges)[0]


@dataclass
class ColumnFigures:
    """Rows by license and NSFW tag, histograms of similarity and caption length (characters)."""

    rows: int = 0
    license: Counter = field(default_factory=Counter)
    nsfw: Counter = field(default_factory=Counter)
    similarity: np.ndarray = field(default_factory=lambda: np.zeros(len(SIMILARITY_EDGES) - 1))
    caption: np.ndarray = field(default_factory=lambda: np.zeros(len(CAPTION_EDGES) - 1))

    def add(self, part: dict[str, Any]) -> None:
        self.rows += part["rows"]
        self.license.update(part["license"])
        self.nsfw.update(part["nsfw"])
        self.similarity = self.similarity + part["similarity"]
        self.caption = self.caption + part["caption"]


def column_figures(*, url: str, columns: dict[str, str]) -> dict[str, Any]:
    """One shard's rows by license and NSFW tag (the VALUES_PER_SHARD most common), and
    histograms of similarity (SIMILARITY_EDGES) and caption length (CAPTION_EDGES);
    `columns` names the shard's column of each role (DATASET_COLUMNS, INPUT_COLUMNS)."""
    roles = ("license", "nsfw", "similarity", "caption")
    table = read_columns(url, [columns[r] for r in roles])
    license, nsfw, similarity, caption = (table[columns[r]] for r in roles)
    lengths = pc.utf8_length(pc.fill_null(caption, ""))
    return {
        "rows": table.num_rows,
        "license": _top(value_counts(license), VALUES_PER_SHARD),
        "nsfw": _top(value_counts(nsfw), VALUES_PER_SHARD),
        "similarity": _hist(similarity, SIMILARITY_EDGES),
        "caption": _hist(lengths, CAPTION_EDGES),
    }


def _hosts(url: str, column: str) -> pa.Array:
    return pc.fill_null(url_hosts(read_columns(url, [column])[column]), NO_URL)


def domain_counts(*, url: str, column: str, domains: list[str] | None = None) -> dict[str, int]:
    """Rows per domain of one shard's URL `column`: of `domains` exactly (those with rows), or
    (None) the DOMAINS_PER_SHARD domains with the most rows."""
    hosts = _hosts(url, column)
    if domains is None:
        return _top(value_counts(hosts), DOMAINS_PER_SHARD)
    return value_counts(hosts.filter(pc.is_in(hosts, value_set=pa.array(domains, pa.string()))))


@dataclass
class KeptData:
    kept: ColumnFigures
    input: ColumnFigures
    # [{"domain", "kept", "rows", "rate"}] of the TOP_DOMAINS domains with the most kept samples
    domains: list[dict[str, Any]]


def _sum_counts(parts: list[dict[str, int]]) -> Counter:
    total: Counter = Counter()
    for part in parts:
        total.update(part)
    return total


def kept_data(run_url: str, mapper: Mapper = local_mapper) -> KeptData | None:
    """The published data against the download input; None when the run has no dataset."""
    layout = RunLayout(run_url)
    kept_urls = dataset_shards(run_url)
    if not kept_urls:
        return None
    input_urls = storage.list_files(layout.metadata_shards, ".parquet")
    kept, given = ColumnFigures(), ColumnFigures()
    for part in mapper(column_figures, [{"url": u, "columns": DATASET_COLUMNS} for u in kept_urls]):
        kept.add(part)
    for part in mapper(column_figures, [{"url": u, "columns": INPUT_COLUMNS} for u in input_urls]):
        given.add(part)
    first = [{"url": u, "column": DATASET_COLUMNS["url"]} for u in kept_urls]
    top = list(_top(_sum_counts(mapper(domain_counts, first)), TOP_DOMAINS))
    exact = _sum_counts(mapper(domain_counts, [dict(k, domains=top) for k in first]))
    rows = _sum_counts(
        mapper(
            domain_counts,
            [{"url": u, "column": INPUT_COLUMNS["url"], "domains": top} for u in input_urls],
        )
    )
    domains = [
        {
            "domain": d,
            "kept": exact[d],
            "rows": rows[d],
            "rate": exact[d] / rows[d] if rows[d] else 0.0,
        }
        for d in top
    ]
    domains.sort(key=lambda r: (-r["kept"], r["domain"]))
    return KeptData(kept, given, domains)


def face_sizes(*, faces_url: str, select_url: str) -> dict[str, dict[str, Any]]:
    """{reason, "" for kept: {"images", "detections", "sides": histogram (BOX_EDGES) of each
    detection's shorter box side}} of one raw shard."""
    faces = read_columns(faces_url, ["key", "faces"])
    select = read_columns(select_url, ["key", "reason"])
    at = pc.index_in(faces["key"], value_set=select["key"].combine_chunks())
    reasons = pc.fill_null(pc.take(pc.fill_null(select["reason"], ""), at), "(not selected)")
    lists = faces["faces"].combine_chunks()
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    width = pc.subtract(pc.struct_field(flat, "x2"), pc.struct_field(flat, "x1"))
    height = pc.subtract(pc.struct_field(flat, "y2"), pc.struct_field(flat, "y1"))
    sides = pc.min_element_wise(width, height).to_numpy(zero_copy_only=False).astype(np.float64)
    reason_of = np.asarray(reasons.to_pylist(), dtype=object)
    out: dict[str, dict[str, Any]] = {}
    for reason in sorted(set(reason_of.tolist())):
        mine = reason_of[parents] == reason if parents.size else np.zeros(0, bool)
        clipped = np.clip(sides[mine], BOX_EDGES[0], BOX_EDGES[-1])
        out[reason] = {
            "images": int((reason_of == reason).sum()),
            "detections": int(mine.sum()),
            "sides": np.histogram(clipped, bins=BOX_EDGES)[0],
        }
    return out


def face_sizes_by_reason(run_url: str, mapper: Mapper = local_mapper) -> dict[str, dict] | None:
    """face_sizes summed over the raw shards select decided; None when select has no output."""
    layout = RunLayout(run_url)
    shards = [shard_of_file(u) for u in storage.list_files(layout.select_folder, ".parquet")]
    shards = [s for s in shards if storage.exists(layout.faces(s))]
    if not shards:
        return None
    kwargs = [{"faces_url": layout.faces(s), "select_url": layout.select(s)} for s in shards]
    total: dict[str, dict[str, Any]] = {}
    for part in mapper(face_sizes, kwargs):
        for reason, figures in part.items():
            into = total.setdefault(reason, {"images": 0, "detections": 0, "sides": 0})
            for name, value in figures.items():
                into[name] = into[name] + value
    return total
