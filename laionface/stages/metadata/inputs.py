"""The metadata stage's inputs: which files `metadata.input` names, and what their footers say.

Inputs are `metadata.input` (paths, globs, folders or fsspec URLs; a folder means every
`*.parquet` below it), in the order given, each glob and folder sorted by name. Column names come
from `metadata.columns` (LAION-400M's by default); every mapped column must exist with a usable
type, checked from the footer before any row is read.
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from laionface.config import ConfigError, MetadataColumns
from laionface.io import storage


class MetadataError(ConfigError):
    """Metadata input that can't be used; the message names the file, the column and the fix."""


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
# metadata.columns field -> name in the scan, for the columns only a filter reads (max_punsafe,
# max_pwatermark): the scan reads them, the download shards do not carry them.
SCORE_NAMES = {"punsafe": "punsafe", "pwatermark": "pwatermark"}


@dataclass(frozen=True)
class InputFile:
    url: str
    row_group_rows: tuple[int, ...]

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
    "punsafe": ("integer", "float"),
    "pwatermark": ("integer", "float"),
}


def column_map(columns: MetadataColumns) -> dict[str, str]:
    """LAION name -> input column name ("" for a column the input lacks)."""
    return {laion: getattr(columns, field) for field, laion in LAION_NAMES.items()}


def score_map(columns: MetadataColumns) -> dict[str, str]:
    """Scan name -> input column name of the filter-only columns that are set."""
    return {name: getattr(columns, f) for f, name in SCORE_NAMES.items() if getattr(columns, f)}


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
    for field, laion in {**LAION_NAMES, **SCORE_NAMES}.items():
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
    return InputFile(url=url, row_group_rows=rows)


def inspect_inputs(urls: list[str], columns: MetadataColumns) -> list[InputFile]:
    # Footers are small reads, slow only on object stores: read them side by side.
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(urls)))) as pool:
        return list(pool.map(lambda u: inspect_input(u, columns), urls))
