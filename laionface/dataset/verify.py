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
import io
import json
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from laionface.dataset import contract
from laionface.dataset.contract import (
    DATASET_JSON_SCHEMA,
    DATASET_SHARD,
    MANIFEST,
    SAMPLE_JSON_SCHEMA,
    sample_json,
)
from laionface.io import storage
from laionface.io.tars import HashingReader, UnsafeTar, iter_members, members_of, name_problem
from laionface.layout import LEASE_FILE

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# One shard's problems are cut to this many lines (a broken shard can have thousands).
MAX_PROBLEMS_PER_FILE = 20


def _validator(schema: dict):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema)


def schema_problems(obj: Any, schema: dict, where: str) -> list[str]:
    """Each way `obj` breaks the JSON Schema, as '{where}: {path}: {message}'."""
    out = []
    for error in sorted(_validator(schema).iter_errors(obj), key=lambda e: list(e.absolute_path)):
        path = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        out.append(f"{where}: {path}: {error.message}")
    return out


# ---------------------------------------------------------------------------------------------
# Checks.


def image_problem(data: bytes, max_pixels: int) -> str | None:
    """Why the image bytes don't decode (or are too large to), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return f"{width}x{height} pixels, over the {max_pixels:,} pixel cap"
                image.verify()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    except Exception as exc:  # PIL raises many types for corrupt data; all mean "broken"
        return f"does not decode ({type(exc).__name__}: {exc})"
    return None


class _Problems(list):
    """Problem lines of one file, cut after MAX_PROBLEMS_PER_FILE."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.dropped = 0

    def add(self, text: str, prefix: bool = True) -> None:
        if len(self) < MAX_PROBLEMS_PER_FILE:
            self.append(f"{self.where}: {text}" if prefix else text)
        else:
            self.dropped += 1

    def lines(self) -> list[str]:
        tail = [f"{self.where}: ... and {self.dropped} more problems"] if self.dropped else []
        return list(self) + tail


@dataclass
class _ShardResult:
    problems: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # in tar order (copy) or parquet order
    order: list[tuple[str, str]] = field(default_factory=list)  # (raw_shard, key) per parquet row
    locations: dict[str, dict] = field(default_factory=dict)  # key -> manifest location fields
    samples: int = 0
    tar: dict[str, Any] = field(default_factory=dict)  # md5, sha256, size of the tar read


def _read_checked(url: str, entry: dict | None, problems: _Problems) -> bytes | None:
    """The file's bytes, checking size and sha256 against dataset.json's entry."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        return None
    if entry is not None:
        if len(data) != entry["size"]:
            problems.add(f"size {len(data):,} bytes, dataset.json says {entry['size']:,}")
        elif hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problems.add("sha256 differs from dataset.json (the file is corrupt or was changed)")
    return data


def _read_shard_parquet(url: str, entry: dict | None, problems: _Problems) -> list[dict] | None:
    data = _read_checked(url, entry, problems)
    if data is None:
        return None
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read()
    except Exception as exc:  # pyarrow raises several types for a broken file
        problems.add(f"not a readable parquet file ({exc})")
        return None
    if not table.schema.equals(DATASET_SHARD):
        problems.add(f"schema differs from manifests/dataset_shard.arrow.json: {table.schema}")
        return None
    rows = table.to_pylist()
    for index, row in enumerate(rows):
        problem = _count_problem(row)
        if problem:
            problems.add(f"row {index} (key {row['key']}): {problem}")
    return rows


def _count_problem(sample: dict) -> str | None:
    """Why a sample's n_faces is not the number of its counted faces, or None."""
    counted = sum(bool(face.get("counted")) for face in sample["faces"] or [])
    if sample["n_faces"] != counted:
        return f"n_faces is {sample['n_faces']} but {counted} of its faces are counted"
    return None


