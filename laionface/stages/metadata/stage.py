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
   a row group is never split). One DuckDB query (`reason_codes`) reads the columns the filters
   need and gives every row the code of the first filter that drops it; the ID and URL lists
   are looked up in numpy between the two halves of the order above (`idlists.IdList`). DuckDB
   streams the file by row group, so a task's memory is a few bytes per row of its slice, never
   the file. Part id `FFFFF-GGGGG` (input file index, first row group). Writes
       metadata/kept/ID.parquet      `row`: the row numbers kept (before duplicate_url)
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
   (DOWNLOAD_SHARD). A task writes consecutive shards (SHARD_TASK_ROWS rows at most, and at
   least MIN_SHARD_TASKS tasks): it reads just those rows back from the input files (a DuckDB
   semi-join on the row numbers, which decodes captions and URLs only near them), so the kept
   rows are written once. Stats: items (rows written), shards.
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

import contextlib
import hashlib
import json
import logging
import math
import posixpath
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from laionface.config import ConfigError, MetadataColumns, MetadataSection
from laionface.engine.runner import ShardTask, StageContext
from laionface.io import schemas, storage
from laionface.stages.metadata import idlists
from laionface.stages.metadata.idlists import IdList

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
# Input rows per dedup bucket at most (kept rows are fewer): ~40 bytes each in a dedup task.
DEDUP_BUCKET_ROWS = 8_000_000
# Rows of consecutive shards written by one shards task at most, and the fewest such tasks.
SHARD_TASK_ROWS = 200_000
MIN_SHARD_TASKS = 8
# Rows a parts task holds at a time (a DuckDB record batch): its memory is this, plus 9 bytes
# per row kept, whatever the size of the file's row groups.
READ_BATCH_ROWS = 131_072
# Dictionary encoding only for the columns with few distinct values: trying it on URLs and
# captions costs time for nothing. Shards are snappy, as DuckDB and img2dataset write parquet:
# zstd made them 30% smaller for 50% more CPU in the shards step.
SHARD_DICTIONARY = ["LICENSE", "NSFW", "source_file"]
# Part of every parts fingerprint: a run folder written by an older layout of metadata/ redoes
# its parts instead of reading them.
OUTPUT_VERSION = 2
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
# The filters, as one DuckDB query per task


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _number(value: float) -> str:
    return f"{_text(repr(float(value)))}::DOUBLE"


def _laion_columns(mapping: dict[str, str]) -> str:
    """SELECT list putting the input's columns under LAION's names and types (null if absent)."""
    exprs = []
    for field in schemas.LAION_METADATA:
        name = mapping[field.name]
        column = _ident(name) if name else None
        if column is None:
            expr = f"NULL::{_SQL_TYPES[field.name]}"
        elif field.name in ("HEIGHT", "WIDTH"):
            # Float sides (DataComp) floor to integers; NaN and infinities are unknown (null).
            as_double = f"{column}::DOUBLE"
            expr = f"CASE WHEN isfinite({as_double}) THEN floor({as_double})::INTEGER END"
        else:
            expr = f"{column}::{_SQL_TYPES[field.name]}"
        exprs.append(f"{expr} AS {field.name}")
    return ", ".join(exprs + ["file_row_number AS source_row"])


_SQL_TYPES = {
    "SAMPLE_ID": "BIGINT",
    "URL": "VARCHAR",
    "TEXT": "VARCHAR",
    "HEIGHT": "INTEGER",
    "WIDTH": "INTEGER",
    "LICENSE": "VARCHAR",
    "NSFW": "VARCHAR",
    "similarity": "DOUBLE",
}


def _blocked_host(domains: list[str]) -> str:
    """True when URL's host is one of `domains` or a subdomain of one (host and its suffixes)."""
    host = f"rtrim(lower(regexp_extract(URL, {_text(_HOST)}, 1)), '.')"
    labels = f"string_split({host}, '.')"
    suffixes = (
        f"list_transform(range(1, len({labels}) + 1), lambda i: array_to_string({labels}[i:], '.'))"
    )
    return f"list_has_any({suffixes}, [{', '.join(_text(d) for d in domains)}])"


