"""Poison isolation: a shard whose worker dies is split in halves until the row that kills it.

One URL can kill the process that downloads it (a decompression bomb past the memory limit, a
crash in a decoder); the runner then reports its shard as killed (`StageFailed.killed`). Such a
shard is downloaded again in pieces (`isolate`, on the driver): its rows in two halves, each a
task of step `download/pieces` (files and markers under `download/pieces/`); a half whose
worker dies again is halved in turn, down to single rows. A single row whose worker dies is
recorded as failed, category `worker_died`, with its URL in the log; every other row is
downloaded.

The raw shard is then made from its pieces (`assemble_shard`, on a worker, through the runner
as any raw shard, with the same inputs, so its marker is the one a plain download would write):
one tar, one parquet with every input row, one stats file, with img2dataset's keys (shard
digits and the row's index in the metadata shard), as if it had been downloaded whole. The
pieces are removed once the raw shard is complete. Complete pieces are kept by their markers
across re-runs, so a run interrupted mid-isolation resumes where it was.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from laionface.engine.runner import ShardTask, StageContext, StageFailed
from laionface.io import storage, tars
from laionface.layout import RunLayout, index_digits, raw_file_names, shard_of_file
from laionface.stages.download.categories import WORKER_DIED_PREFIX
from laionface.stages.download.outcomes import shard_stats
from laionface.stages.download.staging import publish, staging

log = logging.getLogger("laionface")

PIECES_STEP = "download/pieces"
HTTP_429_KEY = "http_429_by_host"
# The part of a worker's death kept in a row's error message.
MAX_CAUSE_CHARS = 300


def piece_name(shard: str, start: int, end: int) -> str:
    """The name of the piece of raw shard `shard` holding its rows [start, end)."""
    return f"{shard}-{start}-{end}"


def note_429s(stats_path: str, http_429_by_host: dict[str, int]) -> None:
    """Keep a piece's 429 counts in its stats file, for the assembled shard's stats."""
    with open(stats_path) as handle:
        stats = json.load(handle)
    stats[HTTP_429_KEY] = http_429_by_host
    with open(stats_path, "w") as handle:
        json.dump(stats, handle, indent=4)


# ---------------------------------------------------------------------------------------------
# On the driver


@dataclass
class _Shard:
    """One killed shard being isolated: its task, URLs, complete pieces and rows that killed."""

    task: ShardTask
    urls: list[str]
    pieces: list[tuple[int, int]] = field(default_factory=list)
    died: dict[int, str] = field(default_factory=dict)


def _cause(error: str) -> str:
    first = error.split("\n", 1)[0]
    return first if len(first) <= MAX_CAUSE_CHARS else first[: MAX_CAUSE_CHARS - 3] + "..."


def _died(shard: _Shard, index: int, error: str) -> None:
    url = shard.urls[index]
    cause = _cause(error)
    shard.died[index] = (
        f"{WORKER_DIED_PREFIX} the worker process died each time it downloaded this row, alone "
        f"({cause}); not downloaded. Likely a decompression bomb or a decoder crash: lower "
        "download.max_image_pixels, or raise cluster.memory_limit"
    )
    log.warning(
        "download shard %s: row %d (%s) killed its worker each time (%s); recorded as "
        "worker_died, the shard's other rows are downloaded",
        shard.task.shard,
        index,
        url,
        cause,
    )


def _piece_task(layout: RunLayout, task: ShardTask, start: int, end: int) -> ShardTask:
    name = piece_name(task.shard, start, end)
    outputs = tuple(storage.join(layout.download_pieces, f) for f in raw_file_names(name))
    kwargs = dict(task.kwargs, raw_url=layout.download_pieces, rows=(start, end))
    return ShardTask(name, kwargs, inputs=task.inputs, outputs=outputs, token=task.token)


def _run_pieces(ctx: StageContext, fn: Callable[..., dict], tasks: list[ShardTask]) -> dict:
    """Run the pieces one at a time; {piece: error} of those whose worker died. A piece failing
    otherwise fails the stage (StageFailed names it); a re-run resumes from the complete pieces.

    One at a time, because a worker's death fails every task the scheduler had handed it, queued
    ones included (Dask counts them all as suspects): a piece running alone dies of its own rows.
    """
    died = {}
    for task in tasks:
        try:
            ctx.map_shards(PIECES_STEP, fn, [task], unit="rows")
        except StageFailed as failed:
            if set(failed.failures) - failed.killed:
                raise
            died.update(failed.failures)
    return died


def isolate(
    ctx: StageContext, killed: list[ShardTask], fn: Callable[..., dict], errors: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Download the killed shards' rows in ever smaller pieces (see the module's docstring);
    returns, per shard, the `isolated` argument that assembles it (`assembly_kwargs`)."""
    shards = {
        task.shard: _Shard(task, storage.read_parquet(task.inputs[0], ["URL"])["URL"].to_pylist())
        for task in killed
    }
    pending = [(shard, 0, len(state.urls), errors[shard]) for shard, state in shards.items()]
    while pending:
        halves: dict[str, tuple[str, int, int]] = {}
        for shard, start, end, error in pending:
            if end - start <= 1:
                if end > start:
                    _died(shards[shard], start, error)
                continue
            middle = (start + end) // 2
            for part in ((start, middle), (middle, end)):
                halves[piece_name(shard, *part)] = (shard, *part)
        tasks = [_piece_task(ctx.layout, shards[s].task, a, b) for s, a, b in halves.values()]
        died = _run_pieces(ctx, fn, tasks) if tasks else {}
        pending = []
        for name, (shard, start, end) in halves.items():
            if name in died:
                pending.append((shard, start, end, died[name]))
            else:
                shards[shard].pieces.append((start, end))
    return {shard: assembly_kwargs(ctx.layout, state) for shard, state in shards.items()}


