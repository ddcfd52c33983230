"""`laionface verify`: does a dataset folder keep the contract (laionface.dataset.contract)?

`verify(url)` reads every byte of a dataset once (any fsspec URL) and returns every problem it
finds, as lines that name the file, the key and what is wrong; an empty list means the dataset
is intact: checksums, tar/parquet agreement, the webdataset key rules, the order rule (the
samples' order, and the shards' cut: by count and size, or a takedown version's shards holding
at most samples_per_shard each), n_faces against the counted faces, sizes.json, shardindex.json
and manifest.parquet against the tars, the dataset card's configs, and every image decodes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow.parquet as pq

from laionface.dataset import contract
from laionface.dataset.contract import DATASET_JSON_SCHEMA, MANIFEST
from laionface.dataset.verify_shard import (
    Problems,
    ShardSummary,
    check_copy_shard,
    check_manifest_shard,
    read_checked,
    schema_problems,
    shard_keys,
)
from laionface.io import storage
from laionface.layout import LEASE_FILE

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# Bytes read at a time when hashing a file that can be large (manifest.parquet).
HASH_CHUNK = 8 * 1024 * 1024


def file_sizes(dataset_url: str) -> dict[str, int]:
    """name -> size of each entry directly in the folder ({} when it does not exist)."""
    fs, path = storage.fs_for(dataset_url)
    if not fs.exists(path):
        return {}
    return {
        info["name"].rstrip("/").rsplit("/", 1)[-1]: int(info.get("size") or 0)
        for info in fs.ls(path, detail=True)
    }


def _read_json_file(url: str, entry: dict | None, problems: Problems) -> Any:
    data = read_checked(url, entry, problems)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError as exc:
        problems.add(f"not valid JSON ({exc})")
        return None


def _check_indexes(dataset_url: str, meta: dict, results: dict[str, ShardSummary]) -> list[str]:
    """sizes.json and shardindex.json against the tars that were read."""
    files = meta["files"]
    sizes_problems = Problems(contract.SIZES_JSON)
    sizes = _read_json_file(
        storage.join(dataset_url, contract.SIZES_JSON),
        files.get(contract.SIZES_JSON),
        sizes_problems,
    )
    actual = contract.sizes({name: r.samples for name, r in results.items() if r.tar})
    if isinstance(sizes, dict):
        for tar in sorted(set(sizes) | set(actual)):
            if sizes.get(tar) != actual.get(tar):
                sizes_problems.add(f"{tar}: says {sizes.get(tar)}, the tar has {actual.get(tar)}")
    elif sizes is not None:
        sizes_problems.add("not an object of tar name -> sample count")
    index_problems = Problems(contract.SHARD_INDEX_JSON)
    index = _read_json_file(
        storage.join(dataset_url, contract.SHARD_INDEX_JSON),
        files.get(contract.SHARD_INDEX_JSON),
        index_problems,
    )
    if isinstance(index, dict):
        _shard_index_problems(index, meta, results, index_problems)
    elif index is not None:
        index_problems.add("not a wids shard index object")
    return sizes_problems.lines() + index_problems.lines()


def _shard_index_problems(
    index: dict, meta: dict, results: dict[str, ShardSummary], problems: Problems
) -> None:
    if index.get("__kind__") != contract.WIDS_KIND:
        problems.add(f"__kind__ is not {contract.WIDS_KIND}")
    if index.get("name") != meta["name"]:
        problems.add(
            f"name is {index.get('name')!r}, the dataset's is {meta['name']!r} (wids names "
            "its cache after it)"
        )
    listed = {e.get("url"): e for e in index.get("shardlist", []) if isinstance(e, dict)}
    for name, result in sorted(results.items()):
        entry = listed.pop(contract.tar_name(name), None)
        if entry is None:
            problems.add(f"no entry for {name}.tar")
        elif result.tar:
            want = {
                "md5sum": result.tar["md5"],
                "nsamples": result.samples,
                "filesize": result.tar["size"],
            }
            for field_name, value in want.items():
                if entry.get(field_name) != value:
                    problems.add(
                        f"{name}.tar: {field_name} is {entry.get(field_name)!r}, the tar "
                        f"gives {value!r}"
                    )
    for url in sorted(str(u) for u in listed):
        problems.add(f"entry for {url}, which is not a shard of this dataset")


def _manifest_file_problems(dataset_url: str, meta: dict, results: dict[str, ShardSummary]):
    """manifest.parquet as a file (streamed: it can be large): its checksum against its entry,
    its schema, and that every row belongs to a shard's sample (the shards checked their own)."""
    problems = Problems(contract.MANIFEST_PARQUET)
    url = storage.join(dataset_url, contract.MANIFEST_PARQUET)
    fs, path = storage.fs_for(url)
    if not fs.exists(path):
        return problems.lines()  # the listing check names it
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    entry = meta["files"].get(contract.MANIFEST_PARQUET)
    if entry is not None and (size, digest.hexdigest()) != (entry["size"], entry["sha256"]):
        problems.add("size or sha256 differs from dataset.json (the file is corrupt or changed)")
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
    except Exception as exc:  # pyarrow raises several types for a broken file
        problems.add(f"not a readable parquet file ({exc})")
        return problems.lines()
    if not schema.equals(MANIFEST):
        problems.add(f"schema differs from manifests/manifest.arrow.json: {schema}")
        return problems.lines()
    owned = sum(r.manifest_rows for r in results.values())
    if rows != owned:
        problems.add(f"{rows - owned} row(s) for shards that are not in the dataset")
    return problems.lines()


