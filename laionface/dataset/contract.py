"""The published dataset's contract, in one module: its files, fields, order and rules.

Used by emit (which writes a dataset), verify (which checks one), publish and export (which copy
and read one), and rendered into the repository's `manifests/` (dataset.manifests). A dataset
folder holds:

    NNNNN.tar         (copy mode) webdataset shards of exactly samples_per_shard samples (only
                      the last may be shorter); members per sample, adjacent and in this order:
                      {key}.<image> (the stored bytes, untouched), {key}.json, {key}.txt
    NNNNN.parquet     the same samples in the same order (DATASET_SHARD), one row each
    sizes.json        (copy mode) {"00000.tar": n, ...}, the sample counts OpenCLIP reads
    shardindex.json   (copy mode) the wids index (wids-shard-index-v1)
    manifest.parquet  where each sample's members lie (MANIFEST), for random access by byte range
    dataset.json      written last: the record of the dataset, every other file's sha256
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pyarrow as pa

from laionface.io import storage
from laionface.io.schemas import FACE
from laionface.layout import IMAGE_EXTENSIONS, RunLayout, shard_name

FORMAT = "laionface-dataset"
FORMAT_VERSION = 1
ORDER_RULE = (
    "samples sorted by raw shard, then by key (both as strings; img2dataset's fixed-width "
    "digits make this numeric order); dataset shard i holds samples i*N to i*N+N-1 with "
    "N = samples_per_shard; a sample's members are {key}.<image>, {key}.json, {key}.txt"
)
MODES = ("copy", "manifest")
WIDS_KIND = "wids-shard-index-v1"

DATASET_JSON = "dataset.json"
SIZES_JSON = "sizes.json"
SHARD_INDEX_JSON = "shardindex.json"
MANIFEST_PARQUET = "manifest.parquet"
# Every name a dataset folder may hold (publish --replace deletes only such strays).
DATASET_FILE = re.compile(
    r"(\d+\.(tar|parquet)|sizes\.json|shardindex\.json|manifest\.parquet|dataset\.json)"
)


def tar_name(shard: str) -> str:
    return f"{shard}.tar"


def parquet_name(shard: str) -> str:
    return f"{shard}.parquet"


def shard_names(count: int) -> list[str]:
    """The names of a dataset's shards: 00000 .. (count - 1)."""
    return [shard_name(i) for i in range(count)]


def expected_files(meta: dict) -> list[str]:
    """Every file dataset.json must list, from its mode and shard count."""
    names = shard_names(meta["counts"]["shards"])
    out = [parquet_name(n) for n in names] + [MANIFEST_PARQUET]
    if meta["mode"] == "copy":
        out += [tar_name(n) for n in names] + [SIZES_JSON, SHARD_INDEX_JSON]
    return sorted(out)


def dataset_folder(source: str) -> str:
    """`source` if it holds dataset.json, else the dataset folder of the run folder `source`."""
    source = source.rstrip("/")
    for candidate in (source, RunLayout(source).dataset):
        if storage.exists(storage.join(candidate, DATASET_JSON)):
            return candidate
    raise FileNotFoundError(
        f"no dataset.json in {source} or {RunLayout(source).dataset}: run the emit stage first "
        "(laionface run CONFIG --stages emit)"
    )


def is_image_ext(ext: str) -> bool:
    return ext in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------
# Fields

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
    "stages": "Per stage that produced the dataset: {settings, versions, finished}: the settings "
    "and software versions it last ran with (a stage re-run alone updates only its own entry).",
    "versions": "Software versions of the command that wrote this file (python, laionface, dask, "
    "pyarrow, torch, img2dataset, ...).",
    "funnel": "The audit's funnel of the run (laionface stats): input_rows, kept, conservation "
    '("ok"), and per stage its input, kept and dropped rows by reason.',
    "files": "Every other file of the dataset folder: name -> {sha256, size} (tars also md5). "
    "dataset.json itself is written last, so a folder without it is incomplete.",
    "source_root": "manifest mode only: the run folder the manifest's tar paths are relative to.",
    "sources": "manifest mode only: each raw tar the manifest points into -> {sha256, size}.",
}