def _sample_checks(
    key: str, members: dict, problems: _Problems, check_images: bool, max_pixels: int
) -> dict | None:
    """Checks one copy-mode sample's members; returns its parsed json (or None)."""
    images = [ext for ext in members if contract.is_image_ext(ext)]
    missing = [ext for ext in ("json", "txt") if ext not in members]
    if not images:
        missing.insert(0, "jpg")
    if missing:
        problems.add(f"key {key}: no {', '.join('.' + m for m in missing)} member")
    if len(images) > 1:
        problems.add(f"key {key}: several image members ({', '.join(images)})")
    parsed = None
    if "json" in members:
        try:
            parsed = json.loads(members["json"][1])
        except ValueError as exc:
            problems.add(f"{key}.json: not valid JSON ({exc})")
        else:
            schema_lines = schema_problems(parsed, SAMPLE_JSON_SCHEMA, f"{key}.json")
            for line in schema_lines:
                problems.add(line)
            if isinstance(parsed, dict) and parsed.get("key") != key:
                problems.add(f"{key}.json: key field is {parsed.get('key')!r}")
            if not schema_lines and _count_problem(parsed):
                problems.add(f"{key}.json: {_count_problem(parsed)}")
    if images:
        data = members[images[0]][1]
        if check_images:
            problem = image_problem(data, max_pixels)
            if problem:
                problems.add(f"{key}.{images[0]}: {problem}")
        if isinstance(parsed, dict) and hashlib.sha256(data).hexdigest() != parsed.get("sha256"):
            problems.add(f"{key}.{images[0]}: sha256 differs from the one in {key}.json")
    if "txt" in members and isinstance(parsed, dict):
        if members["txt"][1].decode("utf-8", "replace") != parsed.get("caption"):
            problems.add(f"{key}.txt: differs from the caption in {key}.json")
    return parsed if isinstance(parsed, dict) else None


def _location(key: str, shard: str, index: int, tar: str, members: dict) -> dict:
    """The manifest fields the members ({ext: (member, data)}) of one sample imply."""
    located = {ext: member for ext, (member, _) in members.items()}
    return {
        "key": key,
        "shard": shard,
        "index": index,
        "tar": tar,
        **contract.member_locations(located),
    }


@dataclass
class _TarRead:
    """A copy-mode tar read once: its samples (key, members without bytes, parsed json)."""

    samples: list[tuple[str, dict, dict | None]] = field(default_factory=list)
    entry: dict[str, Any] = field(default_factory=dict)  # md5, sha256, size of the bytes read


def _read_copy_tar(
    handle: Any, tar_name: str, problems: _Problems, check_images: bool, max_pixels: int
) -> _TarRead:
    """Read a dataset tar member by member, checking each sample as it completes."""
    read = _TarRead()
    seen: set[str] = set()
    current: str | None = None
    members: dict[str, tuple] = {}

    def finish() -> None:
        if current is not None:
            parsed = _sample_checks(current, members, problems, check_images, max_pixels)
            # Keep where the members are, not their bytes: a shard can hold gigabytes.
            read.samples.append((current, {e: (m, None) for e, (m, _) in members.items()}, parsed))

    reader = HashingReader(handle)
    try:
        for member, data in iter_members(reader, source=tar_name):
            bad_name = name_problem(member.name)
            if bad_name:
                problems.add(bad_name)
                continue
            if member.key != current:
                finish()
                if member.key in seen:
                    problems.add(f"key {member.key}: its members are not adjacent")
                current, members = member.key, {}
                seen.add(member.key)
            if member.ext in members:
                problems.add(f"key {member.key}: two .{member.ext} members")
                continue
            members[member.ext] = (member, data)
        finish()
        reader.drain()
    except UnsafeTar as exc:
        problems.add(f"{exc}; stopped reading this tar", prefix=False)
    read.entry = {"md5": reader.md5.hexdigest(), "sha256": reader.sha256.hexdigest()}
    read.entry["size"] = reader.size
    return read


def _entry_problems(actual: dict, entry: dict | None, problems: _Problems) -> None:
    """A file read against its dataset.json entry."""
    if entry is None:
        return
    if actual["size"] != entry["size"]:
        problems.add(f"size {actual['size']:,} bytes, dataset.json says {entry['size']:,}")
    elif actual["sha256"] != entry["sha256"]:
        problems.add("sha256 differs from dataset.json (the file is corrupt or changed)")


def _compare_rows(rows: list[dict], samples: list, tar_name: str, problems: _Problems) -> None:
    """NNNNN.parquet's rows against the tar's samples, in order and field by field."""
    if len(rows) != len(samples):
        problems.add(f"{len(rows)} rows but {tar_name} has {len(samples)} samples")
    for index, (row, (key, _, parsed)) in enumerate(zip(rows, samples, strict=False)):
        if row["key"] != key:
            problems.add(
                f"row {index} is key {row['key']} but sample {index} of {tar_name} is {key}"
            )
            return
        if parsed is not None and sample_json(row) != parsed:
            differ = sorted(k for k, v in sample_json(row).items() if parsed.get(k) != v)
            problems.add(
                f"row {index} (key {key}) differs from {key}.json in "
                f"{', '.join(differ) or 'extra fields'}"
            )


