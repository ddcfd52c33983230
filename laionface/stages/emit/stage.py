"""Emit stage: the published dataset, `dataset/` in the run folder (laionface.dataset.contract).

A sample is published iff select kept it and dedup kept it (or dedup is turned off). The
published samples are ordered by raw shard, then by key (img2dataset's fixed-width digits, so
string order is numeric order), and cut into shards in that order (contract.ORDER_RULE): at
`emit.samples_per_shard` samples, and, when `emit.max_shard_bytes` is set, before a tar would
pass that size (a step `emit/sizes` measures every sample's bytes first, one task per raw
shard). A sample keeps its raw img2dataset key, which is unique in the run, has no dots, and
names the same image in raw/, faces/, select/, dedup/ and dataset/. Each face is published
with select's `counted` flag (laionface.selection says which detections are published).

Copy mode (`emit.mode = "copy"`) writes, per shard, `NNNNN.tar` (members `{key}.jpg` with the
stored bytes untouched, then `{key}.json`, then `{key}.txt`) and `NNNNN.parquet` (the same samples
in the same order); then `sizes.json`, `shardindex.json` and `manifest.parquet`. Manifest mode
writes the parquet files only: `manifest.parquet` points into the raw tars, so no image is copied.

Work split: the driver plans (reads the select/dedup decisions, writes `emit/plan.parquet`, one
row group per output shard); each output shard is a task (shard.py) that reads its raw tars once,
sequentially, and writes its files atomically; a shard is redone when its slice of the plan or
a file it read has changed. The driver then writes the index files and `emit/dataset.json`,
which the stage's finish completes with the audit's funnel and the stages' provenance; finish
writes the dataset card `dataset/README.md` from it, then `dataset/dataset.json`, last.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laionface.dataset import contract
from laionface.engine.markers import now_iso
from laionface.engine.runfolder import software_versions
from laionface.engine.runner import ShardTask, StageContext
from laionface.engine.stage import Stage
from laionface.io import schemas, storage
from laionface.io.schemas import EMIT_PLAN
from laionface.io.tars import HashingWriter
from laionface.layout import (
    DATASET,
    DEDUP,
    EMIT,
    FACES,
    RAW,
    SELECT,
    STAGE_ORDER,
    RunLayout,
    shard_name,
    shard_of_file,
)
from laionface.stages.emit.shard import EmitError, sample_sizes, write_dataset_shard

log = logging.getLogger("laionface")

READ_THREADS = 16
WEBDATASET_KEY = r"^[0-9A-Za-z_-]+$"


# ---------------------------------------------------------------------------------------------
# Planning


def _read_tables(urls: list[str], columns: list[str]) -> list[pa.Table]:
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(lambda url: storage.read_parquet(url, columns), urls))


def _kept_no_metadata_row(layout: RunLayout) -> bool:
    """Whether the metadata stage ran and wrote no shard (its summary says 0): then there is
    nothing to download, detect or select, and the dataset is empty."""
    summary = layout.metadata_summary
    return storage.exists(summary) and storage.read_json(summary)["shards"] == 0


def _select_decisions(layout: RunLayout) -> pa.Table:
    """select's decisions of every raw shard (key, kept, reason, raw_shard), checked."""
    raw_ids = {shard_of_file(u) for u in storage.list_files(layout.raw, ".parquet")}
    select_urls = storage.list_files(layout.select_folder, ".parquet")
    select_ids = [shard_of_file(u) for u in select_urls]
    missing = sorted(raw_ids - set(select_ids))
    if missing:
        raise EmitError(
            f"{len(missing)} raw shard(s) have no select output (e.g. {layout.select(missing[0])})"
            ": run the faces and select stages first"
        )
    if not select_urls:
        if not _kept_no_metadata_row(layout):
            raise EmitError(f"{layout.select_folder} has no shards: run the earlier stages first")
        empty = schemas.SELECT.empty_table().select(["key", "kept", "reason"])
        return empty.append_column("raw_shard", pa.array([], pa.string()))
    tables = _read_tables(select_urls, ["key", "kept", "reason"])
    decided = pa.concat_tables(
        t.append_column("raw_shard", pa.array([sid] * len(t), pa.string()))
        for sid, t in zip(select_ids, tables, strict=True)
    )
    keys = decided.column("key")
    bad = pc.invert(pc.match_substring_regex(keys, WEBDATASET_KEY))
    if pc.any(bad).as_py():
        raise EmitError(
            f"key {keys.filter(bad)[0].as_py()!r} in select's output is not a webdataset key "
            "(letters, digits, '_' and '-' only; no dots): the raw shards were not written by the "
            "download stage"
        )
    if pc.count_distinct(keys).as_py() != len(decided):
        twice = sorted(c["values"] for c in pc.value_counts(keys).to_pylist() if c["counts"] > 1)
        raise EmitError(
            f"key {twice[0]} (and {len(twice) - 1} more) appears in several select shards: "
            "keys must be unique in a run; the raw shards were written twice under one id?"
        )
    return decided


