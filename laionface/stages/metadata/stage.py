"""The metadata stage: LAION-format parquet in, download shards out.

Inputs and their columns: inputs.py. The filters and the reason each dropped row is counted
under: filters.py. Steps, each a `ctx.map_shards` step (resumable shard by shard; steps.py), then
a few driver-side files:

0. `metadata/lists` (when id_list or exclude_list is set): each list read once, on the driver
   (its errors reach the user as they are), and saved as sorted arrays under metadata/lists/,
   which the parts tasks load once per process.
1. `metadata/parts`: one task per input file slice of whole row groups (about TASK_ROWS rows;
   a row group is never split), part id `FFFFF-GGGGG` (input file index, first row group).
   Stats: items (= input_rows), source, file_index, row_groups [first, stop), input_rows,
   kept_rows (before duplicate_url), dropped {reason: count}.
2. `metadata/dupes` (dedup_urls): one task per hash bucket (the top bits of h1; 2^k buckets of
   about DEDUP_BUCKET_ROWS input rows at most, so memory stays bounded at any scale).
   Stats: items (rows in the bucket), duplicates, per_part {part id: count}.
3. `metadata/shards`: deduplicated kept rows, in (input file, row) order, cut into shards of
   exactly rows_per_shard rows (the last one shorter): metadata/shards/NNNNN.parquet
   (DOWNLOAD_SHARD). A task writes consecutive shards (SHARD_TASK_ROWS rows at most, and at
   least MIN_SHARD_TASKS tasks). Stats: items (rows written), shards.
4. `metadata/ids`: the SAMPLE_IDs that several kept rows share (LAION's SAMPLE_ID is not a
   unique key), one task per hash bucket of at most IDS_PER_BUCKET IDs; counted in the summary
   (`shared_sample_ids`: ids, rows, examples) and warned about. Every row keeps its own key.
5. The driver writes metadata/drops/duplicate_url.parquet (DROP_COUNTS per input file),
   metadata/inputs.parquet (METADATA_INPUTS: per input file, input_rows = kept_rows +
   dropped_rows, checked before it is written) and metadata/summary.json (input_files,
   input_rows, kept_rows, dropped {reason: count}, shards, rows_per_shard, reasons,
   shared_sample_ids), and removes
   files that an earlier plan left behind (shards past the new count, parts of inputs no longer
   listed). The audit sums metadata/drops/*.parquet by (source, reason).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from laionface.engine.markers import digest
from laionface.engine.runner import ShardTask, StageContext
from laionface.engine.stage import Stage
from laionface.io import schemas, storage
from laionface.layout import METADATA, METADATA_REASONS, shard_name, shard_of_file
from laionface.stages.metadata import idlists, steps
from laionface.stages.metadata.idlists import IdListError
from laionface.stages.metadata.inputs import (
    InputFile,
    MetadataError,
    column_map,
    inspect_inputs,
    resolve_inputs,
)

log = logging.getLogger("laionface")

NAME = "metadata"
# Rows a parts task reads (whole row groups: one larger row group is one task on its own).
TASK_ROWS = 1_000_000
# Input rows per dedup bucket at most (kept rows are fewer): ~40 bytes each in a dedup task.
DEDUP_BUCKET_ROWS = 8_000_000
# Rows of consecutive shards written by one shards task at most, and the fewest such tasks.
SHARD_TASK_ROWS = 200_000
MIN_SHARD_TASKS = 8
# SAMPLE_IDs one task of the shared-ID count reads at most (8 bytes each).
IDS_PER_BUCKET = 50_000_000
# Part of the parts step's settings: a run folder written by an older layout of metadata/
# redoes its parts instead of reading them.
OUTPUT_VERSION = 2
LISTS = ("id_list", "exclude_list")


@dataclass(frozen=True)
class PartPlan:
    id: str
    index: int
    file_index: int
    source: str
    row_groups: tuple[int, int]
    rows: tuple[int, int]


def plan_parts(files: list[InputFile], task_rows: int) -> list[PartPlan]:
    """Slices of whole row groups of about task_rows rows; every file has at least one."""
    plans: list[PartPlan] = []
    for file_index, info in enumerate(files):
        start = 0
        first_row = row = 0
        for group, rows in enumerate(info.row_group_rows):
            if group > start and row - first_row + rows > task_rows:
                plans.append(
                    _part(len(plans), file_index, info.url, (start, group), (first_row, row))
                )
                start, first_row = group, row
            row += rows
        groups = (start, len(info.row_group_rows))
        plans.append(_part(len(plans), file_index, info.url, groups, (first_row, row)))
    return plans


def _part(index: int, file_index: int, source: str, groups: tuple, rows: tuple) -> PartPlan:
    return PartPlan(
        id=f"{shard_name(file_index)}-{shard_name(groups[0])}",
        index=index,
        file_index=file_index,
        source=source,
        row_groups=groups,
        rows=rows,
    )


def _remove_except(folder: str, keep: set[str]) -> None:
    for url in storage.list_files(folder, ".parquet"):
        if shard_of_file(url) not in keep:
            storage.remove(url)


# ---------------------------------------------------------------------------------------------
# The steps, as the driver plans them


def _prepare_lists(ctx: StageContext) -> dict[str, dict | None]:
    """Save the ID lists that are set (step metadata/lists); {name: {"base": URL} or None}."""
    section, layout = ctx.config.metadata, ctx.layout
    columns = section.columns
    lists: dict[str, dict | None] = {}
    tasks = []
    for name in LISTS:
        source, base = getattr(section, name), layout.metadata_list(name)
        lists[name] = None
        if not source:
            for url in idlists.saved_files(base):
                storage.remove(url)
            continue
        if not storage.exists(source):
            raise IdListError(f"{source}: metadata.{name} not found")
        kwargs = dict(
            source=source, base_url=base, id_column=columns.sample_id, url_column=columns.url
        )
        tasks.append(ShardTask(name, kwargs, inputs=(source,), outputs=idlists.saved_files(base)))
        lists[name] = {"base": base}
    if tasks:
        settings = {"id_column": columns.sample_id, "url_column": columns.url}
        # Here, not on a worker: a list in an unknown layout is one clear error, not a retry.
        stats = ctx.map_shards(
            "metadata/lists", steps.save_list, tasks, settings=settings, unit="entries", local=True
        )
        for task in tasks:
            _check_list(task.shard, task.kwargs["source"], stats[task.shard], columns.sample_id)
    return lists


def _check_list(name: str, source: str, stats: dict, id_column: str) -> None:
    if stats["ids"] and not id_column:
        raise MetadataError(
            f"{source}: metadata.{name} holds SAMPLE_IDs but metadata.columns.sample_id is empty"
        )
    log.info(
        "metadata.%s: %s SAMPLE_IDs and %s URLs from %s",
        name,
        f"{stats['ids']:,}",
        f"{stats['urls']:,}",
        source,
    )


def _run_parts(
    ctx: StageContext, parts: list[PartPlan], lists: dict, hash_bits: int
) -> dict[str, dict]:
    section, layout = ctx.config.metadata, ctx.layout
    list_files = [u for ref in lists.values() if ref for u in idlists.saved_files(ref["base"])]
    ids = {p.id for p in parts}
    _remove_except(layout.metadata_folder("kept"), ids)
    _remove_except(
        layout.metadata_folder("drops"), ids | ({"duplicate_url"} if section.dedup_urls else set())
    )
    _remove_except(layout.metadata_folder("urlhash"), ids if section.dedup_urls else set())
    tasks = []
    for p in parts:
        kept, drops = layout.metadata_part("kept", p.id), layout.metadata_part("drops", p.id)
        hashes = layout.metadata_part("urlhash", p.id)
        kwargs = dict(
            source=p.source,
            file_index=p.file_index,
            row_groups=list(p.row_groups),
            rows=list(p.rows),
            section=section,
            lists=lists,
            kept_url=kept,
            drops_url=drops,
            hash_url=hashes,
            hash_bits=hash_bits,
        )
        outputs = (kept, drops, hashes) if section.dedup_urls else (kept, drops)
        tasks.append(ShardTask(p.id, kwargs, inputs=(p.source, *list_files), outputs=outputs))
    settings = {
        "metadata": section.model_dump(exclude={"rows_per_shard"}),
        "task_rows": TASK_ROWS,
        "hash_bits": hash_bits,
        "format": OUTPUT_VERSION,
    }
    return ctx.map_shards(
        "metadata/parts", steps.filter_part, tasks, settings=settings, unit="rows"
    )


def _run_dupes(ctx: StageContext, parts: list[PartPlan], hash_bits: int) -> tuple[list, list]:
    """Duplicate URLs per part (step metadata/dupes): (count per part, the dupes files)."""
    layout = ctx.layout
    duplicates = [0] * len(parts)
    if not ctx.config.metadata.dedup_urls:
        _remove_except(layout.metadata_folder("dupes"), set())
        return duplicates, []
    buckets = 1 << hash_bits
    names = [shard_name(b) for b in range(buckets)]
    _remove_except(layout.metadata_folder("dupes"), set(names))
    hash_urls = [layout.metadata_part("urlhash", p.id) for p in parts]
    dupes_urls = [layout.metadata_dupes(name) for name in names]
    tasks = [
        ShardTask(
            name,
            dict(
                hash_urls=hash_urls,
                bucket=b,
                buckets=buckets,
                part_ids=[p.id for p in parts],
                dupes_url=dupes_urls[b],
            ),
            inputs=tuple(hash_urls),
            outputs=(dupes_urls[b],),
        )
        for b, name in enumerate(names)
    ]
    stats = ctx.map_shards(
        "metadata/dupes", steps.dedup_bucket, tasks, settings={"buckets": buckets}, unit="rows"
    )
    position = {p.id: p.index for p in parts}
    for bucket in stats.values():
        for part_id, count in bucket["per_part"].items():
            duplicates[position[part_id]] += int(count)
    return duplicates, dupes_urls


def _shard_tasks(
    ctx: StageContext, parts: list[PartPlan], final_rows: list[int], dupes_urls: list[str]
) -> tuple[list[ShardTask], int]:
    rows_per_shard = ctx.config.metadata.rows_per_shard
    layout = ctx.layout
    total = sum(final_rows)
    n_shards = math.ceil(total / rows_per_shard)
    offsets = np.concatenate([[0], np.cumsum(final_rows)]).tolist()
    # At least MIN_SHARD_TASKS tasks so the workers share the reading; never more rows than
    # SHARD_TASK_ROWS in one. Counted from the shards alone, so a re-run plans the same tasks.
    per_task = max(1, min(SHARD_TASK_ROWS // rows_per_shard, math.ceil(n_shards / MIN_SHARD_TASKS)))
    tasks = []
    for first in range(0, n_shards, per_task):
        last = min(first + per_task, n_shards)
        begin, end = first * rows_per_shard, min(last * rows_per_shard, total)
        segments = [
            {
                "part": p.index,
                "kept_url": layout.metadata_part("kept", p.id),
                "source": p.source,
                "start": max(begin, offsets[p.index]) - offsets[p.index],
                "stop": min(end, offsets[p.index + 1]) - offsets[p.index],
            }
            for p in parts
            if offsets[p.index] < end and offsets[p.index + 1] > begin
        ]
        sizes = [min(rows_per_shard, total - n * rows_per_shard) for n in range(first, last)]
        shard_urls = [layout.metadata_shard(shard_name(n)) for n in range(first, last)]
        kwargs = dict(
            segments=segments,
            dupes_urls=dupes_urls,
            columns=column_map(ctx.config.metadata.columns),
            shard_sizes=sizes,
            shard_urls=shard_urls,
        )
        reads = {s["source"] for s in segments} | {s["kept_url"] for s in segments}
        tasks.append(
            ShardTask(
                f"{shard_name(first)}-{shard_name(last - 1)}",
                kwargs,
                inputs=(*sorted(reads), *dupes_urls),
                outputs=tuple(shard_urls),
                token=digest([segments, sizes]),
            )
        )
    return tasks, n_shards


def run(ctx: StageContext) -> None:
    section = ctx.config.metadata
    files = inspect_inputs(resolve_inputs(section.input), section.columns)
    lists = _prepare_lists(ctx)
    parts = plan_parts(files, TASK_ROWS)
    total_input = sum(f.num_rows for f in files)
    hash_bits = max(0, math.ceil(math.log2(max(1, total_input) / DEDUP_BUCKET_ROWS)))
    part_stats = _run_parts(ctx, parts, lists, hash_bits)
    kept = [int(part_stats[p.id]["kept_rows"]) for p in parts]
    duplicates, dupes_urls = _run_dupes(ctx, parts, hash_bits)
    final_rows = [k - d for k, d in zip(kept, duplicates, strict=True)]
    tasks, n_shards = _shard_tasks(ctx, parts, final_rows, dupes_urls)
    settings = {"rows_per_shard": section.rows_per_shard, "columns": column_map(section.columns)}
    ctx.map_shards("metadata/shards", steps.write_shards, tasks, settings=settings, unit="rows")
    _remove_except(ctx.layout.metadata_shards, {shard_name(n) for n in range(n_shards)})
    per_file = _per_file_counts(files, parts, part_stats, duplicates, final_rows)
    shared = _count_shared_ids(ctx, n_shards, sum(final_rows))
    _write_summary(ctx, per_file, n_shards, shared)


def _count_shared_ids(ctx: StageContext, n_shards: int, rows: int) -> dict:
    """SAMPLE_IDs that several kept rows share (step metadata/ids): {ids, rows, examples}."""
    if not ctx.config.metadata.columns.sample_id or not n_shards:
        return {"ids": 0, "rows": 0, "examples": []}
    urls = [ctx.layout.metadata_shard(shard_name(n)) for n in range(n_shards)]
    buckets = max(1, math.ceil(rows / IDS_PER_BUCKET))
    tasks = [
        ShardTask(
            shard_name(b),
            dict(shard_urls=urls, bucket=b, buckets=buckets),
            inputs=tuple(urls),
        )
        for b in range(buckets)
    ]
    stats = ctx.map_shards(
        "metadata/ids", steps.count_shared_ids, tasks, settings={"buckets": buckets}, unit="ids"
    )
    shared = {
        "ids": sum(s["shared_ids"] for s in stats.values()),
        "rows": sum(s["rows"] for s in stats.values()),
        "examples": sorted(e for s in stats.values() for e in s["examples"])[:5],
    }
    if shared["ids"]:
        log.warning(
            "metadata: %s SAMPLE_IDs are shared by %s kept rows (e.g. %s): each row keeps its "
            "own key, and exports keep every image",
            f"{shared['ids']:,}",
            f"{shared['rows']:,}",
            ", ".join(map(str, shared["examples"])),
        )
    return shared


# ---------------------------------------------------------------------------------------------
# The summary


def _per_file_counts(files, parts, part_stats, duplicates, final_rows) -> list[dict[str, Any]]:
    """Per input file: rows read, kept and dropped per reason, checked to add up."""
    per_file: list[dict[str, Any]] = [
        {"source": f.url, "input_rows": 0, "kept_rows": 0, "dropped": {}} for f in files
    ]
    for part in parts:
        stats = part_stats[part.id]
        entry = per_file[part.file_index]
        entry["input_rows"] += int(stats["input_rows"])
        entry["kept_rows"] += final_rows[part.index]
        for reason, count in stats["dropped"].items():
            entry["dropped"][reason] = entry["dropped"].get(reason, 0) + int(count)
        if duplicates[part.index]:
            entry["dropped"]["duplicate_url"] = (
                entry["dropped"].get("duplicate_url", 0) + duplicates[part.index]
            )
    for info, entry in zip(files, per_file, strict=True):
        dropped = sum(entry["dropped"].values())
        if entry["input_rows"] != info.num_rows or entry["kept_rows"] + dropped != info.num_rows:
            raise RuntimeError(
                f"{info.url}: {info.num_rows} rows in the file, {entry['input_rows']} read, "
                f"{entry['kept_rows']} kept + {dropped} dropped: the metadata stage lost rows"
            )
    return per_file


def _write_count_tables(ctx: StageContext, per_file: list[dict[str, Any]]) -> None:
    """metadata/drops/duplicate_url.parquet and metadata/inputs.parquet."""
    if ctx.config.metadata.dedup_urls:
        rows = [
            {
                "stage": NAME,
                "source": e["source"],
                "reason": "duplicate_url",
                "count": e["dropped"]["duplicate_url"],
            }
            for e in per_file
            if e["dropped"].get("duplicate_url")
        ]
        storage.write_parquet(
            pa.Table.from_pylist(rows, schema=schemas.DROP_COUNTS),
            ctx.layout.metadata_duplicate_drops,
        )
    inputs = [
        {
            "source": e["source"],
            "input_rows": e["input_rows"],
            "kept_rows": e["kept_rows"],
            "dropped_rows": sum(e["dropped"].values()),
        }
        for e in per_file
    ]
    storage.write_parquet(
        pa.Table.from_pylist(inputs, schema=schemas.METADATA_INPUTS), ctx.layout.metadata_inputs
    )


def _write_summary(
    ctx: StageContext, per_file: list[dict[str, Any]], n_shards: int, shared: dict
) -> None:
    _write_count_tables(ctx, per_file)
    dropped = {
        reason: sum(e["dropped"].get(reason, 0) for e in per_file) for reason in METADATA_REASONS
    }
    dropped = {k: v for k, v in dropped.items() if v}
    summary = {
        "input_files": len(per_file),
        "input_rows": sum(e["input_rows"] for e in per_file),
        "kept_rows": sum(e["kept_rows"] for e in per_file),
        "dropped": dropped,
        "shards": n_shards,
        "rows_per_shard": ctx.config.metadata.rows_per_shard,
        "reasons": list(METADATA_REASONS),
        "shared_sample_ids": shared,
    }
    storage.write_json(ctx.layout.metadata_summary, summary)
    ctx.run.stage(NAME).update(
        input_rows=summary["input_rows"],
        kept_rows=summary["kept_rows"],
        shards=n_shards,
        shared_sample_ids=shared,
    )
    ctx.run.save()
    log.info(
        "metadata: %s rows in %d file(s) -> %s kept in %d shard(s); dropped: %s",
        f"{summary['input_rows']:,}",
        len(per_file),
        f"{summary['kept_rows']:,}",
        n_shards,
        ", ".join(f"{k} {v:,}" for k, v in dropped.items()) or "none",
    )
    if summary["input_rows"] and not summary["kept_rows"]:
        log.warning("metadata: no row passed the filters (the counts per reason are above)")


STAGE = Stage(
    name=NAME,
    reads=(),
    writes=(METADATA,),
    settings=("metadata",),
    run=run,
)
