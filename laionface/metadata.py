"""The metadata stage: LAION-format parquet in, download shards out.

Inputs are `metadata.input` (paths, globs, folders or fsspec URLs; a folder means every
`*.parquet` below it), in the order given, each glob and folder sorted by name. Column names come
from `metadata.columns` (LAION-400M's by default); outputs always use LAION's names and types
(`schemas.DOWNLOAD_SHARD`).

Each row dropped is counted once, under the first of these filters that drops it (a null in a
column a filter reads fails that filter):

    reason             setting            drops a row when
    null_url           (always)           URL is null or empty
    null_caption       (always)           TEXT is null
    id_list            id_list            neither its SAMPLE_ID nor its URL is in the list
    exclude_list       exclude_list       its SAMPLE_ID or its URL is in the list
    url_scheme         url_schemes        URL does not start with an allowed `scheme://` ([] = any)
    blocked_domain     blocked_domains    URL's host is a blocked domain or a subdomain of one
    nsfw               nsfw               NSFW is not one of the allowed values (any case)
    min_similarity     min_similarity     similarity < min_similarity
    min_side           min_side           min(WIDTH, HEIGHT) < min_side (LAION often swaps them)
    max_side           max_side           max(WIDTH, HEIGHT) > max_side
    max_aspect_ratio   max_aspect_ratio   max(W, H) / min(W, H) > max_aspect_ratio, or a side is 0
    min_caption_chars  min_caption_chars  TEXT has fewer characters
    max_caption_chars  max_caption_chars  TEXT has more characters
    duplicate_url      dedup_urls         an earlier row (input file order, then row order) that
                                          passed every filter above has the same URL, byte for byte

Steps, each a `ctx.map_shards` step (resumable shard by shard), then a few driver-side files:

1. `metadata/parts`: one task per input file slice of whole row groups (about TASK_ROWS rows;
   a row group is never split). It streams its row groups in batches of READ_BATCH_ROWS, so its
   memory is bounded by a batch and the rows it keeps, never by the file. Part id `FFFFF-GGGGG`
   (input file index, first row group). Writes
       metadata/parts/ID.parquet     the kept rows (DOWNLOAD_SHARD), in input order
       metadata/drops/ID.parquet     DROP_COUNTS rows (stage "metadata", source = the input file,
                                     reason, count), one per reason with a count > 0
       metadata/urlhash/ID.parquet   (dedup_urls) blake2b-128 of each kept URL (h1, h2, row),
                                     sorted, one row group per hash bucket
   Stats: items (= input_rows), source, file_index, row_groups [first, stop), input_rows,
   kept_rows (before duplicate_url), dropped {reason: count}.
2. `metadata/dupes` (dedup_urls): one task per hash bucket (the top bits of h1; 2^k buckets of
   about DEDUP_BUCKET_ROWS input rows at most, so memory stays bounded at any scale). Equal
   hashes are the same URL (distinct URLs collide with probability ~ n^2 / 2^129); the first
   by (part, row) is kept. Writes metadata/dupes/BBBBB.parquet (part index, row) of the rows
   dropped. Stats: items (rows in the bucket), duplicates, per_part {part id: count}.
3. `metadata/shards`: deduplicated kept rows, in (input file, row) order, cut into shards of
   exactly rows_per_shard rows (the last one shorter): metadata/shards/NNNNN.parquet
   (DOWNLOAD_SHARD). A task writes about SHARD_TASK_ROWS rows worth of consecutive shards.
   Stats: items (rows written), shards.
4. The driver writes metadata/drops/duplicate_url.parquet (DROP_COUNTS per input file),
   metadata/inputs.parquet (METADATA_INPUTS: per input file, input_rows = kept_rows +
   dropped_rows, checked before it is written) and metadata/summary.json (input_files,
   input_rows, kept_rows, dropped {reason: count}, shards, rows_per_shard, reasons: the order
   above), and removes files that an earlier plan left behind (shards past the new count, parts
   of inputs no longer listed). The audit sums metadata/drops/*.parquet by (source, reason).

The ID lists are read once on the driver (`idlists.read_list`) and saved as sorted arrays under
metadata/lists/, which the workers load once per process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from laionface import idlists, schemas, storage
from laionface.config import ConfigError, MetadataColumns, MetadataSection
from laionface.idlists import IdList
from laionface.runner import ShardTask, StageContext

log = logging.getLogger("laionface")

REASONS = (
    "null_url",
    "null_caption",
    "id_list",
    "exclude_list",
    "url_scheme",
    "blocked_domain",
    "nsfw",
    "min_similarity",
    "min_side",
    "max_side",
    "max_aspect_ratio",
    "min_caption_chars",
    "max_caption_chars",
    "duplicate_url",
)
STAGE = "metadata"
# Rows a parts task reads (whole row groups: one larger row group is one task on its own).
TASK_ROWS = 1_000_000
# Rows decoded at a time; the peak memory of a task is a few of these batches.
READ_BATCH_ROWS = 131_072
# Kept rows gathered before they are written as one row group of a part.
WRITE_BATCH_ROWS = 131_072
# Input rows per dedup bucket at most (kept rows are fewer): ~40 bytes each in a dedup task.
DEDUP_BUCKET_ROWS = 8_000_000
# Rows of consecutive shards written by one shards task.
SHARD_TASK_ROWS = 200_000
# Dictionary encoding only for the columns with few distinct values: trying it on URLs and
# captions costs time for nothing. Parts, read once by the shards step, are lz4; shards zstd.
PART_DICTIONARY = ["LICENSE", "NSFW", "source_file"]
SHARD_DIGITS = 5  # img2dataset's shard numbering, which the download stage keeps

# metadata.columns field -> LAION name, in DOWNLOAD_SHARD order.
LAION_NAMES = {
    "sample_id": "SAMPLE_ID",
    "url": "URL",
    "text": "TEXT",
    "height": "HEIGHT",
    "width": "WIDTH",
    "license": "LICENSE",
    "nsfw": "NSFW",
    "similarity": "similarity",
}
_HOST = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^@/?#]*@)?(?P<host>[^:/?#]*)"


class MetadataError(ConfigError):
    """Metadata input that can't be used; the message names the file, the column and the fix."""


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class InputFile:
    url: str
    row_group_rows: tuple[int, ...]
    signature: str  # size and modification time: a changed file redoes its parts

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def resolve_inputs(patterns: list[str]) -> list[str]:
    """The input files, in config order; globs and folders sorted; each file once."""
    if not patterns:
        raise MetadataError(
            "metadata.input is empty: give parquet files, globs, folders or URLs, e.g. "
            'input = ["laion400m-meta/*.parquet"]'
        )
    urls: list[str] = []
    for pattern in patterns:
        fs, path = storage.fs_for(pattern)
        if _has_magic(path):
            found = sorted(p for p in fs.glob(path) if fs.isfile(p))
        elif fs.isdir(path):
            found = sorted(
                p
                for p in fs.find(path)
                if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_"))
            )
        elif fs.exists(path):
            found = [path]
        else:
            raise MetadataError(f"metadata.input: {pattern!r} does not exist")
        if not found:
            raise MetadataError(f"metadata.input: {pattern!r} matches no parquet files")
        local = isinstance(fs, LocalFileSystem)
        urls += [p if local else fs.unstrip_protocol(p) for p in found]
    return list(dict.fromkeys(urls))


