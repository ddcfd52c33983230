"""Emit stage: the published dataset, `dataset/` in the run folder.

A sample is published iff select kept it and dedup kept it. The published samples are ordered by
raw shard, then by key (img2dataset's fixed-width digits, so string order is numeric order), and
cut into shards of exactly `emit.samples_per_shard` samples (only the last may be shorter):
dataset shard i holds samples i*N ... i*N+N-1 of that order. A sample keeps its raw img2dataset
key, which is unique in the run, has no dots, and names the same image in raw/, faces/, select/,
dedup/ and dataset/.

Copy mode (`emit.mode = "copy"`) writes, per shard, `NNNNN.tar` (members `{key}.jpg` with the
stored bytes untouched, then `{key}.json`, then `{key}.txt`) and `NNNNN.parquet` (the same samples
in the same order); then `sizes.json`, `shardindex.json`, `manifest.parquet` and, last,
`dataset.json`, which lists every file with its sha256. Manifest mode writes the parquet files only:
`manifest.parquet` points into the raw tars, so no image is copied. `manifests/` documents every
field; `laionface.verify` checks a dataset against it.

Work split: the driver plans (reads the select/dedup decisions, writes `emit/plan.parquet`, one
row group per output shard); each output shard is a task that reads its raw tars once,
sequentially, and writes its files atomically; the driver then writes the index files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laionface.audit import funnel as audit
from laionface.config import Config, DedupSection, fingerprint
from laionface.engine.runner import ShardTask, StageContext, now_iso, software_versions
from laionface.io import schemas, storage
from laionface.io.imagedecode import phash_to_hex
from laionface.io.tars import HashingReader, HashingWriter, TarWriter, iter_members

log = logging.getLogger("laionface")

FORMAT = "laionface-dataset"
FORMAT_VERSION = 1
ORDER_RULE = (
    "samples sorted by raw shard, then by key (both as strings; img2dataset's fixed-width "
    "digits make this numeric order); dataset shard i holds samples i*N to i*N+N-1 with "
    "N = samples_per_shard; a sample's members are {key}.<image>, {key}.json, {key}.txt"
)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Image members are kept in memory up to this size per shard, then spooled to local disk.
SPOOL_IN_MEMORY_BYTES = 256 * 1024 * 1024
READ_THREADS = 16


class EmitError(RuntimeError):
    """The stage outputs emit needs are missing or inconsistent; the message says what to run."""


def shard_name(index: int) -> str:
    return f"{index:05d}"


def _stem(url: str, suffix: str) -> str:
    return url.rsplit("/", 1)[-1][: -len(suffix)]


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"


def _parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=row_group_size)
    return buffer.getvalue()


def _file_entry(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _read_tables(urls: list[str], columns: list[str] | None = None) -> list[pa.Table]:
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(lambda url: storage.read_parquet(url, columns), urls))


def dedup_enabled(section: DedupSection) -> bool:
    return section.exact or section.near or bool(section.reference)


# ---------------------------------------------------------------------------------------------
# The sample record: one row of NNNNN.parquet, and the {key}.json made from it.


def _face_json(face: dict) -> dict:
    marks = face["landmarks"]
    return {
        "box": [face["x1"], face["y1"], face["x2"], face["y2"]],
        "landmarks": [[marks[2 * i], marks[2 * i + 1]] for i in range(5)],
        "score": face["score"],
    }


def sample_json(row: dict) -> dict:
    """The {key}.json of a DATASET_SHARD row (faces as box / landmarks[5][2] / score)."""
    out = {name: row[name] for name in schemas.DATASET_SHARD.names if name != "faces"}
    out["faces"] = [_face_json(face) for face in row["faces"]]
    return out


def sample_json_bytes(row: dict) -> bytes:
    return json.dumps(
        sample_json(row), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _number_or_none(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


# ---------------------------------------------------------------------------------------------
# Per-shard work (runs on a worker).


def _columns_or_null(table: pa.Table, names: Iterable[str]) -> dict[str, list]:
    return {
        name: table.column(name).to_pylist() if name in table.column_names else [None] * len(table)
        for name in names
    }


def _shard_records(run_url: str, raw_shard: str, keys: list[str], min_score: float) -> dict:
    """key -> DATASET_SHARD row (sha256 still empty) for `keys` of one raw shard."""
    wanted = set(keys)
    raw = storage.read_parquet(storage.join(run_url, "raw", f"{raw_shard}.parquet"))
    raw = raw.filter(pc.is_in(raw.column("key"), pa.array(keys, pa.string())))
    raw = raw.filter(pc.equal(raw.column("status"), "success"))
    raw_cols = _columns_or_null(
        raw, ["key", "SAMPLE_ID", "url", "caption", "LICENSE", "NSFW", "similarity"]
    )
    faces = storage.read_parquet(
        storage.join(run_url, "faces", f"{raw_shard}.parquet"),
        columns=["key", "width", "height", "phash", "faces"],
    )
    selected = storage.read_parquet(
        storage.join(run_url, "select", f"{raw_shard}.parquet"), columns=["key", "n_faces"]
    )
    faces = faces.filter(pc.is_in(faces.column("key"), pa.array(keys, pa.string())))
    detections = {row["key"]: row for row in faces.to_pylist()}
    n_faces = dict(
        zip(selected.column("key").to_pylist(), selected.column("n_faces").to_pylist(), strict=True)
    )
    records = {}
    for i, key in enumerate(raw_cols["key"]):
        face_row = detections.get(key)
        if face_row is None:
            raise EmitError(
                f"faces/{raw_shard}.parquet has no row for key {key} although select kept it: "
                "the faces output is stale; re-run the faces, select, dedup and emit stages"
            )
        records[key] = {
            "key": key,
            "SAMPLE_ID": raw_cols["SAMPLE_ID"][i],
            "url": raw_cols["url"][i],
            "caption": raw_cols["caption"][i] or "",
            "width": face_row["width"],
            "height": face_row["height"],
            "LICENSE": raw_cols["LICENSE"][i],
            "NSFW": raw_cols["NSFW"][i],
            "similarity": _number_or_none(raw_cols["similarity"][i]),
            "sha256": "",
            "phash": None if face_row["phash"] is None else phash_to_hex(face_row["phash"]),
            "n_faces": n_faces.get(key, 0),
            "faces": [f for f in face_row["faces"] or [] if f["score"] >= min_score],
            "raw_shard": raw_shard,
        }
    missing = wanted - records.keys()
    if missing:
        raise EmitError(
            f"raw/{raw_shard}.parquet has no successful row for {len(missing)} kept key(s), "
            f"e.g. {sorted(missing)[0]}: the raw shard changed after the faces stage; re-run "
            "the faces, select, dedup and emit stages"
        )
    return records


def _read_plan(plan_url: str, shard: int) -> tuple[list[str], list[str]]:
    fs, path = storage.fs_for(plan_url)
    with fs.open(path, "rb") as handle:
        table = pq.ParquetFile(handle).read_row_group(shard)
    if pc.any(pc.not_equal(table.column("shard"), shard)).as_py():
        raise EmitError(f"{plan_url}: row group {shard} is not shard {shard}; re-run emit")
    return table.column("raw_shard").to_pylist(), table.column("key").to_pylist()


def _groups(raw_shards: list[str], keys: list[str]) -> dict[str, list[str]]:
    """raw shard -> its keys, in plan order (a raw shard's keys are contiguous in the plan)."""
    out: dict[str, list[str]] = {}
    for raw_shard, key in zip(raw_shards, keys, strict=True):
        out.setdefault(raw_shard, []).append(key)
    return out


def _raw_tar(run_url: str, raw_shard: str) -> tuple[str, str]:
    relative = f"raw/{raw_shard}.tar"
    url = storage.join(run_url, relative)
    if not storage.exists(url):
        raise EmitError(f"{url} is missing: emit reads the images from the download stage's tars")
    return relative, url


def _sample_members(run_url: str, raw_shard: str, keys: list[str], keep_images: bool, sink):
    """Stream raw/{raw_shard}.tar once; returns (its path in the run, found, its size/sha256).

    found: {key: {"image" | "json" | "txt": (member, image sha256, spooled)}}; with keep_images
    each wanted image's bytes are appended to `sink` and spooled is their (offset, size) there.
    """
    relative, url = _raw_tar(run_url, raw_shard)
    wanted = set(keys)
    found: dict[str, dict[str, Any]] = {}
    fs, path = storage.fs_for(url)
    with fs.open(path, "rb") as handle:
        reader = HashingReader(handle)
        for member, data in iter_members(
            reader,
            source=url,
            wanted=lambda m: m.key in wanted and m.ext in IMAGE_EXTS,
        ):
            if member.key not in wanted:
                continue
            slots = found.setdefault(member.key, {})
            kind = "image" if member.ext in IMAGE_EXTS else member.ext
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
    tar_name = f"{name}.tar"
    with storage.atomic_open(storage.join(dataset_url, tar_name), "wb") as handle:
        writer = HashingWriter(handle)
        tar = TarWriter(writer)
        for index, row in enumerate(rows):
            key = row["key"]
            image, _, (spool_offset, size) = members[key]["image"]
            spool.seek(spool_offset)
            written = {
                "image": tar.add(f"{key}.{image.ext}", spool.read(size)),
                "json": tar.add(f"{key}.json", sample_json_bytes(row)),
                "txt": tar.add(f"{key}.txt", row["caption"].encode()),
            }
            manifest.append(_manifest_row(row, name, index, tar_name, written))
        tar.close()
    entry = {"sha256": writer.sha256.hexdigest(), "md5": writer.md5.hexdigest()}
    entry["size"] = writer.size
    return manifest, entry


def _manifest_row(row: dict, shard: str, index: int, tar: str, members: dict) -> dict:
    spans = sorted(members.values(), key=lambda m: m.offset)
    for before, after in zip(spans, spans[1:], strict=False):
        if after.offset != before.end:
            raise EmitError(f"{tar}: the members of key {row['key']} are not adjacent")
    out = {
        "key": row["key"],
        "SAMPLE_ID": row["SAMPLE_ID"],
        "shard": shard,
        "index": index,
        "tar": tar,
        "sample_offset": spans[0].offset,
        "sample_size": spans[-1].end - spans[0].offset,
        "image_ext": members["image"].ext,
    }
    for kind in ("image", "json", "txt"):
        out[f"{kind}_offset"] = members[kind].data_offset
        out[f"{kind}_size"] = members[kind].size
    return out


def write_dataset_shard(
    *,
    run_url: str,
    plan_url: str,
    shard: int,
    mode: str,
    min_score: float,
    dataset_url: str,
    members_url: str,
) -> dict:
    """Write dataset shard `shard` (copy: tar + parquet; manifest: parquet) and its manifest rows."""
    name = shard_name(shard)
    raw_shards, keys = _read_plan(plan_url, shard)
    groups = _groups(raw_shards, keys)
    records: dict[str, dict] = {}
    found: dict[str, dict] = {}
    sources: dict[str, dict] = {}
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES) as spool:
        for raw_shard, shard_keys in groups.items():
            records.update(_shard_records(run_url, raw_shard, shard_keys, min_score))
            relative, members, source = _sample_members(
                run_url, raw_shard, shard_keys, keep_images=mode == "copy", sink=spool
            )
            found.update(members)
            sources[relative] = source
        rows = [records[key] for key in keys]
        for row in rows:
            row["sha256"] = found[row["key"]]["image"][1]
        files: dict[str, dict] = {}
        if mode == "copy":
            manifest, files[f"{name}.tar"] = _write_copy_shard(
                dataset_url, name, rows, found, spool
            )
        else:
            manifest = []
            for index, row in enumerate(rows):
                slots = found[row["key"]]
                for kind in ("json", "txt"):
                    if kind not in slots:
                        raise EmitError(f"{run_url}/raw: key {row['key']} has no .{kind} member")
                members = {kind: slots[kind][0] for kind in ("image", "json", "txt")}
                tar = f"raw/{row['raw_shard']}.tar"
                manifest.append(_manifest_row(row, name, index, tar, members))
    parquet = _parquet_bytes(pa.Table.from_pylist(rows, schema=schemas.DATASET_SHARD))
    storage.write_bytes(storage.join(dataset_url, f"{name}.parquet"), parquet)
    files[f"{name}.parquet"] = _file_entry(parquet)
    storage.write_parquet(pa.Table.from_pylist(manifest, schema=schemas.MANIFEST), members_url)
    stats: dict[str, Any] = {"items": len(rows), "samples": len(rows), "files": files}
    if mode == "manifest":
        stats["sources"] = sources
    return stats


