"""`laionface export RUN --format FMT OUT`: a dataset in the forms LAION-Face users know.

- `ids-parquet`: `sample_ids.parquet`, the published SAMPLE_IDs sorted ascending (one int64
  column `SAMPLE_ID`), the way DataComp publishes subsets.
- `urls`: `urls.parquet` with LAION-400M's columns (SAMPLE_ID, URL, TEXT, HEIGHT, WIDTH, LICENSE,
  NSFW, similarity) in dataset order, so it is itself an img2dataset / laionface input; HEIGHT and
  WIDTH are the measured image size (LAION's columns were often swapped).
- `laion-face-pth`: `laion_face_ids.pth` in LAION-Face's layout: a list with one list of int
  SAMPLE_IDs per LAION-400M metadata part, which their convert_parquet.py reads as
  `set(torch.load(...)[part])`.
- `sample2detect`: `sample2detect_{part}.pth` for each part the run read, a dict
  `int(SAMPLE_ID) -> [(box float32[4], landmarks float32[5, 2], score float), ...]`, the layout of
  LAION-Face's detection release. It holds the counted faces (those passing every select rule),
  so `len(sample2detect[id]) == n_faces`; the dataset's json and parquet also list the scoring
  faces too small to count, with `counted` false.

Samples that share a SAMPLE_ID (several images under one ID, from the metadata) are all kept:
`ids-parquet` and `laion-face-pth` list the ID once per image, `urls` has a row per image. Only
`sample2detect` cannot: its dict has one entry per ID, so it refuses such a dataset with an
ExportError naming the IDs (export `urls` to see their images, or remove the duplicates from
the metadata) rather than keep one image's faces and drop the others'.

The part of a sample is the metadata file its row came from (metadata/shards' source_file). When
every file is named like LAION-400M's parts (`part-000NN-...`), part = NN and the list has at least
32 entries; otherwise parts are numbered in the sorted order of the file names. The .pth files
hold only lists, dicts, ints, floats and tensors: `torch.load(path, weights_only=True)` loads them.
Only the .pth formats import torch (to write them).
"""

from __future__ import annotations

import io
import re
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from laionface.dataset import contract
from laionface.io import schemas, storage
from laionface.layout import RunLayout

FORMATS = ("ids-parquet", "urls", "laion-face-pth", "sample2detect")
LAION_400M_PARTS = 32
LAION_PART_NAME = re.compile(r"part-(\d{5})-")


class ExportError(RuntimeError):
    """The export can't be made from this folder; the message says what is missing."""


def dataset_table(dataset_url: str, columns: list[str]) -> pa.Table:
    """The chosen columns of every sample, in dataset order."""
    meta = storage.read_json(storage.join(dataset_url, contract.DATASET_JSON))
    names = contract.shard_names(meta["counts"]["shards"])
    tables = [
        storage.read_parquet(storage.join(dataset_url, contract.parquet_name(n)), columns)
        for n in names
    ]
    return pa.concat_tables(tables)


def sample_parts(run_url: str) -> tuple[pa.Table, int, list[int]]:
    """(table SAMPLE_ID -> part, number of parts, the parts the run read) from metadata/shards."""
    shards_url = RunLayout(run_url).metadata_shards
    urls = storage.list_files(shards_url, ".parquet")
    if not urls:
        raise ExportError(
            f"{shards_url} has no files: the .pth formats need the metadata stage's "
            "shards (which metadata part each sample came from); export from the run folder"
        )
    table = pa.concat_tables(
        storage.read_parquet(url, ["SAMPLE_ID", "source_file"]) for url in urls
    )
    names = sorted(set(table.column("source_file").to_pylist()))
    basenames = [name.rsplit("/", 1)[-1] for name in names]
    matches = [LAION_PART_NAME.match(b) for b in basenames]
    if all(matches):
        index = {name: int(m.group(1)) for name, m in zip(names, matches, strict=True)}
        n_parts = max(LAION_400M_PARTS, max(index.values()) + 1)
    else:
        index = {name: i for i, name in enumerate(names)}
        n_parts = len(names)
    parts = pa.array([index[name] for name in table.column("source_file").to_pylist()], pa.int32())
    mapping = pa.table({"SAMPLE_ID": table.column("SAMPLE_ID"), "part": parts})
    mapping = mapping.group_by("SAMPLE_ID").aggregate([("part", "min")])
    return mapping.rename_columns(["SAMPLE_ID", "part"]), n_parts, sorted(set(index.values()))