def _dedup_kept(layout: RunLayout, kept: pa.Table) -> pa.ChunkedArray:
    """The keys dedup kept, checked against the samples select kept."""
    url = layout.dedup_decisions
    decisions = storage.read_parquet(url, columns=["key", "kept"])
    missing = pc.sum(pc.invert(pc.is_in(kept.column("key"), decisions.column("key")))).as_py()
    extra = pc.sum(pc.invert(pc.is_in(decisions.column("key"), kept.column("key")))).as_py()
    if missing or extra:
        raise EmitError(
            f"{url} does not match select's output ({missing or 0} kept samples without a "
            f"decision, {extra or 0} decisions for samples select did not keep): it is stale; "
            "re-run the dedup and emit stages"
        )
    return decisions.filter(decisions.column("kept")).column("key")


def plan_samples(run_url: str, dedup_required: bool) -> pa.Table:
    """The published samples in order, as a table (raw_shard, key).

    Raises EmitError when an input is missing or the stage outputs disagree with each other.
    """
    layout = RunLayout(run_url)
    decided = _select_decisions(layout)
    kept = decided.filter(decided.column("kept"))
    if storage.exists(layout.dedup_decisions):
        kept = kept.filter(pc.is_in(kept.column("key"), _dedup_kept(layout, kept)))
    elif dedup_required:
        raise EmitError(
            f"{layout.dedup_decisions} is missing: run the dedup stage first (or disable it: "
            "dedup.exact = false, dedup.near = false, dedup.reference = [])"
        )
    return kept.select(["raw_shard", "key"]).sort_by(
        [("raw_shard", "ascending"), ("key", "ascending")]
    )


def _slice_token(plan: pa.Table) -> str:
    """A digest of one shard's slice of the plan: its raw shards and keys, in order."""
    digest = hashlib.sha256()
    for name in ("raw_shard", "key"):
        digest.update("\n".join(plan.column(name).to_pylist()).encode() + b"\0")
    return digest.hexdigest()[:16]


def _raw_inputs(layout: RunLayout, raw_shards: list[str]) -> tuple[str, ...]:
    """The files a task reading `raw_shards` depends on."""
    return tuple(
        url
        for raw in raw_shards
        for url in (
            layout.raw_tar(raw),
            layout.raw_parquet(raw),
            layout.faces(raw),
            layout.select(raw),
        )
    )


def _measured_bytes(ctx: StageContext, ordered: pa.Table) -> list[int]:
    """Every published sample's bytes in a dataset tar, in plan order (step emit/sizes)."""
    groups: dict[str, list[str]] = {}
    for raw, key in zip(
        ordered.column("raw_shard").to_pylist(), ordered.column("key").to_pylist(), strict=True
    ):
        groups.setdefault(raw, []).append(key)
    tasks = [
        ShardTask(
            raw,
            dict(
                run_url=ctx.layout.url,
                raw_shard=raw,
                keys=keys,
                min_score=ctx.config.select.min_score,
            ),
            inputs=_raw_inputs(ctx.layout, [raw]),
            token=hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16],
        )
        for raw, keys in groups.items()
    ]
    # A sample's bytes depend on the faces it publishes, not on where the shards are cut.
    settings = {"select.min_score": ctx.config.select.min_score}
    stats = ctx.map_shards("emit/sizes", sample_sizes, tasks, settings=settings, unit="samples")
    return [size for raw in groups for size in stats[raw]["bytes"]]


