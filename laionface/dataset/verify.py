"""The published dataset's contracts, and `verify`: does a dataset folder keep them?

The contracts are defined here once: JSON Schemas of `dataset.json` and of each `{key}.json`,
plus the Arrow schemas of `NNNNN.parquet` and `manifest.parquet` (laionface.schemas), each field
documented. `manifests/` at the top of the repository is generated from them
(`write_manifest_files`), and a test keeps the two equal.

`verify(url)` reads every byte of a dataset once (any fsspec URL) and returns every problem it
finds, as lines that name the file, the key and what is wrong; an empty list means the dataset
is intact: checksums, tar/parquet agreement, the webdataset key rules, sizes.json, shardindex.json
and manifest.parquet against the tars, and every image decodes.
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

from laionface.io import schemas, storage
from laionface.io.tars import HashingReader, UnsafeTar, iter_members, name_problem
from laionface.stages.emit import (
    FORMAT,
    FORMAT_VERSION,
    IMAGE_EXTS,
    ORDER_RULE,
    sample_json,
    shard_name,
)

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# One shard's problems are cut to this many lines (a broken shard can have thousands).
MAX_PROBLEMS_PER_FILE = 20

# ---------------------------------------------------------------------------------------------
# The contracts.

SAMPLE_FIELDS = {
    "key": "The sample's key: its raw img2dataset key (shard digits then index digits). Unique "
    "in the dataset, letters/digits/'_'/'-' only, never a dot (webdataset splits names at the "
    "first dot).",
    "SAMPLE_ID": "LAION-400M's SAMPLE_ID (int64), the id LAION-Face's lists use; null if the "
    "input had none.",
    "url": "The URL the image was downloaded from.",
    "caption": "The caption (LAION's TEXT); the same text as the {key}.txt member.",
    "width": "Image width in pixels after its EXIF orientation is applied: the frame the boxes "
    "and landmarks are in.",
    "height": "Image height in pixels, in the same frame as width.",
    "LICENSE": 'LAION\'s LICENSE: "?" or a Creative Commons URL; null if the input had none.',
    "NSFW": "LAION's NSFW tag: UNLIKELY, UNSURE or NSFW; null if the input had none.",
    "similarity": "LAION's CLIP ViT-B/32 image-text cosine similarity; null if unknown.",
    "sha256": "sha256 (hex) of the image member's bytes (emit copies the stored bytes untouched).",
    "phash": "64-bit perceptual hash of the image (imagehash.phash) as 16 hex digits.",
    "n_faces": "How many faces pass every select rule (score, face size, face fraction).",
    "faces": "Every detection scoring at least select.min_score, in pixel coordinates of the "
    "upright image. In {key}.json each is {box: [x1, y1, x2, y2], landmarks: [[x, y] x 5], "
    "score}; in the parquet each is {x1, y1, x2, y2, score, landmarks: [x, y] x 5 flattened}. "
    "Landmark order: left eye, right eye, nose, left mouth corner, right mouth corner (RetinaFace).",
    "raw_shard": "The download stage's shard (raw/NNNNN.tar) the image came from.",
}

MANIFEST_FIELDS = {
    "key": "The sample's key.",
    "SAMPLE_ID": "LAION-400M's SAMPLE_ID.",
    "shard": "The dataset shard whose NNNNN.parquet holds the sample's row.",
    "index": "The sample's row number in that parquet (and its position in NNNNN.tar).",
    "tar": 'The tar holding the members. copy mode: "NNNNN.tar" in the dataset folder; manifest '
    'mode: "raw/NNNNN.tar" relative to dataset.json\'s source_root (the run folder).',
    "sample_offset": "Byte offset of the first member header of the sample in that tar.",
    "sample_size": "Bytes from sample_offset to the end of the sample's last member (with "
    "padding): read this range and parse it as a tar to get the whole sample.",
    "image_ext": "Extension of the image member ({key}.jpg: jpg).",
    "image_offset": "Byte offset of the image member's data: seek here and read image_size "
    "bytes to get the image file.",
    "image_size": "Length of the image member's data.",
    "json_offset": "Byte offset of the {key}.json member's data.",
    "json_size": "Length of the {key}.json member's data.",
    "txt_offset": "Byte offset of the {key}.txt member's data.",
    "txt_size": "Length of the {key}.txt member's data.",
}

DATASET_FIELDS = {
    "format": f'Always "{FORMAT}".',
    "format_version": f"Version of this contract: {FORMAT_VERSION}.",
    "name": "The run's name ([run] name).",
    "created": "When emit finished (ISO 8601, UTC).",
    "mode": '"copy" (tars in this folder) or "manifest" (no tars: manifest.parquet points into '
    "the run's raw tars).",
    "order": "The sample order rule, in words.",
    "samples_per_shard": "Samples in every shard but the last (emit.samples_per_shard).",
    "counts": "{samples, shards}: totals over the dataset.",
    "config": "The resolved pipeline config the dataset was built with.",
    "versions": "Software versions (python, laionface, dask, pyarrow, torch, img2dataset, ...).",
    "funnel": "What emit read and published: select {images, kept, dropped by reason}, dedup "
    "{images, kept, dropped by reason} (or {disabled: true}), published; and audit: "
    "laionface.audit's funnel from the metadata inputs to dedup, with its conservation check.",
    "files": "Every other file of the dataset folder: name -> {sha256, size} (tars also md5). "
    "dataset.json itself is written last, so a folder without it is incomplete.",
    "source_root": "manifest mode only: the run folder the manifest's tar paths are relative to.",
    "sources": "manifest mode only: each raw tar the manifest points into -> {sha256, size}.",
}

_HEX64 = "^[0-9a-f]{64}$"
_FILE_ENTRY = {
    "type": "object",
    "required": ["sha256", "size"],
    "additionalProperties": False,
    "properties": {
        "sha256": {"type": "string", "pattern": _HEX64},
        "md5": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "size": {"type": "integer", "minimum": 0},
    },
}
_NUMBER = {"type": "number"}

SAMPLE_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "laionface sample ({key}.json)",
    "type": "object",
    "additionalProperties": False,
    "required": list(SAMPLE_FIELDS),
    "properties": {
        "key": {"type": "string", "pattern": "^[0-9A-Za-z_-]+$"},
        "SAMPLE_ID": {"type": ["integer", "null"]},
        "url": {"type": "string"},
        "caption": {"type": "string"},
        "width": {"type": "integer", "minimum": 1},
        "height": {"type": "integer", "minimum": 1},
        "LICENSE": {"type": ["string", "null"]},
        "NSFW": {"type": ["string", "null"]},
        "similarity": {"type": ["number", "null"]},
        "sha256": {"type": "string", "pattern": _HEX64},
        "phash": {"type": ["string", "null"], "pattern": "^[0-9a-f]{16}$"},
        "n_faces": {"type": "integer", "minimum": 0},
        "faces": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["box", "landmarks", "score"],
                "properties": {
                    "box": {"type": "array", "items": _NUMBER, "minItems": 4, "maxItems": 4},
                    "landmarks": {
                        "type": "array",
                        "minItems": 5,
                        "maxItems": 5,
                        "items": {"type": "array", "items": _NUMBER, "minItems": 2, "maxItems": 2},
                    },
                    "score": {"type": "number", "minimum": 0, "maximum": 1},
                },
            },
        },
        "raw_shard": {"type": "string", "pattern": "^[0-9]+$"},
    },
}

DATASET_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "laionface dataset (dataset.json)",
    "type": "object",
    "additionalProperties": False,
    "required": [k for k in DATASET_FIELDS if k not in ("source_root", "sources")],
    "properties": {
        "format": {"const": FORMAT},
        "format_version": {"const": FORMAT_VERSION},
        "name": {"type": "string"},
        "created": {"type": "string"},
        "mode": {"enum": ["copy", "manifest"]},
        "order": {"type": "string"},
        "samples_per_shard": {"type": "integer", "minimum": 1},
        "counts": {
            "type": "object",
            "required": ["samples", "shards"],
            "additionalProperties": False,
            "properties": {
                "samples": {"type": "integer", "minimum": 1},
                "shards": {"type": "integer", "minimum": 1},
            },
        },
        "config": {"type": "object"},
        "versions": {"type": "object", "additionalProperties": {"type": "string"}},
        "funnel": {"type": "object", "required": ["select", "dedup", "published"]},
        "files": {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9A-Za-z_][0-9A-Za-z_.-]*$"},
            "additionalProperties": _FILE_ENTRY,
        },
        "source_root": {"type": "string"},
        "sources": {"type": "object", "additionalProperties": _FILE_ENTRY},
    },
    "if": {"properties": {"mode": {"const": "manifest"}}},
    "then": {"required": ["source_root", "sources"]},
}


def _describe(schema: dict, fields: dict[str, str]) -> dict:
    out = json.loads(json.dumps(schema))
    for name, text in fields.items():
        out["properties"][name]["description"] = text
    return out


def _arrow_contract(schema: pa.Schema, title: str, fields: dict[str, str]) -> dict:
    return {
        "title": title,
        "fields": [
            {
                "name": f.name,
                "type": str(f.type),
                "nullable": f.nullable,
                "description": fields[f.name],
            }
            for f in schema
        ],
    }


def _readme() -> str:
    def table(fields: dict[str, str], types: dict[str, str]) -> str:
        rows = [f"| `{name}` | {types.get(name, '')} | {text} |" for name, text in fields.items()]
        return "| field | type | meaning |\n|---|---|---|\n" + "\n".join(rows)

    def json_type(prop: dict) -> str:
        if "const" in prop:
            return f"`{json.dumps(prop['const'])}`"
        if "enum" in prop:
            return " or ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
        return f"`{prop['type']}`"

    dataset_types = {k: json_type(v) for k, v in DATASET_JSON_SCHEMA["properties"].items()}
    arrow_types = {f.name: f"`{f.type}`" for f in schemas.DATASET_SHARD}
    manifest_types = {f.name: f"`{f.type}`" for f in schemas.MANIFEST}
    return f"""# Published dataset contracts

