"""The latest outcome of every download input row: the accounting rule of `--retry-failed`.

Every input row is identified by its first key (`input_key`: its `retry_of`, or its own key in
a first attempt); its latest outcome is the attempt in the highest-numbered complete raw shard.
A raw shard is complete when its marker (steps `download` and `download/retry`) was written
under the download settings in force, so shards made under other settings never count.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laionface.engine import markers
from laionface.io import storage
from laionface.io.schemas import DOWNLOAD_OUTCOMES
from laionface.layout import RunLayout, key_prefix, key_shards

STEPS = ("download", "download/retry")


def recorded_settings(layout: RunLayout) -> str | None:
    """The fingerprint of the download settings run.json records (None: no download yet)."""
    if not storage.exists(layout.run_json):
        return None
    return (
        storage.read_json(layout.run_json).get("stages", {}).get("download", {}).get("fingerprint")
    )


def complete_raw_shards(layout: RunLayout, settings_fp: str | None = None) -> list[str]:
    """The raw shards, first attempts and retries, complete under `settings_fp` (default: the
    download settings run.json records), sorted."""
    settings_fp = settings_fp or recorded_settings(layout)
    return sorted(markers.complete_shards(layout, STEPS, settings_fp))


def raw_shards_by_step(layout: RunLayout, settings_fp: str | None = None) -> tuple[list, list]:
    """(first-attempt raw shards, retry raw shards) complete under `settings_fp` (default: the
    download settings run.json records), each sorted."""
    settings_fp = settings_fp or recorded_settings(layout)
    firsts = markers.complete_shards(layout, STEPS[:1], settings_fp)
    retries = markers.complete_shards(layout, STEPS[1:], settings_fp)
    return sorted(firsts), sorted(retries)


def _attempts(layout: RunLayout, shard: str, origin: str | None = None) -> pa.Table:
    """A raw shard's rows as attempts; only those of metadata shard `origin`'s input rows when
    given (for a retry shard)."""
    table = storage.read_parquet(layout.raw_parquet(shard))
    if origin is not None:
        table = table.filter(pc.starts_with(table["retry_of"], key_prefix(origin)))
    n = table.num_rows
    sample_ids = (
        table["SAMPLE_ID"].cast(pa.int64())
        if "SAMPLE_ID" in table.column_names
        else pa.nulls(n, pa.int64())
    )
    return pa.table(
        {
            "input_key": pc.coalesce(table["retry_of"], table["key"]),
            "SAMPLE_ID": sample_ids,
            "URL": table["url"],
            "key": table["key"],
            "shard": pa.array([shard] * n, pa.string()),
            "status": table["status"],
            "error_category": table["error_category"],
            "error_message": table["error_message"],
        }
    )


def latest_outcomes(run_url: str, settings_fp: str | None = None) -> pa.Table:
    """One row per input row of the complete raw shards, under its latest outcome
    (schemas.DOWNLOAD_OUTCOMES). Every row of the run at once: for a large run, map
    `origin_outcomes` over the first attempts' shards instead."""
    layout = RunLayout(run_url)
    return _latest([_attempts(layout, shard) for shard in complete_raw_shards(layout, settings_fp)])


def http_429s(layout: RunLayout, settings_fp: str | None = None) -> dict[str, int]:
    """429 answers per host over the raw shards complete under `settings_fp` (default: the
    recorded download settings), from their markers' stats; most first."""
    settings_fp = settings_fp or recorded_settings(layout)
    total: Counter[str] = Counter()
    for marker in markers.complete_shards(layout, STEPS, settings_fp).values():
        total.update((marker.get("stats") or {}).get("http_429_by_host") or {})
    return dict(sorted(total.items(), key=lambda item: (-item[1], item[0])))


def retry_origins(run_url: str, shard: str, samples_per_shard: int) -> list[str]:
    """The metadata shards whose rows retry raw shard `shard` downloaded again."""
    table = storage.read_parquet(RunLayout(run_url).raw_parquet(shard), columns=["retry_of"])
    keys = table["retry_of"].drop_null()
    return sorted(set(key_shards(keys, samples_per_shard).to_pylist())) if len(keys) else []


