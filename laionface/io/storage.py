"""File access on any fsspec URL (a local path, s3://, memory://), with atomic writes.

A reader must never see a partial output: every write goes to a hidden temporary name in the same
folder and is renamed into place only once it is complete. On object stores a rename is a copy, so
the runner's completion markers (written after the outputs) are what a re-run trusts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

TEMP_PREFIX = ".tmp-"


def fs_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path within it for `url`."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URL parts with "/" whatever the filesystem (s3://b/run + raw/00000.tar)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}" if part else out
    return out


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def is_process_local(url: str) -> bool:
    """memory:// lives in one process: workers in other processes would not see it."""
    return protocol_of(url) == "memory"


def exists(url: str) -> bool:
    fs, path = fs_for(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = fs_for(url)
    fs.makedirs(path, exist_ok=True)


def _temp_path(path: str) -> str:
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")


@contextlib.contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[Any]:
    """Open `url` for writing; the file appears under its name only if the block completes."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes only ('wb' or 'w'), got {mode!r}")
    fs, path = fs_for(url)
    fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    temp = _temp_path(path)
    try:
        with fs.open(temp, mode) as handle:
            yield handle
        if isinstance(fs, LocalFileSystem):
            os.replace(temp, path)  # atomic on POSIX, and overwrites
        else:
            fs.mv(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.rm(temp)
        raise


def write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url, "wb") as handle:
        handle.write(data)


def read_bytes(url: str) -> bytes:
    fs, path = fs_for(url)
    with fs.open(path, "rb") as handle:
        return handle.read()


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode() + b"\n")


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def write_parquet(table: pa.Table, url: str, row_group_size: int | None = None) -> None:
    """Write a parquet file atomically (zstd; deterministic bytes for the same table)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=row_group_size)
    write_bytes(url, buffer.getvalue())


def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = fs_for(url)
    with fs.open(path, "rb") as handle:
        # ParquetFile, not pq.read_table: read_table imports pyarrow.dataset (~0.3-1 s of CPU in
        # every worker process) for features a single file doesn't need.
        return pq.ParquetFile(handle).read(columns=columns)


def list_files(url: str, suffix: str = "") -> list[str]:
    """Sorted URLs of the complete files directly in folder `url` ending in `suffix`."""
    fs, path = fs_for(url)
    if not fs.exists(path):
        return []
    out = []
    for entry in fs.ls(path, detail=False):
        name = posixpath.basename(entry.rstrip("/"))
        if name.startswith(TEMP_PREFIX) or not name.endswith(suffix):
            continue
        out.append(join(url, name))
    return sorted(out)


def remove(url: str, recursive: bool = False) -> None:
    fs, path = fs_for(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


# What tells two versions of a file apart, in the order tried: a content tag where the store has
# one (S3's ETag, GCS's md5Hash), else a modification time.
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "mtime", "LastModified", "updated", "created")


def version_of(info: dict[str, Any]) -> str:
    """A file's version from its listing entry: its size plus its ETag, digest or mtime."""
    stamp: Any = ""
    for key in _VERSION_KEYS:
        if info.get(key):
            stamp = info[key]
            break
    if isinstance(stamp, dt.datetime):
        stamp = stamp.timestamp()
    return f"{info.get('size')}:{stamp}"


def file_versions(urls: Iterable[str]) -> dict[str, str | None]:
    """{url: version} of files, None for a missing one; one listing per folder, so asking for
    every shard of a stage costs a few requests, not one per file."""
    by_folder: dict[str, list[str]] = {}
    for url in dict.fromkeys(urls):
        by_folder.setdefault(url.rsplit("/", 1)[0] if "/" in url else ".", []).append(url)
    out: dict[str, str | None] = {}
    for folder, members in by_folder.items():
        fs, path = fs_for(folder)
        listing = {}
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for info in fs.ls(path, detail=True):
                listing[posixpath.basename(info["name"].rstrip("/"))] = info
        for url in members:
            info = listing.get(url.rsplit("/", 1)[-1])
            if info is None and not listing:  # a store that can't list (http): ask the file
                with contextlib.suppress(FileNotFoundError, OSError):
                    info = fs.info(fs_for(url)[1])
            out[url] = None if info is None or info.get("type") == "directory" else version_of(info)
    return out
