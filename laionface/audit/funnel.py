"""The audit: where every input row of a run ended up, and a check that nothing was lost.

The funnel follows the rows from the metadata inputs to the published dataset. Every row that
entered the first stage present has exactly one fate: kept to the end, or dropped by one stage for
one reason (how each stage is counted: counts.py).

Conservation is checked per shard (a stage's outcomes for a shard add up to the input measured
from the stage before it) and between stages (a stage's input is the kept count of the stage
before). A stage with no output at all is listed as missing (the stages after a gap are counted,
but can't be checked against the stage before it); a stage with some shards missing or with counts
that don't add up is a `ConservationError` that names the stage and the shards.

`write_audit` keeps the figures as `audit/funnel.parquet` (AUDIT_FUNNEL) and `audit/shards.parquet`
(AUDIT_SHARDS, per shard); the pipeline calls it once, after the stages of a command.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from laionface.audit import counts
from laionface.audit.model import (
    KEPT,
    AuditError,
    ConservationError,
    Funnel,
    Problem,
    StageFigures,
    pct,
)
from laionface.audit.read import recorded_settings, run_config
from laionface.config import DedupSection, MetadataSection
from laionface.io import storage
from laionface.layout import STAGE_ORDER, RunLayout

log = logging.getLogger("laionface")


def present_stages(run_url: str) -> dict[str, bool]:
    """Which stages have output in the run folder."""
    layout = RunLayout(run_url)

    def has(folder: str) -> bool:
        return bool(storage.list_files(folder, ".parquet"))

    return {
        "metadata": has(layout.metadata_shards) or has(layout.metadata_folder("drops")),
        "download": has(layout.raw),
        "faces": has(layout.faces_folder),
        "select": has(layout.select_folder),
        "dedup": storage.exists(layout.dedup_decisions),
        "emit": bool(counts.dataset_shards(run_url)),
    }


def _dedup_enabled(run_url: str) -> bool:
    """As emit decides (with the last command's settings): with every dedup setting off, emit
    publishes select's output."""
    return DedupSection.model_validate(run_config(run_url).get("dedup") or {}).enabled


def _rows_per_shard(run_url: str) -> int:
    """metadata.rows_per_shard as the download stage last ran with it."""
    recorded = recorded_settings(run_url, "download").get("metadata.rows_per_shard")
    if recorded is None:
        recorded = run_config(run_url).get("metadata", {}).get("rows_per_shard")
    return int(recorded or MetadataSection().rows_per_shard)


class _Counter:
    """Counts the stages in order, each checked against the one before when it is known."""

    def __init__(self, run_url: str):
        self.run_url = run_url
        self.tables: dict[str, pa.Table] = {}
        self.outcomes = self.selected = self.final = None
        self.upstream: counts.Upstream | None = None

    def figures(self, name: str, first: bool) -> StageFigures:
        run_url, linked = self.run_url, self.upstream is not None
        if name == "metadata":
            return counts.metadata(run_url)
        if name == "download":
            figures, self.outcomes = counts.download(run_url, _rows_per_shard(run_url), first)
            self.tables["outcomes"] = self.outcomes
            return figures
        if name == "faces":
            return counts.faces(run_url, self.outcomes if linked else None)
        if name == "select":
            figures, self.selected = counts.select(run_url, self.upstream)
            self.final = self.selected
            return figures
        if name == "dedup":
            figures, self.final = counts.dedup(run_url, self.selected if linked else None)
            return figures
        figures, self.tables["dataset_shards"] = counts.emit(
            run_url, self.final if linked else None
        )
        return figures

    def check_input(self, figures: StageFigures) -> None:
        upstream = self.upstream
        if upstream is not None and figures.input != upstream.kept_total:
            figures.problems.append(
                Problem(
                    figures.stage,
                    (),
                    f"{figures.input:,} rows entered {figures.stage} but {upstream.stage} kept"
                    f" {upstream.kept_total:,}",
                )
            )
        kept = {shard: n for shard, outcome, _, n in figures.shard_rows if outcome == KEPT}
        self.upstream = counts.Upstream(figures.stage, figures.kept, kept)


def _no_output(run_url: str) -> AuditError:
    if not storage.exists(RunLayout(run_url).run_json):
        return AuditError(f"{run_url}: not a laionface run folder (no run.json, no stage output)")
    return AuditError(
        f"{run_url}: no stage output yet: run the pipeline first (laionface run PIPELINE"
        f" --run-dir {run_url})"
    )


def funnel(run_url: str, upto: str | None = None) -> Funnel:
    """The funnel of the stages present (up to and including `upto`), with conservation checked.

    Inconsistencies are collected in `Funnel.problems`, not raised: see `check_conservation`.
    """
    run_url = run_url.rstrip("/")
    if upto is not None and upto not in STAGE_ORDER:
        raise ValueError(f"unknown stage {upto!r}; the stages are {', '.join(STAGE_ORDER)}")
    wanted = STAGE_ORDER[: STAGE_ORDER.index(upto) + 1] if upto else STAGE_ORDER
    present = {name: ok for name, ok in present_stages(run_url).items() if name in wanted}
    if not any(present.values()):
        raise _no_output(run_url)
    disabled = [] if _dedup_enabled(run_url) else ["dedup"]
    counter = _Counter(run_url)
    stages: list[StageFigures] = []
    for name in wanted:
        if not present[name]:
            if name not in disabled:
                counter.upstream = None  # a gap: the next stage can't be checked against it
            continue
        figures = counter.figures(name, first=not stages)
        counter.check_input(figures)
        stages.append(figures)
    missing = [name for name in wanted if not present[name]]
    problems = [p for s in stages for p in s.problems]
    return Funnel(run_url, stages, missing, problems, disabled, counter.tables)


def check_conservation(result: Funnel) -> None:
    """Raise ConservationError naming the stages and shards whose counts don't add up."""
    if result.problems:
        raise ConservationError(result.problems)


def write_audit(run_url: str) -> Funnel:
    """Write audit/funnel.parquet and audit/shards.parquet; raise ConservationError if the
    funnel does not add up (the two files are then removed, never left disagreeing with the run).
    """
    result = funnel(run_url)
    layout = RunLayout(run_url)
    funnel_url, shards_url = layout.audit_funnel, layout.audit_shards
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