def assembly_kwargs(layout: RunLayout, shard: _Shard) -> dict[str, Any]:
    return {
        "pieces_url": layout.download_pieces,
        "pieces": sorted(shard.pieces),
        "died": sorted(shard.died.items()),
    }


def assembling(task: ShardTask, isolated: dict[str, Any]) -> ShardTask:
    """The task that makes raw shard `task.shard` from its pieces: the same shard, inputs,
    outputs and token (so the same marker), assembling instead of downloading."""
    return replace(task, kwargs=dict(task.kwargs, isolated=isolated))


def remove_pieces(layout: RunLayout, shards: list[str]) -> None:
    """Remove the pieces of these shards (their files and markers), once the shards are made;
    the pieces' folder too when nothing else is left in it."""
    prefixes = tuple(f"{shard}-" for shard in shards)
    markers = layout.markers(PIECES_STEP)
    for folder in (layout.download_pieces, markers):
        for url in storage.list_files(folder):
            if shard_of_file(url).startswith(prefixes):
                storage.remove(url)
    left = set(storage.list_files(layout.download_pieces)) - {markers}
    if not left and not storage.list_files(markers):
        storage.remove(layout.download_pieces, recursive=True)


# ---------------------------------------------------------------------------------------------
# On a worker: the raw shard from its pieces


def _key(shard: str, index: int, samples: int) -> str:
    return f"{shard}{index:0{index_digits(samples)}d}"


def _moved_key(key: str, offset: int) -> str:
    """A piece's key (its row's index in the piece) as the key of the row in its shard."""
    return f"{int(key) + offset:0{len(key)}d}"


def _copy_tar(source: str, writer: tars.TarWriter, offset: int) -> None:
    """The piece's members into the shard's tar, under the shard's keys (the json's too)."""
    fs, path = storage.fs_for(source)
    with fs.open(path, "rb") as handle:
        for member, data in tars.iter_members(handle, source=source):
            key = _moved_key(member.key, offset)
            if member.ext == "json":
                meta = json.loads(data)
                meta["key"] = key
                data = json.dumps(meta, indent=4).encode()  # as img2dataset writes it
            writer.add(f"{key}.{member.ext}", data or b"")