Generated from `laionface/verify.py` and `laionface/schemas.py` by
`python -c "from laionface.dataset.verify import write_manifest_files; write_manifest_files('manifests')"`;
`laionface verify PATH` checks a dataset against them.

| file | contract of |
|---|---|
| `dataset.schema.json` | `dataset.json` (JSON Schema 2020-12) |
| `sample.schema.json` | each sample's `{{key}}.json` member (JSON Schema 2020-12) |
| `dataset_shard.arrow.json` | each `NNNNN.parquet` (Arrow schema) |
| `manifest.arrow.json` | `manifest.parquet` (Arrow schema) |

## The dataset folder

- `NNNNN.tar` (copy mode): webdataset shards of exactly `samples_per_shard` samples (only the
  last may be shorter). Members per sample, adjacent and in this order: `{{key}}.jpg` (the bytes
  the download stage stored, copied untouched), `{{key}}.json`, `{{key}}.txt` (the caption). Tars are written
  deterministically (ustar, mtime 0, uid/gid 0, mode 0644): the same inputs give the same bytes.
- `NNNNN.parquet`: the same samples in the same order, one row each (always as many rows as the
  tar has samples).
- `sizes.json` (copy mode): `{{"00000.tar": n, ...}}`, the sample counts OpenCLIP reads.
- `shardindex.json` (copy mode): the wids index (`wids-shard-index-v1`: url, md5sum, nsamples,
  filesize per shard).
