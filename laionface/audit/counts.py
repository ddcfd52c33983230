"""The figures of each stage, counted from the files it wrote and checked against the stage before.

    stage     counted per            input (measured from the upstream files)    reasons
    metadata  metadata input file    rows read from the file                     metadata filters
    download  metadata shard         rows of metadata/shards/NNNNN.parquet       failure category
    faces     raw shard              successful downloads in raw/NNNNN.parquet   (none)
    select    raw shard              rows of faces/NNNNN.parquet                 select rules
    dedup     raw shard of the key   select-kept rows of select/NNNNN.parquet    dedup reasons
    emit      dataset shard          dedup-kept samples                          (none)

The reasons and their order are layout.DROP_REASONS. A download row is counted once, under its
latest outcome (stages.download.outcomes: a `--retry-failed` round supersedes earlier
failures). Retry shards are raw shards of their own, so from faces on the shards are raw shards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from laionface.audit.model import DROPPED, INPUT, KEPT, Problem, StageFigures
from laionface.audit.read import num_rows, parallel_map, read_columns, value_counts
from laionface.dataset import contract
from laionface.io import storage
from laionface.layout import DROP_REASONS, RunLayout, key_shards, samples_per_shard, shard_of_file
from laionface.stages.download.outcomes import latest_outcomes

# Shards named in an error message before "and N more".
MAX_NAMED_SHARDS = 10


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


def _source_counts(url: str) -> dict[str, int]:
    return value_counts(read_columns(url, ["source_file"])["source_file"])


def metadata(run_url: str) -> StageFigures:
    """Per input file: rows read (metadata/inputs.parquet), rows dropped per reason
    (metadata/drops/*.parquet) and rows in the download shards (metadata/shards/*, source_file)."""
    figures = StageFigures("metadata", "input file")
    layout = RunLayout(run_url)
    inputs_url = layout.metadata_inputs
    drop_urls = storage.list_files(layout.metadata_folder("drops"), ".parquet")
    shard_urls = storage.list_files(layout.metadata_shards, ".parquet")
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
    figures.dropped = _ordered(_sum_dropped(dropped), DROP_REASONS["metadata"])
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


@dataclass
class Upstream:
    """What the stage after `stage` is checked against: its kept rows, in all and per shard."""

    stage: str
    kept_total: int
    kept: dict[str, int]


def download(run_url: str, rows_per_shard: int, first: bool) -> tuple[StageFigures, pa.Table]:
    """Download figures (each row under its latest outcome), and those outcomes.

    `rows_per_shard`: the metadata.rows_per_shard the raw shards were made with (it sets the
    digits of a key's row index)."""
    outcomes = latest_outcomes(run_url)
    origin = key_shards(outcomes["input_key"], samples_per_shard(rows_per_shard))
    grouped = _grouped(
        pa.table({"shard": origin, "reason": outcomes["error_category"]}), "shard", "reason"
    )
    kept, dropped = _split_kept(grouped)
    outcome_counts = {s: sum(c.values()) for s, c in grouped.items()}
    figures = StageFigures("download", "metadata shard")
    shard_urls = storage.list_files(RunLayout(run_url).metadata_shards, ".parquet")
    if shard_urls:
        inputs = dict(
            zip(map(shard_of_file, shard_urls), parallel_map(num_rows, shard_urls), strict=True)
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
    figures.dropped = _ordered(_sum_dropped(dropped), DROP_REASONS["download"])
    _add_shard_rows(figures, inputs, kept, dropped)
    return figures, outcomes


def faces(run_url: str, outcomes: pa.Table | None) -> StageFigures:
    urls = storage.list_files(RunLayout(run_url).faces_folder, ".parquet")
    rows = dict(zip(map(shard_of_file, urls), parallel_map(num_rows, urls), strict=True))
    figures = StageFigures("faces", "raw shard")
    if outcomes is None:
        inputs = dict(rows)
    else:
        successes = outcomes.filter(pc.equal(outcomes["status"], "success"))
        inputs = value_counts(successes["shard"])
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
    return table.append_column(
        "shard", pa.array([shard_of_file(url)] * table.num_rows, pa.string())
    )


def select(run_url: str, upstream: Upstream | None) -> tuple[StageFigures, pa.Table]:
    """Select figures, and the keys select kept with their shard (what dedup must decide)."""
    urls = storage.list_files(RunLayout(run_url).select_folder, ".parquet")
    decisions = pa.concat_tables(parallel_map(_read_select, urls))
    figures = StageFigures("select", "raw shard")
    grouped = _grouped(decisions.select(["shard", "reason"]), "shard", "reason")
    kept, dropped = _split_kept(grouped)
    outcome_counts = {s: sum(c.values()) for s, c in grouped.items()}
    for url in urls:  # an empty select shard still says "0 decisions" for its shard
        outcome_counts.setdefault(shard_of_file(url), 0)
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
    figures.dropped = _ordered(_sum_dropped(dropped), DROP_REASONS["select"])
    _add_shard_rows(figures, inputs, kept, dropped)
    kept_keys = decisions.filter(pc.fill_null(decisions["kept"], False)).select(["key", "shard"])
    return figures, kept_keys


def dedup(run_url: str, selected: pa.Table | None) -> tuple[StageFigures, pa.Table | None]:
    """Dedup figures, and the keys dedup kept with their raw shard (what emit must publish)."""
    url = RunLayout(run_url).dedup_decisions
    decisions = read_columns(url, ["key", "kept", "reason"])
    figures = StageFigures("dedup", "raw shard")
    if selected is None:  # select's output is gone: count the decisions as they are
        reasons = pc.if_else(decisions["kept"], pa.scalar(None, pa.string()), decisions["reason"])
        counts = value_counts(reasons)
        figures.input = decisions.num_rows
        figures.kept = counts.pop("unknown", 0)
        figures.dropped = _ordered(counts, DROP_REASONS["dedup"])
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
    inputs = value_counts(selected["shard"])
    missing = value_counts(undecided["shard"])
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
    figures.dropped = _ordered(_sum_dropped(dropped), DROP_REASONS["dedup"])
    _add_shard_rows(figures, inputs, kept, dropped)
    kept_keys = joined.filter(pc.fill_null(joined["decided"], False)).select(["key", "shard"])
    return figures, kept_keys


def dataset_shards(run_url: str) -> list[str]:
    """dataset/NNNNN.parquet of the published dataset (not manifest.parquet)."""
    urls = storage.list_files(RunLayout(run_url).dataset, ".parquet")
    return [url for url in urls if shard_of_file(url).isdigit()]


def _read_dataset_shard(url: str) -> pa.Table:
    table = read_columns(url, ["key", "raw_shard"])
    return table.append_column(
        "dataset_shard", pa.array([shard_of_file(url)] * len(table), pa.string())
    )


def _check_index_files(figures: StageFigures, folder: str, per_dataset_shard: dict) -> None:
    """The samples per dataset shard against sizes.json and manifest.parquet."""
    sizes_url = storage.join(folder, contract.SIZES_JSON)
    if storage.exists(sizes_url):  # copy mode: the count OpenCLIP-style loaders trust
        claimed = {n.rsplit(".", 1)[0]: int(c) for n, c in storage.read_json(sizes_url).items()}
        _check_shards(
            figures,
            claimed,
            per_dataset_shard,
            lambda s, i, o: f"{s}: sizes.json says {i} samples, dataset/{s}.parquet holds {o}",
        )
    manifest_url = storage.join(folder, contract.MANIFEST_PARQUET)
    if storage.exists(manifest_url):
        manifest = value_counts(read_columns(manifest_url, ["shard"])["shard"])
        _check_shards(
            figures,
            per_dataset_shard,
            manifest,
            lambda s, i, o: f"{s}: dataset/{s}.parquet holds {i} samples, manifest.parquet {o}",
        )


def emit(run_url: str, final: pa.Table | None) -> tuple[StageFigures, pa.Table]:
    """Published samples per raw shard, checked key by key against the samples the stage before
    kept (`final`: key, shard); per dataset shard against sizes.json and manifest.parquet.

    Returns the figures and the samples per dataset shard (shard, samples).
    """
    figures = StageFigures("emit", "raw shard")
    published = pa.concat_tables(parallel_map(_read_dataset_shard, dataset_shards(run_url)))
    per_dataset_shard = value_counts(published["dataset_shard"])
    _check_index_files(figures, RunLayout(run_url).dataset, per_dataset_shard)
    outcome = value_counts(published["raw_shard"])
    if final is None:
        inputs = dict(outcome)
    else:
        inputs = value_counts(final["shard"])
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
    names = sorted(per_dataset_shard)
    sizes = pa.table(
        {
            "shard": pa.array(names, pa.string()),
            "samples": pa.array([per_dataset_shard[s] for s in names], pa.int64()),
        }
    )
    return figures, sizes