def _pass_conditions(section: MetadataSection) -> dict[str, str]:
    """reason -> SQL that is true for a row that passes that filter, for the filters that are set.

    Written to give exactly what a row-by-row reading of the table in the module docstring
    gives: a null fails (the caller wraps each in coalesce(..., false)); NaN similarity fails
    (DuckDB orders NaN above every number); `length` counts code points; min(W, H) >= x is
    spelled W >= x AND H >= x because DuckDB's least() skips nulls.
    """
    s = section
    sides_known = "WIDTH IS NOT NULL AND HEIGHT IS NOT NULL"
    conditions = {
        "null_url": "URL IS NOT NULL AND URL <> ''",
        "null_caption": "TEXT IS NOT NULL",
    }
    if s.url_schemes:
        prefixes = [f"{scheme}://" for scheme in s.url_schemes]
        # The case-sensitive test first, as a CASE (DuckDB evaluates every operand of an OR):
        # most URLs pass it, and lower() costs twice as much as reading the URLs.
        exact = " OR ".join(f"starts_with(URL, {_text(p)})" for p in prefixes)
        folded = " OR ".join(f"lower(URL[1:{len(p)}]) = {_text(p)}" for p in prefixes)
        conditions["url_scheme"] = f"CASE WHEN {exact} THEN true ELSE {folded} END"
    if s.blocked_domains:
        conditions["blocked_domain"] = f"NOT {_blocked_host(s.blocked_domains)}"
    if s.nsfw:
        conditions["nsfw"] = f"upper(NSFW) IN ({', '.join(_text(v.upper()) for v in s.nsfw)})"
    if s.min_similarity is not None:
        low = _number(s.min_similarity)
        conditions["min_similarity"] = f"similarity >= {low} AND NOT isnan(similarity)"
    if s.min_side is not None:
        conditions["min_side"] = f"WIDTH >= {s.min_side} AND HEIGHT >= {s.min_side}"
    if s.max_side is not None:
        conditions["max_side"] = f"WIDTH <= {s.max_side} AND HEIGHT <= {s.max_side}"
    if s.max_aspect_ratio is not None:
        ratio = _number(s.max_aspect_ratio)
        conditions["max_aspect_ratio"] = (
            f"{sides_known} AND least(WIDTH, HEIGHT) > 0 AND "
            f"greatest(WIDTH, HEIGHT)::DOUBLE <= least(WIDTH, HEIGHT)::DOUBLE * {ratio}"
        )
    if s.min_caption_chars is not None:
        conditions["min_caption_chars"] = f"length(TEXT) >= {s.min_caption_chars}"
    if s.max_caption_chars is not None:
        conditions["max_caption_chars"] = f"length(TEXT) <= {s.max_caption_chars}"
    return conditions


def _first_failing(conditions: dict[str, str], reasons: tuple[str, ...]) -> str:
    """SQL for the code (index + 1 in REASONS) of the first of `reasons` a row fails; 0: none."""
    branches = [
        f"WHEN NOT coalesce({conditions[r]}, false) THEN {REASONS.index(r) + 1}"
        for r in reasons
        if r in conditions
    ]
    return f"(CASE {' '.join(branches)} ELSE 0 END)::TINYINT" if branches else "0::TINYINT"


# The list filters sit between these two groups in REASONS; they run in numpy on the worker
# (IdList: a bitmap and a binary search over up to 50M sorted IDs, shared by the worker
# processes), so the query reports the first failing filter on each side of them.
_BEFORE_LISTS = ("null_url", "null_caption")
_AFTER_LISTS = REASONS[REASONS.index("exclude_list") + 1 : REASONS.index("duplicate_url")]


_THREAD = threading.local()


