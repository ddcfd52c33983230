"""The audit: where every input row of a run ended up, and a check that nothing was lost.

The funnel follows the rows from the metadata inputs to the published dataset. Every row that
entered the first stage present has exactly one fate: kept to the end, or dropped by one stage for
one reason:

    stage     counted per            input (measured from the upstream files)    reasons
    metadata  metadata input file    rows read from the file                     metadata.REASONS
    download  metadata shard         rows of metadata/shards/NNNNN.parquet       failure category
    faces     raw shard              successful downloads in raw/NNNNN.parquet   (none)
    select    raw shard              rows of faces/NNNNN.parquet                 select.REASONS
    dedup     raw shard of the key   select-kept rows of select/NNNNN.parquet    dedup reasons
    emit      dataset shard          dedup-kept samples                          (none)

A download row is counted once, under its latest outcome (`download.latest_outcomes`: a
`--retry-failed` round supersedes earlier failures). Retry shards are raw shards of their own, so
from faces on the shards are raw shards.

Conservation is checked per shard (a stage's outcomes for a shard add up to the input measured
from the stage before it) and between stages (a stage's input is the kept count of the stage
before). A stage with no output at all is listed as missing (the stages after a gap are counted,
but can't be checked against the stage before it); a stage with some shards missing or with counts
that don't add up is a `ConservationError` that names the stage and the shards.

`write_audit` keeps the figures as `audit/funnel.parquet` (AUDIT_FUNNEL) and `audit/shards.parquet`
(AUDIT_SHARDS, per shard); `laionface stats RUN` prints the funnel (`stats_command`).
"""

from __future__ import annotations

import logging
import posixpath
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from laionface.config import STAGE_ORDER
from laionface.io import schemas, storage

log = logging.getLogger("laionface")

INPUT, DROPPED, KEPT = "input", "dropped", "kept"
# Files read at once; reads are I/O bound (object stores especially).
READ_THREADS = 16
# Shards named in an error message before "and N more".
MAX_NAMED_SHARDS = 10

T = TypeVar("T")
R = TypeVar("R")


class AuditError(ValueError):
    """A run folder that can't be audited (nothing in it, or an unreadable file)."""


@dataclass(frozen=True)
class Problem:
    """A conservation failure: `stage`'s figures for `shards` don't add up."""

    stage: str
    shards: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        return f"{self.stage}: {self.message}"


