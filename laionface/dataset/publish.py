"""`laionface publish RUN TARGET`: copy a finished dataset to any fsspec URL, safely.

Every file but dataset.json is copied (each written under a temporary name and renamed, so no
reader sees a partial file), the copy is verified against the source's dataset.json, and only
then is dataset.json written: a folder without it is an unfinished publish, never a dataset.
Re-running after an interruption continues: files already at the target with the right size and
sha256 are not copied again.

Object stores: credentials come from the usual places (for S3: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, ~/.aws, instance roles). For an S3-compatible server (MinIO, Ceph, R2...)
set its endpoint with fsspec's documented configuration, e.g.
`FSSPEC_S3_ENDPOINT_URL=http://minio:9000` (fsspec passes `FSSPEC_<protocol>_<kwarg>` variables
to the filesystem as keyword arguments; `FSSPEC_S3='{"client_kwargs": {...}}'` takes JSON), or
botocore's own `AWS_ENDPOINT_URL_S3`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

from laionface.dataset.contract import DATASET_FILE, DATASET_JSON, dataset_folder
from laionface.dataset.verify import file_sizes, verify
from laionface.engine.lease import holding
from laionface.io import storage
from laionface.layout import LEASE_FILE

log = logging.getLogger("laionface")

CHUNK = 16 * 1024 * 1024


class PublishError(RuntimeError):
    """The dataset can't be published to the target; the message says why and what to do."""


def sha256_of(url: str) -> str:
    """The sha256 (hex) of a file, read in chunks."""
    fs, path = storage.fs_for(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy(source_url: str, target_url: str, entry: dict) -> None:
    """Copy one file, checking the bytes read against the sha256 dataset.json lists."""
    fs, path = storage.fs_for(source_url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as source, storage.atomic_open(target_url, "wb") as target:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            target.write(chunk)
        if digest.hexdigest() != entry["sha256"]:
            # Raised inside atomic_open: the partial copy is deleted, never renamed into place.
            raise PublishError(
                f"{source_url}: sha256 differs from dataset.json: the source dataset is "
                f"corrupt; run laionface verify {source_url.rsplit('/', 1)[0]}"
            )


def place_file(source_url: str, target_url: str, entry: dict, present_size: int | None) -> str:
    """Copy one dataset file unless the target (`present_size` bytes; None: absent) already
    holds it (entry's size and sha256); returns "copied" or "skipped". Raises PublishError when
    the source's bytes are not the ones `entry` lists."""
    if present_size == entry["size"] and sha256_of(target_url) == entry["sha256"]:
        return "skipped"
    _copy(source_url, target_url, entry)
    return "copied"


def _strays(target: str, present: dict[str, int], files: dict, replace: bool) -> list[str]:
    """Files at the target that are not part of this dataset; an error unless they are another
    dataset's and `replace` allows deleting them."""
    strays = sorted(
        name
        for name in present
        if name not in files
        and name not in (DATASET_JSON, LEASE_FILE)
        and not name.startswith(storage.TEMP_PREFIX)
    )
    unknown = [name for name in strays if not DATASET_FILE.fullmatch(name)]
    if unknown or (strays and not replace):
        shown = ", ".join((unknown or strays)[:5])
        raise PublishError(
            f"{target} holds files that are not part of this dataset ({shown}"
            f"{', ...' if len(unknown or strays) > 5 else ''}): publish into an empty folder"
            + ("" if unknown else ", or pass --replace to delete them")
        )
    return strays


def _copy_all(
    source_url: str, target: str, files: dict, present: dict[str, int], workers: int, on_file
) -> dict[str, int]:
    """Copy every listed file not already at the target; {"copied": n, "skipped": m}."""

    def place(name: str) -> tuple[str, str]:
        source, target_url = storage.join(source_url, name), storage.join(target, name)
        return name, place_file(source, target_url, files[name], present.get(name))

    counts = {"copied": 0, "skipped": 0}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(place, name) for name in sorted(files)]
        try:
            for future in as_completed(futures):
                name, action = future.result()
                counts[action] += 1
                if on_file is not None:
                    on_file(name, action)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return counts


def publish(
    source: str,
    target: str,
    *,
    replace: bool = False,
    workers: int = 4,
    check_images: bool = True,
    on_file: Callable[[str, str], None] | None = None,
    force: bool = False,
) -> int:
    """Publish the dataset of run (or dataset folder) `source` to `target`; returns 0.

    `replace`: allow replacing another dataset already published at `target`.
    `on_file(name, action)` is called after each file, action "copied" or "skipped".
    Raises PublishError when the target holds something else or the copy does not verify, and
    LeaseHeld when another command is writing the target (`force` takes over a stale lease).
    """
    with holding(target, "laionface publish", force):
        return _publish(source, target, replace, workers, check_images, on_file)


def _publish(
    source: str,
    target: str,
    replace: bool,
    workers: int,
    check_images: bool,
    on_file: Callable[[str, str], None] | None,
) -> int:
    source_url = dataset_folder(source)
    target = target.rstrip("/")
    meta_bytes = storage.read_bytes(storage.join(source_url, DATASET_JSON))
    meta = json.loads(meta_bytes)
    target_meta = storage.join(target, DATASET_JSON)
    if storage.exists(target_meta):
        if storage.read_bytes(target_meta) == meta_bytes:
            log.info("publish: %s already holds this dataset", target)
            return 0
        if not replace:
            raise PublishError(
                f"{target} already holds another published dataset; pass --replace to "
                "replace it (its dataset.json is removed first, so readers never see a mix)"
            )
        storage.remove(target_meta)
    present = file_sizes(target)
    strays = _strays(target, present, meta["files"], replace)
    counts = _copy_all(source_url, target, meta["files"], present, workers, on_file)
    log.info(
        "publish: %d files copied, %d already there; verifying the copy",
        counts["copied"],
        counts["skipped"],
    )
    for name in strays:
        storage.remove(storage.join(target, name))
    for name in present:
        if name.startswith(storage.TEMP_PREFIX):
            storage.remove(storage.join(target, name))  # an interrupted earlier publish's
    problems = verify(target, expected=meta, check_images=check_images, workers=workers)
    if problems:
        raise PublishError(
            f"the copy at {target} does not verify, so dataset.json was not written:\n  "
            + "\n  ".join(problems)
        )
    storage.write_bytes(target_meta, meta_bytes)
    log.info("publish: %s is complete (%d samples)", target, meta["counts"]["samples"])
    return 0
