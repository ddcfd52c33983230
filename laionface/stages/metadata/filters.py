"""The metadata filters as one DuckDB query per task, and the row reads that go with them.

Each row dropped is counted once, under the first of these filters that drops it (a null in a
column a filter reads fails that filter); the reasons are layout.METADATA_REASONS, in this order:

    reason             setting            drops a row when
    null_url           (always)           URL is null or empty
    null_caption       (always)           TEXT is null
    id_list            id_list            neither its SAMPLE_ID nor its URL is in the list
    exclude_list       exclude_list       its SAMPLE_ID or its URL is in the list
    url_scheme         url_schemes        URL does not start with an allowed `scheme://` ([] = any)
    blocked_domain     blocked_domains    URL's host is a blocked domain or a subdomain of one
    license            licenses           LICENSE is not one of the allowed values (exactly as
                                          written; "?" is LAION's unknown)
    nsfw               nsfw               NSFW is not one of the allowed values (any case)
    max_punsafe        max_punsafe        punsafe > max_punsafe (LAION-5B's NSFW probability;
                                          columns.punsafe names the input's column; the bound
                                          is taken at float32 precision, the scores' own)
    max_pwatermark     max_pwatermark     pwatermark > max_pwatermark (watermark probability)
    min_similarity     min_similarity     similarity < min_similarity
    min_side           min_side           min(WIDTH, HEIGHT) < min_side (LAION often swaps them)
    max_side           max_side           max(WIDTH, HEIGHT) > max_side
    max_aspect_ratio   max_aspect_ratio   max(W, H) / min(W, H) > max_aspect_ratio, or a side is 0
    min_caption_chars  min_caption_chars  TEXT has fewer characters
    max_caption_chars  max_caption_chars  TEXT has more characters
    duplicate_url      dedup_urls         an earlier row (input file order, then row order) that
                                          passed every filter above has the same URL, byte for
                                          byte (decided after the scan, steps.dedup_bucket)

punsafe and pwatermark are read by their filters only: the scan casts them to DOUBLE, the
download shards do not carry them (inputs.SCORE_NAMES).

`reason_codes` reads only the columns the filters need and gives every row the code of the
first filter that drops it; the ID and URL lists are looked up in numpy between the two halves
of the order above (idlists.IdList). DuckDB streams the file by row group, so a task's memory is
a few bytes per row of its slice, never the file.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from laionface.config import MetadataSection
from laionface.io import schemas, storage
from laionface.layout import HOST_PATTERN, METADATA_REASONS
from laionface.stages.metadata import idlists
from laionface.stages.metadata.idlists import IdList
from laionface.stages.metadata.inputs import MetadataError, column_map, score_map

# Rows a parts task holds at a time (a DuckDB record batch): its memory is this, plus 9 bytes
# per row kept, whatever the size of the file's row groups.
READ_BATCH_ROWS = 131_072


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _number(value: float) -> str:
    return f"{_text(repr(float(value)))}::DOUBLE"


def _laion_columns(mapping: dict[str, str], scores: dict[str, str]) -> str:
    """SELECT list putting the input's columns under LAION's names and types (null if absent),
    then the filter-only `scores` columns ({scan name: input column}) as DOUBLE."""
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
    exprs += [f"{_ident(column)}::DOUBLE AS {name}" for name, column in scores.items()]
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
    host = f"rtrim(lower(regexp_extract(URL, {_text(HOST_PATTERN)}, 1)), '.')"
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
    if s.licenses:
        conditions["license"] = f"LICENSE IN ({', '.join(_text(v) for v in s.licenses)})"
    if s.nsfw:
        conditions["nsfw"] = f"upper(NSFW) IN ({', '.join(_text(v.upper()) for v in s.nsfw)})"
    for score in ("punsafe", "pwatermark"):
        limit = getattr(s, f"max_{score}")
        if limit is not None:
            # The bound at float32 precision, the scores' own (LAION-5B, COYO): a stored 0.8
            # passes max 0.8 although float32(0.8) is 0.8000000119 as a double.
            bound = f"{_text(repr(float(limit)))}::FLOAT::DOUBLE"
            conditions[f"max_{score}"] = f"{score} <= {bound} AND NOT isnan({score})"
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
    """SQL for the code (index + 1 in METADATA_REASONS) of the first of `reasons` a row fails; 0: none."""
    branches = [
        f"WHEN NOT coalesce({conditions[r]}, false) THEN {METADATA_REASONS.index(r) + 1}"
        for r in reasons
        if r in conditions
    ]
    return f"(CASE {' '.join(branches)} ELSE 0 END)::TINYINT" if branches else "0::TINYINT"


# The list filters sit between these two groups in REASONS; they run in numpy on the worker
# (IdList: a bitmap and a binary search over up to 50M sorted IDs, shared by the worker
# processes), so the query reports the first failing filter on each side of them.
_BEFORE_LISTS = ("null_url", "null_caption")
_AFTER_LISTS = METADATA_REASONS[
    METADATA_REASONS.index("exclude_list") + 1 : METADATA_REASONS.index("duplicate_url")
]


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


def _scan(
    source: str,
    start: int,
    stop: int,
    mapping: dict[str, str],
    scores: dict[str, str] | None = None,
) -> str:
    """The task's rows [start, stop) of `source` under LAION's names (and the filter-only
    `scores` columns), as a subquery."""
    return (
        f"(SELECT {_laion_columns(mapping, scores or {})} "
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
    index + 1 in METADATA_REASONS of the first filter that drops it (0 = kept; duplicate_url is decided
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
    scan = _scan(source, start, stop, column_map(section.columns), score_map(section.columns))
    sql = f"SELECT {', '.join(columns)} FROM {scan}"
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
            codes[drop] = METADATA_REASONS.index(name) + 1
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


def select_rows(source: str, rows: np.ndarray, mapping: dict[str, str], columns: str) -> pa.Table:
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