def _write_plan(url: str, plan: pa.Table, counts: list[int]) -> None:
    """emit/plan.parquet: one row group per dataset shard (a task reads its own)."""
    with (
        storage.atomic_open(url) as handle,
        pq.ParquetWriter(handle, EMIT_PLAN, compression="zstd") as writer,
    ):
        start = 0
        for count in counts:
            writer.write_table(plan.slice(start, count), row_group_size=count)
            start += count


def _tasks(ctx: StageContext, ordered: pa.Table) -> list[ShardTask]:
    """Write emit/plan.parquet (the ORDER_RULE's cut) and a task per dataset shard."""
    layout, section = ctx.layout, ctx.config.emit
    measured = _measured_bytes(ctx, ordered) if section.max_shard_bytes else [0] * len(ordered)
    counts = contract.cut_shards(measured, section.samples_per_shard, section.max_shard_bytes)
    shard_column = pa.array(np.repeat(np.arange(len(counts)), counts), pa.int32())
    plan = ordered.add_column(0, "shard", shard_column).cast(EMIT_PLAN)
    _write_plan(layout.emit_plan, plan, counts)
    tasks = []
    starts = np.cumsum([0, *counts])[:-1]
    for i, (start, count) in enumerate(zip(starts.tolist(), counts, strict=True)):
        name = shard_name(i)
        mine = plan.slice(start, count)
        outputs = [storage.join(layout.dataset, contract.parquet_name(name))]
        if section.mode == "copy":
            outputs.append(storage.join(layout.dataset, contract.tar_name(name)))
        outputs.append(layout.emit_members(name))
        kwargs = dict(
            run_url=layout.url,
            plan_url=layout.emit_plan,
            shard=i,
            mode=section.mode,
            min_score=ctx.config.select.min_score,
            dataset_url=layout.dataset,
            members_url=layout.emit_members(name),
        )
        inputs = _raw_inputs(layout, sorted(set(mine.column("raw_shard").to_pylist())))
        tasks.append(
            ShardTask(name, kwargs, inputs=inputs, outputs=tuple(outputs), token=_slice_token(mine))
        )
    return tasks


# ---------------------------------------------------------------------------------------------
# The index files and dataset.json


def _write_manifest(dataset_url: str, member_urls: list[str]) -> dict:
    url = storage.join(dataset_url, contract.MANIFEST_PARQUET)
    with storage.atomic_open(url, "wb") as handle:
        sink = HashingWriter(handle)
        with pq.ParquetWriter(sink, contract.MANIFEST, compression="zstd") as writer:
            for member_url in member_urls:
                writer.write_table(storage.read_parquet(member_url).cast(contract.MANIFEST))
    return {"sha256": sink.sha256.hexdigest(), "size": sink.size}


def _write_json(dataset_url: str, name: str, obj: Any) -> dict:
    data = contract.json_bytes(obj)
    storage.write_bytes(storage.join(dataset_url, name), data)
    return contract.file_entry(data)


def _index_files(ctx: StageContext, names: list[str], stats: dict[str, dict]) -> dict:
    """Write sizes.json, shardindex.json (copy mode) and manifest.parquet; every file's entry."""
    dataset_url = ctx.layout.dataset
    files: dict[str, dict] = {}
    for name in names:
        files.update(stats[name]["files"])
    if ctx.config.emit.mode == "copy":
        samples = {name: stats[name]["samples"] for name in names}
        files[contract.SIZES_JSON] = _write_json(
            dataset_url, contract.SIZES_JSON, contract.sizes(samples)
        )
        index = contract.shard_index(ctx.config.run.name, samples, files)
        files[contract.SHARD_INDEX_JSON] = _write_json(
            dataset_url, contract.SHARD_INDEX_JSON, index
        )
    member_urls = [ctx.layout.emit_members(name) for name in names]
    files[contract.MANIFEST_PARQUET] = _write_manifest(dataset_url, member_urls)
    return files


