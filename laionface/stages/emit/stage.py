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

Work split: the driver plans by counts (plan.py: one task per raw shard says how many samples it
publishes and a digest of their keys; each dataset shard is a few spans of raw shards); each
dataset shard is a task (shard.py) that recomputes its spans' keys, reads its raw tars once,
sequentially, and writes its files atomically; a shard is redone when its spans, the keys they
hold or a file it read have changed. The driver then writes the index files and `emit/dataset.json`,
which the stage's finish completes with the audit's funnel and the stages' provenance; finish
writes the dataset card `dataset/README.md` from it, then `dataset/dataset.json`, last.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from laionface.dataset import contract
from laionface.engine.cluster import gather_map
from laionface.engine.markers import now_iso
from laionface.engine.runfolder import software_versions
from laionface.engine.runner import ShardTask, StageContext
from laionface.engine.stage import Stage
from laionface.io import storage
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
)
from laionface.stages.emit.plan import Plan, count_cut, plan_samples, shard_spans, spans_token
from laionface.stages.emit.shard import sample_sizes, write_dataset_shard

log = logging.getLogger("laionface")


# ---------------------------------------------------------------------------------------------
# Planning


def _kept_no_metadata_row(layout: RunLayout) -> bool:
    """Whether the metadata stage ran and wrote no shard (its summary says 0): then there is
    nothing to download, detect or select, and the dataset is empty."""
    summary = layout.metadata_summary
    return storage.exists(summary) and storage.read_json(summary)["shards"] == 0


def _raw_inputs(layout: RunLayout, raw_shards: list[str]) -> tuple[str, ...]:
    """The files a task reading `raw_shards` depends on (the dedup decisions through the
    digest of the kept keys, in its token)."""
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


def _measured_bytes(ctx: StageContext, plan: Plan) -> list[int]:
    """Every published sample's bytes in a dataset tar, in order (step emit/sizes)."""
    tasks = [
        ShardTask(
            raw,
            dict(
                run_url=ctx.layout.url,
                raw_shard=raw,
                dedup=plan.dedup,
                digest=plan.digests[raw],
                min_score=ctx.config.select.min_score,
            ),
            inputs=_raw_inputs(ctx.layout, [raw]),
            token=plan.digests[raw],
        )
        for raw, count in zip(plan.raws, plan.counts, strict=True)
        if count
    ]
    # A sample's bytes depend on the faces it publishes, not on where the shards are cut.
    settings = {"select.min_score": ctx.config.select.min_score}
    stats = ctx.map_shards("emit/sizes", sample_sizes, tasks, settings=settings, unit="samples")
    return [size for task in tasks for size in stats[task.shard]["bytes"]]


def _tasks(ctx: StageContext, plan: Plan) -> list[ShardTask]:
    """A task per dataset shard of the ORDER_RULE's cut, each with its spans of the plan."""
    layout, section = ctx.layout, ctx.config.emit
    if section.max_shard_bytes:
        cut = contract.cut_shards(
            _measured_bytes(ctx, plan), section.samples_per_shard, section.max_shard_bytes
        )
    else:
        cut = count_cut(plan.total, section.samples_per_shard)
    tasks = []
    for i, spans in enumerate(shard_spans(plan.raws, plan.counts, cut)):
        name = shard_name(i)
        outputs = [storage.join(layout.dataset, contract.parquet_name(name))]
        if section.mode == "copy":
            outputs.append(storage.join(layout.dataset, contract.tar_name(name)))
        outputs.append(layout.emit_members(name))
        kwargs = dict(
            run_url=layout.url,
            spans=[(s.raw, s.start, s.stop) for s in spans],
            digests={s.raw: plan.digests[s.raw] for s in spans},
            dedup=plan.dedup,
            shard=i,
            mode=section.mode,
            min_score=ctx.config.select.min_score,
            dataset_url=layout.dataset,
            members_url=layout.emit_members(name),
        )
        inputs = _raw_inputs(layout, [s.raw for s in spans])
        token = spans_token(spans, plan.digests)
        tasks.append(ShardTask(name, kwargs, inputs=inputs, outputs=tuple(outputs), token=token))
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
    mapper = functools.partial(gather_map, ctx.client)
    plan = plan_samples(
        layout.url, ctx.config.dedup.enabled, mapper, empty_ok=_kept_no_metadata_row(layout)
    )
    if plan.total == 0:
        # An empty result is a result: an empty dataset (no shard, sizes.json {}, an empty
        # manifest) whose dataset.json and card say 0 samples, and that verifies.
        log.warning(
            "emit: no sample passed every stage: the dataset is empty (0 samples); "
            "`laionface stats` shows where the rows went"
        )
    tasks = _tasks(ctx, plan)
    stats = ctx.map_shards("emit", write_dataset_shard, tasks, unit="samples")
    names = [task.shard for task in tasks]
    files = _index_files(ctx, names, stats)
    _remove_stale_files(layout.dataset, set(files))
    storage.write_json(layout.emit_pending, _pending_meta(ctx, names, stats, files))
    log.info(
        "emit: %d samples in %d shards (%s mode) at %s",
        plan.total,
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
