"""One download shard: img2dataset's `Downloader` on one metadata shard, atomically, on time.

`download_shard` makes `raw/NNNNN.{tar,parquet}` and `NNNNN_stats.json` exactly as
img2dataset's `download()` makes a shard, then sorts the parquet by key and adds two columns
(error_category, retry_of); see the stage's docstring for the layout. Two more forms serve a
shard whose worker died (isolation.py): `rows=(start, end)` downloads only those rows, as a
piece named `isolation.piece_name(...)` into the folder `raw_url` names; `isolated=...`
assembles the raw shard from its pieces instead of downloading.

The downloader is img2dataset's, fed as its `download()` feeds it, with two things in front:
the fetch guard (fetchguard.py: addresses, sizes, deadlines, politeness to each host) around
every request, and a pixel cap (pixelcap.py) in front of its resizer.

Atomic shards: the downloader writes into a staging folder (staging.py), and the three files
are moved into place (tar and parquet first, stats last) only once the shard is complete; the
runner then writes the completion marker. A shard killed midway leaves no file under a final
name and is redone on re-run; its staging folder is removed by that redo.

No hang: every request is bounded by `timeout` per socket operation and `request_deadline` for
the whole body (see fetchguard); the shard as a whole by `shard_deadline` (derived from its size
when 0). A shard past its deadline fails with an error naming it and the runner retries it.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from laionface.io import storage
from laionface.layout import SHARD_DIGITS, raw_file_names, shard_name, split_key
from laionface.stages.download import fetchguard, heap, isolation
from laionface.stages.download.categories import classify_error
from laionface.stages.download.outcomes import shard_stats
from laionface.stages.download.pixelcap import PixelCappedResizer
from laionface.stages.download.staging import publish, staging

ENCODE_FORMAT = "jpg"
HASH = "sha256"


class ShardDeadlineExceeded(TimeoutError):
    """A download shard ran past its deadline and was abandoned."""


def request_deadline(settings: dict[str, Any]) -> float:
    return float(settings["request_deadline"]) or 3.0 * float(settings["timeout"])


def shard_deadline(settings: dict[str, Any], rows: int) -> float:
    """Seconds a shard of `rows` rows may take before it is abandoned.

    The worst case of a shard whose every URL is slow: rows go through `thread_count` threads in
    waves; each row's request may be made `retries` + 1 times, each of those retried
    `rate_limit_retries` times after waiting up to `max_retry_after`, and each request is
    bounded by the request deadline plus a connect timeout; plus time to decode and re-encode
    every image on one core, plus a minute of setup.
    """
    if settings["shard_deadline"]:
        return float(settings["shard_deadline"])
    waves = math.ceil(rows / int(settings["thread_count"]))
    per_request = request_deadline(settings) + float(settings["timeout"])
    polite = int(settings["rate_limit_retries"])
    per_row = (int(settings["retries"]) + 1) * (
        (polite + 1) * per_request + polite * float(settings["max_retry_after"])
    )
    return 60.0 + 0.05 * rows + waves * per_row


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
        resizer=PixelCappedResizer(resizer, int(settings["max_image_pixels"])),
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
            with heap.roomy_heap():
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
    table = pq.ParquetFile(path).read().sort_by("key")
    statuses = table["status"].to_pylist()
    messages = table["error_message"].to_pylist()
    categories = [classify_error(s, m) for s, m in zip(statuses, messages, strict=True)]
    rows = [split_key(k, samples)[1] for k in table["key"].to_pylist()]
    table = table.append_column("error_category", pa.array(categories, pa.string()))
    return table.append_column("retry_of", pa.array([retry_of[i] for i in rows], pa.string()))


def read_input(in_url: str, settings: dict[str, Any], samples_per_shard: int) -> pa.Table:
    """A download shard's input rows, checked: the columns it needs, and few enough rows for
    img2dataset's keys."""
    table = storage.read_parquet(in_url)
    _check_columns(table, in_url, list(settings["save_additional_columns"]))
    if table.num_rows > samples_per_shard:
        raise ValueError(
            f"{in_url}: {table.num_rows} rows, more than the {samples_per_shard} a shard's keys"
            " can number; set metadata.rows_per_shard to at most that and re-run the metadata"
            " stage"
        )
    return table