# ---------------------------------------------------------------------------------------------
# Planning (driver).


def plan_samples(run_url: str, dedup_required: bool) -> tuple[pa.Table, dict]:
    """The published samples in order, as a table (raw_shard, key), and the select/dedup counts.

    Raises EmitError when an input is missing or the stage outputs disagree with each other.
    """
    raw_urls = storage.list_files(storage.join(run_url, "raw"), ".parquet")
    raw_ids = {_stem(u, ".parquet") for u in raw_urls}
    select_urls = storage.list_files(storage.join(run_url, "select"), ".parquet")
    select_ids = [_stem(u, ".parquet") for u in select_urls]
    missing = sorted(raw_ids - set(select_ids))
    if missing:
        raise EmitError(
            f"{len(missing)} raw shard(s) have no select output (e.g. select/{missing[0]}.parquet)"
            ": run the faces and select stages first"
        )
    if not select_urls:
        raise EmitError(f"{run_url}/select has no shards: run the earlier stages first")
    tables = _read_tables(select_urls, ["key", "kept", "reason"])
    decided = pa.concat_tables(
        t.append_column("raw_shard", pa.array([sid] * len(t), pa.string()))
        for sid, t in zip(select_ids, tables, strict=True)
    )
    bad = pc.invert(pc.match_substring_regex(decided.column("key"), r"^[0-9A-Za-z_-]+$"))
    if pc.any(bad).as_py():
        raise EmitError(
            f"key {decided.column('key').filter(bad)[0].as_py()!r} in select's output is not a "
            "webdataset key (letters, digits, '_' and '-' only; no dots): the raw shards were not "
            "written by the download stage"
        )
    if pc.count_distinct(decided.column("key")).as_py() != len(decided):
        counts = pc.value_counts(decided.column("key")).to_pylist()
        twice = sorted(c["values"] for c in counts if c["counts"] > 1)
        raise EmitError(
            f"key {twice[0]} (and {len(twice) - 1} more) appears in several select shards: "
            "keys must be unique in a run; the raw shards were written twice under one id?"
        )
    kept = decided.filter(decided.column("kept"))
    funnel: dict[str, Any] = {
        "select": {
            "images": len(decided),
            "kept": len(kept),
            "dropped": _reason_counts(decided.filter(pc.invert(decided.column("kept")))),
        }
    }
    dedup_url = storage.join(run_url, "dedup", "decisions.parquet")
    if storage.exists(dedup_url):
        decisions = storage.read_parquet(dedup_url, columns=["key", "kept", "reason"])
        stale_missing = pc.sum(pc.invert(pc.is_in(kept.column("key"), decisions.column("key"))))
        stale_extra = pc.sum(pc.invert(pc.is_in(decisions.column("key"), kept.column("key"))))
        if (stale_missing.as_py() or 0) or (stale_extra.as_py() or 0):
            raise EmitError(
                f"{dedup_url} does not match select's output ({stale_missing.as_py() or 0} kept "
                f"samples without a decision, {stale_extra.as_py() or 0} decisions for samples "
                "select did not keep): it is stale; re-run the dedup and emit stages"
            )
        dedup_kept = decisions.filter(decisions.column("kept")).column("key")
        funnel["dedup"] = {
            "images": len(decisions),
            "kept": len(dedup_kept),
            "dropped": _reason_counts(decisions.filter(pc.invert(decisions.column("kept")))),
        }
        kept = kept.filter(pc.is_in(kept.column("key"), dedup_kept))
    elif dedup_required:
        raise EmitError(
            f"{dedup_url} is missing: run the dedup stage first (or disable it: "
            "dedup.exact = false, dedup.near = false, dedup.reference = [])"
        )
    else:
        funnel["dedup"] = {"disabled": True}
    ordered = kept.select(["raw_shard", "key"]).sort_by(
        [("raw_shard", "ascending"), ("key", "ascending")]
    )
    funnel["published"] = len(ordered)
    return ordered, funnel