def _connection(source: str) -> duckdb.DuckDBPyConnection:
    """This thread's DuckDB connection (opening one costs ~15 ms a task), able to read `source`."""
    con = getattr(_THREAD, "connection", None)
    if con is None:
        # One thread: Dask already runs one task per worker thread, side by side.
        con = _THREAD.connection = duckdb.connect(config={"threads": 1})
        _THREAD.filesystems = {}
    fs, _ = storage.fs_for(source)
    if not isinstance(fs, LocalFileSystem):
        # Object stores and any other fsspec URL: DuckDB reads through fsspec, with the
        # filesystem fsspec gives now (its settings may have changed since the last task).
        name = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if _THREAD.filesystems.get(name) is not fs:
            if name in con.list_filesystems():
                con.unregister_filesystem(name)
            con.register_filesystem(fs)
            _THREAD.filesystems[name] = fs
    return con


def _scan(source: str, start: int, stop: int, mapping: dict[str, str]) -> str:
    """The task's rows [start, stop) of `source` under LAION's names, as a subquery."""
    return (
        f"(SELECT {_laion_columns(mapping)} "
        f"FROM read_parquet({_text(source)}, file_row_number = true) "
        f"WHERE file_row_number >= {start} AND file_row_number < {stop})"
    )


@contextlib.contextmanager
def _reading(source: str, start: int, stop: int) -> Iterator[None]:
    """DuckDB's errors while reading rows [start, stop) of `source`, as MetadataErrors."""
    try:
        yield
    except duckdb.ConversionException as exc:
        raise MetadataError(
            f"{source}: rows {start}..{stop - 1}: a column does not convert to LAION's type "
            f"({exc}); check metadata.columns"
        ) from None
    except (duckdb.Error, pa.ArrowException) as exc:
        raise MetadataError(
            f"{source}: rows {start}..{stop - 1} can't be read ({exc}); the file is damaged "
            "or truncated"
        ) from None


def _query(con: duckdb.DuckDBPyConnection, sql: str, source: str, start: int, stop: int):
    with _reading(source, start, stop):
        return con.sql(sql).to_arrow_table()


def _batches(
    con: duckdb.DuckDBPyConnection, sql: str, source: str, start: int, stop: int
) -> Iterator[pa.RecordBatch]:
    """The result of `sql` on rows [start, stop) of `source`, READ_BATCH_ROWS rows at a time."""
    with _reading(source, start, stop):
        yield from con.sql(sql).fetch_record_batch(READ_BATCH_ROWS)