def _remove_stale_files(dataset_url: str, keep: set[str]) -> None:
    fs, path = storage.fs_for(dataset_url)
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name not in keep:
            log.info("emit: removing %s (not part of the new dataset)", name)
            fs.rm(entry, recursive=True)


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def _pending_meta(ctx: StageContext, names: list[str], stats: dict, files: dict) -> dict:
    """dataset.json as far as emit knows it (finish adds the funnel and the provenance)."""
    section = ctx.config.emit
    meta: dict[str, Any] = {
        "format": contract.FORMAT,
        "format_version": contract.FORMAT_VERSION,
        "name": ctx.config.run.name,
        "mode": section.mode,
        "order": contract.ORDER_RULE,
        "samples_per_shard": section.samples_per_shard,
        "max_shard_bytes": section.max_shard_bytes,
        "counts": {"samples": sum(stats[n]["samples"] for n in names), "shards": len(names)},
        "files": {name: files[name] for name in sorted(files)},
    }
    if section.mode == "manifest":
        sources: dict[str, dict] = {}
        for name in names:
            sources.update(stats[name]["sources"])
        meta["source_root"] = _absolute(ctx.layout.url)
        meta["sources"] = {name: sources[name] for name in sorted(sources)}
    return meta


def run(ctx: StageContext) -> None:
    layout = ctx.layout
    # A reader trusts dataset.json; remove it before any file it lists is rewritten.
    storage.remove(storage.join(layout.dataset, contract.DATASET_JSON))
    ordered = plan_samples(layout.url, ctx.config.dedup.enabled)
    if len(ordered) == 0:
        # An empty result is a result: an empty dataset (no shard, sizes.json {}, an empty
        # manifest) whose dataset.json and card say 0 samples, and that verifies.
        log.warning(
            "emit: no sample passed every stage: the dataset is empty (0 samples); "
            "`laionface stats` shows where the rows went"
        )
    tasks = _tasks(ctx, ordered)
    stats = ctx.map_shards("emit", write_dataset_shard, tasks, unit="samples")
    names = [task.shard for task in tasks]
    files = _index_files(ctx, names, stats)
    _remove_stale_files(layout.dataset, set(files))
    storage.write_json(layout.emit_pending, _pending_meta(ctx, names, stats, files))
    log.info(
        "emit: %d samples in %d shards (%s mode) at %s",
        len(ordered),
        len(names),
        ctx.config.emit.mode,
        layout.dataset,
    )


def _image_ext(dataset_url: str) -> str | None:
    """The image members' extension, if all samples share one (the card types the tars by it)."""
    manifest = storage.join(dataset_url, contract.MANIFEST_PARQUET)
    exts = pc.unique(storage.read_parquet(manifest, ["image_ext"]).column("image_ext"))
    return exts[0].as_py() if len(exts) == 1 else None


def finish(ctx: StageContext, funnel: dict) -> None:
    """Complete dataset.json with the audit's funnel and the stages' provenance, write the
    dataset card from it, then dataset.json, last."""
    meta = storage.read_json(ctx.layout.emit_pending)
    meta.update(
        created=now_iso(),
        versions=software_versions(),
        stages=ctx.run.provenance(STAGE_ORDER),
        funnel=funnel,
    )
    card = contract.dataset_card(meta, _image_ext(ctx.layout.dataset)).encode()
    storage.write_bytes(storage.join(ctx.layout.dataset, contract.DATASET_CARD), card)
    meta["files"] = dict(
        sorted({**meta["files"], contract.DATASET_CARD: contract.file_entry(card)}.items())
    )
    storage.write_bytes(
        storage.join(ctx.layout.dataset, contract.DATASET_JSON), contract.json_bytes(meta)
    )


STAGE = Stage(
    name="emit",
    reads=(RAW, FACES, SELECT, DEDUP),
    writes=(EMIT, DATASET),
    settings=("emit", "select.min_score"),
    run=run,
    finish=finish,
)