def _reason_counts(table: pa.Table) -> dict[str, int]:
    counts = pc.value_counts(table.column("reason").fill_null("unknown")).to_pylist()
    return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])}


INPUTS = {
    "raw": (".tar", ".parquet"),
    "faces": (".parquet",),
    "select": (".parquet",),
    "dedup": ("decisions.parquet",),
}


def _input_sizes(run_url: str) -> list[tuple[str, int]]:
    """(file, size) of every input emit reads, so changed inputs change the fingerprint."""
    out = []
    for folder, suffixes in INPUTS.items():
        fs, path = storage.fs_for(storage.join(run_url, folder))
        if fs.exists(path):
            for info in fs.ls(path, detail=True):
                name = info["name"].rstrip("/").rsplit("/", 1)[-1]
                if name.endswith(suffixes) and not name.startswith(storage.TEMP_PREFIX):
                    out.append((f"{folder}/{name}", int(info["size"])))
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# The index files (driver).


def _remove_markers_of_missing_files(marker_dir: str, dataset_url: str) -> None:
    """A shard marked done whose files are gone or changed size is redone (someone deleted it)."""
    fs, path = storage.fs_for(marker_dir)
    if not fs.exists(path):
        return
    present = {}
    dfs, dpath = storage.fs_for(dataset_url)
    if dfs.exists(dpath):
        present = {
            info["name"].rstrip("/").rsplit("/", 1)[-1]: int(info["size"])
            for info in dfs.ls(dpath, detail=True)
        }
    markers = [p for p in fs.ls(path, detail=False) if p.endswith(".json")]
    markers = [p for p in markers if not p.rsplit("/", 1)[-1].startswith(storage.TEMP_PREFIX)]
    for marker, blob in (fs.cat(markers) if markers else {}).items():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            files = json.loads(blob)["stats"]["files"]
            if any(present.get(name) != entry["size"] for name, entry in files.items()):
                fs.rm(marker)


