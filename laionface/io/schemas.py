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

# metadata/inputs.parquet: one row per metadata input file, in input order;
# input_rows = kept_rows + the file's counts in metadata/drops/.
METADATA_INPUTS = pa.schema(
    [
        ("source", pa.string()),  # the input file, as in DROP_COUNTS.source and source_file
        ("input_rows", pa.int64()),
        ("kept_rows", pa.int64()),  # rows written to metadata/shards/
        ("dropped_rows", pa.int64()),
    ]
)

# raw/NNNNN.parquet is img2dataset's own parquet plus error_category and retry_of (see
# stages.download); the latest outcome of every download input row, as the audit and the
# download stage read them (stages.download.outcomes.latest_outcomes):
DOWNLOAD_OUTCOMES = pa.schema(
    [
        ("input_key", pa.string()),  # key of the row's first attempt (its metadata shard row)
        ("SAMPLE_ID", pa.int64()),
        ("URL", pa.string()),
        ("key", pa.string()),  # key of the latest attempt
        ("shard", pa.string()),  # raw shard of the latest attempt
        ("status", pa.string()),
        ("error_category", pa.string()),
        ("error_message", pa.string()),
        ("attempts", pa.int32()),
    ]
)

# The metadata scan's parts (stages.metadata.steps): metadata/kept/ID.parquet, the row numbers
# of an input file slice that pass the filters; metadata/urlhash/ID.parquet, blake2b-128 of each
# kept URL (sorted, one row group per hash bucket); metadata/dupes/BBBBB.parquet, the rows whose
# URL an earlier row has (part index in the plan, row number in its input file).
METADATA_KEPT = pa.schema([("row", pa.int64())])
URL_HASHES = pa.schema([("h1", pa.uint64()), ("h2", pa.uint64()), ("row", pa.int64())])
URL_DUPLICATES = pa.schema([("part", pa.int32()), ("row", pa.int64())])

# One detection as the faces stage records it (flat, the detector's own layout). The published
# dataset groups the same float32 values differently (dataset.contract.DATASET_FACE).
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
        # Per detection of the faces row, in its order: whether it passes every select rule
        # (selection.face_class is "counted"). Kept images have n_faces of them true.
        ("counted", pa.list_(pa.bool_())),
    ]
)

# dedup/decisions.parquet: one row per sample that passed select.
DEDUP = pa.schema(
    [
        ("key", pa.string()),
        ("kept", pa.bool_()),
        ("reason", pa.string()),  # exact_duplicate | near_duplicate | eval_overlap | null
        ("duplicate_of", pa.string()),  # the kept key, or the reference item matched
        ("distance", pa.int32()),  # pHash Hamming distance to duplicate_of (null: no pHash)
        # The cluster: the row number, in this file, of its keeper; null for eval_overlap.
        ("cluster", pa.int64()),
    ]
)

# audit/funnel.parquet: the funnel (laionface.audit), one row per stage input, drop reason and
# stage output: outcome is "input", "dropped" (reason set) or "kept".
AUDIT_FUNNEL = pa.schema(
    [
        ("stage", pa.string()),
        ("outcome", pa.string()),
        ("reason", pa.string()),  # null unless outcome is "dropped"
        ("count", pa.int64()),
        ("pct_of_input", pa.float64()),  # of the rows that entered the first stage
        ("pct_of_stage_input", pa.float64()),  # of the rows that entered this stage
    ]
)

# audit/shards.parquet: the same figures per shard (per input file for metadata, per dataset
# shard for emit); for every shard, input = kept + the sum of dropped.
AUDIT_SHARDS = pa.schema(
    [
        ("stage", pa.string()),
        ("shard", pa.string()),
        ("outcome", pa.string()),
        ("reason", pa.string()),
        ("count", pa.int64()),
    ]
)

# dedup/samples/NNNNN.parquet: the samples of select shard NNNNN that enter dedup (kept by select),
# reduced to what dedup needs. sha256 is kept as its first 128 bits (two uint64, big-endian).
DEDUP_SAMPLES = pa.schema(
    [
        ("key", pa.string()),
        ("phash", pa.uint64()),
        ("sha256_hi", pa.uint64()),
        ("sha256_lo", pa.uint64()),
        ("pixels", pa.int64()),  # width * height
        ("best_score", pa.float32()),  # highest detection score; null when no detection
    ]
)

# dedup/bands/NNNNN.parquet (sharded search, map side): each distinct hash once per table, bit-
# permuted so the table's key is on top; one row group per partition (top bits of the key).
DEDUP_BANDS = pa.schema([("table", pa.uint16()), ("hash", pa.uint64())])

# dedup/pairs/NNNNN.parquet (sharded search, reduce side): hash pairs within dedup.max_distance.
HASH_PAIRS = pa.schema([("a", pa.uint64()), ("b", pa.uint64()), ("distance", pa.int32())])

# A reference hash file (`build_reference`, dedup.reference): the pHash of each reference image.
REFERENCE_HASHES = pa.schema(
    [
        ("phash", pa.uint64()),
        ("item", pa.string()),  # the image it came from: a path, or TAR#member
    ]
)

# The published dataset's files (dataset/NNNNN.parquet, manifest.parquet) are the dataset
# contract's: laionface.dataset.contract.