def _check_copy_shard(
    dataset_url: str, name: str, files: dict, check_images: bool, max_pixels: int
) -> _ShardResult:
    result = _ShardResult()
    tar_name, parquet_name = contract.tar_name(name), contract.parquet_name(name)
    parquet_problems = _Problems(parquet_name)
    rows = _read_shard_parquet(
        storage.join(dataset_url, parquet_name), files.get(parquet_name), parquet_problems
    )
    problems = _Problems(tar_name)
    fs, path = storage.fs_for(storage.join(dataset_url, tar_name))
    try:
        handle = fs.open(path, "rb")
    except FileNotFoundError:
        result.problems = problems.lines() + parquet_problems.lines()
        return result
    with handle:
        read = _read_copy_tar(handle, tar_name, problems, check_images, max_pixels)
    result.tar = read.entry
    _entry_problems(read.entry, files.get(tar_name), problems)
    result.samples = len(read.samples)
    result.keys = [key for key, _, _ in read.samples]
    for index, (key, sample_members, _) in enumerate(read.samples):
        result.locations[key] = _location(key, name, index, tar_name, sample_members)
    if rows is not None:
        _compare_rows(rows, read.samples, tar_name, parquet_problems)
        result.order = [(row["raw_shard"], row["key"]) for row in rows]
    result.problems = problems.lines() + parquet_problems.lines()
    return result


def _check_raw_tar(
    root: str, tar: str, entry: dict | None, rows: list[dict], check_images: bool, max_pixels: int
) -> _ShardResult:
    """Manifest mode: the raw tar `tar` holds each row's members where the manifest says."""
    result = _ShardResult()
    problems = _Problems(tar)
    wanted = {row["key"]: row for row in rows}
    found: dict[str, dict] = {}
    url = storage.join(root, tar)
    fs, path = storage.fs_for(url)
    if not fs.exists(path):
        problems.add(f"missing under {root} (manifest mode reads the images from the raw tars)")
        result.problems = problems.lines()
        return result
    with fs.open(path, "rb") as handle:
        reader = HashingReader(handle)
        try:
            for member, data in members_of(
                reader, set(wanted), source=tar, read=lambda m: contract.is_image_ext(m.ext)
            ):
                found.setdefault(member.key, {})[member.ext] = (member, None)
                if data is not None:  # the image: checked now, its bytes not kept
                    result.locations[member.key] = {"sha256": hashlib.sha256(data).hexdigest()}
                    problem = image_problem(data, max_pixels) if check_images else None
                    if problem:
                        problems.add(f"{member.name}: {problem}")
            reader.drain()
        except UnsafeTar as exc:
            problems.add(f"{exc}; stopped reading this tar", prefix=False)
    if entry is None:
        problems.add("not listed in dataset.json's sources")
    elif reader.size != entry["size"] or reader.sha256.hexdigest() != entry["sha256"]:
        problems.add("sha256 or size differs from dataset.json's sources (the raw tar changed)")
    for key, row in wanted.items():
        members = found.get(key)
        if not members:
            problems.add(f"key {key}: no members")
            continue
        actual = _location(key, row["shard"], row["index"], tar, members)
        differ = sorted(k for k, v in actual.items() if row.get(k) != v)
        if differ:
            problems.add(f"key {key}: manifest.parquet's {', '.join(differ)} do not match the tar")
    result.problems = problems.lines()
    return result


def file_sizes(dataset_url: str) -> dict[str, int]:
    """name -> size of each entry directly in the folder ({} when it does not exist)."""
    fs, path = storage.fs_for(dataset_url)
    if not fs.exists(path):
        return {}
    return {
        info["name"].rstrip("/").rsplit("/", 1)[-1]: int(info.get("size") or 0)
        for info in fs.ls(path, detail=True)
    }


def _read_json_file(url: str, entry: dict | None, problems: _Problems) -> Any:
    data = _read_checked(url, entry, problems)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError as exc:
        problems.add(f"not valid JSON ({exc})")
        return None


