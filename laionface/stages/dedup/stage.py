"""The dedup stage: exact and near duplicates, and overlap with evaluation sets.

Input: for each shard, `faces/NNNNN.parquet` (pHash, sha256, size, detections) and
`select/NNNNN.parquet`; only the samples select kept enter dedup. Output:

    dedup/decisions.parquet   schemas.DEDUP, one row per sample that passed select, ordered by key
    dedup/drops.parquet       schemas.DROP_COUNTS: dropped samples per select shard and reason

The rules are decide.py's. Steps, each resumable like any shard step:
1. `dedup/samples`: per select shard, the samples that enter dedup (samples.py);
2. `dedup/reference`: reference hashes, one task per job (reference.py), when dedup.reference
   names any;
3. with the dask backend, `dedup/bands` and `dedup/pairs`: the search on the workers (search.py);
4. `dedup/decisions`: one task that reads every sample (and the pairs, or searches them itself
   with the memory backend) and writes the decisions. It runs on a worker, so the driver never
   holds the samples. `backend = "auto"` searches in that task up to MEMORY_BACKEND_MAX_HASHES
   distinct hashes, on the workers above.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laionface.config import DedupSection
from laionface.engine.runner import ShardTask, StageContext
from laionface.engine.stage import Stage
from laionface.io import keyed, storage
from laionface.io.schemas import DEDUP_SAMPLES, DROP_COUNTS
from laionface.layout import DEDUP, DEDUP_REASONS, FACES, SELECT, shard_name, shard_of_file
from laionface.stages.dedup import hashindex
from laionface.stages.dedup.decide import decide
from laionface.stages.dedup.reference import (
    DEFAULT_MAX_PIXELS,
    combine_reference,
    hash_reference,
    job_files,
    reference_jobs,
)
from laionface.stages.dedup.samples import prepare_shard, u64
from laionface.stages.dedup.search import no_pairs, read_pairs, search_dask, search_memory

log = logging.getLogger("laionface")

# The decisions task holds every sample, and with the memory backend the search's tables too:
# about 300 bytes a hash in all (3.06 GB at 10M hashes, docs/benchmarks.md "Dedup stage"; 345
# MB for a worker with 481k samples in bench_scale.py). Above this many the search runs on the
# workers, so that the task stays under 4 GB by itself.
MEMORY_BACKEND_MAX_HASHES = 10_000_000
READ_THREADS = 8


# ---------------------------------------------------------------------------------------------
# The decisions task (on a worker)


def _load_samples(urls: list[str]) -> pa.Table:
    """Every shard's samples, sorted by key, with the index of their shard in `urls`."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        tables = list(pool.map(storage.read_parquet, urls))
    tables = [
        t.cast(DEDUP_SAMPLES).append_column("shard", pa.array(np.full(t.num_rows, i, np.int32)))
        for i, t in enumerate(tables)
    ]
    if not tables:
        return DEDUP_SAMPLES.empty_table().append_column("shard", pa.array([], pa.int32()))
    table = pa.concat_tables(tables).sort_by("key")
    keys = table["key"].combine_chunks()
    if len(keys) > 1:
        same = pc.equal(keys.slice(1), keys.slice(0, len(keys) - 1))
        if pc.any(same).as_py():
            row = pc.index(same, True).as_py()
            shards = table["shard"].to_numpy()[row : row + 2]
            raise ValueError(
                f"dedup: key {keys[row].as_py()!r} appears in {urls[shards[0]]} and "
                f"{urls[shards[1]]}; keys must be unique across shards"
            )
    return table