def _signature(url: str) -> str:
    fs, path = storage.fs_for(url)
    info = fs.info(path)
    changed = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
    changed = changed or info.get("created") or ""
    return f"{info.get('size')}:{changed}"


def _type_kind(arrow_type: pa.DataType) -> str:
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_integer(arrow_type):
        return "integer"
    if pa.types.is_floating(arrow_type):
        return "float"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    if str(arrow_type) == "string_view":  # pyarrow >= 16
        return "string"
    return str(arrow_type)


_ACCEPTED_KINDS = {
    "SAMPLE_ID": ("integer",),
    "URL": ("string",),
    "TEXT": ("string",),
    "HEIGHT": ("integer", "float"),
    "WIDTH": ("integer", "float"),
    "LICENSE": ("string",),
    "NSFW": ("string",),
    "similarity": ("integer", "float"),
}


def column_map(columns: MetadataColumns) -> dict[str, str]:
    """LAION name -> input column name ("" for a column the input lacks)."""
    return {laion: getattr(columns, field) for field, laion in LAION_NAMES.items()}


def inspect_input(url: str, columns: MetadataColumns) -> InputFile:
    """Read a file's footer: its row groups, and that every mapped column exists with a usable type."""
    fs, path = storage.fs_for(url)
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            schema = parquet.schema_arrow
            rows = tuple(
                parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)
            )
    except FileNotFoundError:
        raise MetadataError(f"{url}: metadata input not found") from None
    except (pa.ArrowException, OSError) as exc:
        raise MetadataError(
            f"{url}: not a readable parquet file ({exc}); is it truncated or another format?"
        ) from None
    names = schema.names
    for field, laion in LAION_NAMES.items():
        name = getattr(columns, field)
        if not name:
            continue
        if name not in names:
            raise MetadataError(
                f"{url}: no column {name!r} (metadata.columns.{field}); the file has columns "
                f"{', '.join(names)}. Set metadata.columns.{field} to the column holding "
                f"{laion}" + ("" if field in ("url", "text") else ', or "" if there is none')
            )
        kind = _type_kind(schema.field(name).type)
        if kind not in _ACCEPTED_KINDS[laion]:
            raise MetadataError(
                f"{url}: column {name!r} (metadata.columns.{field}) is {schema.field(name).type}; "
                f"{laion} must be {' or '.join(_ACCEPTED_KINDS[laion])}"
            )
    return InputFile(url=url, row_group_rows=rows, signature=_signature(url))


