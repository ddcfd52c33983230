"""The rows of one shard from a file sorted by key: only the row groups that can hold them.

A sample key starts with its raw shard's name (layout.key_prefix), so in a file sorted by key,
such as dedup/decisions.parquet, a shard's rows are one run, which the row groups' min/max
statistics locate without reading the others: a per-shard task reads a few row groups of a
file of any size.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laionface.io import storage

# Row groups of the files read this way: a shard's rows span one or two of them.
ROW_GROUP_ROWS = 65_536
_AFTER_EVERY_SUFFIX = "\U0010ffff"


def read_prefix(url: str, prefix: str, columns: list[str]) -> pa.Table:
    """`columns` of the rows of the key-sorted parquet `url` whose key starts with `prefix`,
    in file order (every row group is read where a file has no key statistics)."""
    fs, path = storage.fs_for(url)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        key_column = parquet.schema_arrow.get_field_index("key")
        groups = []
        for index in range(parquet.num_row_groups):
            stats = parquet.metadata.row_group(index).column(key_column).statistics
            if stats is not None and stats.has_min_max:
                if stats.max < prefix or stats.min > prefix + _AFTER_EVERY_SUFFIX:
                    continue
            groups.append(index)
        wanted = list(dict.fromkeys(["key", *columns]))
        table = parquet.read_row_groups(groups, columns=wanted)
    return table.filter(pc.starts_with(table["key"], prefix)).select(columns)