class ConservationError(ValueError):
    """The funnel does not add up; the message names each stage and its shards."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        stages = ",".join(dict.fromkeys(p.stage for p in problems))
        super().__init__(
            f"the funnel does not add up ({len(problems)} problem(s)): some rows have no fate or"
            f" more than one:\n{lines}\nRe-run the stage(s) named (laionface run PIPELINE"
            f" --stages {stages}) to redo incomplete shards, then check again."
        )


@dataclass
class StageFigures:
    """One stage's figures: totals, and the same per shard (or per input file)."""

    stage: str
    shard_kind: str  # what a shard is here: "input file", "metadata shard", "raw shard", ...
    input: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    # (shard, outcome, reason, count) rows of audit/shards.parquet
    shard_rows: list[tuple[str, str, str | None, int]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


@dataclass
class Funnel:
    """Where the rows of a run went; `rows()` is the table `laionface stats` prints."""

    run_url: str
    stages: list[StageFigures]
    missing: list[str]  # stages with no output, in pipeline order
    problems: list[Problem]
    disabled: list[str] = field(default_factory=list)  # stages the config turns off ("dedup")
    # Tables read on the way that the report reuses: "outcomes" (download.latest_outcomes) and
    # "dataset_shards" (shard, samples).
    tables: dict[str, pa.Table] = field(default_factory=dict, repr=False)

    @property
    def input_rows(self) -> int:
        return self.stages[0].input if self.stages else 0

    @property
    def kept(self) -> int:
        return self.stages[-1].kept if self.stages else 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def not_run(self) -> list[str]:
        """The stages without output that the config does not turn off."""
        return [name for name in self.missing if name not in self.disabled]

    def stage(self, name: str) -> StageFigures | None:
        return next((s for s in self.stages if s.stage == name), None)

    def rows(self) -> list[dict[str, Any]]:
        """One row per stage input, drop reason and stage output (the AUDIT_FUNNEL rows)."""
        total = self.input_rows
        out = []

        def add(stage: StageFigures, outcome: str, reason: str | None, count: int) -> None:
            out.append(
                {
                    "stage": stage.stage,
                    "outcome": outcome,
                    "reason": reason,
                    "count": count,
                    "pct_of_input": pct(count, total),
                    "pct_of_stage_input": pct(count, stage.input),
                }
            )

        for stage in self.stages:
            add(stage, INPUT, None, stage.input)
            for reason, count in stage.dropped.items():
                add(stage, DROPPED, reason, count)
            add(stage, KEPT, None, stage.kept)
        return out

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows(), schema=schemas.AUDIT_FUNNEL)

    def shards_table(self) -> pa.Table:
        rows = [
            {"stage": s.stage, "shard": shard, "outcome": outcome, "reason": reason, "count": n}
            for s in self.stages
            for shard, outcome, reason, n in s.shard_rows
        ]
        return pa.Table.from_pylist(rows, schema=schemas.AUDIT_SHARDS)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: totals per stage, the missing stages and any problems."""
        return {
            "input_rows": self.input_rows,
            "kept": self.kept,
            "conservation": "ok" if self.ok else "failed",
            "problems": [str(p) for p in self.problems],
            "missing_stages": list(self.missing),
            "disabled_stages": list(self.disabled),
            "stages": [
                {
                    "stage": s.stage,
                    "input": s.input,
                    "kept": s.kept,
                    "dropped": dict(s.dropped),
                }
                for s in self.stages
            ],
        }


def pct(count: int, of: int) -> float:
    return round(100.0 * count / of, 4) if of else 0.0


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    items = list(items)
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def _shard_of(url: str) -> str:
    return posixpath.basename(url).rsplit(".", 1)[0]


def _num_rows(url: str) -> int:
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


def _value_counts(values: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """{value: count}; nulls counted under "unknown"."""
    counts: dict[str, int] = {}
    for item in pc.value_counts(values).to_pylist():
        name = item["values"] if item["values"] is not None else "unknown"
        counts[name] = counts.get(name, 0) + int(item["counts"])
    return counts


def _name_shards(shards: Iterable[str]) -> str:
    shards = sorted(shards)
    named = ", ".join(shards[:MAX_NAMED_SHARDS])
    more = len(shards) - MAX_NAMED_SHARDS
    return named + (f" and {more} more" if more > 0 else "")


def _ordered(counts: dict[str, int], order: Iterable[str] = ()) -> dict[str, int]:
    """Reasons in the stage's documented order, then the others by count (largest first)."""
    order = list(order)
    known = [r for r in order if counts.get(r)]
    rest = sorted(
        (r for r in counts if r not in order and counts[r]), key=lambda r: (-counts[r], r)
    )
    return {r: counts[r] for r in known + rest}


def _check_shards(
    figures: StageFigures,
    inputs: dict[str, int],
    outcomes: dict[str, int],
    describe: Callable[[str, int, int], str],
) -> None:
    """Record a problem for the shards whose outcome count differs from their input count."""
    bad = sorted(s for s in set(inputs) | set(outcomes) if inputs.get(s, 0) != outcomes.get(s, 0))
    if not bad:
        return
    details = "; ".join(
        describe(s, inputs.get(s, 0), outcomes.get(s, 0)) for s in bad[:MAX_NAMED_SHARDS]
    )
    more = f"; and {len(bad) - MAX_NAMED_SHARDS} more" if len(bad) > MAX_NAMED_SHARDS else ""
    figures.problems.append(
        Problem(
            figures.stage,
            tuple(bad),
            f"{figures.shard_kind}s {_name_shards(bad)} don't add up: {details}{more}",
        )
    )


def _unknown_keys(
    figures: StageFigures,
    keys: pa.ChunkedArray,
    known: pa.ChunkedArray,
    describe: Callable[[int, str], str],
) -> None:
    """A problem for the stage when `keys` holds keys the stage before did not pass on."""
    unknown = pc.invert(pc.is_in(keys, value_set=known))
    count = pc.sum(pc.cast(unknown, pa.int64())).as_py() or 0
    if count:
        examples = ", ".join(map(str, keys.filter(unknown).to_pylist()[:5]))
        figures.problems.append(Problem(figures.stage, (), describe(count, examples)))


