"""The download stage: img2dataset's own downloader, mapped over metadata shards by the Dask runner.

img2dataset ships multiprocessing, Spark and Ray distributors; this is its Dask one. Each metadata
shard `metadata/shards/NNNNN.parquet` becomes one img2dataset output shard, made by img2dataset's
`Downloader` object exactly as its `download()` makes it (`shard.download_shard`), under the
run's `raw/` folder:

    raw/NNNNN.tar           webdataset: {key}.jpg, {key}.txt, {key}.json per success (img2dataset's)
    raw/NNNNN.parquet       one row per input row, failures included: img2dataset's columns
                            (the `save_additional_columns`, caption, url, key, status,
                            error_message, width, height, original_width, original_height, exif,
                            sha256) plus two of ours:
                              error_category  null for a success, else one of
                                              layout.DOWNLOAD_CATEGORIES (categories.py)
                              retry_of        null, or in a retry shard the key this row retries
                            rows sorted by key (img2dataset writes them in completion order)
    raw/NNNNN_stats.json    img2dataset's stats file, untouched

Keys are img2dataset's: 5 digits of shard id and 4 of row index (`compute_key`, with
`number_sample_per_shard` = layout.samples_per_shard(metadata.rows_per_shard)), so key
000030017 is row 17 of metadata shard 3, and a shard id is its metadata shard's number.

`--retry-failed` adds raw shards for the rows that failed transiently (retries.py); each input row
is counted once, under its latest outcome (outcomes.py).

A shard whose worker process dies (killed for memory, a crash) is downloaded again in ever
smaller pieces down to the row that kills it, recorded as `worker_died`; the raw shard is then
made from the pieces, complete, as if downloaded whole (isolation.py).

Politeness: at most `download.max_per_host` requests to one host at once per worker process,
and answers 429 / 503 that ask to come back later are retried after the delay they ask for
(fetchguard.py, hostgate.py). Each shard counts the 429 answers it met per host; their sum over
the run's shards is run.json's `stages.download.http_429_by_host`.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter

from laionface.engine.cluster import gather_map
from laionface.engine.runner import ShardTask, StageContext, StageFailed
from laionface.engine.stage import Stage
from laionface.io import storage
from laionface.layout import DOWNLOAD, METADATA, RAW, samples_per_shard, shard_of_file
from laionface.stages.download import isolation
from laionface.stages.download.outcomes import add_summaries, origin_plan, origin_summary
from laionface.stages.download.retries import drop_stale_retries, plan_retries, retry_inputs
from laionface.stages.download.shard import download_shard

log = logging.getLogger("laionface")

# Warnings about shards above download.failure_rate_warning, at most this many.
MAX_WARNED_SHARDS = 10


def _warn_failure_rates(stats: dict[str, dict], threshold: float) -> None:
    high = {
        shard: s["failed"] / s["items"]
        for shard, s in sorted(stats.items())
        if s.get("items") and s.get("failed", 0) / s["items"] > threshold
    }
    for shard, rate in list(high.items())[:MAX_WARNED_SHARDS]:
        category, count = Counter(stats[shard]["by_category"]).most_common(1)[0]
        log.warning(
            "download shard %s: %.0f%% of rows failed (most: %s, %d); above "
            "download.failure_rate_warning %.0f%%",
            shard,
            100 * rate,
            category,
            count,
            100 * threshold,
        )
    if len(high) > MAX_WARNED_SHARDS:
        log.warning(
            "... and %d more shards above the failure rate warning", len(high) - MAX_WARNED_SHARDS
        )


def _tasks(ctx: StageContext, urls: list[str]) -> list[ShardTask]:
    settings = ctx.config.download.model_dump()
    samples = samples_per_shard(ctx.config.metadata.rows_per_shard)
    layout = ctx.layout
    tasks = []
    for url in urls:
        shard = shard_of_file(url)
        kwargs = dict(
            in_url=url,
            raw_url=layout.raw,
            shard_id=int(shard),
            settings=settings,
            samples_per_shard=samples,
        )
        outputs = (layout.raw_tar(shard), layout.raw_parquet(shard), layout.raw_stats(shard))
        tasks.append(ShardTask(shard, kwargs, inputs=(url,), outputs=outputs))
    return tasks


def _map(ctx: StageContext, step: str, tasks: list[ShardTask]) -> dict[str, dict]:
    """The shards of a download step; those whose worker died are isolated (isolation.py) and
    made from their pieces. Returns the stats of every complete shard of the step."""
    try:
        return ctx.map_shards(step, download_shard, tasks, unit="rows")
    except StageFailed as failed:
        if not failed.killed:
            raise
        killed = [task for task in tasks if task.shard in failed.killed]
        log.warning(
            "%s: the worker died downloading shard(s) %s; downloading them again in pieces to"
            " find the row(s) that kill it",
            step,
            ", ".join(task.shard for task in killed),
        )
        isolated = isolation.isolate(ctx, killed, download_shard, failed.failures)
    # Every shard again: the complete ones are skipped, the isolated ones assembled, and any
    # other failure gets one more try before it is raised.
    tasks = [
        isolation.assembling(task, isolated[task.shard]) if task.shard in isolated else task
        for task in tasks
    ]
    stats = ctx.map_shards(step, download_shard, tasks, unit="rows")
    isolation.remove_pieces(ctx.layout, sorted(isolated))
    return stats


def _summary(ctx: StageContext, settings_fp: str) -> dict:
    """The run's download outcomes summed over per-metadata-shard tasks on the cluster (each
    input row once, under its latest attempt): the driver holds counts, not rows."""
    samples = samples_per_shard(ctx.config.metadata.rows_per_shard)
    mapper = functools.partial(gather_map, ctx.client)
    plan = origin_plan(ctx.layout.url, samples, mapper, settings_fp)
    tasks = [dict(run_url=ctx.layout.url, shard=s, sources=r) for s, r in plan.items()]
    return add_summaries(mapper(origin_summary, tasks))


def _http_429s(stats: dict[str, dict]) -> dict[str, int]:
    """429 answers per host over these shards (shards made before the count existed: none)."""
    total: Counter[str] = Counter()
    for shard in stats.values():
        total.update(shard.get("http_429_by_host") or {})
    return dict(sorted(total.items()))


def run(ctx: StageContext) -> None:
    config, layout = ctx.config, ctx.layout
    settings_fp = ctx.stage.fingerprint(config) if ctx.stage else ""
    inputs = storage.list_files(layout.metadata_shards, ".parquet")
    # A metadata summary of 0 shards: the metadata stage ran and kept no row. That empty result
    # goes through every stage (no shard to download); no summary: it has not run.
    made = layout.metadata_summary
    if not inputs and not (storage.exists(made) and storage.read_json(made)["shards"] == 0):
        raise FileNotFoundError(
            f"{layout.metadata_shards}: no metadata shards to download; run the metadata"
            " stage first (laionface run PIPELINE --stages metadata,download)"
        )
    drop_stale_retries(layout, settings_fp)
    stats = _map(ctx, "download", _tasks(ctx, inputs))
    if ctx.options.get("retry_failed"):
        plan_retries(layout, settings_fp, samples_per_shard(config.metadata.rows_per_shard))
    retries = retry_inputs(layout)
    if retries:
        stats.update(_map(ctx, "download/retry", _tasks(ctx, retries)))
    _warn_failure_rates(stats, config.download.failure_rate_warning)
    summary = _summary(ctx, settings_fp)
    record = ctx.run.stage("download")
    record["outcomes"] = summary
    record["http_429_by_host"] = _http_429s(stats)
    ctx.run.save()
    log.info(
        "download: %d rows, %d images (%.1f%%), failures by category: %s",
        summary["rows"],
        summary["successes"],
        100 * summary["successes"] / max(summary["rows"], 1),
        summary["by_category"] or "none",
    )


STAGE = Stage(
    name="download",
    reads=(METADATA,),
    writes=(RAW, DOWNLOAD),
    # rows_per_shard sets the digits of img2dataset's keys.
    settings=("download", "metadata.rows_per_shard"),
    ignored=frozenset(
        {
            "download.thread_count",
            "download.max_per_host",
            "download.resolve",
            "download.failure_rate_warning",
            "download.shard_deadline",
        }
    ),
    worker_imports=("img2dataset.downloader",),
    run=run,
)
