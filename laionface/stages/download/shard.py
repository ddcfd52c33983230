"""One download shard: img2dataset's `Downloader` on one metadata shard, atomically, on time.

`download_shard` makes `raw/NNNNN.{tar,parquet}` and `NNNNN_stats.json` exactly as
img2dataset's `download()` makes a shard, then sorts the parquet by key and adds two columns
(error_category, retry_of); see the stage's docstring for the layout.

Atomic shards: the downloader writes into a staging folder (`raw/.tmp-NNNNN-<id>/` for a local run
folder, a local temporary folder for a remote one), and the three files are moved into `raw/`
(tar and parquet first, stats last) only once the shard is complete; the runner then writes the
completion marker. A shard killed midway leaves no file under a final name and is redone on
re-run; its staging folder is removed by that redo.

No hang: every request is bounded by `timeout` per socket operation and `request_deadline` for
the whole body (see fetchguard); the shard as a whole by `shard_deadline` (derived from its size
when 0). A shard past its deadline fails with an error naming it and the runner retries it.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from laionface.io import storage
from laionface.layout import SHARD_DIGITS, raw_file_names, shard_name, split_key
from laionface.stages.download import fetchguard
from laionface.stages.download.categories import classify_error

ENCODE_FORMAT = "jpg"
HASH = "sha256"


class ShardDeadlineExceeded(TimeoutError):
    """A download shard ran past its deadline and was abandoned."""


def request_deadline(settings: dict[str, Any]) -> float:
    return float(settings["request_deadline"]) or 3.0 * float(settings["timeout"])


def shard_deadline(settings: dict[str, Any], rows: int) -> float:
    """Seconds a shard of `rows` rows may take before it is abandoned.

    The worst case of a shard whose every URL is slow: rows go through `thread_count` threads in
    waves, each attempt bounded by the request deadline plus a connect timeout; plus time to
    decode and re-encode every image on one core, plus a minute of setup.
    """
    if settings["shard_deadline"]:
        return float(settings["shard_deadline"])
    waves = math.ceil(rows / int(settings["thread_count"]))
    attempts = int(settings["retries"]) + 1
    per_attempt = request_deadline(settings) + float(settings["timeout"])
    return 60.0 + 0.05 * rows + waves * attempts * per_attempt


def _downloader(settings: dict[str, Any], folder: str, columns: list[str], samples: int) -> Any:
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    # Resizer and Downloader built as img2dataset.download() builds them for these options.
    resizer = Resizer(
        image_size=settings["image_size"],
        resize_mode=settings["resize_mode"],
        resize_only_if_bigger=settings["resize_only_if_bigger"],
        encode_quality=settings["encode_quality"],
        encode_format=ENCODE_FORMAT,
        min_image_size=settings["min_image_size"],
        max_image_area=settings["max_image_area"],
        max_aspect_ratio=settings["max_aspect_ratio"],
    )
    return Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
        thread_count=settings["thread_count"],
        save_caption=True,
        extract_exif=True,
        output_folder=folder,
        column_list=columns,
        timeout=settings["timeout"],
        number_sample_per_shard=samples,
        oom_shard_count=SHARD_DIGITS,
        compute_hash=HASH,
        verify_hash_type=None,
        encode_format=ENCODE_FORMAT,
        retries=settings["retries"],
        user_agent_token=settings["user_agent_token"],
        disallowed_header_directives=settings["disallowed_header_directives"] or None,
    )


def _check_columns(table: pa.Table, in_url: str, extra: list[str]) -> None:
    from img2dataset.main import arguments_validator

    try:
        arguments_validator(
            {"compute_hash": HASH, "verify_hash": None, "save_additional_columns": extra}
        )
    except ValueError as exc:
        raise ValueError(f"download.save_additional_columns: {exc}") from None
    missing = [c for c in ["URL", "TEXT", *extra] if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{in_url}: missing column(s) {', '.join(missing)} (has {', '.join(table.column_names)});"
            " a download shard holds the metadata stage's columns: re-run the metadata stage or"
            " remove them from download.save_additional_columns"
        )


@contextlib.contextmanager
def _staging(raw_url: str, name: str) -> Iterator[tuple[str, bool]]:
    """A fresh local folder for one attempt at shard `name`; (path, inside raw/)."""
    fs, raw_path = storage.fs_for(raw_url)
    local = isinstance(fs, LocalFileSystem)
    if local:
        os.makedirs(raw_path, exist_ok=True)
        for stale in os.listdir(raw_path):  # left by an attempt that was killed
            if stale.startswith(f"{storage.TEMP_PREFIX}{name}-"):
                shutil.rmtree(os.path.join(raw_path, stale), ignore_errors=True)
        folder = os.path.join(raw_path, f"{storage.TEMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}")
        os.makedirs(folder)
    else:
        folder = tempfile.mkdtemp(prefix=f"laionface-download-{name}-")
    try:
        yield folder, local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_with_deadline(
    downloader: Any, shard: tuple[int, str], deadline: float, policy: fetchguard.FetchPolicy
) -> None:
    """Run the downloader on one shard under the fetch policy; give up after `deadline` seconds.

    The policy is released by the download thread itself when it ends, so a thread abandoned at
    the deadline keeps fetching through the checked opener, never an unchecked one.
    """
    outcome: dict[str, BaseException] = {}

    def target() -> None:
        try:
            downloader.download_shard(shard)
        except BaseException as exc:  # re-raised in the calling thread
            outcome["error"] = exc
        finally:
            fetchguard.release()

    fetchguard.acquire(policy)
    thread = threading.Thread(target=target, name=f"laionface-download-{shard[0]}", daemon=True)
    try:
        thread.start()
    except BaseException:
        fetchguard.release()
        raise
    thread.join(deadline)
    if thread.is_alive():
        raise ShardDeadlineExceeded(
            f"download shard {shard_name(shard[0])} not finished after {deadline:.0f} s "
            "(download.shard_deadline); abandoned, it will be redone"
        )
    if "error" in outcome:
        raise outcome["error"]


def _finish_parquet(path: str, retry_of: list[str | None], samples: int) -> pa.Table:
    """img2dataset's shard parquet, sorted by key, with error_category and retry_of added."""
    table = pq.read_table(path)
    table = table.sort_by("key")
    statuses = table["status"].to_pylist()
    messages = table["error_message"].to_pylist()
    categories = [classify_error(s, m) for s, m in zip(statuses, messages, strict=True)]
    rows = [split_key(k, samples)[1] for k in table["key"].to_pylist()]
    table = table.append_column("error_category", pa.array(categories, pa.string()))
    return table.append_column("retry_of", pa.array([retry_of[i] for i in rows], pa.string()))