def _add_shard_rows(
    figures: StageFigures,
    inputs: dict[str, int],
    kept: dict[str, int],
    dropped: dict[str, dict[str, int]],
) -> None:
    for shard in sorted(set(inputs) | set(kept) | set(dropped)):
        figures.shard_rows.append((shard, INPUT, None, inputs.get(shard, 0)))
        for reason, count in sorted(dropped.get(shard, {}).items()):
            figures.shard_rows.append((shard, DROPPED, reason, count))
        figures.shard_rows.append((shard, KEPT, None, kept.get(shard, 0)))


def _sum_dropped(per_shard: dict[str, dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for counts in per_shard.values():
        total.update(counts)
    return dict(total)


# ---------------------------------------------------------------------------------------------
# The stages


def run_config(run_url: str) -> dict[str, Any]:
    run_json = storage.join(run_url, "run.json")
    if storage.exists(run_json):
        return storage.read_json(run_json).get("config") or {}
    return {}


def _source_counts(url: str) -> dict[str, int]:
    return _value_counts(read_columns(url, ["source_file"])["source_file"])


def _metadata(run_url: str) -> StageFigures:
    """Per input file: rows read (metadata/inputs.parquet), rows dropped per reason
    (metadata/drops/*.parquet) and rows in the download shards (metadata/shards/*, source_file)."""
    from laionface.stages.metadata import stage as metadata

    figures = StageFigures("metadata", "input file")
    inputs_url = storage.join(run_url, "metadata", "inputs.parquet")
    drop_urls = storage.list_files(storage.join(run_url, "metadata", "drops"), ".parquet")
    shard_urls = storage.list_files(storage.join(run_url, "metadata", "shards"), ".parquet")
    drops = parallel_map(lambda url: read_columns(url, ["source", "reason", "count"]), drop_urls)
    dropped: dict[str, dict[str, int]] = {}
    for table in drops:
        for row in table.to_pylist():
            per_file = dropped.setdefault(row["source"], {})
            per_file[row["reason"]] = per_file.get(row["reason"], 0) + int(row["count"])
    kept: Counter[str] = Counter()
    for counts in parallel_map(_source_counts, shard_urls):
        kept.update(counts)
    if storage.exists(inputs_url):
        table = read_columns(inputs_url, ["source", "input_rows"])
        inputs = {r["source"]: int(r["input_rows"]) for r in table.to_pylist()}
    else:
        inputs = {}
        figures.problems.append(
            Problem(
                "metadata",
                (),
                "metadata/inputs.parquet is missing, so the rows read per input file are unknown:"
                " the metadata stage has not finished",
            )
        )
    outcomes = {
        source: kept.get(source, 0) + sum(dropped.get(source, {}).values())
        for source in set(kept) | set(dropped)
    }
    if inputs:
        _check_shards(
            figures,
            inputs,
            outcomes,
            lambda s, i, o: (
                f"{s}: {i} rows read, {kept.get(s, 0)} in metadata/shards +"
                f" {o - kept.get(s, 0)} counted in metadata/drops"
            ),
        )
    else:
        inputs = outcomes
    figures.input = sum(inputs.values())
    figures.kept = sum(kept.values())
    figures.dropped = _ordered(_sum_dropped(dropped), metadata.REASONS)
    _add_shard_rows(figures, inputs, dict(kept), dropped)
    return figures


def _grouped(table: pa.Table, shard: str, reason: str) -> dict[str, dict[str | None, int]]:
    """{shard: {reason or None: rows}} of `table` grouped by its `shard` and `reason` columns."""
    out: dict[str, dict[str | None, int]] = {}
    if table.num_rows == 0:
        return out
    counts = table.group_by([shard, reason]).aggregate([(shard, "count")])
    for row in counts.to_pylist():
        out.setdefault(row[shard], {})[row[reason]] = int(row[f"{shard}_count"])
    return out


def _split_kept(grouped: dict[str, dict[str | None, int]]) -> tuple[dict, dict]:
    """Per shard: (kept = rows with a null reason, {reason: dropped rows})."""
    kept = {s: counts.get(None, 0) for s, counts in grouped.items()}
    dropped = {
        s: {r: n for r, n in counts.items() if r is not None} for s, counts in grouped.items()
    }
    return kept, dropped


def _shard_names(values: pa.ChunkedArray | pa.Array, digits: int) -> pa.Array:
    """Zero-padded shard names of integer shard ids (img2dataset's `oom_shard_count`)."""
    return pc.utf8_lpad(pc.cast(values, pa.string()), digits, "0")


@dataclass
class _Upstream:
    """What the stage after `stage` is checked against: its kept rows, in all and per shard."""

    stage: str
    kept_total: int
    kept: dict[str, int]


def _download(run_url: str, config: dict[str, Any], first: bool) -> tuple[StageFigures, pa.Table]:
    from laionface.stages.download import stage as download

    rows_per_shard = int(config.get("metadata", {}).get("rows_per_shard", 10_000))
    index_digits = len(str(download.samples_per_shard_for(rows_per_shard) - 1))
    outcomes = download.latest_outcomes(run_url)
    origin = pc.divide(pc.cast(outcomes["input_key"], pa.int64()), 10**index_digits)
    grouped = _grouped(
        pa.table(
            {
                "shard": _shard_names(origin, download.SHARD_DIGITS),
                "reason": outcomes["error_category"],
            }
        ),
        "shard",
        "reason",
    )
    kept, dropped = _split_kept(grouped)
    outcome_counts = {s: sum(c.values()) for s, c in grouped.items()}
    figures = StageFigures("download", "metadata shard")
    shard_urls = storage.list_files(storage.join(run_url, "metadata", "shards"), ".parquet")
    if shard_urls:
        inputs = dict(
            zip(map(_shard_of, shard_urls), parallel_map(_num_rows, shard_urls), strict=True)
        )
    elif first:
        inputs = dict(outcome_counts)
    else:
        inputs = {}
    _check_shards(
        figures,
        inputs,
        outcome_counts,
        lambda s, i, o: (
            f"{s}: {i} rows in metadata/shards/{s}.parquet, {o} download outcomes"
            + (
                " (no complete raw shard holds the others: not downloaded yet, or it failed)"
                if o < i
                else ""
            )
        ),
    )
    figures.input = sum(inputs.values())
    figures.kept = sum(kept.values())
    figures.dropped = _ordered(_sum_dropped(dropped), download.CATEGORIES)
    _add_shard_rows(figures, inputs, kept, dropped)
    return figures, outcomes


def _faces(run_url: str, outcomes: pa.Table | None) -> StageFigures:
    urls = storage.list_files(storage.join(run_url, "faces"), ".parquet")
    rows = dict(zip(map(_shard_of, urls), parallel_map(_num_rows, urls), strict=True))
    figures = StageFigures("faces", "raw shard")
    if outcomes is None:
        inputs = dict(rows)
    else:
        successes = outcomes.filter(pc.equal(outcomes["status"], "success"))
        inputs = _value_counts(successes["shard"])
    _check_shards(
        figures,
        inputs,
        rows,
        lambda s, i, o: (
            f"{s}: {i} successful downloads in raw/{s}.parquet, "
            + (f"{o} rows in faces/{s}.parquet" if s in rows else f"no faces/{s}.parquet yet")
        ),
    )
    figures.input = sum(inputs.values())
    figures.kept = sum(rows.values())
    _add_shard_rows(figures, inputs, rows, {})
    return figures


def _read_select(url: str) -> pa.Table:
    table = read_columns(url, ["key", "kept", "reason"])
    return table.append_column("shard", pa.array([_shard_of(url)] * table.num_rows, pa.string()))


def _select(run_url: str, upstream: _Upstream | None) -> tuple[StageFigures, pa.Table]:
    """Select figures, and the keys select kept with their shard (what dedup must decide)."""
    from laionface.stages import select

    urls = storage.list_files(storage.join(run_url, "select"), ".parquet")
    decisions = pa.concat_tables(parallel_map(_read_select, urls))
    figures = StageFigures("select", "raw shard")
    grouped = _grouped(decisions.select(["shard", "reason"]), "shard", "reason")
    kept, dropped = _split_kept(grouped)
    outcome_counts = {s: sum(c.values()) for s, c in grouped.items()}
    for url in urls:  # an empty select shard still says "0 decisions" for its shard
        outcome_counts.setdefault(_shard_of(url), 0)
    inputs = dict(outcome_counts) if upstream is None else upstream.kept
    _check_shards(
        figures,
        inputs,
        outcome_counts,
        lambda s, i, o: (
            f"{s}: {i} images in faces/{s}.parquet, "
            + (f"{o} decisions in select/{s}.parquet" if o else f"no decisions in select/{s}")
        ),
    )
    figures.input = sum(inputs.values())
    figures.kept = sum(kept.values())
    figures.dropped = _ordered(_sum_dropped(dropped), select.REASONS)
    _add_shard_rows(figures, inputs, kept, dropped)
    kept_keys = decisions.filter(pc.fill_null(decisions["kept"], False)).select(["key", "shard"])
    return figures, kept_keys


DEDUP_REASONS = ("exact_duplicate", "near_duplicate", "eval_overlap")


def _dedup(run_url: str, selected: pa.Table | None) -> tuple[StageFigures, pa.Table | None]:
    """Dedup figures, and the keys dedup kept with their raw shard (what emit must publish)."""
    url = storage.join(run_url, "dedup", "decisions.parquet")
    decisions = read_columns(url, ["key", "kept", "reason"])
    figures = StageFigures("dedup", "raw shard")
    if selected is None:  # select's output is gone: count the decisions as they are
        reasons = pc.if_else(decisions["kept"], pa.scalar(None, pa.string()), decisions["reason"])
        counts = _value_counts(reasons)
        figures.input = decisions.num_rows
        figures.kept = counts.pop("unknown", 0)
        figures.dropped = _ordered(counts, DEDUP_REASONS)
        return figures, None

    # Each decision is attributed to the raw shard select kept its key in.
    reason = pc.if_else(
        pc.fill_null(decisions["kept"], False), pa.scalar(None, pa.string()), decisions["reason"]
    )
    decided = pa.table({"key": decisions["key"], "reason": reason, "decided": decisions["kept"]})
    joined = selected.join(decided, "key", join_type="left outer")
    undecided = joined.filter(pc.is_null(joined["decided"]))
    joined = joined.filter(pc.is_valid(joined["decided"]))
    grouped = _grouped(joined.select(["shard", "reason"]), "shard", "reason")
    kept, dropped = _split_kept(grouped)
    outcome_counts = {s: sum(c.values()) for s, c in grouped.items()}
    inputs = _value_counts(selected["shard"])
    missing = _value_counts(undecided["shard"])
    _check_shards(
        figures,
        inputs,
        outcome_counts,
        lambda s, i, o: (
            f"{s}: {i} images kept in select/{s}.parquet, {o} decisions in dedup/decisions.parquet"
            + (f" ({missing[s]} without a decision)" if missing.get(s) else "")
        ),
    )
    _unknown_keys(
        figures,
        decisions["key"],
        selected["key"],
        lambda n, e: (
            f"{n} decisions in dedup/decisions.parquet are for keys no select shard"
            f" kept (e.g. {e}): dedup ran on other select output"
        ),
    )
    figures.input = sum(inputs.values())
    figures.kept = sum(kept.values())
    figures.dropped = _ordered(_sum_dropped(dropped), DEDUP_REASONS)
    _add_shard_rows(figures, inputs, kept, dropped)
    kept_keys = joined.filter(pc.fill_null(joined["decided"], False)).select(["key", "shard"])
    return figures, kept_keys


def _dataset_shards(run_url: str) -> list[str]:
    """dataset/NNNNN.parquet of the published dataset (not manifest.parquet)."""
    urls = storage.list_files(storage.join(run_url, "dataset"), ".parquet")
    return [url for url in urls if _shard_of(url).isdigit()]


def _read_dataset_shard(url: str) -> pa.Table:
    table = read_columns(url, ["key", "raw_shard"])
    return table.append_column(
        "dataset_shard", pa.array([_shard_of(url)] * len(table), pa.string())
    )


def _emit(run_url: str, final: pa.Table | None) -> tuple[StageFigures, pa.Table]:
    """Published samples per raw shard, checked key by key against the samples the stage before
    kept (`final`: key, shard); per dataset shard against sizes.json and manifest.parquet.

    Returns the figures and the samples per dataset shard (shard, samples).
    """
    figures = StageFigures("emit", "raw shard")
    folder = storage.join(run_url, "dataset")
    published = pa.concat_tables(parallel_map(_read_dataset_shard, _dataset_shards(run_url)))
    per_dataset_shard = _value_counts(published["dataset_shard"])
    sizes_url = storage.join(folder, "sizes.json")
    if storage.exists(sizes_url):  # copy mode: the count OpenCLIP-style loaders trust
        claimed = {n.rsplit(".", 1)[0]: int(c) for n, c in storage.read_json(sizes_url).items()}
        _check_shards(
            figures,
            claimed,
            per_dataset_shard,
            lambda s, i, o: f"{s}: sizes.json says {i} samples, dataset/{s}.parquet holds {o}",
        )
    manifest_url = storage.join(folder, "manifest.parquet")
    if storage.exists(manifest_url):
        manifest = _value_counts(read_columns(manifest_url, ["shard"])["shard"])
        _check_shards(
            figures,
            per_dataset_shard,
            manifest,
            lambda s, i, o: f"{s}: dataset/{s}.parquet holds {i} samples, manifest.parquet {o}",
        )
    outcome = _value_counts(published["raw_shard"])
    if final is None:
        inputs = dict(outcome)
    else:
        inputs = _value_counts(final["shard"])
        _unknown_keys(
            figures,
            published["key"],
            final["key"],
            lambda n, e: (
                f"{n} published samples were not kept by the stages before (e.g."
                f" {e}): the dataset is stale"
            ),
        )
    _check_shards(
        figures,
        inputs,
        outcome,
        lambda s, i, o: f"{s}: {i} samples kept from raw shard {s}, {o} in the dataset",
    )
    if pc.count_distinct(published["key"]).as_py() != published.num_rows:
        figures.problems.append(
            Problem("emit", (), "some keys are published more than once in dataset/*.parquet")
        )
    figures.input = sum(inputs.values())
    figures.kept = published.num_rows
    _add_shard_rows(figures, inputs, outcome, {})
    sizes = pa.table(
        {
            "shard": pa.array(sorted(per_dataset_shard), pa.string()),
            "samples": pa.array(
                [per_dataset_shard[s] for s in sorted(per_dataset_shard)], pa.int64()
            ),
        }
    )
    return figures, sizes


# ---------------------------------------------------------------------------------------------
# The funnel


def present_stages(run_url: str) -> dict[str, bool]:
    """Which stages have output in the run folder."""

    def has(*parts: str, suffix: str = ".parquet") -> bool:
        return bool(storage.list_files(storage.join(run_url, *parts), suffix))

    return {
        "metadata": has("metadata", "shards") or has("metadata", "drops"),
        "download": has("raw"),
        "faces": has("faces"),
        "select": has("select"),
        "dedup": storage.exists(storage.join(run_url, "dedup", "decisions.parquet")),
        "emit": bool(_dataset_shards(run_url)),
    }


def funnel(run_url: str, upto: str | None = None) -> Funnel:
    """The funnel of the stages present (up to and including `upto`), with conservation checked.

    Inconsistencies are collected in `Funnel.problems`, not raised: see `check_conservation`.
    """
    run_url = run_url.rstrip("/")
    if upto is not None and upto not in STAGE_ORDER:
        raise ValueError(f"unknown stage {upto!r}; the stages are {', '.join(STAGE_ORDER)}")
    last = STAGE_ORDER.index(upto) if upto else len(STAGE_ORDER) - 1
    wanted = STAGE_ORDER[: last + 1]
    present = {name: ok for name, ok in present_stages(run_url).items() if name in wanted}
    if not any(present.values()):
        if not storage.exists(storage.join(run_url, "run.json")):
            raise AuditError(
                f"{run_url}: not a laionface run folder (no run.json, no stage output)"
            )
        raise AuditError(
            f"{run_url}: no stage output yet: run the pipeline first (laionface run PIPELINE"
            f" --run-dir {run_url})"
        )
    config = run_config(run_url)
    disabled = [] if _dedup_enabled(config) else ["dedup"]
    stages: list[StageFigures] = []
    tables: dict[str, pa.Table] = {}
    outcomes = selected = final = None
    upstream: _Upstream | None = None
    for name in wanted:
        if not present[name]:
            if name not in disabled:
                upstream = None  # a gap: the next stage can't be checked against the one before
            continue
        if name == "metadata":
            figures = _metadata(run_url)
        elif name == "download":
            figures, outcomes = _download(run_url, config, first=not stages)
            tables["outcomes"] = outcomes
        elif name == "faces":
            figures = _faces(run_url, outcomes if upstream else None)
        elif name == "select":
            figures, selected = _select(run_url, upstream)
            final = selected
        elif name == "dedup":
            figures, final = _dedup(run_url, selected if upstream else None)
        else:
            figures, tables["dataset_shards"] = _emit(run_url, final if upstream else None)
        if upstream is not None and figures.input != upstream.kept_total:
            figures.problems.append(
                Problem(
                    name,
                    (),
                    f"{figures.input:,} rows entered {name} but {upstream.stage} kept"
                    f" {upstream.kept_total:,}",
                )
            )
        stages.append(figures)
        upstream = _Upstream(name, figures.kept, _kept_per_shard(figures))
    missing = [name for name in wanted if not present[name]]
    problems = [p for s in stages for p in s.problems]
    return Funnel(run_url, stages, missing, problems, disabled, tables)


def _dedup_enabled(config: dict[str, Any]) -> bool:
    """As the emit stage decides: with every dedup setting off, emit publishes select's output."""
    section = config.get("dedup") or {}
    return bool(section.get("exact", True) or section.get("near", True) or section.get("reference"))


def _kept_per_shard(figures: StageFigures) -> dict[str, int]:
    return {shard: n for shard, outcome, _, n in figures.shard_rows if outcome == KEPT}


def funnel_summary(run_url: str, upto: str | None = None) -> dict[str, Any]:
    """`funnel(...).as_dict()`: plain JSON-able data (for dataset.json)."""
    return funnel(run_url, upto).as_dict()


def check_conservation(result: Funnel) -> None:
    """Raise ConservationError naming the stages and shards whose counts don't add up."""
    if result.problems:
        raise ConservationError(result.problems)


def write_audit(run_url: str) -> Funnel:
    """Write audit/funnel.parquet and audit/shards.parquet; raise ConservationError if the
    funnel does not add up (the two files are then removed, never left disagreeing with the run).
    """
    result = funnel(run_url)
    funnel_url = storage.join(run_url, "audit", "funnel.parquet")
    shards_url = storage.join(run_url, "audit", "shards.parquet")
    if not result.ok:
        storage.remove(funnel_url)
        storage.remove(shards_url)
        check_conservation(result)
    storage.write_parquet(result.table(), funnel_url)
    storage.write_parquet(result.shards_table(), shards_url)
    log.info(
        "audit: %s input rows, %s kept (%.2f%%); funnel in %s",
        f"{result.input_rows:,}",
        f"{result.kept:,}",
        pct(result.kept, result.input_rows),
        funnel_url,
    )
    return result


# ---------------------------------------------------------------------------------------------
# laionface stats


def reason_label(row: dict[str, Any]) -> str:
    """The reason column as printed: the drop reason, or (in) / (kept) for a stage's totals."""
    if row["outcome"] == DROPPED:
        return row["reason"]
    return "(kept)" if row["outcome"] == KEPT else "(in)"


def format_table(result: Funnel) -> str:
    """The funnel as plain text, aligned columns (what `laionface stats` prints)."""
    header = ("stage", "reason", "count", "% of input", "% of stage input")
    lines = [header]
    for row in result.rows():
        lines.append(
            (
                row["stage"],
                reason_label(row),
                f"{row['count']:,}",
                f"{row['pct_of_input']:.2f}%",
                f"{row['pct_of_stage_input']:.2f}%",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    for line in lines:
        cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(line[2:], widths[2:], strict=True)]
        text.append("  ".join(cells).rstrip())
    return "\n".join(text)


def stats_command(run_url: str, out: TextIO | None = None) -> int:
    """`laionface stats RUN`: print the funnel; 0 if it adds up, else 1 (the error printed)."""
    out = out or sys.stdout
    try:
        result = funnel(run_url)
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"run: {result.run_url}", file=out)
    print(format_table(result), file=out)
    print(
        f"kept: {result.kept:,} of {result.input_rows:,} input rows"
        f" ({pct(result.kept, result.input_rows):.2f}%) after {result.stages[-1].stage}",
        file=out,
    )
    if result.not_run:
        print(f"stages without output: {', '.join(result.not_run)}", file=out)
    if result.disabled:
        print(f"stages turned off in the config: {', '.join(result.disabled)}", file=out)
    if not result.ok:
        print(f"error: {ConservationError(result.problems)}", file=sys.stderr)
        return 1
    print("conservation: ok (every input row is kept, or dropped once for one reason)", file=out)
    return 0
