"""Dedup's first step, per select shard: the samples that enter dedup, with what it needs.

`prepare_shard` writes `dedup/samples/NNNNN.parquet` (schemas.DEDUP_SAMPLES): the samples select
kept, with their pHash, the first 128 bits of their sha256 (a chance collision among 10^10 images
is about 10^-19), their pixel count and their best detection score, sorted by key. The helpers
read hash columns without a float round trip.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laionface.io import storage
from laionface.io.schemas import DEDUP_SAMPLES
from laionface.stages.dedup import hashindex

_U64 = np.uint64
_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _NIBBLE[_c] = 10 + _i


def u64(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values with nulls as 0, validity) of a uint64 column, without a float round trip."""
    valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
    values = pc.fill_null(column, 0).to_numpy(zero_copy_only=False).astype(_U64, copy=False)
    return values, valid


def hex_to_u64(column: pa.Array | pa.ChunkedArray, source: str) -> np.ndarray:
    """16-hex-digit strings (as `str(imagehash.phash(...))` writes) to uint64, vectorised."""
    column = pc.cast(column, pa.large_string())
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.empty(0, dtype=_U64)
    if column.null_count:
        row = pc.index(pc.is_null(column), True).as_py()
        raise ValueError(f"{source}: row {row} has no phash; every reference row needs one")
    lengths = pc.utf8_length(column).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != 16)
    if bad.size:
        raise ValueError(
            f"{source}: row {bad[0]}: phash {column[int(bad[0])].as_py()!r} is not 16 hex digits"
        )
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int64)[
        column.offset : column.offset + len(column) + 1
    ]
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    nibbles = _NIBBLE[data].reshape(-1, 16)
    if (nibbles == 255).any():
        row = int(np.flatnonzero((nibbles == 255).any(axis=1))[0])
        raise ValueError(f"{source}: row {row}: phash {column[row].as_py()!r} is not hexadecimal")
    out = np.zeros(len(column), dtype=_U64)
    for j in range(16):
        out = (out << _U64(4)) | nibbles[:, j].astype(_U64)
    return out


def _sha_halves(column: pa.ChunkedArray, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first 64 bits, next 64 bits, validity) of hex sha256 strings."""
    valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
    filled = pc.fill_null(column, "0" * 64)
    lengths = pc.utf8_length(filled).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != 64)
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"{source}: row {row}: sha256 {column[row].as_py()!r} is not 64 hex digits"
        )
    hi = hex_to_u64(pc.utf8_slice_codeunits(filled, 0, 16), f"{source} (sha256)")
    lo = hex_to_u64(pc.utf8_slice_codeunits(filled, 16, 32), f"{source} (sha256)")
    return hi, lo, valid


def _best_scores(faces: pa.ChunkedArray) -> np.ndarray:
    """Highest detection score per row; NaN when the row has none."""
    faces = faces.combine_chunks() if isinstance(faces, pa.ChunkedArray) else faces
    out = np.full(len(faces), np.nan, dtype=np.float32)
    if not len(faces):
        return out
    scores = pc.struct_field(pc.list_flatten(faces), "score").to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(faces).to_numpy(zero_copy_only=False)
    if scores.size:
        scores = np.nan_to_num(scores.astype(np.float32), nan=-np.inf)
        starts = np.flatnonzero(np.r_[True, parents[1:] != parents[:-1]])
        out[parents[starts]] = np.maximum.reduceat(scores, starts)
    return out


def prepare_shard(*, faces_url: str, select_url: str, out_url: str) -> dict:
    """Write the select-kept samples of one shard with what dedup needs (schemas.DEDUP_SAMPLES)."""
    select = storage.read_parquet(select_url, columns=["key", "kept"])
    kept_keys = select.filter(pc.equal(select["kept"], True))["key"]
    faces = storage.read_parquet(
        faces_url, columns=["key", "width", "height", "phash", "sha256", "faces"]
    )
    rows = faces.filter(pc.is_in(faces["key"], value_set=kept_keys.combine_chunks()))
    if rows.num_rows != len(kept_keys):
        missing = pc.filter(
            kept_keys, pc.invert(pc.is_in(kept_keys, value_set=faces["key"].combine_chunks()))
        )
        if len(missing):
            raise ValueError(
                f"{select_url}: key {missing[0].as_py()!r} is kept but missing from {faces_url}; "
                "re-run the faces and select stages for this shard"
            )
        raise ValueError(f"{faces_url}: a key appears more than once; re-run the faces stage")
    hi, lo, sha_valid = _sha_halves(rows["sha256"], faces_url)
    width = pc.fill_null(rows["width"], 0).to_numpy(zero_copy_only=False).astype(np.int64)
    height = pc.fill_null(rows["height"], 0).to_numpy(zero_copy_only=False).astype(np.int64)
    best = _best_scores(rows["faces"])
    table = pa.table(
        {
            "key": rows["key"],
            "phash": rows["phash"],
            "sha256_hi": pa.array(hi, mask=~sha_valid),
            "sha256_lo": pa.array(lo, mask=~sha_valid),
            "pixels": pa.array(width * height),
            "best_score": pa.array(best, mask=np.isnan(best)),
        },
        schema=DEDUP_SAMPLES,
    ).sort_by("key")
    storage.write_parquet(table, out_url)
    phash, valid = u64(table["phash"])
    return {
        "items": table.num_rows,
        "hashes": int(hashindex.distinct(phash[valid]).size),
    }