def inspect_inputs(urls: list[str], columns: MetadataColumns) -> list[InputFile]:
    # Footers are small reads, slow only on object stores: read them side by side.
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(urls)))) as pool:
        return list(pool.map(lambda u: inspect_input(u, columns), urls))


# ---------------------------------------------------------------------------------------------
# Column coercion and the filters


def _coerce(array: pa.Array, target: pa.DataType, source: str, name: str) -> pa.Array:
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if array.type == target:
        return array
    try:
        if pa.types.is_integer(target) and pa.types.is_floating(array.type):
            finite = pc.is_finite(array)
            array = pc.floor(pc.if_else(finite, array, pa.scalar(None, array.type)))
        return pc.cast(array, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise MetadataError(
            f"{source}: column {name!r} does not convert to {target}: {exc}"
        ) from None


def to_laion(batch: pa.RecordBatch, mapping: dict[str, str], source: str) -> pa.RecordBatch:
    """The batch under LAION's names and types; columns the input lacks are null."""
    arrays = []
    for field in schemas.LAION_METADATA:
        name = mapping[field.name]
        if name:
            arrays.append(_coerce(batch.column(name), field.type, source, name))
        else:
            arrays.append(pa.nulls(batch.num_rows, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schemas.LAION_METADATA)


def _as_bool(mask: pa.Array) -> np.ndarray:
    """A boolean numpy array; null (an unknown value) counts as failing the filter."""
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)


class _Rows:
    """The rows of a batch still in, with their columns taken lazily and URL hashes memoized."""

    def __init__(self, batch: pa.RecordBatch):
        self.batch = batch
        self.index: np.ndarray | None = None  # None: all rows
        self._columns: dict[str, pa.Array] = {}
        self._hashes = np.zeros((batch.num_rows, 2), dtype=np.uint64)
        self._hashed = np.zeros(batch.num_rows, dtype=bool)

    def __len__(self) -> int:
        return self.batch.num_rows if self.index is None else len(self.index)

    def positions(self) -> np.ndarray:
        return np.arange(self.batch.num_rows) if self.index is None else self.index

    def column(self, name: str) -> pa.Array:
        if name not in self._columns:
            column = self.batch.column(name)
            self._columns[name] = column if self.index is None else column.take(self.index)
        return self._columns[name]

    def url_hashes(self) -> np.ndarray:
        positions = self.positions()
        todo = positions[~self._hashed[positions]]
        if len(todo):
            urls = self.batch.column("URL").take(todo)
            self._hashes[todo] = idlists.url_hashes(urls)
            self._hashed[todo] = True
        return self._hashes[positions]

    def keep(self, ok: np.ndarray) -> np.ndarray:
        """Keep the rows where `ok`; returns the batch positions of the rows dropped."""
        positions = self.positions()
        dropped = positions[~ok]
        self.index = positions[ok]
        # Taken again on demand: after a selective filter that copies far fewer bytes than
        # filtering every column taken so far.
        self._columns = {}
        return dropped


def _in_list(rows: _Rows, id_list: IdList) -> np.ndarray:
    match = np.zeros(len(rows), dtype=bool)
    if len(id_list.ids):
        ids = rows.column("SAMPLE_ID")
        values = pc.fill_null(ids, 0).to_numpy(zero_copy_only=False)
        match |= id_list.contains_ids(values) & _as_bool(pc.is_valid(ids))
    if len(id_list.url_hashes):
        match |= idlists.contains_hashes(id_list.url_hashes, rows.url_hashes())
    return match


def _blocked(urls: pa.Array, domains: pa.Array) -> np.ndarray:
    host = pc.struct_field(pc.extract_regex(urls, _HOST), "host")
    host = pc.utf8_rtrim(pc.utf8_lower(host), ".")
    blocked = _as_bool(pc.is_in(host, value_set=domains))
    # Walk up the labels: a.b.example.com -> b.example.com -> example.com -> com.
    while True:
        host = pc.replace_substring_regex(host, r"^[^.]*(\.|$)", "", max_replacements=1)
        if not pc.any(pc.not_equal(host, "")).as_py():
            return blocked
        blocked |= _as_bool(pc.is_in(host, value_set=domains))


def _short_side(rows: _Rows) -> pa.Array:
    return pc.min_element_wise(rows.column("WIDTH"), rows.column("HEIGHT"), skip_nulls=False)


def _long_side(rows: _Rows) -> pa.Array:
    return pc.max_element_wise(rows.column("WIDTH"), rows.column("HEIGHT"), skip_nulls=False)


def _any_prefix(urls: pa.Array, prefixes: list[str]) -> np.ndarray:
    ok = np.zeros(len(urls), dtype=bool)
    for prefix in prefixes:
        ok |= _as_bool(pc.starts_with(urls, prefix, ignore_case=True))
    return ok


def _aspect_ok(rows: _Rows, ratio: float) -> np.ndarray:
    short = pc.cast(_short_side(rows), pa.float64())
    long = pc.cast(_long_side(rows), pa.float64())
    return _as_bool(pc.and_(pc.greater(short, 0), pc.less_equal(long, pc.multiply(short, ratio))))


def _caption_chars(rows: _Rows) -> pa.Array:
    return pc.utf8_length(rows.column("TEXT"))


# reason -> check(rows, setting): a numpy bool per row still in, True where the row passes.
_CHECKS = {
    "null_url": lambda r, _: _as_bool(pc.greater(pc.binary_length(r.column("URL")), 0)),
    "null_caption": lambda r, _: _as_bool(pc.is_valid(r.column("TEXT"))),
    "id_list": lambda r, id_list: _in_list(r, id_list),
    "exclude_list": lambda r, exclude: ~_in_list(r, exclude),
    "url_scheme": lambda r, prefixes: _any_prefix(r.column("URL"), prefixes),
    "blocked_domain": lambda r, domains: ~_blocked(r.column("URL"), domains),
    "nsfw": lambda r, allowed: _as_bool(pc.is_in(pc.utf8_upper(r.column("NSFW")), allowed)),
    "min_similarity": lambda r, low: _as_bool(pc.greater_equal(r.column("similarity"), low)),
    "min_side": lambda r, low: _as_bool(pc.greater_equal(_short_side(r), low)),
    "max_side": lambda r, high: _as_bool(pc.less_equal(_long_side(r), high)),
    "max_aspect_ratio": _aspect_ok,
    "min_caption_chars": lambda r, low: _as_bool(pc.greater_equal(_caption_chars(r), low)),
    "max_caption_chars": lambda r, high: _as_bool(pc.less_equal(_caption_chars(r), high)),
}


class RowFilter:
    """The filters of a [metadata] section, in REASONS order, applied to LAION-named batches."""

    def __init__(self, section: MetadataSection, id_list: IdList | None, exclude: IdList | None):
        s = section
        settings: dict[str, Any] = {
            "null_url": True,
            "null_caption": True,
            "id_list": id_list,
            "exclude_list": exclude,
            "url_scheme": [f"{scheme}://" for scheme in s.url_schemes] or None,
            "blocked_domain": pa.array(s.blocked_domains, pa.string())
            if s.blocked_domains
            else None,
            "nsfw": pa.array([v.upper() for v in s.nsfw], pa.string()) if s.nsfw else None,
            "min_similarity": s.min_similarity,
            "min_side": s.min_side,
            "max_side": s.max_side,
            "max_aspect_ratio": s.max_aspect_ratio,
            "min_caption_chars": s.min_caption_chars,
            "max_caption_chars": s.max_caption_chars,
        }
        self.checks = [
            (REASONS.index(reason) + 1, _CHECKS[reason], setting)
            for reason, setting in settings.items()
            if setting is not None
        ]

    def apply(self, batch: pa.RecordBatch) -> tuple[np.ndarray, _Rows]:
        """Per row the index+1 in REASONS of the filter that drops it (0 = kept), and the kept rows."""
        codes = np.zeros(batch.num_rows, dtype=np.int8)
        rows = _Rows(batch)
        for code, check, setting in self.checks:
            if len(rows) == 0:
                break
            ok = check(rows, setting)
            if not ok.all():
                codes[rows.keep(ok)] = code
        return codes, rows


# ---------------------------------------------------------------------------------------------
# Step 1: filter a slice of an input file into a part


def _load_lists(lists: dict[str, dict | None]) -> tuple[IdList | None, IdList | None]:
    loaded = []
    for name in ("id_list", "exclude_list"):
        ref = lists.get(name)
        loaded.append(None if ref is None else idlists.load_saved_list(ref["base"], ref["token"]))
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
        }
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
    first_row: int,
    section: MetadataSection,
    lists: dict[str, dict | None],
    part_url: str,
    drops_url: str,
    hash_url: str,
    hash_bits: int,
) -> dict:
    """Filter row groups [first, stop) of `source` (whose first row is `first_row`) into a part."""
    id_list, exclude = _load_lists(lists)
    row_filter = RowFilter(section, id_list, exclude)
    mapping = column_map(section.columns)
    read_columns = list(dict.fromkeys(name for name in mapping.values() if name))
    counts = np.zeros(len(REASONS) + 1, dtype=np.int64)
    kept_hashes: list[np.ndarray] = []
    pending: list[pa.Table] = []
    pending_rows = 0
    row = first_row
    fs, path = storage.fs_for(source)
    with (
        fs.open(path, "rb") as handle,
        storage.atomic_open(part_url) as out,
        pq.ParquetWriter(
            out, schemas.DOWNLOAD_SHARD, compression="lz4", use_dictionary=PART_DICTIONARY
        ) as writer,
    ):
        try:
            parquet = pq.ParquetFile(handle, buffer_size=1 << 20)
            batches = parquet.iter_batches(
                batch_size=READ_BATCH_ROWS,
                row_groups=list(range(*row_groups)),
                columns=read_columns,
                use_threads=False,
            )
            for raw in batches:
                batch = to_laion(raw, mapping, source)
                codes, kept = row_filter.apply(batch)
                counts += np.bincount(codes, minlength=len(counts))
                positions = kept.positions()
                if len(positions):
                    table = pa.Table.from_batches([batch]).take(positions)
                    table = table.append_column(
                        "source_file", pa.repeat(pa.scalar(source), len(positions))
                    ).append_column("source_row", pa.array(positions + row, pa.int64()))
                    pending.append(table)
                    pending_rows += len(positions)
                    if section.dedup_urls:
                        kept_hashes.append(kept.url_hashes())
                if pending_rows >= WRITE_BATCH_ROWS:
                    writer.write_table(pa.concat_tables(pending).cast(schemas.DOWNLOAD_SHARD))
                    pending, pending_rows = [], 0
                row += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise MetadataError(
                f"{source}: row groups {row_groups[0]}..{row_groups[1] - 1} can't be read "
                f"({exc}); the file is damaged or truncated"
            ) from None
        if pending:
            writer.write_table(pa.concat_tables(pending).cast(schemas.DOWNLOAD_SHARD))
    if section.dedup_urls:
        hashes = np.concatenate(kept_hashes) if kept_hashes else idlists.EMPTY_HASHES
        _write_url_hashes(hashes, hash_bits, hash_url)
    dropped = {reason: int(counts[i + 1]) for i, reason in enumerate(REASONS) if counts[i + 1]}
    storage.write_parquet(_drop_table(source, dropped), drops_url)
    input_rows = row - first_row
    return {
        "items": input_rows,
        "source": source,
        "file_index": file_index,
        "row_groups": list(row_groups),
        "input_rows": input_rows,
        "kept_rows": int(counts[0]),
        "dropped": dropped,
    }