- `manifest.parquet`: where each sample's members lie, for random access by byte range.
- `dataset.json`: written last; lists every other file with its sha256.

Order: {ORDER_RULE}.

## Per-sample fields (`{{key}}.json` and `NNNNN.parquet`)

{table(SAMPLE_FIELDS, arrow_types)}

## `manifest.parquet`

{table(MANIFEST_FIELDS, manifest_types)}

## `dataset.json`

{table(DATASET_FIELDS, dataset_types)}
"""


def manifest_files() -> dict[str, str]:
    """The contents of manifests/: file name -> text."""

    def dump(obj: Any) -> str:
        return json.dumps(obj, indent=2) + "\n"

    return {
        "dataset.schema.json": dump(_describe(DATASET_JSON_SCHEMA, DATASET_FIELDS)),
        "sample.schema.json": dump(_describe(SAMPLE_JSON_SCHEMA, SAMPLE_FIELDS)),
        "dataset_shard.arrow.json": dump(
            _arrow_contract(schemas.DATASET_SHARD, "NNNNN.parquet", SAMPLE_FIELDS)
        ),
        "manifest.arrow.json": dump(
            _arrow_contract(schemas.MANIFEST, "manifest.parquet", MANIFEST_FIELDS)
        ),
        "README.md": _readme(),
    }


def write_manifest_files(folder: str) -> None:
    for name, text in manifest_files().items():
        storage.write_bytes(storage.join(folder, name), text.encode())


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
    if not table.schema.equals(schemas.DATASET_SHARD):
        problems.add(f"schema differs from manifests/dataset_shard.arrow.json: {table.schema}")
        return None
    return table.to_pylist()


def _sample_checks(
    key: str, members: dict, problems: _Problems, check_images: bool, max_pixels: int
) -> dict | None:
    """Checks one copy-mode sample's members; returns its parsed json (or None)."""
    images = [ext for ext in members if ext in IMAGE_EXTS]
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
            for line in schema_problems(parsed, SAMPLE_JSON_SCHEMA, f"{key}.json"):
                problems.add(line)
            if isinstance(parsed, dict) and parsed.get("key") != key:
                problems.add(f"{key}.json: key field is {parsed.get('key')!r}")
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
    """The manifest fields the members of one sample imply."""
    spans = sorted((m for m, _ in members.values()), key=lambda m: m.offset)
    out = {
        "key": key,
        "shard": shard,
        "index": index,
        "tar": tar,
        "sample_offset": spans[0].offset,
        "sample_size": spans[-1].end - spans[0].offset,
    }
    for ext, (member, _) in members.items():
        kind = "image" if ext in IMAGE_EXTS else ext
        if kind == "image":
            out["image_ext"] = ext
        out[f"{kind}_offset"] = member.data_offset
        out[f"{kind}_size"] = member.size
    return out


