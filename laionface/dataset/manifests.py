"""The repository's `manifests/`: the dataset contract (dataset.contract) rendered as files.

    python -m laionface.dataset.manifests manifests

writes JSON Schemas of dataset.json and {key}.json, the Arrow schemas of NNNNN.parquet and
manifest.parquet with every field documented, and a README; a test keeps them equal to the
contract.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pyarrow as pa

from laionface.dataset.contract import (
    CARD_CONFIG_TEXT,
    DATASET_FIELDS,
    DATASET_JSON_SCHEMA,
    DATASET_SHARD,
    MANIFEST,
    MANIFEST_FIELDS,
    ORDER_RULE,
    SAMPLE_FIELDS,
    SAMPLE_JSON_SCHEMA,
)
from laionface.io import storage


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
    arrow_types = {f.name: f"`{f.type}`" for f in DATASET_SHARD}
    manifest_types = {f.name: f"`{f.type}`" for f in MANIFEST}
    configs = "\n".join(f"  - `{name}`: {text}" for name, text in CARD_CONFIG_TEXT.items())
    return f"""# Published dataset contracts

Generated from `laionface/dataset/contract.py` by
`python -m laionface.dataset.manifests manifests`; `laionface verify PATH` checks a dataset
against them.

| file | contract of |
|---|---|
| `dataset.schema.json` | `dataset.json` (JSON Schema 2020-12) |
| `sample.schema.json` | each sample's `{{key}}.json` member (JSON Schema 2020-12) |
| `dataset_shard.arrow.json` | each `NNNNN.parquet` (Arrow schema) |
| `manifest.arrow.json` | `manifest.parquet` (Arrow schema) |

## The dataset folder

- `NNNNN.tar` (copy mode): webdataset shards of `samples_per_shard` samples (fewer in the last,
  and in any shard `max_shard_bytes` cuts: see the order below). Members per sample, adjacent
  and in this order: `{{key}}.jpg` (the bytes the download stage stored, copied untouched),
  `{{key}}.json`, `{{key}}.txt` (the caption). Tars are written deterministically (ustar, mtime 0,
  uid/gid 0, mode 0644): the same inputs give the same bytes.
- `NNNNN.parquet`: the same samples in the same order, one row each (always as many rows as the
  tar has samples), with the same fields and values as each `{{key}}.json`.
- `sizes.json` (copy mode): `{{"00000.tar": n, ...}}`, the sample counts OpenCLIP reads.
- `shardindex.json` (copy mode): the wids index (`wids-shard-index-v1`: the dataset's `name`,
  then url, md5sum, nsamples, filesize per shard).
- `manifest.parquet`: where each sample's members lie, for random access by byte range.
- `README.md`: the dataset card: YAML front matter whose `configs` Hugging Face
  `datasets.load_dataset(FOLDER[, CONFIG])` reads, then how to read the dataset, the funnel and
  every stage's settings in prose. The configs (`datasets` reads every config of a folder with
  one builder, so tars and parquet files can't share a card): `shards` in copy mode, whose
  `dataset_info` types the json as `NNNNN.parquet` is typed (the parquet files load with
  `load_dataset("parquet", data_files=...)`); `samples` (the default) and `manifest` in manifest
  mode:
{configs}
- `dataset.json`: written last; lists every other file with its sha256.

A face, in `{{key}}.json` and `NNNNN.parquet` alike: `{{"box": [x1, y1, x2, y2], "landmarks":
[[x, y] x 5], "score": s, "counted": true}}`, float32 numbers (the json holds their exact
values); `n_faces` is always the number of faces with `counted` true.

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
            _arrow_contract(DATASET_SHARD, "NNNNN.parquet", SAMPLE_FIELDS)
        ),
        "manifest.arrow.json": dump(_arrow_contract(MANIFEST, "manifest.parquet", MANIFEST_FIELDS)),
        "README.md": _readme(),
    }


def write_manifest_files(folder: str) -> None:
    for name, text in manifest_files().items():
        storage.write_bytes(storage.join(folder, name), text.encode())


if __name__ == "__main__":
    write_manifest_files(sys.argv[1] if len(sys.argv) > 1 else "manifests")
