"""One dataset shard, written by a worker: its tar (copy mode), its parquet and manifest rows.

A task gets its spans of the plan (plan.Span: a raw shard and a range of its published keys),
recomputes those keys (plan.kept_keys, checked against the plan's digest), then for each raw
shard reads the raw parquet, faces and select rows of its samples and, in one sequential pass,
the raw tar's members; image bytes are spooled (in memory up to SPOOL_IN_MEMORY_BYTES, then on
local disk) and copied untouched into the new tar. Every file is written atomically.

`sample_sizes` (for emit.max_shard_bytes) measures, per raw shard, the bytes each sample will
take in a dataset tar, from the same records and the raw tar's member sizes, before the cut.
"""

from __future__ import annotations

import hashlib
import io
import math
import tempfile
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laionface import selection
from laionface.dataset import contract
from laionface.io import storage
from laionface.io.imagedecode import phash_to_hex
from laionface.io.tars import HashingReader, HashingWriter, Member, TarWriter, members_of
from laionface.layout import RunLayout, shard_name
from laionface.stages.emit.plan import EmitError, kept_keys, keys_digest

# Image members are kept in memory up to this size per shard, then spooled to local disk.
SPOOL_IN_MEMORY_BYTES = 256 * 1024 * 1024


def _is_image(member: Member) -> bool:
    return contract.is_image_ext(member.ext)