def _check_copy_shard(
    dataset_url: str, name: str, files: dict, check_images: bool, max_pixels: int
) -> _ShardResult:
    result = _ShardResult()
    tar_name, parquet_name = f"{name}.tar", f"{name}.parquet"
    parquet_problems = _Problems(parquet_name)
    rows = _read_shard_parquet(
        storage.join(dataset_url, parquet_name), files.get(parquet_name), parquet_problems
    )
    problems = _Problems(tar_name)
    samples: list[tuple[str, dict, dict | None]] = []  # key, members, parsed json
    seen: set[str] = set()
    current: str | None = None
    members: dict[str, tuple] = {}

    def finish() -> None:
        if current is not None:
            parsed = _sample_checks(current, members, problems, check_images, max_pixels)
            # Keep where the members are, not their bytes: a shard can hold gigabytes.
            samples.append((current, {e: (m, None) for e, (m, _) in members.items()}, parsed))

    fs, path = storage.fs_for(storage.join(dataset_url, tar_name))
    try:
        handle = fs.open(path, "rb")
    except FileNotFoundError:
        handle = None
    if handle is not None:
        with handle:
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
            result.tar = {
                "md5": reader.md5.hexdigest(),
                "sha256": reader.sha256.hexdigest(),
                "size": reader.size,
            }
        entry = files.get(tar_name)
        if entry is not None:
            if result.tar["size"] != entry["size"]:
                problems.add(
                    f"size {result.tar['size']:,} bytes, dataset.json says {entry['size']:,}"
                )
            elif result.tar["sha256"] != entry["sha256"]:
                problems.add("sha256 differs from dataset.json (the file is corrupt or changed)")

    result.samples = len(samples)
    result.keys = [key for key, _, _ in samples]
    for index, (key, sample_members, _) in enumerate(samples):
        result.locations[key] = _location(key, name, index, tar_name, sample_members)
    if rows is not None and handle is not None:
        if len(rows) != len(samples):
            parquet_problems.add(f"{len(rows)} rows but {tar_name} has {len(samples)} samples")
        for index, (row, (key, _, parsed)) in enumerate(zip(rows, samples, strict=False)):
            if row["key"] != key:
                parquet_problems.add(
                    f"row {index} is key {row['key']} but sample {index} of {tar_name} is {key}"
                )
                break
            if parsed is not None and sample_json(row) != parsed:
                differ = sorted(k for k, v in sample_json(row).items() if parsed.get(k) != v)
                parquet_problems.add(
                    f"row {index} (key {key}) differs from {key}.json in "
                    f"{', '.join(differ) or 'extra fields'}"
                )
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
            for member, data in iter_members(
                reader,
                source=tar,
                wanted=lambda m: m.key in wanted and m.ext in IMAGE_EXTS,
            ):
                if member.key not in wanted:
                    continue
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


