"""The metadata stage's three shard steps, each a plain function a worker runs.

1. `filter_part` (step `metadata/parts`): the fate of every row of a slice of whole row groups of
   one input file (filters.reason_codes). Writes
       metadata/kept/ID.parquet      `row`: the row numbers kept (before duplicate_url)
       metadata/drops/ID.parquet     DROP_COUNTS rows (stage "metadata", source = the input file,
                                     reason, count), one per reason with a count > 0
       metadata/urlhash/ID.parquet   (dedup_urls) blake2b-128 of each kept URL (h1, h2, row),
                                     sorted, one row group per hash bucket
2. `dedup_bucket` (step `metadata/dupes`): the rows of one hash bucket whose URL an earlier row
   (by part, then row) has. Equal hashes are the same URL (distinct URLs collide with
   probability ~ n^2 / 2^129). Writes metadata/dupes/BBBBB.parquet (part index, row).
3. `write_shards` (step `metadata/shards`): consecutive download shards of exactly
   rows_per_shard rows, read back from the input files (a DuckDB semi-join on the row numbers,
   which decodes captions and URLs only near them), so the kept rows are written once.

`save_list` (step `metadata/lists`) reads an ID list once and saves it as sorted arrays that the
parts tasks load once per worker process.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laionface.config import MetadataSection
from laionface.io import schemas, storage
from laionface.layout import METADATA_REASONS
from laionface.stages.metadata import idlists
from laionface.stages.metadata.filters import reason_codes, select_rows
from laionface.stages.metadata.idlists import IdList
from laionface.stages.metadata.inputs import MetadataError, column_map

NAME = "metadata"
# Dictionary encoding only for the columns with few distinct values: trying it on URLs and
# captions costs time for nothing. Shards are snappy, as DuckDB and img2dataset write parquet:
# zstd made them 30% smaller for 50% more CPU in the shards step.
SHARD_DICTIONARY = ["LICENSE", "NSFW", "source_file"]


def save_list(*, source: str, base_url: str, id_column: str, url_column: str) -> dict:
    """Read the ID/URL list at `source` and save it at `base_url` for the parts tasks."""
    loaded = idlists.read_list(source, id_column=id_column, url_column=url_column)
    idlists.save_list(loaded, base_url)
    return {"items": len(loaded), "ids": len(loaded.ids), "urls": len(loaded.url_hashes)}


def _load_lists(lists: dict[str, dict | None]) -> tuple[IdList | None, IdList | None]:
    loaded = []
    for name in ("id_list", "exclude_list"):
        ref = lists.get(name)
        loaded.append(None if ref is None else idlists.load_saved_list(ref["base"]))
    return loaded[0], loaded[1]


def _hash_buckets(h1: np.ndarray, bits: int) -> np.ndarray:
    """Row offsets where each of the 2^bits buckets starts in sorted `h1`, plus the end."""
    if bits == 0:
        return np.array([0, len(h1)])
    starts = np.arange(1 << bits, dtype=np.uint64) << np.uint64(64 - bits)
    return np.append(np.searchsorted(h1, starts), len(h1))


def _write_url_hashes(hashes: np.ndarray, bits: int, url: str) -> None:
    order = np.lexsort((hashes[:, 1], hashes[:, 0]))  # stable: equal hashes keep row order
    table = pa.table(
        {
            "h1": pa.array(hashes[order, 0], pa.uint64()),
            "h2": pa.array(hashes[order, 1], pa.uint64()),
            "row": pa.array(order.astype(np.int64), pa.int64()),
        },
        schema=schemas.URL_HASHES,
    )
    bounds = _hash_buckets(table.column("h1").to_numpy(), bits)
    with storage.atomic_open(url) as handle, pq.ParquetWriter(handle, table.schema) as writer:
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            # One row group per bucket, empty ones included: bucket k is row group k.
            writer.write_table(
                table.slice(start, stop - start), row_group_size=max(1, stop - start)
            )


def filter_part(
    *,
    source: str,
    file_index: int,
    row_groups: list[int],
    rows: list[int],
    section: MetadataSection,
    lists: dict[str, dict | None],
    kept_url: str,
    drops_url: str,
    hash_url: str,
    hash_bits: int,
) -> dict:
    """Decide the fate of rows [start, stop) (row groups [first, stop)) of `source`."""
    start, stop = rows
    counts = np.zeros(len(METADATA_REASONS) + 1, dtype=np.int64)
    kept_parts = []
    read = 0
    for row_numbers, codes in reason_codes(section, _load_lists(lists), source, start, stop):
        counts += np.bincount(codes, minlength=len(counts))
        kept_parts.append(row_numbers[codes == 0])
        read += len(codes)
    if read != stop - start:
        raise MetadataError(
            f"{source}: {read} rows read from row groups "
            f"{row_groups[0]}..{row_groups[1] - 1}, the footer says {stop - start}; "
            "the file is damaged or truncated"
        )
    kept = np.concatenate(kept_parts) if kept_parts else np.empty(0, np.int64)
    storage.write_parquet(pa.table({"row": kept}, schema=schemas.METADATA_KEPT), kept_url)
    if section.dedup_urls:
        hashes = idlists.EMPTY_HASHES.copy()
        if len(kept):
            urls = select_rows(source, kept, column_map(section.columns), "URL").column("URL")
            hashes = idlists.url_hashes(urls)
        _write_url_hashes(hashes, hash_bits, hash_url)
    dropped = {
        reason: int(counts[i + 1]) for i, reason in enumerate(METADATA_REASONS) if counts[i + 1]
    }
    storage.write_parquet(_drop_table(source, dropped), drops_url)
    return {
        "items": stop - start,
        "source": source,
        "file_index": file_index,
        "row_groups": list(row_groups),
        "input_rows": stop - start,
        "kept_rows": int(counts[0]),
        "dropped": dropped,
    }


def _drop_table(source: str, dropped: dict[str, int]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"stage": NAME, "source": source, "reason": reason, "count": count}
            for reason, count in dropped.items()
            if count
        ],
        schema=schemas.DROP_COUNTS,
    )


def dedup_bucket(
    *, hash_urls: list[str], bucket: int, buckets: int, part_ids: list[str], dupes_url: str
) -> dict:
    """Find the rows whose URL an earlier row (by part, then row) has, among bucket `bucket`."""
    h1s, h2s, parts, rows = [], [], [], []
    for part, url in enumerate(hash_urls):
        fs, path = storage.fs_for(url)
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            if parquet.num_row_groups != buckets:
                raise MetadataError(
                    f"{url}: {parquet.num_row_groups} hash buckets, expected {buckets}; "
                    "re-run the metadata stage"
                )
            table = parquet.read_row_group(bucket)
        h1s.append(table.column("h1").to_numpy())
        h2s.append(table.column("h2").to_numpy())
        rows.append(table.column("row").to_numpy())
        parts.append(np.full(table.num_rows, part, dtype=np.int32))
    h1, h2 = np.concatenate(h1s), np.concatenate(h2s)
    part_of, row_of = np.concatenate(parts), np.concatenate(rows)
    order = np.lexsort((row_of, part_of, h2, h1))
    h1, h2 = h1[order], h2[order]
    repeat = np.zeros(len(order), dtype=bool)
    repeat[1:] = (h1[1:] == h1[:-1]) & (h2[1:] == h2[:-1])
    dup = order[repeat]
    dup = dup[np.lexsort((row_of[dup], part_of[dup]))]
    table = pa.table(
        {"part": pa.array(part_of[dup], pa.int32()), "row": pa.array(row_of[dup], pa.int64())},
        schema=schemas.URL_DUPLICATES,
    )
    storage.write_parquet(table, dupes_url)
    per_part = np.bincount(part_of[dup], minlength=len(hash_urls))
    return {
        "items": int(len(order)),
        "duplicates": int(len(dup)),
        "per_part": {part_ids[p]: int(c) for p, c in enumerate(per_part) if c},
    }


def _duplicate_rows(dupes_urls: list[str], parts: set[int]) -> dict[int, np.ndarray]:
    found: dict[int, list[np.ndarray]] = {p: [] for p in parts}
    wanted = pa.array(sorted(parts), pa.int32())
    for url in dupes_urls:
        table = storage.read_parquet(url)
        table = table.filter(pc.is_in(table.column("part"), value_set=wanted))
        part_of = table.column("part").to_numpy()
        row_of = table.column("row").to_numpy()
        for part in np.unique(part_of):
            found[int(part)].append(row_of[part_of == part])
    return {p: np.sort(np.concatenate(v)) if v else np.empty(0, np.int64) for p, v in found.items()}


def _read_rows(source: str, rows: np.ndarray, mapping: dict[str, str]) -> pa.Table:
    """Rows `rows` (sorted row numbers) of `source`, as DOWNLOAD_SHARD."""
    table = select_rows(source, rows, mapping, ", ".join(schemas.LAION_METADATA.names))
    columns = [table.column(f.name).cast(f.type) for f in schemas.LAION_METADATA]
    columns += [pa.repeat(pa.scalar(source), table.num_rows), table.column("source_row")]
    return pa.Table.from_arrays(columns, schema=schemas.DOWNLOAD_SHARD)


def write_shards(
    *,
    segments: list[dict],
    dupes_urls: list[str],
    columns: dict[str, str],
    shard_sizes: list[int],
    shard_urls: list[str],
) -> dict:
    """Write the shards `shard_urls` (of `shard_sizes` rows) from `segments`: [start, stop) of
    each part's deduplicated kept rows, read from its input file."""
    duplicates = _duplicate_rows(dupes_urls, {s["part"] for s in segments})
    tables = []
    for segment in segments:
        kept = storage.read_parquet(segment["kept_url"]).column("row").to_numpy()
        dup = duplicates.get(segment["part"])
        if dup is not None and len(dup):
            kept = np.delete(kept, dup)
        start, stop = segment["start"], segment["stop"]
        if stop > len(kept):
            raise MetadataError(
                f"{segment['kept_url']}: {len(kept)} rows after dedup, the plan expected at "
                f"least {stop}; re-run the metadata stage"
            )
        if stop > start:
            tables.append(_read_rows(segment["source"], kept[start:stop], columns))
    rows = pa.concat_tables(tables) if tables else schemas.DOWNLOAD_SHARD.empty_table()
    if rows.num_rows != sum(shard_sizes):
        raise MetadataError(
            f"{shard_urls[0]} and after: the parts held {rows.num_rows} rows, the plan "
            f"{sum(shard_sizes)}; re-run the metadata stage"
        )
    offset = 0
    for url, size in zip(shard_urls, shard_sizes, strict=True):
        shard = rows.slice(offset, size).combine_chunks()
        with storage.atomic_open(url) as handle:
            pq.write_table(shard, handle, compression="snappy", use_dictionary=SHARD_DICTIONARY)
        offset += size
    return {"items": offset, "shards": len(shard_sizes)}


def count_shared_ids(*, shard_urls: list[str], bucket: int, buckets: int) -> dict:
    """The SAMPLE_IDs that several rows of the download shards share, among the IDs of one hash
    bucket (ID mod buckets): LAION's SAMPLE_ID is not a unique key. Returns how many IDs are
    shared, by how many rows, and a few of them."""
    parts = []
    for url in shard_urls:
        column = storage.read_parquet(url, columns=["SAMPLE_ID"]).column("SAMPLE_ID")
        ids = pc.drop_null(column).to_numpy().astype(np.int64)
        parts.append(ids[ids.view(np.uint64) % np.uint64(buckets) == bucket])
    ids = np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)
    values, counts = np.unique(ids, return_counts=True)
    shared = counts > 1
    return {
        "items": int(ids.size),
        "shared_ids": int(shared.sum()),
        "rows": int(counts[shared].sum()),
        "examples": values[shared][:5].tolist(),
    }