def _piece_rows(source: str, offset: int) -> pa.Table:
    table = storage.read_parquet(source)
    keys = pa.array([_moved_key(k, offset) for k in table["key"].to_pylist()], pa.string())
    return table.set_column(table.schema.get_field_index("key"), "key", keys)


def _died_rows(table: pa.Table, died: list, name: str, samples: int, extra: list[str]) -> pa.Table:
    """The rows that killed their worker, as img2dataset records a failed download, plus ours."""
    indices = [index for index, _ in died]
    picked = table.take(pa.array(indices, pa.int64()))
    n = len(indices)
    columns = {c: picked[c] for c in extra}
    columns["caption"], columns["url"] = picked["TEXT"], picked["URL"]
    strings = {
        "key": [_key(name, index, samples) for index in indices],
        "status": ["failed_to_download"] * n,
        "error_message": [message for _, message in died],
    }
    columns.update({k: pa.array(v, pa.string()) for k, v in strings.items()})
    for size in ("width", "height", "original_width", "original_height"):
        columns[size] = pa.nulls(n, pa.int32())
    columns["exif"] = columns["sha256"] = pa.nulls(n, pa.string())
    columns["error_category"] = pa.array(["worker_died"] * n, pa.string())
    retry_of = picked["retry_of"] if "retry_of" in picked.column_names else pa.nulls(n)
    columns["retry_of"] = retry_of.cast(pa.string())
    return pa.table(columns)


def _merged_stats(stats: list[dict], died: list) -> tuple[dict, dict[str, int]]:
    """img2dataset's stats of the whole shard from its pieces' (and its 429 counts)."""
    status: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    for piece in stats:
        status.update(piece["status_dict"])
        answers.update(piece.get(HTTP_429_KEY, {}))
    status.update(message for _, message in died)
    start = min((s["start_time"] for s in stats), default=0.0)
    end = max((s["end_time"] for s in stats), default=0.0)
    merged = {
        "count": sum(s["count"] for s in stats) + len(died),
        "successes": sum(s["successes"] for s in stats),
        "failed_to_download": sum(s["failed_to_download"] for s in stats) + len(died),
        "failed_to_resize": sum(s["failed_to_resize"] for s in stats),
        "duration": end - start,
        "start_time": start,
        "end_time": end,
        "status_dict": dict(status),
    }
    return merged, dict(sorted(answers.items()))


def assemble_shard(
    table: pa.Table,
    *,
    name: str,
    raw_url: str,
    samples: int,
    pieces_url: str,
    pieces: list,
    died: list,
    extra: list[str],
) -> dict:
    """Raw shard `name` from its pieces (rows [start, end) each) and the rows that killed their
    worker; `table` is the shard's input. Returns the shard's stats, as a download returns."""
    tar_name, parquet_name, stats_name = raw_file_names(name)
    parts, stats = [], []
    with staging(raw_url, name) as (folder, local):
        with open(os.path.join(folder, tar_name), "wb") as out:
            writer = tars.TarWriter(out)
            for start, end in pieces:
                names = raw_file_names(piece_name(name, start, end))
                files = [storage.join(pieces_url, f) for f in names]
                _copy_tar(files[0], writer, start)
                parts.append(_piece_rows(files[1], start))
                stats.append(storage.read_json(files[2]))
            writer.close()
        failed = _died_rows(table, died, name, samples, extra)
        if parts:
            failed = failed.select(parts[0].schema.names).cast(parts[0].schema)
        result = pa.concat_tables([*parts, failed]).sort_by("key")
        if result.num_rows != table.num_rows:
            raise RuntimeError(
                f"download shard {name}: its pieces and failed rows hold {result.num_rows} of"
                f" {table.num_rows} rows; remove the pieces {name}-* from download/pieces/ (and"
                " their markers) and re-run"
            )
        pq.write_table(result, os.path.join(folder, parquet_name), compression="zstd")
        merged, http_429_by_host = _merged_stats(stats, died)
        with open(os.path.join(folder, stats_name), "w") as handle:
            json.dump(merged, handle, indent=4)
        publish(folder, raw_url, [tar_name, parquet_name, stats_name], local)
    return shard_stats(result, http_429_by_host)
