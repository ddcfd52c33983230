"""Reference hashes: evaluation sets and earlier datasets the dataset must stay disjoint from.

`dedup.reference` (and `laionface reference`, `build_reference`, to precompute a hash file) names
entries: a folder (searched recursively for images, webdataset tars and parquet hash files), a
glob, a tar, an image, or a parquet file with a `phash` column (uint64, int64 with the same bits,
or 16 hex digits, as a laionface dataset's NNNNN.parquet writes it) and an item column (`item`,
else `key`, else `url`; else FILE#ROW). For an incremental build, name the earlier dataset's
folder: its shard parquets give the hashes and the keys, and its tars are not hashed again.
Images are hashed with `imagedecode.phash_image`, the faces stage's own pHash; an image item is
its path, a tar member's is TAR#MEMBER.

In a run, each job (a slice of images, one tar, one hash table) is a task of the step
`dedup/reference` that writes `dedup/reference/ref-NNNNN.parquet` (REFERENCE_HASHES, sorted);
the decisions read them back with `combine_reference`.
"""

from __future__ import annotations

import io
import logging
import posixpath
import tarfile
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from laionface.io import storage
from laionface.io.imagedecode import phash_image
from laionface.io.schemas import REFERENCE_HASHES
from laionface.layout import IMAGE_EXTENSIONS, is_image_name
from laionface.stages.dedup.hashindex import default_threads
from laionface.stages.dedup.samples import hex_to_u64

log = logging.getLogger("laionface")

# Reference images hashed per task when a folder is hashed on the workers.
REFERENCE_IMAGES_PER_TASK = 2000
DEFAULT_MAX_PIXELS = 50_000_000
MAX_MEMBER_BYTES = 50_000_000


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
            if is_image_name(name):
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
            if not member.isfile() or not is_image_name(member.name):
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
        values = column.to_numpy().view(np.uint64)  # int64 holds the same 64 bits
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


def reference_jobs(entries: Iterable[str]) -> list[dict]:
    """The jobs that hash `entries`: slices of images, each tar, each parquet hash table."""
    images, tars, tables = list_reference(entries)
    jobs: list[dict] = [
        {"images": images[i : i + REFERENCE_IMAGES_PER_TASK], "tar": None, "table": None}
        for i in range(0, len(images), REFERENCE_IMAGES_PER_TASK)
    ]
    jobs += [{"images": [], "tar": tar, "table": None} for tar in tars]
    return jobs + [{"images": [], "tar": None, "table": table} for table in tables]


def job_files(job: dict) -> list[str]:
    """The files a job reads."""
    return job["images"] or [job["tar"] or job["table"]]


def _job_hashes(job: dict, max_pixels: int) -> tuple[pa.Table, list[str]]:
    if job["table"] is not None:
        return read_reference_table(job["table"]), []
    return _hash_images(job["images"], job["tar"], max_pixels)


def hash_reference(*, job: dict, out_url: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Write the REFERENCE_HASHES of one job (sorted); stats name a few unreadable images."""
    table, unreadable = _job_hashes(job, max_pixels)
    table = table.sort_by([("phash", "ascending"), ("item", "ascending")])
    storage.write_parquet(table, out_url)
    return {"items": table.num_rows, "unreadable": len(unreadable), "examples": unreadable[:5]}


def combine_reference(parts: list[pa.Table]) -> pa.Table:
    """Reference tables as one, each (phash, item) once, sorted."""
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

    def one(job: dict) -> pa.Table:
        table, unreadable = _job_hashes(job, max_pixels)
        for problem in unreadable:
            log.warning("reference image skipped: %s", problem)
        return table

    with ThreadPoolExecutor(threads or default_threads()) as pool:
        parts = list(pool.map(one, reference_jobs(inputs)))
    table = combine_reference(parts)
    storage.write_parquet(table, out_url)
    return table.num_rows
