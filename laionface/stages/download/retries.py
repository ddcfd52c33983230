"""`--retry-failed`: extra raw shards for the rows whose latest outcome is a transient failure.

Rows whose latest outcome (outcomes.latest_outcomes) is in layout.TRANSIENT_CATEGORIES are
copied from their metadata shards into `download/retry/NNNNN.parquet` (DOWNLOAD_SHARD columns
plus `retry_of`, the row's first key), numbered after every existing shard, and downloaded into
raw shards of the same layout (step `download/retry`).

A retry input is only meaningful beside the metadata shards and download settings it was
planned from: it records their fingerprint (engine.markers.fingerprint of the settings and of
the versions of the metadata shards it copies rows from), and when either has changed it is
removed with its raw outputs and marker; its rows are downloaded again by their own shards.
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laionface.engine import markers
from laionface.io import storage
from laionface.io.schemas import DOWNLOAD_SHARD
from laionface.layout import TRANSIENT_CATEGORIES, RunLayout, shard_name, shard_of_file, split_key
from laionface.stages.download.outcomes import complete_raw_shards, latest_outcomes

log = logging.getLogger("laionface")

PLANNED_UNDER = b"laionface.planned_under"  # the fingerprint the input was planned under
SOURCES = b"laionface.sources"  # the metadata shards its rows were copied from (JSON list)


def retry_inputs(layout: RunLayout) -> list[str]:
    return storage.list_files(layout.retry_inputs, ".parquet")


def _plan_fingerprint(layout: RunLayout, settings_fp: str, sources: list[str]) -> str:
    urls = [layout.metadata_shard(shard) for shard in sources]
    versions = markers.named_versions(layout, urls, storage.file_versions(urls))
    return markers.fingerprint(settings_fp, versions)


def drop_stale_retries(layout: RunLayout, settings_fp: str) -> None:
    """Remove the retry inputs (with their raw outputs and markers) planned under other
    settings or from metadata shards that have changed since."""
    for url in retry_inputs(layout):
        fs, path = storage.fs_for(url)
        with fs.open(path, "rb") as handle:
            meta = pq.read_schema(handle).metadata or {}
        sources = json.loads(meta.get(SOURCES, b"[]"))
        planned = meta.get(PLANNED_UNDER, b"").decode()
        if planned == _plan_fingerprint(layout, settings_fp, sources):
            continue
        shard = shard_of_file(url)
        log.info("download: removing retry shard %s, planned under other settings", shard)
        for stale in (
            layout.raw_stats(shard),
            layout.raw_tar(shard),
            layout.raw_parquet(shard),
            layout.marker("download/retry", shard),
            url,
        ):
            storage.remove(stale)


def _candidates(layout: RunLayout, settings_fp: str) -> list[str]:
    """Input keys to retry: a transient latest outcome, not already waiting in a retry input."""
    done = set(complete_raw_shards(layout, settings_fp))
    pending: set[str] = set()
    for url in retry_inputs(layout):
        if shard_of_file(url) not in done:
            pending.update(storage.read_parquet(url, columns=["retry_of"])["retry_of"].to_pylist())
    outcomes = latest_outcomes(layout.url, settings_fp)
    wanted = pc.is_in(outcomes["error_category"], pa.array(TRANSIENT_CATEGORIES))
    keys = outcomes.filter(pc.fill_null(wanted, False))["input_key"].to_pylist()
    return [k for k in keys if k not in pending]


def plan_retries(layout: RunLayout, settings_fp: str, samples_per_shard: int) -> list[str]:
    """Write retry inputs for the rows to retry; returns their URLs."""
    candidates = _candidates(layout, settings_fp)
    if not candidates:
        return []
    by_shard: dict[str, list[tuple[int, str]]] = {}
    for key in candidates:
        number, index = split_key(key, samples_per_shard)
        by_shard.setdefault(shard_name(number), []).append((index, key))
    parts = []
    for shard, items in sorted(by_shard.items()):
        rows = storage.read_parquet(layout.metadata_shard(shard))
        rows = rows.select(DOWNLOAD_SHARD.names).cast(DOWNLOAD_SHARD)
        picked = rows.take(pa.array([index for index, _ in items]))
        parts.append(picked.append_column("retry_of", pa.array([k for _, k in items], pa.string())))
    sources = sorted(by_shard)
    retry = pa.concat_tables(parts).replace_schema_metadata(
        {
            PLANNED_UNDER: _plan_fingerprint(layout, settings_fp, sources),
            SOURCES: json.dumps(sources),
        }
    )
    existing = storage.list_files(layout.metadata_shards, ".parquet") + retry_inputs(layout)
    next_id = max((int(shard_of_file(u)) for u in existing), default=-1) + 1
    urls = []
    for offset in range(0, retry.num_rows, samples_per_shard):
        urls.append(layout.retry_input(shard_name(next_id)))
        storage.write_parquet(retry.slice(offset, samples_per_shard), urls[-1])
        next_id += 1
    log.info(
        "download: retrying %d row(s) that failed with a transient error, in %d extra shard(s)",
        retry.num_rows,
        len(urls),
    )
    return urls