def _expected_names(meta: dict) -> list[str]:
    names = [shard_name(i) for i in range(meta["counts"]["shards"])]
    out = [f"{n}.parquet" for n in names] + ["manifest.parquet"]
    if meta["mode"] == "copy":
        out += [f"{n}.tar" for n in names] + ["sizes.json", "shardindex.json"]
    return sorted(out)


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
    sizes_problems = _Problems("sizes.json")
    sizes = _read_json_file(
        storage.join(dataset_url, "sizes.json"), files.get("sizes.json"), sizes_problems
    )
    actual = {f"{name}.tar": r.samples for name, r in results.items() if r.tar}
    if isinstance(sizes, dict):
        for tar in sorted(set(sizes) | set(actual)):
            if sizes.get(tar) != actual.get(tar):
                sizes_problems.add(f"{tar}: says {sizes.get(tar)}, the tar has {actual.get(tar)}")
    elif sizes is not None:
        sizes_problems.add("not an object of tar name -> sample count")
    out += sizes_problems.lines()

    index_problems = _Problems("shardindex.json")
    index = _read_json_file(
        storage.join(dataset_url, "shardindex.json"), files.get("shardindex.json"), index_problems
    )
    if isinstance(index, dict):
        if index.get("__kind__") != "wids-shard-index-v1":
            index_problems.add("__kind__ is not wids-shard-index-v1")
        listed = {e.get("url"): e for e in index.get("shardlist", []) if isinstance(e, dict)}
        for name, result in sorted(results.items()):
            entry = listed.pop(f"{name}.tar", None)
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
    problems = _Problems("manifest.parquet")
    data = _read_checked(
        storage.join(dataset_url, "manifest.parquet"),
        meta["files"].get("manifest.parquet"),
        problems,
    )
    if data is None:
        return problems.lines(), []
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read()
    except Exception as exc:  # pyarrow raises several types for a broken file
        problems.add(f"not a readable parquet file ({exc})")
        return problems.lines(), []
    if not table.schema.equals(schemas.MANIFEST):
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


def _shape_problems(meta: dict, counts: dict[str, int], what: str) -> list[str]:
    out = []
    names = sorted(counts)
    per_shard = meta["samples_per_shard"]
    for i, name in enumerate(names):
        last = i == len(names) - 1
        if (counts[name] != per_shard and not last) or counts[name] > per_shard:
            out.append(
                f"{name}.{what}: {counts[name]} samples; every shard but the last must have "
                f"samples_per_shard = {per_shard}"
            )
    total = sum(counts.values())
    if total != meta["counts"]["samples"]:
        out.append(f"dataset.json: counts.samples is {meta['counts']['samples']}, found {total}")
    return out


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