def _write_manifest(dataset_url: str, member_urls: list[str]) -> dict:
    with storage.atomic_open(storage.join(dataset_url, "manifest.parquet"), "wb") as handle:
        sink = HashingWriter(handle)
        with pq.ParquetWriter(sink, schemas.MANIFEST, compression="zstd") as writer:
            for url in member_urls:
                writer.write_table(storage.read_parquet(url).cast(schemas.MANIFEST))
    return {"sha256": sink.sha256.hexdigest(), "size": sink.size}


def _remove_stale_files(dataset_url: str, keep: set[str]) -> None:
    fs, path = storage.fs_for(dataset_url)
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name not in keep:
            log.info("emit: removing %s (not part of the new dataset)", name)
            fs.rm(entry, recursive=True)


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def run(ctx: StageContext) -> None:
    config: Config = ctx.config
    section = config.emit
    run_url = ctx.run.url
    dataset_url = ctx.path("dataset")
    # A reader trusts dataset.json; remove it before any file it lists is rewritten.
    storage.remove(storage.join(dataset_url, "dataset.json"))

    ordered, funnel = plan_samples(run_url, dedup_enabled(config.dedup))
    if len(ordered) == 0:
        raise EmitError(
            "no sample passed select and dedup, so there is nothing to publish: see the drop "
            "counts in run.json and loosen the [select] rules"
        )
    per_shard = section.samples_per_shard
    n_shards = -(-len(ordered) // per_shard)
    shard_column = pa.array(np.arange(len(ordered)) // per_shard, pa.int32())
    plan = ordered.add_column(0, "shard", shard_column)
    plan_bytes = _parquet_bytes(plan, row_group_size=per_shard)
    plan_url = ctx.path("emit", "plan.parquet")
    storage.write_bytes(plan_url, plan_bytes)

    digest = hashlib.sha256(plan_bytes)
    digest.update(json.dumps(_input_sizes(run_url)).encode())
    digest.update(f"{fingerprint(config, 'emit')}/{FORMAT_VERSION}".encode())
    stage_fingerprint = digest.hexdigest()[:16]

    _remove_markers_of_missing_files(ctx.path("emit", "_done"), dataset_url)
    tasks = [
        ShardTask(
            shard_name(i),
            dict(
                run_url=run_url,
                plan_url=plan_url,
                shard=i,
                mode=section.mode,
                min_score=config.select.min_score,
                dataset_url=dataset_url,
                members_url=ctx.path("emit", "members", f"{shard_name(i)}.parquet"),
            ),
        )
        for i in range(n_shards)
    ]
    stats = ctx.map_shards(
        "emit", write_dataset_shard, tasks, fingerprint=stage_fingerprint, unit="samples"
    )
    names = [shard_name(i) for i in range(n_shards)]
    files: dict[str, dict] = {}
    for name in names:
        files.update(stats[name]["files"])
    if section.mode == "copy":
        sizes = {f"{name}.tar": stats[name]["samples"] for name in names}
        shardindex = {
            "__kind__": "wids-shard-index-v1",
            "wids_version": 1,
            "shardlist": [
                {
                    "url": f"{name}.tar",
                    "md5sum": files[f"{name}.tar"]["md5"],
                    "nsamples": stats[name]["samples"],
                    "filesize": files[f"{name}.tar"]["size"],
                }
                for name in names
            ],
        }
        for file_name, obj in (("sizes.json", sizes), ("shardindex.json", shardindex)):
            data = _json_bytes(obj)
            storage.write_bytes(storage.join(dataset_url, file_name), data)
            files[file_name] = _file_entry(data)
    member_urls = [ctx.path("emit", "members", f"{name}.parquet") for name in names]
    files["manifest.parquet"] = _write_manifest(dataset_url, member_urls)
    _remove_stale_files(dataset_url, set(files))

    # The audit's figures from the metadata inputs to dedup, conservation checked; emit's own
    # counts above say what it read and published.
    funnel["audit"] = audit.funnel_summary(run_url, upto="dedup")
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": config.run.name,
        "created": now_iso(),
        "mode": section.mode,
        "order": ORDER_RULE,
        "samples_per_shard": per_shard,
        "counts": {"samples": len(ordered), "shards": n_shards},
        "config": config.resolved(),
        "versions": software_versions(),
        "funnel": funnel,
        "files": {name: files[name] for name in sorted(files)},
    }
    if section.mode == "manifest":
        sources: dict[str, dict] = {}
        for name in names:
            sources.update(stats[name]["sources"])
        meta["source_root"] = _absolute(run_url)
        meta["sources"] = {name: sources[name] for name in sorted(sources)}
    storage.write_bytes(storage.join(dataset_url, "dataset.json"), _json_bytes(meta))
    log.info(
        "emit: %d samples in %d shards (%s mode) at %s",
        len(ordered),
        n_shards,
        section.mode,
        dataset_url,
    )