def _drop_counts(shard_ids: list[str], shard: np.ndarray, reason: pa.Array) -> pa.Table:
    codes = {name: i for i, name in enumerate(DEDUP_REASONS)}
    n = len(DEDUP_REASONS)
    dropped = np.flatnonzero(pc.is_valid(reason).to_numpy(zero_copy_only=False))
    names = reason.take(pa.array(dropped)).to_pylist()
    code = np.array([codes[x] for x in names], dtype=np.int64)
    found, counts = np.unique(shard[dropped].astype(np.int64) * n + code, return_counts=True)
    rows = [
        {
            "stage": "dedup",
            "source": shard_ids[int(c) // n],
            "reason": DEDUP_REASONS[int(c) % n],
            "count": int(count),
        }
        for c, count in zip(found, counts, strict=True)
    ]
    return pa.Table.from_pylist(rows, schema=DROP_COUNTS)


def decide_all(
    *,
    sample_urls: list[str],
    shard_ids: list[str],
    reference_urls: list[str],
    pair_urls: list[str],
    search: str,
    settings: dict,
    decisions_url: str,
    drops_url: str,
) -> dict:
    """The decisions of every sample. search: "memory" (search here), "dask" (read the pairs
    `pair_urls` hold) or "none"."""
    cfg = DedupSection.model_validate(settings)
    samples = _load_samples(sample_urls)
    reference = combine_reference([storage.read_parquet(url) for url in reference_urls])
    ref_values, _ = u64(reference["phash"])
    if search == "memory":
        phash, has_phash = u64(samples["phash"])
        values = hashindex.distinct(np.concatenate([phash[has_phash], ref_values]))
        pairs = search_memory(values, cfg.max_distance)
    else:
        pairs = read_pairs(pair_urls) if search == "dask" else no_pairs()
    decisions = decide(samples.drop_columns(["shard"]), reference, pairs, cfg)
    # Row groups small enough that a per-shard reader (the audit) reads one or two of them.
    storage.write_parquet(decisions, decisions_url, row_group_size=keyed.ROW_GROUP_ROWS)
    reason = decisions["reason"].combine_chunks()
    storage.write_parquet(_drop_counts(shard_ids, samples["shard"].to_numpy(), reason), drops_url)
    counts = {"samples": decisions.num_rows, "kept": int(pc.sum(decisions["kept"]).as_py() or 0)}
    for name in DEDUP_REASONS:
        counts[name] = int(pc.sum(pc.equal(reason, name)).as_py() or 0)
    counts.update(hash_pairs=int(pairs[0].size), reference_hashes=int(len(ref_values)))
    counts["backend"] = search
    return {"items": decisions.num_rows, "counts": counts}


# ---------------------------------------------------------------------------------------------
# The driver


def _select_shards(ctx: StageContext) -> list[str]:
    """The select shards, each checked to have its faces shard."""
    selected = [shard_of_file(u) for u in storage.list_files(ctx.layout.select_folder, ".parquet")]
    faces = {shard_of_file(u) for u in storage.list_files(ctx.layout.faces_folder, ".parquet")}
    missing = [sid for sid in selected if sid not in faces]
    if missing:
        raise FileNotFoundError(
            f"dedup: {ctx.layout.faces(missing[0])} is missing for "
            f"{ctx.layout.select(missing[0])} ({len(missing)} shard(s) in all); "
            "run the faces stage first"
        )
    return selected


def _remove_except(folder: str, keep: set[str]) -> None:
    for url in storage.list_files(folder, ".parquet"):
        if shard_of_file(url) not in keep:
            storage.remove(url)


def _prepare_samples(ctx: StageContext, shard_ids: list[str]) -> dict[str, dict]:
    layout = ctx.layout
    _remove_except(layout.dedup_folder("samples"), set(shard_ids))
    tasks = []
    for sid in shard_ids:
        kwargs = dict(
            faces_url=layout.faces(sid),
            select_url=layout.select(sid),
            out_url=layout.dedup_samples(sid),
        )
        inputs = (kwargs["faces_url"], kwargs["select_url"])
        tasks.append(ShardTask(sid, kwargs, inputs=inputs, outputs=(kwargs["out_url"],)))
    return ctx.map_shards("dedup/samples", prepare_shard, tasks, settings={}, unit="samples")


def _hash_reference(ctx: StageContext) -> dict[str, tuple[str, int]]:
    """{name: (hash file, hashes)} of the reference jobs: images and tars hashed on the workers
    (step dedup/reference), hash tables read here, so that a malformed one is one clear error
    (step dedup/reference-tables)."""
    layout = ctx.layout
    jobs = reference_jobs(ctx.config.dedup.reference) if ctx.config.dedup.reference else []
    names = [f"ref-{shard_name(i)}" for i in range(len(jobs))]
    _remove_except(layout.dedup_folder("reference"), set(names))
    tasks = [
        ShardTask(
            name,
            dict(job=job, out_url=layout.dedup_reference(name), max_pixels=DEFAULT_MAX_PIXELS),
            inputs=tuple(job_files(job)),
            outputs=(layout.dedup_reference(name),),
        )
        for name, job in zip(names, jobs, strict=True)
    ]
    images = [t for t in tasks if t.kwargs["job"]["table"] is None]
    tables = [t for t in tasks if t.kwargs["job"]["table"] is not None]
    stats: dict[str, dict] = {}
    settings = {"phash": 1}
    if images:
        stats.update(
            ctx.map_shards(
                "dedup/reference", hash_reference, images, settings=settings, unit="images"
            )
        )
        _warn_unreadable(stats)
    if tables:
        stats.update(
            ctx.map_shards(
                "dedup/reference-tables", hash_reference, tables, settings=settings, local=True
            )
        )
    return {t.shard: (t.kwargs["out_url"], int(stats[t.shard]["items"])) for t in tasks}


def _warn_unreadable(stats: dict[str, dict]) -> None:
    unreadable = sum(int(s.get("unreadable", 0)) for s in stats.values())
    if unreadable:
        examples = [e for s in stats.values() for e in s.get("examples", [])][:5]
        log.warning(
            "dedup: %d reference image(s) could not be hashed, e.g.:\n  %s",
            unreadable,
            "\n  ".join(examples),
        )


def _search(ctx: StageContext, hash_files: dict[str, str], estimate: int, searching: bool):
    """(search mode for the decisions task, pair files the dask search wrote)."""
    cfg = ctx.config.dedup
    if not searching:
        return "none", []
    backend = cfg.backend
    if backend == "auto":
        backend = "memory" if estimate <= MEMORY_BACKEND_MAX_HASHES else "dask"
    if backend == "memory":
        return "memory", []
    return "dask", search_dask(ctx, hash_files, estimate, cfg.max_distance)


def run(ctx: StageContext) -> None:
    cfg, layout = ctx.config.dedup, ctx.layout
    shard_ids = _select_shards(ctx)
    sample_stats = _prepare_samples(ctx, shard_ids)
    reference = _hash_reference(ctx)
    sample_urls = [layout.dedup_samples(sid) for sid in shard_ids]
    hash_files = dict(zip(shard_ids, sample_urls, strict=True))
    hash_files.update({name: url for name, (url, _) in reference.items()})
    estimate = sum(int(sample_stats[sid]["hashes"]) for sid in shard_ids)
    estimate += sum(n for _, n in reference.values())
    searching = cfg.max_distance > 0 and (cfg.near or bool(reference))
    search, pair_urls = _search(ctx, hash_files, estimate, searching)
    reference_urls = [url for url, _ in reference.values()]
    kwargs = dict(
        sample_urls=sample_urls,
        shard_ids=shard_ids,
        reference_urls=reference_urls,
        pair_urls=pair_urls,
        search=search,
        settings=cfg.model_dump(),
        decisions_url=layout.dedup_decisions,
        drops_url=layout.dedup_drops,
    )
    task = ShardTask(
        "decisions",
        kwargs,
        inputs=(*sample_urls, *reference_urls, *pair_urls),
        outputs=(layout.dedup_decisions, layout.dedup_drops),
    )
    stats = ctx.map_shards("dedup/decisions", decide_all, [task], unit="samples")
    counts = stats["decisions"]["counts"]
    ctx.run.stage("dedup")["counts"] = counts
    ctx.run.save()
    log.info(
        "dedup: %d samples, %d kept, %d exact duplicates, %d near duplicates, %d eval overlaps",
        counts["samples"],
        counts["kept"],
        counts["exact_duplicate"],
        counts["near_duplicate"],
        counts["eval_overlap"],
    )


STAGE = Stage(
    name="dedup",
    reads=(FACES, SELECT),
    writes=(DEDUP,),
    settings=("dedup",),
    # Where the search runs, never what it finds (it is exact).
    ignored=frozenset({"dedup.backend"}),
    run=run,
)
