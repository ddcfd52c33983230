"""Every parquet file laionface writes, in one place: the Arrow schema of each.

Stages build their tables with these schemas (`pa.Table.from_pylist(rows, schema=...)`), so a
column can't drift between the stage that writes it and the ones that read it.
"""

from __future__ import annotations

import pyarrow as pa

# LAION-400M metadata (BRIEF section 2), also the columns a download shard carries.
LAION_METADATA = pa.schema(
    [
        ("SAMPLE_ID", pa.int64()),
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("HEIGHT", pa.int32()),
        ("WIDTH", pa.int32()),
        ("LICENSE", pa.string()),
        ("NSFW", pa.string()),
        ("similarity", pa.float64()),
    ]
)

# metadata/shards/NNNNN.parquet: the input of one download shard. The first eight columns are
# LAION's names whatever the input called them (metadata.columns maps them).
DOWNLOAD_SHARD = pa.schema(
    list(LAION_METADATA)
    + [
        ("source_file", pa.string()),  # the metadata file the row came from
        ("source_row", pa.int64()),  # its row number there
    ]
)

# metadata/drops/*.parquet and every stage's drop counts: one row per (shard or file, reason).
DROP_COUNTS = pa.schema(
    [
        ("stage", pa.string()),
        ("source", pa.string()),  # input file, or shard id
        ("reason", pa.string()),
        ("count", pa.int64()),
    ]
)

FACE = pa.struct(
    [
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
        ("score", pa.float32()),
        ("landmarks", pa.list_(pa.float32(), 10)),  # (x, y) of eyes, nose, mouth corners
    ]
)

# faces/NNNNN.parquet: one row per image of raw shard NNNNN (successful downloads).
FACES = pa.schema(
    [
        ("key", pa.string()),
        ("SAMPLE_ID", pa.int64()),
        ("width", pa.int32()),  # of the upright image, the frame boxes are in
        ("height", pa.int32()),
        ("phash", pa.uint64()),
        ("sha256", pa.string()),  # of the stored bytes
        ("decode_error", pa.string()),  # null when the image decoded
        ("faces", pa.list_(FACE)),  # every detection scoring >= faces.record_threshold
    ]
)

# select/NNNNN.parquet: the select decision for each row of faces/NNNNN.parquet.
SELECT = pa.schema(
    [
        ("key", pa.string()),
        ("SAMPLE_ID", pa.int64()),
        ("kept", pa.bool_()),
        ("reason", pa.string()),  # null when kept
        ("n_faces", pa.int32()),  # faces passing select.min_score and the size rules
    ]
)

# dedup/decisions.parquet: one row per sample that passed select.
DEDUP = pa.schema(
    [
        ("key", pa.string()),
        ("kept", pa.bool_()),
        ("reason", pa.string()),  # exact_duplicate | near_duplicate | eval_overlap | null
        ("duplicate_of", pa.string()),  # the kept key, or the reference item matched
        ("distance", pa.int32()),  # pHash Hamming distance to duplicate_of
        ("cluster", pa.int64()),  # cluster id shared by a keeper and its duplicates
    ]
)