def _number_or_none(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _columns_or_null(table: pa.Table, names: Iterable[str]) -> dict[str, list]:
    return {
        name: table.column(name).to_pylist() if name in table.column_names else [None] * len(table)
        for name in names
    }


def _published_faces(key: str, raw_shard: str, faces: list, counted: list, min_score: float):
    """The published records of a faces/ row's detections (those scoring >= min_score), each
    with select's counted flag."""
    if len(counted) != len(faces):
        raise EmitError(
            f"select/{raw_shard}.parquet has {len(counted)} counted flags for key {key}, whose "
            f"faces row has {len(faces)} detections: select's output is stale; re-run the "
            "select, dedup and emit stages"
        )
    return [
        contract.dataset_face(face, flag)
        for face, flag in zip(faces, counted, strict=True)
        if selection.scores(face, min_score)
    ]


def _record(
    key: str, raw_shard: str, raw: dict, face_row: dict, decision: dict, min_score: float
) -> dict:
    """The DATASET_SHARD row of one sample (sha256 as faces/ recorded it; emit checks it)."""
    faces = _published_faces(
        key, raw_shard, face_row["faces"] or [], decision["counted"] or [], min_score
    )
    if sum(face["counted"] for face in faces) != decision["n_faces"]:
        raise EmitError(
            f"select/{raw_shard}.parquet: key {key} has n_faces {decision['n_faces']} but "
            f"{sum(f['counted'] for f in faces)} counted faces score >= select.min_score "
            f"{min_score}: select ran with other settings; re-run the select, dedup and emit "
            "stages"
        )
    return {
        "key": key,
        "SAMPLE_ID": raw["SAMPLE_ID"],
        "url": raw["url"],
        "caption": raw["caption"] or "",
        "width": face_row["width"],
        "height": face_row["height"],
        "LICENSE": raw["LICENSE"],
        "NSFW": raw["NSFW"],
        "similarity": _number_or_none(raw["similarity"]),
        "sha256": face_row["sha256"],
        "phash": None if face_row["phash"] is None else phash_to_hex(face_row["phash"]),
        "n_faces": decision["n_faces"],
        "faces": faces,
        "raw_shard": raw_shard,
    }


def _rows_by_key(url: str, keys: pa.Array, columns: list[str] | None = None) -> dict[str, dict]:
    table = storage.read_parquet(url, columns=columns)
    table = table.filter(pc.is_in(table.column("key"), keys))
    return {row["key"]: row for row in table.to_pylist()}


def _shard_records(layout: RunLayout, raw_shard: str, keys: list[str], min_score: float) -> dict:
    """key -> DATASET_SHARD row for `keys` of one raw shard."""
    wanted = pa.array(keys, pa.string())
    raw = storage.read_parquet(layout.raw_parquet(raw_shard))
    raw = raw.filter(pc.is_in(raw.column("key"), wanted))
    raw = raw.filter(pc.equal(raw.column("status"), "success"))
    names = ["key", "SAMPLE_ID", "url", "caption", "LICENSE", "NSFW", "similarity"]
    raw_rows = [
        dict(zip(names, values, strict=True))
        for values in zip(*_columns_or_null(raw, names).values(), strict=True)
    ]
    face_rows = _rows_by_key(
        layout.faces(raw_shard), wanted, ["key", "width", "height", "phash", "sha256", "faces"]
    )
    decisions = _rows_by_key(layout.select(raw_shard), wanted, ["key", "n_faces", "counted"])
    records = {}
    for raw_row in raw_rows:
        key = raw_row["key"]
        if key not in face_rows or key not in decisions:
            raise EmitError(
                f"faces/{raw_shard}.parquet or select/{raw_shard}.parquet has no row for key "
                f"{key} although select kept it: they are stale; re-run the faces, select, dedup "
                "and emit stages"
            )
        records[key] = _record(key, raw_shard, raw_row, face_rows[key], decisions[key], min_score)
    missing = set(keys) - records.keys()
    if missing:
        raise EmitError(
            f"raw/{raw_shard}.parquet has no successful row for {len(missing)} kept key(s), "
            f"e.g. {sorted(missing)[0]}: the raw shard changed after the faces stage; re-run "
            "the faces, select, dedup and emit stages"
        )
    return records


def published_keys(run_url: str, raw: str, dedup: bool, digest: str) -> list[str]:
    """Raw shard `raw`'s published keys, checked to be those the plan was made from."""
    keys = kept_keys(run_url, raw, dedup)
    if keys_digest(keys) != digest:
        raise EmitError(
            f"select/{raw}.parquet or the dedup decisions changed after emit planned its shards: "
            "re-run the emit stage"
        )
    return keys.to_pylist()


def _raw_tar(layout: RunLayout, raw_shard: str) -> tuple[str, str]:
    url = layout.raw_tar(raw_shard)
    if not storage.exists(url):
        raise EmitError(f"{url} is missing: emit reads the images from the download stage's tars")
    return layout.relative(url), url


def _sample_members(layout: RunLayout, raw_shard: str, keys: list[str], keep_images: bool, sink):
    """Stream raw/{raw_shard}.tar once; returns (its path in the run, found, its size/sha256).

    found: {key: {"image" | "json" | "txt": (member, image sha256, spooled)}}; with keep_images
    each wanted image's bytes are appended to `sink` and spooled is their (offset, size) there.
    """
    relative, url = _raw_tar(layout, raw_shard)
    wanted = set(keys)
    found: dict[str, dict[str, Any]] = {}
    fs, path = storage.fs_for(url)
    with fs.open(path, "rb") as handle:
        reader = HashingReader(handle)
        for member, data in members_of(reader, wanted, source=url, read=_is_image):
            slots = found.setdefault(member.key, {})
            kind = contract.member_kind(member.ext)
            if kind in slots:
                raise EmitError(f"{url}: key {member.key} has two {kind} members")
            if data is None:
                slots[kind] = (member, None, None)
                continue
            digest = hashlib.sha256(data).hexdigest()
            spooled = None
            if keep_images:
                spooled = (sink.tell(), len(data))
                sink.write(data)
            slots[kind] = (member, digest, spooled)
        reader.drain()
    for key in keys:
        if "image" not in found.get(key, {}):
            raise EmitError(
                f"{url} has no image member for key {key} although select kept it: the raw "
                "shard changed after the faces stage; re-run faces, select, dedup and emit"
            )
    source = {"sha256": reader.sha256.hexdigest(), "size": reader.size}
    return relative, found, source


def _write_copy_shard(dataset_url: str, name: str, rows: list[dict], members: dict, spool):
    """NNNNN.tar and the manifest rows for it; returns (manifest rows, tar file entry)."""
    manifest = []
    tar_name = contract.tar_name(name)
    with storage.atomic_open(storage.join(dataset_url, tar_name), "wb") as handle:
        writer = HashingWriter(handle)
        tar = TarWriter(writer)
        for index, row in enumerate(rows):
            key = row["key"]
            image, _, (spool_offset, size) = members[key]["image"]
            spool.seek(spool_offset)
            written = {
                "image": tar.add(f"{key}.{image.ext}", spool.read(size)),
                "json": tar.add(f"{key}.json", contract.sample_json_bytes(row)),
                "txt": tar.add(f"{key}.txt", row["caption"].encode()),
            }
            manifest.append(_manifest_row(row, name, index, tar_name, written))
        tar.close()
    entry = {"sha256": writer.sha256.hexdigest(), "md5": writer.md5.hexdigest()}
    entry["size"] = writer.size
    return manifest, entry


def _manifest_row(row: dict, shard: str, index: int, tar: str, members: dict) -> dict:
    try:
        return contract.manifest_row(row["key"], row["SAMPLE_ID"], shard, index, tar, members)
    except ValueError as exc:
        raise EmitError(str(exc)) from None


def _manifest_mode_rows(layout: RunLayout, name: str, rows: list[dict], found: dict) -> list:
    """Manifest rows pointing into the raw tars (manifest mode)."""
    manifest = []
    for index, row in enumerate(rows):
        slots = found[row["key"]]
        for kind in ("json", "txt"):
            if kind not in slots:
                raise EmitError(f"{layout.raw}: key {row['key']} has no .{kind} member")
        members = {kind: slots[kind][0] for kind in ("image", "json", "txt")}
        tar = layout.relative(layout.raw_tar(row["raw_shard"]))
        manifest.append(_manifest_row(row, name, index, tar, members))
    return manifest


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def write_dataset_shard(
    *,
    run_url: str,
    spans: list[tuple[str, int, int]],
    digests: dict[str, str],
    dedup: bool,
    shard: int,
    mode: str,
    min_score: float,
    dataset_url: str,
    members_url: str,
) -> dict:
    """Write dataset shard `shard` (copy: tar + parquet; manifest: parquet) and its manifest
    rows: the published samples `spans` name ((raw shard, start, stop) of its kept keys)."""
    layout = RunLayout(run_url)
    name = shard_name(shard)
    groups = {
        raw: published_keys(run_url, raw, dedup, digests[raw])[start:stop]
        for raw, start, stop in spans
    }
    keys = [key for shard_keys in groups.values() for key in shard_keys]
    records: dict[str, dict] = {}
    found: dict[str, dict] = {}
    sources: dict[str, dict] = {}
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES) as spool:
        for raw_shard, shard_keys in groups.items():
            records.update(_shard_records(layout, raw_shard, shard_keys, min_score))
            relative, members, source = _sample_members(
                layout, raw_shard, shard_keys, keep_images=mode == "copy", sink=spool
            )
            found.update(members)
            sources[relative] = source
        rows = [records[key] for key in keys]
        for row in rows:
            if found[row["key"]]["image"][1] != row["sha256"]:
                raise EmitError(
                    f"raw/{row['raw_shard']}.tar: the image of key {row['key']} is not the one "
                    "the faces stage read (sha256 differs): re-run the faces, select, dedup and "
                    "emit stages"
                )
        files: dict[str, dict] = {}
        if mode == "copy":
            manifest, files[contract.tar_name(name)] = _write_copy_shard(
                dataset_url, name, rows, found, spool
            )
        else:
            manifest = _manifest_mode_rows(layout, name, rows, found)
    parquet = _parquet_bytes(pa.Table.from_pylist(rows, schema=contract.DATASET_SHARD))
    storage.write_bytes(storage.join(dataset_url, contract.parquet_name(name)), parquet)
    files[contract.parquet_name(name)] = contract.file_entry(parquet)
    storage.write_parquet(pa.Table.from_pylist(manifest, schema=contract.MANIFEST), members_url)
    stats: dict[str, Any] = {"items": len(rows), "samples": len(rows), "files": files}
    if mode == "manifest":
        stats["sources"] = sources
    return stats