def _order_across(dataset_url: str, mode: str, results: dict[str, ShardSummary]) -> list[str]:
    """The order rule across shards: each shard's first sample after the last one before it
    (within a shard, its own check saw to it). So no key repeats across shards either; where
    the order breaks, the earlier shard's keys are read to say whether a key repeats."""
    what = "tar" if mode == "copy" else "parquet"
    last: tuple[str, str] | None = None
    before = ""
    for name in sorted(results):
        pair = results[name].first
        if pair is None:
            continue
        if last is not None and pair <= last:
            if pair[1] in shard_keys(dataset_url, before, mode):
                return [
                    f"keys: key {pair[1]} appears in {before}.{what} and {name}.{what}; keys "
                    "must be unique across the dataset"
                ]
            return [
                f"{name}.{what}: its first sample (key {pair[1]}, raw shard {pair[0]}) comes "
                f"after key {last[1]} (raw shard {last[0]}) of {before}.{what}: the order rule "
                "sorts samples by raw shard, then key"
            ]
        last, before = results[name].last, name
    return []


def _takedown_shape_problems(meta: dict, counts: dict[str, int], what: str) -> list[str]:
    """A takedown version's shards: the previous version's, each holding at most
    samples_per_shard samples (contract.ORDER_RULE)."""
    per_shard = meta["samples_per_shard"]
    return [
        f"{name}.{what}: {counts[name]} samples, more than samples_per_shard = {per_shard}"
        for name in sorted(counts)
        if counts[name] > per_shard
    ]


def _shape_problems(
    meta: dict, counts: dict[str, int], what: str, samples_bytes: list[int] | None = None
) -> list[str]:
    """The shards' sample counts against the order rule's cut (contract.cut_shards), from the
    bytes each sample takes in its tar (`samples_bytes`, in order; copy mode); a takedown
    version's against its own rule."""
    total, listed = sum(counts.values()), meta["counts"]["samples"]
    count_problem = (
        [] if total == listed else [f"dataset.json: counts.samples is {listed}, found {total}"]
    )
    if contract.is_takedown(meta):
        return _takedown_shape_problems(meta, counts, what) + count_problem
    out = []
    names = sorted(counts)
    per_shard, max_bytes = meta["samples_per_shard"], meta.get("max_shard_bytes")
    if max_bytes is not None and samples_bytes is None:
        out.append(
            f"dataset.json: max_shard_bytes is {max_bytes}, but a {meta['mode']} dataset has no tars to cut"
        )
        max_bytes = None
    sizes = samples_bytes if max_bytes is not None else [0] * total
    expected = contract.cut_shards(sizes, per_shard, max_bytes)
    rule = f"samples_per_shard = {per_shard}" + (
        f", max_shard_bytes = {max_bytes:,}" if max_bytes is not None else ""
    )
    for name, want in zip(names, expected, strict=False):
        if counts[name] != want:
            out.append(
                f"{name}.{what}: {counts[name]} samples; the order rule ({rule}) puts {want} in it"
            )
            break  # the shards after it are shifted: one line says it
    if not out and len(expected) != len(names):
        out.append(f"{len(names)} shards; the order rule ({rule}) cuts {len(expected)}")
    return out + count_problem


def _map(fn: Callable, items: list, workers: int) -> list:
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _read_meta(dataset_url: str) -> tuple[dict | None, list[str]]:
    """The folder's dataset.json, or the problem that stops the check."""
    try:
        return storage.read_json(storage.join(dataset_url, contract.DATASET_JSON)), []
    except FileNotFoundError:
        return None, [
            f"{dataset_url}/{contract.DATASET_JSON}: missing, so this is not a complete dataset "
            "(emit or publish did not finish, or the path is wrong)"
        ]
    except ValueError as exc:
        return None, [f"{contract.DATASET_JSON}: not valid JSON ({exc})"]