def _check_indexes(dataset_url: str, meta: dict, results: dict[str, _ShardResult]) -> list[str]:
    """sizes.json and shardindex.json against the tars that were read."""
    files = meta["files"]
    out: list[str] = []
    sizes_problems = _Problems(contract.SIZES_JSON)
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
    out += sizes_problems.lines()

    index_problems = _Problems(contract.SHARD_INDEX_JSON)
    index = _read_json_file(
        storage.join(dataset_url, contract.SHARD_INDEX_JSON),
        files.get(contract.SHARD_INDEX_JSON),
        index_problems,
    )
    if isinstance(index, dict):
        if index.get("__kind__") != contract.WIDS_KIND:
            index_problems.add(f"__kind__ is not {contract.WIDS_KIND}")
        if index.get("name") != meta["name"]:
            index_problems.add(
                f"name is {index.get('name')!r}, the dataset's is {meta['name']!r} (wids names "
                "its cache after it)"
            )
        listed = {e.get("url"): e for e in index.get("shardlist", []) if isinstance(e, dict)}
        for name, result in sorted(results.items()):
            entry = listed.pop(contract.tar_name(name), None)
            if entry is None:
                index_problems.add(f"no entry for {name}.tar")
            elif result.tar:
                want = {
                    "md5sum": result.tar["md5"],
                    "nsamples": result.samples,
                    "filesize": result.tar["size"],
                }
                for field_name, value in want.items():
                    if entry.get(field_name) != value:
                        index_problems.add(
                            f"{name}.tar: {field_name} is {entry.get(field_name)!r}, the tar "
                            f"gives {value!r}"
                        )
        for url in sorted(str(u) for u in listed):
            index_problems.add(f"entry for {url}, which is not a shard of this dataset")
    elif index is not None:
        index_problems.add("not a wids shard index object")
    return out + index_problems.lines()


def _check_manifest(
    dataset_url: str, meta: dict, locations: dict[str, dict]
) -> tuple[list[str], list[dict]]:
    """manifest.parquet's rows against the locations the tars gave; returns (problems, rows)."""
    problems = _Problems(contract.MANIFEST_PARQUET)
    data = _read_checked(
        storage.join(dataset_url, contract.MANIFEST_PARQUET),
        meta["files"].get(contract.MANIFEST_PARQUET),
        problems,
    )
    if data is None:
        return problems.lines(), []
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read()
    except Exception as exc:  # pyarrow raises several types for a broken file
        problems.add(f"not a readable parquet file ({exc})")
        return problems.lines(), []
    if not table.schema.equals(MANIFEST):
        problems.add(f"schema differs from manifests/manifest.arrow.json: {table.schema}")
        return problems.lines(), []
    rows = table.to_pylist()
    if meta["mode"] == "copy":
        seen = set()
        for row in rows:
            key = row["key"]
            seen.add(key)
            actual = locations.get(key)
            if actual is None:
                problems.add(f"key {key}: no such sample in the tars")
                continue
            differ = sorted(k for k, v in actual.items() if row.get(k) != v)
            if differ:
                problems.add(f"key {key}: {', '.join(differ)} do not match its tar")
        for key in sorted(set(locations) - seen):
            problems.add(f"key {key}: missing (it is in {locations[key]['tar']})")
    return problems.lines(), rows


def _order_problems(order_by_shard: dict[str, list[tuple[str, str]]]) -> list[str]:
    """The order rule's order: samples sorted by (raw_shard, key) across the shards."""
    last: tuple[str, str] | None = None
    for name in sorted(order_by_shard):
        for position, pair in enumerate(order_by_shard[name]):
            if last is not None and pair <= last:
                return [
                    f"{contract.parquet_name(name)}: row {position} (key {pair[1]}, raw shard "
                    f"{pair[0]}) comes after key {last[1]} (raw shard {last[0]}): the order rule "
                    "sorts samples by raw shard, then key"
                ]
            last = pair
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


