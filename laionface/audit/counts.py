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

from laionface.audit.model import DROPPED, INPUT, KEPT, DownloadDetail, Problem, StageFigures
from laionface.audit.read import num_rows, parallel_map, read_columns
from laionface.audit.shards import Mapper, download_fates, source_counts
from laionface.dataset import contract
from laionface.io import storage
from laionface.layout import DROP_REASONS, RunLayout, samples_per_shard, shard_of_file
from laionface.stages.download.outcomes import http_429s, origin_plan

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


def metadata(run_url: str, mapper: Mapper) -> StageFigures:
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
    for counts in mapper(source_counts, [{"url": url} for url in shard_urls]):
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


def download(
    run_url: str, rows_per_shard: int, first: bool, mapper: Mapper
) -> tuple[StageFigures, DownloadDetail]:
    """Download figures (each row under its latest outcome), and the report's detail.

    `rows_per_shard`: the metadata.rows_per_shard the raw shards were made with (it sets the
    digits of a key's row index)."""
    plan = origin_plan(run_url, samples_per_shard(rows_per_shard), mapper)
    tasks = [dict(run_url=run_url, shard=s, sources=r) for s, r in plan.items()]
    detail, kept, dropped = DownloadDetail(), {}, {}
    for shard, part in zip(plan, mapper(download_fates, tasks), strict=True):
        detail.add(part)
        kept[shard] = part["fates"].get("", 0)
        dropped[shard] = {r: n for r, n in part["fates"].items() if r}
    detail.http_429_by_host = http_429s(RunLayout(run_url))
    outcome_counts = {s: kept[s] + sum(dropped[s].values()) for s in plan}
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
    return figures, detail


def faces(run_url: str, successes: dict[str, int] | None) -> StageFigures:
    """Faces figures; `successes`: the latest successful downloads per raw shard, when the
    download stage was counted."""
    urls = storage.list_files(RunLayout(run_url).faces_folder, ".parquet")
    rows = dict(zip(map(shard_of_file, urls), parallel_map(num_rows, urls), strict=True))
    figures = StageFigures("faces", "raw shard")
    inputs = dict(rows) if successes is None else dict(successes)
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


def _fates_figures(
    figures: StageFigures, fates: dict[str, dict[str, int]], inputs: dict[str, int], order
) -> None:
    """Fill `figures` from per-shard fates ({shard: {reason or "" for kept: rows}})."""
    kept = {s: f.get("", 0) for s, f in fates.items()}
    dropped = {s: {r: n for r, n in f.items() if r} for s, f in fates.items()}
    figures.input = sum(inputs.values())
    figures.kept = sum(kept.values())
    figures.dropped = _ordered(_sum_dropped(dropped), order)
    _add_shard_rows(figures, inputs, kept, dropped)


def select(fates: dict[str, dict], upstream: Upstream | None) -> StageFigures:
    """Select figures from the raw shards' fates (shards.raw_shard_fates)."""
    figures = StageFigures("select", "raw shard")
    per_shard = {s: f["select"] for s, f in fates.items()}
    outcomes = {s: sum(c.values()) for s, c in per_shard.items()}
    inputs = dict(outcomes) if upstream is None else upstream.kept
    _check_shards(
        figures,
        inputs,
        outcomes,
        lambda s, i, o: (
            f"{s}: {i} images in faces/{s}.parquet, "
            + (f"{o} decisions in select/{s}.parquet" if o else f"no decisions in select/{s}")
        ),
    )
    _fates_figures(figures, per_shard, inputs, DROP_REASONS["select"])
    return figures


def _unknown_problem(figures: StageFigures, unknown: list[dict], describe) -> None:
    """A problem for the stage when shards hold keys the stage before did not pass on."""
    count = sum(u["count"] for u in unknown)
    if count:
        examples = ", ".join(str(e) for u in unknown for e in u["examples"])
        figures.problems.append(Problem(figures.stage, (), describe(count, examples)))