# NNNNN.parquet: one row per sample of dataset shard NNNNN, in the tar's order; the same fields
# as each sample's {key}.json.
DATASET_SHARD = pa.schema(
    [
        ("key", pa.string()),
        ("SAMPLE_ID", pa.int64()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("LICENSE", pa.string()),
        ("NSFW", pa.string()),
        ("similarity", pa.float64()),
        ("sha256", pa.string()),
        ("phash", pa.string()),
        ("n_faces", pa.int32()),
        ("faces", pa.list_(FACE)),
        ("raw_shard", pa.string()),
    ]
)

# manifest.parquet: where every sample's members lie, for random access by byte range.
MANIFEST = pa.schema(
    [
        ("key", pa.string()),
        ("SAMPLE_ID", pa.int64()),
        ("shard", pa.string()),
        ("index", pa.int32()),
        ("tar", pa.string()),
        ("sample_offset", pa.int64()),
        ("sample_size", pa.int64()),
        ("image_ext", pa.string()),
        ("image_offset", pa.int64()),
        ("image_size", pa.int64()),
        ("json_offset", pa.int64()),
        ("json_size", pa.int64()),
        ("txt_offset", pa.int64()),
        ("txt_size", pa.int64()),
    ]
)

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
        "stages": {"type": "object", "additionalProperties": {"type": "object"}},
        "versions": {"type": "object", "additionalProperties": {"type": "string"}},
        "funnel": {"type": "object", "required": ["input_rows", "kept", "conservation", "stages"]},
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


# ---------------------------------------------------------------------------------------------
# Records


def _face_json(face: dict) -> dict:
    marks = face["landmarks"]
    return {
        "box": [face["x1"], face["y1"], face["x2"], face["y2"]],
        "landmarks": [[marks[2 * i], marks[2 * i + 1]] for i in range(5)],
        "score": face["score"],
    }


def sample_json(row: dict) -> dict:
    """The {key}.json of a DATASET_SHARD row (faces as box / landmarks[5][2] / score)."""
    out = {name: row[name] for name in DATASET_SHARD.names if name != "faces"}
    out["faces"] = [_face_json(face) for face in row["faces"]]
    return out


def sample_json_bytes(row: dict) -> bytes:
    return json.dumps(
        sample_json(row), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def json_bytes(obj: Any) -> bytes:
    """An index file's bytes (sizes.json, shardindex.json, dataset.json)."""
    return json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"


def file_entry(data: bytes) -> dict[str, Any]:
    """dataset.json's entry for a file: its sha256 and size."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def member_kind(ext: str) -> str:
    """ "image" for an image extension, else the extension itself (json, txt)."""
    return "image" if is_image_ext(ext) else ext


def member_locations(members: dict) -> dict:
    """Where a sample's members ({any name: tars.Member}) lie: the manifest's byte-range fields
    (sample_offset, sample_size, image_ext, image/json/txt offset and size)."""
    spans = sorted(members.values(), key=lambda m: m.offset)
    out: dict[str, Any] = {
        "sample_offset": spans[0].offset,
        "sample_size": spans[-1].end - spans[0].offset,
    }
    for member in spans:
        kind = member_kind(member.ext)
        if kind == "image":
            out["image_ext"] = member.ext
        out[f"{kind}_offset"] = member.data_offset
        out[f"{kind}_size"] = member.size
    return out


def members_adjacent(members: dict) -> bool:
    """Whether a sample's members follow each other in the tar, as webdataset needs."""
    spans = sorted(members.values(), key=lambda m: m.offset)
    return all(a.offset == b.end for b, a in zip(spans, spans[1:], strict=False))


def manifest_row(key: str, sample_id: Any, shard: str, index: int, tar: str, members) -> dict:
    """The MANIFEST row of one sample of dataset shard `shard`, whose members lie in `tar`."""
    if not members_adjacent(members):
        raise ValueError(f"{tar}: the members of key {key} are not adjacent")
    location = {"key": key, "SAMPLE_ID": sample_id, "shard": shard, "index": index, "tar": tar}
    return {**location, **member_locations(members)}


def sizes(samples: dict[str, int]) -> dict[str, int]:
    """sizes.json: {NNNNN.tar: samples} of the shards {NNNNN: samples}."""
    return {tar_name(name): count for name, count in samples.items()}


def shard_index(samples: dict[str, int], tars: dict[str, dict]) -> dict:
    """shardindex.json (wids-shard-index-v1) of the shards {NNNNN: samples}, with the tars'
    dataset.json entries {NNNNN.tar: {md5, size, ...}}."""
    return {
        "__kind__": WIDS_KIND,
        "wids_version": 1,
        "shardlist": [
            {
                "url": tar_name(name),
                "md5sum": tars[tar_name(name)]["md5"],
                "nsamples": count,
                "filesize": tars[tar_name(name)]["size"],
            }
            for name, count in samples.items()
        ],
    }