def _publish(folder: str, raw_url: str, names: list[str], local: bool) -> None:
    """Move finished files into raw/ in order; each appears whole or not at all."""
    for name in names:
        source = os.path.join(folder, name)
        if local:
            os.replace(source, os.path.join(storage.fs_for(raw_url)[1], name))
        else:
            with open(source, "rb") as src, storage.atomic_open(storage.join(raw_url, name)) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)


def download_shard(
    *,
    in_url: str,
    raw_url: str,
    shard_id: int,
    settings: dict[str, Any],
    samples_per_shard: int,
) -> dict:
    """Download one metadata shard into raw/NNNNN.{tar,parquet} and NNNNN_stats.json."""
    table = storage.read_parquet(in_url)
    extra = list(settings["save_additional_columns"])
    _check_columns(table, in_url, extra)
    rows = table.num_rows
    if rows > samples_per_shard:
        raise ValueError(
            f"{in_url}: {rows} rows, more than the {samples_per_shard} a shard's keys can number;"
            " set metadata.rows_per_shard to at most that and re-run the metadata stage"
        )
    retry_of = table["retry_of"].to_pylist() if "retry_of" in table.column_names else [None] * rows
    name = shard_name(shard_id)
    # The columns img2dataset's Reader would hand the Downloader: extra columns, caption, url.
    columns = [*extra, "caption", "url"]
    arrow = table.select([*extra, "TEXT", "URL"]).rename_columns(columns)
    del table
    policy = fetchguard.FetchPolicy.from_settings(settings, request_deadline(settings))

    with _staging(raw_url, name) as (folder, local):
        feather = os.path.join(folder, f"{name}.feather")  # the downloader deletes it when done
        with pa.OSFile(feather, "wb") as sink, pa.ipc.new_file(sink, arrow.schema) as writer:
            writer.write_table(arrow)
        downloader = _downloader(settings, folder, columns, samples_per_shard)
        _run_with_deadline(downloader, (shard_id, feather), shard_deadline(settings, rows), policy)

        tar_name, parquet_name, stats_name = raw_file_names(name)
        parquet = os.path.join(folder, parquet_name)
        result = _finish_parquet(parquet, retry_of, samples_per_shard)
        if result.num_rows != rows:
            raise RuntimeError(
                f"download shard {name}: img2dataset recorded {result.num_rows} of {rows} rows"
                " (see the worker's log for the sample that failed); the shard will be redone"
            )
        pq.write_table(result, parquet, compression="zstd")
        _publish(folder, raw_url, [tar_name, parquet_name, stats_name], local)

    by_category = Counter(c for c in result["error_category"].to_pylist() if c is not None)
    failed = sum(by_category.values())
    return {
        "items": rows,
        "successes": rows - failed,
        "failed": failed,
        "by_category": dict(sorted(by_category.items())),
    }