def _drop_table(source: str, dropped: dict[str, int]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"stage": STAGE, "source": source, "reason": reason, "count": count}
            for reason, count in dropped.items()
            if count
        ],
        schema=schemas.DROP_COUNTS,
    )


# ---------------------------------------------------------------------------------------------
# Step 2: duplicate URLs, one hash bucket at a time


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
        {"part": pa.array(part_of[dup], pa.int32()), "row": pa.array(row_of[dup], pa.int64())}
    )
    storage.write_parquet(table, dupes_url)
    per_part = np.bincount(part_of[dup], minlength=len(hash_urls))
    return {
        "items": int(len(order)),
        "duplicates": int(len(dup)),
        "per_part": {part_ids[p]: int(c) for p, c in enumerate(per_part) if c},
    }


# ---------------------------------------------------------------------------------------------
# Step 3: cut the kept rows into download shards


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


def write_shards(
    *,
    segments: list[dict],
    dupes_urls: list[str],
    first_shard: int,
    shard_sizes: list[int],
    shards_url: str,
) -> dict:
    """Write shards first_shard.. from `segments`: [start, stop) of each part's deduplicated rows."""
    duplicates = _duplicate_rows(dupes_urls, {s["part"] for s in segments})
    sizes = list(shard_sizes)
    number = first_shard
    pending: list[pa.Table] = []
    pending_rows = written = 0
    for segment in segments:
        table = storage.read_parquet(segment["url"])
        dup = duplicates.get(segment["part"])
        if dup is not None and len(dup):
            keep = np.ones(table.num_rows, dtype=bool)
            keep[dup] = False
            table = table.filter(pa.array(keep))
        start, stop = segment["start"], segment["stop"]
        if stop > table.num_rows:
            raise MetadataError(
                f"{segment['url']}: {table.num_rows} rows after dedup, the plan expected at least "
                f"{stop}; re-run the metadata stage"
            )
        pending.append(table.slice(start, stop - start))
        pending_rows += stop - start
        while sizes and pending_rows >= sizes[0]:
            combined = pa.concat_tables(pending)
            size = sizes.pop(0)
            shard = combined.slice(0, size).combine_chunks()
            with storage.atomic_open(storage.join(shards_url, _shard_name(number))) as handle:
                pq.write_table(shard, handle, compression="zstd", use_dictionary=PART_DICTIONARY)
            number += 1
            written += size
            pending = [combined.slice(size)]
            pending_rows -= size
    if sizes or pending_rows:
        raise MetadataError(
            f"shards {first_shard}..: the parts held {written + pending_rows} rows, the plan "
            f"{sum(shard_sizes)}; re-run the metadata stage"
        )
    return {"items": written, "shards": number - first_shard}


