"""The dedup stage: exact and near duplicates, and overlap with evaluation sets.

Input: for each shard, `faces/NNNNN.parquet` (pHash, sha256, size, detections) and
`select/NNNNN.parquet`; only the samples select kept enter dedup. Output:

    dedup/decisions.parquet   schemas.DEDUP, one row per sample that passed select, ordered by key
    dedup/drops.parquet       schemas.DROP_COUNTS: dropped samples per select shard and reason

Every sample gets exactly one fate, decided in this order:

1. `eval_overlap`: its pHash is within `dedup.max_distance` of a reference hash (`dedup.reference`:
   evaluation sets such as the CelebA test split, or an earlier dataset's manifest to build a
   disjoint subset). Dropped whatever else it matches; `duplicate_of` is the nearest reference
   item (ties: the smallest item name), `distance` its distance, `cluster` null. Such samples take
   no part in clustering, so they can't make another sample a duplicate.
2. The other samples are clustered: two samples are linked when their sha256 are equal
   (`dedup.exact`) or their pHashes are within `dedup.max_distance` (`dedup.near`, equal pHashes
   included); a cluster is a connected component, so a chain A-B-C is one cluster even when A and
   C are farther apart than the distance.
3. One keeper per cluster: the most pixels (width x height), then the highest best face score,
   then the smallest key. The rule reads only the samples themselves, so it does not depend on
   shard order, shard count or worker count.
4. Every other member is dropped as `exact_duplicate` when its sha256 equals the keeper's (and
   `dedup.exact` is on), else `near_duplicate`; `duplicate_of` is the keeper's key and `distance`
   the pHash distance to the keeper. A chain member's distance to its keeper can exceed
   `max_distance`: it is linked through other members. With `exact = false`, byte-identical
   copies still have equal pHashes and are dropped as `near_duplicate` at distance 0.
   `cluster` is the row number of the keeper in decisions.parquet.

Near duplicates are searched among the distinct pHash values of the samples and references
together (equal hashes collapsed first), with the multi-index search of `laionface.hashindex`:
- `backend = "memory"`: on the driver, tables on threads (up to ~100M distinct hashes);
- `backend = "dask"`: across workers: a map step writes each shard's hashes keyed by the top bits
  of each table's key (`dedup/bands/`), a reduce step finds the pairs of each partition
  (`dedup/pairs/`); both steps resume like any shard step;
- `auto`: memory up to `MEMORY_BACKEND_MAX_HASHES` distinct hashes, dask above.
Both find every pair within the distance (the search is exact), so they give the same decisions.
The pairs are then joined into clusters with scipy's connected components (a linear-time
union-find over the sparse pair graph).

sha256 equality compares the first 128 bits of the digest (a chance collision among 10^10 images
is about 10^-19).

Reference hashes (`dedup.reference`, and `build_reference` to precompute them): each entry is a
folder (searched recursively for images, webdataset tars and parquet hash files), a tar, an image,
or a parquet file with a `phash` column (uint64, int64 with the same bits, or 16 hex digits, as a
laionface dataset's NNNNN.parquet writes it) and an item column (`item`, else `key`, else `url`;
else FILE#ROW). For an incremental build, name the earlier dataset's folder: its shard parquets
give the hashes and the keys, and its tars are not hashed again. Images are hashed with
`imagedecode.phash_image`, the faces stage's own pHash; an image item is its path, a tar member's
is TAR#MEMBER.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import posixpath
import tarfile
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from laionface.config import DedupSection, fingerprint
from laionface.engine.runner import ShardTask, StageContext
from laionface.io import storage
from laionface.io.imagedecode import phash_image
from laionface.io.schemas import (
    DEDUP,
    DEDUP_BANDS,
    DEDUP_SAMPLES,
    DROP_COUNTS,
    HASH_PAIRS,
    REFERENCE_HASHES,
)
from laionface.stages.dedup import hashindex

log = logging.getLogger("laionface")

REASONS = ("exact_duplicate", "near_duplicate", "eval_overlap")
MEMORY_BACKEND_MAX_HASHES = 100_000_000
# Records (hashes x tables) one reduce task of the dask search holds at most, roughly.
DASK_RECORDS_PER_PARTITION = 16_000_000
MAX_PARTITIONS = 1024
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Reference images hashed per task when a folder is hashed on the workers.
REFERENCE_IMAGES_PER_TASK = 2000
DEFAULT_MAX_PIXELS = 50_000_000
MAX_MEMBER_BYTES = 50_000_000

_U64 = np.uint64
_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _NIBBLE[_c] = 10 + _i


# --------------------------------------------------------------------------------------------
# Small helpers


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _u64(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
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


# --------------------------------------------------------------------------------------------
# Step 1 (per shard): the samples that enter dedup


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
    phash, valid = _u64(table["phash"])
    return {
        "items": table.num_rows,
        "hashes": int(hashindex.distinct(phash[valid]).size),
        "digest": _digest(_table_bytes(table)),
    }


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


# --------------------------------------------------------------------------------------------
# Reference hashes: evaluation sets, earlier datasets


def _entry_url(entry: str, path: str) -> str:
    """A path found by fsspec, as a URL with the entry's protocol (plain path when local)."""
    if "://" not in entry:
        return path
    return f"{entry.split('://', 1)[0]}://{path}"