def _listing_problems(dataset_url: str, meta: dict) -> list[str]:
    """The folder's files against dataset.json's list, and that list against the contract."""
    problems = []
    files = meta["files"]
    listing = file_sizes(dataset_url)
    for name in sorted(listing):
        if name.startswith(storage.TEMP_PREFIX):
            problems.append(f"{name}: a leftover partial write; delete it")
        elif name not in files and name not in (contract.DATASET_JSON, LEASE_FILE):
            problems.append(f"{name}: not listed in dataset.json")
    for name in sorted(files):
        if name not in listing:
            problems.append(f"{name}: listed in dataset.json but missing")
    expected_names = contract.expected_files(meta)
    for name in expected_names:
        if name not in files:
            problems.append(f"dataset.json: does not list {name}")
    for name in sorted(set(files) - set(expected_names)):
        problems.append(
            f"dataset.json: lists {name}, which is not part of a {meta['mode']} dataset"
        )
    return problems


def _card_problems(dataset_url: str, meta: dict) -> list[str]:
    """README.md (the dataset card) against its entry and the configs the contract gives."""
    problems = Problems(contract.DATASET_CARD)
    data = read_checked(
        storage.join(dataset_url, contract.DATASET_CARD),
        meta["files"].get(contract.DATASET_CARD),
        problems,
    )
    front = contract.card_configs(meta["mode"])
    if data is not None and not data.decode("utf-8", "replace").startswith(front):
        problems.add(
            f"its front matter is not the {meta['mode']} mode's configs (Hugging Face datasets "
            "loads the folder by them):\n" + front
        )
    return problems.lines()


def _verify_copy_mode(
    dataset_url: str, meta: dict, names: list[str], check_images: bool, max_pixels: int, workers
) -> list[str]:
    files, max_bytes = meta["files"], meta.get("max_shard_bytes")
    checked = _map(
        lambda n: check_copy_shard(
            dataset_url, n, files, check_images, max_pixels, sizes=max_bytes is not None
        ),
        names,
        workers,
    )
    results = dict(zip(names, checked, strict=True))
    problems = [line for name in names for line in results[name].problems]
    present = {n: r for n, r in results.items() if r.tar}
    samples_bytes = [size for n in sorted(present) for size in present[n].sizes]
    problems += _shape_problems(
        meta, {n: r.samples for n, r in present.items()}, "tar", samples_bytes
    )
    for name, result in sorted(present.items()):
        if max_bytes is not None and result.tar["size"] > max_bytes and result.samples > 1:
            problems.append(
                f"{contract.tar_name(name)}: {result.tar['size']:,} bytes with {result.samples} "
                f"samples, over max_shard_bytes = {max_bytes:,}"
            )
    problems += _order_across(dataset_url, "copy", results)
    problems += _check_indexes(dataset_url, meta, results)
    return problems + _manifest_file_problems(dataset_url, meta, results)


def verify(
    path: str,
    *,
    expected: dict | None = None,
    source_root: str | None = None,
    check_images: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    workers: int | None = None,
) -> list[str]:
    """Every problem of the dataset at `path` (a folder or any fsspec URL); [] when it is intact.

    `expected`: check against this dataset.json content instead of the folder's own (publish
    verifies a copy before writing its dataset.json). `source_root`: where a manifest-mode
    dataset's raw tars are, if not at dataset.json's source_root. Shards are checked on
    `workers` threads, each returning a summary (verify_shard.py): memory grows with the
    number of shards, not of samples.
    """
    dataset_url = path.rstrip("/")
    workers = workers or min(8, os.cpu_count() or 1)
    meta, problems = (expected, []) if expected is not None else _read_meta(dataset_url)
    if meta is None:
        return problems
    problems = schema_problems(meta, DATASET_JSON_SCHEMA, contract.DATASET_JSON)
    if problems:
        return problems
    problems = _listing_problems(dataset_url, meta) + _card_problems(dataset_url, meta)
    names = contract.shard_names(meta["counts"]["shards"])
    if meta["mode"] == "copy":
        return problems + _verify_copy_mode(
            dataset_url, meta, names, check_images, max_image_pixels, workers
        )
    return problems + _verify_manifest_mode(
        dataset_url, meta, names, source_root, check_images, max_image_pixels, workers
    )


def _verify_manifest_mode(
    dataset_url: str,
    meta: dict,
    names: list[str],
    source_root: str | None,
    check_images: bool,
    max_pixels: int,
    workers: int,
) -> list[str]:
    root = source_root or meta["source_root"]
    checked = _map(
        lambda n: check_manifest_shard(dataset_url, n, meta, root, check_images, max_pixels),
        names,
        workers,
    )
    results = dict(zip(names, checked, strict=True))
    # A raw tar read by two shards says its problems twice: once is enough.
    problems = list(dict.fromkeys(line for n in names for line in results[n].problems))
    counts = {n: r.samples for n, r in results.items() if r.parquet_read}
    problems += _shape_problems(meta, counts, "parquet")
    problems += _order_across(dataset_url, "manifest", results)
    problems += _manifest_file_problems(dataset_url, meta, results)
    referenced = {tar for r in results.values() for tar in r.sources}
    for tar in sorted(set(meta["sources"]) - referenced):
        problems.append(f"dataset.json: sources lists {tar}, which no manifest row points into")
    return problems