def _shard_name(number: int) -> str:
    return f"{number:0{SHARD_DIGITS}d}.parquet"


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass(frozen=True)
class PartPlan:
    id: str
    index: int
    file_index: int
    source: str
    row_groups: tuple[int, int]
    first_row: int


def plan_parts(files: list[InputFile], task_rows: int) -> list[PartPlan]:
    """Slices of whole row groups of about task_rows rows; every file has at least one."""
    plans: list[PartPlan] = []
    for file_index, info in enumerate(files):
        start = 0
        first_row = row = 0
        for group, rows in enumerate(info.row_group_rows):
            if group > start and row - first_row + rows > task_rows:
                plans.append(_part(len(plans), file_index, info.url, start, group, first_row))
                start, first_row = group, row
            row += rows
        plans.append(
            _part(len(plans), file_index, info.url, start, len(info.row_group_rows), first_row)
        )
    return plans


def _part(index: int, file_index: int, source: str, start: int, stop: int, first_row: int):
    return PartPlan(
        id=f"{file_index:05d}-{start:05d}",
        index=index,
        file_index=file_index,
        source=source,
        row_groups=(start, stop),
        first_row=first_row,
    )


def _digest(*items: Any) -> str:
    blob = json.dumps(items, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _prepare_list(ctx: StageContext, name: str, source: str) -> dict | None:
    """Read an ID list once and save it under metadata/lists/ for the workers; None when unset."""
    base = ctx.path(STAGE, "lists", name)
    if not source:
        for suffix in (".json", ".ids.npy", ".urls.npy"):
            storage.remove(base + suffix)
        return None
    columns = ctx.config.metadata.columns
    try:
        signature = _signature(source)
    except FileNotFoundError:
        raise idlists.IdListError(f"{source}: metadata.{name} not found") from None
    wanted = {
        "source": source,
        "signature": signature,
        "id_column": columns.sample_id,
        "url_column": columns.url,
    }
    meta_url = base + ".json"
    meta = storage.read_json(meta_url) if storage.exists(meta_url) else {}
    if {k: meta.get(k) for k in wanted} != wanted:
        loaded = idlists.read_list(source, id_column=columns.sample_id, url_column=columns.url)
        idlists.save_list(loaded, base)
        meta = {**wanted, "ids": len(loaded.ids), "urls": len(loaded.url_hashes)}
        storage.write_json(meta_url, meta)
    if meta["ids"] and not columns.sample_id:
        raise MetadataError(
            f"{source}: metadata.{name} holds SAMPLE_IDs but metadata.columns.sample_id is empty"
        )
    log.info(
        "metadata.%s: %s SAMPLE_IDs and %s URLs from %s",
        name,
        f"{meta['ids']:,}",
        f"{meta['urls']:,}",
        source,
    )
    return {"base": base, "token": _digest(wanted), "ids": meta["ids"], "urls": meta["urls"]}


def _remove_except(folder: str, keep: set[str]) -> None:
    for url in storage.list_files(folder, ".parquet"):
        if posixpath.basename(url)[: -len(".parquet")] not in keep:
            storage.remove(url)


def _shard_tasks(
    parts: list[PartPlan], final_rows: list[int], part_urls: list[str], dupes_urls: list[str], ctx
) -> tuple[list[ShardTask], int]:
    rows_per_shard = ctx.config.metadata.rows_per_shard
    total = sum(final_rows)
    n_shards = math.ceil(total / rows_per_shard)
    offsets = np.concatenate([[0], np.cumsum(final_rows)]).tolist()
    per_task = max(1, SHARD_TASK_ROWS // rows_per_shard)
    tasks = []
    for first in range(0, n_shards, per_task):
        last = min(first + per_task, n_shards)
        begin, end = first * rows_per_shard, min(last * rows_per_shard, total)
        segments = [
            {
                "part": p.index,
                "url": part_urls[p.index],
                "start": max(begin, offsets[p.index]) - offsets[p.index],
                "stop": min(end, offsets[p.index + 1]) - offsets[p.index],
            }
            for p in parts
            if offsets[p.index] < end and offsets[p.index + 1] > begin
        ]
        sizes = [min(rows_per_shard, total - n * rows_per_shard) for n in range(first, last)]
        tasks.append(
            ShardTask(
                f"{first:0{SHARD_DIGITS}d}-{last - 1:0{SHARD_DIGITS}d}",
                dict(
                    segments=segments,
                    dupes_urls=dupes_urls,
                    first_shard=first,
                    shard_sizes=sizes,
                    shards_url=ctx.path(STAGE, "shards"),
                ),
            )
        )
    return tasks, n_shards


def run(ctx: StageContext) -> None:
    section = ctx.config.metadata
    files = inspect_inputs(resolve_inputs(section.input), section.columns)
    lists = {
        name: _prepare_list(ctx, name, getattr(section, name))
        for name in ("id_list", "exclude_list")
    }
    parts = plan_parts(files, TASK_ROWS)
    total_input = sum(f.num_rows for f in files)
    hash_bits = max(0, math.ceil(math.log2(max(1, total_input) / DEDUP_BUCKET_ROWS)))
    parts_fp = _digest(
        section.model_dump(exclude={"rows_per_shard"}),
        [(f.url, f.signature) for f in files],
        {k: v and v["token"] for k, v in lists.items()},
        TASK_ROWS,
        hash_bits,
    )
    folder = {
        name: ctx.path(STAGE, name) for name in ("parts", "drops", "urlhash", "dupes", "shards")
    }
    ids = {p.id for p in parts}
    _remove_except(folder["parts"], ids)
    _remove_except(folder["drops"], ids | ({"duplicate_url"} if section.dedup_urls else set()))
    _remove_except(folder["urlhash"], ids if section.dedup_urls else set())
    part_urls = [storage.join(folder["parts"], f"{p.id}.parquet") for p in parts]
    hash_urls = [storage.join(folder["urlhash"], f"{p.id}.parquet") for p in parts]
    tasks = [
        ShardTask(
            p.id,
            dict(
                source=p.source,
                file_index=p.file_index,
                row_groups=list(p.row_groups),
                first_row=p.first_row,
                section=section,
                lists=lists,
                part_url=part_urls[p.index],
                drops_url=storage.join(folder["drops"], f"{p.id}.parquet"),
                hash_url=hash_urls[p.index],
                hash_bits=hash_bits,
            ),
        )
        for p in parts
    ]
    part_stats = ctx.map_shards(
        f"{STAGE}/parts", filter_part, tasks, fingerprint=parts_fp, unit="rows"
    )
    kept = [int(part_stats[p.id]["kept_rows"]) for p in parts]

    duplicates = [0] * len(parts)
    dupes_urls: list[str] = []
    dedup_fp = _digest(parts_fp, kept)
    if section.dedup_urls:
        buckets = 1 << hash_bits
        names = [f"{b:05d}" for b in range(buckets)]
        _remove_except(folder["dupes"], set(names))
        dupes_urls = [storage.join(folder["dupes"], f"{n}.parquet") for n in names]
        dedup_tasks = [
            ShardTask(
                name,
                dict(
                    hash_urls=hash_urls,
                    bucket=b,
                    buckets=buckets,
                    part_ids=[p.id for p in parts],
                    dupes_url=dupes_urls[b],
                ),
            )
            for b, name in enumerate(names)
        ]
        dedup_stats = ctx.map_shards(
            f"{STAGE}/dupes", dedup_bucket, dedup_tasks, fingerprint=dedup_fp, unit="rows"
        )
        position = {p.id: p.index for p in parts}
        for stats in dedup_stats.values():
            for part_id, count in stats["per_part"].items():
                duplicates[position[part_id]] += int(count)
    else:
        _remove_except(folder["dupes"], set())

    final_rows = [k - d for k, d in zip(kept, duplicates, strict=True)]
    shard_tasks, n_shards = _shard_tasks(parts, final_rows, part_urls, dupes_urls, ctx)
    shards_fp = _digest(dedup_fp, duplicates, section.rows_per_shard)
    ctx.map_shards(f"{STAGE}/shards", write_shards, shard_tasks, fingerprint=shards_fp, unit="rows")
    _remove_except(folder["shards"], {_shard_name(n)[: -len(".parquet")] for n in range(n_shards)})
    _write_summary(ctx, files, parts, part_stats, duplicates, final_rows, n_shards)


def _write_summary(ctx, files, parts, part_stats, duplicates, final_rows, n_shards) -> None:
    section = ctx.config.metadata
    per_file: list[dict[str, Any]] = [
        {"source": f.url, "input_rows": 0, "kept_rows": 0, "dropped": {}} for f in files
    ]
    for part in parts:
        stats = part_stats[part.id]
        entry = per_file[part.file_index]
        entry["input_rows"] += int(stats["input_rows"])
        entry["kept_rows"] += final_rows[part.index]
        for reason, count in stats["dropped"].items():
            entry["dropped"][reason] = entry["dropped"].get(reason, 0) + int(count)
        if duplicates[part.index]:
            entry["dropped"]["duplicate_url"] = (
                entry["dropped"].get("duplicate_url", 0) + duplicates[part.index]
            )
    for info, entry in zip(files, per_file, strict=True):
        dropped = sum(entry["dropped"].values())
        if entry["input_rows"] != info.num_rows or entry["kept_rows"] + dropped != info.num_rows:
            raise RuntimeError(
                f"{info.url}: {info.num_rows} rows in the file, {entry['input_rows']} read, "
                f"{entry['kept_rows']} kept + {dropped} dropped: the metadata stage lost rows"
            )
    if section.dedup_urls:
        dup_rows = [
            {
                "stage": STAGE,
                "source": e["source"],
                "reason": "duplicate_url",
                "count": e["dropped"]["duplicate_url"],
            }
            for e in per_file
            if e["dropped"].get("duplicate_url")
        ]
        storage.write_parquet(
            pa.Table.from_pylist(dup_rows, schema=schemas.DROP_COUNTS),
            ctx.path(STAGE, "drops", "duplicate_url.parquet"),
        )
    inputs = pa.Table.from_pylist(
        [
            {
                "source": e["source"],
                "input_rows": e["input_rows"],
                "kept_rows": e["kept_rows"],
                "dropped_rows": sum(e["dropped"].values()),
            }
            for e in per_file
        ],
        schema=schemas.METADATA_INPUTS,
    )
    storage.write_parquet(inputs, ctx.path(STAGE, "inputs.parquet"))
    dropped_total = {
        reason: sum(e["dropped"].get(reason, 0) for e in per_file) for reason in REASONS
    }
    dropped_total = {k: v for k, v in dropped_total.items() if v}
    summary = {
        "input_files": len(files),
        "input_rows": sum(e["input_rows"] for e in per_file),
        "kept_rows": sum(final_rows),
        "dropped": dropped_total,
        "shards": n_shards,
        "rows_per_shard": section.rows_per_shard,
        "reasons": list(REASONS),
    }
    storage.write_json(ctx.path(STAGE, "summary.json"), summary)
    ctx.run.stage(STAGE).update(
        input_rows=summary["input_rows"], kept_rows=summary["kept_rows"], shards=n_shards
    )
    ctx.run.save()
    log.info(
        "metadata: %s rows in %d file(s) -> %s kept in %d shard(s); dropped: %s",
        f"{summary['input_rows']:,}",
        len(files),
        f"{summary['kept_rows']:,}",
        n_shards,
        ", ".join(f"{k} {v:,}" for k, v in dropped_total.items()) or "none",
    )
    if summary["input_rows"] and not summary["kept_rows"]:
        log.warning("metadata: no row passed the filters (the counts per reason are above)")
