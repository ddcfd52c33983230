"""Reading a run folder for the audit: parquet footers and columns, in parallel, with errors that
name the file."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laionface.audit.model import AuditError
from laionface.io import storage
from laionface.layout import RunLayout

# Files read at once; reads are I/O bound (object stores especially).
READ_THREADS = 16


T = TypeVar("T")


R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    items = list(items)
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def num_rows(url: str) -> int:
    fs, path = storage.fs_for(url)
    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    except Exception as exc:
        raise AuditError(f"{url}: can't read the parquet footer ({exc})") from exc


def column_names(url: str) -> list[str]:
    fs, path = storage.fs_for(url)
    with fs.open(path, "rb") as handle:
        return pq.read_schema(handle).names


def read_columns(url: str, columns: list[str]) -> pa.Table:
    try:
        return storage.read_parquet(url, columns=columns)
    except Exception as exc:
        raise AuditError(f"{url}: can't read columns {', '.join(columns)} ({exc})") from exc


def value_counts(values: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """{value: count}; nulls counted under "unknown"."""
    counts: dict[str, int] = {}
    for item in pc.value_counts(values).to_pylist():
        name = item["values"] if item["values"] is not None else "unknown"
        counts[name] = counts.get(name, 0) + int(item["counts"])
    return counts


def run_config(run_url: str) -> dict[str, Any]:
    run_json = RunLayout(run_url).run_json
    if storage.exists(run_json):
        return storage.read_json(run_json).get("config") or {}
    return {}


def run_stages(run_url: str) -> dict[str, dict[str, Any]]:
    """run.json's record of each stage and step ({} without run.json)."""
    run_json = RunLayout(run_url).run_json
    if not storage.exists(run_json):
        return {}
    return storage.read_json(run_json).get("stages") or {}


def recorded_settings(run_url: str, stage: str) -> dict[str, Any]:
    """The settings run.json records for `stage` (those it last ran with; {} if none)."""
    return run_stages(run_url).get(stage, {}).get("settings") or {}