def _with_parts(run_url: str, table: pa.Table) -> tuple[pa.Table, int, list[int]]:
    """`table` (in its order) with a `part` column; (table, number of parts, parts read)."""
    mapping, n_parts, parts = sample_parts(run_url)
    rows = pa.table(
        {"SAMPLE_ID": table.column("SAMPLE_ID"), "row": pa.array(range(len(table)), pa.int64())}
    )
    joined = rows.join(mapping, "SAMPLE_ID", join_type="left outer", use_threads=False)
    part = joined.sort_by("row").column("part")
    missing = part.null_count
    if missing:
        raise ExportError(
            f"{missing} published sample(s) have a SAMPLE_ID that is not in {run_url}/metadata/"
            "shards: the dataset was not built from this run's metadata"
        )
    return table.append_column("part", part), n_parts, parts


def _torch_bytes(obj: object) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def export(run_url: str, fmt: str, out: str) -> list[str]:
    """Write the `fmt` export of the run's dataset into folder `out`; returns the files written."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; the formats are {', '.join(FORMATS)}")
    dataset_url = contract.dataset_folder(run_url)
    out = out.rstrip("/")
    written: list[str] = []
    if fmt == "ids-parquet":
        ids = dataset_table(dataset_url, ["SAMPLE_ID"]).column("SAMPLE_ID").drop_null()
        table = pa.table({"SAMPLE_ID": pc.take(ids, pc.sort_indices(ids))})
        written.append(storage.join(out, "sample_ids.parquet"))
        storage.write_parquet(table, written[-1])
    elif fmt == "urls":
        rows = dataset_table(
            dataset_url,
            ["SAMPLE_ID", "url", "caption", "height", "width", "LICENSE", "NSFW", "similarity"],
        )
        table = pa.table(
            [rows.column(name) for name in rows.column_names], schema=schemas.LAION_METADATA
        )
        written.append(storage.join(out, "urls.parquet"))
        storage.write_parquet(table, written[-1])
    elif fmt == "laion-face-pth":
        joined, n_parts, _ = _with_parts(run_url, dataset_table(dataset_url, ["SAMPLE_ID"]))
        per_part: list[list[int]] = [[] for _ in range(n_parts)]
        for sample_id, part in zip(
            joined.column("SAMPLE_ID").to_pylist(), joined.column("part").to_pylist(), strict=True
        ):
            per_part[part].append(sample_id)
        written.append(storage.join(out, "laion_face_ids.pth"))
        storage.write_bytes(written[-1], _torch_bytes([sorted(ids) for ids in per_part]))
    else:
        written += _export_sample2detect(run_url, dataset_url, out)
    return written


def _shared_ids(sample_ids: list) -> list[int]:
    """The SAMPLE_IDs that more than one sample has, sorted."""
    return sorted(i for i, n in Counter(sample_ids).items() if n > 1)


def _export_sample2detect(run_url: str, dataset_url: str, out: str) -> list[str]:
    import torch

    joined, _, parts = _with_parts(run_url, dataset_table(dataset_url, ["SAMPLE_ID", "faces"]))
    sample_ids = joined.column("SAMPLE_ID").to_pylist()
    shared = _shared_ids(sample_ids)
    if shared:
        shown = ", ".join(str(i) for i in shared[:10])
        raise ExportError(
            f"{len(shared)} SAMPLE_ID(s) belong to several published images ({shown}"
            f"{', ...' if len(shared) > 10 else ''}); sample2detect maps each ID to one image's "
            "faces, so it would drop the others: export --format urls to see those images, or "
            "remove the duplicate IDs from the metadata and re-run"
        )
    per_part: dict[int, dict[int, list]] = {part: {} for part in parts}
    for sample_id, part, faces in zip(
        sample_ids,
        joined.column("part").to_pylist(),
        joined.column("faces").to_pylist(),
        strict=True,
    ):
        per_part[part][sample_id] = [
            (
                torch.tensor(face["box"], dtype=torch.float32),
                torch.tensor(face["landmarks"], dtype=torch.float32),
                float(face["score"]),
            )
            for face in faces
            if face["counted"]
        ]
    written = []
    for part in sorted(per_part):
        url = storage.join(out, f"sample2detect_{part}.pth")
        storage.write_bytes(url, _torch_bytes(per_part[part]))
        written.append(url)
    return written
