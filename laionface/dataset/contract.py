"""The published dataset's contract, in one module: its files, fields, order and rules.

Used by emit (which writes a dataset), verify (which checks one), publish and export (which copy
and read one), and rendered into the repository's `manifests/` (dataset.manifests). A dataset
folder holds:

    NNNNN.tar         (copy mode) webdataset shards of samples_per_shard samples (ORDER_RULE:
                      fewer when emit.max_shard_bytes cuts them, and the last; a takedown
                      version's shards keep their names and lose the removed samples); members per
                      sample, adjacent and in this order: {key}.<image> (the stored bytes,
                      untouched), {key}.json, {key}.txt
    NNNNN.parquet     the same samples in the same order (DATASET_SHARD), one row each
    sizes.json        (copy mode) {"00000.tar": n, ...}, the sample counts OpenCLIP reads
    shardindex.json   (copy mode) the wids index (wids-shard-index-v1), named after the dataset
    manifest.parquet  where each sample's members lie (MANIFEST), for random access by byte range
    README.md         the dataset card: YAML `configs:` for Hugging Face `datasets.load_dataset`
                      (dataset_card), then the funnel and the settings in prose
    dataset.json      written last: the record of the dataset, every other file's sha256; a
                      takedown version (dataset.takedown) adds `previous` and `changes`
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pyarrow as pa

from laionface.io import storage
from laionface.io.tars import BLOCK, RECORD
from laionface.layout import IMAGE_EXTENSIONS, STAGE_ORDER, RunLayout, shard_name

FORMAT = "laionface-dataset"
# 2: one face record (box, landmarks[5][2], score, counted) in json and parquet; README.md.
FORMAT_VERSION = 2
ORDER_RULE = (
    "samples sorted by raw shard, then by key (both as strings; img2dataset's fixed-width "
    "digits make this numeric order) and cut into shards in that order: a shard takes the next "
    "sample unless it already holds samples_per_shard samples or, when max_shard_bytes is set, "
    "its tar would then pass max_shard_bytes (a sample bigger than that alone gets a shard of "
    "its own); with max_shard_bytes unset, shard i holds samples i*N to i*N+N-1 with "
    "N = samples_per_shard; a sample's members are {key}.<image>, {key}.json, {key}.txt. A "
    "takedown version (dataset.json has `previous`) keeps every shard of the version it was made "
    "from, under the same name and in the same order, without the samples it removed: its "
    "shards hold at most samples_per_shard samples each, possibly fewer or none, and a shard "
    "that lost no sample is byte-identical to the previous version's"
)
# Why a takedown removes a sample (dataset.json's `changes`), in the order they are checked: a
# sample is counted under the first that applies. keep_only: not in the --keep-only allow-list;
# ids / urls / sha256: its SAMPLE_ID / url / image sha256 is listed; images: its pHash is within
# --max-distance of a given image's.
TAKEDOWN_REASONS = ("keep_only", "ids", "urls", "sha256", "images")
MODES = ("copy", "manifest")
WIDS_KIND = "wids-shard-index-v1"

DATASET_JSON = "dataset.json"
SIZES_JSON = "sizes.json"
SHARD_INDEX_JSON = "shardindex.json"
MANIFEST_PARQUET = "manifest.parquet"
DATASET_CARD = "README.md"
# Every name a dataset folder may hold (publish --replace deletes only such strays).
DATASET_FILE = re.compile(
    r"(\d+\.(tar|parquet)|sizes\.json|shardindex\.json|manifest\.parquet|README\.md"
    r"|dataset\.json)"
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
    out = [parquet_name(n) for n in names] + [MANIFEST_PARQUET, DATASET_CARD]
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


def is_takedown(meta: dict) -> bool:
    """Whether dataset.json is a takedown version's: its shards are the previous version's
    without the removed samples (ORDER_RULE), not cut anew."""
    return "previous" in meta


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
    "n_faces": "How many faces pass every select rule (score, face size, face fraction): always "
    "the number of faces whose counted is true.",
    "faces": "Every detection scoring at least select.min_score, in pixel coordinates of the "
    "upright image, the same record in {key}.json and NNNNN.parquet: {box: [x1, y1, x2, y2], "
    "landmarks: [[x, y] x 5], score, counted}. Numbers are float32 (the json holds the exact "
    "float32 values); counted is true when the face passes every select rule (min_face_size, "
    "min_face_fraction besides min_score), false for a scoring face that is too small. Landmark "
    "order: left eye, right eye, nose, left mouth corner, right mouth corner (RetinaFace).",
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
    "samples_per_shard": "Samples in every shard but the last (emit.samples_per_shard), unless "
    "max_shard_bytes cut a shard earlier.",
    "max_shard_bytes": "emit.max_shard_bytes: no tar passes this size unless it holds a single "
    "sample (the order rule); null: shards are cut by count only.",
    "counts": "{samples, shards}: totals over the dataset (0 and 0 when no row passed every "
    "stage: an empty dataset).",
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
    "previous": "takedown versions only: the version this one was made from: {sha256 (of that "
    "version's dataset.json file, byte for byte), created, samples}.",
    "changes": "takedown versions only: what this version removed from the previous one: "
    f"{{removed: {{reason: samples}} with reason one of {', '.join(TAKEDOWN_REASONS)} (each "
    "sample counted once, under the first that applies), rewritten: the shards that lost "
    "samples (every other shard is byte-identical to the previous version's)}.",
}


# A published face: the same record in {key}.json and NNNNN.parquet (SAMPLE_FIELDS["faces"]).
# The run's faces/ keeps the detector's flat record (io.schemas.FACE); dataset_face converts.
DATASET_FACE = pa.struct(
    [
        ("box", pa.list_(pa.float32(), 4)),  # x1, y1, x2, y2
        ("landmarks", pa.list_(pa.list_(pa.float32(), 2), 5)),  # (x, y) of eyes, nose, mouth
        ("score", pa.float32()),
        ("counted", pa.bool_()),
    ]
)

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
        ("faces", pa.list_(DATASET_FACE)),
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
_POINT = {"type": "array", "items": _NUMBER, "minItems": 2, "maxItems": 2}

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
                "required": ["box", "landmarks", "score", "counted"],
                "properties": {
                    "box": {"type": "array", "items": _NUMBER, "minItems": 4, "maxItems": 4},
                    "landmarks": {"type": "array", "items": _POINT, "minItems": 5, "maxItems": 5},
                    "score": {"type": "number", "minimum": 0, "maximum": 1},
                    "counted": {"type": "boolean"},
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
    "required": [
        k for k in DATASET_FIELDS if k not in ("source_root", "sources", "previous", "changes")
    ],
    "properties": {
        "format": {"const": FORMAT},
        "format_version": {"const": FORMAT_VERSION},
        "name": {"type": "string"},
        "created": {"type": "string"},
        "mode": {"enum": ["copy", "manifest"]},
        "order": {"type": "string"},
        "samples_per_shard": {"type": "integer", "minimum": 1},
        "max_shard_bytes": {"type": ["integer", "null"], "minimum": 1},
        "counts": {
            "type": "object",
            "required": ["samples", "shards"],
            "additionalProperties": False,
            "properties": {
                # 0 and 0: an empty result (no row passed every stage) is a dataset too.
                "samples": {"type": "integer", "minimum": 0},
                "shards": {"type": "integer", "minimum": 0},
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
        "previous": {
            "type": "object",
            "required": ["sha256", "created", "samples"],
            "additionalProperties": False,
            "properties": {
                "sha256": {"type": "string", "pattern": _HEX64},
                "created": {"type": "string"},
                "samples": {"type": "integer", "minimum": 0},
            },
        },
        "changes": {
            "type": "object",
            "required": ["removed", "rewritten"],
            "additionalProperties": False,
            "properties": {
                "removed": {
                    "type": "object",
                    "propertyNames": {"enum": list(TAKEDOWN_REASONS)},
                    "additionalProperties": {"type": "integer", "minimum": 0},
                },
                "rewritten": {"type": "array", "items": {"type": "string", "pattern": "^[0-9]+$"}},
            },
        },
    },
    "dependentRequired": {"previous": ["changes"], "changes": ["previous"]},
    "if": {"properties": {"mode": {"const": "manifest"}}},
    "then": {"required": ["source_root", "sources"]},
}


# ---------------------------------------------------------------------------------------------
# Records


def dataset_face(face: dict, counted: bool) -> dict:
    """The published record (DATASET_FACE) of a detection of the run's faces/ (io.schemas.FACE):
    the same float32 values, grouped as box and (x, y) landmark pairs."""
    marks = face["landmarks"]
    return {
        "box": [face["x1"], face["y1"], face["x2"], face["y2"]],
        "landmarks": [[marks[2 * i], marks[2 * i + 1]] for i in range(5)],
        "score": face["score"],
        "counted": counted,
    }


def sample_json(row: dict) -> dict:
    """The {key}.json of a DATASET_SHARD row: the same fields and values."""
    return {name: row[name] for name in DATASET_SHARD.names}


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


def sample_bytes(member_sizes: list[int]) -> int:
    """Bytes a sample takes in a tar: each member's 512-byte header, its data and padding."""
    return sum(BLOCK + -(-size // BLOCK) * BLOCK for size in member_sizes)


def tar_bytes(samples_bytes: int) -> int:
    """Size of a dataset tar whose samples take `samples_bytes`: with the end marker (two zero
    blocks), padded to a whole record as io.tars.TarWriter writes it."""
    return -(-(samples_bytes + 2 * BLOCK) // RECORD) * RECORD


def cut_shards(
    samples_bytes: list[int], samples_per_shard: int, max_shard_bytes: int | None
) -> list[int]:
    """The ORDER_RULE's cut: the number of samples of each shard, for samples taking
    `samples_bytes` in order (sample_bytes of each; only read when max_shard_bytes is set)."""
    counts: list[int] = []
    used = 0
    for size in samples_bytes:
        full = bool(counts) and counts[-1] == samples_per_shard
        too_big = (
            bool(counts)
            and max_shard_bytes is not None
            and (tar_bytes(used + size) > max_shard_bytes)
        )
        if not counts or full or too_big:
            counts.append(0)
            used = 0
        counts[-1] += 1
        used += size
    return counts


def sizes(samples: dict[str, int]) -> dict[str, int]:
    """sizes.json: {NNNNN.tar: samples} of the shards {NNNNN: samples}."""
    return {tar_name(name): count for name, count in samples.items()}


def shard_index(name: str, samples: dict[str, int], tars: dict[str, dict]) -> dict:
    """shardindex.json (wids-shard-index-v1) of the dataset `name` with the shards {NNNNN:
    samples}, with the tars' dataset.json entries {NNNNN.tar: {md5, size, ...}}. wids names its
    cache after `name` (else after a hash of the index's URL)."""
    return {
        "__kind__": WIDS_KIND,
        "wids_version": 1,
        "name": name,
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


# ---------------------------------------------------------------------------------------------
# The dataset card (README.md)

# Hugging Face `datasets` reads the front matter's `configs` (config_name, data_files, default),
# so `load_dataset(FOLDER)` loads the default config. It reads every config of a folder with the
# one builder the first config's files call for (datasets 5.x, load.py), so tars and parquet
# files can't be configs of one card: a copy-mode card lists the tars (webdataset's builder),
# a manifest-mode card (no tars) the shard parquets and the manifest. The card's prose says how
# to load the parquet files of a copy-mode folder (`load_dataset("parquet", data_files=...)`).
_CARD_CONFIGS = {
    "copy": (("shards", "*.tar"),),
    "manifest": (("samples", "[0-9]*.parquet"), ("manifest", MANIFEST_PARQUET)),
}
CARD_CONFIG_TEXT = {
    "shards": "the webdataset tars: image, `json` (every field below) and `txt` (the caption) "
    "per sample",
    "samples": "the `NNNNN.parquet` files: every field of each sample, without the image",
    "manifest": "`manifest.parquet`: where each sample's members lie, for reads by byte range",
}
_PARQUET_FILES = {"samples": "[0-9]*.parquet", "manifest": MANIFEST_PARQUET}


def card_configs(mode: str) -> str:
    """How the dataset card of a `mode` dataset starts: its front matter's `configs` (verify
    checks them)."""
    lines = ["---", "configs:"]
    for i, (name, pattern) in enumerate(_CARD_CONFIGS[mode]):
        lines.append(f"- config_name: {name}")
        if i == 0:
            lines.append("  default: true")
        lines += ["  data_files:", "  - split: train", f'    path: "{pattern}"']
    return "\n".join([*lines, ""])


_HF_DTYPES = {
    pa.string(): "string",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.bool_(): "bool",
}


def _hf_type(arrow: pa.DataType) -> Any:
    """An Arrow type as `datasets`' YAML writes a feature's type (dtype, struct or list)."""
    if pa.types.is_struct(arrow):
        return {"struct": [{"name": f.name, **_hf_type(f.type)} for f in arrow]}
    if pa.types.is_list(arrow) or pa.types.is_fixed_size_list(arrow):
        item = _hf_type(arrow.value_type)
        out = {"list": item.get("dtype", item.get("struct", item))}
        if pa.types.is_fixed_size_list(arrow):
            out["length"] = arrow.list_size
        return out
    return {"dtype": _HF_DTYPES[arrow]}


def card_features(image_ext: str) -> str:
    """The `dataset_info` of the `shards` config: the json member typed as NNNNN.parquet is
    (float32 faces, int32 sizes), instead of the float64 and int64 `datasets` would guess."""
    features = [
        {"name": image_ext, "dtype": "image"},
        {"name": "json", **_hf_type(pa.struct(list(DATASET_SHARD)))},
        {"name": "txt", "dtype": "string"},
        {"name": "__key__", "dtype": "string"},
        {"name": "__url__", "dtype": "string"},
    ]
    # JSON is YAML: one line, no YAML writer needed.
    return f"dataset_info:\n- config_name: shards\n  features: {json.dumps(features)}\n"


def _reading_lines(mode: str) -> list[str]:
    out = [
        "`datasets.load_dataset(FOLDER, CONFIG)`, CONFIG one of these configs (the first is the "
        "default: `load_dataset(FOLDER)`):",
        "",
        *(f"- `{name}`: {CARD_CONFIG_TEXT[name]}" for name, _ in _CARD_CONFIGS[mode]),
    ]
    if mode == "copy":
        out += [
            "",
            "The parquet files, with `datasets`' parquet builder (a card's configs share one "
            "builder):",
            "",
            *(
                f'- `load_dataset("parquet", data_files=FOLDER + "/{pattern}")`: '
                f"{CARD_CONFIG_TEXT[name]}"
                for name, pattern in _PARQUET_FILES.items()
            ),
            "",
            "webdataset and OpenCLIP read `{00000..NNNNN}.tar` (OpenCLIP counts the samples in "
            "`sizes.json`); wids reads `shardindex.json`.",
        ]
    return out


def _settings_lines(settings: Any, prefix: str = "") -> list[str]:
    """`- `key` = value` per leaf of a stage's settings ({"select": {"min_score": 0.9}})."""
    if isinstance(settings, dict):
        return [
            line
            for key in sorted(settings)
            for line in _settings_lines(settings[key], f"{prefix}.{key}" if prefix else key)
        ]
    return [f"- `{prefix}` = `{json.dumps(settings)}`"]


def _funnel_lines(funnel: dict) -> list[str]:
    lines = ["| stage | in | kept | dropped (reason: rows) |", "|---|---:|---:|---|"]
    for stage in funnel.get("stages", []):
        dropped = ", ".join(f"{k}: {v:,}" for k, v in sorted(stage["dropped"].items())) or "-"
        lines.append(f"| {stage['stage']} | {stage['input']:,} | {stage['kept']:,} | {dropped} |")
    return lines


def _changes_lines(meta: dict) -> list[str]:
    """A takedown version's card section: what it removed from which version."""
    if not is_takedown(meta):
        return []
    previous, changes = meta["previous"], meta["changes"]
    removed = ", ".join(f"{k}: {v:,}" for k, v in changes["removed"].items() if v) or "none"
    rewritten = ", ".join(f"`{tar_name(n)}`" for n in changes["rewritten"]) or "none"
    return [
        "## Changes",
        "",
        f"Made by `laionface takedown` from the version of {previous['created']} "
        f"({previous['samples']:,} samples; sha256 of its dataset.json: `{previous['sha256']}`). "
        f"Removed, by reason: {removed}. Shards rewritten without them: {rewritten}; every "
        "other shard is byte-identical to the previous version's.",
        "",
    ]


def dataset_card(meta: dict, image_ext: str | None) -> str:
    """README.md of a dataset: the front matter (the configs; in copy mode with one image
    extension, the tars' features), then what it holds, how to read it, a takedown version's
    changes, and how it was made (the funnel and every stage's settings, from dataset.json's
    `funnel` and `stages`)."""
    counts = meta["counts"]
    features = card_features(image_ext) if meta["mode"] == "copy" and image_ext else ""
    out = [
        card_configs(meta["mode"]) + features + "---\n",
        f"# {meta['name']}",
        "",
        f"A face image-text dataset built with laionface ({FORMAT} version {FORMAT_VERSION}, "
        f"{meta['mode']} mode): {counts['samples']:,} samples in {counts['shards']:,} shards. "
        "`dataset.json` lists every file with its sha256; `laionface verify FOLDER` checks them.",
        *(
            ["", "This dataset is empty: no input row passed every stage (see How it was made)."]
            if not counts["samples"]
            else []
        ),
        "",
        "## Reading it",
        "",
        *_reading_lines(meta["mode"]),
        "",
        f"Order: {ORDER_RULE}.",
        "",
        "## Fields",
        "",
        *(f"- `{name}`: {text}" for name, text in SAMPLE_FIELDS.items()),
        "",
        *_changes_lines(meta),
        "## How it was made",
        "",
        f"{meta['funnel']['input_rows']:,} input rows, {meta['funnel']['kept']:,} published by "
        "the run. Where every row went (each is kept, or dropped once, for the first reason that "
        "applies):",
        "",
        *_funnel_lines(meta["funnel"]),
        "",
        "The settings each stage ran with:",
        "",
    ]
    for stage in [s for s in STAGE_ORDER if s in meta["stages"]]:
        out += [f"### {stage}", "", *_settings_lines(meta["stages"][stage]["settings"]), ""]
    return "\n".join(out)