def dataset_folder(source: str) -> str:
    """`source` if it holds dataset.json, else `source`/dataset (a run folder)."""
    source = source.rstrip("/")
    for candidate in (source, storage.join(source, "dataset")):
        if storage.exists(storage.join(candidate, "dataset.json")):
            return candidate
    raise FileNotFoundError(
        f"no dataset.json in {source} or {source}/dataset: run the emit stage first "
        "(laionface run CONFIG --stages emit)"
    )


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
    if expected is None:
        try:
            meta = storage.read_json(storage.join(dataset_url, "dataset.json"))
        except FileNotFoundError:
            return [
                f"{dataset_url}/dataset.json: missing, so this is not a complete dataset "
                "(emit or publish did not finish, or the path is wrong)"
            ]
        except ValueError as exc:
            return [f"dataset.json: not valid JSON ({exc})"]
    else:
        meta = expected
    problems = schema_problems(meta, DATASET_JSON_SCHEMA, "dataset.json")
    if problems:
        return problems

    files = meta["files"]
    listing = file_sizes(dataset_url)
    for name in sorted(listing):
        if name.startswith(storage.TEMP_PREFIX):
            problems.append(f"{name}: a leftover partial write; delete it")
        elif name not in files and name != "dataset.json":
            problems.append(f"{name}: not listed in dataset.json")
    for name in sorted(files):
        if name not in listing:
            problems.append(f"{name}: listed in dataset.json but missing")
    expected_names = _expected_names(meta)
    for name in expected_names:
        if name not in files:
            problems.append(f"dataset.json: does not list {name}")
    for name in sorted(set(files) - set(expected_names)):
        problems.append(
            f"dataset.json: lists {name}, which is not part of a {meta['mode']} dataset"
        )

    names = [shard_name(i) for i in range(meta["counts"]["shards"])]
    if meta["mode"] == "copy":
        results = dict(
            zip(
                names,
                _map(
                    lambda n: _check_copy_shard(
                        dataset_url, n, files, check_images, max_image_pixels
                    ),
                    names,
                    workers,
                ),
                strict=True,
            )
        )
        for name in names:
            problems += results[name].problems
        present = {n: r for n, r in results.items() if r.tar}
        problems += _shape_problems(meta, {n: r.samples for n, r in present.items()}, "tar")
        problems += _unique_key_problems({n: r.keys for n, r in present.items()}, "tar")
        problems += _check_indexes(dataset_url, meta, results)
        locations = {k: v for r in results.values() for k, v in r.locations.items()}
        problems += _check_manifest(dataset_url, meta, locations)[0]
    else:
        problems += _verify_manifest_mode(
            dataset_url, meta, names, source_root, check_images, max_image_pixels, workers
        )
    return problems


def _verify_manifest_mode(
    dataset_url: str,
    meta: dict,
    names: list[str],
    source_root: str | None,
    check_images: bool,
    max_pixels: int,
    workers: int,
) -> list[str]:
    problems: list[str] = []
    rows_by_shard: dict[str, list[dict]] = {}
    for name in names:
        shard_problems = _Problems(f"{name}.parquet")
        rows = _read_shard_parquet(
            storage.join(dataset_url, f"{name}.parquet"),
            meta["files"].get(f"{name}.parquet"),
            shard_problems,
        )
        problems += shard_problems.lines()
        if rows is not None:
            rows_by_shard[name] = rows
    problems += _shape_problems(meta, {n: len(r) for n, r in rows_by_shard.items()}, "parquet")
    problems += _unique_key_problems(
        {n: [r["key"] for r in rows] for n, rows in rows_by_shard.items()}, "parquet"
    )
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
                f"{name}.parquet: its keys differ from manifest.parquet's rows for shard {name}"
            )
    root = source_root or meta["source_root"]
    sources = meta["sources"]
    for tar in sorted(set(sources) - set(by_tar)):
        problems.append(f"dataset.json: sources lists {tar}, which no manifest row points into")
    tars = sorted(by_tar)
    results = _map(
        lambda t: _check_raw_tar(root, t, sources.get(t), by_tar[t], check_images, max_pixels),
        tars,
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
                problems.append(f"{name}.parquet: key {row['key']}: sha256 differs from the image")
    return problems