def reason_codes(
    section: MetadataSection,
    lists: tuple[IdList | None, IdList | None],
    source: str,
    start: int,
    stop: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows [start, stop) of `source`, a batch at a time: their row numbers and, per row, the
    index + 1 in REASONS of the first filter that drops it (0 = kept; duplicate_url is decided
    later)."""
    conditions = _pass_conditions(section)
    wants_ids = any(x is not None and len(x.ids) for x in lists)
    wants_urls = any(x is not None and len(x.url_hashes) for x in lists)
    columns = [
        "source_row",
        f"{_first_failing(conditions, _BEFORE_LISTS)} AS early",
        f"{_first_failing(conditions, _AFTER_LISTS)} AS late",
    ]
    if wants_ids:
        columns.append("SAMPLE_ID")
    if wants_urls:
        # Hashed in Python (idlists.url_hashes) only where a list filter still looks at the row.
        columns.append("CASE WHEN early = 0 THEN URL END AS URL")
    mapping = column_map(section.columns)
    sql = f"SELECT {', '.join(columns)} FROM {_scan(source, start, stop, mapping)}"
    for batch in _batches(_connection(source), sql, source, start, stop):
        codes = batch.column("early").to_numpy().copy()
        undecided = codes == 0
        ids = batch.column("SAMPLE_ID") if wants_ids else None
        urls = batch.column("URL") if wants_urls else None
        for name, listed, keep_listed in (
            ("id_list", lists[0], True),
            ("exclude_list", lists[1], False),
        ):
            if listed is None:
                continue
            drop = undecided & (_in_list(listed, ids, urls, undecided) != keep_listed)
            codes[drop] = REASONS.index(name) + 1
            undecided &= ~drop
        late = batch.column("late").to_numpy()
        codes[undecided] = late[undecided]
        yield batch.column("source_row").to_numpy(), codes


def _in_list(
    listed: IdList, ids: pa.Array | None, urls: pa.Array | None, where: np.ndarray
) -> np.ndarray:
    """Whether each row (looked up only `where` true) has its SAMPLE_ID or its URL in `listed`."""
    found = np.zeros(len(where), dtype=bool)
    positions = np.flatnonzero(where)
    if len(listed.ids) and ids is not None:
        values = ids.take(pa.array(positions))
        known = pc.is_valid(values).to_numpy(zero_copy_only=False)
        match = listed.contains_ids(pc.fill_null(values, 0).to_numpy(zero_copy_only=False))
        found[positions] |= match & known
    if len(listed.url_hashes) and urls is not None:
        hashes = idlists.url_hashes(urls.take(pa.array(positions)))
        found[positions] |= idlists.contains_hashes(listed.url_hashes, hashes)
    return found


# ---------------------------------------------------------------------------------------------
# Step 1: the fate of every row of a slice of an input file


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


def _select_rows(source: str, rows: np.ndarray, mapping: dict[str, str], columns: str) -> pa.Table:
    """`columns` (SQL, LAION names) of rows `rows` (sorted row numbers) of `source`, in row order."""
    start, stop = int(rows[0]), int(rows[-1]) + 1
    con = _connection(source)
    con.register("wanted_rows", pa.table({"row": rows}))
    try:
        # A semi-join on row numbers: only the pages around the rows asked for are decoded.
        sql = (
            f"SELECT source_row, {columns} FROM {_scan(source, start, stop, mapping)} "
            "WHERE source_row IN (SELECT row FROM wanted_rows)"
        )
        return _in_row_order(_query(con, sql, source, start, stop), rows, source)
    finally:
        con.unregister("wanted_rows")


def _in_row_order(table: pa.Table, rows: np.ndarray, source: str) -> pa.Table:
    """`table` (with source_row) sorted by row, checked to hold exactly `rows`."""
    got = table.column("source_row").to_numpy()
    if len(got) > 1 and not np.all(got[1:] > got[:-1]):
        table = table.take(pc.sort_indices(table.column("source_row")))
        got = table.column("source_row").to_numpy()
    if len(got) != len(rows) or not np.array_equal(got, rows):
        raise MetadataError(
            f"{source}: the rows read differ from the rows the metadata stage planned "
            "(the file changed during the run?); re-run the metadata stage"
        )
    return table


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
    counts = np.zeros(len(REASONS) + 1, dtype=np.int64)
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
    storage.write_parquet(pa.table({"row": pa.array(kept, pa.int64())}), kept_url)
    if section.dedup_urls:
        hashes = idlists.EMPTY_HASHES.copy()
        if len(kept):
            urls = _select_rows(source, kept, column_map(section.columns), "URL").column("URL")
            hashes = idlists.url_hashes(urls)
        _write_url_hashes(hashes, hash_bits, hash_url)
    dropped = {reason: int(counts[i + 1]) for i, reason in enumerate(REASONS) if counts[i + 1]}
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
# Step 3: read the kept rows and write them as download shards


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
    table = _select_rows(source, rows, mapping, ", ".join(schemas.LAION_METADATA.names))
    columns = [table.column(f.name).cast(f.type) for f in schemas.LAION_METADATA]
    columns += [pa.repeat(pa.scalar(source), table.num_rows), table.column("source_row")]
    return pa.Table.from_arrays(columns, schema=schemas.DOWNLOAD_SHARD)


def write_shards(
    *,
    segments: list[dict],
    dupes_urls: list[str],
    columns: dict[str, str],
    first_shard: int,
    shard_sizes: list[int],
    shards_url: str,
) -> dict:
    """Write shards first_shard.. from `segments`: [start, stop) of each part's deduplicated
    kept rows, read from its input file."""
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
            f"shards {first_shard}..: the parts held {rows.num_rows} rows, the plan "
            f"{sum(shard_sizes)}; re-run the metadata stage"
        )
    offset = 0
    for number, size in enumerate(shard_sizes, start=first_shard):
        shard = rows.slice(offset, size).combine_chunks()
        with storage.atomic_open(storage.join(shards_url, _shard_name(number))) as handle:
            pq.write_table(shard, handle, compression="snappy", use_dictionary=SHARD_DICTIONARY)
        offset += size
    return {"items": offset, "shards": len(shard_sizes)}


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
    rows: tuple[int, int]


def plan_parts(files: list[InputFile], task_rows: int) -> list[PartPlan]:
    """Slices of whole row groups of about task_rows rows; every file has at least one."""
    plans: list[PartPlan] = []
    for file_index, info in enumerate(files):
        start = 0
        first_row = row = 0
        for group, rows in enumerate(info.row_group_rows):
            if group > start and row - first_row + rows > task_rows:
                plans.append(
                    _part(len(plans), file_index, info.url, (start, group), (first_row, row))
                )
                start, first_row = group, row
            row += rows
        groups = (start, len(info.row_group_rows))
        plans.append(_part(len(plans), file_index, info.url, groups, (first_row, row)))
    return plans


def _part(index: int, file_index: int, source: str, groups: tuple, rows: tuple) -> PartPlan:
    return PartPlan(
        id=f"{file_index:05d}-{groups[0]:05d}",
        index=index,
        file_index=file_index,
        source=source,
        row_groups=groups,
        rows=rows,
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
    parts: list[PartPlan], final_rows: list[int], kept_urls: list[str], dupes_urls: list[str], ctx
) -> tuple[list[ShardTask], int]:
    rows_per_shard = ctx.config.metadata.rows_per_shard
    total = sum(final_rows)
    n_shards = math.ceil(total / rows_per_shard)
    offsets = np.concatenate([[0], np.cumsum(final_rows)]).tolist()
    # At least MIN_SHARD_TASKS tasks so the workers share the reading; never more rows than
    # SHARD_TASK_ROWS in one. Counted from the shards alone, so a re-run plans the same tasks.
    per_task = max(1, min(SHARD_TASK_ROWS // rows_per_shard, math.ceil(n_shards / MIN_SHARD_TASKS)))
    tasks = []
    for first in range(0, n_shards, per_task):
        last = min(first + per_task, n_shards)
        begin, end = first * rows_per_shard, min(last * rows_per_shard, total)
        segments = [
            {
                "part": p.index,
                "kept_url": kept_urls[p.index],
                "source": p.source,
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
                    columns=column_map(ctx.config.metadata.columns),
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
        OUTPUT_VERSION,
    )
    folder = {
        name: ctx.path(STAGE, name) for name in ("kept", "drops", "urlhash", "dupes", "shards")
    }
    ids = {p.id for p in parts}
    _remove_except(folder["kept"], ids)
    _remove_except(folder["drops"], ids | ({"duplicate_url"} if section.dedup_urls else set()))
    _remove_except(folder["urlhash"], ids if section.dedup_urls else set())
    kept_urls = [storage.join(folder["kept"], f"{p.id}.parquet") for p in parts]
    hash_urls = [storage.join(folder["urlhash"], f"{p.id}.parquet") for p in parts]
    tasks = [
        ShardTask(
            p.id,
            dict(
                source=p.source,
                file_index=p.file_index,
                row_groups=list(p.row_groups),
                rows=list(p.rows),
                section=section,
                lists=lists,
                kept_url=kept_urls[p.index],
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
    shard_tasks, n_shards = _shard_tasks(parts, final_rows, kept_urls, dupes_urls, ctx)
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
