"""The download stage: img2dataset's own downloader, mapped over metadata shards by the Dask runner.

img2dataset ships multiprocessing, Spark and Ray distributors; this is its Dask one. Each metadata
shard `metadata/shards/NNNNN.parquet` becomes one img2dataset output shard, made by img2dataset's
`Downloader` object exactly as its `download()` makes it, under the run's `raw/` folder:

    raw/NNNNN.tar           webdataset: {key}.jpg, {key}.txt, {key}.json per success (img2dataset's)
    raw/NNNNN.parquet       one row per input row, failures included: img2dataset's columns
                            (the `save_additional_columns`, caption, url, key, status,
                            error_message, width, height, original_width, original_height, exif,
                            sha256) plus two of ours:
                              error_category  null for a success, else one of CATEGORIES
                              retry_of        null, or in a retry shard the key this row retries
                            rows sorted by key (img2dataset writes them in completion order)
    raw/NNNNN_stats.json    img2dataset's stats file, untouched

Keys are img2dataset's: 5 digits of shard id and 4 of row index (`compute_key`, with
`number_sample_per_shard` = max(10,000, metadata.rows_per_shard)), so key 000030017 is row 17 of
metadata shard 3, and a shard id is its metadata shard's number.

Atomic shards: the downloader writes into a staging folder (`raw/.tmp-NNNNN-<id>/` for a local run
folder, a local temporary folder for a remote one), and the three files are moved into `raw/`
(tar and parquet first, stats last) only once the shard is complete; the runner then writes the
completion marker. A shard killed midway leaves no file under a final name and is redone on
re-run; its staging folder is removed by that redo.

No hang: every request is bounded by `timeout` per socket operation and `request_deadline` for
the whole body (see fetchguard); the shard as a whole by `shard_deadline` (derived from its size
when 0). A shard past its deadline fails with an error naming it and the runner retries it.

Retry of failed rows (`laionface run ... --retry-failed`): rows whose latest outcome is a transient
failure (TRANSIENT: timeout, connection, http_5xx, dns) are copied from their metadata shards into
`download/retry/NNNNN.parquet` (DOWNLOAD_SHARD columns plus `retry_of`), numbered after every
existing shard, and downloaded into extra raw shards of the same layout (step `download/retry`).
Accounting rule: every input row is identified by its first key (`input_key`: its `retry_of`, or
its own key in a first attempt); its latest outcome is the attempt in the highest-numbered
complete raw shard. `latest_outcomes(run_url)` gives one row per input row under that rule.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import posixpath
import re
import shutil
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from laionface.config import fingerprint
from laionface.engine.runner import ShardTask, StageContext, read_markers
from laionface.io import storage
from laionface.io.schemas import DOWNLOAD_SHARD
from laionface.stages.download import fetchguard

log = logging.getLogger("laionface")

# Every failed row's error_category is one of these.
CATEGORIES = (
    "http_404",
    "http_4xx",
    "http_5xx",
    "timeout",
    "dns",
    "connection",
    "not_an_image",
    "too_small",
    "too_large",
    "bad_aspect_ratio",
    "opted_out",
    "blocked_address",
    "other",
)
# Failures worth trying again later: the same request may well succeed.
TRANSIENT = frozenset({"timeout", "connection", "http_5xx", "dns"})

SHARD_DIGITS = 5  # img2dataset's oom_shard_count
MIN_SAMPLES_PER_SHARD = 10_000  # gives img2dataset's usual 9-digit keys
ENCODE_FORMAT = "jpg"
HASH = "sha256"
FINGERPRINT_KEY = b"laionface.download_fingerprint"

RETRY_INPUT_SCHEMA = pa.schema(list(DOWNLOAD_SHARD) + [("retry_of", pa.string())])

OUTCOMES = pa.schema(
    [
        ("input_key", pa.string()),  # key of the row's first attempt (its metadata shard row)
        ("SAMPLE_ID", pa.int64()),
        ("URL", pa.string()),
        ("key", pa.string()),  # key of the latest attempt
        ("shard", pa.string()),  # raw shard of the latest attempt
        ("status", pa.string()),
        ("error_category", pa.string()),
        ("error_message", pa.string()),
        ("attempts", pa.int32()),
    ]
)


class ShardDeadlineExceeded(TimeoutError):
    """A download shard ran past its deadline and was abandoned."""


# ---------------------------------------------------------------------------------------------
# Failure categories


_HTTP_ERROR = re.compile(r"HTTP Error (\d{3})")
# (category, substrings of img2dataset's error_message), checked in order after HTTP errors.
_MESSAGE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("blocked_address", (fetchguard.BLOCKED_PREFIX,)),
    ("too_large", (fetchguard.TOO_LARGE_PREFIX, "image area too large")),
    ("opted_out", ("X-Robots-Tag",)),
    ("timeout", ("timed out", "timeout")),
    (
        "dns",
        (
            "Name or service not known",
            "Temporary failure in name resolution",
            "No address associated with hostname",
            "nodename nor servname",
            "getaddrinfo failed",
            "[Errno -2]",
            "[Errno -3]",
            "[Errno -5]",
        ),
    ),
    (
        "connection",
        (
            "Connection refused",
            "Connection reset",
            "Connection aborted",
            "Remote end closed connection",
            "IncompleteRead",
            "Network is unreachable",
            "No route to host",
            "Broken pipe",
            "EOF occurred in violation of protocol",
            "[Errno 104]",
            "[Errno 111]",
        ),
    ),
    ("too_small", ("image too small",)),
    ("bad_aspect_ratio", ("aspect ratio too large",)),
    ("not_an_image", ("Image decoding error",)),
)


def classify_error(status: str | None, message: str | None) -> str | None:
    """The category of one img2dataset outcome: None for a success, else one of CATEGORIES."""
    if status == "success":
        return None
    text = message or ""
    http = _HTTP_ERROR.search(text)
    if http:
        code = int(http.group(1))
        if code == 404:
            return "http_404"
        if 400 <= code < 500:
            return "http_4xx"
        if 500 <= code < 600:
            return "http_5xx"
        return "other"  # e.g. a redirect loop ("HTTP Error 302: ... infinite loop")
    for category, needles in _MESSAGE_RULES:
        if any(needle in text for needle in needles):
            return category
    return "other"


# ---------------------------------------------------------------------------------------------
# Sizes and deadlines


def samples_per_shard_for(rows_per_shard: int) -> int:
    """img2dataset's number_sample_per_shard for a run: it sets the digits of a key's row index."""
    return max(MIN_SAMPLES_PER_SHARD, int(rows_per_shard))


def _index_digits(samples_per_shard: int) -> int:
    return math.ceil(math.log10(samples_per_shard))  # as img2dataset's Downloader computes it


def split_key(key: str, samples_per_shard: int) -> tuple[int, int]:
    """(shard id, row index in that shard) of an img2dataset key."""
    return divmod(int(key), 10 ** _index_digits(samples_per_shard))


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


# ---------------------------------------------------------------------------------------------
# One shard


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
            f"download shard {shard[0]:0{SHARD_DIGITS}d} not finished after {deadline:.0f} s "
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
    name = f"{shard_id:0{SHARD_DIGITS}d}"
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

        parquet = os.path.join(folder, f"{name}.parquet")
        result = _finish_parquet(parquet, retry_of, samples_per_shard)
        if result.num_rows != rows:
            raise RuntimeError(
                f"download shard {name}: img2dataset recorded {result.num_rows} of {rows} rows"
                " (see the worker's log for the sample that failed); the shard will be redone"
            )
        pq.write_table(result, parquet, compression="zstd")
        _publish(folder, raw_url, [f"{name}.tar", f"{name}.parquet", f"{name}_stats.json"], local)

    by_category = Counter(c for c in result["error_category"].to_pylist() if c is not None)
    failed = sum(by_category.values())
    return {
        "items": rows,
        "successes": rows - failed,
        "failed": failed,
        "by_category": dict(sorted(by_category.items())),
    }


# ---------------------------------------------------------------------------------------------
# Outcomes and retries


def _read_download_markers(run_url: str) -> dict[str, dict]:
    """Completion markers of raw shards, first attempts and retries together."""
    markers = read_markers(storage.join(run_url, "download", "_done"))
    markers.update(read_markers(storage.join(run_url, "download", "retry", "_done")))
    return markers


def _current_fingerprint(run_url: str) -> str | None:
    run_json = storage.join(run_url, "run.json")
    if not storage.exists(run_json):
        return None
    return storage.read_json(run_json).get("stages", {}).get("download", {}).get("fingerprint")


def latest_outcomes(run_url: str, fingerprint: str | None = None) -> pa.Table:
    """One row per input row of the complete raw shards, under its latest outcome (OUTCOMES).

    A raw shard counts when its completion marker carries `fingerprint` (default: the download
    stage's fingerprint in run.json), so shards made under other settings never count.
    """
    fingerprint = fingerprint or _current_fingerprint(run_url)
    markers = _read_download_markers(run_url)
    shards = sorted(
        shard
        for shard, marker in markers.items()
        if fingerprint is None or marker.get("fingerprint") == fingerprint
    )
    parts = []
    for shard in shards:
        table = storage.read_parquet(storage.join(run_url, "raw", f"{shard}.parquet"))
        n = table.num_rows
        sample_ids = (
            table["SAMPLE_ID"].cast(pa.int64())
            if "SAMPLE_ID" in table.column_names
            else pa.nulls(n, pa.int64())
        )
        key = table["key"]
        parts.append(
            pa.table(
                {
                    "input_key": pc.coalesce(table["retry_of"], key),
                    "SAMPLE_ID": sample_ids,
                    "URL": table["url"],
                    "key": key,
                    "shard": pa.array([shard] * n, pa.string()),
                    "status": table["status"],
                    "error_category": table["error_category"],
                    "error_message": table["error_message"],
                }
            )
        )
    if not parts:
        return OUTCOMES.empty_table()
    every = pa.concat_tables(parts).sort_by([("input_key", "ascending"), ("shard", "ascending")])
    keys = every["input_key"].to_numpy(zero_copy_only=False)
    last = np.append(keys[1:] != keys[:-1], True) if len(keys) else np.zeros(0, bool)
    ends = np.flatnonzero(last)
    attempts = np.diff(np.concatenate([[-1], ends])).astype(np.int32)
    latest = every.take(pa.array(ends))
    return latest.append_column("attempts", pa.array(attempts, pa.int32())).cast(OUTCOMES)


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


def _retry_inputs(run_url: str) -> list[str]:
    return storage.list_files(storage.join(run_url, "download", "retry"), ".parquet")


def _shard_of(url: str) -> str:
    return posixpath.basename(url)[: -len(".parquet")]


def _drop_stale_retries(run_url: str, fingerprint: str) -> None:
    """Retries planned under other settings no longer line up with the metadata shards: remove
    their inputs, raw outputs and markers (their rows are downloaded again by their own shards)."""
    for url in _retry_inputs(run_url):
        fs, path = storage.fs_for(url)
        with fs.open(path, "rb") as handle:
            planned = (pq.read_schema(handle).metadata or {}).get(FINGERPRINT_KEY, b"").decode()
        if planned == fingerprint:
            continue
        shard = _shard_of(url)
        log.info("download: removing retry shard %s, planned under other settings", shard)
        for stale in (
            storage.join(run_url, "raw", f"{shard}_stats.json"),
            storage.join(run_url, "raw", f"{shard}.tar"),
            storage.join(run_url, "raw", f"{shard}.parquet"),
            storage.join(run_url, "download", "retry", "_done", f"{shard}.json"),
            url,
        ):
            storage.remove(stale)


def plan_retries(run_url: str, fingerprint: str, samples_per_shard: int) -> list[str]:
    """Write retry inputs for rows whose latest outcome is a transient failure; their URLs.

    Rows already waiting in a retry input that has not run yet are not planned twice.
    """
    markers = _read_download_markers(run_url)
    pending: set[str] = set()
    for url in _retry_inputs(run_url):
        if markers.get(_shard_of(url), {}).get("fingerprint") != fingerprint:
            pending.update(storage.read_parquet(url, columns=["retry_of"])["retry_of"].to_pylist())
    outcomes = latest_outcomes(run_url, fingerprint)
    wanted = pc.is_in(outcomes["error_category"], pa.array(sorted(TRANSIENT)))
    candidates = [
        k
        for k in outcomes.filter(pc.fill_null(wanted, False))["input_key"].to_pylist()
        if k not in pending
    ]
    if not candidates:
        return []
    by_shard: dict[int, list[tuple[int, str]]] = {}
    for key in candidates:
        shard, index = split_key(key, samples_per_shard)
        by_shard.setdefault(shard, []).append((index, key))
    parts = []
    for shard, items in sorted(by_shard.items()):
        source = storage.join(run_url, "metadata", "shards", f"{shard:0{SHARD_DIGITS}d}.parquet")
        rows = storage.read_parquet(source).select(DOWNLOAD_SHARD.names).cast(DOWNLOAD_SHARD)
        picked = rows.take(pa.array([index for index, _ in items]))
        parts.append(picked.append_column("retry_of", pa.array([k for _, k in items], pa.string())))
    retry = pa.concat_tables(parts).replace_schema_metadata({FINGERPRINT_KEY: fingerprint})
    existing = [
        int(_shard_of(u))
        for u in storage.list_files(storage.join(run_url, "metadata", "shards"), ".parquet")
        + _retry_inputs(run_url)
    ]
    next_id = max(existing, default=-1) + 1
    urls = []
    for offset in range(0, retry.num_rows, samples_per_shard):
        url = storage.join(run_url, "download", "retry", f"{next_id:0{SHARD_DIGITS}d}.parquet")
        storage.write_parquet(retry.slice(offset, samples_per_shard), url)
        urls.append(url)
        next_id += 1
    log.info(
        "download: retrying %d row(s) that failed with a transient error, in %d extra shard(s)",
        retry.num_rows,
        len(urls),
    )
    return urls


# ---------------------------------------------------------------------------------------------
# The stage


def _warn_failure_rates(stats: dict[str, dict], threshold: float) -> None:
    high = {
        shard: s["failed"] / s["items"]
        for shard, s in sorted(stats.items())
        if s.get("items") and s.get("failed", 0) / s["items"] > threshold
    }
    for shard, rate in list(high.items())[:10]:
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
    if len(high) > 10:
        log.warning("... and %d more shards above the failure rate warning", len(high) - 10)


def run(ctx: StageContext) -> None:
    config = ctx.config
    settings = config.download.model_dump()
    fp = fingerprint(config, "download")
    samples = samples_per_shard_for(config.metadata.rows_per_shard)
    raw_url = ctx.path("raw")
    inputs = storage.list_files(ctx.path("metadata", "shards"), ".parquet")
    if not inputs:
        raise FileNotFoundError(
            f"{ctx.path('metadata', 'shards')}: no metadata shards to download; run the metadata"
            " stage first (laionface run PIPELINE --stages metadata,download)"
        )

    def tasks(urls: list[str]) -> list[ShardTask]:
        return [
            ShardTask(
                _shard_of(url),
                dict(
                    in_url=url,
                    raw_url=raw_url,
                    shard_id=int(_shard_of(url)),
                    settings=settings,
                    samples_per_shard=samples,
                ),
            )
            for url in urls
        ]

    _drop_stale_retries(ctx.run.url, fp)
    stats = ctx.map_shards("download", download_shard, tasks(inputs), fingerprint=fp, unit="rows")
    if ctx.options.get("retry_failed"):
        plan_retries(ctx.run.url, fp, samples)
    retries = _retry_inputs(ctx.run.url)
    if retries:
        stats.update(
            ctx.map_shards(
                "download/retry", download_shard, tasks(retries), fingerprint=fp, unit="rows"
            )
        )
    _warn_failure_rates(stats, config.download.failure_rate_warning)
    summary = summarize(latest_outcomes(ctx.run.url, fp))
    ctx.run.stage("download")["outcomes"] = summary
    ctx.run.save()
    log.info(
        "download: %d rows, %d images (%.1f%%), failures by category: %s",
        summary["rows"],
        summary["successes"],
        100 * summary["successes"] / max(summary["rows"], 1),
        summary["by_category"] or "none",
    )