def _unique_key_problems(keys_by_shard: dict[str, list[str]], what: str) -> list[str]:
    first: dict[str, str] = {}
    out = _Problems("keys")
    for name in sorted(keys_by_shard):
        for key in keys_by_shard[name]:
            if key in first:
                where = (
                    f"twice in {name}.{what}"
                    if first[key] == name
                    else f"in {first[key]}.{what} and {name}.{what}"
                )
                out.add(f"key {key} appears {where}; keys must be unique across the dataset")
            else:
                first[key] = name
    return out.lines()


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
    problems = _Problems(contract.DATASET_CARD)
    data = _read_checked(
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
    files = meta["files"]
    checked = _map(
        lambda n: _check_copy_shard(dataset_url, n, files, check_images, max_pixels),
        names,
        workers,
    )
    results = dict(zip(names, checked, strict=True))
    problems = [line for name in names for line in results[name].problems]
    present = {n: r for n, r in results.items() if r.tar}
    samples_bytes = [
        present[n].locations[key]["sample_size"] for n in sorted(present) for key in present[n].keys
    ]
    problems += _shape_problems(
        meta, {n: r.samples for n, r in present.items()}, "tar", samples_bytes
    )
    max_bytes = meta.get("max_shard_bytes")
    for name, result in sorted(present.items()):
        if max_bytes is not None and result.tar["size"] > max_bytes and result.samples > 1:
            problems.append(
                f"{contract.tar_name(name)}: {result.tar['size']:,} bytes with {result.samples} "
                f"samples, over max_shard_bytes = {max_bytes:,}"
            )
    problems += _order_problems({n: r.order for n, r in results.items() if r.order})
    problems += _unique_key_problems({n: r.keys for n, r in present.items()}, "tar")
    problems += _check_indexes(dataset_url, meta, results)
    locations = {k: v for r in results.values() for k, v in r.locations.items()}
    return problems + _check_manifest(dataset_url, meta, locations)[0]


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
    dataset's raw tars are, if not at dataset.json's source_root.
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


def _read_shard_rows(dataset_url: str, meta: dict, names: list[str]) -> tuple[dict, list[str]]:
    """{shard: rows} of the shard parquets that could be read, and the problems found."""
    problems: list[str] = []
    rows_by_shard: dict[str, list[dict]] = {}
    for name in names:
        parquet = contract.parquet_name(name)
        shard_problems = _Problems(parquet)
        rows = _read_shard_parquet(
            storage.join(dataset_url, parquet), meta["files"].get(parquet), shard_problems
        )
        problems += shard_problems.lines()
        if rows is not None:
            rows_by_shard[name] = rows
    problems += _shape_problems(meta, {n: len(r) for n, r in rows_by_shard.items()}, "parquet")
    problems += _order_problems(
        {n: [(r["raw_shard"], r["key"]) for r in rows] for n, rows in rows_by_shard.items()}
    )
    problems += _unique_key_problems(
        {n: [r["key"] for r in rows] for n, rows in rows_by_shard.items()}, "parquet"
    )
    return rows_by_shard, problems


def _verify_manifest_mode(
    dataset_url: str,
    meta: dict,
    names: list[str],
    source_root: str | None,
    check_images: bool,
    max_pixels: int,
    workers: int,
) -> list[str]:
    rows_by_shard, problems = _read_shard_rows(dataset_url, meta, names)
    manifest_problems, manifest = _check_manifest(dataset_url, meta, {})
    problems += manifest_problems
    by_tar: dict[str, list[dict]] = {}
    manifest_keys: dict[str, list[str]] = {}
    for row in manifest:
        by_tar.setdefault(row["tar"], []).append(row)
        manifest_keys.setdefault(row["shard"], []).append(row["key"])
    for name, rows in rows_by_shard.items():
        if [r["key"] for r in rows] != manifest_keys.get(name, []):
            problems.append(
                f"{contract.parquet_name(name)}: its keys differ from manifest.parquet's rows for"
                f" shard {name}"
            )
    root = source_root or meta["source_root"]
    sources = meta["sources"]
    for tar in sorted(set(sources) - set(by_tar)):
        problems.append(f"dataset.json: sources lists {tar}, which no manifest row points into")
    results = _map(
        lambda t: _check_raw_tar(root, t, sources.get(t), by_tar[t], check_images, max_pixels),
        sorted(by_tar),
        workers,
    )
    digests = {}
    for result in results:
        problems += result.problems
        digests.update(result.locations)
    for name, rows in rows_by_shard.items():
        for row in rows:
            actual = digests.get(row["key"], {}).get("sha256")
            if actual is not None and actual != row["sha256"]:
                problems.append(
                    f"{contract.parquet_name(name)}: key {row['key']}: sha256 differs from the image"
                )
    return problems