def _has_phash_column(url: str) -> bool:
    fs, path = storage.fs_for(url)
    with fs.open(path, "rb") as handle:
        return "phash" in pq.read_schema(handle).names


def list_reference(entries: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
    """(image files, tars, parquet hash files) that reference `entries` name, each sorted.

    An entry is a folder (searched recursively), a glob, or one image, tar or parquet file. Parquet
    files found inside a folder count only if they have a `phash` column (img2dataset's shard
    parquets beside its tars have none, a laionface dataset's have one, its manifest.parquet
    none); a parquet named directly must have one. A tar beside a parquet with the same name and
    a phash column is left out: for an earlier dataset (incremental builds), name its folder.
    """
    images: set[str] = set()
    tars: set[str] = set()
    tables: set[str] = set()
    for entry in entries:
        fs, path = storage.fs_for(entry)
        explicit = False  # a file named on its own must be usable; a folder's others are skipped
        if any(ch in entry for ch in "*?["):
            found = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isdir(path):
            found = fs.find(path)
        elif fs.isfile(path):
            found, explicit = [path], True
        else:
            raise FileNotFoundError(
                f"dedup.reference: {entry} not found; give folders of images, webdataset tars or "
                "parquet files of hashes (see `build_reference`)"
            )
        before = len(images) + len(tars) + len(tables)
        for found_path in sorted(found):
            url = _entry_url(entry, found_path)
            name = posixpath.basename(found_path).lower()
            if name.startswith(storage.TEMP_PREFIX):
                continue
            if name.endswith(IMAGE_EXTENSIONS):
                images.add(url)
            elif name.endswith(".tar"):
                tars.add(url)
            elif name.endswith(".parquet"):
                if _has_phash_column(url):
                    tables.add(url)
                elif explicit:
                    raise ValueError(
                        f"dedup.reference: {url} has no 'phash' column; a reference parquet needs "
                        "'phash' (uint64 or 16 hex digits) and optionally 'item'"
                    )
            elif explicit:
                raise ValueError(
                    f"dedup.reference: {url} is not an image ({', '.join(IMAGE_EXTENSIONS)}), "
                    "a .tar or a .parquet file"
                )
        if len(images) + len(tars) + len(tables) == before:
            raise ValueError(
                f"dedup.reference: {entry} holds no images, tars or parquet files with a phash column"
            )
    # A published laionface dataset has NNNNN.parquet (with phash) beside each NNNNN.tar: its
    # hashes are already there, so the tar's images are not hashed again.
    tars = {t for t in tars if t[: -len(".tar")] + ".parquet" not in tables}
    return sorted(images), sorted(tars), sorted(tables)


def _hash_bytes(data: bytes, max_pixels: int) -> int:
    """The pHash of an encoded image (the faces stage's own function); raises if unreadable."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise ValueError(f"{image.width}x{image.height} px is more than {max_pixels}")
            return phash_image(image)


def _reference_images(images: list[str], tar: str | None) -> Iterator[tuple[str, bytes | None]]:
    for url in images:
        yield url, storage.read_bytes(url)
    if tar is None:
        return
    fs, path = storage.fs_for(tar)
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as archive:
        for member in archive:
            if not member.isfile() or not member.name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            item = f"{tar}#{member.name}"
            if member.size > MAX_MEMBER_BYTES:
                yield item, None  # unreadable: never read into memory
                continue
            extracted = archive.extractfile(member)
            yield item, extracted.read() if extracted is not None else b""


def _hash_images(images: list[str], tar: str | None, max_pixels: int) -> tuple[pa.Table, list[str]]:
    """REFERENCE_HASHES rows of the images (files, or those in one tar), and the unreadable ones."""
    values, items, unreadable = [], [], []
    for item, data in _reference_images(images, tar):
        try:
            if data is None:
                raise ValueError(f"larger than {MAX_MEMBER_BYTES} bytes")
            values.append(_hash_bytes(data, max_pixels))
        except Exception as exc:  # an unreadable reference image is reported, the rest go on
            unreadable.append(f"{item}: {type(exc).__name__}: {exc}")
            continue
        items.append(item)
    table = pa.table(
        {"phash": pa.array(values, pa.uint64()), "item": pa.array(items, pa.string())},
        schema=REFERENCE_HASHES,
    )
    return table.sort_by([("phash", "ascending"), ("item", "ascending")]), unreadable


def hash_reference_images(
    *, images: list[str], tar: str | None, out_url: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict:
    """Hash reference images (files, or the images in one tar) into a REFERENCE_HASHES parquet."""
    table, unreadable = _hash_images(images, tar, max_pixels)
    storage.write_parquet(table, out_url)
    return {"items": table.num_rows, "unreadable": len(unreadable), "examples": unreadable[:5]}


def read_reference_table(url: str) -> pa.Table:
    """A parquet of hashes as REFERENCE_HASHES: `phash` uint64/int64/hex, item from item/key/url."""
    table = storage.read_parquet(url)
    if "phash" not in table.column_names:
        raise ValueError(f"{url}: no 'phash' column; a reference parquet needs one")
    column = table["phash"]
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        values = hex_to_u64(column, url)
    elif pa.types.is_integer(column.type) and column.type.bit_width == 64:
        if column.null_count:
            row = pc.index(pc.is_null(column), True).as_py()
            raise ValueError(f"{url}: row {row} has no phash; every reference row needs one")
        values = column.to_numpy().view(_U64)  # int64 holds the same 64 bits
    else:
        raise ValueError(
            f"{url}: column 'phash' is {column.type}; expected uint64, int64 or 16 hex digits"
        )
    name = next((c for c in ("item", "key", "url") if c in table.column_names), None)
    if name is not None and table[name].null_count == 0:
        items = pc.cast(table[name], pa.string())
    else:  # FILE#ROW where there is no item name
        named = table[name].to_pylist() if name is not None else [None] * table.num_rows
        items = pa.array(
            [str(v) if v is not None else f"{url}#{row}" for row, v in enumerate(named)],
            pa.string(),
        )
    return pa.table(
        {"phash": pa.array(values, pa.uint64()), "item": items}, schema=REFERENCE_HASHES
    )


def _image_tasks(images: list[str], tars: list[str]) -> list[dict]:
    tasks = [
        {"images": images[i : i + REFERENCE_IMAGES_PER_TASK], "tar": None}
        for i in range(0, len(images), REFERENCE_IMAGES_PER_TASK)
    ]
    return tasks + [{"images": [], "tar": tar} for tar in tars]


def _sizes(urls: list[str]) -> list[int]:
    out = []
    for url in urls:
        fs, path = storage.fs_for(url)
        out.append(int(fs.size(path) or 0))
    return out


def _combine_reference(parts: list[pa.Table]) -> pa.Table:
    if not parts:
        return REFERENCE_HASHES.empty_table()
    distinct_rows = pa.concat_tables(parts).group_by(["phash", "item"]).aggregate([])
    return distinct_rows.sort_by([("phash", "ascending"), ("item", "ascending")])


def build_reference(
    inputs: list[str], out_url: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 0
) -> int:
    """Hash every image in `inputs` (folders, tars, images, parquet hash files) into `out_url`.

    Writes a REFERENCE_HASHES parquet (`phash` uint64, `item`) sorted by (phash, item), usable as a
    `dedup.reference` entry; returns its number of rows. Unreadable images are logged and skipped.
    """
    from concurrent.futures import ThreadPoolExecutor

    images, tars, tables = list_reference(inputs)
    parts = [read_reference_table(url) for url in tables]

    def one(job: dict) -> pa.Table:
        table, unreadable = _hash_images(job["images"], job["tar"], max_pixels)
        for problem in unreadable:
            log.warning("reference image skipped: %s", problem)
        return table

    with ThreadPoolExecutor(threads or _threads()) as pool:
        parts += list(pool.map(one, _image_tasks(images, tars)))
    table = _combine_reference(parts)
    storage.write_parquet(table, out_url)
    return table.num_rows


def _load_reference(ctx: StageContext, cfg: DedupSection) -> tuple[pa.Table, str]:
    """The stage's reference hashes (images hashed on the workers) and a digest of them."""
    if not cfg.reference:
        return REFERENCE_HASHES.empty_table(), ""
    images, tars, tables = list_reference(cfg.reference)
    tasks = []
    for job in _image_tasks(images, tars):
        files = job["images"] or [job["tar"]]
        name = "ref-" + _digest(json.dumps(job, sort_keys=True), *map(str, _sizes(files)))
        out_url = ctx.path("dedup", "reference", f"{name}.parquet")
        tasks.append(ShardTask(shard=name, kwargs={**job, "out_url": out_url}))
    stats = ctx.map_shards(
        "dedup/reference", hash_reference_images, tasks, fingerprint="phash-v1", unit="images"
    )
    unreadable = sum(int(s.get("unreadable", 0)) for s in stats.values())
    if unreadable:
        examples = [e for s in stats.values() for e in s.get("examples", [])][:5]
        log.warning(
            "dedup: %d reference image(s) could not be hashed, e.g.:\n  %s",
            unreadable,
            "\n  ".join(examples),
        )
    parts = [storage.read_parquet(t.kwargs["out_url"]) for t in tasks]
    parts += [read_reference_table(url) for url in tables]
    table = _combine_reference(parts)
    return table, _digest(_table_bytes(table))


# --------------------------------------------------------------------------------------------
# The search: every pair of distinct hashes within max_distance


def _threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def search_memory(values: np.ndarray, max_distance: int, threads: int = 0) -> tuple:
    """Pairs (a, b, distance) among distinct `values`, on this process."""
    return hashindex.near_pairs(values, max_distance, threads=threads or _threads())


def band_shard(
    *, hashes_url: str, out_url: str, max_distance: int, blocks: int, partitions: int
) -> dict:
    """Map step of the sharded search: a shard's distinct hashes, keyed per table and partition."""
    table = storage.read_parquet(hashes_url, columns=["phash"])
    values, valid = _u64(table["phash"])
    values = hashindex.distinct(values[valid])
    plan = hashindex.SearchPlan(max_distance, blocks)
    groups = {}
    with storage.atomic_open(out_url, "wb") as handle:
        with pq.ParquetWriter(handle, DEDUP_BANDS, compression="zstd") as writer:
            for part, tables, hashes in hashindex.band_records(values, plan, partitions):
                groups[str(part)] = len(groups)
                batch = pa.table({"table": tables, "hash": hashes}, schema=DEDUP_BANDS)
                writer.write_table(batch, row_group_size=max(batch.num_rows, 1))
    return {"items": int(values.size), "row_groups": groups}


def pair_partition(
    *, partition: int, bands: dict[str, int], out_url: str, max_distance: int, blocks: int
) -> dict:
    """Reduce step of the sharded search: the pairs of one partition, from every shard's bands."""
    tables, hashes = [], []
    for url, row_group in sorted(bands.items()):
        fs, path = storage.fs_for(url)
        with fs.open(path, "rb") as handle:
            part = pq.ParquetFile(handle).read_row_group(row_group)
        tables.append(part["table"].to_numpy())
        hashes.append(part["hash"].to_numpy())
    plan = hashindex.SearchPlan(max_distance, blocks)
    if tables:
        a, b, dist = hashindex.partition_pairs(np.concatenate(tables), np.concatenate(hashes), plan)
    else:
        a, b, dist = (np.empty(0, _U64),) * 2 + (np.empty(0, np.int32),)
    storage.write_parquet(pa.table({"a": a, "b": b, "distance": dist}, schema=HASH_PAIRS), out_url)
    return {"items": int(a.size), "records": int(sum(t.size for t in tables))}


def search_dask(
    ctx: StageContext,
    hash_files: dict[str, str],
    n_hashes: int,
    max_distance: int,
) -> tuple:
    """Pairs among the distinct `phash` values of `hash_files` ({name: parquet URL}), on workers.

    Names must change with the files' content (the stage uses SHARD-DIGEST): a finished band
    shard is reused under the same name. `n_hashes` (at least the number of distinct values)
    sizes the plan and the partitions.
    """
    plan = hashindex.plan_search(max(n_hashes, 2), max_distance)
    threads = max(1, sum(ctx.client.nthreads().values()))
    wanted = max(n_hashes * len(plan.tables) / DASK_RECORDS_PER_PARTITION, 2 * threads, 1)
    partitions = 1 << min(
        math.ceil(math.log2(wanted)), plan.min_key_bits, MAX_PARTITIONS.bit_length() - 1
    )
    settings = f"r{max_distance}-b{plan.blocks}-p{partitions}"
    band_tasks = [
        ShardTask(
            shard=name,
            kwargs=dict(
                hashes_url=url,
                out_url=ctx.path("dedup", "bands", f"{name}.parquet"),
                max_distance=max_distance,
                blocks=plan.blocks,
                partitions=partitions,
            ),
        )
        for name, url in sorted(hash_files.items())
    ]
    band_stats = ctx.map_shards(
        "dedup/bands", band_shard, band_tasks, fingerprint=_digest(settings), unit="hashes"
    )
    inputs: dict[int, dict[str, int]] = {p: {} for p in range(partitions)}
    for task in band_tasks:
        for part, row_group in band_stats[task.shard]["row_groups"].items():
            inputs[int(part)][task.kwargs["out_url"]] = int(row_group)
    pair_tasks = [
        ShardTask(
            shard=f"{p:05d}",
            kwargs=dict(
                partition=p,
                bands=inputs[p],
                out_url=ctx.path("dedup", "pairs", f"{p:05d}.parquet"),
                max_distance=max_distance,
                blocks=plan.blocks,
            ),
        )
        for p in range(partitions)
    ]
    reduce_version = _digest(settings, *sorted(hash_files))
    ctx.map_shards(
        "dedup/pairs", pair_partition, pair_tasks, fingerprint=reduce_version, unit="pairs"
    )
    parts = [storage.read_parquet(t.kwargs["out_url"]) for t in pair_tasks]
    pairs = pa.concat_tables(parts)
    return (
        pairs["a"].to_numpy().astype(_U64),
        pairs["b"].to_numpy().astype(_U64),
        pairs["distance"].to_numpy().astype(np.int32),
    )


# --------------------------------------------------------------------------------------------
# Decisions: eval overlap, clusters, keepers


def _run_starts(*columns: np.ndarray) -> np.ndarray:
    """True where a row of the sorted `columns` differs from the row before (and at row 0)."""
    size = columns[0].size
    starts = np.zeros(size, dtype=bool)
    if size:
        starts[0] = True
        for column in columns:
            starts[1:] |= column[1:] != column[:-1]
    return starts


def _ranks(strings: pa.Array) -> np.ndarray:
    """Rank of each string in sorted order."""
    order = pc.sort_indices(strings).to_numpy()
    ranks = np.empty(order.size, dtype=np.int64)
    ranks[order] = np.arange(order.size)
    return ranks


def decide(
    samples: pa.Table,
    reference: pa.Table,
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
    cfg: DedupSection,
) -> pa.Table:
    """The DEDUP table of `samples` (DEDUP_SAMPLES rows, sorted by unique key).

    `reference` is REFERENCE_HASHES; `pairs` (a, b, distance) must hold every pair of distinct
    values among the samples' and references' pHashes within `cfg.max_distance` (the search).
    The rules are the module docstring's.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = samples.num_rows
    if n == 0:
        return DEDUP.empty_table()
    rows = np.arange(n)
    keys = samples["key"].combine_chunks()
    phash, has_phash = _u64(samples["phash"])
    sha_hi, has_sha = _u64(samples["sha256_hi"])
    sha_lo, _ = _u64(samples["sha256_lo"])
    pixels = pc.fill_null(samples["pixels"], 0).to_numpy(zero_copy_only=False).astype(np.int64)
    # A sample without any detection ranks below every sample with one.
    score = pc.fill_null(samples["best_score"], -1.0).to_numpy(zero_copy_only=False)

    reference = reference.sort_by([("phash", "ascending"), ("item", "ascending")])
    ref_all, _ = _u64(reference["phash"])
    first_items = np.flatnonzero(_run_starts(ref_all))
    ref_values = ref_all[first_items]  # distinct, each with its smallest item
    ref_items = reference["item"].combine_chunks().take(pa.array(first_items))
    ref_rank = _ranks(ref_items)

    # Hash value nodes: the distinct values of samples and references, and each one's node, from
    # one sort (a binary search per sample would cost more than the whole search at 10M).
    combined = np.concatenate([phash[has_phash], ref_values])
    order = np.argsort(combined, kind="stable")
    starts = _run_starts(combined[order])
    values = combined[order][starts]
    ids = np.empty(combined.size, dtype=np.int64)
    ids[order] = np.cumsum(starts) - 1
    del combined, order, starts
    node = np.zeros(n, dtype=np.int64)
    node[has_phash] = ids[: int(has_phash.sum())]
    ref_node = ids[int(has_phash.sum()) :]
    sample_node = np.zeros(values.size, dtype=bool)
    sample_node[node[has_phash]] = True
    ref_of_node = np.full(values.size, -1, dtype=np.int64)
    ref_of_node[ref_node] = np.arange(ref_values.size)

    a, b, pair_distance = pairs
    ia, ib = np.searchsorted(values, a), np.searchsorted(values, b)
    if ia.size and (
        ia.max() >= values.size
        or ib.max() >= values.size
        or (values[ia] != a).any()
        or (values[ib] != b).any()
    ):
        raise RuntimeError("dedup: the search returned hashes that are not among the inputs")

    # 1. Evaluation overlap, per hash value: the nearest reference, then the smallest item.
    eval_ref = np.full(values.size, -1, dtype=np.int64)
    eval_distance = np.zeros(values.size, dtype=np.int32)
    if ref_values.size:
        exact = sample_node[ref_node]
        to_ref_b = sample_node[ia] & (ref_of_node[ib] >= 0)
        to_ref_a = sample_node[ib] & (ref_of_node[ia] >= 0)
        cand_node = np.concatenate([ref_node[exact], ia[to_ref_b], ib[to_ref_a]])
        cand_ref = np.concatenate(
            [np.flatnonzero(exact), ref_of_node[ib[to_ref_b]], ref_of_node[ia[to_ref_a]]]
        )
        cand_distance = np.concatenate(
            [np.zeros(int(exact.sum()), np.int32), pair_distance[to_ref_b], pair_distance[to_ref_a]]
        )
        order = np.lexsort((ref_rank[cand_ref], cand_distance, cand_node))
        best = order[_run_starts(cand_node[order])]
        eval_ref[cand_node[best]] = cand_ref[best]
        eval_distance[cand_node[best]] = cand_distance[best]
    is_eval = has_phash & (eval_ref[node] >= 0)
    live = ~is_eval

    # 2. Clusters. First the components of the hash values linked by the pairs (few edges), so a
    # sample's label is its value's component; then samples with equal sha256 are joined, which
    # only needs a second pass when their labels differ (equal bytes almost always have equal
    # pHashes). Samples without pHash, or all samples when near is off, start alone.
    space = values.size + n  # labels: value components, then one per sample on its own
    label = values.size + rows
    if cfg.near:
        live_node = sample_node & (eval_ref < 0)
        both = live_node[ia] & live_node[ib]
        _, component = connected_components(
            coo_matrix(
                (np.ones(int(both.sum()), np.int8), (ia[both], ib[both])),
                shape=(values.size, values.size),
            ),
            directed=False,
        )
        linked = live & has_phash
        label = np.where(linked, component[node], label)
    if cfg.exact:
        linked = rows[live & has_sha]
        by_sha = linked[np.argsort(sha_hi[linked], kind="stable")]
        if (_run_starts(sha_hi[by_sha]) != _run_starts(sha_hi[by_sha], sha_lo[by_sha])).any():
            by_sha = linked[np.lexsort((sha_lo[linked], sha_hi[linked]))]  # a 64-bit tie: rare
        group_start = _run_starts(sha_hi[by_sha], sha_lo[by_sha])
        first = by_sha[np.flatnonzero(group_start)][np.cumsum(group_start) - 1]
        differ = label[by_sha] != label[first]
        if differ.any():
            _, merged = connected_components(
                coo_matrix(
                    (
                        np.ones(int(differ.sum()), np.int8),
                        (label[by_sha][differ], label[first][differ]),
                    ),
                    shape=(space, space),
                ),
                directed=False,
            )
            label = merged[label]

    # 3. Keepers: most pixels, then highest best face score, then smallest key (= lowest row).
    # Only clusters with two or more live members need sorting; the others keep themselves.
    keeper = np.where(live, rows, -1)
    members = np.bincount(label[live], minlength=space)
    shared = rows[live & (members[label] > 1)]
    if shared.size:
        ordered = shared[np.lexsort((shared, -score[shared], -pixels[shared], label[shared]))]
        firsts = ordered[_run_starts(label[ordered])]
        keeper_of_label = np.full(space, -1, dtype=np.int64)
        keeper_of_label[label[firsts]] = firsts
        keeper[shared] = keeper_of_label[label[shared]]

    # 4. Fates.
    kept = live & (keeper == rows)
    duplicate = live & ~kept
    k = np.where(duplicate, keeper, 0)
    same_bytes = has_sha & has_sha[k] & (sha_hi == sha_hi[k]) & (sha_lo == sha_lo[k])
    exact_duplicate = duplicate & same_bytes & cfg.exact
    code = np.zeros(n, dtype=np.int8)
    code[exact_duplicate] = 1
    code[duplicate & ~exact_duplicate] = 2
    code[is_eval] = 3
    reason = pa.DictionaryArray.from_arrays(
        pa.array(code, mask=code == 0), pa.array(["", *REASONS])
    ).dictionary_decode()

    has_distance = (duplicate & has_phash & has_phash[k]) | is_eval
    distance = np.where(
        is_eval, eval_distance[node], np.bitwise_count(phash ^ phash[k]).astype(np.int32)
    )
    matched_ref = np.where(is_eval, eval_ref[node], 0)
    duplicate_of = pc.if_else(
        pa.array(is_eval),
        ref_items.take(pa.array(matched_ref, mask=~is_eval))
        if ref_values.size
        else pa.nulls(n, pa.string()),
        keys.take(pa.array(k, mask=~duplicate)),
    )
    return pa.table(
        {
            "key": keys,
            "kept": pa.array(kept),
            "reason": reason,
            "duplicate_of": pc.cast(duplicate_of, pa.string()),
            "distance": pa.array(distance.astype(np.int32), mask=~has_distance),
            "cluster": pa.array(keeper, mask=is_eval),
        },
        schema=DEDUP,
    )


# --------------------------------------------------------------------------------------------
# The stage


def _file_versions(folder_url: str, suffix: str) -> dict[str, str]:
    """{shard id: size and modification stamp} of the files in a folder, from one listing."""
    fs, path = storage.fs_for(folder_url)
    if not fs.exists(path):
        return {}
    out = {}
    for info in fs.ls(path, detail=True):
        name = posixpath.basename(info["name"].rstrip("/"))
        if name.startswith(storage.TEMP_PREFIX) or not name.endswith(suffix):
            continue
        stamp = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
        out[name[: -len(suffix)]] = f"{info.get('size')}-{stamp}-{info.get('ETag', '')}"
    return out


def _shard_versions(ctx: StageContext) -> dict[str, str]:
    """{shard id: version of its faces and select files}, for every select shard, sorted."""
    selected = _file_versions(ctx.path("select"), ".parquet")
    faces = _file_versions(ctx.path("faces"), ".parquet")
    missing = sorted(sid for sid in selected if sid not in faces)
    if missing:
        raise FileNotFoundError(
            f"dedup: {ctx.path('faces', missing[0] + '.parquet')} is missing for "
            f"{ctx.path('select', missing[0] + '.parquet')} ({len(missing)} shard(s) in all); "
            "run the faces stage first"
        )
    return {sid: _digest(faces[sid], selected[sid]) for sid in sorted(selected)}


def _load_samples(urls: list[str]) -> pa.Table:
    """Every shard's samples, sorted by key, with the index of their shard in `urls`."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        tables = list(pool.map(storage.read_parquet, urls))
    tables = [
        t.cast(DEDUP_SAMPLES).append_column("shard", pa.array(np.full(t.num_rows, i, np.int32)))
        for i, t in enumerate(tables)
    ]
    if not tables:
        return DEDUP_SAMPLES.empty_table().append_column("shard", pa.array([], pa.int32()))
    table = pa.concat_tables(tables).sort_by("key")
    keys = table["key"].combine_chunks()
    if len(keys) > 1:
        same = pc.equal(keys.slice(1), keys.slice(0, len(keys) - 1))
        if pc.any(same).as_py():
            row = pc.index(same, True).as_py()
            shards = table["shard"].to_numpy()[row : row + 2]
            raise ValueError(
                f"dedup: key {keys[row].as_py()!r} appears in {urls[shards[0]]} and "
                f"{urls[shards[1]]}; keys must be unique across shards"
            )
    return table


def _drop_counts(shard_ids: list[str], shard: np.ndarray, reason: pa.Array) -> pa.Table:
    codes = {name: i for i, name in enumerate(REASONS)}
    dropped = np.flatnonzero(pc.is_valid(reason).to_numpy(zero_copy_only=False))
    names = reason.take(pa.array(dropped)).to_pylist()
    code = np.array([codes[x] for x in names], dtype=np.int64)
    combined = shard[dropped].astype(np.int64) * len(REASONS) + code
    found, counts = np.unique(combined, return_counts=True)
    rows = [
        {
            "stage": "dedup",
            "source": shard_ids[int(c) // len(REASONS)],
            "reason": REASONS[int(c) % len(REASONS)],
            "count": int(count),
        }
        for c, count in zip(found, counts, strict=True)
    ]
    return pa.Table.from_pylist(rows, schema=DROP_COUNTS)


def run(ctx: StageContext) -> None:
    cfg = ctx.config.dedup
    # A sample step's name carries the version of its input files, so rewritten faces or select
    # files (a retried download) are read again even though the settings did not change.
    versions = _shard_versions(ctx)
    shard_ids = list(versions)
    sample_urls = [ctx.path("dedup", "samples", f"{sid}.parquet") for sid in shard_ids]
    tasks = [
        ShardTask(
            shard=f"{sid}-{versions[sid][:8]}",
            kwargs=dict(
                faces_url=ctx.path("faces", f"{sid}.parquet"),
                select_url=ctx.path("select", f"{sid}.parquet"),
                out_url=url,
            ),
        )
        for sid, url in zip(shard_ids, sample_urls, strict=True)
    ]
    done = ctx.map_shards(
        "dedup/samples", prepare_shard, tasks, fingerprint=fingerprint(ctx.config, "select")
    )
    sample_stats = {sid: done[task.shard] for sid, task in zip(shard_ids, tasks, strict=True)}
    reference, reference_digest = _load_reference(ctx, cfg)

    state = _digest(
        fingerprint(ctx.config, "dedup"),
        reference_digest,
        *(f"{sid}:{sample_stats[sid]['digest']}" for sid in shard_ids),
    )
    decisions_url = ctx.path("dedup", "decisions.parquet")
    marker_url = ctx.path("dedup", "_done", "decisions.json")
    status = ctx.run.stage("dedup")
    if storage.exists(marker_url) and storage.exists(decisions_url):
        marker = storage.read_json(marker_url)
        if marker.get("state") == state:
            log.info("dedup: %s is up to date", decisions_url)
            status["counts"] = marker["counts"]
            ctx.run.save()
            return

    samples = _load_samples(sample_urls)
    phash, has_phash = _u64(samples["phash"])
    ref_values, _ = _u64(reference["phash"])
    estimate = sum(int(sample_stats[sid]["hashes"]) for sid in shard_ids) + len(ref_values)
    backend = cfg.backend
    if backend == "auto":
        backend = "memory" if estimate <= MEMORY_BACKEND_MAX_HASHES else "dask"
    searching = cfg.max_distance > 0 and (cfg.near or len(ref_values) > 0)
    if not searching:
        pairs = (np.empty(0, _U64), np.empty(0, _U64), np.empty(0, np.int32))
    elif backend == "memory":
        values = hashindex.distinct(np.concatenate([phash[has_phash], ref_values]))
        pairs = search_memory(values, cfg.max_distance)
    else:
        hash_files = {
            f"{sid}-{sample_stats[sid]['digest']}": url
            for sid, url in zip(shard_ids, sample_urls, strict=True)
        }
        if len(ref_values):
            url = ctx.path("dedup", "reference", f"hashes-{reference_digest}.parquet")
            storage.write_parquet(reference.select(["phash"]), url)
            hash_files[f"reference-{reference_digest}"] = url
        pairs = search_dask(ctx, hash_files, estimate, cfg.max_distance)

    decisions = decide(samples.drop_columns(["shard"]), reference, pairs, cfg)
    storage.write_parquet(decisions, decisions_url)
    reason = decisions["reason"].combine_chunks()
    drops = _drop_counts(shard_ids, samples["shard"].to_numpy(), reason)
    storage.write_parquet(drops, ctx.path("dedup", "drops.parquet"))

    counts = {"samples": decisions.num_rows, "kept": int(pc.sum(decisions["kept"]).as_py() or 0)}
    for name in REASONS:
        counts[name] = int(pc.sum(pc.equal(reason, name)).as_py() or 0)
    counts.update(
        hash_pairs=int(pairs[0].size),
        reference_hashes=int(len(ref_values)),
        backend=backend if searching else "none",
    )
    status["counts"] = counts
    ctx.run.save()
    storage.write_json(marker_url, {"state": state, "counts": counts})
    log.info(
        "dedup: %d samples, %d kept, %d exact duplicates, %d near duplicates, %d eval overlaps",
        counts["samples"],
        counts["kept"],
        counts["exact_duplicate"],
        counts["near_duplicate"],
        counts["eval_overlap"],
    )