def dedup(fates: dict[str, dict], decisions_rows: int) -> StageFigures:
    """Dedup figures: each decision under the raw shard of its key, checked against the keys
    select kept there (`fates`: shards.raw_shard_fates; `decisions_rows`: the file's rows)."""
    figures = StageFigures("dedup", "raw shard")
    per_shard = {s: f["dedup"]["fates"] for s, f in fates.items()}
    outcomes = {s: sum(c.values()) for s, c in per_shard.items()}
    inputs = {s: f["select"].get("", 0) for s, f in fates.items()}
    missing = {s: f["dedup"]["undecided"] for s, f in fates.items()}
    _check_shards(
        figures,
        inputs,
        outcomes,
        lambda s, i, o: (
            f"{s}: {i} images kept in select/{s}.parquet, {o} decisions in dedup/decisions.parquet"
            + (f" ({missing[s]} without a decision)" if missing.get(s) else "")
        ),
    )
    unknown = [f["dedup"]["unknown"] for f in fates.values()]
    outside = decisions_rows - sum(f["dedup"]["decided"] for f in fates.values())
    if outside:
        unknown.append({"count": outside, "examples": []})
    _unknown_problem(
        figures,
        unknown,
        lambda n, e: (
            f"{n} decisions in dedup/decisions.parquet are for keys no select shard"
            f" kept (e.g. {e}): dedup ran on other select output"
        ),
    )
    _fates_figures(figures, per_shard, inputs, DROP_REASONS["dedup"])
    return figures


def dedup_alone(counts: dict[str, int], decisions_rows: int) -> StageFigures:
    """Dedup figures when select's output is gone: the decisions as they are."""
    figures = StageFigures("dedup", "raw shard")
    figures.input = decisions_rows
    figures.kept = counts.get("", 0)
    figures.dropped = _ordered({r: n for r, n in counts.items() if r}, DROP_REASONS["dedup"])
    return figures


def dataset_shards(run_url: str) -> list[str]:
    """dataset/NNNNN.parquet of the published dataset (not manifest.parquet)."""
    urls = storage.list_files(RunLayout(run_url).dataset, ".parquet")
    return [url for url in urls if shard_of_file(url).isdigit()]


def _check_index_files(
    figures: StageFigures, folder: str, per_dataset_shard: dict, manifest: dict | None
) -> None:
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
    if manifest is not None:
        _check_shards(
            figures,
            per_dataset_shard,
            manifest,
            lambda s, i, o: f"{s}: dataset/{s}.parquet holds {i} samples, manifest.parquet {o}",
        )


def emit(
    run_url: str, infos: dict[str, dict], fates: dict[str, dict] | None, manifest: dict | None
) -> tuple[StageFigures, pa.Table]:
    """Published samples per raw shard, checked key by key against the samples the stages
    before kept (`fates`, None when they are not known); per dataset shard (`infos`:
    shards.dataset_shard) against sizes.json and manifest.parquet (`manifest`: its rows per
    shard, None without one). Returns the figures and the samples per dataset shard."""
    figures = StageFigures("emit", "raw shard")
    per_dataset_shard = {name: info["samples"] for name, info in infos.items()}
    _check_index_files(figures, RunLayout(run_url).dataset, per_dataset_shard, manifest)
    outcome: Counter[str] = Counter()
    for info in infos.values():
        outcome.update(info["raws"])
    repeated = sum(info["repeated"] for info in infos.values())
    if fates is None:
        inputs = dict(outcome)
    else:
        inputs = {s: f["final"] for s, f in fates.items()}
        # Read key by key only where the dataset has shards (none: nothing was published).
        published = [f["emit"] for f in fates.values() if "emit" in f]
        repeated += sum(p["repeated"] for p in published)
        _unknown_problem(
            figures,
            [p["unknown"] for p in published],
            lambda n, e: (
                f"{n} published samples were not kept by the stages before (e.g."
                f" {e}): the dataset is stale"
            ),
        )
    _check_shards(
        figures,
        inputs,
        dict(outcome),
        lambda s, i, o: f"{s}: {i} samples kept from raw shard {s}, {o} in the dataset",
    )
    if repeated:
        figures.problems.append(
            Problem("emit", (), "some keys are published more than once in dataset/*.parquet")
        )
    figures.input = sum(inputs.values())
    figures.kept = sum(per_dataset_shard.values())
    _add_shard_rows(figures, inputs, dict(outcome), {})
    names = sorted(per_dataset_shard)
    sizes = pa.table(
        {
            "shard": pa.array(names, pa.string()),
            "samples": pa.array([per_dataset_shard[s] for s in names], pa.int64()),
        }
    )
    return figures, sizes