def origin_outcomes(run_url: str, shard: str, sources: list[str]) -> pa.Table:
    """The latest outcome of each input row of metadata shard `shard`, from the complete raw
    shards `sources` that hold its attempts (`origin_plan`): raw shard `shard` itself, its
    first attempts, and retry shards, of which only its rows count; as `latest_outcomes`
    gives them."""
    layout = RunLayout(run_url)
    return _latest(
        [_attempts(layout, raw, origin=None if raw == shard else shard) for raw in sources]
    )


def _latest(parts: list[pa.Table]) -> pa.Table:
    """Of attempts, the latest of each input row (the highest-numbered shard), with counts."""
    if not parts:
        return DOWNLOAD_OUTCOMES.empty_table()
    every = pa.concat_tables(parts).sort_by([("input_key", "ascending"), ("shard", "ascending")])
    keys = every["input_key"].to_numpy(zero_copy_only=False)
    last = np.append(keys[1:] != keys[:-1], True) if len(keys) else np.zeros(0, bool)
    ends = np.flatnonzero(last)
    attempts = np.diff(np.concatenate([[-1], ends])).astype(np.int32)
    latest = every.take(pa.array(ends))
    return latest.append_column("attempts", pa.array(attempts, pa.int32())).cast(DOWNLOAD_OUTCOMES)


Mapper = Callable[[Callable[..., Any], list[dict]], list[Any]]


def origin_plan(
    run_url: str, samples_per_shard: int, mapper: Mapper, settings_fp: str | None = None
) -> dict[str, list[str]]:
    """{metadata shard: the complete raw shards holding attempts of its rows (its own first,
    when complete, then retries)}, sorted by shard: the arguments of `origin_outcomes`.
    `mapper(fn, kwargs)` runs `fn(**k)` for each k (on the cluster, or threads), one task per
    retry shard."""
    firsts, retries = raw_shards_by_step(RunLayout(run_url), settings_fp)
    plan: dict[str, list[str]] = {shard: [shard] for shard in firsts}
    tasks = [dict(run_url=run_url, shard=r, samples_per_shard=samples_per_shard) for r in retries]
    for retry, origins in zip(retries, mapper(retry_origins, tasks), strict=True):
        for origin in origins:
            plan.setdefault(origin, []).append(retry)
    return dict(sorted(plan.items()))


def origin_summary(run_url: str, shard: str, sources: list[str]) -> dict:
    """`summarize` of metadata shard `shard`'s latest outcomes (a per-shard task)."""
    return summarize(origin_outcomes(run_url, shard, sources))


def add_summaries(parts: Iterable[dict]) -> dict:
    """The `summarize` of the union of the outcomes the parts summarize."""
    total: dict[str, Any] = summarize(DOWNLOAD_OUTCOMES.empty_table())
    categories: Counter[str] = Counter()
    for part in parts:
        for name, value in part.items():
            if name != "by_category":
                total[name] += value
        categories.update(part["by_category"])
    total["by_category"] = dict(sorted(categories.items()))
    return total


def summarize(outcomes: pa.Table) -> dict:
    """Counts of the latest outcomes: each input row counted once."""
    categories = Counter(c for c in outcomes["error_category"].to_pylist() if c is not None)
    attempts = outcomes["attempts"].to_numpy()
    retried = attempts > 1
    success = np.asarray(pc.equal(outcomes["status"], "success").to_numpy(zero_copy_only=False))
    return {
        "rows": outcomes.num_rows,
        "successes": int(success.sum()),
        "failed": int(outcomes.num_rows - success.sum()),
        "by_category": dict(sorted(categories.items())),
        "retried_rows": int(retried.sum()),
        "recovered_by_retry": int((retried & success).sum()),
    }


def shard_stats(table: pa.Table, http_429_by_host: dict[str, int]) -> dict:
    """What a raw shard's task returns: its rows, successes and failures by category, and the
    429 answers its requests met, per host."""
    by_category = Counter(c for c in table["error_category"].to_pylist() if c is not None)
    failed = sum(by_category.values())
    return {
        "items": table.num_rows,
        "successes": table.num_rows - failed,
        "failed": failed,
        "by_category": dict(sorted(by_category.items())),
        "http_429_by_host": http_429_by_host,
    }