def sample_sizes(
    *, run_url: str, raw_shard: str, dedup: bool, digest: str, min_score: float
) -> dict:
    """The bytes each published sample of raw shard `raw_shard` will take in a dataset tar, in
    order: its three members' headers, data and padding (contract.sample_bytes).

    Reads the same records write_dataset_shard writes and the image sizes from the raw tar's
    headers; returns {"items": n, "bytes": [...]}, which the plan cuts shards by.
    """
    layout = RunLayout(run_url)
    keys = published_keys(run_url, raw_shard, dedup, digest)
    records = _shard_records(layout, raw_shard, keys, min_score)
    _, url = _raw_tar(layout, raw_shard)
    image_sizes: dict[str, int] = {}
    fs, path = storage.fs_for(url)
    with fs.open(path, "rb") as handle:
        for member, _ in members_of(handle, set(keys), source=url, read=lambda m: False):
            if _is_image(member):
                image_sizes[member.key] = member.size
    sizes = []
    for key in keys:
        if key not in image_sizes:
            raise EmitError(f"{url} has no image member for key {key} although select kept it")
        record = records[key]
        sizes.append(
            contract.sample_bytes(
                [
                    image_sizes[key],
                    len(contract.sample_json_bytes(record)),
                    len(record["caption"].encode()),
                ]
            )
        )
    return {"items": len(keys), "bytes": sizes}
