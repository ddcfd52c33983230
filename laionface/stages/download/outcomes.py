"""The latest outcome of every download input row: the accounting rule of `--retry-failed`.

Every input row is identified by its first key (`input_key`: its `retry_of`, or its own key in
a first attempt); its latest outcome is the attempt in the highest-numbered complete raw shard.
A raw shard is complete when its marker (steps `download` and `download/retry`) was written
under the download settings in force, so shards made under other settings never count.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laionface.engine import markers
from laionface.io import storage
from laionface.io.schemas import DOWNLOAD_OUTCOMES
from laionface.layout import RunLayout

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


def _attempts(layout: RunLayout, shard: str) -> pa.Table:
    table = storage.read_parquet(layout.raw_parquet(shard))
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
    (schemas.DOWNLOAD_OUTCOMES)."""
    layout = RunLayout(run_url)
    parts = [_attempts(layout, shard) for shard in complete_raw_shards(layout, settings_fp)]
    if not parts:
        return DOWNLOAD_OUTCOMES.empty_table()
    every = pa.concat_tables(parts).sort_by([("input_key", "ascending"), ("shard", "ascending")])
    keys = every["input_key"].to_numpy(zero_copy_only=False)
    last = np.append(keys[1:] != keys[:-1], True) if len(keys) else np.zeros(0, bool)
    ends = np.flatnonzero(last)
    attempts = np.diff(np.concatenate([[-1], ends])).astype(np.int32)
    latest = every.take(pa.array(ends))
    return latest.append_column("attempts", pa.array(attempts, pa.int32())).cast(DOWNLOAD_OUTCOMES)


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