def _download(
    table: pa.Table,
    name: str,
    raw_url: str,
    shard_id: int,
    settings: dict[str, Any],
    samples_per_shard: int,
    piece: bool = False,
) -> dict:
    """img2dataset's Downloader on `table`'s rows, published as raw files named `name` (a piece's
    stats file also keeps its 429 counts, for the assembly)."""
    rows = table.num_rows
    retry_of = table["retry_of"].to_pylist() if "retry_of" in table.column_names else [None] * rows
    extra = list(settings["save_additional_columns"])
    # The columns img2dataset's Reader would hand the Downloader: extra columns, caption, url.
    columns = [*extra, "caption", "url"]
    arrow = table.select([*extra, "TEXT", "URL"]).rename_columns(columns)
    urls = arrow["url"].to_pylist()
    policy = fetchguard.FetchPolicy.from_settings(settings, request_deadline(settings))

    with staging(raw_url, name) as (folder, local):
        feather = os.path.join(folder, f"{name}.feather")  # the downloader deletes it when done
        with pa.OSFile(feather, "wb") as sink, pa.ipc.new_file(sink, arrow.schema) as writer:
            writer.write_table(arrow)
        downloader = _downloader(settings, folder, columns, samples_per_shard)
        try:
            _run_with_deadline(
                downloader, (shard_id, feather), shard_deadline(settings, rows), policy
            )
        finally:
            http_429_by_host = fetchguard.take_429s(urls)
        # img2dataset names its files after the shard id; a piece's are renamed to its own.
        made = raw_file_names(shard_name(shard_id))
        tar_name, parquet_name, stats_name = raw_file_names(name)
        for old, new in zip(made, (tar_name, parquet_name, stats_name), strict=True):
            if old != new:
                os.replace(os.path.join(folder, old), os.path.join(folder, new))
        parquet = os.path.join(folder, parquet_name)
        result = _finish_parquet(parquet, retry_of, samples_per_shard)
        if result.num_rows != rows:
            raise RuntimeError(
                f"download shard {name}: img2dataset recorded {result.num_rows} of {rows} rows"
                " (see the worker's log for the sample that failed); the shard will be redone"
            )
        pq.write_table(result, parquet, compression="zstd")
        if piece:
            isolation.note_429s(os.path.join(folder, stats_name), http_429_by_host)
        publish(folder, raw_url, [tar_name, parquet_name, stats_name], local)
    return shard_stats(result, http_429_by_host)


def download_shard(
    *,
    in_url: str,
    raw_url: str,
    shard_id: int,
    settings: dict[str, Any],
    samples_per_shard: int,
    rows: tuple[int, int] | None = None,
    isolated: dict[str, Any] | None = None,
) -> dict:
    """Download one metadata shard into raw/NNNNN.{tar,parquet} and NNNNN_stats.json.

    rows: only rows [start, end) of it, as a piece (isolation.py) in the folder `raw_url`;
    isolated: make the raw shard from the pieces and failed rows it names instead (the stage
    passes isolation.assembly_kwargs).
    """
    table = read_input(in_url, settings, samples_per_shard)
    name = shard_name(shard_id)
    if isolated is not None:
        extra = list(settings["save_additional_columns"])
        return isolation.assemble_shard(
            table, name=name, raw_url=raw_url, samples=samples_per_shard, extra=extra, **isolated
        )
    if rows is not None:
        start, end = rows
        table = table.slice(start, end - start)
        piece = isolation.piece_name(name, start, end)
        return _download(table, piece, raw_url, shard_id, settings, samples_per_shard, piece=True)
    return _download(table, name, raw_url, shard_id, settings, samples_per_shard)
